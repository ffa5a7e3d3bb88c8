#!/usr/bin/env bash
# Downtime benchmark (issue 18's targets): the test guest on a TAP bridged to the host, in a
# network namespace of its own, moved under a `ping -i 0.001` flood while the host reads its
# TCP stream, RUNS times per row (default 20):
# - backend transfer: vm.send-migration (local=on, backend_transfer) to a second baton
#   that is already running;
# - live upgrade: vmm.live-upgrade to a new process of the same binary.
# Rows: 1 vCPU and 1 GiB with one queue pair; 2 vCPUs and 1 GiB with four; 1 vCPU and
# 8 GiB with one (the total grows with memory only by KVM's cost of registering it).
# Columns (scripts/bench/migration_net.py, BENCH_TABLE=minmax): min/median/max over the runs
# of the downtime and total time baton reports (ms, from downtime_us and total_us), of the
# longest gap between two ping replies and in the guest's stream (the downtime seen from
# outside, ms), and the most pings any run lost. Under each row, the median of every step
# of the pause on both sides (the answer's breakdown, docs/snapshot-and-migration.md).
# Usage: scripts/bench/downtime.sh [RUNS]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
. scripts/lib/common.sh
help_if_asked "$@"

RUNS=${1:-20}
[[ $RUNS =~ ^[0-9]+$ && $RUNS -gt 0 ]] || die "RUNS must be a positive number"
bench_migration_deps

bench_work downtime
bench_netns downtime

# row LABEL CPUS MEMORY_GIB transfer|upgrade PAIRS: one row of the table.
row() {
    bench_row 40 "$1" env BENCH_TABLE=minmax BENCH_PING_INTERVAL=0.001 \
        BENCH_CPUS="$2" BENCH_MEMORY_GIB="$3" ip netns exec "$NS" \
        python3 scripts/bench/migration_net.py "$WORK" "$4" on "$5" "$RUNS"
}

printf '%-40s %20s %20s %20s %20s %5s\n' "min/median/max of $RUNS runs" \
    "downtime ms" "total ms" "ping gap ms" "stream gap ms" "lost"
row "1 vCPU, 1 GiB, 1 pair: backend transfer" 1 1 transfer 1
row "1 vCPU, 1 GiB, 1 pair: live upgrade" 1 1 upgrade 1
row "2 vCPUs, 1 GiB, 4 pairs: backend transfer" 2 1 transfer 4
row "2 vCPUs, 1 GiB, 4 pairs: live upgrade" 2 1 upgrade 4
row "1 vCPU, 8 GiB, 1 pair: backend transfer" 1 8 transfer 1
echo "downtime: the source's pause to the destination's answer that the VM runs, as baton"
echo "reports it; total: from the request to the answer. Ping gap: the longest time between"
echo "two replies to pings sent every millisecond; stream gap: the longest silence in the"
echo "guest's TCP stream read on the host."
