#!/usr/bin/env bash
# The demo, baton's main job: a running VM moves to a fresh baton on the same host without
# dropping a packet. Builds baton and its test guest, creates a network namespace with the
# guest on TAP tap0 (10.0.0.1 on the host, 10.0.0.2 in the guest, two queue pairs), starts a
# ping flood at the guest (one every 2 ms), migrates the VM over a UNIX socket to a second
# baton with local=on and backend transfer (the TAP's queue descriptors travel, the host's
# interface stays as it is), and prints the downtime and the pings lost. The guest then runs
# on the destination: on a terminal the demo waits for Enter before it stops it and removes
# the namespace; otherwise it cleans up at once.
#
# Usage: scripts/demo.sh [--linux] [--upgrade]
#   --linux   the same with the small Linux of scripts/linux-kernel.sh (built from Debian's
#             kernel source and cached on first use, a few minutes) instead of the test
#             guest: two vCPUs, 512 MiB, four queues, its address from the kernel command
#             line, a ping every 50 ms (kernel code is interpreted on nested PVM hosts: it
#             boots in a minute or two and takes about 23 ms to answer an echo).
#   --upgrade a live upgrade instead of a migration: baton-remote live-upgrade hands the VM,
#             its TAP queues and the API socket to a new process of the baton binary, while
#             a client pings the API; prints the old and new pids, the downtime, the pings
#             lost and the API requests that failed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/lib/common.sh

help_if_asked "$@"
LINUX=0
UPGRADE=0
for arg in "$@"; do
    case "$arg" in
        --linux) LINUX=1 ;;
        --upgrade) UPGRADE=1 ;;
        *) die "unknown argument '$arg' (see --help)" ;;
    esac
done

ensure_build_deps
ensure_packages iproute2 iputils-ping python3
require_kvm
if ((LINUX)); then
    LINUX_DIR=$(scripts/linux-kernel.sh)
fi
log "building (release)"
cargo build --release --locked -p vmm -p api >&2
guest_cargo build --release --locked >&2

BATON=$PWD/target/release/baton
REMOTE=$PWD/target/release/baton-remote
GUEST=$PWD/target/release/baton-test-guest
NS=baton-demo-$$
WORK=$(mktemp -d "${TMPDIR:-/tmp}/baton-demo.XXXXXX")
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    ip netns del "$NS" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

in_ns() { ip netns exec "$NS" "$@"; }
remote() {
    local socket=$1
    shift
    "$REMOTE" --api-socket "$socket" "$@"
}
# json FILE EXPR: a Python expression over the JSON document `j` in FILE.
json() { python3 -c "import json,sys; j=json.load(open(sys.argv[1])); print($2)" "$1"; }

# start_baton NAME: a baton with only an API socket, inside the namespace.
start_baton() {
    # Not through in_ns: $! must be baton itself (ip netns exec execs it), to stop it.
    ip netns exec "$NS" "$BATON" --api-socket "path=$WORK/$1.sock" </dev/null \
        >"$WORK/$1.log" 2>&1 &
    PIDS+=($!)
    local deadline=$((SECONDS + 20))
    until remote "$WORK/$1.sock" ping >/dev/null 2>&1; do
        ((SECONDS < deadline)) || die "baton $1 did not start: $(tail -5 "$WORK/$1.log")"
        sleep 0.05
    done
}

# The host's view of tap0: index, name, state, MAC, then its address.
show_tap() {
    printf '  host | index %s: %s\n' "$(in_ns cat /sys/class/net/tap0/ifindex)" \
        "$(in_ns ip -br link show tap0)"
    printf '  host | %s\n' "$(in_ns ip -br -4 addr show tap0)"
}

ip netns add "$NS"
in_ns ip link set lo up
log "network namespace $NS"

start_baton source
if ((LINUX)); then
    # The small Linux runs without user space: IP autoconfiguration brings its network up
    # and a root it waits for keeps it there (tests/linux/baton.config).
    cmdline="console=ttyS0 noxsave clearcpuid=151,308 ip=10.0.0.2::10.0.0.1:255.255.255.0::eth0:off"
    cmdline+=" rootdelay=100000 panic=0"
    cat >"$WORK/vm.json" <<EOF
{"cpus": {"boot_vcpus": 2, "max_vcpus": 2, "template": "pvm"},
 "memory": {"size": 536870912, "shared": true},
 "payload": {"kernel": "$LINUX_DIR/vmlinux", "cmdline": "$cmdline"},
 "serial": {"mode": "Off"},
 "net": [{"id": "net0", "tap": "tap0", "ip": "10.0.0.1", "mask": "255.255.255.0",
          "num_queues": 4}]}
EOF
    GUEST_NAME="the small Linux ($(cut -d' ' -f2 "$LINUX_DIR/version"))"
    BOOT_SECONDS=600
    # Its kernel answers one echo in about 23 ms here (interpreted, nested PVM): a faster
    # flood would queue up in the TAP faster than it is answered.
    INTERVAL_MS=50
    PING_COUNT=300
else
    cat >"$WORK/vm.json" <<EOF
{"cpus": {"boot_vcpus": 1, "max_vcpus": 1},
 "memory": {"size": 1073741824, "shared": true},
 "payload": {"kernel": "$GUEST", "cmdline": "heartbeat_ms=1000 net=10.0.0.2/24"},
 "serial": {"mode": "Off"},
 "net": [{"id": "net0", "tap": "tap0", "ip": "10.0.0.1", "mask": "255.255.255.0",
          "num_queues": 4}]}
EOF
    GUEST_NAME="the test guest"
    BOOT_SECONDS=60
    INTERVAL_MS=2
    PING_COUNT=1500
fi
remote "$WORK/source.sock" create "$WORK/vm.json"
remote "$WORK/source.sock" boot
log "source baton (pid ${PIDS[0]}) booted $GUEST_NAME on tap0, which it created"
deadline=$((SECONDS + BOOT_SECONDS))
until in_ns ping -c 1 -W 1 10.0.0.2 >/dev/null 2>&1; do
    ((SECONDS < deadline)) || die "the guest never answered pings"
done
log "the guest answers at 10.0.0.2; the host's side of its TAP:"
show_tap >"$WORK/tap.before"
cat "$WORK/tap.before" >&2

if ((!UPGRADE)); then
    start_baton destination
    remote "$WORK/destination.sock" backend-transfer-support >"$WORK/support.json"
    log "destination baton (pid ${PIDS[1]}) takes over: $(json "$WORK/support.json" "j['kinds']")"
    remote "$WORK/destination.sock" receive-migration \
        "receiver_url=unix:$WORK/migration.sock,backend_transfer=on" >"$WORK/received" &
    receiver=$!
fi

log "ping flood: one echo request every $INTERVAL_MS ms, $PING_COUNT in all"
in_ns ping -n -i "$(printf '0.%03d' "$INTERVAL_MS")" -c "$PING_COUNT" -W 2 10.0.0.2 >"$WORK/ping.out" 2>&1 &
flood=$!
deadline=$((SECONDS + 20))
replies() { grep -c 'bytes from' "$WORK/ping.out" 2>/dev/null || true; }
until (($(replies) + 0 >= 100)); do
    ((SECONDS < deadline)) || die "the flood got no replies: $(tail -3 "$WORK/ping.out")"
    sleep 0.01
done

# check_flood: the flood's summary, once it ended; dies if the guest stopped answering.
check_flood() {
    wait "$flood" || true
    summary=$(grep 'packets transmitted' "$WORK/ping.out") || die "ping printed no summary"
    sent=$(awk '{print $1}' <<<"$summary")
    got=$(awk '{print $4}' <<<"$summary")
}

if ((UPGRADE)); then
    # A client pinging the API over a new connection each time, until the upgrade is done.
    (
        n=0 failed=0
        until [[ -e $WORK/upgraded ]]; do
            n=$((n + 1))
            remote "$WORK/source.sock" ping >/dev/null 2>&1 || failed=$((failed + 1))
        done
        echo "$n $failed" >"$WORK/api.out"
    ) &
    pinger=$!
    log "upgrading: live-upgrade --binary $BATON (a new process of the same binary)"
    remote "$WORK/source.sock" live-upgrade --binary "$BATON" >"$WORK/stats.json" 2>/dev/null ||
        die "the live upgrade failed: $(cat "$WORK/stats.json")"
    new=$(json "$WORK/stats.json" "j['pid']")
    PIDS+=("$new")
    wait "${PIDS[0]}" || die "the old baton did not exit cleanly: $(tail -5 "$WORK/source.log")"
    touch "$WORK/upgraded"
    wait "$pinger"
    read -r api_calls api_failed <"$WORK/api.out"
    check_flood
    log "upgraded: pid ${PIDS[0]} -> $new, downtime $(json "$WORK/stats.json" "j['downtime_ms']") ms," \
        "total $(json "$WORK/stats.json" "j['total_ms']") ms," \
        "handed over $(json "$WORK/stats.json" "j['handed_over']")"
    log "ping flood: $sent sent, $((sent - got)) lost"
    log "API: $api_calls vmm.ping requests from a client during the upgrade, $api_failed failed"
    show_tap >"$WORK/tap.after"
    cat "$WORK/tap.after" >&2
    cmp -s "$WORK/tap.before" "$WORK/tap.after" || die "the TAP changed on the host"
    pid_now=$(remote "$WORK/source.sock" ping | python3 -c "import json,sys; print(json.load(sys.stdin)['pid'])")
    ((pid_now == new)) || die "the API socket is served by pid $pid_now, not $new"
    in_ns ping -c 3 -i 0.2 -W 1 10.0.0.2 >/dev/null || die "the guest does not answer after the upgrade"
    log "the guest runs in the new baton (pid $new), which serves the same API socket"
    if [[ -t 0 ]]; then
        log "try: $REMOTE --api-socket $WORK/source.sock ping"
        read -r -p "Press Enter to stop the guest and remove the namespace. " _
    fi
    ((sent == got)) || die "$((sent - got)) pings were lost"
    ((api_failed == 0)) || die "$api_failed API requests failed"
    exit 0
fi

log "migrating: send-migration destination_url=unix:...,local=on,backend_transfer=on"
remote "$WORK/source.sock" send-migration \
    "destination_url=unix:$WORK/migration.sock,local=on,backend_transfer=on" \
    >"$WORK/stats.json" 2>/dev/null || die "the migration failed: $(cat "$WORK/stats.json")"
wait "$receiver" || die "receive-migration failed: $(cat "$WORK/received")"
wait "${PIDS[0]}" || die "the source did not exit cleanly: $(tail -5 "$WORK/source.log")"
check_flood

log "migrated: downtime $(json "$WORK/stats.json" "j['downtime_ms']") ms," \
    "total $(json "$WORK/stats.json" "j['total_ms']") ms," \
    "TAP handed over for $(json "$WORK/stats.json" "j['transferred_backends']")"
log "ping flood: $sent sent, $((sent - got)) lost"
log "the source exited; the host's side of the TAP, unchanged:"
show_tap >"$WORK/tap.after"
cat "$WORK/tap.after" >&2
cmp -s "$WORK/tap.before" "$WORK/tap.after" || die "the TAP changed on the host"
in_ns ping -c 3 -i 0.2 -W 1 10.0.0.2 >/dev/null || die "the guest does not answer on the destination"
log "the guest runs on the destination (pid ${PIDS[1]}), on $(remote "$WORK/destination.sock" info |
    python3 -c "import json,sys; print(json.load(sys.stdin)['config']['net'][0]['tap'])")"
if [[ -t 0 ]]; then
    log "try: ip netns exec $NS ping 10.0.0.2"
    log "     $REMOTE --api-socket $WORK/destination.sock counters"
    read -r -p "Press Enter to stop the guest and remove the namespace. " _
fi
((sent == got)) || die "$((sent - got)) pings were lost"
