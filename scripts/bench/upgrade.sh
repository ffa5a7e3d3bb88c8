#!/usr/bin/env bash
# Live-upgrade benchmark: the test guest (1 GiB shared memory, 1 vCPU, a card with 1 or 4
# queue pairs on a TAP bridged to the host, in a network namespace of its own) is handed by
# vmm.live-upgrade to a new process of the same baton binary, under a `ping -i 0.002` flood,
# while the host reads the guest's TCP stream and a client pings the API over a new
# connection every millisecond. Beside it, the same guest moved with vm.send-migration
# (local=on, backend transfer) to a second baton that is already running: what the upgrade
# adds is starting the new process.
# Columns (scripts/bench/migration_net.py): baton's downtime_ms and total_ms (median of RUNS
# runs, default 5), pings lost (median and worst run), the longest gap in the guest's
# stream, and for the upgrade the API pings that failed (refused or unanswered) of all sent.
# Usage: scripts/bench/upgrade.sh [RUNS]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
. scripts/lib/common.sh
help_if_asked "$@"

RUNS=${1:-5}
[[ $RUNS =~ ^[0-9]+$ && $RUNS -gt 0 ]] || die "RUNS must be a positive number"
bench_migration_deps

bench_work upgrade
bench_netns upgrade

# row LABEL upgrade|transfer PAIRS: one line of the table.
row() {
    bench_row 44 "$1" ip netns exec "$NS" \
        python3 scripts/bench/migration_net.py "$WORK" "$2" on "$3" "$RUNS"
}

printf '%-44s %11s %8s %10s %8s %13s %15s\n' "1 GiB guest (median of $RUNS)" \
    "downtime ms" "total ms" "lost pings" "worst" "stream gap ms" "API failures"
for pairs in 1 4; do
    row "live upgrade, $pairs pair(s)" upgrade "$pairs"
    row "migration to a running baton, $pairs pair(s)" transfer "$pairs"
done
echo "downtime: pause to the new baton resuming, as baton reports it; total: from the request"
echo "to the answer (for the upgrade, starting the new process included). Stream gap: the"
echo "longest silence in the guest's TCP stream read on the host. Pings: one every 2 ms."
