"""Real second (and third) uids for access tests: create them if absent, run code as them.

``ensure_users()`` creates, when missing, the system users ``shimmy-a`` and ``shimmy-b`` (both
in group ``shimmy-share``) and ``shimmy-out`` (in no shared group).  ``run_as(user, code)`` runs
``code`` in a fresh interpreter whose uid, gid and groups are that user's: the interpreter starts
as root only long enough to import shimmy (this machine's Python lives under a directory other
uids may not read), then drops to the user with ``setgroups``/``setgid``/``setuid`` before any
Shimmy call, so every kernel check (opening /dev/shm objects, SO_PEERCRED, connect) sees the
unprivileged uid.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import subprocess
import sys

USERS = ("shimmy-a", "shimmy-b", "shimmy-out")
SHARED_GROUP = "shimmy-share"
IN_GROUP = ("shimmy-a", "shimmy-b")

_BOOT = """
import errno, json, mmap, os, select, socket, stat, sys, time, traceback
import msgpack, posix_ipc
import shimmy, shimmy.ring, shimmy.stream_ring, shimmy.protocol, shimmy.names
import shimmy.sdk.client, shimmy.sdk.channel, shimmy.sdk.stream
import shimmy.cli, shimmy.daemon.server, shimmy.daemon.access, shimmy.daemon.quotas
import shimmy.daemon.peer.service, shimmy.daemon.streams, shimmy.daemon.config
import argparse, fcntl, gettext, grp, hashlib, hmac, ipaddress, locale, logging, pwd, queue
import random, resource, secrets, shutil, signal, ssl, statistics, struct, subprocess, tempfile
import threading, tomllib, zlib
import ctypes, ctypes.util   # the RDMA probe (daemon/peer/rdma/device.py) needs them
import encodings.ascii, encodings.latin_1, encodings.idna, encodings.utf_8, encodings.hex_codec
import contextlib, io
with contextlib.redirect_stdout(io.StringIO()):
    shimmy.cli.main(["daemon", "--help"])   # loads the CLI's lazy imports and translations now
ident = json.loads(sys.argv[1])
os.setgroups(ident["groups"])
os.setgid(ident["gid"])
os.setuid(ident["uid"])
code = sys.argv[2]
sys.argv = ["as-uid", *sys.argv[3:]]
exec(compile(code, "<as-uid>", "exec"), {"__name__": "__main__"})
"""


def ident(user: str) -> dict:
    pw = pwd.getpwnam(user)
    return {"uid": pw.pw_uid, "gid": pw.pw_gid,
            "groups": sorted(set(os.getgrouplist(user, pw.pw_gid)))}


def ensure_users() -> dict[str, dict]:
    """Create the test users and group when absent (needs root); return their identities."""
    try:
        grp.getgrnam(SHARED_GROUP)
    except KeyError:
        subprocess.run(["groupadd", "--system", SHARED_GROUP], check=True)
    for user in USERS:
        try:
            pwd.getpwnam(user)
        except KeyError:
            subprocess.run(["useradd", "--system", "--no-create-home", "--user-group",
                            "--shell", "/usr/sbin/nologin", user], check=True)
    for user in IN_GROUP:
        if user not in grp.getgrnam(SHARED_GROUP).gr_mem:
            subprocess.run(["usermod", "-a", "-G", SHARED_GROUP, user], check=True)
    return {user: ident(user) for user in USERS}


def command_as(user: str, code: str, *args: str) -> list[str]:
    return [sys.executable, "-c", _BOOT, json.dumps(ident(user)), code, *args]


def run_as(user: str, code: str, *args: str, timeout: float = 30) -> dict:
    """Run ``code`` as ``user``; it prints one JSON object as its last line, returned here."""
    proc = subprocess.run(command_as(user, code, *args), capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "HOME": "/tmp"})
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise AssertionError(f"{user} code failed ({proc.returncode}):\n{proc.stdout}\n"
                             f"{proc.stderr}")
    return json.loads(lines[-1])
