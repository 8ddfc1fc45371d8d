#!/usr/bin/env bash
# Build (or reuse) a Debian bookworm arm64 root filesystem for the aarch64 test bed, and say how to enter it.
#
#   tools/infra/arm64/rootfs.sh ROOTFS_DIR
#
# Owns: debootstrap's two stages, the emulation mode (binfmt_misc + qemu-user-static, else proot -q), and
# the ARM /proc/cpuinfo the guest must see. The rootfs is rebuilt when ROOTFS_DIR/.fedfleet-rootfs-ok is
# absent, so a half-built directory from an interrupted run is never reused. Writes ROOTFS_DIR/.mode
# ("binfmt" or "proot"), read by enter.sh. Exits non-zero with a reason if no emulation is available.
set -euo pipefail
ROOT=${1:?usage: rootfs.sh ROOTFS_DIR}
MIRROR=${FEDFLEET_ARM64_MIRROR:-http://deb.debian.org/debian}
HERE=$(cd "$(dirname "$0")" && pwd)
log() { echo "[arm64 rootfs $(date -u +%H:%M:%S)] $*"; }

command -v qemu-aarch64-static >/dev/null || { log "FAIL: qemu-aarch64-static is not installed (apt-get install qemu-user-static)"; exit 2; }
command -v debootstrap >/dev/null || { log "FAIL: debootstrap is not installed (apt-get install debootstrap)"; exit 2; }

mode=""
# binfmt_misc: mount it if it is not, then enable Debian's qemu-aarch64 entry (flag F: works inside a chroot).
if [ ! -e /proc/sys/fs/binfmt_misc/status ]; then
  mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc 2>/dev/null || true
fi
if [ -e /proc/sys/fs/binfmt_misc/status ]; then
  if command -v update-binfmts >/dev/null; then update-binfmts --enable qemu-aarch64 2>/dev/null || true; fi
  if grep -q '^enabled' /proc/sys/fs/binfmt_misc/qemu-aarch64 2>/dev/null \
     && grep -q '^flags:.*F' /proc/sys/fs/binfmt_misc/qemu-aarch64; then
    mode=binfmt
  fi
fi
if [ -z "$mode" ] && command -v proot >/dev/null; then
  mode=proot
fi
if [ -z "$mode" ]; then
  log "FAIL: neither binfmt_misc (mount + update-binfmts --enable qemu-aarch64) nor proot is available;"
  log "      the aarch64 test bed cannot run here. Install binfmt-support or proot, or run as root."
  exit 2
fi
log "emulation mode: $mode"

if [ -f "$ROOT/.fedfleet-rootfs-ok" ]; then
  log "reusing $ROOT (built $(cat "$ROOT/.fedfleet-rootfs-ok"))"
else
  log "building bookworm arm64 in $ROOT from $MIRROR (first stage)"
  if grep -q " $(realpath -m "$ROOT")/" /proc/mounts; then
    log "FAIL: something is mounted under $ROOT; unmount it before rebuilding"; exit 2
  fi
  rm -rf "$ROOT"; mkdir -p "$ROOT"
  start=$(date +%s)
  mkdir -p "$(dirname "$ROOT")"
  if ! debootstrap --arch=arm64 --foreign --variant=minbase \
      --include=python3,python3-venv,ca-certificates bookworm "$ROOT" "$MIRROR" > "$ROOT.debootstrap.log" 2>&1; then
    tail -20 "$ROOT.debootstrap.log"; log "FAIL: debootstrap's first stage failed (log $ROOT.debootstrap.log)"; exit 1
  fi
  log "first stage done in $(( $(date +%s) - start )) s; second stage under emulation (the slow part)"
  cp /usr/bin/qemu-aarch64-static "$ROOT/usr/bin/"
  echo "$mode" > "$ROOT/.mode"
  if ! "$HERE/enter.sh" "$ROOT" /debootstrap/debootstrap --second-stage >> "$ROOT.debootstrap.log" 2>&1; then
    tail -20 "$ROOT.debootstrap.log"; log "FAIL: debootstrap's second stage failed (log $ROOT.debootstrap.log)"; exit 1
  fi
  log "debootstrap done in $(( $(date +%s) - start )) s"
  date -u +%FT%TZ > "$ROOT/.fedfleet-rootfs-ok"
fi
echo "$mode" > "$ROOT/.mode"
cp "$HERE/cpuinfo-cortex-a72" "$ROOT/.cpuinfo-arm"
# The host's CA bundle, so pip inside trusts what pip on the host trusts.
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
  cp /etc/ssl/certs/ca-certificates.crt "$ROOT/etc/ssl/certs/host-ca-certificates.crt"
fi
log "rootfs ready: $(du -sh "$ROOT" | cut -f1)"
