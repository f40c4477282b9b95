#!/bin/bash
# SPDX-License-Identifier: MIT OR Apache-2.0
# Builds the reapd .deb with cargo-deb and prints its path.
#
#   systemd/package.sh            cargo build --release, then package
#   REAPD_BIN_DIR=target/debug systemd/package.sh   package already-built binaries
#   REAPD_DEB_OUT=dir   where to put it (default target/debian)
#   REAPD_DEB_MAINTAINER='Team <role@example.org>'  a redistributor's own
#                       Maintainer (default: broker/Cargo.toml's role address)
#   REAPD_DEB_FAST=1    no compression (tests)
#
# The package's contents, scripts and metadata are in broker/Cargo.toml
# ([package.metadata.deb]) and systemd/debian/. This script only builds the
# binaries, has them write their man pages and completions (generated from
# their clap definitions: `reapd generate-docs`, `reapctl generate-docs`),
# and runs `cargo deb --no-build` on the result. cargo-deb is installed with
# `cargo install cargo-deb --locked` when missing (scripts/test.sh does it).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/.." && pwd)

if ! cargo deb --version >/dev/null 2>&1; then
    echo "package.sh: cargo-deb is missing: cargo install cargo-deb --locked" >&2
    exit 2
fi

if [ -z "${REAPD_BIN_DIR:-}" ]; then
    (cd "$REPO" && cargo build --release --locked -p reapd -p reapctl --bin reapd --bin reapctl >&2)
    BIN_DIR="$REPO/target/release"
else
    BIN_DIR=$(cd "$REAPD_BIN_DIR" && pwd)
fi
# cargo-deb finds the binaries as <target dir>/<profile dir>/NAME: give it
# the directory the binaries are in, whatever profile built them.
TARGET_DIR=$(dirname "$BIN_DIR")
PROFILE_DIR=$(basename "$BIN_DIR")
case "$PROFILE_DIR" in
    debug) PROFILE=dev ;;
    *) PROFILE=$PROFILE_DIR ;;
esac

rm -rf "$BIN_DIR/docs"
"$BIN_DIR/reapd" generate-docs "$BIN_DIR/docs"
"$BIN_DIR/reapctl" generate-docs "$BIN_DIR/docs"
# Man pages go in compressed (Debian policy 12.1); cargo-deb compresses only
# the assets it did not see built.
gzip -9n "$BIN_DIR"/docs/man/*

OUT=${REAPD_DEB_OUT:-$REPO/target/debian}
mkdir -p "$OUT"
# --strip: a dev profile has debug = true, which cargo-deb would otherwise keep.
args=(--no-build --locked -p reapd --profile "$PROFILE" --output "$OUT" --quiet --strip)
[ -n "${REAPD_DEB_MAINTAINER:-}" ] && args+=(--maintainer "$REAPD_DEB_MAINTAINER")
# Debug binaries (tests) are large: skip compression there, not in releases.
[ -n "${REAPD_DEB_FAST:-}" ] && args+=(--compress-type gzip --fast)
(cd "$REPO" && CARGO_TARGET_DIR=$TARGET_DIR cargo deb "${args[@]}")
