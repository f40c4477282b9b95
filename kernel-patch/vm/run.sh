#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0-only
# reapd kernel series harness: fetch Debian's linux-source-7.3, apply the
# series, build a stock and a patched tinyconfig kernel, boot both under qemu
# (TCG, 2 vCPUs) with an initramfs holding the selftest, a race counter and
# the broker, and report one line per check and `N passed, N failed`.
#
#   bash kernel-patch/vm/run.sh [--keep-cache] [--cycles N] [--debug|--debug-only|--prefixes]
#
# --debug also builds the patched series with config/debug.config (lockdep,
# KASAN, DEBUG_VM, DEBUG_ATOMIC_SLEEP, audit, Yama) and boots it with the
# patched checks plus the exec/exit race stress of the readers (exec_race);
# a kernel splat fails it, and its whole dmesg is kept in
# $CACHE/dmesg-debug.txt. Heavy (a KASAN+lockdep build and a slow boot
# under TCG): not part of scripts/test.sh. --debug-only builds and boots
# the debug kernel alone (no stock/patched comparison).
#
# --prefixes proves that each patch builds: on a copy of the stock tree it
# links a bzImage with `make W=1` (the baseline), then applies the series
# one patch at a time and after each links the bzImage again with W=1,
# incrementally (only what the patch touches is recompiled), and compiles
# the selftest with the kselftest mm flags. Any warning the baseline does
# not have, or a failed build, fails that prefix. No VM is booted.
#
# Environment:
#   REAPD_KERNEL_CACHE  work directory (default /var/cache/reapd-kernel/harness)
#   REAPD_KERNEL_KEEP=1 same as --keep-cache: reuse kernels already built
#                       from the same series and config (CI runs cold)
#   REAPD_BIN_DIR       directory with prebuilt reapd and reapctl (default:
#                       build them with cargo at the repository root)
#   RACE_CYCLES         kill+reap cycles per race count (default 1000)
#   BENCH_RUNS          runs per pinned-reader measurement (default 5)
#   STRESS_ITERATIONS   exec_race iterations on the debug kernel (default 300),
#   STRESS_SECS         and no new one after this many seconds (default 600)
#   QEMU_TIMEOUT        seconds per boot (default 900; the debug boot 3600)
#   JOBS                make -j (default: nproc)
set -uo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
KP=$(dirname "$HERE")
REPO=$(dirname "$KP")
CACHE=${REAPD_KERNEL_CACHE:-/var/cache/reapd-kernel/harness}
KEEP=${REAPD_KERNEL_KEEP:-0}
CYCLES=${RACE_CYCLES:-1000}
RUNS=${BENCH_RUNS:-5}
JOBS=${JOBS:-$(nproc)}
DEBUG=0
NORMAL=1	# build and boot the stock and patched kernels
PREFIXES=0
PKG=linux-source-7.3
QEMU_TIMEOUT=${QEMU_TIMEOUT:-900}
STRESS=${STRESS_ITERATIONS:-300}
STRESS_SECS=${STRESS_SECS:-600}

while [[ $# -gt 0 ]]; do
	case $1 in
	--keep-cache) KEEP=1 ;;
	--cycles) CYCLES=$2; shift ;;
	--debug) DEBUG=1 ;;
	--debug-only) DEBUG=1 NORMAL=0 ;;
	--prefixes) PREFIXES=1 NORMAL=0 ;;
	*) echo "usage: $0 [--keep-cache] [--cycles N] [--debug|--debug-only|--prefixes]" >&2; exit 2 ;;
	esac
	shift
done

PASSED=0
FAILED=0
pass() { echo "PASS $*"; PASSED=$((PASSED + 1)); }
fail() { echo "FAIL $*"; FAILED=$((FAILED + 1)); }
log() { echo "== $*" >&2; }
finish() {
	echo "$PASSED passed, $FAILED failed"
	[[ $FAILED -eq 0 ]] && exit 0
	exit 1
}
# Stop here: report what has run and one failure for the step that broke.
die() { fail "$1"; finish; }

[[ $(id -u) -eq 0 ]] || die "harness: must run as root (apt-get, uids in the VM)"
mkdir -p "$CACHE"
T0=$(date +%s)

# --- host packages --------------------------------------------------------
log "installing host packages"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >"$CACHE/apt.log" 2>&1 || die "apt-get update (see $CACHE/apt.log)"
apt-get install -y -qq --no-install-recommends \
	qemu-system-x86 build-essential flex bison bc libelf-dev libssl-dev \
	cpio xz-utils busybox-static perl python3 ca-certificates \
	>>"$CACHE/apt.log" 2>&1 || die "apt-get install (see $CACHE/apt.log)"
pass "host: build and qemu packages installed"

# --- the source, through a private apt configuration ----------------------
# A kernel is reused (--keep-cache) only if built from the same inputs.
STAMP_stock=$(cat "$KP"/config/reapd.config | sha256sum | cut -c1-16)
# Only the patches that touch the kernel proper: the cover letter and the
# selftest patch (tools/ only) do not change the bzImage.
KPATCHES=$(ls "$KP"/series/[0-9]*.patch | grep -v -e '/0000-' -e 'selftests')
# The bzImage depends on the diffs, not on the commit messages.
STAMP_patched=$( (sed -s -n '/^diff --git/,$p' $KPATCHES; cat "$KP"/config/reapd.config) | sha256sum | cut -c1-16)
STAMP_debug=$( (echo "$STAMP_patched"; cat "$KP"/config/debug.config) | sha256sum | cut -c1-16)
# The patched source tree (which also holds the selftest) on every patch.
STAMP=$(cat "$KP"/series/[0-9]*.patch | sha256sum | cut -c1-16)
if [[ $KEEP != 1 ]]; then
	log "cold run: clearing $CACHE"
	rm -rf "$CACHE"/apt "$CACHE"/src-* "$CACHE"/build-* "$CACHE"/deb "$CACHE"/*.deb
fi
APTDIR=$CACHE/apt
mkdir -p "$APTDIR"/lists/partial "$APTDIR"/cache/archives/partial "$APTDIR"/etc
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie-backports main" \
	>"$APTDIR/etc/sources.list"
APTOPT=(-o "Dir::Etc::sourcelist=$APTDIR/etc/sources.list" -o "Dir::Etc::sourceparts=/dev/null"
	-o "Dir::State::Lists=$APTDIR/lists" -o "Dir::Cache=$APTDIR/cache"
	-o "APT::Sandbox::User=root")
if [[ ! -f $CACHE/src-stock/Makefile ]]; then
	log "fetching $PKG (private sources.list: trixie-backports)"
	apt-get "${APTOPT[@]}" update -qq >>"$CACHE/apt.log" 2>&1 || die "source: apt-get update of trixie-backports"
	(cd "$CACHE" && apt-get "${APTOPT[@]}" download "$PKG" >>"$CACHE/apt.log" 2>&1) ||
		die "source: apt-get download $PKG"
	rm -rf "$CACHE/deb" && dpkg-deb -x "$CACHE"/${PKG}_*.deb "$CACHE/deb" || die "source: dpkg-deb -x"
	rm -rf "$CACHE/src-stock.tmp" && mkdir -p "$CACHE/src-stock.tmp" &&
		tar -xf "$CACHE"/deb/usr/src/$PKG.tar.xz -C "$CACHE/src-stock.tmp" --strip-components=1 ||
		die "source: unpack $PKG.tar.xz"
	mv "$CACHE/src-stock.tmp" "$CACHE/src-stock"
fi
VER=$(make -s -C "$CACHE/src-stock" kernelversion 2>/dev/null)
pass "source: $PKG ($VER, $(cd "$CACHE" && ls ${PKG}_*.deb 2>/dev/null | sed 's/.*_\(.*\)_all.deb/\1/'))"

# --- apply the series (patch --forward: a reject or an applied hunk fails) --
if [[ ! -f $CACHE/src-patched/.reapd-series-$STAMP ]]; then
	rm -rf "$CACHE/src-patched"
	cp -al "$CACHE/src-stock" "$CACHE/src-patched" || die "series: copy tree"
	for p in $(ls "$KP"/series/[0-9]*.patch | grep -v '/0000-'); do
		if ! out=$(cd "$CACHE/src-patched" && patch -p1 --forward --batch --no-backup-if-mismatch -r - <"$p" 2>&1); then
			echo "$out" | sed 's/^/    /'
			die "series: $(basename "$p") does not apply"
		fi
	done
	touch "$CACHE/src-patched/.reapd-series-$STAMP"
fi
grep -q PROCESS_MRELEASE_REAP_KILL "$CACHE/src-stock/include/uapi/linux/mman.h" &&
	die "series: the stock tree was modified (hardlinked copy broken)"
pass "series: $(ls "$KP"/series/[0-9]*.patch | grep -vc '/0000-') patches apply to $PKG with --forward"

# --- each prefix of the series builds (--prefixes) --------------------------
# Warnings are compared without their line and column numbers, which the
# patches shift.
warnings_of() { grep -E ': (warning|error):' "$1" | sed -E 's/:[0-9]+:[0-9]+: /: /' | sort -u; }
prefix_builds() {
	local src=$CACHE/src-prefix out=$CACHE/build-prefix t k p f new log objs
	local base=$CACHE/prefix-baseline.txt
	local patches=($(ls "$KP"/series/[0-9]*.patch | grep -v '/0000-'))
	# A fresh copy of the stock tree. The files the series touches get
	# new inodes with a new mtime, so that make recompiles them from the
	# stock source even where a previous run left patched objects behind
	# (and the stock tree's own files keep their timestamps).
	rm -rf "$src" && cp -al "$CACHE/src-stock" "$src" || die "prefixes: copy tree"
	rm -f "$CACHE"/prefix-[0-9]*.log
	for f in $(sed -n 's|^+++ b/||p' "${patches[@]}" | sort -u); do
		[[ -f $CACHE/src-stock/$f ]] && cp --remove-destination "$CACHE/src-stock/$f" "$src/$f"
	done
	if [[ ! -f $out/.reapd-w1-$STAMP_stock ]]; then
		rm -rf "$out" && mkdir -p "$out"
		(cd "$src" && make -s ARCH=x86_64 O="$out" tinyconfig >/dev/null &&
			scripts/kconfig/merge_config.sh -m -O "$out" "$out/.config" "$KP/config/reapd.config" >/dev/null &&
			make -s ARCH=x86_64 O="$out" olddefconfig >/dev/null) >"$CACHE/prefix-0.log" 2>&1 ||
			die "prefixes: configuration (see $CACHE/prefix-0.log)"
	fi
	# The kselftest mm flags (tools/testing/selftests/mm/Makefile)
	selftest_cc() {
		(cd "$src" && make -s ARCH=x86_64 O="$out" headers >/dev/null 2>&1) || return 1
		gcc -Wall -O2 -Wunreachable-code -U_FORTIFY_SOURCE -I "$src/tools/testing/selftests" \
			-isystem "$out/usr/include" -I "$src/tools/include" -o "$out/mrelease_test" \
			"$src/tools/testing/selftests/mm/mrelease_test.c" "$src/tools/testing/selftests/mm/vm_util.c" \
			-lrt -lpthread -lm
	}
	# k = 0 is the stock tree: the baseline, linked in full on a cold run
	for ((k = 0; k <= ${#patches[@]}; k++)); do
		log=$CACHE/prefix-$k.log
		if ((k > 0)); then
			p=${patches[k - 1]}
			if ! (cd "$src" && patch -p1 --forward --batch --no-backup-if-mismatch -r - <"$p") >"$log" 2>&1; then
				sed 's/^/    /' "$log"
				fail "prefix 1-$k: $(basename "$p") does not apply"
				return
			fi
		fi
		t=$(date +%s)
		if ! nice -n 10 make ARCH=x86_64 O="$out" -C "$src" -j"$JOBS" W=1 bzImage >>"$log" 2>&1 ||
			! grep -q 'bzImage is ready' "$log"; then
			grep -E 'error|Error' "$log" | head -20
			fail "prefix ${k/#0/stock}: make W=1 bzImage failed (see $log)"
			return
		fi
		{ selftest_cc >>"$log" 2>&1 || echo "selftest: error: gcc failed"; } >>"$log"
		t=$(($(date +%s) - t))
		objs=$(grep -cE '^  CC ' "$log")
		if ((k == 0)); then
			touch "$out/.reapd-w1-$STAMP_stock"
			warnings_of "$log" >"$base"
			pass "prefix stock: bzImage linked with W=1 in $t s ($objs objects compiled), selftest compiled; baseline $(wc -l <"$base") warnings"
			continue
		fi
		new=$(warnings_of "$log" | comm -23 - "$base")
		if [[ -n $new ]]; then
			echo "$new" | sed 's/^/    /'
			fail "prefix 1-$k: $(echo "$new" | wc -l) new warnings with W=1 (see $log)"
		else
			pass "prefix 1-$k: bzImage linked with W=1 in $t s ($objs objects recompiled: $(sed -n 's/^  CC  *//p' "$log" | tr '\n' ' ')), selftest compiled; new warnings: 0"
		fi
	done
}
if [[ $PREFIXES = 1 ]]; then
	prefix_builds
	echo "harness wall time: $(($(date +%s) - T0)) s"
	finish
fi

# --- build both kernels ----------------------------------------------------
build() { # stock|patched|debug: debug is the patched tree with debug.config
	local kind=$1 src=$CACHE/src-$1 out=$CACHE/build-$1 t stamp frags o
	frags=("$KP/config/reapd.config")
	if [[ $kind = debug ]]; then
		src=$CACHE/src-patched
		frags+=("$KP/config/debug.config")
	fi
	stamp=STAMP_$1
	stamp=${!stamp}
	if [[ -f $out/arch/x86/boot/bzImage && -f $out/.reapd-$stamp ]]; then
		pass "build $kind: reused cached bzImage (--keep-cache)"
		return 0
	fi
	rm -rf "$out" && mkdir -p "$out"
	log "building $kind kernel (tinyconfig + reapd.config, -j$JOBS)"
	t=$(date +%s)
	if ! (cd "$src" && make -s ARCH=x86_64 O="$out" tinyconfig >/dev/null &&
		scripts/kconfig/merge_config.sh -m -O "$out" "$out/.config" "${frags[@]}" >/dev/null &&
		make -s ARCH=x86_64 O="$out" olddefconfig >/dev/null) >"$CACHE/build-$kind.log" 2>&1; then
		tail -20 "$CACHE/build-$kind.log"
		die "build $kind: configuration"
	fi
	local missing
	missing=$(cat "${frags[@]}" | grep -o '^CONFIG_[A-Z0-9_]*=y' | while read -r o; do
		grep -qx "$o" "$out/.config" || echo "${o%=y}"; done)
	[[ -z $missing ]] || die "build $kind: fragment options not set: $missing"
	if ! nice -n 10 make ARCH=x86_64 O="$out" -C "$src" -j"$JOBS" bzImage >>"$CACHE/build-$kind.log" 2>&1; then
		grep -E 'error|Error' "$CACHE/build-$kind.log" | head -20
		die "build $kind: make bzImage failed (see $CACHE/build-$kind.log)"
	fi
	touch "$out/.reapd-$stamp"
	pass "build $kind: bzImage in $(($(date +%s) - t)) s"
}
if [[ $NORMAL = 1 ]]; then
	build stock
	build patched
fi
[[ $DEBUG = 1 ]] && build debug
# the UAPI headers for the test binaries: the patched tree's, from either build
HDR=$CACHE/build-patched
[[ $NORMAL = 1 ]] || HDR=$CACHE/build-debug

# --- static test binaries --------------------------------------------------
log "building static test binaries"
BIN=$CACHE/bin
rm -rf "$BIN" && mkdir -p "$BIN"
(cd "$CACHE/src-patched" && make -s ARCH=x86_64 O="$HDR" headers >/dev/null 2>&1) ||
	die "selftest: make headers"
ST=$CACHE/src-patched/tools/testing/selftests
gcc -static -O2 -Wall -pthread -I "$ST" -I "$ST/mm" -isystem "$HDR/usr/include" \
	-o "$BIN/mrelease_test" "$ST/mm/mrelease_test.c" "$ST/mm/vm_util.c" >"$CACHE/gcc.log" 2>&1 ||
	{ cat "$CACHE/gcc.log"; die "selftest: gcc -static mrelease_test"; }
gcc -static -O2 -Wall -o "$BIN/mrelease_race" "$HERE/mrelease_race.c" &&
	gcc -static -O2 -Wall -pthread -isystem "$HDR/usr/include" \
		-o "$BIN/mrelease_bench" "$HERE/mrelease_bench.c" &&
	gcc -static -O2 -Wall -o "$BIN/vm_exit" "$HERE/vm_exit.c" &&
	gcc -static -no-pie -O2 -Wall -pthread -isystem "$HDR/usr/include" \
		-o "$BIN/exec_race" "$HERE/exec_race.c" || die "selftest: gcc -static race tools"
pass "selftest: static mrelease_test, mrelease_race, mrelease_bench, exec_race, vm_exit built"

# --- the broker ------------------------------------------------------------
if [[ -n ${REAPD_BIN_DIR:-} ]]; then
	RB=$REAPD_BIN_DIR
else
	log "building the broker (cargo build --release -p reapd -p reapctl)"
	export PATH=$HOME/.cargo/bin:$PATH
	if ! (cd "$REPO" && nice -n 10 cargo build --release -q -p reapd -p reapctl) >"$CACHE/cargo.log" 2>&1; then
		tail -20 "$CACHE/cargo.log"
		die "broker: cargo build --release failed"
	fi
	RB=$REPO/target/release
fi
[[ -x $RB/reapd && -x $RB/reapctl ]] || die "broker: reapd/reapctl not found in $RB"
pass "broker: reapd and reapctl built"

# --- initramfs -------------------------------------------------------------
log "packing the initramfs"
IR=$CACHE/initramfs
rm -rf "$IR" && mkdir -p "$IR"/{bin,sbin,proc,sys,dev,tmp,run,tests,opt/reapd,etc}
cp /bin/busybox "$IR/bin/busybox"
cp "$BIN"/* "$IR/tests/"
cp "$RB/reapd" "$RB/reapctl" "$IR/opt/reapd/"
for b in "$RB/reapd" "$RB/reapctl"; do
	ldd "$b" | grep -o '/[^ ]*' | while read -r lib; do
		mkdir -p "$IR$(dirname "$lib")"
		cp -L "$lib" "$IR$lib"
	done
done
echo "root:x:0:0:root:/:/bin/sh" >"$IR/etc/passwd"
echo "root:x:0:" >"$IR/etc/group"
cp "$HERE/init.sh" "$IR/init" && chmod 755 "$IR/init"
(cd "$IR" && find . | cpio -o -H newc --quiet) >"$CACHE/initramfs.cpio" || die "initramfs: cpio"
pass "initramfs: $(du -m "$CACHE/initramfs.cpio" | cut -f1) MiB (static tests, busybox, broker)"

# --- boot ------------------------------------------------------------------
boot() { # stock|patched|debug
	local kind=$1 out=$CACHE/vm-$1.log rc t mode=$1 extra= limit=$QEMU_TIMEOUT
	# the debug kernel runs the patched checks, slower: fewer cycles
	if [[ $kind = debug ]]; then
		mode=patched extra="reapd.debug=1 reapd.cycles=100 reapd.runs=3 reapd.stress=$STRESS reapd.stress_secs=$STRESS_SECS"
		limit=${QEMU_TIMEOUT_DEBUG:-3600}
	fi
	log "booting the $kind kernel (qemu TCG, 2 vCPUs, timeout ${limit}s)"
	t=$(date +%s.%N)
	timeout "$limit" qemu-system-x86_64 -accel tcg,thread=multi -smp 2 -m 1024 \
		-kernel "$CACHE/build-$kind/arch/x86/boot/bzImage" -initrd "$CACHE/initramfs.cpio" \
		-append "console=ttyS0 panic=-1 reapd.mode=$mode reapd.cycles=$CYCLES reapd.runs=$RUNS $extra" \
		-nographic -no-reboot -monitor none \
		-device isa-debug-exit,iobase=0xf4,iosize=0x04 </dev/null >"$out" 2>&1
	rc=$?
	local secs
	secs=$(echo "$(date +%s.%N) - $t" | bc)
	tr -d '\r' <"$out" | grep -E '^(VMCHECK|VMRACE|VMINFO|  )' | grep -v '^VMCHECK' | sed 's/^/    /'
	if [[ $kind = debug ]]; then
		tr -d '\r' <"$out" | sed -n 's/^DMESG //p' >"$CACHE/dmesg-debug.txt"
		tr -d '\r' <"$out" | sed -n 's/^VMSTRESS //p' >"$CACHE/stress.txt"
		# also from the host, on the whole serial log: a splat after the
		# in-VM check, or in a boot that never reached it
		local splat
		splat=$(tr -d '\r' <"$out" | grep -v -E '^(VMCHECK|VMINFO|VMSTRESS|DMESG|  )' |
			grep -E 'BUG:|WARNING:|KASAN:|possible circular|possible recursive|inconsistent lock|suspicious RCU|sleeping function called' | head -3)
		if [[ -z $splat ]]; then
			pass "vm debug: no splat on the serial console ($(wc -l <"$CACHE/dmesg-debug.txt") dmesg lines kept in $CACHE/dmesg-debug.txt)"
		else
			fail "vm debug: splat on the serial console: $splat"
		fi
	fi
	while IFS= read -r line; do
		case $line in
		"VMCHECK PASS "*) pass "vm $kind: ${line#VMCHECK PASS }" ;;
		"VMCHECK FAIL "*) fail "vm $kind: ${line#VMCHECK FAIL }" ;;
		esac
	done < <(tr -d '\r' <"$out" | grep '^VMCHECK ')
	eval "BOOT_SECS_$kind=$secs"
	case $rc in
	1) pass "vm $kind: verdict pass via isa-debug-exit (${secs%.*} s)" ;;
	3) fail "vm $kind: verdict fail via isa-debug-exit (see $out)" ;;
	124) tail -30 "$out"; fail "vm $kind: timeout after ${limit}s (see $out)" ;;
	*) tail -30 "$out"; fail "vm $kind: no verdict, qemu exit $rc (panic or crash, see $out)" ;;
	esac
	# labelled by kernel (the debug kernel runs in mode patched)
	tr -d '\r' <"$out" | grep '^VMRACE' | sed "s/^VMRACE [a-z]*/VMRACE $kind/" >>"$CACHE/race.txt"
	tr -d '\r' <"$out" | grep '^VMBENCH' | sed "s/^VMBENCH [a-z]*/VMBENCH $kind/" >>"$CACHE/bench.txt"
	grep -h '^VMINFO boot-ms' <(tr -d '\r' <"$out") | sed "s/^VMINFO boot-ms/$kind/" >>"$CACHE/boot.txt"
}
rm -f "$CACHE/race.txt" "$CACHE/boot.txt" "$CACHE/bench.txt"
if [[ $NORMAL = 1 ]]; then
	boot stock
	boot patched
fi
[[ $DEBUG = 1 ]] && boot debug

# --- results, stock and patched side by side -------------------------------
field() { sed -n "s/.* $1=\([^ ]*\).*/\1/p"; }
echo
if [[ $NORMAL = 1 ]]; then
	echo "memory returned: 32 MiB victim killed by a non-parent, process_mrelease(0) after"
	echo "its exit, reaped by its parent, while a /proc reader is stalled in copy_to_user()"
	echo "on a userfaultfd page ($RUNS runs each; AnonPages drop, kB min/median/max;"
	echo "ms: kill to reaped by the parent)"
	printf '  %-12s | %-40s | %-40s\n' reader stock patched
	for r in none mem cmdline environ pagemap pagemap_scan vm_readv; do
		cells=()
		for k in stock patched; do
			l=$(grep "^VMBENCH $k PINNEDSUM reader=$r " "$CACHE/bench.txt")
			if [[ $l = *unsupported* ]]; then
				cells+=("not built into this kernel")
				continue
			fi
			cells+=("$(echo "$l" | field freed_all)/$RUNS freed, $(echo "$l" | field freed_kb_min)/$(echo "$l" | field freed_kb_med)/$(echo "$l" | field freed_kb_max) kB, $(echo "$l" | field ms_med) ms")
		done
		printf '  %-12s | %-40s | %-40s\n' "$r" "${cells[0]}" "${cells[1]}"
	done
	echo "robust futexes (20 victims holding a robust pshared mutex): owner-died marks lost"
	for q in kill reap; do
		printf '  %-38s stock %s/20, patched %s/20\n' "$([[ $q = kill ]] && echo kill only || echo kill, process_mrelease at once)" \
			"$(grep "^VMBENCH stock ROBUST seq=$q " "$CACHE/bench.txt" | field lost)" \
			"$(grep "^VMBENCH patched ROBUST seq=$q " "$CACHE/bench.txt" | field lost)"
	done
	race() { grep "^VMRACE $1 .*mode=$2 " "$CACHE/race.txt" | sed -n 's/.* \(cycles=.*\)/\1/p'; }
	echo "return codes: $CYCLES kill+reap cycles of a fresh 1 MiB child (no reader)"
	printf '  %-38s %s\n' "stock, kill then process_mrelease" "$(race stock plain)"
	printf '  %-38s %s\n' "patched, kill then process_mrelease" "$(race patched plain)"
	printf '  %-38s %s\n' "stock, kill, yield, process_mrelease" "$(race stock yield)"
	printf '  %-38s %s\n' "patched, kill, yield, process_mrelease" "$(race patched yield)"
fi
if [[ $DEBUG = 1 ]]; then
	echo "debug kernel (patched + lockdep, KASAN; 3 runs per reader):"
	for r in none mem cmdline environ pagemap pagemap_scan vm_readv; do
		l=$(grep "^VMBENCH debug PINNEDSUM reader=$r " "$CACHE/bench.txt")
		printf '  %-12s | %s\n' "$r" "$(echo "$l" | field freed_all)/3 freed, $(echo "$l" | field freed_kb_min)/$(echo "$l" | field freed_kb_med)/$(echo "$l" | field freed_kb_max) kB, $(echo "$l" | field ms_med) ms"
	done
	echo "  robust futexes lost: kill only $(grep "^VMBENCH debug ROBUST seq=kill " "$CACHE/bench.txt" | field lost)/20, kill then process_mrelease $(grep "^VMBENCH debug ROBUST seq=reap " "$CACHE/bench.txt" | field lost)/20"
	echo "exec race stress on the debug kernel:"
	sed 's/^/  /' "$CACHE/stress.txt"
fi
echo "boot to verdict: stock ${BOOT_SECS_stock:-?} s, patched ${BOOT_SECS_patched:-?} s${BOOT_SECS_debug:+, debug $BOOT_SECS_debug s} (qemu wall time, tests included)"
echo "harness wall time: $(($(date +%s) - T0)) s"
echo
finish
