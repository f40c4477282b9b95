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
# The broker that did the kill: under load the hog's set-up can outlast the
# 30 s idle exit, and the kill then starts a new broker (activation, not a
# restart). It must live on after the kill.
PID=$(main_pid)
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
# The broker swaps the policy in before it logs "policy reloaded", and
# journald takes the line a moment later: wait for it (at most 10 s).
for _ in $(seq 50); do
    journalctl -u reapd.service -b -o cat | grep -q 'policy reloaded' && break
    sleep 0.2
done
check "the same broker reloaded (journal, MainPID)" sh -c "journalctl -u reapd.service -b -o cat | grep -q 'policy reloaded' && [ \"\$(systemctl show -P MainPID reapd.service)\" = $PID ]"
info "reload main_pid_before=$PID main_pid_after=$(main_pid) reloaded_lines=$(journalctl -u reapd.service -b -o cat | grep -c 'policy reloaded')"
kill "$VICTIM" 2>/dev/null

info "$(systemd-analyze security reapd.service 2>/dev/null | tail -n1)"
check "exposure <= 1.0" sh -c "systemd-analyze security --threshold=10 reapd.service >/dev/null"

# reapd-lmk installed as scripts/setup.sh --with-lmk installs it (the same
# systemd/install-lmk.sh): a DynamicUser= service without capabilities, run
# as the static user reapd-lmk that the broker's grant names. A 100 MiB hog
# of uid 1000 in user.slice is killed and reaped through the socket-activated
# broker; the kernel's OOM killer never fires.
lmk_journal() { journalctl -u reapd-lmk.service -b --no-pager -o cat; }
OOM_KILLS=$(awk '$1 == "oom_kill" { print $2 }' /proc/vmstat)
# The hog: a scope in user.slice (the grant's cgroup), the process uid 1000.
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

check "install-lmk.sh, as setup.sh --with-lmk runs it" bash /mnt/t/systemd/install-lmk.sh /mnt/t
check "the grant names the killer's user" grep -qx 'caller.users = \["reapd-lmk"\]' /etc/reapd/policy.toml
check "reapd-lmk.service enabled and started" sh -c "systemctl is-enabled --quiet reapd-lmk.service && systemctl is-active --quiet reapd-lmk.service"
# The reload is asynchronous (SIGHUP): wait until the broker answers the
# killer's user with the grant (it resolved the name inside its sandbox).
granted=no
for _ in $(seq 50); do
    if setpriv --reuid=reapd-lmk --regid=reapd-lmk --clear-groups reapctl --json check "$LMK_HOG" >/tmp/lmk-check.out 2>&1 &&
        grep -q '"reapd-lmk"' /tmp/lmk-check.out; then
        granted=yes
        break
    fi
    sleep 0.2
done
check "the broker grants user reapd-lmk the hog (rule reapd-lmk)" sh -c "[ $granted = yes ]"
[ $granted = yes ] || {
    sed 's/^/VMINFO lmk check: /' /tmp/lmk-check.out
    journalctl -u reapd.service -b -o cat | grep 'policy reload' | sed 's/^/VMINFO lmk broker: /'
}
check "nothing killed with the shipped thresholds" sh -c "kill -0 $LMK_HOG && ! journalctl -u reapd-lmk.service -b -o cat | grep -q '\"event\":\"kill\"'"

# Now a config that kills at once (available memory is always below 99 %)
# and a run that exits after one kill.
printf '[trigger]\nmem-available-percent = 99\n' >/etc/reapd/lmk.toml
mkdir -p /run/systemd/system/reapd-lmk.service.d
printf '[Service]\nExecStart=\nExecStart=/usr/bin/reapd-lmk --config /etc/reapd/lmk.toml --max-kills 1\nRestart=no\n' \
    >/run/systemd/system/reapd-lmk.service.d/once.conf
systemctl daemon-reload
systemctl restart reapd-lmk.service
for _ in $(seq 150); do
    systemctl is-active --quiet reapd-lmk.service || break
    sleep 0.2
done
lmk_journal | tail -n 6 | sed 's/^/VMINFO lmk: /'
check "reapd-lmk exited after its kill" sh -c "! systemctl is-active --quiet reapd-lmk.service && [ \"\$(systemctl show -P Result reapd-lmk.service)\" = success ] && [ \"\$(systemctl show -P ExecMainStatus reapd-lmk.service)\" = 0 ]"
lmk_journal | grep '"event":"kill"' >/tmp/lmk-kill.json
check "reapd-lmk killed and reaped the other user's hog under its grant" sh -c \
    "grep '\"pid\":$LMK_HOG,' /tmp/lmk-kill.json | grep '\"rule\":\"reapd-lmk\"' | grep -Eq '\"outcome\":\"(reaped|exited_before_reap)\"'"
check "the kill released memory" sh -c "grep -Eq '\"bytes_released\":[1-9][0-9]{6,}' /tmp/lmk-kill.json"
for _ in $(seq 50); do kill -0 "$LMK_HOG" 2>/dev/null || break; sleep 0.1; done
check "the lmk hog is gone" sh -c "! kill -0 $LMK_HOG 2>/dev/null"
check "the kernel's OOM killer never fired" sh -c "[ \"\$(awk '\$1 == \"oom_kill\" { print \$2 }' /proc/vmstat)\" = $OOM_KILLS ]"
check "reapd-lmk ran as DynamicUser= user reapd-lmk with no capabilities" sh -c \
    "systemctl show -P DynamicUser reapd-lmk.service | grep -qx yes && systemctl show -P User reapd-lmk.service | grep -qx reapd-lmk && [ -z \"\$(systemctl show -P CapabilityBoundingSet reapd-lmk.service)\" ] && systemctl show -P NoNewPrivileges reapd-lmk.service | grep -qx yes"
check "the broker survived the killer (no restart)" sh -c "systemctl is-active --quiet reapd.service && [ \"\$(systemctl show -P NRestarts reapd.service)\" = 0 ]"
info "$(systemd-analyze security reapd-lmk.service 2>/dev/null | tail -n1)"
check "reapd-lmk exposure <= 1.0" sh -c "systemd-analyze security --threshold=10 reapd-lmk.service >/dev/null"
rm -rf /run/systemd/system/reapd-lmk.service.d
# Its broker connection would keep the broker from idling out below.
systemctl stop reapd-lmk.service lmk-hog.scope 2>/dev/null

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
