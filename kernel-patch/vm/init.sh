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

# 0. SMP: qemu runs with -smp 2; a killer and its victim must really run
# at once (without ACPI the kernel found only the boot CPU)
cpus=$(grep -c '^processor' /proc/cpuinfo)
if [ "$cpus" = 2 ]; then pass "smp: 2 CPUs online"; else fail "smp: $cpus CPUs online, want 2"; fi

# 1. the selftest, as root and as an unprivileged uid (no passwd entry
# needed). The plan is 13 cases either way. As root the three pinned-mm
# cases (a cmdline, a PAGEMAP_SCAN and a process_vm_readv() reader) run:
# they pass on the patched kernel and report the pin as a skip on stock.
# Unprivileged, userfaultfd may not handle kernel faults, so they skip.
PLAN=13
selftest() { # label pass-count skip-count skip-reason command...
	label=$1 npass=$2 nskip=$3 skiptext=$4
	shift 4
	"$@" >/tmp/selftest.log 2>&1
	rc=$?
	sed "s/^/  selftest $label| /" /tmp/selftest.log
	# every skip must be one of the expected kind, with the expected reason
	skips=$(grep -c '^ok [0-9]* # SKIP ' /tmp/selftest.log)
	wrong=$(grep '^ok [0-9]* # SKIP ' /tmp/selftest.log | grep -vc -e "SKIP pinned_mm[a-z_]*: $skiptext")
	if [ $rc -eq 0 ] && grep -q "^1\.\.$PLAN\$" /tmp/selftest.log &&
		grep -q "^# Totals: pass:$npass fail:0 xfail:0 xpass:0 skip:$nskip error:0\$" /tmp/selftest.log &&
		[ "$skips" = "$nskip" ] && [ "$wrong" = 0 ]; then
		pass "selftest $label: mrelease_test plan 1..$PLAN, pass:$npass skip:$nskip${skiptext:+ (pinned_mm*: $skiptext)}"
	else
		fail "selftest $label: mrelease_test exit $rc: $(grep -E '^not ok|Totals|Bail|SKIP' /tmp/selftest.log | tr '\n' ' ')"
	fi
}
if [ "$mode" = patched ]; then
	selftest root 13 0 "" /tests/mrelease_test
else
	selftest root 10 3 "a stalled reader pinned the memory" /tests/mrelease_test
fi
selftest uid61000 10 3 "userfaultfd" /tests/mrelease_bench runas 61000 /tests/mrelease_test

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
		# The series adds no UAPI: the broker must find no kill flag on
		# either kernel and use the two-call path.
		want_flag=false want_path=kill_then_mrelease
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
			{ [ $outcome = reaped ] || [ $outcome = exited_before_reap ]; }; then
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

# 3. memory returned with a pinning reader, non-parent killer (mrelease_bench):
# a 32 MiB victim (filling more is slow under TCG)
runs=$(sed -n 's/.*reapd\.runs=\([0-9]*\).*/\1/p' /proc/cmdline)
: "${runs:=5}"
for r in none mem cmdline environ pagemap pagemap_scan vm_readv; do
	line=$(/tests/mrelease_bench pinned "$runs" 32 $r 2>/tmp/bench.err | tee /tmp/bench.out | grep '^PINNEDSUM')
	rc=$?
	sed 's/^/  bench| /' /tmp/bench.out /tmp/bench.err | head -12
	echo "VMBENCH $mode $line"
	freed=$(echo "$line" | sed -n 's/.* freed_all=\([0-9]*\).*/\1/p')
	if [ $r = vm_readv ] && echo "$line" | grep -q unsupported; then
		pass "pinned vm_readv: process_vm_readv not built in (CONFIG_CROSS_MEMORY_ATTACH)"
	elif [ $rc -ne 0 ] || [ -z "$freed" ]; then
		fail "pinned $r: did not run: $(tail -1 /tmp/bench.err)"
	elif [ $r = none ] || [ "$mode" = patched ]; then
		# No reader, or the fix: freed while the reader is stalled, every run
		if [ "$freed" = "$runs" ]; then pass "pinned $r: 32 MiB freed in $freed/$runs runs"
		else fail "pinned $r: memory freed in only $freed/$runs runs"; fi
	else
		# Stock: the reproducer must reproduce the pin, or it proves nothing
		if [ "$freed" = 0 ]; then pass "pinned $r: stock kept the memory pinned in $runs/$runs runs"
		else fail "pinned $r: stock freed the memory in $freed/$runs runs: the reproducer did not reproduce"; fi
	fi
done

# 4. robust futexes: reaping before the exit path destroys the robust list
for seq in kill reap; do
	line=$(/tests/mrelease_bench robust 20 $seq 2>/tmp/bench.err)
	rc=$?
	echo "VMBENCH $mode $line"
	lost=$(echo "$line" | sed -n 's/.* lost=\([0-9]*\).*/\1/p')
	if [ $rc -ne 0 ] || [ -z "$lost" ]; then
		fail "robust $seq: did not run: $(tail -1 /tmp/bench.err)"
	elif [ $seq = kill ] && [ "$lost" != 0 ]; then
		fail "robust kill: $lost/20 robust mutexes lost without any reap"
	else
		pass "robust $seq: $lost/20 owner-died marks lost"
	fi
done

# 5. race counts (return codes only, for comparison with earlier versions)
for m in plain yield; do
	line=$(/tests/mrelease_race $m "$cycles" 2>/tmp/race.err)
	rc=$?
	echo "VMRACE $mode $line"
	sed 's/^/  race| /' /tmp/race.err | head -5
	esrch=$(echo "$line" | sed -n 's/.* esrch=\([0-9]*\).*/\1/p')
	other=$(echo "$line" | sed -n 's/.* other=\([0-9]*\).*/\1/p')
	killed=$(echo "$line" | sed -n 's/.* sigkilled=\([0-9]*\).*/\1/p')
	if [ $rc -ne 0 ] || [ -z "$esrch" ] || [ "$killed" != "$cycles" ] || [ "$other" != 0 ]; then
		fail "race $m: did not run cleanly: exit $rc: $line"
	else
		pass "race $m: $cycles cycles, $esrch ESRCH"
	fi
done

# 6. the debug kernel (run.sh --debug): the exec/exit race stress of the
# readers, then no lockdep, KASAN, BUG or WARN splat in the whole boot, with
# lockdep and KASAN shown to be live (a splat turns debug_locks off)
if grep -q 'reapd\.debug=1' /proc/cmdline; then
	iters=$(sed -n 's/.*reapd\.stress=\([0-9]*\).*/\1/p' /proc/cmdline)
	: "${iters:=300}"
	secs=$(sed -n 's/.*reapd\.stress_secs=\([0-9]*\).*/\1/p' /proc/cmdline)
	: "${secs:=600}"
	/tests/exec_race stress "$iters" "$secs" >/tmp/race.out 2>/tmp/race.err
	rc=$?
	sed 's/^/  execrace| /' /tmp/race.out /tmp/race.err | head -20
	sed -n 's/^EXECRACE/VMSTRESS &/p' /tmp/race.out
	sum=$(grep '^EXECRACESUM' /tmp/race.out)
	if [ $rc -eq 0 ] && [ -n "$sum" ]; then
		pass "exec race: readers of mem, environ, cmdline, pagemap, PAGEMAP_SCAN, process_vm_readv racing exec/exit/kill+mrelease: ${sum#EXECRACESUM }"
	else
		fail "exec race: exit $rc: ${sum:-$(tail -1 /tmp/race.err)}"
	fi
	live=
	dmesg | grep -q 'KernelAddressSanitizer initialized' && live=kasan
	grep -Eq '^ *debug_locks: *1$' /proc/lockdep_stats 2>/dev/null && live="$live lockdep"
	if [ "$live" = "kasan lockdep" ]; then
		pass "debug kernel: KASAN initialized, lockdep live (debug_locks 1 in /proc/lockdep_stats)"
	else
		fail "debug kernel: not live: got '$live' of 'kasan lockdep'"
	fi
	splats=$(dmesg | grep -E 'BUG:|WARNING:|KASAN|possible circular|possible recursive|inconsistent lock|suspicious RCU|INFO: task .* blocked|sleeping function called' | head -5)
	if [ -z "$splats" ]; then
		pass "debug kernel: no lockdep/KASAN/BUG/WARN splat in dmesg"
	else
		fail "debug kernel: splat: $(echo "$splats" | tr '\n' ' ')"
	fi
	# the whole kernel log, for run.sh to keep (DMESG-prefixed)
	grep -E '^ *(lock-classes|direct dependencies|dependency chains|debug_locks):' /proc/lockdep_stats | sed 's/^ */VMINFO lockdep /'
	dmesg | sed 's/^/DMESG /'
fi

echo "VMINFO boot-ms $(cut -d' ' -f1 /proc/uptime)"
if [ $fails -eq 0 ]; then /tests/vm_exit 0; else /tests/vm_exit 1; fi
echo "VMINFO vm_exit did not stop qemu"
poweroff -f
