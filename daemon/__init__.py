"""The node daemon (imported as ``shimmy.daemon``): settings, channel registry, shared-memory
segments, client sessions, streams, identity and access, and the peer module.  Started by
``shimmy daemon``; never imported by ``import shimmy``."""
