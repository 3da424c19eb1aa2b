"""Copy a file through a shimmy byte stream between two processes and check it arrived intact.

    shimmy daemon --socket /tmp/shimmy.sock &
    SHIMMY_DAEMON=/tmp/shimmy.sock python examples/stream_copy.py SOURCE DEST
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import shutil
import sys

import shimmy


def receive(dest: str) -> None:
    with shimmy.Stream("files/copy").reader(timeout=30) as r, open(dest, "wb") as out:
        shutil.copyfileobj(r, out, 1 << 20)      # readinto straight out of shared memory


def digest(path: str) -> str:
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


def main(source: str, dest: str) -> None:
    child = mp.get_context("spawn").Process(target=receive, args=(dest,))
    child.start()
    with shimmy.Stream("files/copy").writer() as w, open(source, "rb") as f:
        shutil.copyfileobj(f, w, 1 << 20)        # close() at the end = end of stream
    child.join(60)
    same = child.exitcode == 0 and digest(source) == digest(dest)
    print(f"stream_copy: {'identical' if same else 'DIFFERENT'} ({source} -> {dest})")
    raise SystemExit(0 if same else 1)


if __name__ == "__main__":
    main(*sys.argv[1:3])
