"""Peer servers for ``benchmarks.compare``: one small file per stack.

Every peer speaks the same tiny protocol so that one load generator drives them
all (python-socketio aside, see ``socketio_room``):

- a subscriber opens a websocket to ``ws://127.0.0.1:PORT/sub``; once it is
  subscribed the server sends it one text frame ``{"type":"subscribed"}``;
- a publisher opens a websocket to ``ws://127.0.0.1:PORT/pub`` and sends text
  frames, each a JSON value; nothing is sent back;
- every subscriber gets the text of each published frame, as it was sent.

Each file is run by the benchmark as ``python -m benchmarks.peers.NAME --port P``
and serves on 127.0.0.1 until SIGTERM/SIGINT. The servers use each library the
way its documentation shows, with default settings.
"""

SUBSCRIBED = '{"type":"subscribed"}'
