"""A C container joins the Python pipeline through the sidecar daemon: the compose example's
Python publisher (app image) sends checksummed messages; a Python subscriber container and a C
subscriber container (deploy/docker/Dockerfile.c: examples/c, linked statically) both receive
every one, in order; then the C publisher feeds the C subscriber and a Python one."""

from __future__ import annotations

import os

import pytest

from ctrkit import _unavailable, docker, summary, wait_until

pytestmark = pytest.mark.container

C_IMAGE = os.environ.get("SHIMMY_TEST_C_IMAGE", "shimmy-ci-c:test")
COUNT = 5000


@pytest.fixture
def c_image(engine) -> str:
    if docker("image", "inspect", C_IMAGE, check=False).returncode != 0:
        _unavailable(f"image {C_IMAGE} not built (run .ci/containers.sh, which runs "
                     f"deploy/scripts/build-c-image.sh)")
    return C_IMAGE


def _c_line(log: str) -> dict[str, str]:
    line = [x for x in log.splitlines() if x.startswith("c-subscriber:")]
    assert line, log[-3000:]
    return dict(kv.split("=", 1) for kv in line[-1].split()[1:] if "=" in kv)


def test_c_container_joins_the_python_pipeline(containers, c_image):
    daemon = containers.daemon()
    ipc = ("--ipc", f"container:{daemon}")
    ch = "c/pipeline"
    env = {"SHIMMY_CHANNEL": ch, "SHIMMY_COUNT": str(COUNT), "SHIMMY_TIMEOUT": "120"}
    csub = containers.run("c-sub", c_image, "/opt/shimmy-c/subscriber", ch, str(COUNT),
                          "/tmp/ready", opts=(*ipc, "--tmpfs", "/tmp"))
    pysub = containers.app("py-sub", daemon, "compose_subscriber.py", env)

    def subscribers():
        c = next((c for c in containers.stat(daemon)["channels"] if c["name"] == ch), None)
        return len(c["subscribers"]) if c else 0

    wait_until(lambda: subscribers() == 2, 30, 0.3, "both subscribers registered")
    pub = containers.app("py-pub", daemon, "compose_publisher.py", env)
    assert containers.wait_exit(pub, 120) == 0, containers.logs(pub)
    assert containers.wait_exit(pysub, 60) == 0, containers.logs(pysub)
    assert containers.wait_exit(csub, 60) == 0, containers.logs(csub)
    p, s, c = (summary(containers.logs(pub)), summary(containers.logs(pysub)),
               _c_line(containers.logs(csub)))
    assert int(p["sent"]) == COUNT and int(s["received"]) == COUNT and s["bad"] == "0"
    assert (c["received"], c["out_of_order"], c["lost"]) == (str(COUNT), "0", "0"), c

    # the other way: the C publisher container, read by a C subscriber container
    ch2 = "c/from-c"
    csub2 = containers.run("c-sub2", c_image, "/opt/shimmy-c/subscriber", ch2, str(COUNT),
                           opts=(*ipc, "--tmpfs", "/tmp"))
    wait_until(lambda: next((c for c in containers.stat(daemon)["channels"]
                             if c["name"] == ch2 and c["subscribers"]), None), 30, 0.3,
               "C subscriber registered")
    cpub = containers.run("c-pub", c_image, "/opt/shimmy-c/publisher", ch2, str(COUNT), "200",
                          opts=ipc)
    assert containers.wait_exit(cpub, 60) == 0, containers.logs(cpub)
    assert containers.wait_exit(csub2, 60) == 0, containers.logs(csub2)
    c2 = _c_line(containers.logs(csub2))
    assert (c2["received"], c2["out_of_order"], c2["bytes"]) == (str(COUNT), "0",
                                                                 str(COUNT * 200)), c2
