#!/usr/bin/env bash
# SPDX-License-Identifier: MIT OR Apache-2.0
# Sets up and runs the reapd broker on a fresh Debian 12 machine, as root:
# installs build dependencies, builds in release mode, installs the binaries,
# and then either starts the socket-activated service (systemd as PID 1) or
# runs the broker in the foreground (anything else: containers, VMs without
# systemd). Ctrl-C stops a foreground broker.
#
#   sudo scripts/setup.sh              # as above
#   sudo scripts/setup.sh --no-run     # build and install only
#   sudo scripts/setup.sh --with-lmk   # and the unprivileged low-memory
#                                      # killer reapd-lmk.service next to it
set -euo pipefail
cd "$(dirname "$0")/.."

RUN=1
LMK=0
for arg in "$@"; do
    case $arg in
        --no-run) RUN=0 ;;
        --with-lmk) LMK=1 ;;
        *) echo "usage: setup.sh [--no-run] [--with-lmk]" >&2; exit 2 ;;
    esac
done
if [[ $(id -u) -ne 0 ]]; then
    echo "setup.sh must run as root: it installs packages and the broker" >&2
    exit 2
fi

# Toolchain: rustup's stable (Debian 12's cargo 1.65 is too old for these
# crates). protoc comes from the protoc-bin-vendored crate.
if ! command -v cargo >/dev/null; then
    [[ -x "$HOME/.cargo/bin/cargo" ]] && export PATH="$HOME/.cargo/bin:$PATH"
fi
if ! command -v cargo >/dev/null; then
    echo "no cargo: install Rust 1.85+ with rustup (https://rustup.rs), then rerun" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
missing=()
for pkg in build-essential pkg-config python3-venv; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [[ ${#missing[@]} -gt 0 ]]; then
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}"
fi

if [[ $LMK -eq 1 ]]; then
    cargo build --release --locked -p reapd -p reapctl -p reapd-lmk
else
    cargo build --release --locked -p reapd -p reapctl
fi
install -D -m 0755 target/release/reapd /usr/sbin/reapd
install -D -m 0755 target/release/reapctl /usr/bin/reapctl
if [[ ! -e /etc/reapd/policy.toml ]]; then
    # The built-in default written out (kill(2) rule, protections, limits).
    install -D -m 0644 systemd/policy.toml /etc/reapd/policy.toml
fi
# Man pages and completions, generated from the command lines. (The .deb
# from systemd/package.sh ships the same; it needs cargo-deb, a build tool:
# `cargo install cargo-deb --locked --version 3.8.0`.)
docs=$(mktemp -d)
target/release/reapd generate-docs "$docs"
target/release/reapctl generate-docs "$docs"
install -D -m 0644 -t /usr/local/share/man/man8 "$docs"/man/*.8
install -D -m 0644 -t /usr/local/share/man/man1 "$docs"/man/*.1
install -D -m 0644 -t /usr/local/share/bash-completion/completions "$docs"/completions/reapd "$docs"/completions/reapctl
rm -rf "$docs"
echo "installed /usr/sbin/reapd, /usr/bin/reapctl and /etc/reapd/policy.toml (the kill(2) rule; delegate more as docs/policy.md explains)"

if [[ -d /run/systemd/system ]]; then
    install -D -m 0644 systemd/reapd.socket /etc/systemd/system/reapd.socket
    install -D -m 0644 systemd/reapd-varlink.socket /etc/systemd/system/reapd-varlink.socket
    install -D -m 0644 systemd/reapd.service /etc/systemd/system/reapd.service
    install -D -m 0644 systemd/sysusers.d/reapd.conf /etc/sysusers.d/reapd.conf
    install -D -m 0644 systemd/tmpfiles.d/reapd.conf /etc/tmpfiles.d/reapd.conf
    systemd-sysusers /etc/sysusers.d/reapd.conf
    systemd-tmpfiles --create /etc/tmpfiles.d/reapd.conf || true
    systemctl daemon-reload
    if [[ $RUN -eq 1 ]]; then
        systemctl enable --now reapd.socket reapd-varlink.socket
        reapctl caps
        echo "reapd.socket and reapd-varlink.socket are listening; the broker starts on first use"
    fi
fi

if [[ $LMK -eq 1 ]]; then
    # The binary, its config, its user reapd-lmk and the grant (checked),
    # then the unit, started (systemd/install-lmk.sh; the systemd VM test
    # runs the same script).
    if [[ $RUN -eq 1 ]]; then
        systemd/install-lmk.sh target/release
    else
        systemd/install-lmk.sh target/release --no-run
    fi
fi

if [[ ! -d /run/systemd/system && $RUN -eq 1 ]]; then
    echo "systemd is not PID 1: running the broker in the foreground (Ctrl-C stops it)"
    echo "try, from another shell: reapctl caps"
    exec /usr/sbin/reapd
fi
