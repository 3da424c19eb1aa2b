#!/bin/bash
# The RDMA test job, run in both lab guests by .ci/rdma.sh (tools/rdma-lab/run.sh):
# the transport conformance suite on each guest's own rxe0, then the two-node tests together.
# Exit status: pytest's (both steps must pass).
set -u
cd "$(dirname "$0")/../.."
args=(-p no:cacheprovider -o faulthandler_timeout=200 -q -rA)
python3 -m pytest "${args[@]}" tests/rdma/test_rdma_transport.py; rc1=$?
# -x: a guest whose test fails prints why at once; its partner, waiting at a barrier for it,
# would otherwise let the job time out before either printed anything.
python3 -m pytest "${args[@]}" -x tests/rdma/test_two_node.py; rc2=$?
((rc2 == 0)) || touch "$LAB_OUT/failed"   # its partner's barriers stop waiting (test_two_node.py)
echo "lab_job: conformance rc=$rc1 two-node rc=$rc2"
exit $((rc1 || rc2))
