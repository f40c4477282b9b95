#!/bin/sh
# SPDX-License-Identifier: MIT OR Apache-2.0
# Regenerates docs/benchmarks.md and docs/*.png: builds the broker, reapctl
# and the benchmark in release mode, then runs every benchmark (about 10-15
# minutes on 2 cores). Needs root. Extra arguments go to `reapd-bench run`
# (e.g. --reps 3).
set -eu
cd "$(dirname "$0")/.."
cargo build --release -p reapd -p reapd-client -p reapd-bench
exec target/release/reapd-bench run --reapd target/release/reapd --out docs --command-line "bench/run.sh${*:+ $*}" "$@"
