"""The peer module: mirrors committed ring ranges of channels published on this node into replica
rings on other nodes (docs/peering.md).

* ``transport``: the small abstract transport (put a range, commit a tail, credits, close);
* ``tcp``: the peer link (framing, one ``sendmsg`` per batch, ``recv_into`` the replica) and the
  TCP transport over it;
* ``rdma``: the pyverbs transport (RDMA WRITE + WRITE_WITH_IMM) with TCP fallback;
* ``auth``: mutual HMAC challenge-response on the cluster key, optional TLS;
* ``mirror``: the transport-independent source and replica halves of one mirror;
* ``directory``: the cluster directory (which node holds which channel name, in what role);
* ``service``: ``PeerService``, what the daemon drives (links, replicas, routing, metrics).
"""
