"""``shimmy bench``: shimmy against ZeroMQ, raw TCP, pipes and iceoryx2, one suite a module
(docs/benchmarks.md).

Every figure here is compared only with a peer measured in the same run (a ratio), never with
a number from another run or a constant.  Only the command line (shimmy/cli.py) imports it: the
SDK and the daemon must never depend on the benchmark (tests/test_layers.py)."""
