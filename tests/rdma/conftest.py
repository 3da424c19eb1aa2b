"""The lab tests here (``LAB_TESTS``) need an RDMA device and pyverbs: they run in the Soft-RoCE
lab (``.ci/rdma.sh``, ``tools/rdma-lab/run.sh``) and are skipped elsewhere with the reason.
``test_rdma_host.py`` covers everything device-independent and runs everywhere."""

from __future__ import annotations

import pytest

from shimmy.daemon.peer import rdma

LAB_TESTS = ("tests/rdma/test_rdma_transport.py", "tests/rdma/test_two_node.py")
OK, WHY = rdma.available()


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.nodeid.startswith(LAB_TESTS):
            item.add_marker(pytest.mark.rdma)
            if not OK:
                item.add_marker(pytest.mark.skip(reason=f"needs an RDMA device: {WHY} "
                                                        "(run .ci/rdma.sh for the Soft-RoCE lab)"))
