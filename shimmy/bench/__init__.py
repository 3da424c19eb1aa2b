"""``shimmy bench``: shimmy against ZeroMQ, raw TCP, pipes and iceoryx2, one suite a module
(docs/benchmarks.md)."""
