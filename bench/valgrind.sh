#!/usr/bin/env bash
# SPDX-License-Identifier: MIT OR Apache-2.0
# Prints the path of a valgrind that can run the broker, fetching Debian
# trixie's into a cache when the host's is too old; installs nothing.
#
#   bash bench/valgrind.sh            # cached after the first run
#   bash bench/valgrind.sh --refresh  # look for a newer version again
#
# Debian 12's valgrind 3.19 does not know pidfd_open (434) and the other
# pidfd syscalls, so the broker cannot even start under it; the floor
# benchmark's instruction counts (reapd-bench floor, callgrind) need a newer
# one. Like bench/earlyoom.sh it uses a private APT configuration
# (bench/private-apt.sh) for `apt-get download` alone, then `dpkg-deb -x`
# into the cache. The package's /usr/bin/valgrind is a Debian wrapper around
# valgrind.bin, which finds its tools (callgrind-amd64-linux, the preload
# objects) in the compiled-in /usr/libexec/valgrind unless VALGRIND_LIB
# says otherwise: the path printed is a wrapper of ours that sets
# VALGRIND_LIB to the extracted copy. valgrind.bin needs glibc 2.34 and the
# tools are static, so trixie's runs on Debian 12 (its vgdb, and so
# callgrind_control, needs glibc 2.38 and is not used). Its libc6-dbg
# dependency only serves memcheck's reports and is not fetched.
#
# Still unknown to valgrind 3.24 (reapd-bench says so in its notes):
# seccomp (317), so the broker runs with --no-seccomp under it, and
# process_mrelease (448), which the broker probes and then does without
# (CheckPermission never needs it).
#
# Environment:
#   REAPD_VALGRIND_CACHE  cache directory (default /var/cache/reapd-valgrind)
#   REAPD_VALGRIND_SUITE  Debian suite to take valgrind from (default trixie)
#
# Exit codes: 0 the path of a working valgrind is on stdout; 1 there is none
# (a reason on stderr: the caller decides whether that is a skip).
set -euo pipefail

CACHE=${REAPD_VALGRIND_CACHE:-/var/cache/reapd-valgrind}
SUITE=${REAPD_VALGRIND_SUITE:-trixie}
# The first release that knows pidfd_open, pidfd_getfd and pidfd_send_signal
# on amd64 and that we tried the broker under.
MIN_VERSION=3.24
ROOT=$CACHE/root
WRAPPER=$CACHE/valgrind

# "valgrind-3.24.0" -> 0 if at least MIN_VERSION.
new_enough() {
    local v
    v=$("$1" --version 2>/dev/null) || return 1
    v=${v#valgrind-}
    [[ $(printf '%s\n%s\n' "$MIN_VERSION" "$v" | sort -V | head -1) == "$MIN_VERSION" ]]
}

if [[ ${1:-} != --refresh ]]; then
    host=$(command -v valgrind || true)
    if [[ -n $host ]] && new_enough "$host"; then
        echo "$host"
        exit 0
    fi
    if [[ -x $WRAPPER ]] && new_enough "$WRAPPER"; then
        echo "$WRAPPER"
        exit 0
    fi
fi
[[ $(id -u) -eq 0 ]] || { echo "bench/valgrind.sh: needs root (apt-get) to fetch valgrind from $SUITE" >&2; exit 1; }

# Falls back to a copy fetched before, if it still works.
fail() {
    echo "bench/valgrind.sh: $1" >&2
    if [[ -x $WRAPPER ]] && new_enough "$WRAPPER"; then
        echo "$WRAPPER"
        exit 0
    fi
    exit 1
}

# shellcheck source=bench/private-apt.sh
. "$(dirname "$0")/private-apt.sh"
private_apt "$CACHE/apt" "$SUITE"
apt-get "${PRIVATE_APT[@]}" update -qq >"$CACHE/apt.log" 2>&1 ||
    fail "apt-get update of $SUITE failed (see $CACHE/apt.log)"
rm -f "$CACHE"/*.deb
(cd "$CACHE" && apt-get "${PRIVATE_APT[@]}" download "valgrind/$SUITE" >>"$CACHE/apt.log" 2>&1) ||
    fail "apt-get download of valgrind/$SUITE failed (see $CACHE/apt.log)"
# Extract beside, then swap in: an interrupted run leaves the old copy usable.
rm -rf "$ROOT.tmp"
for deb in "$CACHE"/*.deb; do
    dpkg-deb -x "$deb" "$ROOT.tmp"
done
[[ -x $ROOT.tmp/usr/bin/valgrind.bin && -d $ROOT.tmp/usr/libexec/valgrind ]] ||
    fail "the valgrind package of $SUITE has no usr/bin/valgrind.bin or usr/libexec/valgrind"
rm -rf "$ROOT"
mv "$ROOT.tmp" "$ROOT"
cat >"$WRAPPER.tmp" <<WRAP
#!/bin/sh
# Written by bench/valgrind.sh: valgrind from Debian $SUITE, extracted here.
VALGRIND_LIB='$ROOT/usr/libexec/valgrind'
export VALGRIND_LIB
exec '$ROOT/usr/bin/valgrind.bin' "\$@"
WRAP
chmod 755 "$WRAPPER.tmp"
mv "$WRAPPER.tmp" "$WRAPPER"
new_enough "$WRAPPER" || { rm -f "$WRAPPER"; fail "valgrind from $SUITE does not run here: $("$ROOT/usr/bin/valgrind.bin" --version 2>&1 | head -1)"; }
(cd "$CACHE" && ls ./*.deb) >"$CACHE/debs"
echo "bench/valgrind.sh: $(tr '\n' ' ' <"$CACHE/debs"); $("$WRAPPER" --version)" >&2
echo "$WRAPPER"
