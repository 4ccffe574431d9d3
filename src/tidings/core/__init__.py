"""The engine: the hub, its connections, fan-out, queues and the shared operations.

Below the endpoints (which decode and encode protocols) and above the brokers
(which carry publications between nodes); nothing here knows a wire format
but through the codecs of :mod:`tidings.protocol`.
"""
