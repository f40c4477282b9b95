#!/bin/bash
# SPDX-License-Identifier: MIT OR Apache-2.0
# Builds the reapd .deb with dpkg-deb and prints its path.
#
#   systemd/package.sh            cargo build --release, then package
#   REAPD_BIN_DIR=target/debug systemd/package.sh   package already-built binaries
#   REAPD_DEB_OUT=dir   where to put it (default target/debian)
#
# Why dpkg-deb and not cargo-deb: the layout is a dozen files, dpkg-deb is on
# every Debian system, and `cargo install cargo-deb` compiles for minutes on
# a 2-core builder (in CI, every cold run). The control file below is what
# cargo-deb would have generated from the same metadata.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' "$REPO/Cargo.toml" | head -n1)
ARCH=$(dpkg --print-architecture)

if [ -z "${REAPD_BIN_DIR:-}" ]; then
    (cd "$REPO" && cargo build --release -p reapd -p reapd-client --bin reapd --bin reapctl >&2)
    BIN_DIR="$REPO/target/release"
else
    BIN_DIR=$REAPD_BIN_DIR
fi

OUT=${REAPD_DEB_OUT:-$REPO/target/debian}
STAGE="$OUT/reapd_${VERSION}_${ARCH}"
rm -rf "$STAGE"
mkdir -p "$STAGE/DEBIAN"
inst() { install -D -m "$1" "$2" "$STAGE/$3"; }
inst 0755 "$BIN_DIR/reapd" usr/sbin/reapd
inst 0755 "$BIN_DIR/reapctl" usr/bin/reapctl
strip --strip-unneeded "$STAGE/usr/sbin/reapd" "$STAGE/usr/bin/reapctl" 2>/dev/null || true
# /lib/systemd/system is where Debian 12's systemd packages put units.
inst 0644 "$HERE/reapd.socket" lib/systemd/system/reapd.socket
inst 0644 "$HERE/reapd-varlink.socket" lib/systemd/system/reapd-varlink.socket
inst 0644 "$HERE/reapd.service" lib/systemd/system/reapd.service
inst 0644 "$HERE/sysusers.d/reapd.conf" usr/lib/sysusers.d/reapd.conf
inst 0644 "$HERE/tmpfiles.d/reapd.conf" usr/lib/tmpfiles.d/reapd.conf
conffiles=""
# The default policy (systemd/policy.toml: the built-in default written out), a conffile.
for policy in "$REPO/systemd/policy.toml" "$REPO/etc/reapd/policy.toml" "$REPO/docs/policy.toml" "$REPO/broker/policy.toml"; do
    if [ -f "$policy" ]; then
        inst 0644 "$policy" etc/reapd/policy.toml
        conffiles="/etc/reapd/policy.toml"
        break
    fi
done
for page in "$HERE"/man/*.[0-9]; do
    section=${page##*.}
    mkdir -p "$STAGE/usr/share/man/man$section"
    gzip -9n < "$page" > "$STAGE/usr/share/man/man$section/$(basename "$page").gz"
done
mkdir -p "$STAGE/usr/share/doc/reapd"
# The policy reference the shipped policy.toml points at.
gzip -9n < "$REPO/docs/policy.md" > "$STAGE/usr/share/doc/reapd/policy.md.gz"
printf 'reapd\nLicense: MIT OR Apache-2.0\n' > "$STAGE/usr/share/doc/reapd/copyright"

size=$(du -sk --exclude=DEBIAN "$STAGE" | cut -f1)
cat > "$STAGE/DEBIAN/control" <<CONTROL
Package: reapd
Version: $VERSION
Architecture: $ARCH
Maintainer: reapd developers <reapd@example.invalid>
Installed-Size: $size
Depends: libc6 (>= 2.34), systemd (>= 247)
Section: admin
Priority: optional
Description: broker that kills a process and reaps its memory at once
 reapd lets unprivileged callers kill a process and reclaim its memory
 (process_mrelease) under a policy, over gRPC and varlink on Unix sockets.
 It runs socket-activated as the reapd user with CAP_KILL only.
CONTROL
[ -n "$conffiles" ] && echo "$conffiles" > "$STAGE/DEBIAN/conffiles"
cat > "$STAGE/DEBIAN/postinst" <<'SCRIPT'
#!/bin/sh
set -e
if [ "$1" = configure ]; then
    systemd-sysusers reapd.conf
    systemd-tmpfiles --create reapd.conf || true
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload
        systemctl enable reapd.socket reapd-varlink.socket
        # A running broker keeps the old binary until it idles out; restart it.
        systemctl try-restart reapd.service
        systemctl start reapd.socket reapd-varlink.socket
    else
        systemctl enable reapd.socket reapd-varlink.socket || true
    fi
fi
SCRIPT
cat > "$STAGE/DEBIAN/prerm" <<'SCRIPT'
#!/bin/sh
set -e
if [ "$1" = remove ] && [ -d /run/systemd/system ]; then
    systemctl stop reapd.socket reapd-varlink.socket reapd.service || true
fi
SCRIPT
cat > "$STAGE/DEBIAN/postrm" <<'SCRIPT'
#!/bin/sh
set -e
if [ "$1" = purge ]; then
    systemctl disable reapd.socket reapd-varlink.socket >/dev/null 2>&1 || true
    rm -rf /etc/reapd
fi
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload || true
fi
SCRIPT
chmod 0755 "$STAGE/DEBIAN/postinst" "$STAGE/DEBIAN/prerm" "$STAGE/DEBIAN/postrm"
DEB="$OUT/reapd_${VERSION}_${ARCH}.deb"
# REAPD_DEB_FAST=1 (tests): no compression, no strip-time worth waiting for.
if [ -n "${REAPD_DEB_FAST:-}" ]; then compress=(-Znone); else compress=(-Zxz -z6); fi
dpkg-deb --root-owner-group "${compress[@]}" --build "$STAGE" "$DEB" >&2
echo "$DEB"
