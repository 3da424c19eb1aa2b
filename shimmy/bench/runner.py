"""``shimmy bench``: shimmy against ZeroMQ (ipc, tcp), raw TCP, UDP, a unix socket, pipes, Redis
pub/sub and iceoryx2, in one run on one machine.

Starts a private daemon (and a private redis-server when the binary exists), runs the selected
suites (each in pinned worker processes), prints a table, checks the targets (ratios against
peers measured in the same run) and writes JSON; ``--report DIR`` also writes a Markdown report
with PNG plots.  See docs/benchmarks.md for what each number means.  The runner measures
nothing itself; it must never leave a worker, the daemon or redis-server running behind it
(also on Ctrl-C and SIGTERM).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import importlib
import json
import os
import platform
import shlex
import shutil
import signal
import sys
import time

import click

from . import harness, peers, report

# Suite registry: name -> (suite module, optional package the suite needs, or None).  A suite
# whose package does not import, or whose module raises ImportError (clib: the C binary is not
# built), is skipped with the reason; the suite modules are imported only when selected.
SUITES: dict[str, tuple[str, str | None]] = {
    "pingpong": ("shimmy.bench.pingpong", None),
    "throughput": ("shimmy.bench.throughput", None),
    "fanout": ("shimmy.bench.fanout", None),
    "stream": ("shimmy.bench.streams", None),
    "crossnode": ("shimmy.bench.crossnode", None),
    "scrape": ("shimmy.bench.scrape", "prometheus_client"),   # the metrics extra
    "fanin": ("shimmy.bench.fanin", None),
    "c": ("shimmy.bench.clib", None),
    "record": ("shimmy.bench.record", None),
}
DEFAULT_SIZES = [64, 4096, 1 << 20]


class Context:
    """What every suite gets: the daemon, sizes, timing budget, CPU placement, a logger."""

    def __init__(self, args: Options, daemon: str, cpu_list: list[int]):
        self.daemon = daemon
        self.sizes = args.sizes
        self.reps = args.reps
        self.seconds = args.seconds
        self.quick = args.quick
        self.cpus = cpu_list
        self.cpu_a = cpu_list[0]
        self.cpu_b = cpu_list[1] if len(cpu_list) > 1 else cpu_list[0]
        self.iceoryx2_ok, self.iceoryx2_info = peers.iceoryx2_status()
        self.redis_ok = peers.redis_address() is not None
        self.verbose = not args.quiet

    @staticmethod
    def capacity_for(size: int) -> int | None:
        """Channel capacity for messages of ``size``: the default (4 MiB) up to 64 KiB, else a
        power of two holding at least eight messages (1 MiB -> 8 MiB)."""
        if size <= 1 << 16:
            return None
        need = 8 * (size + 16)
        return 1 << (need - 1).bit_length()

    def link_opts(self, variant: dict, size: int) -> dict:
        """A suite variant's link options, plus the daemon and ring size for shimmy links."""
        opts = dict(variant["opts"])
        if variant["transport"] == "shimmy":
            opts["daemon"] = self.daemon
            opts["capacity"] = self.capacity_for(size)
        return opts

    def log(self, text: str) -> None:
        if self.verbose:
            print(text, file=sys.stderr, flush=True)


@dataclasses.dataclass
class Options:
    """What ``shimmy bench`` was asked for, defaults filled in (``bench`` below)."""
    argv: list[str]
    quick: bool
    only: list[str]
    json_path: str | None
    sizes: list[int]
    seconds: float
    reps: int
    quiet: bool
    report: str | None
    no_redis: bool


class _BenchCommand(click.Command):
    """Keeps the arguments as given: the results name the command that made them."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta["bench_argv"] = list(args)
        return super().parse_args(ctx, args)


@click.command("bench", cls=_BenchCommand, context_settings={"help_option_names": ["-h", "--help"]},
               short_help="benchmarks against ZeroMQ, TCP and others (--help for options)")
@click.option("--quick", is_flag=True, help="1 repetition, short runs (~30 s)")
@click.option("--only", metavar="ONLY", help=f"comma-separated suites: {','.join(SUITES)}")
@click.option("--json", "json_path", metavar="JSON_PATH", help="where to write results "
              "(default bench-results/bench-<timestamp>.json)")
@click.option("--sizes", metavar="SIZES", help="comma-separated message sizes in bytes (k/m "
              "suffix ok); default 64,4k,1m")
@click.option("--seconds", type=float, help="seconds per measurement (default 0.4, quick 0.1)")
@click.option("--reps", type=int, help="repetitions per measurement (default 3, quick 1)")
@click.option("--quiet", is_flag=True, help="no progress lines on stderr")
@click.option("--report", metavar="DIR", help="also write DIR/results.json, DIR/report.md and "
              "PNG plots (needs matplotlib: pip install 'shimmy[bench]')")
@click.option("--no-redis", is_flag=True,
              help="leave Redis out even if redis-server is installed")
def bench(quick: bool, only: str | None, json_path: str | None, sizes: str | None,
          seconds: float | None, reps: int | None, quiet: bool, report: str | None,
          no_redis: bool) -> None:
    """Benchmarks shimmy against ZeroMQ, raw TCP, UDP, a unix socket, pipes, Redis pub/sub and
    iceoryx2."""
    if report:
        try:
            import matplotlib  # noqa: F401
        except ImportError:   # say so now, not after a run of several minutes
            raise click.UsageError("--report draws its plots with matplotlib, which is not "
                                   "installed: pip install 'shimmy[bench]'") from None
    suites = [s.strip() for s in only.split(",")] if only else list(SUITES)
    unknown = [s for s in suites if s not in SUITES]
    if unknown:
        raise click.UsageError(f"unknown suite(s) {unknown}; choose from {list(SUITES)}")
    opts = Options(argv=click.get_current_context().meta["bench_argv"], quick=quick,
                   only=suites, json_path=json_path,
                   sizes=[_size(s) for s in sizes.split(",")] if sizes else list(DEFAULT_SIZES),
                   seconds=(0.1 if quick else 0.4) if seconds is None else seconds,
                   reps=(1 if quick else 3) if reps is None else reps,
                   quiet=quiet, report=report, no_redis=no_redis)
    sys.exit(run(opts))


def _size(text: str) -> int:
    t = text.strip().lower()
    mult = 1
    if t.endswith(("k", "kib")):
        mult, t = 1024, t.rstrip("kib")
    elif t.endswith(("m", "mib")):
        mult, t = 1 << 20, t.rstrip("mib")
    return int(float(t) * mult)


def machine_info(cpu_list: list[int]) -> dict:
    info: dict = {"host": platform.node(), "platform": platform.platform(),
            "kernel": platform.release(), "python": sys.version.split()[0],
            "cpu_count": os.cpu_count(), "usable_cpus": cpu_list}
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        info["loadavg_at_start"] = os.getloadavg()
    except OSError:
        pass
    vers: dict[str, str | None] = {}
    dists = {"zmq": "pyzmq", "shimmy": "shimmy", "iceoryx2": "iceoryx2", "redis-py": "redis",
             "matplotlib": "matplotlib", "prometheus-client": "prometheus-client",
             "posix_ipc": "posix_ipc", "msgpack": "msgpack"}
    from importlib.metadata import version
    for mod, dist in dists.items():
        try:
            vers[mod] = version(dist)
        except Exception:
            vers[mod] = None
    try:
        import zmq
        vers["libzmq"] = zmq.zmq_version()
    except Exception:
        pass
    info["versions"] = vers
    return info


def _feature_missing(feature: str | None) -> str | None:
    if feature is None:
        return None
    try:
        importlib.import_module(feature)
    except Exception as exc:
        return f"{feature} not importable ({type(exc).__name__}: {exc})"
    return None


def _start_redis(args: Options, out: dict, log) -> "harness.RedisServer | None":
    """A private redis-server for the Redis peer, when the binary and redis-py exist."""
    why = None
    binary = shutil.which("redis-server")
    if args.no_redis:
        why = "--no-redis"
    elif binary is None:
        why = "redis-server not on PATH (apt-get install redis-server)"
    else:
        try:
            import redis  # noqa: F401
        except ImportError:
            why = "redis-py not installed (pip install 'shimmy[bench]')"
    if why is None:
        try:
            server = harness.RedisServer(str(binary)).start()
        except harness.BenchError as exc:
            why = str(exc)
        else:
            os.environ["SHIMMY_BENCH_REDIS"] = server.address   # inherited by the workers
            out["meta"]["versions"]["redis-server"] = server.version
            log(f"redis-server {server.version} on {server.address} (stopped at the end)")
            return server
    out["skipped"]["redis"] = why
    log(f"  redis skipped: {why}")
    return None


def run(args: Options) -> int:
    """Run the suites ``args`` names; print the table; write JSON (and the report)."""
    cpu_list = harness.cpus()
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    json_path = args.json_path or (None if args.report else
                                   os.path.join("bench-results", f"bench-{stamp}.json"))
    command = "shimmy bench " + " ".join(shlex.quote(a) for a in args.argv)
    out: dict = {"meta": {"timestamp": stamp, "argv": args.argv, "command": command.strip(),
                    "nice": os.nice(0),
                    "sizes": args.sizes,
                    "reps": args.reps, "seconds_per_measurement": args.seconds,
                    "quick": args.quick, **machine_info(cpu_list)},
           "suites": {}, "skipped": {}, "targets": []}

    # SIGTERM behaves like Ctrl-C: unwind, stop workers and the daemon.
    def _term(signum, frame):
        raise KeyboardInterrupt
    old_term = signal.signal(signal.SIGTERM, _term)
    t0 = time.monotonic()
    os.environ["SHIMMY_BENCH_RUN"] = f"{os.getpid()}-{stamp}"  # inherited by spawned workers
    daemon = redis_server = None
    try:
        daemon = harness.Daemon().start()
        redis_server = _start_redis(args, out, lambda text: print(text, file=sys.stderr)
                                    if not args.quiet else None)
        ctx = Context(args, daemon.socket, cpu_list)
        out["meta"]["iceoryx2"] = ctx.iceoryx2_info if ctx.iceoryx2_ok else None
        out["meta"]["placement"] = report.placement_text(ctx)
        ctx.log(f"shimmy bench: {len(cpu_list)} usable CPU(s) {cpu_list}; "
                f"{out['meta']['placement']}")
        if not ctx.iceoryx2_ok:
            out["skipped"]["iceoryx2"] = ctx.iceoryx2_info
            ctx.log(f"  iceoryx2 skipped: {ctx.iceoryx2_info}")
        for name in args.only:
            modname, feature = SUITES[name]
            why = _feature_missing(feature)
            if why is None:
                try:
                    mod = importlib.import_module(modname)
                except ImportError as exc:   # the suite's own check (clib: shimmy-c not built)
                    why = f"suite module {modname} not importable: {exc}"
            if why is not None:
                out["skipped"][name] = why
                ctx.log(f"suite {name}: skipped ({why})")
                continue
            ctx.log(f"suite {name} ...")
            ts = time.monotonic()
            try:
                res = mod.run(ctx)
            except harness.BenchError as exc:
                res = {"results": [], "failed": {"suite": str(exc)[-2000:]}}
            except Exception as exc:   # one broken suite must not lose the others' numbers
                res = {"results": [], "failed": {"suite": f"{type(exc).__name__}: {exc}"[-2000:]}}
                ctx.log(f"suite {name} failed: {type(exc).__name__}: {exc}")
                harness.cleanup_workers()
            res["seconds"] = round(time.monotonic() - ts, 2)
            out["suites"][name] = res
        out["targets"] = report.evaluate_targets(out)
        for res in out["suites"].values():   # suites that check their own targets
            out["targets"] += res.get("targets", [])
    except KeyboardInterrupt:
        print("shimmy bench: interrupted; stopping workers and the daemon", file=sys.stderr)
        harness.cleanup_all()
        return 130
    finally:
        harness.cleanup_all()
        if daemon is not None:
            daemon.stop()
        if redis_server is not None:
            redis_server.stop()
        os.environ.pop("SHIMMY_BENCH_REDIS", None)
        signal.signal(signal.SIGTERM, old_term)
    out["meta"]["total_seconds"] = round(time.monotonic() - t0, 1)
    try:
        out["meta"]["loadavg_at_end"] = os.getloadavg()
    except OSError:
        pass
    print(report.render(out))
    if json_path:
        d = os.path.dirname(json_path)
        if d:
            os.makedirs(d, exist_ok=True)
        with open(json_path, "w") as fh:
            json.dump(out, fh, indent=1, default=str)
        print(f"\nJSON written to {json_path}")
    if args.report:
        from . import publish
        written = publish.write(out, args.report)
        print(f"report written to {args.report}: {', '.join(sorted(written))}")
    return 0


if __name__ == "__main__":
    bench(prog_name="python -m shimmy.bench.runner")
