# SPDX-License-Identifier: MIT OR Apache-2.0
"""The README's gRPC client recipes, each executed as written there.

- grpcio on a `unix:` target with `grpc.default_authority` = "localhost";
- grpcio-reflection's descriptor database (speaks reflection v1alpha only)
  discovering the API from the broker, then a call built from what it found;
- what happens without a usable `:authority`: the stream is reset (grpcio
  reports INTERNAL) and the broker says why in one rate-limited warning.
"""
import grpc
from google.protobuf import descriptor_pool, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

SOCKET_OPTIONS = [("grpc.default_authority", "localhost")]


def test_recipe_grpcio_unix_target_with_localhost_authority(broker):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"unix:{broker.grpc}", options=SOCKET_OPTIONS) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="reapd.v1.Reaper"), timeout=10
        )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_recipe_reflection_v1alpha_descriptor_database(broker):
    with grpc.insecure_channel(f"unix:{broker.grpc}", options=SOCKET_OPTIONS) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = database.get_services()
        assert "reapd.v1.Reaper" in services
        pool = descriptor_pool.DescriptorPool(database)
        reaper = pool.FindServiceByName("reapd.v1.Reaper")
        assert {m.name for m in reaper.methods} >= {"KillAndReap", "CheckPermission", "GetCapabilities"}
        # A call built only from what reflection said: no generated stubs.
        method = reaper.methods_by_name["GetCapabilities"]
        request_type = message_factory.GetMessageClass(method.input_type)
        reply_type = message_factory.GetMessageClass(method.output_type)
        call = channel.unary_unary(
            "/reapd.v1.Reaper/GetCapabilities",
            request_serializer=request_type.SerializeToString,
            response_deserializer=reply_type.FromString,
        )
        caps = call(request_type(), timeout=10)
    assert caps.kernel_release == open("/proc/sys/kernel/osrelease").read().strip()


def test_a_path_as_authority_is_refused_with_one_warning(broker):
    # What grpc-java, grpc-swift or grpcurl without -authority send for a
    # Unix socket: the path. Three attempts, one warning (rate limit).
    options = [("grpc.default_authority", broker.grpc)]
    for _ in range(3):
        with grpc.insecure_channel(f"unix:{broker.grpc}", options=options) as channel:
            call = channel.unary_unary(
                "/grpc.health.v1.Health/Check",
                request_serializer=lambda _: b"",
                response_deserializer=lambda data: data,
            )
            try:
                call(None, timeout=10)
                raise AssertionError("a path authority was served")
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.INTERNAL, err
    log = broker.log_text()
    warnings = [line for line in log.splitlines() if "refused a gRPC stream: its :authority" in line]
    assert len(warnings) == 1, log
    assert "grpc.default_authority=localhost" in warnings[0]
