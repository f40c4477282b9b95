#!/bin/bash
# SPDX-License-Identifier: MIT OR Apache-2.0
# Installs reapd-lmk next to an installed broker, as root:
#
#   systemd/install-lmk.sh BIN_DIR [--no-run]
#
# BIN_DIR holds the built reapd-lmk. scripts/setup.sh --with-lmk runs this
# after installing the broker; the systemd VM check (systemd/vm/check.sh)
# runs the same file inside Debian 12, so what setup.sh does is what the VM
# proves. It installs /usr/bin/reapd-lmk, /etc/reapd/lmk.toml (kept if it
# exists), the killer's system user reapd-lmk (sysusers.d/reapd-lmk.conf),
# and appends the grant (lmk-policy.toml: by user name) to
# /etc/reapd/policy.toml once, checked with `reapd check-policy` first (a
# grant that does not fit is taken back and the script fails). Under
# systemd as PID 1 it installs reapd-lmk.service, makes a running broker
# reload the policy, and (without --no-run) enables and starts the killer.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
BIN_DIR=${1:?usage: install-lmk.sh BIN_DIR [--no-run]}
RUN=1
[[ "${2:-}" == --no-run ]] && RUN=0
POLICY=/etc/reapd/policy.toml

install -D -m 0755 "$BIN_DIR/reapd-lmk" /usr/bin/reapd-lmk
[[ -e /etc/reapd/lmk.toml ]] || install -D -m 0644 "$HERE/lmk.toml" /etc/reapd/lmk.toml
/usr/bin/reapd-lmk --check --config /etc/reapd/lmk.toml >/dev/null

# The killer's user: reapd-lmk.service has DynamicUser=yes and User=reapd-lmk,
# and systemd runs a DynamicUser= unit as the static user of that name when
# one exists. A fixed account is what the broker's grant can name: a dynamic
# uid is picked at each start and known only while the unit runs.
install -D -m 0644 "$HERE/sysusers.d/reapd-lmk.conf" /etc/sysusers.d/reapd-lmk.conf
systemd-sysusers /etc/sysusers.d/reapd-lmk.conf 2>/dev/null ||
    id reapd-lmk >/dev/null 2>&1 ||
    useradd --system --no-create-home --home-dir / --shell /usr/sbin/nologin reapd-lmk
id reapd-lmk >/dev/null

# The grant, once: the killer may list and kill regular users' processes in
# their login sessions. By name, as an admin writes it; the broker resolves
# the name when it loads the policy.
[[ -e $POLICY ]] || install -D -m 0644 "$HERE/policy.toml" "$POLICY"
if ! grep -q '^name = "reapd-lmk"' "$POLICY"; then
    cp -p "$POLICY" "$POLICY.before-lmk"
    { echo; cat "$HERE/lmk-policy.toml"; } >>"$POLICY"
    if ! /usr/sbin/reapd check-policy "$POLICY"; then
        mv "$POLICY.before-lmk" "$POLICY"
        echo "install-lmk.sh: the reapd-lmk grant does not fit $POLICY; add it by hand (docs/policy.md, example 4)" >&2
        exit 1
    fi
    rm -f "$POLICY.before-lmk"
fi
echo "installed /usr/bin/reapd-lmk, /etc/reapd/lmk.toml and the reapd-lmk grant in $POLICY (docs/lmk.md)"

if [[ ! -d /run/systemd/system ]]; then
    if [[ $RUN -eq 1 ]]; then
        echo "systemd is not PID 1: run the killer yourself as the granted user, e.g."
        echo "  setpriv --reuid=reapd-lmk --regid=reapd-lmk --clear-groups reapd-lmk --config /etc/reapd/lmk.toml"
    fi
    exit 0
fi
install -D -m 0644 "$HERE/reapd-lmk.service" /etc/systemd/system/reapd-lmk.service
systemctl daemon-reload
# A running broker rereads the policy on reload (SIGHUP, asynchronous: the
# journal says "policy reloaded"); a stopped one reads it when it starts.
systemctl try-reload-or-restart reapd.service
if [[ $RUN -eq 1 ]]; then
    systemctl enable --now reapd-lmk.service
    echo "reapd-lmk.service is running: journalctl -u reapd-lmk shows one JSON line per kill"
fi
