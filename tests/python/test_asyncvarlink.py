# SPDX-License-Identifier: MIT OR Apache-2.0
"""Passing a pidfd to reapd from an independent, fd-capable varlink client:
asyncvarlink (PyPI), which sends file descriptors as systemd does (SCM_RIGHTS
with the call, parameters naming them by index).

The client declares the part of io.reapd.Reaper it uses as typed Python
methods; asyncvarlink turns the FileDescriptor argument into an index and
attaches the fd itself. This is the README's varlink recipe.
"""
import asyncio
import os
import signal
import typing

import asyncvarlink
import pytest

from conftest import Victim


class Permission(typing.TypedDict):
    allowed: bool
    reason: str
    target: typing.Any
    kind: str
    rule: str


class KillReport(typing.TypedDict):
    outcome: str
    notReapedReason: str
    killPath: str
    target: typing.Any
    memoryBefore: typing.Any
    bytesReleased: int
    killToReapNs: int
    exited: bool
    rule: str
    reapRetries: int


class Reaper(asyncvarlink.VarlinkInterface, name="io.reapd.Reaper"):
    """The client's view of io.reapd.Reaper: only the types matter here
    (nested records are left untyped)."""

    @asyncvarlink.varlinkmethod(allow_foreign=True)
    def KillAndReap(
        self,
        *,
        pidfd: asyncvarlink.FileDescriptor | None = None,
        waitForExitMs: int | None = None,
    ) -> KillReport:
        raise NotImplementedError

    @asyncvarlink.varlinkmethod(allow_foreign=True)
    def CheckPermission(self, *, pidfd: asyncvarlink.FileDescriptor | None = None) -> Permission:
        raise NotImplementedError


async def call(socket_path, method, **params):
    transport, protocol = await asyncvarlink.connect_unix_varlink(
        asyncvarlink.VarlinkClientProtocol, socket_path
    )
    try:
        proxy = asyncvarlink.VarlinkInterfaceProxy(protocol, Reaper)
        return await getattr(proxy, method)(**params)
    finally:
        transport.close()


def test_pidfd_passed_by_asyncvarlink_names_the_target(broker):
    victim = Victim()
    pidfd = os.pidfd_open(victim.pid)
    try:
        check = asyncio.run(
            call(broker.varlink, "CheckPermission", pidfd=asyncvarlink.FileDescriptor(pidfd))
        )
        assert check["allowed"], check
        assert check["target"]["pid"] == victim.pid
        reply = asyncio.run(
            call(
                broker.varlink,
                "KillAndReap",
                pidfd=asyncvarlink.FileDescriptor(pidfd),
                waitForExitMs=2000,
            )
        )
        assert reply["outcome"] in ("reaped", "exited_before_reap"), reply
        assert reply["target"]["pid"] == victim.pid
        assert reply["exited"]
        assert victim.proc.wait(timeout=5) == -signal.SIGKILL
    finally:
        os.close(pidfd)
        victim.close()


def test_a_non_pidfd_is_refused_as_invalid_parameter(broker):
    read_end, write_end = os.pipe()
    try:
        with pytest.raises(asyncvarlink.VarlinkErrorReply) as refused:
            asyncio.run(call(broker.varlink, "CheckPermission", pidfd=asyncvarlink.FileDescriptor(read_end)))
        assert refused.value.name == "org.varlink.service.InvalidParameter"
        assert refused.value.parameters == {"parameter": "pidfd"}
    finally:
        os.close(read_end)
        os.close(write_end)
