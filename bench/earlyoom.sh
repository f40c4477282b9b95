#!/usr/bin/env bash
# SPDX-License-Identifier: MIT OR Apache-2.0
# Fetches the newest earlyoom Debian offers (unstable) and Debian 12's lxcfs
# (with its libfuse3) into a cache, without touching the host's packages,
# and prints the directory they are extracted into (ROOT/usr/bin/earlyoom,
# ROOT/usr/bin/lxcfs; bench/lmk_side_by_side.py runs lxcfs with
# LD_LIBRARY_PATH pointing into ROOT).
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
# lxcfs gives a process a /proc/meminfo of its own memory cgroup (as LXC and
# Incus containers see it): that is how earlyoom, which reads nothing but
# /proc/meminfo, is scoped to the benchmark's cgroup. It is taken from the
# host's own suite (bookworm) and never installed: an installed lxcfs would
# start a host-wide daemon.
#
# Environment:
#   REAPD_EARLYOOM_CACHE  cache directory (default /var/cache/reapd-earlyoom)
#   REAPD_EARLYOOM_SUITE  Debian suite to take earlyoom from (default unstable)
#
# Exit codes: 0 the binary's path is on stdout; 1 it could not be fetched
# (no cache and no archive: the caller decides whether that is a skip).
set -euo pipefail

CACHE=${REAPD_EARLYOOM_CACHE:-/var/cache/reapd-earlyoom}
SUITE=${REAPD_EARLYOOM_SUITE:-unstable}
HOST_SUITE=bookworm
ROOT=$CACHE/root
BIN=$ROOT/usr/bin/earlyoom

if [[ ${1:-} != --refresh && -x $BIN && -x $ROOT/usr/bin/lxcfs ]]; then
    echo "$ROOT"
    exit 0
fi
[[ $(id -u) -eq 0 ]] || { echo "bench/earlyoom.sh: needs root (apt-get)" >&2; exit 1; }

# shellcheck source=bench/private-apt.sh
. "$(dirname "$0")/private-apt.sh"
private_apt "$CACHE/apt" "$SUITE" "$HOST_SUITE"
if ! apt-get "${PRIVATE_APT[@]}" update -qq >"$CACHE/apt.log" 2>&1; then
    echo "bench/earlyoom.sh: apt-get update of $SUITE failed (see $CACHE/apt.log)" >&2
    [[ -x $BIN ]] && { echo "$ROOT"; exit 0; }
    exit 1
fi
rm -f "$CACHE"/*.deb
if ! (cd "$CACHE" && apt-get "${PRIVATE_APT[@]}" download "earlyoom/$SUITE" "lxcfs/$HOST_SUITE" "libfuse3-3/$HOST_SUITE" \
    >>"$CACHE/apt.log" 2>&1); then
    echo "bench/earlyoom.sh: apt-get download failed (see $CACHE/apt.log)" >&2
    [[ -x $BIN ]] && { echo "$ROOT"; exit 0; }
    exit 1
fi
# Extract beside, then swap in: an interrupted run leaves the old copy usable.
rm -rf "$ROOT.tmp"
for deb in "$CACHE"/*.deb; do
    dpkg-deb -x "$deb" "$ROOT.tmp"
done
rm -rf "$ROOT"
mv "$ROOT.tmp" "$ROOT"
(cd "$CACHE" && ls ./*.deb) >"$CACHE/debs"
echo "bench/earlyoom.sh: $(tr '\n' ' ' <"$CACHE/debs"); $("$BIN" -v 2>&1 | head -1)" >&2
echo "$ROOT"
