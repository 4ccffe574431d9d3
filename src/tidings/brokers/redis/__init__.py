"""``redis://`` and ``redis+cluster://``: the Redis family.

``broker`` (pub/sub, grouped publish), ``history``, ``presence``, ``queue``
(the shared queue store on streams), ``wire`` (the publication codec in Redis),
``resp`` (the fast RESP reader) and ``cluster`` (the Cluster topology).
"""
