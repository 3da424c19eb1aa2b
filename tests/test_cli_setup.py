"""tools/venv.sh, which `make demo` / `make test` use to make the project's .venv.

An interpreter without ensurepip (Debian or Ubuntu without python3.X-venv) is simulated by a
wrapper that puts a failing ``ensurepip`` first on the path: named as such in the test names.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tools", "venv.sh")


SYSTEM_PYTHON = "/usr/bin/python3"


def fake_python_without_ensurepip(where: str) -> str:
    hide = os.path.join(where, "hide", "ensurepip")
    os.makedirs(hide)
    with open(os.path.join(hide, "__init__.py"), "w") as fh:
        fh.write("raise ImportError('no ensurepip')\n")
    wrapper = os.path.join(where, "python3")
    with open(wrapper, "w") as fh:
        fh.write(f"#!/bin/sh\nPYTHONPATH={where}/hide exec {SYSTEM_PYTHON} \"$@\"\n")
    for path in (where, os.path.dirname(hide), hide, wrapper):
        os.chmod(path, 0o755)
    return wrapper


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv")
                    or not os.path.exists(SYSTEM_PYTHON),
                    reason="needs root (to run the script as another user) and /usr/bin/python3")
def test_fake_interpreter_without_ensurepip_as_a_user_names_the_package_to_install():
    where = tempfile.mkdtemp(prefix="shimmy-venv-test-")
    try:
        _check_refusal(where)
    finally:
        shutil.rmtree(where)


def _check_refusal(where: str) -> None:
    py = fake_python_without_ensurepip(where)
    venv = os.path.join(where, "venv")
    ver = subprocess.run([SYSTEM_PYTHON, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                         capture_output=True, text=True, check=True).stdout.strip()
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                        "bash", SCRIPT, py, str(venv)], capture_output=True, text=True,
                       timeout=60, cwd=where)
    assert r.returncode == 1, r.stderr
    assert f"sudo apt-get install -y python{ver}-venv" in r.stderr, r.stderr
    assert not os.path.exists(venv), "nothing is made when the interpreter cannot make a venv"


def test_too_old_or_missing_interpreter_is_refused_with_the_reason(tmp_path):
    r = subprocess.run(["bash", SCRIPT, "no-such-python3", str(tmp_path / "v")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "no 'no-such-python3' on PATH" in r.stderr
    old = tmp_path / "python3"
    old.write_text("#!/bin/sh\nif [ \"$1\" = -V ]; then echo 'Python 3.8.0'; exit 0; fi\nexit 1\n")
    old.chmod(0o755)
    r = subprocess.run(["bash", SCRIPT, str(old), str(tmp_path / "v")], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 1 and "Python 3.8.0 is too old" in r.stderr, r.stderr


def test_an_existing_working_venv_is_kept(tmp_path):
    """The project's own environment passes the check and is left untouched (no rebuild)."""
    venv = os.path.dirname(os.path.dirname(sys.executable))
    stamp = os.stat(os.path.join(venv, "bin"))
    r = subprocess.run(["bash", SCRIPT, sys.executable, venv], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert os.stat(os.path.join(venv, "bin")).st_mtime == stamp.st_mtime
