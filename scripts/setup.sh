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
    install -D -m 0755 target/release/reapd-lmk /usr/bin/reapd-lmk
    [[ -e /etc/reapd/lmk.toml ]] || install -D -m 0644 systemd/lmk.toml /etc/reapd/lmk.toml
    # Its user, which the grant names (the broker resolves it at load).
    install -D -m 0644 systemd/sysusers.d/reapd-lmk.conf /etc/sysusers.d/reapd-lmk.conf
    systemd-sysusers /etc/sysusers.d/reapd-lmk.conf 2>/dev/null ||
        id reapd-lmk >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin reapd-lmk
    # The grant, once: the unit may kill regular users' session processes.
    # Checked before it is kept; the broker reloads it (or reads it at its
    # next start).
    if ! grep -q '^name = "reapd-lmk"' /etc/reapd/policy.toml; then
        cp /etc/reapd/policy.toml /etc/reapd/policy.toml.before-lmk
        # Pinned to the uid sysusers gave it: the grant then needs no name
        # lookup inside the broker's sandbox.
        sed "s/^caller.users = \[\"reapd-lmk\"\]/caller.uids = [$(id -u reapd-lmk)]/" systemd/lmk-policy.toml >>/etc/reapd/policy.toml
        if ! /usr/sbin/reapd check-policy /etc/reapd/policy.toml; then
            mv /etc/reapd/policy.toml.before-lmk /etc/reapd/policy.toml
            echo "the reapd-lmk grant does not fit /etc/reapd/policy.toml; add it by hand (docs/policy.md)" >&2
            exit 1
        fi
        rm -f /etc/reapd/policy.toml.before-lmk
    fi
    echo "installed /usr/bin/reapd-lmk and /etc/reapd/lmk.toml (docs/lmk.md)"
    if [[ -d /run/systemd/system ]]; then
        install -D -m 0644 systemd/reapd-lmk.service /etc/systemd/system/reapd-lmk.service
        systemctl daemon-reload
        # The broker rereads its policy on SIGHUP (or at its next start).
        systemctl kill -s HUP --kill-whom=main reapd.service 2>/dev/null || true
        if [[ $RUN -eq 1 ]]; then
            systemctl enable --now reapd-lmk.service
            echo "reapd-lmk.service is running: journalctl -u reapd-lmk shows one JSON line per kill"
        fi
    elif [[ $RUN -eq 1 ]]; then
        echo "systemd is not PID 1: run the killer yourself, unprivileged, e.g."
        echo "  setpriv --reuid=nobody --regid=nogroup --clear-groups reapd-lmk --config /etc/reapd/lmk.toml"
        echo "(grant its uid instead of the unit in /etc/reapd/policy.toml: caller.users = [\"nobody\"])"
    fi
fi

if [[ ! -d /run/systemd/system && $RUN -eq 1 ]]; then
    echo "systemd is not PID 1: running the broker in the foreground (Ctrl-C stops it)"
    echo "try, from another shell: reapctl caps"
    exec /usr/sbin/reapd
fi
