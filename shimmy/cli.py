"""The ``shimmy`` command: daemon | pub | sub | ls | stat | rm | health | bench | demo."""

from __future__ import annotations

import argparse
import json
import sys

from shimmy.errors import ShimmyError


def _cmd_daemon(args) -> int:
    from shimmy.daemon import config, server
    try:
        settings = config.load(args.config, socket=args.socket, shm_dir=args.shm_dir,
                               access=args.access, log_level=args.log_level, node=args.node,
                               peer_listen=args.peer_listen, peers=args.peer,
                               peer_dns=args.peer_dns,
                               cluster_key_file=args.cluster_key_file,
                               peer_tls_cert=args.peer_tls_cert, peer_tls_key=args.peer_tls_key,
                               peer_tls_ca=args.peer_tls_ca)
    except (OSError, ValueError) as exc:
        print(f"shimmy daemon: bad settings: {exc}", file=sys.stderr)
        return 2
    server.run(settings)
    return 0


def _client(args):
    from shimmy.sdk.client import get_client
    return get_client(args.daemon)


def _cmd_pub(args) -> int:
    from shimmy import Channel
    with Channel(args.channel, daemon=args.daemon, mode=args.mode) as ch:
        messages = args.message or (line.rstrip("\n") for line in sys.stdin)
        for text in messages:
            seq = ch.publish(text.encode())
            if args.verbose:
                print(seq)
    return 0


def _cmd_sub(args) -> int:
    from shimmy import Channel
    with Channel(args.channel, daemon=args.daemon) as ch, ch.subscribe(start=args.start) as sub:
        n = 0
        while args.count is None or n < args.count:
            msg = sub.receive(timeout=args.timeout)
            data = bytes(msg)
            if msg.lost:
                print(f"# lost {msg.lost} messages", file=sys.stderr)
            try:
                text = data.decode()
            except UnicodeDecodeError:
                text = data.hex()
            print(f"{msg.seq}\t{text}" if args.seq else text, flush=True)
            n += 1
    return 0


def _cmd_ls(args) -> int:
    reply = _client(args).request("list")
    if args.json:
        print(json.dumps(reply["channels"], indent=2))
        return 0
    rows = [("CHANNEL", "MODE", "CAPACITY", "PUBLISHED", "PUBLISHER", "SUBS", "MAX LAG",
             "NODE", "MIRRORED TO")]
    for ch in reply["channels"]:
        lag = max((s["lag_bytes"] for s in ch["subscribers"]), default=0)
        node = ch.get("node", "")
        if "replica" in ch:
            node += f" (replica, link {ch['replica']['link']})"
        rows.append((ch["name"], ch["mode"], _size(ch["capacity"]), str(ch["published"]),
                     "yes" if ch["publisher"] is not None else "-", str(len(ch["subscribers"])),
                     _size(lag), node, ",".join(m["to"] for m in ch.get("mirrors", ())) or "-"))
    for ch in reply.get("remote", ()):
        rows.append((ch["name"], ch["mode"], _size(ch["capacity"]), "-", "remote", "-", "-",
                     ch["node"], "-"))
    _print_table(rows)
    streams = reply.get("streams") or []
    if streams:
        print()
        rows = [("STREAM", "CAPACITY", "BUFFERED", "WRITTEN", "WRITER", "READER", "EOF")]
        for st in streams:
            ends = [f"pid {e['pid']} ({e['state']})" if e else "-"
                    for e in (st["writer"], st["reader"])]
            rows.append((st["name"], _size(st["capacity"]), _size(st["buffered"]),
                         _size(st["written"]), *ends, "yes" if st["eof"] else "-"))
        _print_table(rows)
    return 0


def _print_table(rows: list[tuple]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def _cmd_stat(args) -> int:
    reply = _client(args).request("stat")
    reply.pop("ok", None), reply.pop("v", None), reply.pop("id", None)
    print(json.dumps(reply, indent=2, default=str))
    return 0


def _cmd_rm(args) -> int:
    _client(args).request("delete", name=args.channel)
    return 0


def _cmd_health(args) -> int:
    from shimmy.sdk.client import DaemonClient  # noqa: F401  (import cost only)
    import msgpack
    import zmq
    from shimmy.protocol import PROTOCOL_VERSION, endpoint, resolve_socket
    path = resolve_socket(args.daemon)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoint(path))
        sock.send(msgpack.packb({"v": PROTOCOL_VERSION, "id": 1, "op": "ping"}))
        if not sock.poll(int(args.timeout * 1000)):
            print(f"unhealthy: no reply from {path} within {args.timeout} s", file=sys.stderr)
            return 1
        reply = msgpack.unpackb(sock.recv())
        print(f"ok pid={reply['pid']} uptime={reply['uptime']:.0f}s")
        return 0
    finally:
        sock.close(0)
        ctx.term()


def _cmd_bench(args) -> int:
    from shimmy.bench.runner import main as bench_main
    return bench_main(args.bench_args)


def _cmd_demo(args) -> int:
    from shimmy.demo import run_demo
    return run_demo(seconds=args.seconds, size=args.size)


def _cmd_cat(args) -> int:
    """``shimmy cat --write NAME < file`` / ``shimmy cat NAME > file``: copy stdin into a stream
    or a stream to stdout, with a progress bar on stderr when stderr is a terminal."""
    import os
    import stat
    import time
    from shimmy import Stream
    stream = Stream(args.stream, daemon=args.daemon, capacity=args.capacity)
    show = sys.stderr.isatty() if args.progress is None else args.progress
    total = None
    if args.write:
        src, end = sys.stdin.buffer, stream.writer(timeout=args.timeout)
        try:
            st = os.fstat(src.fileno())
            total = st.st_size if st.st_size and stat.S_ISREG(st.st_mode) else None
        except (OSError, ValueError):
            pass
    else:
        end, src = stream.reader(timeout=args.timeout), None
    out = sys.stdout.buffer
    buf = bytearray(args.chunk)
    done, start, shown = 0, time.monotonic(), 0.0

    def progress(final=False):
        el = max(time.monotonic() - start, 1e-9)
        rate = done / el
        line = f"\r{_size(done)}  {_size(rate)}/s"
        if total:
            eta = (total - done) / rate if rate else 0
            line += f"  {100 * done / total:5.1f}%  ETA {eta:4.0f}s"
        sys.stderr.write(line + ("\n" if final else ""))
        sys.stderr.flush()

    with end:
        while True:
            if args.write:
                n = src.readinto(buf)
                if not n:
                    break
                end.write(memoryview(buf)[:n])
            else:
                n = end.readinto(buf)
                if not n:
                    break
                out.write(memoryview(buf)[:n])
            done += n
            if show and time.monotonic() - shown > 0.2:
                shown = time.monotonic()
                progress()
    if not args.write:
        out.flush()
    if show:
        progress(final=True)
    return 0


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="shimmy", description="Shared-memory channels on a node.")
    sub = p.add_subparsers(dest="command", required=True)

    def with_daemon(sp):
        sp.add_argument("--daemon", help="daemon socket (default $SHIMMY_DAEMON or "
                                         "/run/shimmy/shimmyd.sock)")
        return sp

    d = sub.add_parser("daemon", help="run the node daemon")
    d.add_argument("--socket", help="control socket path (default /run/shimmy/shimmyd.sock)")
    d.add_argument("--config", help="TOML settings file (docs/daemon.md)")
    d.add_argument("--shm-dir", help="where shared memory lives (default /dev/shm)")
    d.add_argument("--access", choices=["open", "closed"], help="policy for unlabelled clients")
    d.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    d.add_argument("--node", help="this node's name among peers (default: hostname)")
    d.add_argument("--peer-listen", metavar="HOST:PORT", help="accept peer daemons here")
    d.add_argument("--peer", action="append", metavar="HOST:PORT",
                   help="dial this peer daemon (repeatable)")
    d.add_argument("--peer-dns", metavar="NAME:PORT",
                   help="dial every address NAME resolves to (a Kubernetes headless Service)")
    d.add_argument("--cluster-key-file", help="shared secret authenticating peer daemons")
    d.add_argument("--peer-tls-cert", help="PEM certificate: TLS on peer links")
    d.add_argument("--peer-tls-key", help="PEM private key for --peer-tls-cert")
    d.add_argument("--peer-tls-ca", help="CA bundle verifying the other daemon's certificate")
    d.set_defaults(func=_cmd_daemon)

    pb = with_daemon(sub.add_parser("pub", help="publish messages (arguments, or stdin lines)"))
    pb.add_argument("channel")
    pb.add_argument("message", nargs="*")
    pb.add_argument("--mode", choices=["reliable", "lossy"])
    pb.add_argument("-v", "--verbose", action="store_true", help="print each sequence number")
    pb.set_defaults(func=_cmd_pub)

    sb = with_daemon(sub.add_parser("sub", help="print messages as they arrive"))
    sb.add_argument("channel")
    sb.add_argument("--count", type=int, help="stop after N messages")
    sb.add_argument("--start", choices=["next", "oldest"], default="next")
    sb.add_argument("--timeout", type=float, help="give up after this many idle seconds")
    sb.add_argument("--seq", action="store_true", help="prefix each line with its sequence")
    sb.set_defaults(func=_cmd_sub)

    ls = with_daemon(sub.add_parser("ls", help="list channels"))
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=_cmd_ls)
    with_daemon(sub.add_parser("stat", help="daemon stats as JSON")).set_defaults(func=_cmd_stat)
    rm = with_daemon(sub.add_parser("rm", help="delete a channel"))
    rm.add_argument("channel")
    rm.set_defaults(func=_cmd_rm)
    h = with_daemon(sub.add_parser("health", help="exit 0 if the daemon answers"))
    h.add_argument("--timeout", type=float, default=2.0)
    h.set_defaults(func=_cmd_health)

    b = sub.add_parser("bench", help="benchmarks against ZeroMQ, TCP and others",
                       add_help=False)
    b.add_argument("bench_args", nargs=argparse.REMAINDER)
    b.set_defaults(func=_cmd_bench)

    dm = sub.add_parser("demo", help="embedded daemon + publisher + 2 subscribers, vs ZeroMQ")
    dm.add_argument("--seconds", type=float, default=3.0)
    dm.add_argument("--size", type=int, default=256, help="message size in bytes")
    dm.set_defaults(func=_cmd_demo)

    ct = with_daemon(sub.add_parser("cat", help="copy stdin into a byte stream (--write) or a "
                                                "stream to stdout"))
    ct.add_argument("stream")
    ct.add_argument("--write", action="store_true", help="write stdin into the stream")
    ct.add_argument("--capacity", type=int, help="ring size when the stream is created")
    ct.add_argument("--chunk", type=int, default=1 << 16, help="bytes per copy (default 64 KiB)")
    ct.add_argument("--timeout", type=float, help="give up after this many seconds blocked")
    ct.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                    help="progress bar on stderr (default: when stderr is a terminal)")
    ct.set_defaults(func=_cmd_cat)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:
        # argparse.REMAINDER does not capture a remainder that starts with an option
        # (`shimmy bench --quick`), so the bench's own parser gets everything after "bench".
        from shimmy.bench.runner import main as bench_main
        try:
            return bench_main(argv[1:])
        except KeyboardInterrupt:
            return 130
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except ShimmyError as exc:
        print(f"shimmy: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except TimeoutError as exc:
        print(f"shimmy: {exc}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
