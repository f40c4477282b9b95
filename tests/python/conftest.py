# SPDX-License-Identifier: MIT OR Apache-2.0
"""Fixtures shared by the Python client tests: a broker on a private socket.

The broker binary comes from REAPD_BIN_DIR (default: <repo>/target/debug);
the test runner builds it first. Tests run as root, like CI.
"""
import os
import pathlib
import socket
import subprocess
import tempfile
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
BIN_DIR = pathlib.Path(os.environ.get("REAPD_BIN_DIR", REPO / "target" / "debug"))


class Broker:
    def __init__(self, extra_args=()):
        self.dir = tempfile.TemporaryDirectory(prefix="reapd-py-")
        os.chmod(self.dir.name, 0o755)
        self.grpc = os.path.join(self.dir.name, "grpc.sock")
        self.varlink = os.path.join(self.dir.name, "io.reapd.Reaper")
        self.log_path = os.path.join(self.dir.name, "reapd.log")
        # Hermetic: never the host's /etc/reapd/policy.toml. An empty file is
        # the built-in default.
        if "--policy" not in extra_args:
            empty = os.path.join(self.dir.name, "policy.toml")
            open(empty, "w").close()
            extra_args = ("--policy", empty, *extra_args)
        args = [str(BIN_DIR / "reapd"), "--grpc-socket", self.grpc, *extra_args]
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self.log)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(self.grpc)
                return
            except OSError:
                if self.proc.poll() is not None:
                    break
                time.sleep(0.02)
        raise RuntimeError("broker did not start: " + open(self.log_path).read())

    def stop(self):
        self.proc.kill()
        self.proc.wait()
        self.log.close()
        self.dir.cleanup()

    def log_text(self):
        return open(self.log_path).read()


def probe_kill_path():
    """The kill path the broker should pick on this kernel, probed here the
    way the broker does it: process_mrelease(-1, flags) answers EBADF for
    known flags, EINVAL for unknown ones, ENOSYS without the syscall."""
    import ctypes
    import errno

    libc = ctypes.CDLL(None, use_errno=True)
    SYS_process_mrelease = 448

    def errno_of(flags):
        libc.syscall(SYS_process_mrelease, -1, flags)
        return ctypes.get_errno()

    if errno_of(0) == errno.ENOSYS:
        return "kill_only"
    return "reap_kill" if errno_of(1) == errno.EBADF else "kill_then_mrelease"


@pytest.fixture
def broker():
    b = Broker()
    yield b
    b.stop()


class Victim:
    """A child that touches `size` bytes of anonymous memory and sleeps."""

    def __init__(self, size=4 << 20, uid=None):
        code = (
            "import mmap,os,sys,time\n"
            f"m=mmap.mmap(-1,{size},flags=mmap.MAP_PRIVATE|mmap.MAP_ANONYMOUS)\n"
            f"for i in range(0,{size},4096): m[i]=1\n"
            "sys.stdout.write('r'); sys.stdout.flush()\n"
            "time.sleep(3600)\n"
        )
        preexec = (lambda: os.setresuid(uid, uid, uid)) if uid is not None else None
        self.proc = subprocess.Popen(["python3", "-c", code], stdout=subprocess.PIPE, preexec_fn=preexec)
        assert self.proc.stdout.read(1) == b"r"
        self.pid = self.proc.pid

    def start_time(self):
        stat = open(f"/proc/{self.pid}/stat").read()
        return int(stat[stat.rindex(")") + 2 :].split()[19])

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.fixture
def victim():
    v = Victim()
    yield v
    v.close()
