#!/usr/bin/env bash
# Run one command inside the arm64 rootfs built by rootfs.sh, under qemu-user emulation.
#
#   tools/infra/arm64/enter.sh ROOTFS_DIR COMMAND [ARG...]
#
# Owns how the guest is entered: in binfmt mode a private mount namespace (unshare -m) with /proc, /dev,
# /sys and the shared directory mounted and chroot; in proot mode `proot -q qemu-aarch64-static` with the
# same binds. Either way the guest's /proc/cpuinfo is an ARM Cortex-A72 one (ROOTFS/.cpuinfo-arm): with
# qemu 7.2 the guest otherwise sees the host's x86 cpuinfo and `import onnxruntime` segfaults. A real Pi
# has an ARM cpuinfo, so this belongs to the emulation, not to the agent. The emulated CPU is a Cortex-A72
# too (QEMU_CPU; FEDFLEET_ARM64_CPU overrides it): qemu's default "max" CPU offers extensions no Pi has
# (i8mm, SVE), and with them LiteRT's XNNPACK int8 kernels under qemu 7.2 compute wrong features (max
# |diff| 12 against x86, accuracy at chance); cortex-a72 (Pi 4) and cortex-a76 (Pi 5) agree bit for bit.
# FEDFLEET_ARM64_SHARE=DIR (optional) is mounted at /share in the guest. The guest shares the host's
# network namespace, so 127.0.0.1 in the guest is the host's loopback. The environment is cleared except
# for a few variables and FEDFLEET_* ones.
set -euo pipefail
ROOT=$(cd "${1:?usage: enter.sh ROOTFS_DIR COMMAND...}" && pwd); shift
mode=${FEDFLEET_ARM64_MODE:-$(cat "$ROOT/.mode")}  # FEDFLEET_ARM64_MODE=proot forces the fallback
SHARE=${FEDFLEET_ARM64_SHARE:-}
envs=(PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8
      PYTHONDONTWRITEBYTECODE=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
      PIP_DEFAULT_TIMEOUT=180 "QEMU_CPU=${FEDFLEET_ARM64_CPU:-cortex-a72}")
[ -f "$ROOT/etc/ssl/certs/host-ca-certificates.crt" ] && envs+=(PIP_CERT=/etc/ssl/certs/host-ca-certificates.crt)
while IFS='=' read -r k v; do envs+=("$k=$v"); done < <(env | grep '^FEDFLEET_' | grep -v '^FEDFLEET_ARM64_' || true)
[ -f /etc/resolv.conf ] && cp -L /etc/resolv.conf "$ROOT/etc/resolv.conf" 2>/dev/null || true

if [ "$mode" = binfmt ]; then
  export ROOT SHARE
  exec unshare --mount --propagation private -- bash -c '
    set -e
    mkdir -p "$ROOT/proc" "$ROOT/dev" "$ROOT/sys"
    mount -t proc proc "$ROOT/proc"
    mount --rbind /dev "$ROOT/dev"
    mount --rbind /sys "$ROOT/sys" 2>/dev/null || true
    if [ -f "$ROOT/.cpuinfo-arm" ]; then mount --bind "$ROOT/.cpuinfo-arm" "$ROOT/proc/cpuinfo"; fi
    if [ -n "$SHARE" ]; then mkdir -p "$ROOT/share"; mount --bind "$SHARE" "$ROOT/share"; fi
    exec chroot "$ROOT" /usr/bin/env -i "$@"
  ' enter "${envs[@]}" "$@"
else
  binds=(-b /dev -b /proc -b /sys)
  [ -f "$ROOT/.cpuinfo-arm" ] && binds+=(-b "$ROOT/.cpuinfo-arm:/proc/cpuinfo")
  [ -n "$SHARE" ] && binds+=(-b "$SHARE:/share")
  exec proot -q "qemu-aarch64-static -cpu ${FEDFLEET_ARM64_CPU:-cortex-a72}" -r "$ROOT" "${binds[@]}" -w / /usr/bin/env -i "${envs[@]}" "$@"
fi
