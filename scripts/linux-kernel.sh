#!/usr/bin/env bash
# Build the small Linux that baton's tests boot, from Debian's kernel source, and cache it.
# Usage: dir=$(scripts/linux-kernel.sh)   (see --help)
set -euo pipefail

SRC_PKG=linux-source-6.1
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
FRAGMENT="$SCRIPT_DIR/../tests/linux/baton.config"

usage() {
    cat <<EOF
Usage: $(basename "$0") [--help]

Builds a small x86_64 Linux for baton's tests: Debian's $SRC_PKG package (fetched
with 'apt-get download'), 'make tinyconfig', then the options in tests/linux/baton.config,
'make olddefconfig vmlinux bzImage' at low priority on every core. Every option of the
fragment must survive olddefconfig; one that does not fails the build, named.

The result is cached in
  \$BATON_CACHE/linux/<source version>-<fragment hash>/
    vmlinux   the ELF kernel (boots through its PVH entry)
    bzImage   the compressed kernel (boots through the 64-bit boot protocol)
    config    the kernel's .config
    version   "<package> <version> <fragment hash>"
  \$BATON_CACHE/linux/current -> that directory
and its path printed as the last line of stdout; progress goes to stderr:
  dir=\$(scripts/linux-kernel.sh)
A second run with the same source version and fragment returns at once, without network.
If apt cannot resolve the package (offline, no lists) and exactly one cached build of this
fragment exists, that one is used.

The build needs gcc, make, bc, bison, flex, libelf-dev and xz; missing ones are installed
with apt-get (needs root). A failing step prints its name and the tail of its log, which is
kept in \$BATON_CACHE/linux/build.log.

Environment:
  BATON_CACHE   cache root (default: \$HOME/.cache/baton)
EOF
}

case "${1:-}" in
    -h | --help) usage; exit 0 ;;
    "") ;;
    *) usage >&2; exit 2 ;;
esac

log() { printf 'linux-kernel: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

[[ -f $FRAGMENT ]] || die "config fragment $FRAGMENT is missing"
CACHE_ROOT=${BATON_CACHE:-${HOME:?HOME is not set}/.cache/baton}
LDIR="$CACHE_ROOT/linux"
LOG="$LDIR/build.log"
APT_OPTS=(-o DPkg::Lock::Timeout=600)
FRAG_HASH=$(sha256sum "$FRAGMENT" | cut -c1-12)

mkdir -p "$LDIR"
# Serialize concurrent runs (parallel test runners) on the cache.
exec 9>"$LDIR/.lock"
flock 9
# Holding the lock, any temp dir left is from an interrupted run.
rm -rf "$LDIR"/.tmp.* "$LDIR"/.current.*

complete() {
    local f
    for f in vmlinux bzImage config version; do
        [[ -s "$1/$f" ]] || return 1
    done
}

finish() {
    ln -sfn "$(basename "$1")" "$LDIR/.current.$$"
    mv -Tf "$LDIR/.current.$$" "$LDIR/current"
    log "kernel: $(cat "$1/version") in $1"
    printf '%s\n' "$1"
    exit 0
}

candidate() {
    apt-cache policy "$1" 2>/dev/null | awk '$1 == "Candidate:" && $2 != "(none)" { print $2; exit }'
}

VER=$(candidate "$SRC_PKG")
if [[ -z $VER ]]; then
    log "apt knows no $SRC_PKG; running apt-get update"
    apt-get "${APT_OPTS[@]}" update -qq >&2 || log "apt-get update failed"
    VER=$(candidate "$SRC_PKG")
fi
if [[ -z $VER ]]; then
    mapfile -t cached < <(for d in "$LDIR"/*-"$FRAG_HASH"/; do
        [[ -d $d ]] && complete "${d%/}" && printf '%s\n' "${d%/}"
    done)
    if [[ ${#cached[@]} == 1 ]]; then
        log "apt can't resolve $SRC_PKG; using the only cached build of this fragment"
        finish "${cached[0]}"
    fi
    die "apt can't resolve $SRC_PKG and ${#cached[@]} cached builds of this fragment exist in $LDIR"
fi

DEST="$LDIR/${VER//:/%3a}-$FRAG_HASH"
if complete "$DEST"; then
    finish "$DEST"
fi

# step NAME CMD...: runs CMD with its output in the build log; on failure names the step and
# shows the log's tail.
step() {
    local name=$1
    shift
    log "$name"
    printf '\n=== %s: %s\n' "$name" "$*" >>"$LOG"
    if ! "$@" >>"$LOG" 2>&1; then
        log "step '$name' failed; the last lines of $LOG:"
        tail -n 40 "$LOG" >&2
        exit 1
    fi
}

need=()
for p in gcc make bc bison flex libelf-dev libc6-dev xz-utils; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || need+=("$p")
done
if ((${#need[@]})); then
    ((EUID == 0)) || die "missing ${need[*]}; install them (needs root)"
    log "installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get "${APT_OPTS[@]}" install -y -qq --no-install-recommends "${need[@]}" >&2; then
        apt-get "${APT_OPTS[@]}" update -qq >&2 || true
        apt-get "${APT_OPTS[@]}" install -y -qq --no-install-recommends "${need[@]}" >&2
    fi
fi

TMP=$(mktemp -d "$LDIR/.tmp.XXXXXX")
# shellcheck disable=SC2317  # invoked by the trap
cleanup() { rm -rf "$TMP"; }
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
: >"$LOG"

dl_opts=()
# As root, apt drops to the _apt user for downloads, which can't write to our 0700 temp dir.
((EUID != 0)) || dl_opts=(-o APT::Sandbox::User=root)
download() { (cd "$TMP" && apt-get "${dl_opts[@]}" download -q "$SRC_PKG=$VER"); }
if ! (download >>"$LOG" 2>&1); then
    # Stale lists: old versions leave the security pool.
    log "download failed; running apt-get update"
    apt-get "${APT_OPTS[@]}" update -qq >&2 || true
    VER=$(candidate "$SRC_PKG")
    [[ -n $VER ]] || die "apt can't resolve $SRC_PKG after apt-get update"
    DEST="$LDIR/${VER//:/%3a}-$FRAG_HASH"
    complete "$DEST" && finish "$DEST"
    step "download $SRC_PKG $VER" download
fi
log "downloaded $SRC_PKG $VER"
debs=("$TMP"/*.deb)
[[ -f ${debs[0]} ]] || die "apt-get download left no .deb"

mkdir "$TMP/pkg" "$TMP/out"
step "unpack the package" dpkg-deb -x "${debs[0]}" "$TMP/pkg"
tarball=("$TMP"/pkg/usr/src/linux-source-*.tar.xz)
[[ -f ${tarball[0]} ]] || die "no /usr/src/linux-source-*.tar.xz in $(basename "${debs[0]}")"
step "unpack the source" tar -xf "${tarball[0]}" -C "$TMP"
rm -rf "$TMP/pkg" "${debs[@]}"
src=("$TMP"/linux-source-*/)
src=${src[0]%/}
[[ -f $src/Makefile ]] || die "no kernel tree in the source tarball"

MAKE=(nice -n 19 make -C "$src" -j"$(nproc)" ARCH=x86_64)
step "make tinyconfig" "${MAKE[@]}" tinyconfig
step "merge tests/linux/baton.config" "$src/scripts/kconfig/merge_config.sh" -m -O "$src" \
    "$src/.config" "$FRAGMENT"
step "make olddefconfig" "${MAKE[@]}" olddefconfig

# Every line of the fragment must be in the final config: a dependency that olddefconfig
# silently dropped would otherwise show up only as a guest that cannot find its devices.
missing=()
while IFS= read -r line; do
    case "$line" in
        CONFIG_*=*) grep -qxF "$line" "$src/.config" || missing+=("$line") ;;
        "# CONFIG_"*" is not set")
            opt=${line#\# }
            opt=${opt%% *}
            ! grep -q "^$opt=" "$src/.config" || missing+=("$line")
            ;;
    esac
done <"$FRAGMENT"
((${#missing[@]} == 0)) || die "olddefconfig did not keep: ${missing[*]} (a dependency is off)"

step "make vmlinux bzImage" "${MAKE[@]}" vmlinux bzImage
cp "$src/vmlinux" "$TMP/out/vmlinux"
cp "$src/arch/x86/boot/bzImage" "$TMP/out/bzImage"
cp "$src/.config" "$TMP/out/config"
printf '%s %s %s\n' "$SRC_PKG" "$VER" "$FRAG_HASH" >"$TMP/out/version"
chmod 755 "$TMP/out"
complete "$TMP/out" || die "incomplete result in $TMP/out"
[[ ! -e $DEST ]] || rm -rf "$DEST"
mv -T "$TMP/out" "$DEST"
finish "$DEST"
