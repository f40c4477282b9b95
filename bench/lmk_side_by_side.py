#!/usr/bin/env python3
# SPDX-License-Identifier: MIT OR Apache-2.0
"""Side by side: reapd-lmk vs earlyoom vs the kernel's OOM killer alone.

A cgroup limited to 256 MiB, no swap, holds (uid 61521) a 120 MiB "database"
the killer is told to avoid, a 16 MiB worker, (uid 61522, not granted to the
killer) a 32 MiB process, and a leak that grows 4 MiB every 20 ms without end.
"kernel": nothing but the kernel; "lmk": reapd-lmk runs as uid 61520 with no
capabilities, granted the first uid only, trigger at 25 % of the limit left.
"earlyoom": Debian's newest earlyoom (bench/earlyoom.sh fetches it) as its
packaged unit runs it: a non-root uid (61523) with ambient CAP_KILL and
CAP_IPC_LOCK, `-m 25,25` (one SIGKILL at 25 % available, the lmk's line),
`--avoid '^lmk-db$'` (the lmk's avoid) and `--ignore '^lmk-other$'` (its only
stand-in for the broker's grant: a regex on comm, enforced by itself).
earlyoom reads nothing but /proc/meminfo, which is machine-wide; scoped to
the cgroup the way LXC/Incus containers scope it: it runs in the cgroup, in
a PID + mount namespace whose init is in the cgroup too, with lxcfs's
/proc/meminfo (that cgroup's limit, usage and anon) bound over the real one.
The namespace's own /proc also keeps it from seeing, and killing, anything
but the workload on this shared machine.

Per run it samples the cgroup's usage about every millisecond and records
when usage first crosses the trigger line (75 % of the limit), when it is
back under it, the peak, who died, the kernel's oom_kill count, and deaths
of processes outside the killer's grant (must be 0).

Needs root and the debug (or REAPD_BIN_DIR) build of reapd, reapd-lmk and
lmk-hog (REAPD_HOG_DIR, if elsewhere): `cargo build --workspace --all-targets`, then
`sudo python3 bench/lmk_side_by_side.py [--reps 5] [--json out.json]
[--methods kernel,lmk,earlyoom] [--strace DIR] [--check]`.
Prints a Markdown table (docs/lmk.md has the last one). --strace DIR traces
earlyoom's kill, pidfd_open and process_mrelease calls into DIR; --check
exits 1 unless every run's outcome is what the docs claim (the CI test).
"""

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time

MIB = 1 << 20
LIMIT = 256 * MIB
TRIGGER = LIMIT * 3 // 4
KILLER, HOGS, OTHER, EARLYOOM = 61520, 61521, 61522, 61523
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("REAPD_BIN_DIR", os.path.join(ROOT, "target", "debug"))
# The workload's hog may come from elsewhere (bench/run.sh: the debug one,
# so that a release run need not build the test crate with fat LTO; it only
# allocates at its own pace, alike for every killer).
HOG = os.path.join(os.environ.get("REAPD_HOG_DIR", BIN), "lmk-hog")


def mounts():
    v2 = v1 = None
    for line in open("/proc/self/mountinfo"):
        f = line.split()
        dash = f.index("-")
        if f[dash + 1] == "cgroup2" and v2 is None:
            v2 = f[4]
        elif f[dash + 1] == "cgroup" and "memory" in f[dash + 3].split(",") and v1 is None:
            v1 = f[4]
    return v2, v1


class Arena:
    """The test cgroup: cgroup2 (PSI, the broker's paths) and, where the
    memory controller is on cgroup v1, a v1 cgroup below our own."""

    def __init__(self, name):
        v2m, v1m = mounts()
        self.name = name
        self.v2 = os.path.join(v2m, name)
        os.makedirs(self.v2, exist_ok=True)
        self.v1 = self.v1_path = None
        if os.path.exists(os.path.join(self.v2, "memory.max")):
            self.write(self.v2, "memory.max", LIMIT)
            if os.path.exists(os.path.join(self.v2, "memory.swap.max")):
                self.write(self.v2, "memory.swap.max", 0)
        else:
            own = next(l.split(":", 2)[2].strip() for l in open("/proc/self/cgroup") if ":memory:" in l)
            self.v1_path = own.rstrip("/") + "/" + name
            self.v1 = os.path.join(v1m, self.v1_path.lstrip("/"))
            os.makedirs(self.v1, exist_ok=True)
            self.write(self.v1, "memory.limit_in_bytes", LIMIT)
            self.write(self.v1, "memory.swappiness", 0)

    @staticmethod
    def write(d, f, v):
        with open(os.path.join(d, f), "w") as fh:
            fh.write(str(v))

    def group(self, sub):
        d = os.path.join(self.v2, sub)
        os.makedirs(d, exist_ok=True)
        return [d] + ([self.v1] if self.v1 else [])

    def usage(self):
        f = os.path.join(self.v1, "memory.usage_in_bytes") if self.v1 else os.path.join(self.v2, "memory.current")
        return int(open(f).read())

    def oom_kills(self):
        f = os.path.join(self.v1, "memory.oom_control") if self.v1 else os.path.join(self.v2, "memory.events")
        for line in open(f):
            if line.startswith("oom_kill "):
                return int(line.split()[1])
        return 0

    def remove(self):
        for d in [self.v1] if self.v1 else []:
            for _ in range(200):
                try:
                    os.rmdir(d)
                    break
                except OSError:
                    time.sleep(0.01)
        for dirpath, _, _ in sorted(os.walk(self.v2), key=lambda w: -w[0].count("/")):
            for _ in range(200):
                try:
                    os.rmdir(dirpath)
                    break
                except OSError:
                    time.sleep(0.01)


def spawn(uid, cgroups, argv, ns=None, raw=False, **kw):
    """argv as uid, in the cgroups; with ns, inside that PID namespace
    (nsenter forks the process into it, setpriv drops to uid there); raw:
    argv as given, as root (it drops privileges itself)."""

    def pre():
        for d in cgroups:
            with open(os.path.join(d, "cgroup.procs"), "w") as f:
                f.write("0")
        if ns is None and not raw:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)

    if ns is not None:
        argv = ns.enter(uid) + argv
    return subprocess.Popen(argv, preexec_fn=pre, stdin=subprocess.DEVNULL, **kw)


def hog(uid, cgroups, ns, *args):
    p = spawn(uid, cgroups, [HOG, *map(str, args)], ns, stdout=subprocess.PIPE)
    assert p.stdout.readline().strip() == b"ready"
    return p


class PidNs:
    """A PID and mount namespace with a /proc of its own, held by a sleeping
    init (earlyoom never kills pids 1 and 2). A process in it sees, and
    can signal, only the processes in it. nsenter waits for the process it
    forked in and dies of the same signal, so Popen.poll() still tells a
    victim's death. Closing kills the init, and with it every member."""

    def __init__(self, meminfo=None, cgroups=()):
        # sh binds the given meminfo over /proc/meminfo (in the new mount
        # namespace only), takes pid 2 with a second sleep, and becomes the
        # sleeping init: the workload's pids start at 3.
        script = (f'mount --bind "$1" /proc/meminfo || exit 1; ' if meminfo else "") + (
            "sleep infinity & exec sleep infinity"
        )
        # The init in the cgroups: lxcfs describes the cgroup of the
        # reader's PID namespace init (its container), not the reader's.
        self.holder = spawn(
            0,
            cgroups,
            ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", "sh", "-c", script, "sh", meminfo or ""],
            raw=True,
        )
        end = time.time() + 10
        self.init = None
        while self.init is None and time.time() < end:
            kids = open(f"/proc/{self.holder.pid}/task/{self.holder.pid}/children").read().split()
            # The child runs unshare's code until it execs sleep in the new
            # mount namespace (with the new /proc mounted).
            if kids and open(f"/proc/{kids[0]}/comm").read().strip() == "sleep":
                self.init = int(kids[0])
            else:
                time.sleep(0.005)
        assert self.init, "unshare --pid did not start"

    def enter(self, uid, caps=()):
        argv = ["nsenter", "-t", str(self.init), "--pid", "--mount", "--"]
        argv += ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
        if caps:
            c = ",".join("+" + c for c in caps)
            argv += [f"--inh-caps={c}", f"--ambient-caps={c}"]
        return argv

    def close(self):
        self.holder.kill()
        self.holder.wait()


def wait_for(path, needle, timeout=10):
    end = time.time() + timeout
    while time.time() < end:
        if needle in open(path).read():
            return True
        time.sleep(0.01)
    return False


class Lxcfs:
    """lxcfs (FUSE, root) at mnt: its proc/meminfo shows each reader the
    memory of the reader's own memory cgroup (limit, usage, anon)."""

    def __init__(self, root, mnt):
        os.makedirs(mnt, exist_ok=True)
        lib = os.path.join(root, "lib", "x86_64-linux-gnu") + ":" + os.path.join(root, "usr", "lib", "x86_64-linux-gnu", "lxcfs")
        self.mnt = mnt
        self.meminfo = os.path.join(mnt, "proc", "meminfo")
        self.log = open(mnt + ".log", "w")
        self.proc = subprocess.Popen(
            [os.path.join(root, "usr", "bin", "lxcfs"), "-f", mnt],
            env={**os.environ, "LD_LIBRARY_PATH": lib},
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        end = time.time() + 10
        while not os.path.exists(self.meminfo):
            assert time.time() < end and self.proc.poll() is None, "lxcfs did not start: " + open(mnt + ".log").read()
            time.sleep(0.02)

    def close(self):
        self.proc.terminate()  # lxcfs unmounts on SIGTERM
        self.proc.wait()
        subprocess.run(["umount", "-l", self.mnt], stderr=subprocess.DEVNULL)


EARLYOOM_KILL = re.compile(r'sending (SIG\w+) to process (\d+) uid (\d+) "([^"]*)"')


def start_earlyoom(ns, group, earlyoom, rep, scratch, strace_dir):
    # In the cgroup, as in a container: lxcfs's /proc/meminfo (bound in
    # the namespace) then describes this cgroup, so -m 25 means what the
    # lmk's mem-available-percent = 25 means. SIGTERM and SIGKILL at the
    # same line: one SIGKILL, as the lmk's kill.
    argv = ns.enter(EARLYOOM, ("kill", "ipc_lock"))
    argv += [earlyoom, "-m", "25,25", "-r", "0", "--avoid", "^lmk-db$", "--ignore", "^lmk-other$"]
    if strace_dir:
        # Outside the namespace (-I 1: SIGTERM stops strace, which detaches
        # and closes the trace before the namespace is torn down).
        trace = os.path.join(strace_dir, f"earlyoom-{rep}.strace")
        argv = ["strace", "-I", "1", "-f", "--seccomp-bpf", "-tt", "-o", trace,
                "-e", "trace=kill,pidfd_open,pidfd_send_signal,process_mrelease"] + argv
    log = os.path.join(scratch, f"earlyoom-{rep}.log")
    p = spawn(0, group("earlyoom"), argv, raw=True, stdout=subprocess.DEVNULL, stderr=open(log, "w"))
    assert wait_for(log, "SIGKILL when mem avail"), open(log).read()
    return p, log, {}


def one_run(method, rep, broker_sock, scratch, earlyoom=None, lxcfs_meminfo=None, strace_dir=None):
    arena = Arena(f"reapd-bench-lmk-{os.getpid()}-{method}-{rep}")
    procs = {}
    killer = None
    group = arena.group
    if method == "earlyoom":
        # One cgroup for everything on cgroup2 too: lxcfs reports the usage
        # of the namespace init's own cgroup (the limit may sit above it).
        group = lambda _: arena.group("all")  # noqa: E731
    ns = PidNs(lxcfs_meminfo, group("init")) if method == "earlyoom" else None
    extra = {}
    try:
        procs["db"] = hog(HOGS, group("db"), ns, "lmk-db", 120)
        procs["other-uid"] = hog(OTHER, group("other"), ns, "lmk-other", 32)
        procs["worker"] = hog(HOGS, group("worker"), ns, "lmk-worker", 16)
        if method == "lmk":
            os.chown(os.path.join(arena.v2, "memory.pressure"), KILLER, -1)
            conf = os.path.join(scratch, f"lmk-{rep}.toml")
            memory = f'memory-cgroup = "{arena.v1_path}"\n' if arena.v1_path else ""
            with open(conf, "w") as f:
                f.write(
                    f'socket = "{broker_sock}"\n[scope]\ncgroup = "/{arena.name}"\n{memory}'
                    "[trigger]\nmem-available-percent = 25\n"
                    'psi = { level = "some", stall-ms = 100, window-ms = 2000 }\n'
                    '[kill]\navoid = { comm = ["^lmk-db$"] }\n'
                )
            os.chmod(conf, 0o644)
            log = os.path.join(scratch, f"lmk-{rep}.log")
            killer = spawn(
                KILLER,
                [],
                [os.path.join(BIN, "reapd-lmk"), "--config", conf, "--max-kills", "1"],
                stdout=subprocess.PIPE,
                stderr=open(log, "w"),
            )
            assert wait_for(log, "watching"), open(log).read()
        elif method == "earlyoom":
            killer, eo_log, extra = start_earlyoom(ns, group, earlyoom, rep, scratch, strace_dir)
        t0 = time.monotonic()
        procs["leak"] = hog(HOGS, group("leak"), ns, "lmk-leak", 0, 4, 20, 0)
        crossed = back = None
        peak = 0
        trace = []  # (s since t0, MiB): the plot's curves
        end = time.monotonic() + 15
        while time.monotonic() < end:
            u = arena.usage()
            now = time.monotonic()
            peak = max(peak, u)
            trace.append((round(now - t0, 4), round(u / MIB, 1)))
            if crossed is None and u >= TRIGGER:
                crossed = now
            elif crossed is not None and u < TRIGGER:
                back = now
                break
            time.sleep(0.001)
        time.sleep(0.2)  # let the dead be reaped by their parent (us) below
        died = sorted(n for n, p in procs.items() if p.poll() is not None)
        event = None
        if method == "lmk":
            try:
                out, _ = killer.communicate(timeout=5)
                event = json.loads(out.splitlines()[0]) if out.strip() else None
            except subprocess.TimeoutExpired:
                killer.kill()
        elif method == "earlyoom":
            killer.terminate()  # strace detaches and flushes; earlyoom dies with the namespace
            killer.wait()
            text = open(eo_log).read()
            extra["earlyoom_kills"] = [m.group(4) for m in EARLYOOM_KILL.finditer(text)]
            extra["earlyoom_signals"] = [m.group(1) for m in EARLYOOM_KILL.finditer(text)]
            if strace_dir:
                t = open(os.path.join(strace_dir, f"earlyoom-{rep}.strace")).read()
                extra["earlyoom_strace"] = {
                    "kill_sigkill": len(re.findall(r"kill\(\d+, SIGKILL\) += 0", t)),
                    "pidfd_open_ok": len(re.findall(r"pidfd_open\(\d+, 0\) += \d+", t)),
                    "process_mrelease_ok": len(re.findall(r"process_mrelease\(\d+, 0\) += 0", t)),
                    # ESRCH: the victim had exited and been reaped by its
                    # parent before the call (it freed its memory itself).
                    "process_mrelease_esrch": len(re.findall(r"process_mrelease\(\d+, 0\) += -1 ESRCH", t)),
                    "process_mrelease_calls": len(re.findall(r"process_mrelease\(", t)),
                }
        return {
            "method": method,
            "trigger_to_back_ms": (back - crossed) * 1e3 if back and crossed else None,
            "start_to_trigger_ms": (crossed - t0) * 1e3 if crossed else None,
            "peak_mib": peak / MIB,
            "died": died,
            "oom_kill": arena.oom_kills(),
            "outside_grant_killed": int("other-uid" in died),
            "lmk_decision_to_reply_ms": event and event.get("decision_to_reply_ms"),
            "lmk_released_mib": event and event["bytes_released"] / MIB,
            "lmk_candidates_ms": event and event.get("candidates_ms"),
            "crossed_s": crossed - t0 if crossed else None,
            "usage_trace": trace,
            **extra,
        }
    finally:
        for p in list(procs.values()) + ([killer] if killer else []):
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
            p.wait()
        if ns is not None:
            ns.close()
        arena.remove()


COLUMNS = {
    "kernel": "kernel OOM killer alone",
    "lmk": "reapd-lmk (unprivileged)",
    "earlyoom": "earlyoom {version} (CAP_KILL)",
}
PRIVILEGES = {
    "kernel": "none (in the kernel)",
    "lmk": "none: uid 61520, no capabilities; the broker's grant names uid 61521 in this cgroup",
    "earlyoom": "CAP_KILL + CAP_IPC_LOCK (Debian's unit: DynamicUser, AmbientCapabilities=CAP_KILL CAP_IPC_LOCK): "
    "may signal every process of the machine; scoped here only by what root set up around it "
    "(a PID namespace, lxcfs's per-cgroup /proc/meminfo)",
}


def p90(xs):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(0.9 * (len(xs) - 1)))]


def table(runs, methods, version):
    head = [COLUMNS[m].format(version=version) for m in methods]
    out = ["| | " + " | ".join(head) + " |", "|---|" + "---|" * len(methods)]

    def col(method, fn):
        return fn([r for r in runs if r["method"] == method])

    def stat(key, fmt="{:.0f}"):
        def f(rs):
            xs = [r[key] for r in rs if r.get(key) is not None]
            if not xs:
                return "n/a"
            return f"{fmt.format(statistics.median(xs))} / {fmt.format(p90(xs))} (max {fmt.format(max(xs))})"

        return f

    def victims(rs):
        counts = {}
        for r in rs:
            key = "+".join(r["died"]) or "none"
            counts[key] = counts.get(key, 0) + 1
        return ", ".join(f"{k} ×{v}" for k, v in sorted(counts.items()))

    def never_back(rs):
        return str(sum(1 for r in rs if r["trigger_to_back_ms"] is None))

    def mrelease(rs):
        traced = [r["earlyoom_strace"] for r in rs if "earlyoom_strace" in r]
        if not traced:
            return "n/a (not traced)" if rs and rs[0]["method"] == "earlyoom" else "n/a"
        n = {k: sum(t[k] for t in traced) for k in traced[0]}
        return (
            f"{n['process_mrelease_calls']} after {n['kill_sigkill']} kill(SIGKILL): {n['process_mrelease_ok']} returned 0, "
            f"{n['process_mrelease_esrch']} ESRCH (victim already gone)"
        )

    rows = [
        ("runs", lambda rs: str(len(rs))),
        ("trigger line (75 % of 256 MiB) to back under it, ms: median / p90 (max)", stat("trigger_to_back_ms")),
        ("runs where usage never came back under the line within 15 s", never_back),
        ("peak usage, MiB: median / p90 (max)", stat("peak_mib")),
        ("victims (processes that died)", victims),
        ("kernel oom_kill events (sum)", lambda rs: str(sum(r["oom_kill"] for r in rs))),
        ("kills outside the killer's grant (sum)", lambda rs: str(sum(r["outside_grant_killed"] for r in rs))),
        ("earlyoom: process_mrelease calls (strace, --strace runs only)", mrelease),
        ("killer: decision to broker reply, ms: median / p90 (max)", stat("lmk_decision_to_reply_ms")),
        ("killer: of which ListCandidates, ms: median / p90 (max)", stat("lmk_candidates_ms")),
        ("killer: bytes_released, MiB: median / p90 (max)", stat("lmk_released_mib")),
        ("privileges the killer needs", lambda rs: PRIVILEGES[rs[0]["method"]] if rs else "n/a"),
    ]
    for name, fn in rows:
        out.append(f"| {name} | " + " | ".join(col(m, fn) for m in methods) + " |")
    return "\n".join(out)


def check(runs):
    """What docs/lmk.md claims of every run; the CI test runs --check."""
    bad = []
    for r in runs:
        tag = f"{r['method']}: "
        if r["outside_grant_killed"]:
            bad.append(tag + "the other uid's process died")
        if r["method"] in ("lmk", "earlyoom"):
            if r["died"] != ["leak"]:
                bad.append(tag + f"died {r['died']}, not the leak alone")
            if r["trigger_to_back_ms"] is None:
                bad.append(tag + "usage never came back under the line")
        if r["method"] == "lmk" and r["oom_kill"]:
            bad.append(tag + f"oom_kill {r['oom_kill']}")
        if "earlyoom_strace" in r and r["earlyoom_strace"]["process_mrelease_calls"] < 1:
            bad.append(tag + "strace saw no process_mrelease call")
    return bad


def markdown(md, args, version, made):
    """The section bench/run.sh puts into docs/benchmarks.md."""
    uname = os.uname()
    cmd = f"sudo python3 bench/lmk_side_by_side.py --reps {args.reps}" + (
        f" --methods {args.methods}" if args.methods != "kernel,lmk,earlyoom" else ""
    )
    eo = f"earlyoom {version} (Debian unstable, fetched by `bench/earlyoom.sh`); " if version else ""
    med = {}
    for m in args.methods.split(","):
        xs = [r["trigger_to_back_ms"] for r in args.runs if r["method"] == m and r["trigger_to_back_ms"] is not None]
        if xs:
            med[m] = f"{COLUMNS[m].format(version=version)} {statistics.median(xs):.0f} ms"
    summary = "Median time from the trigger line to memory back: " + ", ".join(med.values()) + ".\n\n"
    return (
        f"Generated by `{cmd}` (binaries from `{made.get('bin', '?')}`), {made.get('utc', '?')}, "
        f"kernel {uname.release}, {os.cpu_count()} CPUs; {eo}runs interleaved across killers. "
        "Workload, setup and reading: docs/lmk.md, \"Side by side\".\n\n"
        f"{md}\n\n{summary}![usage around the trigger line and time to memory back, per killer](lmk_side_by_side.png)\n"
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json")
    ap.add_argument("--methods", default="kernel,lmk,earlyoom")
    ap.add_argument("--earlyoom-root", help="where earlyoom and lxcfs are extracted (default: bench/earlyoom.sh)")
    ap.add_argument("--strace", metavar="DIR", help="trace earlyoom's kill/pidfd/process_mrelease calls into DIR")
    ap.add_argument("--check", action="store_true", help="exit 1 unless each run is as docs/lmk.md says")
    ap.add_argument("--markdown", metavar="FILE", help="also write the table, with how it was made, to FILE")
    ap.add_argument("--from-json", metavar="FILE", help="measure nothing: the table of an earlier --json run")
    args = ap.parse_args()
    methods = args.methods.split(",")
    if args.from_json:
        saved = json.load(open(args.from_json))
        runs, version = saved["runs"], saved["earlyoom_version"]
        methods = [m for m in methods if any(r["method"] == m for r in runs)]
        args.reps = sum(1 for r in runs if r["method"] == methods[0])
        return report(runs, methods, version, args, saved.get("made"))
    earlyoom, version, lxcfs = None, "", None
    scratch = tempfile.mkdtemp(prefix="reapd-bench-lmk")
    os.chmod(scratch, 0o755)
    if "earlyoom" in methods:
        root = args.earlyoom_root or subprocess.run(
            ["bash", os.path.join(ROOT, "bench", "earlyoom.sh")], check=True, stdout=subprocess.PIPE, text=True
        ).stdout.strip()
        earlyoom = os.path.join(root, "usr", "bin", "earlyoom")
        lxcfs = Lxcfs(root, os.path.join(scratch, "lxcfs"))
        v = subprocess.run([earlyoom, "-v"], capture_output=True, text=True)
        version = (v.stdout + v.stderr).split()[-1]  # "earlyoom v1.9.0", on stderr
    if args.strace:
        os.makedirs(args.strace, exist_ok=True)
    policy = os.path.join(scratch, "policy.toml")
    with open(policy, "w") as f:
        f.write(
            f'[[rule]]\nname = "lmk"\nactions = ["kill-and-reap"]\ncaller.uids = [{KILLER}]\n'
            f'target.uids = [{HOGS}]\n'
        )
    sock = os.path.join(scratch, "grpc.sock")
    broker = subprocess.Popen(
        [os.path.join(BIN, "reapd"), "--grpc-socket", sock, "--policy", policy],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=open(os.path.join(scratch, "reapd.log"), "w"),
    )
    try:
        end = time.time() + 20
        while not os.path.exists(sock) and time.time() < end:
            time.sleep(0.02)
        # Interleaved (kernel, lmk, earlyoom, kernel, ...): load from other
        # work on the machine falls on every killer alike.
        runs = [
            one_run(m, r, sock, scratch, earlyoom, lxcfs and lxcfs.meminfo, args.strace)
            for r in range(args.reps)
            for m in methods
        ]
    finally:
        broker.terminate()
        broker.wait()
        if lxcfs:
            lxcfs.close()
    made = {"utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "bin": os.path.relpath(BIN, ROOT)}
    if os.path.dirname(HOG) != BIN:
        made["bin"] += f"; the workload's lmk-hog from {os.path.relpath(os.path.dirname(HOG), ROOT)}"
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"earlyoom_version": version, "made": made, "runs": runs}, f, indent=1)
    report(runs, methods, version, args, made)


def report(runs, methods, version, args, made):
    args.runs = runs
    md = table(runs, methods, version)
    print(md)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(md, args, version, made or {}))
    if args.check:
        bad = check(runs)
        for b in bad:
            print("FAIL", b)
        print(f"{len(runs)} runs checked, {len(bad)} problems")
        sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
