#!/bin/busybox sh
# SPDX-License-Identifier: GPL-2.0-only
# PID 1 of the reapd kernel harness VM. Runs the checks for the kernel named
# by reapd.mode= on the command line (stock or patched), prints one
# "VMCHECK PASS|FAIL name" line per check and "VMRACE" lines with the race
# counts, then reports the verdict through isa-debug-exit (0 pass, 1 fail).
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
mount -t tmpfs tmp /tmp
mount -t tmpfs run /run
mode=$(sed -n 's/.*reapd\.mode=\([a-z]*\).*/\1/p' /proc/cmdline)
cycles=$(sed -n 's/.*reapd\.cycles=\([0-9]*\).*/\1/p' /proc/cmdline)
: "${cycles:=1000}"
fails=0
pass() { echo "VMCHECK PASS $*"; }
fail() { echo "VMCHECK FAIL $*"; fails=$((fails + 1)); }
echo "VMINFO kernel $(uname -r) mode=$mode uptime=$(cut -d' ' -f1 /proc/uptime)"

# 1. the selftest
/tests/mrelease_test >/tmp/selftest.log 2>&1
rc=$?
sed 's/^/  selftest| /' /tmp/selftest.log
if [ "$mode" = patched ]; then
	if [ $rc -eq 0 ] && grep -q '^# Totals: pass:10 fail:0 xfail:0 xpass:0 skip:0 error:0' /tmp/selftest.log; then
		pass "selftest: mrelease_test, 10 passed, 0 skipped"
	else
		fail "selftest: mrelease_test exit $rc: $(grep -E '^not ok|Totals|Bail' /tmp/selftest.log | tr '\n' ' ')"
	fi
else
	if [ $rc -eq 0 ] && grep -q 'SKIP PROCESS_MRELEASE_REAP_KILL not supported' /tmp/selftest.log &&
		grep -q '^# Totals: pass:1 fail:0 xfail:0 xpass:0 skip:1 error:0' /tmp/selftest.log; then
		pass "selftest: mrelease_test passes, REAP_KILL tests skip cleanly without the flag"
	else
		fail "selftest: mrelease_test exit $rc: $(grep -E '^not ok|Totals|Bail' /tmp/selftest.log | tr '\n' ' ')"
	fi
fi

# 2. the broker, end to end over its gRPC socket
R=/opt/reapd
S=/run/reapd/grpc.sock
if [ -x $R/reapd ]; then
	mkdir -p /run/reapd
	RUST_LOG=info $R/reapd --grpc-socket $S >/tmp/reapd.log 2>&1 &
	bpid=$!
	i=0
	while [ ! -S $S ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i + 1)); done
	if [ ! -S $S ]; then
		fail "broker: no socket after 60 s: $(tail -5 /tmp/reapd.log | tr '\n' ' ')"
	else
		$R/reapctl --socket $S caps --json >/tmp/caps.json 2>/tmp/caps.err
		rc=$?
		sed 's/^/  caps| /' /tmp/caps.json /tmp/caps.err
		flat=$(tr -d ' \n' </tmp/caps.json)
		if [ "$mode" = patched ]; then want_flag=true want_path=reap_kill
		else want_flag=false want_path=kill_then_mrelease; fi
		case "$flat" in
		*\"reap_kill_flag\":$want_flag*\"kill_path\":\"$want_path\"* | *\"kill_path\":\"$want_path\"*\"reap_kill_flag\":$want_flag*)
			pass "broker: GetCapabilities reports reap_kill_flag=$want_flag kill_path=$want_path" ;;
		*) fail "broker: GetCapabilities (exit $rc) does not report reap_kill_flag=$want_flag kill_path=$want_path" ;;
		esac
		rm -f /tmp/hold.ready
		/tests/mrelease_race hold 64 /tmp/hold.ready &
		vpid=$!
		i=0
		while [ ! -f /tmp/hold.ready ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
		$R/reapctl --socket $S kill $vpid --wait 5000 --json >/tmp/kill.json 2>/tmp/kill.err
		rc=$?
		sed 's/^/  kill| /' /tmp/kill.json /tmp/kill.err
		wait $vpid
		vrc=$?
		flat=$(tr -d ' \n' </tmp/kill.json)
		case "$flat" in
		*\"outcome\":\"reaped\"*) outcome=reaped ;;
		*\"outcome\":\"exited_before_reap\"*) outcome=exited_before_reap ;;
		*) outcome=other ;;
		esac
		case "$flat" in *\"kill_path\":\"$want_path\"*) path_ok=1 ;; *) path_ok=0 ;; esac
		if [ $rc -eq 0 ] && [ $vrc -eq 137 ] && [ $path_ok = 1 ] &&
			{ [ $outcome = reaped ] || { [ "$mode" = stock ] && [ $outcome = exited_before_reap ]; }; }; then
			pass "broker: KillAndReap of a 64 MiB victim: outcome $outcome via $want_path, victim died by SIGKILL"
		else
			fail "broker: KillAndReap exit $rc, victim status $vrc, outcome $outcome, kill_path ok=$path_ok"
		fi
	fi
	kill $bpid 2>/dev/null
	sed 's/^/  reapd| /' /tmp/reapd.log | tail -20
else
	fail "broker: /opt/reapd/reapd missing from the initramfs"
fi

# 3. race counts
if [ "$mode" = patched ]; then modes="reapkill plain yield"; else modes="plain yield"; fi
for m in $modes; do
	line=$(/tests/mrelease_race $m "$cycles" 2>/tmp/race.err)
	rc=$?
	echo "VMRACE $mode $line"
	sed 's/^/  race| /' /tmp/race.err | head -5
	esrch=$(echo "$line" | sed -n 's/.* esrch=\([0-9]*\).*/\1/p')
	other=$(echo "$line" | sed -n 's/.* other=\([0-9]*\).*/\1/p')
	killed=$(echo "$line" | sed -n 's/.* sigkilled=\([0-9]*\).*/\1/p')
	if [ $rc -ne 0 ] || [ -z "$esrch" ] || [ "$killed" != "$cycles" ] || [ "$other" != 0 ]; then
		fail "race $m: did not run cleanly: exit $rc: $line"
	elif [ "$mode" = patched ] && [ "$esrch" != 0 ]; then
		fail "race $m: $esrch ESRCH in $cycles cycles on the patched kernel"
	else
		pass "race $m: $cycles cycles, $esrch ESRCH"
	fi
done

echo "VMINFO boot-ms $(cut -d' ' -f1 /proc/uptime)"
if [ $fails -eq 0 ]; then /tests/vm_exit 0; else /tests/vm_exit 1; fi
echo "VMINFO vm_exit did not stop qemu"
poweroff -f
