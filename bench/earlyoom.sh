#!/usr/bin/env bash
# SPDX-License-Identifier: MIT OR Apache-2.0
# Fetches the newest earlyoom Debian offers (unstable) into a cache, without
# touching the host's packages, and prints the path of its binary.
#
#   bash bench/earlyoom.sh            # cached after the first run
#   bash bench/earlyoom.sh --refresh  # look for a newer version again
#
# Debian 12 ships earlyoom 1.7, which kills with kill(2) alone; 1.8 (2024)
# added process_mrelease. The newer suites are reached as the kernel harness
# reaches them (kernel-patch/vm/run.sh): a private APT configuration (its own
# sources.list, lists and archive cache) used only for `apt-get download`,
# then `dpkg-deb -x` into the cache. earlyoom needs libc6 (>= 2.34) alone,
# which Debian 12's glibc 2.36 satisfies, so the unstable binary runs here.
#
# Environment:
#   REAPD_EARLYOOM_CACHE  cache directory (default /var/cache/reapd-earlyoom)
#   REAPD_EARLYOOM_SUITE  Debian suite to take it from (default unstable)
#
# Exit codes: 0 the binary's path is on stdout; 1 it could not be fetched
# (no cache and no archive: the caller decides whether that is a skip).
set -euo pipefail

CACHE=${REAPD_EARLYOOM_CACHE:-/var/cache/reapd-earlyoom}
SUITE=${REAPD_EARLYOOM_SUITE:-unstable}
BIN=$CACHE/root/usr/bin/earlyoom

if [[ ${1:-} != --refresh && -x $BIN ]]; then
    echo "$BIN"
    exit 0
fi
[[ $(id -u) -eq 0 ]] || { echo "bench/earlyoom.sh: needs root (apt-get)" >&2; exit 1; }

APT=$CACHE/apt
mkdir -p "$APT/lists/partial" "$APT/cache/archives/partial" "$APT/etc"
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian $SUITE main" \
    >"$APT/etc/sources.list"
# Only the Packages index: no translations, no DEP-11 metadata (tens of MB
# that `apt-get download` never reads).
OPT=(-o "Dir::Etc::sourcelist=$APT/etc/sources.list" -o "Dir::Etc::sourceparts=/dev/null"
    -o "Dir::State::Lists=$APT/lists" -o "Dir::Cache=$APT/cache" -o "APT::Sandbox::User=root"
    -o "Acquire::Languages=none" -o "Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false"
    -o "Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled=false"
    -o "Acquire::IndexTargets::deb::DEP-11-icons-small::DefaultEnabled=false"
    -o "Acquire::IndexTargets::deb::DEP-11-icons-hidpi::DefaultEnabled=false")
if ! apt-get "${OPT[@]}" update -qq >"$CACHE/apt.log" 2>&1; then
    echo "bench/earlyoom.sh: apt-get update of $SUITE failed (see $CACHE/apt.log)" >&2
    [[ -x $BIN ]] && { echo "$BIN"; exit 0; }
    exit 1
fi
rm -f "$CACHE"/earlyoom_*.deb
if ! (cd "$CACHE" && apt-get "${OPT[@]}" download earlyoom >>"$CACHE/apt.log" 2>&1); then
    echo "bench/earlyoom.sh: apt-get download earlyoom failed (see $CACHE/apt.log)" >&2
    [[ -x $BIN ]] && { echo "$BIN"; exit 0; }
    exit 1
fi
# Extract beside, then swap in: an interrupted run leaves the old copy usable.
rm -rf "$CACHE/root.tmp"
dpkg-deb -x "$CACHE"/earlyoom_*.deb "$CACHE/root.tmp"
rm -rf "$CACHE/root"
mv "$CACHE/root.tmp" "$CACHE/root"
basename "$CACHE"/earlyoom_*.deb >"$CACHE/deb-name"
echo "bench/earlyoom.sh: $(cat "$CACHE/deb-name") from $SUITE, $("$BIN" -v 2>&1 | head -1)" >&2
echo "$BIN"
