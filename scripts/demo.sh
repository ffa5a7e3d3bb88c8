#!/usr/bin/env bash
# The demo: builds baton and its test guest, boots the guest with 2 vCPUs, shows its serial
# console up to the ready marker and a few heartbeats, asks it for its status, and powers
# it off.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/lib/common.sh

help_if_asked "$@"

ensure_build_deps
require_kvm
log "building (release)"
cargo build --release --locked -p vmm >&2
guest_cargo build --release --locked >&2

log "booting the test guest: target/release/baton --kernel target/release/baton-test-guest --cpus boot=2 --memory size=512M --serial tty"
coproc BATON {
    exec target/release/baton --kernel target/release/baton-test-guest \
        --cmdline "heartbeat_ms=500" --cpus boot=2 --memory size=512M --serial tty
}
baton_pid=$BATON_PID
exec {to_guest}>&"${BATON[1]}" {from_guest}<&"${BATON[0]}"

state=boot
while IFS= read -r -t 60 line <&"$from_guest"; do
    line=${line%$'\r'}
    printf '  guest | %s\n' "$line"
    case $state:$line in
        boot:*"baton-test-guest: ready"*)
            state=beating
            ;;
        beating:"heartbeat 3")
            state=status
            printf 'status\n' >&"$to_guest"
            ;;
        status:"status: "*)
            state=poweroff
            printf 'poweroff\n' >&"$to_guest"
            ;;
    esac
done
status=0
wait "$baton_pid" || status=$?
[[ $state == poweroff ]] || die "the guest never became ready (state $state)"
[[ $status -eq 0 ]] || die "baton exited with status $status"
log "the guest powered off; baton exited with status 0"
