# SPDX-License-Identifier: MIT OR Apache-2.0
"""The low-memory killers side by side, once each (bench/lmk_side_by_side.py
--reps 1 --check): reapd-lmk with no capabilities, Debian's newest earlyoom
with CAP_KILL, and the kernel OOM killer alone, on real memory pressure in a
256 MiB cgroup. Checks what docs/lmk.md claims of every run (reapd-lmk and
earlyoom kill the leak alone before the limit, nothing outside the grant
dies), that earlyoom calls process_mrelease on its victim (strace), and that
the plot is drawn.

earlyoom comes from bench/earlyoom.sh (Debian unstable, cached under
/var/cache/reapd-earlyoom): where it cannot be fetched and is not cached,
the test is a counted SKIP (tests/expected-skips.txt says why).
"""
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import BIN_DIR, REPO


def skip(reason):
    line = f"SKIP: lmk_side_by_side: {reason}"
    if os.environ.get("REAPD_SKIP_LOG"):
        with open(os.environ["REAPD_SKIP_LOG"], "a") as f:
            f.write(line + "\n")
    pytest.skip(line)


def test_reapd_lmk_and_earlyoom_kill_the_leak_and_earlyoom_reaps(tmp_path):
    fetched = subprocess.run(
        ["bash", str(REPO / "bench" / "earlyoom.sh")], capture_output=True, text=True, timeout=300
    )
    if fetched.returncode != 0:
        skip("earlyoom could not be fetched from Debian: " + fetched.stderr.strip().splitlines()[-1])
    root = fetched.stdout.strip()
    out = tmp_path / "runs.json"
    r = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "lmk_side_by_side.py"),
            "--reps", "1",
            "--earlyoom-root", root,
            "--strace", str(tmp_path / "strace"),
            "--json", str(out),
            "--markdown", str(tmp_path / "section.md"),
            "--check",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "REAPD_BIN_DIR": str(BIN_DIR)},
    )
    assert r.returncode == 0, r.stdout + r.stderr
    bench = json.loads(out.read_text())
    assert re.fullmatch(r"v1\.(8|9|\d\d)[.\d]*", bench["earlyoom_version"]), bench["earlyoom_version"]
    runs = {x["method"]: x for x in bench["runs"]}
    assert set(runs) == {"kernel", "lmk", "earlyoom"}
    for m in ("lmk", "earlyoom"):
        assert runs[m]["died"] == ["leak"], runs[m]
        assert runs[m]["outside_grant_killed"] == 0
    # Both act at the line, before the limit: the kernel's OOM killer
    # never fires for them, while alone it takes the database.
    assert runs["lmk"]["oom_kill"] == 0 and runs["earlyoom"]["oom_kill"] == 0, runs
    assert runs["kernel"]["oom_kill"] >= 1 and "db" in runs["kernel"]["died"], runs["kernel"]
    assert runs["earlyoom"]["earlyoom_kills"] == ["lmk-leak"]
    # kill(SIGKILL), then process_mrelease on the pidfd opened before it
    # (ESRCH when the victim was already gone: it exited and its parent
    # reaped it between the two calls).
    trace = (tmp_path / "strace" / "earlyoom-0.strace").read_text()
    pidfd = re.search(r"pidfd_open\((\d+), 0\)\s+= (\d+)", trace)
    assert pidfd, trace
    kill = re.search(rf"kill\({pidfd.group(1)}, SIGKILL\)\s+= 0", trace)
    assert kill, trace
    assert re.search(rf"process_mrelease\({pidfd.group(2)}, 0\)\s+= (0|-1 ESRCH)", trace[kill.end():]), trace
    assert "| earlyoom v1." in (tmp_path / "section.md").read_text()

    png = tmp_path / "side.png"
    p = subprocess.run(
        [str(BIN_DIR / "reapd-bench"), "lmk-plot", "--json", str(out), "--out", str(png)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 0, p.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
