#!/bin/sh
# SPDX-License-Identifier: MIT OR Apache-2.0
# Regenerates docs/benchmarks.md and docs/*.png: builds the broker, reapctl,
# reapd-lmk and the benchmark in release mode (the workload's lmk-hog in
# debug), runs the low-memory killers side by side (reapd-lmk, earlyoom, the
# kernel OOM killer alone; bench/lmk_side_by_side.py, about a minute,
# fetching earlyoom once with bench/earlyoom.sh), then every other benchmark
# (about 15-20 minutes on 2 cores; the floor's instruction counts run under
# a valgrind that bench/valgrind.sh fetches once from Debian trixie). Needs root. Extra arguments go to `reapd-bench run` (e.g. --reps 3;
# --compare before=/path/to/old/reapd adds an older broker to the floor
# section, measured in the same run). LMK_REPS (default 10) sets the side by
# side's repetitions per killer.
set -eu
cd "$(dirname "$0")/.."
cargo build --release -p reapd -p reapctl -p reapd-bench -p reapd-lmk
# The workload's hog needs no speed: debug, as the tests build it.
cargo build -p reapd-e2e --bin lmk-hog
mkdir -p target/reapd-bench
REAPD_BIN_DIR="$PWD/target/release" REAPD_HOG_DIR="$PWD/target/debug" python3 bench/lmk_side_by_side.py --reps "${LMK_REPS:-10}" \
    --json target/reapd-bench/lmk_side_by_side.json --markdown docs/lmk_side_by_side.md
target/release/reapd-bench lmk-plot --json target/reapd-bench/lmk_side_by_side.json --out docs/lmk_side_by_side.png
exec target/release/reapd-bench run --reapd target/release/reapd --out docs --command-line "bench/run.sh${*:+ $*}" "$@"
