# SPDX-License-Identifier: MIT OR Apache-2.0
"""reapd's gRPC API from an independent client: Python grpcio.

Stubs are generated at test time from proto/reapd/v1/reaper.proto with
grpc_tools, so the test exercises the published IDL, not Rust's view of it.
grpcio needs `grpc.default_authority` for a Unix-socket target.
"""
import importlib
import signal
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from conftest import REPO, Broker, Victim, probe_kill_path


@pytest.fixture(scope="session")
def pb(tmp_path_factory):
    from grpc_tools import protoc

    out = tmp_path_factory.mktemp("gen")
    proto_root = REPO / "proto"
    rc = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{proto_root}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            str(proto_root / "reapd" / "v1" / "reaper.proto"),
        ]
    )
    assert rc == 0
    sys.path.insert(0, str(out))
    messages = importlib.import_module("reapd.v1.reaper_pb2")
    services = importlib.import_module("reapd.v1.reaper_pb2_grpc")
    return messages, services


def channel(broker, **options):
    opts = [("grpc.default_authority", "localhost")] + list(options.items())
    return grpc.insecure_channel(f"unix:{broker.grpc}", options=opts)


def test_get_capabilities(broker, pb):
    messages, services = pb
    with channel(broker) as ch:
        caps = services.ReaperStub(ch).GetCapabilities(messages.GetCapabilitiesRequest(), timeout=10)
    expected = probe_kill_path()
    assert caps.process_mrelease == (expected != "kill_only")
    assert caps.kill_path == messages.KillPath.Value("KILL_PATH_" + expected.upper())
    assert caps.kernel_release == open("/proc/sys/kernel/osrelease").read().strip()
    assert caps.broker_version


def test_check_permission_and_kill_and_reap(broker, pb, victim):
    messages, services = pb
    with channel(broker) as ch:
        stub = services.ReaperStub(ch)
        target = messages.Target(pid=victim.pid, start_time=victim.start_time())
        check = stub.CheckPermission(messages.CheckPermissionRequest(target=target), timeout=10)
        assert check.allowed, check.reason
        assert "kill(2)" in check.reason
        assert check.target.pid == victim.pid
        reply = stub.KillAndReap(messages.KillAndReapRequest(target=target, wait_for_exit_ms=2000), timeout=10)
    assert reply.outcome in (messages.OUTCOME_REAPED, messages.OUTCOME_EXITED_BEFORE_REAP)
    assert reply.kill_path == messages.KILL_PATH_KILL_THEN_MRELEASE
    assert reply.target.pid == victim.pid
    assert reply.memory_before.anon_bytes >= 4 << 20
    assert reply.exited
    assert victim.proc.wait(timeout=5) == -signal.SIGKILL


def test_status_codes(broker, pb, victim):
    messages, services = pb
    with channel(broker) as ch:
        stub = services.ReaperStub(ch)

        def code_of(pid, start_time=None):
            target = messages.Target(pid=pid)
            if start_time is not None:
                target.start_time = start_time
            with pytest.raises(grpc.RpcError) as err:
                stub.KillAndReap(messages.KillAndReapRequest(target=target), timeout=10)
            return err.value.code()

        assert code_of(0) == grpc.StatusCode.INVALID_ARGUMENT
        assert code_of(-5) == grpc.StatusCode.INVALID_ARGUMENT
        assert code_of(1) == grpc.StatusCode.PERMISSION_DENIED
        assert code_of(2**31 - 1) == grpc.StatusCode.NOT_FOUND
        assert code_of(broker.proc.pid) == grpc.StatusCode.PERMISSION_DENIED
        assert code_of(victim.pid, victim.start_time() + 1) == grpc.StatusCode.FAILED_PRECONDITION
        with pytest.raises(grpc.RpcError) as err:
            stub.KillAndReap(messages.KillAndReapRequest(), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert victim.proc.poll() is None


def test_oversized_message_is_refused_and_the_broker_keeps_serving(broker, pb):
    messages, services = pb
    with channel(broker, **{"grpc.max_send_message_length": 32 << 20}) as ch:
        raw = ch.unary_unary("/reapd.v1.Reaper/CheckPermission")
        with pytest.raises(grpc.RpcError) as err:
            raw(b"\x0a" + b"\xff" * (16 << 20), timeout=20)
        assert err.value.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.OUT_OF_RANGE)
        # Undecodable bytes: a precise error, never INTERNAL.
        with pytest.raises(grpc.RpcError) as err:
            raw(b"\x0a\x05\xff\xff", timeout=10)
        assert err.value.code() != grpc.StatusCode.INTERNAL
    with channel(broker) as ch:
        caps = services.ReaperStub(ch).GetCapabilities(messages.GetCapabilitiesRequest(), timeout=10)
    assert caps.process_mrelease


def test_health_and_reflection(broker):
    with channel(broker) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        reply = health.Check(health_pb2.HealthCheckRequest(service="reapd.v1.Reaper"), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        # Both reflection versions: v1alpha is what grpcio-reflection's
        # client (and older grpcurl) speaks, v1 the current one.
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        responses = list(
            refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
        )
        v1alpha = {s.name for s in responses[0].list_services_response.service}
        v1 = set(reflect_v1(ch))
        # Each version lists itself; apart from that they agree.
        assert v1alpha - {"grpc.reflection.v1alpha.ServerReflection"} == v1 - {"grpc.reflection.v1.ServerReflection"}
        assert {"reapd.v1.Reaper", "grpc.health.v1.Health"} <= v1


def reflect_v1(ch):
    """List services through grpc.reflection.v1 (hand-rolled: same messages
    as v1alpha on the wire, different service name)."""
    call = ch.stream_stream(
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    responses = list(call(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10))
    return [s.name for s in responses[0].list_services_response.service]


def test_rate_limited_carries_the_retry_after_ms_trailer(tmp_path, pb):
    """RESOURCE_EXHAUSTED comes with the documented `retry-after-ms` trailer:
    the milliseconds until the caller's next token (about 10 s here)."""
    messages, services = pb
    policy = tmp_path / "policy.toml"
    policy.write_text("[limits]\nkills = 1\ninterval-secs = 10.0\nburst = 1\n")
    b = Broker(["--policy", str(policy)])
    victims = [Victim(size=4096), Victim(size=4096)]
    try:
        with channel(b) as ch:
            stub = services.ReaperStub(ch)
            # The bucket is made (full) at the first kill, no earlier.
            first_kill = time.monotonic()
            stub.KillAndReap(messages.KillAndReapRequest(target=messages.Target(pid=victims[0].pid)), timeout=10)
            with pytest.raises(grpc.RpcError) as err:
                stub.KillAndReap(messages.KillAndReapRequest(target=messages.Target(pid=victims[1].pid)), timeout=10)
            elapsed_ms = (time.monotonic() - first_kill) * 1000
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        trailers = dict(err.value.trailing_metadata())
        # 10 s per token, the one token spent: 10 s less the time since.
        retry = int(trailers["retry-after-ms"])
        assert 10000 - elapsed_ms - 1 <= retry <= 10000, (trailers, elapsed_ms)
        assert victims[1].proc.poll() is None
    finally:
        for v in victims:
            v.close()
        b.stop()


def test_kill_cgroup_over_grpc(broker, pb):
    """KillCgroup from an independent client: every member killed and reaped."""
    import os
    import pathlib

    messages, services = pb
    mount = next(
        line.split(" - ")[0].split()[4]
        for line in open("/proc/self/mountinfo")
        if line.split(" - ")[1].split()[0] == "cgroup2"
    )
    name = f"reapd-py-{os.getpid()}.scope"
    group = pathlib.Path(mount) / name
    group.mkdir()
    victims = [Victim(size=1 << 20) for _ in range(3)]
    try:
        for v in victims:
            (group / "cgroup.procs").write_text(str(v.pid))
        with channel(broker) as ch:
            reply = services.ReaperStub(ch).KillCgroup(messages.KillCgroupRequest(cgroup="/" + name), timeout=10)
        assert reply.cgroup == "/" + name
        assert sorted(m.process.pid for m in reply.members) == sorted(v.pid for v in victims)
        for v in victims:
            assert v.proc.wait(timeout=5) == -signal.SIGKILL
        with pytest.raises(grpc.RpcError) as err:
            with channel(broker) as ch:
                services.ReaperStub(ch).KillCgroup(messages.KillCgroupRequest(cgroup="/no/such/group"), timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        for v in victims:
            v.close()
        group.rmdir()


def test_refusals_carry_error_info_details(broker, pb):
    """PERMISSION_DENIED comes with a google.rpc.ErrorInfo (grpcio-status):
    reason = the decision kind, metadata = kind and rule."""
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    messages, services = pb
    with channel(broker) as ch:
        with pytest.raises(grpc.RpcError) as err:
            services.ReaperStub(ch).KillAndReap(messages.KillAndReapRequest(target=messages.Target(pid=1)), timeout=10)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    status = rpc_status.from_call(err.value)
    infos = [d for d in status.details if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR)]
    assert len(infos) == 1
    info = error_details_pb2.ErrorInfo()
    infos[0].Unpack(info)
    assert info.reason == "PROTECTED"
    assert info.domain == "reapd.v1"
    assert dict(info.metadata) == {"kind": "protected", "rule": "protect:init"}


def test_watch_kills_streams_one_event_per_kill(broker, pb, victim):
    """A server stream from grpcio: subscribed once the initial metadata
    arrives; the kill's event says what the kill's reply said."""
    messages, services = pb
    with channel(broker) as ch:
        stub = services.ReaperStub(ch)
        events = stub.WatchKills(messages.WatchKillsRequest(), timeout=30)
        events.initial_metadata()  # the subscription exists from here on
        reply = stub.KillAndReap(messages.KillAndReapRequest(target=messages.Target(pid=victim.pid)), timeout=10)
        event = next(events)
        events.cancel()
    assert event.kind == messages.KILL_KIND_PROCESS
    assert event.sequence == 1
    assert event.complete and event.dropped == 0
    assert event.rule == reply.rule == "kill(2)"
    assert event.requester.uid == 0
    assert event.bytes_released == reply.bytes_released
    (v,) = event.victims
    assert v.process.pid == victim.pid
    assert v.outcome == reply.outcome
    assert v.seen_as == "root"
    assert v.memory_before.anon_bytes >= 4 << 20
