#!/usr/bin/env python3
# SPDX-License-Identifier: MIT OR Apache-2.0
"""Cost of big varlink messages (docs/threats.md, issue 13 wire pass).

wire-cost.py SOCKET BROKER_PID KEYS SECONDS [METHOD]

One connection sends CheckPermission (or METHOD) calls of KEYS unknown
parameters back to back for SECONDS and reports the broker's CPU per call
(utime+stime from /proc). Meanwhile a separate process makes one
GetCapabilities call every 20 ms on fresh connections and reports its
latency percentiles: what the flood costs other callers.
"""
import json, os, socket, sys, time

path, bpid, nkeys, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
method = sys.argv[5] if len(sys.argv) > 5 else "io.reapd.Reaper.CheckPermission"
params = {"pid": 1}
params.update({"zz%05d" % i: 0 for i in range(nkeys)})
msg = json.dumps({"method": method, "parameters": params}).encode() + b"\0"
assert len(msg) <= 64 * 1024, "over the broker's 64 KiB message limit"


def cpu():
    fields = open("/proc/%d/stat" % bpid).read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def reply(s, buf=b""):
    while b"\0" not in buf:
        data = s.recv(65536)
        if not data:
            raise EOFError
        buf += data
    return buf[buf.index(b"\0") + 1:]


stop = time.time() + seconds
child = os.fork()
if child == 0:
    lat = []
    while time.time() < stop:
        s = socket.socket(socket.AF_UNIX)
        s.connect(path)
        t = time.time()
        s.sendall(b'{"method":"io.reapd.Reaper.GetCapabilities"}\0')
        reply(s)
        lat.append(time.time() - t)
        s.close()
        time.sleep(0.02)
    lat.sort()
    print("other caller: n=%d p50 %.1f ms p99 %.1f ms max %.1f ms" % (
        len(lat), 1000 * lat[len(lat) // 2], 1000 * lat[int(len(lat) * 0.99)], 1000 * lat[-1]))
    os._exit(0)
c0, t0, calls = cpu(), time.time(), 0
s = socket.socket(socket.AF_UNIX)
s.connect(path)
buf = b""
while time.time() < stop:
    s.sendall(msg)
    buf = reply(s, buf)
    calls += 1
os.waitpid(child, 0)
used = cpu() - c0
print("%d bytes, %d keys: %d calls in %.1f s, broker CPU %.3f ms per call" % (
    len(msg), len(params), calls, time.time() - t0, 1000 * used / max(1, calls)))
