#!/usr/bin/env bash
# Run one command next to a real kernel RDMA provider on a machine that has none: a QEMU guest (software CPU
# emulation, TCG) boots Debian's kernel, loads soft-RoCE (rdma_rxe) on a dummy network device as `rxe0`, sees this
# machine's / read-only (9p) and runs COMMAND there as root with /run as writable scratch. Prints the guest's
# console; exits with COMMAND's exit code.
#
#   bash scripts/softroce_guest.sh 'COMMAND'
#
# Needs (Debian): qemu-system-x86 busybox-static iproute2 ibverbs-providers (.ci/run installs them). The kernel
# package is downloaded once with `apt-get download` and unpacked (not installed) into the cache folder.
# Exit 77: something needed is missing (said on stderr); tests/test_softroce.py skips on it unless
# EPKERN_SOFTROCE_REQUIRED=1. The guest has no network card (-nic none): RoCE packets never leave its kernel.
# Environment: EPKERN_SOFTROCE_CACHE (default ~/.cache/epkern/softroce), EPKERN_SOFTROCE_TIMEOUT (seconds, 600).
# Adapted from the recipe in ../shared/softroce/ (same approach, written for this repository).
set -euo pipefail
CMD=${1:?usage: softroce_guest.sh COMMAND}
CACHE=${EPKERN_SOFTROCE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/epkern/softroce}
LIMIT=${EPKERN_SOFTROCE_TIMEOUT:-600}
# Modules the guest loads, in order (modprobe pulls their dependencies): the 9p root, then soft-RoCE.
MODULES="virtio_pci 9pnet_virtio 9p crc32_generic dummy ib_uverbs rdma_ucm rdma_rxe"
missing() { echo "softroce_guest: $*" >&2; exit 77; }

for tool in qemu-system-x86_64 rdma timeout; do
  command -v "$tool" >/dev/null || missing "$tool not found (apt-get install qemu-system-x86 iproute2 coreutils)"
done
BUSYBOX=""  # a static one: the initramfs has no libraries
for b in /bin/busybox /usr/bin/busybox "$(command -v busybox || true)"; do
  if [ -x "$b" ] && ! ldd "$b" >/dev/null 2>&1; then BUSYBOX=$b && break; fi
done
[ -n "$BUSYBOX" ] || missing "no statically linked busybox (apt-get install busybox-static)"
ls /usr/lib/*/libibverbs/librxe-rdmav*.so >/dev/null 2>&1 ||
  missing "the soft-RoCE provider librxe is missing (apt-get install ibverbs-providers)"

# --- the kernel, once: unpacked into the cache under a lock (two runs may start together) ---
mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock -w 300 9 || missing "could not lock $CACHE within 300 s"
if [ ! -d "$CACHE/kernel/lib/modules" ]; then
  kernel_pkg() { apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}'; }
  PKG=$(kernel_pkg)
  if [ -z "$PKG" ] && [ "$(id -u)" = 0 ]; then # no package lists yet (a fresh machine)
    apt-get update -qq >/dev/null 2>&1 || true
    PKG=$(kernel_pkg)
  fi
  [ -n "$PKG" ] || missing "apt-cache knows no linux-image-amd64 (run apt-get update)"
  DL=$(mktemp -d)
  (cd "$DL" && apt-get download -q "$PKG" >/dev/null 2>&1) || { rm -rf "$DL"; missing "apt-get download $PKG failed"; }
  rm -rf "$CACHE/kernel.new" && dpkg-deb -x "$DL"/"$PKG"_*.deb "$CACHE/kernel.new" && rm -rf "$DL"
  mv "$CACHE/kernel.new" "$CACHE/kernel"
fi
KVER=$(ls "$CACHE/kernel/lib/modules" | head -1)
MODDIR="$CACHE/kernel/lib/modules/$KVER"
[ -f "$MODDIR/modules.dep" ] || "$BUSYBOX" depmod -b "$CACHE/kernel" "$KVER"
flock -u 9

# --- the initramfs: busybox, the modules with their dependencies, the command, /init ---
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
ROOT="$WORK/root"
mkdir -p "$ROOT"/{bin,sbin,proc,sys,dev,mnt,lib/modules/"$KVER"}
cp "$BUSYBOX" "$ROOT/bin/busybox"
ln -s busybox "$ROOT/bin/sh"
ln -s ../bin/busybox "$ROOT/sbin/modprobe"
for m in $MODULES; do
  grep -E "(^|/)$m\.ko(\.[a-z]+)?:" "$MODDIR/modules.dep" | tr -d : | tr ' ' '\n'
done | sort -u | while read -r f; do
  [ -n "$f" ] || continue
  mkdir -p "$ROOT/lib/modules/$KVER/$(dirname "$f")"
  cp "$MODDIR/$f" "$ROOT/lib/modules/$KVER/$f"
done
cp "$MODDIR/modules.dep" "$MODDIR/modules.alias" "$ROOT/lib/modules/$KVER/"
printf '%s\n' "$CMD" >"$ROOT/command"
cat >"$ROOT/init" <<EOF
#!/bin/sh
B=/bin/busybox
up() { \$B cut -d' ' -f1 /proc/uptime; }
\$B mount -t proc proc /proc && \$B mount -t sysfs sys /sys && \$B mount -t devtmpfs dev /dev
for m in $MODULES; do \$B modprobe \$m || echo "EPKERN_GUEST: modprobe \$m failed"; done
# this machine's / (read-only), with the guest's own /proc, /sys, /dev and a writable /run
\$B mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose hostroot /mnt
\$B mount -t proc proc /mnt/proc && \$B mount -t sysfs sys /mnt/sys && \$B mount -t devtmpfs dev /mnt/dev
\$B mount -t tmpfs run /mnt/run && \$B cp /command /mnt/run/command
# soft-RoCE on a dummy device: an address of the guest's own, no route out of it
\$B ip link set lo up && \$B ip link add rxenet type dummy && \$B ip addr add 10.77.0.1/24 dev rxenet
\$B ip link set rxenet up
IN="\$B chroot /mnt /usr/bin/env -i PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/run TMPDIR=/run"
if \$IN rdma link add rxe0 type rxe netdev rxenet; then
  echo "EPKERN_GUEST_READY uptime=\$(up)s"
  \$IN /bin/sh /run/command
  echo "EPKERN_GUEST_RC=\$? uptime=\$(up)s"
else
  echo "EPKERN_GUEST: creating rxe0 failed"; echo "EPKERN_GUEST_RC=98"
fi
\$B poweroff -f
EOF
chmod +x "$ROOT/init"
(cd "$ROOT" && find . | "$BUSYBOX" cpio -o -H newc 2>/dev/null | gzip -1) >"$WORK/initrd.gz"

# --- boot (TCG: /dev/kvm is not usable on these machines) ---
set +e
timeout "$LIMIT" qemu-system-x86_64 -accel tcg -cpu max -smp 2 -m 2G -nographic -no-reboot -nic none \
  -kernel "$CACHE/kernel/boot/vmlinuz-$KVER" -initrd "$WORK/initrd.gz" \
  -append "console=ttyS0 quiet loglevel=3 panic=-1" \
  -virtfs local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap \
  </dev/null | tr -d '\r' | tee "$WORK/console.log"
qemu_rc=${PIPESTATUS[0]}
set -e
rc=$(sed -n 's/^EPKERN_GUEST_RC=\([0-9]*\).*/\1/p' "$WORK/console.log" | tail -1)
if [ -z "$rc" ]; then
  echo "softroce_guest: the guest reported no exit code (qemu exit $qemu_rc; 124 = past $LIMIT s)" >&2
  exit 99
fi
exit "$rc"
