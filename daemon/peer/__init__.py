"""The peer module: mirrors committed ring ranges of channels published on this node into replica
rings on other nodes (docs/peering.md, which has the table of its modules).

* ``service``: ``PeerService``, what the daemon drives: events, control-message dispatch, the
  directory announcements, tick, reporting;
* ``links``: the peer links (accept, admit, dial, DNS discovery, link lifecycle);
* ``sources``: the source side (mirrors served, held slots, interest holds, carried streams);
* ``replicas``: the replica side (open and convert, reconcile, mirror requests, credits);
* ``directory``: the cluster directory (which node holds which channel name, in what role);
* ``mirror``: the transport-independent source and replica halves of one mirror;
* ``transport``: the small abstract transport (put a range, commit a tail, credits, close) and
  the replica sink it feeds;
* ``tcp``: the peer link (framing, one ``sendmsg`` per batch, ``recv_into`` the replica) and the
  TCP transport over it;
* ``rdma``: the pyverbs transport, a package (device, wire, endpoint, writer, receiver): RDMA
  WRITE + WRITE_WITH_IMM and its replica receiver;
* ``rdma_mirrors``: which transport each mirror runs over, and the RDMA handshake;
* ``auth``: mutual HMAC challenge-response on the cluster key, optional TLS.
"""
