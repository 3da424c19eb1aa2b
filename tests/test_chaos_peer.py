"""A bounded subset of the crash matrix's peer rows (tests/chaos/peer.py): SIGKILL of the
publishing node's daemon (peer-source) and of the subscribing node's daemon (peer-replica),
reliable and lossy, three kills each on a pair of namespaced daemons peered over 127.0.0.1."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from test_peer_mirror import HAVE_NS

pytestmark = pytest.mark.skipif(not HAVE_NS, reason="needs root, unshare and nsenter "
                                                     "(a private IPC namespace and /dev/shm)")

LOSS = ("lost", "lost_inexact")
OTHERS = ("torn", "duplicated", "wedged", "stale_objects", "daemon_deaths", "errors")


@pytest.mark.parametrize("kind", ["peer-replica", "peer-source"])
def test_crash_matrix_peer_bounded(tmp_path, kind):
    out = tmp_path / "crash.json"
    proc = subprocess.run(
        [sys.executable, "-m", "tests.chaos.crash", "--kinds", kind, "--trials", "3",
         "--max-seconds", "80", "--json", str(out)], capture_output=True, text=True, timeout=150)
    report = json.loads(out.read_text())
    assert [(r["kind"], r["mode"]) for r in report["rows"]] == [(kind, "reliable"),
                                                                (kind, "lossy")], proc.stdout
    for row in report["rows"]:
        assert row["trials"] == 3 and row["received"] > 0, row
        for key in OTHERS:
            assert row[key] == 0, row
    loss = [(r["mode"], {k: r[k] for k in LOSS}) for r in report["rows"] if any(r[k] for k in LOSS)]
    assert not loss, report
    assert proc.returncode == 0, proc.stdout + proc.stderr
