#!/usr/bin/env bash
# Checks api/openapi.yaml against a running baton with schemathesis (from PyPI): for every
# operation it sends generated requests, valid and invalid, and fails on a server error
# (5xx), a status or body the document does not allow, or a request the document calls
# invalid that baton accepts. baton, a TCP-to-UNIX-socket relay (socat) and schemathesis all
# run in a network namespace of their own, which is deleted afterwards.
#
# Operations that would end baton (vmm.shutdown, vm.power-button) or wait for a peer
# (vm.receive-migration) or write files wherever a URL points (vm.snapshot) are left out;
# tests/tests/openapi.rs covers them against a real guest.
#
# Usage: scripts/schemathesis.sh [MAX_EXAMPLES]   (default 100 per operation)
# Environment: BATON (default target/debug/baton, built if missing).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/lib/common.sh
help_if_asked "$@"

MAX_EXAMPLES=${1:-100}
[[ $MAX_EXAMPLES =~ ^[0-9]+$ && $MAX_EXAMPLES -gt 0 ]] || die "MAX_EXAMPLES must be a positive number"
SCHEMATHESIS_VERSION=4.32.5

ensure_packages iproute2 socat
# In a virtual environment of its own, cached outside the repository.
VENV=${BATON_CACHE:-$HOME/.cache/baton}/schemathesis-$SCHEMATHESIS_VERSION
if [[ ! -x $VENV/bin/schemathesis ]]; then
    log "installing schemathesis $SCHEMATHESIS_VERSION from PyPI into $VENV"
    rm -rf "$VENV"
    python3 -m venv "$VENV" 2>/dev/null || {
        ensure_packages python3-venv
        python3 -m venv "$VENV"
    }
    "$VENV/bin/pip" install --quiet --disable-pip-version-check \
        "schemathesis==$SCHEMATHESIS_VERSION" >&2
fi
SCHEMATHESIS=$VENV/bin/schemathesis

BATON=${BATON:-target/debug/baton}
if [[ ! -x $BATON ]]; then
    ensure_build_deps
    cargo build --locked -p vmm >&2
fi
BATON=$(realpath "$BATON")

NS="baton-schemathesis-$$"
DIR=$(mktemp -d)
cleanup() {
    ip netns pids "$NS" 2>/dev/null | xargs -r kill 2>/dev/null || true
    ip netns del "$NS" 2>/dev/null || true
    rm -rf "$DIR"
}
trap cleanup EXIT
ip netns add "$NS"
ip netns exec "$NS" ip link set lo up

ip netns exec "$NS" "$BATON" --api-socket "path=$DIR/api.sock" >"$DIR/baton.log" 2>&1 &
BATON_PID=$!
deadline=$((SECONDS + 20))
until [[ -S $DIR/api.sock ]]; do
    kill -0 "$BATON_PID" 2>/dev/null || die "baton exited: $(cat "$DIR/baton.log")"
    ((SECONDS < deadline)) || die "baton never created its API socket"
    sleep 0.05
done
ip netns exec "$NS" socat TCP-LISTEN:8080,bind=127.0.0.1,reuseaddr,fork \
    "UNIX-CONNECT:$DIR/api.sock" 2>"$DIR/socat.log" &

status=0
(
    cd "$DIR"
    ip netns exec "$NS" "$SCHEMATHESIS" --no-color run "$OLDPWD/api/openapi.yaml" \
        --url http://127.0.0.1:8080/api/v1 \
        --wait-for-schema 10 \
        --phases examples,coverage,fuzzing \
        --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,negative_data_rejection \
        --exclude-path /vmm.shutdown \
        --exclude-path /vm.power-button \
        --exclude-path /vm.receive-migration \
        --exclude-path /vm.snapshot \
        --request-timeout 10 \
        --max-examples "$MAX_EXAMPLES" \
        --workers 1 \
        --seed 1
) || status=$?
kill -0 "$BATON_PID" 2>/dev/null || die "baton died under schemathesis: $(tail -20 "$DIR/baton.log")"
[[ $status -eq 0 ]] || die "schemathesis found problems (exit $status)"
log "schemathesis: no problems found"
