"""The wheel must carry every Python package in the tree (a missed one breaks containers)."""

from __future__ import annotations

import os
import sys

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_package_folder_is_listed_in_pyproject():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as fh:
        tool = tomllib.load(fh)["tool"]["setuptools"]
    listed = set(tool["packages"])
    dirs = tool["package-dir"]
    expected = set()
    for package, folder in dirs.items():
        for here, subdirs, files in os.walk(os.path.join(ROOT, folder)):
            subdirs[:] = [d for d in subdirs if not d.startswith((".", "__"))]
            if "__init__.py" not in files:
                continue
            rel = os.path.relpath(here, os.path.join(ROOT, folder))
            name = package if rel == "." else package + "." + rel.replace(os.sep, ".")
            # a folder mapped to its own package name is listed under that name
            if any(name != p and here == os.path.join(ROOT, f) for p, f in dirs.items()):
                continue
            expected.add(name)
    assert expected <= listed, f"missing from [tool.setuptools] packages: {expected - listed}"


def test_import_shimmy_does_not_load_the_daemon():
    import subprocess
    code = ("import sys, shimmy; bad = [m for m in sys.modules if m.startswith('shimmy.daemon') "
            "or m in ('docker',)]; print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
