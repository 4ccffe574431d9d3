"""``ipc://``: the relay that joins the workers of one host (``--workers N``).

``relay`` is the process-local hub of hubs, ``wire`` its framing, ``broker``
the Broker each worker uses to talk to it.
"""

from tidings.brokers.ipc.broker import IpcBroker

__all__ = ["IpcBroker"]
