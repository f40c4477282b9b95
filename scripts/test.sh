#!/usr/bin/env bash
# SPDX-License-Identifier: MIT OR Apache-2.0
# Runs every test of reapd, as root (the tests switch uids, freeze cgroups,
# mount a v1 freezer and boot kernels in qemu).
#
#   sudo scripts/test.sh           # everything, as CI does
#   sudo scripts/test.sh --quick   # skip the two qemu suites (day-to-day)
#
# Prints one line per suite and ends with "total: N passed, N failed".
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

QUICK=0
[[ "${1:-}" == "--quick" ]] && QUICK=1
if [[ $(id -u) -ne 0 ]]; then
    echo "scripts/test.sh must run as root (tests use setresuid, cgroups and qemu)" >&2
    exit 2
fi
export CARGO_TERM_COLOR=never
LOGS=$(mktemp -d /tmp/reapd-test.XXXXXX)
# Tests that skip a precondition append "SKIP: ..." here (reapd_e2e::skip
# and the resilience tests); the summary counts and prints them, so a skip
# is never a silent pass.
export REAPD_SKIP_LOG=$LOGS/skips.txt
export REAPD_SKIP_FILE=$REAPD_SKIP_LOG
: >"$REAPD_SKIP_LOG"
PASSED=0
FAILED=0
declare -a SUITES=()

# run NAME CMD...: runs one suite, keeps its output in $LOGS/NAME.log, and
# adds its counts (from the runner's own summary lines) to the totals.
run() {
    local name=$1
    shift
    local log="$LOGS/$name.log"
    local started=$SECONDS
    echo "=== $name: $*"
    "$@" 2>&1 | tee "$log"
    local rc=${PIPESTATUS[0]}
    local p f
    p=$(grep -hoE '^test result: [a-zA-Z]+\. [0-9]+ passed' "$log" | grep -oE '[0-9]+ passed' | awk '{s+=$1} END {print s+0}')
    f=$(grep -hoE '^test result: [a-zA-Z]+\. [0-9]+ passed; [0-9]+ failed' "$log" | grep -oE '[0-9]+ failed' | awk '{s+=$1} END {print s+0}')
    if [[ $p -eq 0 && $f -eq 0 ]]; then
        # pytest ("== 5 passed, 1 failed in 2s ==") and the plain "N passed, N failed".
        local last
        last=$(grep -E '[0-9]+ (passed|failed)' "$log" | tail -1)
        p=$(grep -oE '[0-9]+ passed' <<<"$last" | grep -oE '[0-9]+' || echo 0)
        f=$(grep -oE '[0-9]+ failed' <<<"$last" | grep -oE '[0-9]+' || echo 0)
    fi
    # A suite that exits non-zero counts at least one failure, whatever it printed.
    if [[ $rc -ne 0 && $f -eq 0 ]]; then f=1; fi
    PASSED=$((PASSED + p))
    FAILED=$((FAILED + f))
    SUITES+=("$(printf '%-16s rc=%-3s %5s passed %3s failed  %4ss' "$name" "$rc" "$p" "$f" $((SECONDS - started)))")
}

# Checks that are not tests count as one each.
check() {
    local name=$1
    shift
    local started=$SECONDS
    echo "=== $name: $*"
    if "$@" >"$LOGS/$name.log" 2>&1; then
        PASSED=$((PASSED + 1))
        SUITES+=("$(printf '%-16s ok %37s' "$name" "$((SECONDS - started))s")")
    else
        cat "$LOGS/$name.log"
        FAILED=$((FAILED + 1))
        SUITES+=("$(printf '%-16s FAILED %33s' "$name" "$((SECONDS - started))s")")
    fi
}

# Packaging tools for tests/tests/package.rs and the systemd VM's .deb:
# cargo-deb (pinned; compiled once into ~/.cargo/bin, then cached; a debug
# build, which compiles in well under half the time of a release build and
# is fast enough to pack one .deb) and lintian from Debian.
CARGO_DEB_VERSION=3.8.0
if [[ "$(cargo deb --version 2>/dev/null)" != "cargo-deb $CARGO_DEB_VERSION" ]]; then
    check cargo-deb cargo install cargo-deb --debug --locked --version "$CARGO_DEB_VERSION"
fi
if ! command -v lintian >/dev/null; then
    check lintian bash -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends lintian'
fi

check fmt cargo fmt --all --check
check clippy cargo clippy --workspace --all-targets --locked -- -D warnings
check build cargo build --workspace --all-targets --locked
# reapd-client's transports one at a time: each must build and lint (its
# tests included) alone, and a varlink-only build must not compile tonic (or hyper).
check client-varlink cargo clippy -p reapd-client --all-targets --no-default-features --features varlink --locked -- -D warnings
check client-grpc cargo clippy -p reapd-client --all-targets --no-default-features --features grpc --locked -- -D warnings
check client-no-tonic bash -c 'tree=$(cargo tree -p reapd-client --no-default-features --features varlink -e normal,build --locked) && ! grep -E "(tonic|hyper) v" <<<"$tree"'
# --no-fail-fast: one failing test binary must not hide the others' results.
run rust cargo test --workspace --locked --no-fail-fast -- --test-threads=2

# The policy parser under libFuzzer, briefly (fuzz/run.sh 600 for longer).
check fuzz fuzz/run.sh 20

# Independent clients (grpcio, varlink) from a venv this script makes.
if [[ ! -x .venv/bin/python ]]; then
    python3 -m venv .venv 2>/dev/null || {
        apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null && python3 -m venv .venv
    }
fi
check venv .venv/bin/pip install -q --disable-pip-version-check -r tests/python/requirements.txt
REAPD_BIN_DIR=$ROOT/target/debug run python .venv/bin/python -m pytest -q tests/python

if [[ $QUICK -eq 0 ]]; then
    # One release build serves both VMs (the in-VM broker test, the .deb and
    # reapd-lmk, which the systemd VM installs next to the broker).
    check release cargo build --release --locked -p reapd -p reapctl -p reapd-lmk --bin reapd --bin reapctl --bin reapd-lmk
    export REAPD_BIN_DIR=$ROOT/target/release
    run kernel-vm bash kernel-patch/vm/run.sh
    run systemd-vm bash systemd/vm/run.sh
    unset REAPD_BIN_DIR
fi

# A skip is a counted precondition that did not hold; one not listed in
# tests/expected-skips.txt (with its reason) fails the run.
UNEXPECTED=$(grep -vE -f <(grep -vE '^(#|$)' tests/expected-skips.txt) "$REAPD_SKIP_LOG" || true)
if [[ -n $UNEXPECTED ]]; then
    FAILED=$((FAILED + $(wc -l <<<"$UNEXPECTED")))
    SUITES+=("$(printf '%-16s FAILED %33s' "unexpected-skip" "")")
fi

echo
echo "=== summary (logs in $LOGS)"
printf '%s\n' "${SUITES[@]}"
echo "skipped: $(wc -l <"$REAPD_SKIP_LOG")"
sed 's/^/  /' "$REAPD_SKIP_LOG"
if [[ -n $UNEXPECTED ]]; then
    echo "unexpected skips (not in tests/expected-skips.txt): each counts as a failure"
    sed 's/^/  /' <<<"$UNEXPECTED"
fi
echo "wall time: $((SECONDS / 60)) min $((SECONDS % 60)) s"
echo "total: $PASSED passed, $FAILED failed"
[[ $FAILED -eq 0 ]]
