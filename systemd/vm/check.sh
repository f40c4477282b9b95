#!/bin/sh
# SPDX-License-Identifier: MIT OR Apache-2.0
# Runs inside the VM (as root, under systemd as PID 1) from the per-run disk
# mounted at /mnt/t. Prints "VMTEST PASS|FAIL name[: why]" per check and
# "VMINFO key=value" measurements on the serial console; run.sh counts them.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
export SYSTEMD_PAGER= SYSTEMD_COLORS=0
OUT=/tmp/check.out

pass() { echo "VMTEST PASS $1"; }
fail() { echo "VMTEST FAIL $1: $(tail -n 5 "$OUT" 2>/dev/null | tr '\n' ' ')"; }
info() { echo "VMINFO $*"; }
# check NAME COMMAND...: pass iff COMMAND succeeds.
check() {
    name=$1
    shift
    if "$@" >"$OUT" 2>&1; then pass "$name"; else fail "$name"; fi
}
now_ms() { echo $(( $(date +%s%N) / 1000000 )); }
main_pid() { systemctl show -P MainPID reapd.service; }
status_field() { awk -v k="$2:" '$1 == k { print $2 }' "/proc/$1/status"; }

check "systemd is PID 1" grep -qx systemd /proc/1/comm
info "kernel=$(uname -r) systemd=$(systemctl --version | head -n1 | cut -d' ' -f2)"

check "dpkg -i reapd.deb" dpkg -i /mnt/t/reapd.deb
check "reapd system user exists (sysusers)" id reapd
check "reapd.socket and reapd-varlink.socket are active" systemctl is-active reapd.socket reapd-varlink.socket
check "gRPC socket listening" test -S /run/reapd/grpc.sock
check "varlink socket listening" test -S /run/reapd/io.reapd.Reaper
check "service not started before first use" sh -c '! systemctl is-active --quiet reapd.service'

t0=$(now_ms)
check "first reapctl caps activates the service" reapctl --json caps
t1=$(now_ms)
info "activation_to_first_reply_ms=$((t1 - t0))"
cp "$OUT" /tmp/caps.json
t0=$(now_ms)
reapctl caps >/dev/null 2>&1
info "warm_caps_reply_ms=$(( $(now_ms) - t0 ))"
check "service active after first call" systemctl is-active reapd.service
if ! systemctl is-active --quiet reapd.service; then
    systemctl status reapd.service --no-pager -l 2>&1 | sed 's/^/VMINFO status: /'
    journalctl -b --no-pager -o cat -u reapd.service 2>&1 | tail -n 30 | sed 's/^/VMINFO journal: /'
fi
check "caps reports CAP_KILL held" grep -q '"has_cap_kill": *true' /tmp/caps.json

PID=$(main_pid)
UID_REAPD=$(id -u reapd)
check "service runs as reapd" sh -c "[ \"$(status_field "$PID" Uid)\" = $UID_REAPD ]"
check "only CAP_KILL effective" sh -c "[ \"$(status_field "$PID" CapEff)\" = 0000000000000020 ]"
check "only CAP_KILL permitted" sh -c "[ \"$(status_field "$PID" CapPrm)\" = 0000000000000020 ]"
check "only CAP_KILL in the bounding set" sh -c "[ \"$(status_field "$PID" CapBnd)\" = 0000000000000020 ]"
check "seccomp filter on, no_new_privs" sh -c "[ \"$(status_field "$PID" Seccomp)\" = 2 ] && [ \"$(status_field "$PID" NoNewPrivs)\" = 1 ]"
check "oom_score_adj is -1000" sh -c "[ \"\$(cat /proc/$PID/oom_score_adj)\" = -1000 ]"
check "the shipped /etc/reapd/policy.toml is the one in force" sh -c "test -f /etc/reapd/policy.toml && journalctl -u reapd.service -o verbose | grep -q 'REAPD_ORIGIN=file'"
check "systemctl status shows the sd_notify status" sh -c "systemctl status reapd.service | grep -q 'Status: \"serving; CAP_KILL held'"
info "idle_rss_kb=$(status_field "$PID" VmRSS) locked_kb=$(status_field "$PID" VmLck)"

# Another user's memory hog: tail (uid 61001) keeps 100 MiB of newline-free
# input in memory while it waits for an EOF that the sleeping writer holds off.
mkfifo -m 0644 /tmp/hog.fifo
setpriv --reuid=61001 --regid=61001 --clear-groups sh -c 'echo $$ >/tmp/hog.pid; exec tail </tmp/hog.fifo' &
{ head -c 100M /dev/zero; exec sleep 600; } >/tmp/hog.fifo &
WRITER=$!
HOG=""
for _ in $(seq 150); do
    HOG=$(cat /tmp/hog.pid 2>/dev/null)
    if [ -n "$HOG" ] && [ "$(status_field "$HOG" VmRSS 2>/dev/null)" -gt 90000 ] 2>/dev/null; then break; fi
    sleep 0.2
done
info "hog pid=$HOG rss_kb=$(status_field "$HOG" VmRSS 2>/dev/null)"
check "kill-and-reap of another user's hog under full hardening" reapctl kill --wait 5000 "$HOG"
cp "$OUT" /tmp/kill.out
sed 's/^/VMINFO kill: /' /tmp/kill.out
check "reap released the memory" grep -Eq 'released: [1-9][0-9]*\.[0-9] MiB|exited before reap' /tmp/kill.out
check "hog is gone" sh -c "! kill -0 $HOG 2>/dev/null"
kill "$WRITER" 2>/dev/null
check "broker survived (no SIGSYS, no restart)" sh -c "systemctl is-active --quiet reapd.service && [ \"$(main_pid)\" = $PID ] && [ \"$(systemctl show -P NRestarts reapd.service)\" = 0 ]"
check "watchdog armed, never fired" sh -c "[ \"$(systemctl show -P WatchdogUSec reapd.service)\" = 30s ] && ! journalctl -b -u reapd.service | grep -qi 'watchdog timeout'"
check "no SIGSYS in the journal" sh -c "! journalctl -u reapd.service -b | grep -q SIGSYS"
check "journal entries carry structured fields" sh -c "journalctl -u reapd.service -b -o json | grep -q '\"REAPD_TARGET_PID\"'"
check "a cross-uid caller is refused by policy" sh -c "! setpriv --reuid=61002 --regid=61002 --clear-groups reapctl kill 1"

# systemctl reload: a rule added to the policy file is in force after a
# reload (ExecReload sends SIGHUP; asynchronous on systemd 252, so wait for
# the decision itself, at most 10 s). The calls just before keep the broker
# from idling out, and the MainPID check shows that the same broker reloaded
# rather than a new one that read the file at start.
as_61002() { setpriv --reuid=61002 --regid=61002 --clear-groups "$@"; }
setpriv --reuid=61001 --regid=61001 --clear-groups sleep 600 &
VICTIM=$!
check "before reload: uid 61002 may not kill uid 61001's process" sh -c "! setpriv --reuid=61002 --regid=61002 --clear-groups reapctl check $VICTIM"
PID=$(main_pid)
cat >>/etc/reapd/policy.toml <<'RULE'

[[rule]]
name = "vm-reload-test"
actions = ["kill-and-reap", "check"]
caller.uids = ["61002"]
target.uids = ["61001"]
RULE
check "systemctl reload reapd" systemctl reload reapd.service
reloaded=no
for _ in $(seq 50); do
    if as_61002 reapctl --json check "$VICTIM" >/tmp/reload.out 2>&1; then reloaded=yes; break; fi
    sleep 0.2
done
check "after reload: the new rule allows it" sh -c "[ $reloaded = yes ] && grep -q '\"vm-reload-test\"' /tmp/reload.out"
check "the same broker reloaded (journal, MainPID)" sh -c "journalctl -u reapd.service -b -o cat | grep -q 'policy reloaded' && [ \"\$(systemctl show -P MainPID reapd.service)\" = $PID ]"
kill "$VICTIM" 2>/dev/null

info "$(systemd-analyze security reapd.service 2>/dev/null | tail -n1)"
check "exposure <= 1.0" sh -c "systemd-analyze security --threshold=10 reapd.service >/dev/null"

# reapd-lmk as a DynamicUser= service without capabilities: a 100 MiB hog
# of uid 1000 in user.slice is killed and reaped through the broker under
# the grant setup.sh --with-lmk installs (by user: kernel 6.1 has no
# SO_PEERPIDFD, so the broker believes no caller cgroup and a unit grant
# would never match). It kills at once (available memory
# is always below 99 %) and exits after one kill.
if [ -f /mnt/t/reapd-lmk ]; then
    install -m 0755 /mnt/t/reapd-lmk /usr/bin/reapd-lmk
    install -m 0644 /mnt/t/reapd-lmk.service /etc/systemd/system/reapd-lmk.service
    install -m 0644 /mnt/t/reapd-lmk.conf /etc/sysusers.d/reapd-lmk.conf
    systemd-sysusers /etc/sysusers.d/reapd-lmk.conf
    # As setup.sh does: the grant pinned to the user's uid.
    sed "s/^caller.users = \[\"reapd-lmk\"\]/caller.uids = [$(id -u reapd-lmk)]/" /mnt/t/lmk-policy.toml >>/etc/reapd/policy.toml
    check "the lmk grant is a valid policy" reapd check-policy /etc/reapd/policy.toml
    systemctl kill -s HUP --kill-whom=main reapd.service
    printf '[trigger]\nmem-available-percent = 99\n' >/etc/reapd/lmk.toml
    mkdir -p /run/systemd/system/reapd-lmk.service.d
    printf '[Service]\nExecStart=\nExecStart=/usr/bin/reapd-lmk --config /etc/reapd/lmk.toml --max-kills 1\nRestart=no\n' \
        >/run/systemd/system/reapd-lmk.service.d/once.conf
    systemctl daemon-reload
    # A scope in user.slice (root's part of the tree: the grant's cgroup),
    # the hog itself uid 1000.
    systemd-run --quiet --scope --slice=user.slice --unit=lmk-hog \
        setpriv --reuid=1000 --regid=1000 --clear-groups \
        sh -c '{ head -c 100M /dev/zero; exec sleep 600; } | tail' >/tmp/lmk-hog.out 2>&1 &
    LMK_HOG=""
    for _ in $(seq 150); do
        for p in $(cat /sys/fs/cgroup/user.slice/lmk-hog.scope/cgroup.procs 2>/dev/null); do
            [ "$(cat /proc/$p/comm 2>/dev/null)" = tail ] && LMK_HOG=$p
        done
        if [ -n "$LMK_HOG" ] && [ "$(status_field "$LMK_HOG" VmRSS 2>/dev/null)" -gt 90000 ] 2>/dev/null; then break; fi
        sleep 0.2
    done
    info "lmk hog pid=$LMK_HOG rss_kb=$(status_field "$LMK_HOG" VmRSS 2>/dev/null) $(head -c 300 /tmp/lmk-hog.out)"
    systemctl start reapd-lmk.service
    for _ in $(seq 150); do
        systemctl is-active --quiet reapd-lmk.service || break
        sleep 0.2
    done
    journalctl -u reapd-lmk.service -b --no-pager -o cat | tail -n 6 | sed 's/^/VMINFO lmk: /'
    if systemctl is-active --quiet reapd-lmk.service; then
        # Why it found nothing to kill: the victim and the broker's view.
        grep -E '^(Uid|Gid)' "/proc/$LMK_HOG/status" | sed 's/^/VMINFO lmk hog: /'
        sed 's/^/VMINFO lmk hog cgroup: /' "/proc/$LMK_HOG/cgroup"
        journalctl -u reapd.service -b --no-pager -o cat | tail -n 12 | sed 's/^/VMINFO lmk broker: /'
    fi
    check "reapd-lmk exited after its kill" sh -c "! systemctl is-active --quiet reapd-lmk.service && [ \"\$(systemctl show -P Result reapd-lmk.service)\" = success ] && [ \"\$(systemctl show -P ExecMainStatus reapd-lmk.service)\" = 0 ]"
    check "reapd-lmk killed the other user's hog and logged it" sh -c "journalctl -u reapd-lmk.service -b -o cat | grep '\"event\":\"kill\"' | grep '\"rule\":\"reapd-lmk\"' | grep -q '\"pid\":$LMK_HOG,'"
    for _ in $(seq 50); do kill -0 "$LMK_HOG" 2>/dev/null || break; sleep 0.1; done
    check "the lmk hog is gone" sh -c "! kill -0 $LMK_HOG 2>/dev/null"
    check "reapd-lmk ran as DynamicUser= reapd-lmk with no capabilities" sh -c "systemctl show -P DynamicUser reapd-lmk.service | grep -q yes && [ -z \"\$(systemctl show -P CapabilityBoundingSet reapd-lmk.service)\" ]"
    info "$(systemd-analyze security reapd-lmk.service 2>/dev/null | tail -n1)"
    # Its broker connection would keep the broker from idling out below.
    systemctl stop reapd-lmk.service lmk-hog.scope 2>/dev/null
fi

# Idle exit: restart with a 3 s idle time, let it idle out, call again.
mkdir -p /run/systemd/system/reapd.service.d
printf '[Service]\nExecStart=\nExecStart=/usr/sbin/reapd --idle-exit-secs=3\n' >/run/systemd/system/reapd.service.d/idle.conf
systemctl daemon-reload
systemctl stop reapd.service
reapctl caps >/dev/null 2>&1
for _ in $(seq 60); do systemctl is-active --quiet reapd.service || break; sleep 0.5; done
check "service exits when idle" sh -c '! systemctl is-active --quiet reapd.service'
check "socket still listening after idle exit" systemctl is-active reapd.socket
t0=$(now_ms)
check "next call starts it again" reapctl caps
info "reactivation_reply_ms=$(( $(now_ms) - t0 ))"
rm -rf /run/systemd/system/reapd.service.d
journalctl -u reapd.service -b --no-pager -o cat | tail -n 8 | sed 's/^/VMINFO journal: /'
echo "VMTEST DONE"
