"""Byte streams: shimmy.Stream against os.pipe (a FIFO, the same kernel pipe between unrelated
processes), a unix domain socket and TCP on 127.0.0.1.

The writer writes ``chunk``-sized buffers for ``ctx.seconds`` and closes (end of stream); the
reader reads into a ``chunk``-sized buffer until end of stream.  MB/s is measured at the reader
from its first byte to end of stream; the reader checks it got every byte written.

shimmy variants: ``readinto`` (copy out of the ring into the caller's buffer, like the others)
and ``read_view`` (``read_view(chunk)`` + ``consume(len)``: no copy on the reading side), and
``asyncio`` (reader awaits ``readinto_async`` in an event loop, 4 KiB only), whose CPU per chunk
next to the blocking ``readinto`` row is the asyncio overhead per message.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import tempfile
import time
from typing import Any

from . import harness

CHUNKS = [4096, 65536, 1 << 20]


def variants() -> list[dict]:
    return [
        dict(transport="shimmy-stream", variant="readinto", label="shimmy Stream readinto"),
        dict(transport="shimmy-stream", variant="read_view", label="shimmy Stream read_view"),
        dict(transport="shimmy-stream", variant="asyncio", label="shimmy Stream readinto_async",
             only=4096),
        dict(transport="pipe", variant="fifo", label="os.pipe (FIFO)"),
        dict(transport="unix", variant="stream", label="unix socket"),
        dict(transport="tcp", variant="stream", label="TCP 127.0.0.1"),
    ]


def _capacity(chunk: int) -> int:
    return max(1 << 21, 1 << (4 * chunk - 1).bit_length())


# -- worker side --------------------------------------------------------------------------------

def reader(ctl, transport: str, variant: str, name: str, chunk: int, daemon: str, path: str):
    buf = bytearray(chunk)
    listener: Any = None
    address = None
    r: Any = None
    if transport == "shimmy-stream":
        from shimmy.sdk.stream import Stream
        r = Stream(name, daemon=daemon, capacity=_capacity(chunk)).reader(timeout=30)
    elif transport == "unix":
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(1)
        address = path
    elif transport == "tcp":
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        address = listener.getsockname()
    elif transport == "pipe":
        os.mkfifo(path)
        address = path
    ctl.ready(address)
    c0 = harness.cpu_seconds()
    now = time.perf_counter
    total = 0
    t_first = None
    if transport == "shimmy-stream":
        if variant == "read_view":
            v = r.read_view(chunk)
            t_first = now()
            while len(v):
                n = len(v)
                r.consume(n)
                total += n
                v = r.read_view(chunk)
        elif variant == "asyncio":
            async def loop():
                nonlocal total, t_first
                n = await r.readinto_async(buf, timeout=30)
                t_first = now()
                while n:
                    total += n
                    n = await r.readinto_async(buf, timeout=30)
            asyncio.run(loop())
        else:
            n = r.readinto(buf)
            t_first = now()
            while n:
                total += n
                n = r.readinto(buf)
        r.close()
    else:
        if transport == "pipe":
            f = open(path, "rb", buffering=0)
            readinto = f.readinto
        else:
            listener.settimeout(30)
            conn, _ = listener.accept()
            conn.settimeout(30)
            f = conn
            readinto = conn.recv_into
        n = readinto(buf)
        t_first = now()
        while n:
            total += n
            n = readinto(buf)
        f.close()
        if listener is not None:
            listener.close()
    t_end = now()
    return {"bytes": total, "elapsed_s": t_end - (t_first or t_end),
            "cpu_s": harness.cpu_seconds() - c0}


def writer(ctl, transport: str, variant: str, name: str, chunk: int, daemon: str, seconds: float,
           address=None):
    data = os.urandom(chunk)
    w: Any = None
    if transport == "shimmy-stream":
        from shimmy.sdk.stream import Stream
        w = Stream(name, daemon=daemon, capacity=_capacity(chunk)).writer(timeout=30)
    ctl.ready()
    if transport == "shimmy-stream":
        write, close = w.write, w.close
    elif transport == "pipe":
        f = open(address, "wb", buffering=0)
        write, close = f.write, f.close
    else:
        fam = socket.AF_UNIX if transport == "unix" else socket.AF_INET
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.settimeout(30)
        s.connect(address if transport == "unix" else tuple(address))
        write, close = s.sendall, s.close
    now = time.perf_counter
    c0 = harness.cpu_seconds()
    t0 = now()
    end = t0 + seconds
    n = 0
    while now() < end:
        for _ in range(8):
            write(data)
        n += 8
    t1 = now()
    cpu = harness.cpu_seconds() - c0
    close()
    return {"bytes": n * chunk, "chunks": n, "elapsed_s": t1 - t0, "cpu_s": cpu}


# -- parent side ----------------------------------------------------------------------------------

def run(ctx) -> dict:
    vs = variants()
    chunks = [c for c in CHUNKS if not ctx.quick or c != 65536]
    wr, rd = harness.Worker("stream-writer", ctx.cpu_a), harness.Worker("stream-reader", ctx.cpu_b)
    tmp = tempfile.mkdtemp(prefix="shimmy-bench-stream-")
    results: list = []
    failed: dict = {}
    reps: dict = {}
    k = 0
    try:
        for rep in range(ctx.reps):
            for chunk in chunks:
                for v in vs:
                    if v.get("only") not in (None, chunk):
                        continue
                    key = f"{v['transport']} {v['variant']}"
                    if key in failed:
                        continue
                    k += 1
                    name = f"bench/stream/{k}"
                    path = os.path.join(tmp, f"s{k}")
                    try:
                        w, r = harness.run_pair(
                            rd, wr, __name__, "reader", "writer",
                            dict(transport=v["transport"], variant=v["variant"], name=name,
                                 chunk=chunk, daemon=ctx.daemon, path=path),
                            dict(transport=v["transport"], variant=v["variant"], name=name,
                                 chunk=chunk, daemon=ctx.daemon, seconds=ctx.seconds),
                            ctx.seconds)
                        if r["bytes"] != w["bytes"]:
                            raise harness.BenchError(f"wrote {w['bytes']} B, read {r['bytes']} B")
                        reps.setdefault((key, chunk), []).append({"w": w, "r": r})
                    except harness.BenchError as exc:
                        failed[key] = str(exc)[-2000:]
                        ctx.log(f"  stream {v['label']} failed: {str(exc)[-300:]}")
                        harness.close_all([wr, rd])
                        wr = harness.Worker("stream-writer", ctx.cpu_a)
                        rd = harness.Worker("stream-reader", ctx.cpu_b)
            ctx.log(f"  stream rep {rep + 1}/{ctx.reps} done")
        med = harness.median
        for v in vs:
            key = f"{v['transport']} {v['variant']}"
            for chunk in chunks:
                runs = reps.get((key, chunk))
                if not runs:
                    continue
                mbs = med([x["r"]["bytes"] / x["r"]["elapsed_s"] / 1e6 for x in runs])
                results.append({
                    "transport": v["transport"], "variant": v["variant"], "label": v["label"],
                    "size": chunk, "reps": len(runs), "mb_per_s": mbs,
                    "chunks_per_s": mbs * 1e6 / chunk,
                    "cpu_us_per_chunk_writer": med([x["w"]["cpu_s"] / x["w"]["chunks"] * 1e6
                                                    for x in runs]),
                    "cpu_us_per_chunk_reader": med([x["r"]["cpu_s"] / x["w"]["chunks"] * 1e6
                                                    for x in runs]),
                    "runs": runs,
                })
    finally:
        harness.close_all([wr, rd])
        shutil.rmtree(tmp, ignore_errors=True)
    out = {"results": results, "failed": failed,
           "placement": f"writer on CPU {ctx.cpu_a}, reader on CPU {ctx.cpu_b}"}
    out["table"] = _render(out)
    return out


def _render(out: dict) -> str:
    from .report import _n, _table, fmt_size
    rows = []
    for r in out["results"]:
        ref = next((x for x in out["results"] if x["transport"] == "pipe"
                    and x["size"] == r["size"]), None)
        ratio = f"{r['mb_per_s'] / ref['mb_per_s']:.2f}x" if ref and ref["mb_per_s"] else "-"
        rows.append([r["label"], fmt_size(r["size"]), _n(r["mb_per_s"], 0),
                     _n(r["cpu_us_per_chunk_writer"], 2), _n(r["cpu_us_per_chunk_reader"], 2),
                     ratio])
    text = "STREAMS (MB/s at the reader; CPU us per chunk)\n" + _table(
        rows, ["transport", "chunk", "MB/s", "cpu/chunk w", "cpu/chunk r", "vs pipe"])
    for k, why in out["failed"].items():
        text += f"\n  FAILED {k}: {why.splitlines()[-1] if why else ''}"
    return text
