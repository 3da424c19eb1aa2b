"""RDMA tests run only where an RDMA device and pyverbs exist: in the Soft-RoCE lab
(``tools/rdma-lab/run.sh``, ``.ci/rdma.sh``).  Elsewhere they are skipped with the reason."""

from __future__ import annotations

import pytest

from shimmy.daemon.peer import rdma

OK, WHY = rdma.available()


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.nodeid.startswith("tests/rdma/"):
            item.add_marker(pytest.mark.rdma)
            if not OK:
                item.add_marker(pytest.mark.skip(reason=f"needs an RDMA device: {WHY} "
                                                        "(run .ci/rdma.sh for the Soft-RoCE lab)"))
