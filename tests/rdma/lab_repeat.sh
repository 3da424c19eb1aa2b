#!/bin/bash
# A lab job that repeats two-node tests to catch a rare failure, run in both guests:
#   tools/rdma-lab/run.sh -t 580 bash tests/rdma/lab_repeat.sh N [PYTEST-ARGS...]
# e.g. N=8 and -k lossy_20000.  Each round has its own folder under the run folder (rep-I/a,
# rep-I/b: fresh barrier markers, the daemons' logs); the first failure ends the job in both
# guests (its ``failed`` marker stops the partner's barrier wait).  Exit status: pytest's.
set -u
cd "$(dirname "$0")/../.."
n=${1:?usage: lab_repeat.sh N [PYTEST-ARGS...]}
shift
run=$(dirname "$LAB_OUT")
for ((i = 1; i <= n; i++)); do
  out=$run/rep-$i/$LAB_ROLE
  mkdir -p "$out"
  echo "lab_repeat: round $i of $n"
  if ! LAB_OUT=$out python3 -m pytest -p no:cacheprovider -o faulthandler_timeout=200 -q -rA -x \
      "$@" tests/rdma/test_two_node.py; then
    touch "$out/failed"
    echo "lab_repeat: round $i failed"
    exit 1
  fi
done
echo "lab_repeat: $n rounds passed"
