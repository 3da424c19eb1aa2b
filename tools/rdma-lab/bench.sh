#!/bin/bash
# Lab benchmark: perftest (ib_write_bw 64 KiB / 1 MiB, ib_write_lat 64 B) and shimmy's RDMA
# mirror over the same rxe link in one two-guest job (tests/rdma/bench_lab.py), then the ratios.
# Emulated CPUs (QEMU TCG): only the ratios mean anything.  Bounded: 540 s job.
set -euo pipefail
cd "$(dirname "$0")/../.."
tools/rdma-lab/build-image.sh
tools/rdma-lab/run.sh -t 540 python3 tests/rdma/bench_lab.py || true
run=$(cat "${LAB_DIR:-/var/tmp/shimmy-rdma-lab}/runs/latest")
python3 - "$run" <<'PY'
import json, statistics, sys
run = sys.argv[1]
a = json.load(open(f"{run}/a/bench.json"))
b = json.load(open(f"{run}/b/bench.json"))
print(f"lab run {run} (QEMU TCG, Soft-RoCE rxe0, one job)")
for size, label in ((65536, "64 KiB"), (1 << 20, "1 MiB")):
    ref = b[f"ib_write_bw_{size}_MBps"]
    runs = b[f"shimmy_{size}_MBps_runs"]
    med = statistics.median(runs)
    print(f"  {label:6} throughput: shimmy RDMA {med:6.1f} MB/s (runs "
          f"{', '.join(f'{r:.1f}' for r in runs)}); ib_write_bw {ref:.1f} MB/s; "
          f"ratio {med / ref:.2f}x")
print(f"  64 KiB throughput, shimmy over TCP on the same link: "
      f"{b['shimmy_65536_MBps_runs_tcp'][0]:.1f} MB/s")
lat = b["ib_write_lat_64_rtt_us"]
print(f"  ib_write_lat 64 B round trip (2 x t_typical): {lat:.0f} us")
for tag, what in (("t512", "RDMA, threshold 512 (mailbox CPU path)"),
                  ("t0", "RDMA, threshold 0 (RDMA WRITE)"), ("tcp", "TCP")):
    us = a[f"shimmy_rtt_64_{tag}_us"]
    print(f"  64 B round trip, shimmy {what}: {us:7.0f} us; ratio to ib_write_lat: {us / lat:.1f}x")
PY
