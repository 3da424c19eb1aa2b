#!/bin/bash
# RDMA tests in the Soft-RoCE lab: builds (or reuses) the guest image, then runs tests/rdma/ in two
# QEMU guests linked over 127.0.0.1 (tools/rdma-lab/).  Exit status = the tests' result.
# Bounded: image build (cached after the first run) and a 480 s job; about 2 min when cached.
set -euo pipefail
cd "$(dirname "$0")/.."
timeout 1500 tools/rdma-lab/build-image.sh
exec timeout 600 tools/rdma-lab/run.sh -t 480 bash tests/rdma/lab_job.sh
