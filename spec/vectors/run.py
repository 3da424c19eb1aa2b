"""The conformance runner (spec/vectors/README.md): drives a client through every vector.

    python spec/vectors/run.py --client 'CMD ARGS...' [--only ring,group,stream,control] [-v]
                               [--vectors DIR] [--batch-reads]

Exit status 0 when every case passed, 1 otherwise.  Needs only the standard library and msgpack.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from typing import Any

import msgpack

HERE = os.path.dirname(os.path.abspath(__file__))
KINDS = ("ring", "group", "stream", "control")
TIMEOUT = 60            # seconds a client command may take
RING_SLOT_TABLE = 4096  # spec/ring.md: the slot table starts here, 64 bytes a slot
SLOT_SIZE = 64
SLOT_LOST = 24
STREAM_HEAD = 384       # spec/stream.md: the reader's head word

PATTERNS = {
    "<int>": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "<number>": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "<str>": lambda v: isinstance(v, str),
    "<hex32>": lambda v: isinstance(v, str) and re.fullmatch(r"[0-9a-f]{32}", v) is not None,
    "<path>": lambda v: isinstance(v, str) and v.startswith("/"),
    "<bool>": lambda v: isinstance(v, bool),
    "<list>": lambda v: isinstance(v, list),
    "<map>": lambda v: isinstance(v, dict),
    "<any>": lambda v: True,
}


def shape_errors(value: Any, shape: Any, where: str = "") -> list[str]:
    """What in ``value`` does not fit ``shape`` (spec/vectors/README.md: patterns; extra map
    keys are allowed)."""
    if isinstance(shape, str) and shape in PATTERNS:
        return [] if PATTERNS[shape](value) else [f"{where or '.'}: {value!r} is not {shape}"]
    if isinstance(shape, dict):
        if not isinstance(value, dict):
            return [f"{where or '.'}: {value!r} is not a map"]
        out: list[str] = []
        for k, s in shape.items():
            if k not in value:
                out.append(f"{where}.{k}: missing")
            else:
                out += shape_errors(value[k], s, f"{where}.{k}")
        return out
    if isinstance(shape, list):
        if not isinstance(value, list) or len(value) != len(shape):
            return [f"{where or '.'}: {value!r} is not {shape!r}"]
        return [e for i, (v, s) in enumerate(zip(value, shape, strict=True))
                for e in shape_errors(v, s, f"{where}[{i}]")]
    if value != shape or isinstance(value, bool) != isinstance(shape, bool):
        return [f"{where or '.'}: {value!r} != {shape!r}"]
    return []


class Runner:
    def __init__(self, client: list[str], vectors: str, verbose: bool, batch_reads: bool):
        self.client = client
        self.vectors = vectors
        self.verbose = verbose
        self.batch_reads = batch_reads
        self.scratch = tempfile.mkdtemp(prefix="shimmy-conform-")
        self.passed = 0
        self.failed: list[str] = []

    def close(self) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)

    # -- plumbing ------------------------------------------------------------------------------
    def call(self, *args: str) -> list[dict[str, Any]]:
        cmd = [*self.client, *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT)
        if proc.returncode != 0:
            raise CaseFailed(f"exit status {proc.returncode}: {' '.join(cmd)}\n"
                             f"{proc.stderr.strip()[-2000:]}")
        lines = []
        for line in proc.stdout.splitlines():
            if not line.strip():
                continue
            try:
                lines.append(json.loads(line))
            except json.JSONDecodeError:
                raise CaseFailed(f"not a JSON line: {line[:200]!r}") from None
        return lines

    def copy(self, directory: str, name: str) -> str:
        dst = os.path.join(self.scratch, name)
        shutil.copyfile(os.path.join(directory, name), dst)
        return dst

    def report(self, label: str, error: str | None) -> None:
        if error is None:
            self.passed += 1
            if self.verbose:
                print(f"PASS {label}")
        else:
            self.failed.append(label)
            print(f"FAIL {label}\n     {error}")

    def check(self, label: str, fn, *args) -> None:
        try:
            fn(*args)
        except CaseFailed as exc:
            self.report(label, str(exc))
        except subprocess.TimeoutExpired:
            self.report(label, f"the client ran past {TIMEOUT} s")
        else:
            self.report(label, None)

    # -- comparisons -----------------------------------------------------------------------------
    def lines_match(self, got: list[dict], expect: list[dict]) -> None:
        if self.batch_reads:
            got, expect = merge_losses(got), merge_losses(expect)
        if len(got) != len(expect):
            raise CaseFailed(f"{len(got)} lines, expected {len(expect)}:\n     got    {got}\n"
                             f"     expect {expect}")
        for i, (g, e) in enumerate(zip(got, expect, strict=True)):
            line_match(i, g, e)

    # -- the kinds ---------------------------------------------------------------------------------
    def ring(self, d: str, case: dict) -> None:
        name = case["name"]
        for i, r in enumerate(case.get("read", [])):
            self.check(f"ring/{name} read {i}", self.ring_read, d, case, r)
        for i, pt in enumerate(case.get("point", [])):
            self.check(f"ring/{name} point {i}", self.ring_point, d, case, pt)
        if "write" in case:
            self.check(f"ring/{name} write", self.write, d, case, "ring")

    def ring_read(self, d: str, case: dict, r: dict) -> None:
        img = self.copy(d, case["image"])
        got = self.call("conform-read", "--kind", "ring", "--image", img, "--start", r["start"],
                        "--slot", str(r["slot"]))
        self.lines_match(got, r["expect"])
        if got and got[-1] == {"end": "empty"}:
            check_slot(img, r["slot"], r["start"], r["expect"])

    def ring_point(self, d: str, case: dict, pt: dict) -> None:
        img = self.copy(d, case["image"])
        got = self.call("conform-point", "--image", img, *(["--oldest"] if pt["oldest"] else []))
        self.lines_match(got, [pt["expect"]])

    def write(self, d: str, case: dict, kind: str) -> None:
        w = case["write"]
        img = self.copy(d, case["image"])
        ops = os.path.join(self.scratch, "ops.json")
        with open(ops, "w") as f:
            json.dump(w["ops"], f)
        got = self.call("conform-write", "--kind", kind, "--image", img, "--ops", ops)
        self.lines_match(got, w["expect"])
        with open(img, "rb") as f:
            have = bytearray(f.read())
        with open(os.path.join(d, w["image"]), "rb") as f:
            want = bytearray(f.read())
        for off, n in w["ignore"]:
            have[off:off + n] = want[off:off + n] = bytes(n)
        if have != want:
            diff = [i for i in range(min(len(have), len(want))) if have[i] != want[i]]
            raise CaseFailed(f"image differs from {w['image']} at {len(diff)} bytes, first at "
                             f"offset {diff[0] if diff else min(len(have), len(want))}"
                             f" (sizes {len(have)}, {len(want)})")

    def group(self, d: str, case: dict) -> None:
        for i, r in enumerate(case["read"]):
            self.check(f"group/{case['name']} read {i}", self.group_read, d, case, r)

    def group_read(self, d: str, case: dict, r: dict) -> None:
        args = ["conform-read", "--kind", "group", "--image", self.copy(d, case["image"]),
                "--slot", str(r["slot"])]
        for m in case["members"]:
            args += ["--member", f"{m['id']}={self.copy(d, m['image'])}@{m['start']}"]
        got = self.call(*args)
        # Each publisher's lines in order; the interleaving is the client's.
        def by_publisher(lines: list[dict]) -> dict:
            out: dict[Any, list] = {}
            for line in lines:
                out.setdefault(line.get("publisher"), []).append(line)
            return out
        g, e = by_publisher(got), by_publisher(r["expect"])
        if sorted(g, key=str) != sorted(e, key=str):
            raise CaseFailed(f"publishers {sorted(g, key=str)}, expected {sorted(e, key=str)}")
        if got[:1] != r["expect"][:1] or got[-1:] != r["expect"][-1:]:
            raise CaseFailed(f"first/last lines {got[:1]} {got[-1:]}, expected "
                             f"{r['expect'][:1]} {r['expect'][-1:]}")
        for k in e:
            self.lines_match(g[k], e[k])

    def stream(self, d: str, case: dict) -> None:
        for i, r in enumerate(case.get("read", [])):
            self.check(f"stream/{case['name']} read {i}", self.stream_read, d, case, r)
        if "write" in case:
            self.check(f"stream/{case['name']} write", self.write, d, case, "stream")

    def stream_read(self, d: str, case: dict, r: dict) -> None:
        img = self.copy(d, case["image"])
        got = join_data(self.call("conform-read", "--kind", "stream", "--image", img))
        self.lines_match(got, join_data(r["expect"]))
        if got and "end" in got[-1]:
            with open(img, "rb") as f:
                f.seek(STREAM_HEAD)
                (head,) = struct.unpack("<Q", f.read(8))
            if head != r["head"]:
                raise CaseFailed(f"head word {head} after the read, expected {r['head']}")

    def control(self, d: str, case: dict) -> None:
        if "frames" in case:
            self.check(f"control/{case['name']}", self.control_decode, d, case)
        if "encode" in case:
            self.check(f"control/{case['name']}", self.control_encode, d, case)

    def control_decode(self, d: str, case: dict) -> None:
        got = self.call("conform-frames", "--decode", os.path.join(d, case["frames"]))
        if len(got) != len(case["expect"]):
            raise CaseFailed(f"{len(got)} lines, expected {len(case['expect'])}: {got}")
        for i, (g, e) in enumerate(zip(got, case["expect"], strict=True)):
            if "error" in e:
                line_match(i, g, e)
            else:
                errs = shape_errors(g, e)
                if errs:
                    raise CaseFailed(f"line {i}: " + "; ".join(errs))

    def control_encode(self, d: str, case: dict) -> None:
        got = self.call("conform-frames", "--encode", os.path.join(d, case["encode"]))
        if len(got) != len(case["expect"]):
            raise CaseFailed(f"{len(got)} frames, expected {len(case['expect'])}")
        for i, (g, e) in enumerate(zip(got, case["expect"], strict=True)):
            frame = bytes.fromhex(g["frame"])
            (n,) = struct.unpack_from("<I", frame)
            if n != len(frame) - 4:
                raise CaseFailed(f"frame {i}: length prefix {n}, body {len(frame) - 4} bytes")
            m = msgpack.unpackb(frame[4:], raw=False)
            if m != e:
                raise CaseFailed(f"frame {i} decodes to {m}, expected {e}")

    # -- a live daemon -------------------------------------------------------------------------
    def daemon(self, sock: str, cases: list[dict]) -> None:
        """Replay the control cases against a live daemon.  Those that need no identity (ping,
        hello, a version mismatch, frames that break the framing rule) go each on a connection
        of its own; a refused frame must also close the connection.  Then one client says
        hello, presents its token on the session socket and sends every other request of the
        cases in order (its `client` and `token` replaced by its own), checking each reply's
        shape."""
        for case in cases:
            if "request_frame" in case and case["name"] in IDENTITY_FREE:
                self.check(f"daemon/{case['name']}", exchange, sock, case)
        session_cases = [c for c in cases if "request" in c and c["name"] not in IDENTITY_FREE
                         and c["name"] not in NEEDS_A_GROUP]
        if session_cases:
            self.check("daemon/session", self.session_replay, sock, session_cases)

    def session_replay(self, sock: str, cases: list[dict]) -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s, \
                socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as session:
            s.settimeout(10)
            s.connect(sock)
            hello = call_daemon(s, {"v": 2, "id": 1, "op": "hello", "pid": os.getpid()})
            if not hello.get("ok"):
                raise CaseFailed(f"hello refused: {hello}")
            session.settimeout(10)
            session.connect(hello["session"])
            session.sendall(hello["token"].encode() + b"\n")
            for case in cases:
                req = dict(case["request"])
                if "client" in req:
                    req["client"], req["token"] = hello["client"], hello["token"]
                for _ in range(50):   # the daemon binds the session on its next loop pass
                    reply = call_daemon(s, req)
                    if reply.get("error", {}).get("code") != "permission_denied":
                        break
                    time.sleep(0.02)
                errs = shape_errors(reply, case["reply_shape"])
                if errs:
                    raise CaseFailed(f"{case['name']}: " + "; ".join(errs) + f" (reply {reply})")


IDENTITY_FREE = {"ping", "hello", "version-mismatch", "oversized", "not-a-map-request"}
NEEDS_A_GROUP = {"members"}   # asks about a publisher group the replay does not make


def call_daemon(s: socket.socket, request: dict) -> dict:
    raw = msgpack.packb(request)
    s.sendall(struct.pack("<I", len(raw)) + raw)
    n = struct.unpack("<I", recv_exact(s, 4))[0]
    return msgpack.unpackb(recv_exact(s, n), raw=False)


def exchange(sock: str, case: dict) -> None:
    frame = bytes.fromhex(case["request_frame"])
    if case["name"] == "hello":
        body = msgpack.unpackb(frame[4:])
        body["pid"] = os.getpid()
        raw = msgpack.packb(body)
        frame = struct.pack("<I", len(raw)) + raw
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(sock)
        s.sendall(frame)
        n = struct.unpack("<I", recv_exact(s, 4))[0]
        reply = msgpack.unpackb(recv_exact(s, n), raw=False)
        closed = case.get("closes") and s.recv(1) == b""
    errs = shape_errors(reply, case["reply_shape"])
    for word in case.get("message_contains", []):
        if word not in reply.get("error", {}).get("message", ""):
            errs.append(f"error message does not name {word!r}")
    if case.get("closes") and not closed:
        errs.append("the daemon did not close the connection after refusing the frame")
    if errs:
        raise CaseFailed("; ".join(errs))


def recv_exact(s, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            raise CaseFailed(f"the daemon closed the connection after {len(out)} of {n} bytes")
        out += chunk
    return out


class CaseFailed(Exception):
    pass


def line_match(i: int, g: dict, e: dict) -> None:
    if "error" in e:
        if g.get("error") != e["error"]:
            raise CaseFailed(f"line {i}: {g}, expected error {e['error']!r}")
        for word in e.get("message_contains", []):
            if word not in str(g.get("message", "")):
                raise CaseFailed(f"line {i}: error message {g.get('message')!r} does not name "
                                 f"{word!r}")
        if "published" in e and g.get("published") != e["published"]:
            raise CaseFailed(f"line {i}: published {g.get('published')}, expected "
                             f"{e['published']}")
        return
    if g != e:
        raise CaseFailed(f"line {i}: {g}, expected {e}")


def join_data(lines: list[dict]) -> list[dict]:
    """Stream reads may chunk their bytes as they like: join consecutive data lines."""
    out: list[dict] = []
    for line in lines:
        if "data" in line and out and "data" in out[-1] and "seq" not in line:
            out[-1] = {"data": out[-1]["data"] + line["data"]}
        else:
            out.append(dict(line))
    return out


def merge_losses(lines: list[dict]) -> list[dict]:
    """For batch read paths (--batch-reads): a loss may be reported at the start of the batch
    that holds it, so compare the payloads in order with the lost total: every lost line
    becomes one total at the end, and message lines keep their data only."""
    lost = sum(line.get("lost", 0) for line in lines)
    out = [{"data": line["data"]} if "seq" in line and "data" in line else line for line in lines
           if "lost" not in line]
    return out + ([{"lost_total": lost}] if lost else [])


def check_slot(img: str, slot: int, start: str, expect: list[dict]) -> None:
    """After a read that ended empty, the slot's position is past the last frame read and its
    lost word is the lines' lost total (spec/ring.md, the subscriber's words)."""
    with open(img, "rb") as f:
        data = f.read()
    base = RING_SLOT_TABLE + slot * SLOT_SIZE
    (position,) = struct.unpack_from("<Q", data, base)
    (lost,) = struct.unpack_from("<Q", data, base + SLOT_LOST)
    want_lost = sum(line.get("lost", 0) for line in expect)
    if lost != want_lost:
        raise CaseFailed(f"slot {slot} lost word {lost}, expected {want_lost}")
    (tail,) = struct.unpack_from("<Q", data, 320)
    if position != tail and any("seq" in line for line in expect):
        raise CaseFailed(f"slot {slot} position {position} after reading to the end, expected "
                         f"the tail {tail}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Shimmy's conformance runner "
                                            "(spec/vectors/README.md)")
    p.add_argument("--client", help="the client's command line (shlex-split)")
    p.add_argument("--daemon", help="a daemon's control socket: replay the control requests "
                                    "that need no identity and check the replies' shapes")
    p.add_argument("--only", default=",".join(KINDS), help="kinds to run (default: all)")
    p.add_argument("--vectors", default=HERE, help="the vectors directory (default: this one)")
    p.add_argument("--batch-reads", action="store_true",
                   help="the client's reads are batched: compare payloads in order and the lost "
                        "total instead of where each loss is reported")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    if not args.client and not args.daemon:
        p.error("give --client CMD or --daemon SOCK")
    runner = Runner(shlex.split(args.client or ""), args.vectors, args.verbose, args.batch_reads)
    try:
        for kind in args.only.split(","):
            if kind not in KINDS:
                p.error(f"unknown kind {kind!r}: {', '.join(KINDS)}")
            base = os.path.join(args.vectors, kind)
            for version in sorted(os.listdir(base)):
                d = os.path.join(base, version)
                with open(os.path.join(d, "cases.json")) as f:
                    cases = json.load(f)["cases"]
                if args.daemon:
                    if kind == "control":
                        runner.daemon(args.daemon, cases)
                    continue
                for case in cases:
                    getattr(runner, kind)(d, case)
    finally:
        runner.close()
    total = runner.passed + len(runner.failed)
    print(f"{runner.passed} of {total} checks passed" +
          (f"; failed: {', '.join(runner.failed)}" if runner.failed else ""))
    return 0 if not runner.failed and total else 1


if __name__ == "__main__":
    sys.exit(main())
