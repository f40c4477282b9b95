#!/usr/bin/env bash
# SPDX-License-Identifier: MIT OR Apache-2.0
# Fuzzes the policy parser with libFuzzer on the stable toolchain (the
# sanitizer-coverage passes cargo-fuzz would add, given by hand), seeded with
# the check-policy golden files.
#
#   fuzz/run.sh          # 20 seconds: what scripts/test.sh runs in CI
#   fuzz/run.sh 600      # longer, by hand (or: cd fuzz && cargo +nightly fuzz run policy_parser)
#
# Exits non-zero if libFuzzer finds a crash (the input is saved in fuzz/artifacts/).
set -euo pipefail
cd "$(dirname "$0")"
SECONDS_TO_RUN=${1:-20}
TARGET=x86_64-unknown-linux-gnu
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
# --target keeps these flags off build scripts and proc macros.
RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions" \
    cargo build --release --locked --target "$TARGET" --bin policy_parser
corpus=$(mktemp -d)
trap 'rm -rf "$corpus"' EXIT
cp ../tests/policy-golden/*.toml "$corpus"/
mkdir -p artifacts
"$CARGO_TARGET_DIR/$TARGET/release/policy_parser" "$corpus" -artifact_prefix=artifacts/ \
    -max_total_time="$SECONDS_TO_RUN" -print_final_stats=1

