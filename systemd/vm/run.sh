#!/bin/bash
# SPDX-License-Identifier: MIT OR Apache-2.0
# Boot a real systemd (PID 1) in qemu (TCG) from a cached Debian 12 rootfs,
# install the reapd .deb and check it under the unit's full hardening.
#
#   systemd/vm/run.sh                 build the .deb (systemd/package.sh), boot, check
#   REAPD_DEB=path.deb systemd/vm/run.sh   use an existing .deb
#   systemd/vm/run.sh --prepare       only build the cached rootfs/kernel/image
#
# Needs root (debootstrap, mkfs). Installs its own tools with apt-get.
# Cache: ${REAPD_VM_CACHE:-/var/cache/reapd-vm} (rootfs image, vmlinuz, initrd),
# rebuilt when CACHE_VERSION below changes. Prints one PASS/FAIL line per check,
# then "N passed, N failed"; exit status 0 iff all passed.
set -euo pipefail

CACHE_VERSION=4
CACHE=${REAPD_VM_CACHE:-/var/cache/reapd-vm}
MIRROR=${REAPD_VM_MIRROR:-http://deb.debian.org/debian}
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
TIMEOUT=${REAPD_VM_TIMEOUT:-900}

log() { echo "vm: $*" >&2; }

[ "$(id -u)" = 0 ] || { echo "systemd/vm/run.sh must run as root" >&2; exit 2; }

need=()
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v qemu-img >/dev/null || need+=(qemu-utils)
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
command -v dpkg-deb >/dev/null || need+=(dpkg)
if [ ${#need[@]} -gt 0 ]; then
    log "installing ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
fi

prepare() {
    if [ -f "$CACHE/stamp" ] && [ "$(cat "$CACHE/stamp")" = "$CACHE_VERSION" ]; then
        return
    fi
    log "building the Debian 12 rootfs in $CACHE (once)"
    mkdir -p "$CACHE"
    local root="$CACHE/rootfs"
    rm -rf "$root" "$CACHE/stamp"
    # minbase + systemd as init + Debian's cloud kernel (small, virtio built for VMs).
    # No udev: nothing here needs device units, and it costs seconds under TCG.
    debootstrap --variant=minbase \
        --include=systemd,systemd-sysv,linux-image-cloud-amd64,initramfs-tools,zstd \
        bookworm "$root" "$MIRROR" >&2
    echo reapd-vm > "$root/etc/hostname"
    : > "$root/etc/fstab"
    passwd -R "$root" -d root >/dev/null 2>&1 || true
    # The test runner: mounts the per-run disk (LABEL=reapdtest, /dev/vdb) and
    # runs its check.sh, writing to the serial console, then powers off.
    cat > "$root/etc/systemd/system/reapd-vmtest.service" <<'UNIT'
[Unit]
Description=reapd VM test runner
After=multi-user.target
[Service]
Type=oneshot
TimeoutStartSec=0
StandardOutput=tty
StandardError=tty
TTYPath=/dev/ttyS0
ExecStart=/bin/sh -c 'mkdir -p /mnt/t && mount -o ro /dev/vdb /mnt/t && /bin/sh /mnt/t/check.sh'
ExecStopPost=/bin/systemctl --no-block poweroff
[Install]
WantedBy=multi-user.target
UNIT
    ln -sf /etc/systemd/system/reapd-vmtest.service \
        "$root/etc/systemd/system/multi-user.target.wants/reapd-vmtest.service"
    # Nothing on the console but our output; skip units that only cost time.
    for unit in getty@tty1.service serial-getty@ttyS0.service apt-daily.timer \
        apt-daily-upgrade.timer e2scrub_all.timer fstrim.timer \
        systemd-timesyncd.service systemd-networkd.service; do
        ln -sf /dev/null "$root/etc/systemd/system/$unit"
    done
    cp -L "$root/vmlinuz" "$CACHE/vmlinuz"
    cp -L "$root/initrd.img" "$CACHE/initrd.img"
    rm -f "$CACHE/base.img"
    # The rootfs as an ext4 image; each run boots a throw-away qcow2 overlay on it.
    mkfs.ext4 -q -F -L reapdroot -d "$root" "$CACHE/base.img" 2G >&2
    rm -rf "$root"
    echo "$CACHE_VERSION" > "$CACHE/stamp"
}

prepare
[ "${1:-}" = "--prepare" ] && exit 0

DEB=${REAPD_DEB:-}
if [ -z "$DEB" ]; then
    DEB=$("$REPO/systemd/package.sh")
fi
[ -f "$DEB" ] || { echo "no .deb at '$DEB'" >&2; exit 2; }

WORK=$(mktemp -d /tmp/reapd-vm.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
mkdir "$WORK/t"
cp "$DEB" "$WORK/t/reapd.deb"
cp "$HERE/check.sh" "$WORK/t/check.sh"
# reapd-lmk's check installs it with systemd/install-lmk.sh (what
# scripts/setup.sh --with-lmk runs) from the same layout as the repository.
LMK_BIN="${REAPD_BIN_DIR:-$REPO/target/release}/reapd-lmk"
if [ -z "${REAPD_BIN_DIR:-}" ]; then
    (cd "$REPO" && cargo build --release --locked -p reapd-lmk --bin reapd-lmk >&2)
fi
[ -x "$LMK_BIN" ] || { echo "no reapd-lmk at '$LMK_BIN' (cargo build --release -p reapd-lmk)" >&2; exit 2; }
cp "$LMK_BIN" "$WORK/t/reapd-lmk"
strip --strip-unneeded "$WORK/t/reapd-lmk" 2>/dev/null || true
mkdir -p "$WORK/t/systemd/sysusers.d"
cp "$REPO/systemd/install-lmk.sh" "$REPO/systemd/reapd-lmk.service" "$REPO/systemd/lmk.toml" \
    "$REPO/systemd/lmk-policy.toml" "$REPO/systemd/policy.toml" "$WORK/t/systemd/"
cp "$REPO/systemd/sysusers.d/reapd-lmk.conf" "$WORK/t/systemd/sysusers.d/"
mkfs.ext4 -q -F -L reapdtest -d "$WORK/t" "$WORK/test.img" 64M >&2
qemu-img create -q -f qcow2 -b "$CACHE/base.img" -F raw "$WORK/root.qcow2"

log "booting (TCG); console log in $WORK/console.log while it runs"
start=$(date +%s)
set +e
timeout "$TIMEOUT" qemu-system-x86_64 -accel tcg -m 1024 -smp 2 \
    -display none -monitor none -no-reboot -serial "file:$WORK/console.log" \
    -kernel "$CACHE/vmlinuz" -initrd "$CACHE/initrd.img" \
    -append "root=/dev/vda rw console=ttyS0 quiet loglevel=3 panic=-1 systemd.show_status=false" \
    -drive "file=$WORK/root.qcow2,if=virtio,format=qcow2" \
    -drive "file=$WORK/test.img,if=virtio,format=raw" \
    -nic none
qrc=$?
set -e
log "qemu exited ($qrc) after $(( $(date +%s) - start ))s"

tr -d '\r' < "$WORK/console.log" > "$WORK/console.txt"
grep -aE '^(VMTEST|VMINFO) ' "$WORK/console.txt" | sed 's/^VMTEST //; s/^VMINFO /info: /' || true
passed=$(grep -ac '^VMTEST PASS ' "$WORK/console.txt" || true)
failed=$(grep -ac '^VMTEST FAIL ' "$WORK/console.txt" || true)
if ! grep -aq '^VMTEST DONE' "$WORK/console.txt"; then
    echo "FAIL vm: the check script did not finish (qemu rc $qrc); console tail:"
    tail -n 40 "$WORK/console.txt"
    failed=$((failed + 1))
fi
echo "$passed passed, $failed failed"
[ "$failed" = 0 ] && [ "$passed" -gt 0 ]
