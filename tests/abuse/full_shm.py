"""Finding 7 on a real full tmpfs: run as ``unshare --mount --propagation private python
tests/abuse/full_shm.py DIR``.  In its own mount namespace it mounts a 1 MiB tmpfs on /dev/shm
(nobody else's /dev/shm is touched), starts a daemon, creates a channel, fills the tmpfs, and
reports as JSON what a subscribe and a second channel get, and whether the daemon stayed up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

FILLER = "/dev/shm/filler"


def main(directory: str) -> dict:
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", "/dev/shm"], check=True)
    import shimmy   # before the tmpfs is full (the SDK's fence semaphore is made at import)

    sock = os.path.join(directory, "full.sock")
    cfg = os.path.join(directory, "full.toml")
    with open(cfg, "w") as fh:
        fh.write("shm_reserve = 0\ndefault_capacity = 65536\n")
    log = open(os.path.join(directory, "full.log"), "w")
    daemon = subprocess.Popen([sys.executable, "-m", "shimmy.cli", "daemon", "--socket", sock,
                               "--config", cfg], stdout=log, stderr=subprocess.STDOUT)
    out: dict = {}
    try:
        deadline = time.monotonic() + 15
        while "daemon ready" not in open(log.name).read():
            assert daemon.poll() is None and time.monotonic() < deadline, open(log.name).read()
            time.sleep(0.05)
        ch = shimmy.Channel("full/x", daemon=sock)
        fd = os.open(FILLER, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            while os.write(fd, b"\0" * 4096):
                pass
        except OSError:
            pass   # ENOSPC: the tmpfs is full
        finally:
            os.close(fd)
        for what, attempt in (("subscribe", ch.subscribe),
                              ("create", lambda: shimmy.Channel("full/y", daemon=sock))):
            try:
                attempt()
                out[what] = {"ok": True}
            except Exception as exc:
                out[what] = {"error": type(exc).__name__, "message": str(exc)}
        os.unlink(FILLER)
        sub = ch.subscribe()
        ch.publish(b"after")
        out["after"] = bytes(sub.receive(timeout=5)).decode()
        out["daemon_alive"] = daemon.poll() is None
    finally:
        daemon.terminate()
        out["daemon_exit"] = daemon.wait(10)
        out["log_has_traceback"] = "Traceback" in open(log.name).read()
    return out


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))
