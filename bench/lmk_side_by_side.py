#!/usr/bin/env python3
"""Side by side: reapd-lmk vs the kernel's OOM killer alone, on one workload.

A cgroup limited to 256 MiB, no swap, holds (uid 61521) a 120 MiB "database"
the killer is told to avoid, a 16 MiB worker, (uid 61522, not granted to the
killer) a 32 MiB process, and a leak that grows 4 MiB every 20 ms without end.
"kernel": nothing but the kernel; "lmk": reapd-lmk runs as uid 61520 with no
capabilities, granted the first uid only, trigger at 25 % of the limit left.

Per run it samples the cgroup's usage about every millisecond and records
when usage first crosses the trigger line (75 % of the limit), when it is
back under it, the peak, who died, the kernel's oom_kill count, and deaths
of processes outside the killer's grant (must be 0).

Needs root and the debug (or REAPD_BIN_DIR) build of reapd, reapd-lmk and
lmk-hog: `cargo build --workspace --all-targets`, then
`sudo python3 bench/lmk_side_by_side.py [--reps 5] [--json out.json]`.
Prints a Markdown table (docs/lmk.md has the last one).
"""

import argparse
import json
import os
import signal
import statistics
import subprocess
import tempfile
import time

MIB = 1 << 20
LIMIT = 256 * MIB
TRIGGER = LIMIT * 3 // 4
KILLER, HOGS, OTHER = 61520, 61521, 61522
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("REAPD_BIN_DIR", os.path.join(ROOT, "target", "debug"))


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


def spawn(uid, cgroups, argv, **kw):
    def pre():
        for d in cgroups:
            with open(os.path.join(d, "cgroup.procs"), "w") as f:
                f.write("0")
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)

    return subprocess.Popen(argv, preexec_fn=pre, stdin=subprocess.DEVNULL, **kw)


def hog(uid, cgroups, *args):
    p = spawn(uid, cgroups, [os.path.join(BIN, "lmk-hog"), *map(str, args)], stdout=subprocess.PIPE)
    assert p.stdout.readline().strip() == b"ready"
    return p


def wait_for(path, needle, timeout=10):
    end = time.time() + timeout
    while time.time() < end:
        if needle in open(path).read():
            return True
        time.sleep(0.01)
    return False


def one_run(method, rep, broker_sock, scratch):
    arena = Arena(f"reapd-bench-lmk-{os.getpid()}-{method}-{rep}")
    procs = {}
    killer = None
    try:
        procs["db"] = hog(HOGS, arena.group("db"), "lmk-db", 120)
        procs["other-uid"] = hog(OTHER, arena.group("other"), "lmk-other", 32)
        procs["worker"] = hog(HOGS, arena.group("worker"), "lmk-worker", 16)
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
        t0 = time.monotonic()
        procs["leak"] = hog(HOGS, arena.group("leak"), "lmk-leak", 0, 4, 20, 0)
        crossed = back = None
        peak = 0
        end = time.monotonic() + 15
        while time.monotonic() < end:
            u = arena.usage()
            now = time.monotonic()
            peak = max(peak, u)
            if crossed is None and u >= TRIGGER:
                crossed = now
            elif crossed is not None and u < TRIGGER:
                back = now
                break
            time.sleep(0.001)
        time.sleep(0.2)  # let the dead be reaped by their parent (us) below
        died = sorted(n for n, p in procs.items() if p.poll() is not None)
        event = None
        if killer is not None:
            try:
                out, _ = killer.communicate(timeout=5)
                event = json.loads(out.splitlines()[0]) if out.strip() else None
            except subprocess.TimeoutExpired:
                killer.kill()
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
        }
    finally:
        for p in list(procs.values()) + ([killer] if killer else []):
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
            p.wait()
        arena.remove()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json")
    args = ap.parse_args()
    scratch = tempfile.mkdtemp(prefix="reapd-bench-lmk")
    os.chmod(scratch, 0o755)
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
        runs = [one_run(m, r, sock, scratch) for r in range(args.reps) for m in ("kernel", "lmk")]
    finally:
        broker.terminate()
        broker.wait()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(runs, f, indent=1)
    print("| | kernel OOM killer alone | reapd-lmk (unprivileged) |")
    print("|---|---|---|")

    def col(method, fn):
        return fn([r for r in runs if r["method"] == method])

    def med(key):
        def f(rs):
            xs = [r[key] for r in rs if r[key] is not None]
            return f"{statistics.median(xs):.0f} (min {min(xs):.0f}, max {max(xs):.0f})" if xs else "n/a"

        return f

    def victims(rs):
        counts = {}
        for r in rs:
            key = "+".join(r["died"]) or "none"
            counts[key] = counts.get(key, 0) + 1
        return ", ".join(f"{k} ×{v}" for k, v in sorted(counts.items()))

    rows = [
        ("runs", lambda rs: str(len(rs))),
        ("trigger line (75 % of 256 MiB) to back under it, ms: median", med("trigger_to_back_ms")),
        ("peak usage, MiB: median", med("peak_mib")),
        ("victims (processes that died)", victims),
        ("kernel oom_kill events (sum)", lambda rs: str(sum(r["oom_kill"] for r in rs))),
        ("kills outside the killer's grant (sum)", lambda rs: str(sum(r["outside_grant_killed"] for r in rs))),
        ("killer: decision to broker reply, ms: median", med("lmk_decision_to_reply_ms")),
        ("killer: of which ListCandidates, ms: median", med("lmk_candidates_ms")),
        ("killer: bytes_released, MiB: median", med("lmk_released_mib")),
    ]
    for name, fn in rows:
        print(f"| {name} | {col('kernel', fn)} | {col('lmk', fn)} |")


if __name__ == "__main__":
    main()
