#!/bin/sh
# SPDX-License-Identifier: MIT OR Apache-2.0
# Regenerates docs/benchmarks.md and docs/*.png: builds the broker, reapctl
# and the benchmark in release mode, then runs every benchmark (about 15-20
# minutes on 2 cores). Needs root. Extra arguments go to `reapd-bench run`
# (e.g. --reps 3; --compare before=/path/to/old/reapd adds an older broker
# to the floor section, measured in the same run).
set -eu
cd "$(dirname "$0")/.."
cargo build --release -p reapd -p reapd-client -p reapd-bench
exec target/release/reapd-bench run --reapd target/release/reapd --out docs --command-line "bench/run.sh${*:+ $*}" "$@"
