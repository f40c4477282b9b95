# SPDX-License-Identifier: MIT OR Apache-2.0
"""reapd's varlink API from an independent client: the `varlink` PyPI package.

The client resolves io.reapd.Reaper through the broker's own
GetInterfaceDescription and validates calls against it, so these tests
exercise the published IDL. Errors the client library cannot provoke
(unknown methods, `more`, malformed JSON) are sent on a raw socket.
"""
import json
import os
import socket
import subprocess
import time

import pytest
import varlink

from conftest import REPO, Broker, Victim

IDL = (REPO / "proto" / "io.reapd.Reaper.varlink").read_text()
NOBODY = 61234  # no passwd entry needed


def client(broker):
    # The fixture waits for the gRPC socket; the varlink one is bound beside
    # it at start, but make sure.
    deadline = time.monotonic() + 10
    while not os.path.exists(broker.varlink) and time.monotonic() < deadline:
        time.sleep(0.01)
    return varlink.Client(address=f"unix:{broker.varlink}")


def error_of(call):
    with pytest.raises(varlink.VarlinkError) as info:
        call()
    return info.value.error(), info.value.parameters()


def raw(broker, *messages, read=True):
    """Sends NUL-terminated messages; returns the decoded replies."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(broker.varlink)
        for m in messages:
            s.sendall((m if isinstance(m, bytes) else json.dumps(m).encode()) + b"\0")
        if not read:
            return []
        s.shutdown(socket.SHUT_WR)
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    return [json.loads(part) for part in data.split(b"\0") if part]


def test_get_info_lists_both_interfaces(broker):
    with client(broker) as c:
        assert c.get_interfaces() == ["org.varlink.service", "io.reapd.Reaper", "io.systemd.Metrics"]
        with c.open("org.varlink.service") as service:
            info = service.GetInfo()
    assert info["vendor"] == "reapd"
    assert info["version"]
    # No placeholder host: the manual page documents the service.
    assert info["url"] == "man:reapd(8)"


def test_interface_description_is_the_published_idl(broker):
    with client(broker) as c, c.open("org.varlink.service") as service:
        description = service.GetInterfaceDescription("io.reapd.Reaper")["description"]
        assert description == IDL
        parsed = varlink.Interface(description)
        assert parsed.name == "io.reapd.Reaper"
        assert {"KillAndReap", "CheckPermission", "GetCapabilities"} <= set(parsed.members)
        for name in ("PermissionDenied", "NoSuchProcess", "ProcessChanged", "RateLimited"):
            assert name in parsed.members
        name, params = error_of(lambda: service.GetInterfaceDescription("com.example.Nope"))
        assert name == "org.varlink.service.InterfaceNotFound"
        assert params["interface"] == "com.example.Nope"


def test_get_capabilities(broker):
    with client(broker) as c, c.open("io.reapd.Reaper") as reaper:
        caps = reaper.GetCapabilities()
    assert caps["processMrelease"] is True
    assert caps["killPath"] in ("reap_kill", "kill_then_mrelease", "kill_only")
    assert caps["kernelRelease"] == open("/proc/sys/kernel/osrelease").read().strip()
    assert isinstance(caps["notes"], list)


def test_check_permission_then_kill_and_reap(broker, victim):
    start = victim.start_time()
    with client(broker) as c, c.open("io.reapd.Reaper") as reaper:
        check = reaper.CheckPermission(pid=victim.pid, startTime=start)
        assert check["allowed"] is True
        assert check["target"]["pid"] == victim.pid
        assert check["target"]["startTime"] == start
        report = reaper.KillAndReap(pid=victim.pid, startTime=start, waitForExitMs=5000)
    assert report["outcome"] in ("reaped", "exited_before_reap")
    assert report["exited"] is True
    assert report["memoryBefore"]["anonBytes"] >= 4 << 20
    assert report["target"]["comm"].startswith("python")
    assert report["rule"]
    assert victim.proc.wait(timeout=10) == -9


def test_each_reaper_error_by_name(broker, victim):
    with client(broker) as c, c.open("io.reapd.Reaper") as reaper:
        name, params = error_of(lambda: reaper.CheckPermission(pid=4194303))
        assert name == "io.reapd.Reaper.NoSuchProcess"
        assert "4194303" in params["reason"]

        name, params = error_of(lambda: reaper.CheckPermission(pid=victim.pid, startTime=1))
        assert name == "io.reapd.Reaper.ProcessChanged"
        assert params["reason"]

        name, params = error_of(lambda: reaper.KillAndReap())
        assert (name, params) == ("org.varlink.service.InvalidParameter", {"parameter": "pid"})

        name, params = error_of(lambda: reaper.KillAndReap(pid=victim.pid, pidfd=0))
        assert (name, params) == ("org.varlink.service.InvalidParameter", {"parameter": "pidfd"})
    assert victim.proc.poll() is None


def test_permission_denied_for_another_uid(broker, victim):
    # A forked child takes an unprivileged uid and asks to kill a root process.
    r, w = os.pipe()
    child = os.fork()
    if child == 0:
        try:
            os.close(r)
            os.setresgid(NOBODY, NOBODY, NOBODY)
            os.setresuid(NOBODY, NOBODY, NOBODY)
            with client(broker) as c, c.open("io.reapd.Reaper") as reaper:
                try:
                    reaper.KillAndReap(pid=victim.pid)
                    out = {"error": None}
                except varlink.VarlinkError as e:
                    out = {"error": e.error(), "parameters": e.parameters()}
            os.write(w, json.dumps(out).encode())
        finally:
            os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    os.waitpid(child, 0)
    out = json.loads(data)
    assert out["error"] == "io.reapd.Reaper.PermissionDenied"
    assert out["parameters"]["reason"]
    assert victim.proc.poll() is None


def test_rate_limited_with_retry_hint(tmp_path):
    # A policy with a burst of 2 kills and one more per 10 s: the third kill
    # in a row is refused.
    policy = tmp_path / "policy.toml"
    policy.write_text("[limits]\nkills = 1\ninterval-secs = 10.0\nburst = 2\n")
    b = Broker(["--policy", str(policy)])
    sleepers = [subprocess.Popen(["sleep", "600"]) for _ in range(3)]
    try:
        with client(b) as c, c.open("io.reapd.Reaper") as reaper:
            # The bucket is made (full) at the first kill, no earlier.
            first_kill = time.monotonic()
            for p in sleepers[:2]:
                assert reaper.KillAndReap(pid=p.pid)["rule"]
            name, params = error_of(lambda: reaper.KillAndReap(pid=sleepers[2].pid))
            elapsed_ms = (time.monotonic() - first_kill) * 1000
        assert name == "io.reapd.Reaper.RateLimited"
        # The time until the next token: 10 s per token, the burst spent,
        # refilled since the first kill. A constant hint fails this.
        retry = params["retryAfterMs"]
        assert 10000 - elapsed_ms - 1 <= retry <= 10000, (retry, elapsed_ms)
        assert params["reason"]
        assert sleepers[2].poll() is None
    finally:
        for p in sleepers:
            p.kill()
            p.wait()
        b.stop()


def test_service_errors_and_flags_on_a_raw_socket(broker):
    replies = raw(
        broker,
        {"method": "io.reapd.Reaper.Nope"},
        {"method": "com.example.Other.Method"},
        {"method": "io.reapd.Reaper.GetCapabilities", "more": True},
        {"method": "io.reapd.Reaper.CheckPermission", "parameters": {"pid": "1"}},
        {"method": "io.reapd.Reaper.CheckPermission", "parameters": {"pid": 1, "bogus": 2}},
        b"{not json",
        {"method": "io.reapd.Reaper.GetCapabilities", "oneway": True},
        {"method": "org.varlink.service.GetInfo"},
    )
    names = [r.get("error") for r in replies]
    assert names == [
        "org.varlink.service.MethodNotFound",
        "org.varlink.service.InterfaceNotFound",
        "org.varlink.service.InvalidParameter",
        "org.varlink.service.InvalidParameter",
        "org.varlink.service.InvalidParameter",
        "io.reapd.Reaper.InvalidMessage",
        # the oneway call got no reply; GetInfo did
        None,
    ]
    assert replies[0]["parameters"] == {"method": "io.reapd.Reaper.Nope"}
    assert replies[1]["parameters"] == {"interface": "com.example.Other"}
    assert replies[2]["parameters"] == {"parameter": "more"}
    assert replies[3]["parameters"] == {"parameter": "pid"}
    assert replies[4]["parameters"] == {"parameter": "bogus"}
    assert "interfaces" in replies[6]["parameters"]


def test_oneway_kill_is_honoured(broker):
    v = Victim()
    try:
        assert raw(broker, {"method": "io.reapd.Reaper.KillAndReap", "parameters": {"pid": v.pid}, "oneway": True}) == []
        assert v.proc.wait(timeout=10) == -9
    finally:
        v.close()


def test_watch_kills_with_more(broker, victim):
    """`more` from the reference Python client: the first reply says the
    subscription exists, then one reply per kill, each with continues."""
    with client(broker) as c, c.open("io.reapd.Reaper") as watcher:
        replies = watcher.WatchKills(_more=True)
        assert next(replies) == {"ready": True}
        with client(broker) as c2, c2.open("io.reapd.Reaper") as killer:
            report = killer.KillAndReap(pid=victim.pid)
        event = next(replies)["event"]
    assert event["kind"] == "process"
    assert event["rule"] == report["rule"]
    assert event["bytesReleased"] == report["bytesReleased"]
    (v,) = event["victims"]
    assert v["process"]["pid"] == victim.pid
    assert v["outcome"] == report["outcome"]
    assert v["seenAs"] == "root"
    assert victim.proc.wait(timeout=10) == -9
