#!/usr/bin/env bash
# Migration benchmark: the test guest (1 vCPU, --memory shared=on) moves between two batons
# on this machine, driven through their APIs (vm.receive-migration, vm.send-migration).
# Rows: local=on over a UNIX socket (memory handed over as descriptors, nothing copied),
# pre-copy (local=off) over UNIX and over TCP on 127.0.0.1, each of an idle guest with 1 and
# 4 GiB, and pre-copy over UNIX of a 1 GiB guest rewriting memory (`dirty 256 200` typed on
# its console: 256 MiB at 200 MiB/s, migrated once the buffer has been written once).
# Figures are vm.send-migration's answer, the median of RUNS runs each (default 5); GB/s is
# memory_bytes / memory_ms, the throughput while memory was being sent.
# The network table (scripts/bench/migration_net.py, in a network namespace of its own):
# a 1 GiB guest with 1 or 4 queue pairs on a TAP bridged to the host moves over UNIX, local
# on and off, with backend transfer or onto a new TAP that management passes, under a
# `ping -i 0.002` flood and while the host reads the guest's TCP stream. Columns: baton's
# downtime_ms and total_ms, pings lost (median and worst run), and the longest gap in the
# stream: the downtime seen from outside.
# Usage: scripts/bench/migration.sh [RUNS] [all|memory|network]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
. scripts/lib/common.sh
help_if_asked "$@"

RUNS=${1:-5}
TABLES=${2:-all}
[[ $RUNS =~ ^[0-9]+$ && $RUNS -gt 0 ]] || die "RUNS must be a positive number"
[[ $TABLES =~ ^(all|memory|network)$ ]] || die "the table is all, memory or network"
bench_migration_deps

bench_work migration

# row LABEL MEM_MIB unix|tcp LOCAL(on|off) [DIRTY_COMMAND]: one line of the table.
row() {
    bench_row 36 "$1" python3 scripts/bench/migration.py "$WORK" "$2" "$3" "$4" "$RUNS" "${5:-}"
}

memory_table() {
    printf '%-36s %9s %11s %14s %10s %7s\n' "migration (median of $RUNS)" \
        "total ms" "downtime ms" "memory bytes" "iterations" "GB/s"
    for gib in 1 4; do
        row "local=on unix, $gib GiB idle" $((gib << 10)) unix on
    done
    for gib in 1 4; do
        for transport in unix tcp; do
            row "pre-copy $transport, $gib GiB idle" $((gib << 10)) "$transport" off
        done
    done
    row "pre-copy unix, 1 GiB dirty 256 200" 1024 unix off "dirty 256 200"
    row "pre-copy tcp, 1 GiB dirty 256 200" 1024 tcp off "dirty 256 200"
    echo "GB/s = memory_bytes / memory_ms: the throughput while memory was being sent. An idle"
    echo "guest has few non-zero pages; the dirty rows carry 256 MiB and more."
}

# net_row LABEL transfer|new-tap LOCAL(on|off) PAIRS: one line of the network table.
net_row() {
    bench_row 40 "$1" ip netns exec "$NS" \
        python3 scripts/bench/migration_net.py "$WORK" "$2" "$3" "$4" "$RUNS"
}

network_table() {
    bench_netns migration
    printf '%-40s %11s %8s %10s %8s %13s\n' "local migration, 1 GiB (median of $RUNS)" \
        "downtime ms" "total ms" "lost pings" "worst" "stream gap ms"
    for pairs in 1 4; do
        for local in on off; do
            net_row "backend transfer, local=$local, $pairs pair(s)" transfer "$local" "$pairs"
            net_row "new TAP, local=$local, $pairs pair(s)" new-tap "$local" "$pairs"
        done
    done
    echo "downtime: pause to the destination resuming, as baton reports it. Stream gap: the"
    echo "longest silence in the guest's TCP stream read on the host (includes any TCP"
    echo "retransmission a lost segment costs). Pings: one every 2 ms for 5 s."
    ip netns del "$NS"
    NS=""
}

case $TABLES in
    memory) memory_table ;;
    network) network_table ;;
    all) memory_table; echo; network_table ;;
esac
