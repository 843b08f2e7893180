#!/usr/bin/env python3
"""Client half of Nix's worker protocol, independent of remote-lib's, used by
record-worker.sh to drive a real nix-daemon and record what it answers.

    record-worker.py trusted   OUT_PREFIX  (speaks to `nix-daemon --stdio` on stdin/stdout pipes it starts;
                                            WG_DAEMON, a JSON list, is the command instead when set)
    record-worker.py untrusted OUT_PREFIX SOCKET  (connects to a socket-mode daemon; run as a non-trusted user)

Writes OUT_PREFIX-s2c.bin (every byte the daemon sent) and, for the trusted
session, OUT_PREFIX-c2s.bin (every byte this client sent). Paths and
derivations come from the environment record-worker.sh sets (WG_*).
"""
import json
import os
import socket
import struct
import subprocess
import sys

LAST, NEXT, ERROR = 0x616C7473, 0x6F6C6D67, 0x63787470
START, STOP, RESULT = 0x53545254, 0x53544F50, 0x52534C54


class Conn:
    def __init__(self, rfile, wfile):
        self.rf, self.wf = rfile, wfile
        self.s2c, self.c2s = bytearray(), bytearray()
        self.out = bytearray()

    # writing
    def u64(self, v):
        self.out += struct.pack("<Q", v)

    def bytes_(self, b):
        self.u64(len(b))
        self.out += b + b"\0" * ((8 - len(b) % 8) % 8)

    def str_(self, s):
        self.bytes_(s.encode())

    def strs(self, xs):
        self.u64(len(xs))
        for x in xs:
            self.str_(x)

    def flush(self):
        self.c2s += self.out
        self.wf.write(bytes(self.out))
        self.wf.flush()
        self.out = bytearray()

    def framed(self, payload):
        for i in range(0, len(payload), 65536):
            chunk = payload[i:i + 65536]
            self.u64(len(chunk))
            self.out += chunk
        self.u64(0)

    # reading
    def read(self, n):
        b = b""
        while len(b) < n:
            c = self.rf.read(n - len(b))
            if not c:
                raise EOFError("daemon closed the connection")
            b += c
        self.s2c += b
        return b

    def r64(self):
        return struct.unpack("<Q", self.read(8))[0]

    def rbytes(self):
        n = self.r64()
        b = self.read(n)
        self.read((8 - n % 8) % 8)
        return b

    def rstrs(self):
        return [self.rbytes().decode() for _ in range(self.r64())]

    def fields(self):
        out = []
        for _ in range(self.r64()):
            out.append(self.r64() if self.r64() == 0 else self.rbytes().decode(errors="replace"))
        return out

    def stderr(self, version):
        """Returns None after STDERR_LAST, the error message after STDERR_ERROR."""
        while True:
            t = self.r64()
            if t == LAST:
                return None
            if t == NEXT:
                print("  log:", self.rbytes().decode(errors="replace").rstrip(), file=sys.stderr)
            elif t == START:
                aid, lvl, typ, text = self.r64(), self.r64(), self.r64(), self.rbytes()
                self.fields()
                self.r64()
                print("  start", aid, typ, text.decode(errors="replace"), file=sys.stderr)
            elif t == STOP:
                self.r64()
            elif t == RESULT:
                self.r64(), self.r64(), self.fields()
            elif t == ERROR:
                if version >= 26:
                    assert self.rbytes() == b"Error"
                    self.r64()
                    self.rbytes()
                    msg = self.rbytes().decode(errors="replace")
                    assert self.r64() == 0
                    for _ in range(self.r64()):
                        self.r64(), self.rbytes()
                else:
                    msg = self.rbytes().decode(errors="replace")
                    self.r64()
                print("  error:", msg, file=sys.stderr)
                return msg
            else:
                raise RuntimeError("unknown stderr tag %x" % t)


def handshake(c):
    c.u64(0x6E697863)
    c.u64(0x126)  # 1.38
    c.flush()
    assert c.r64() == 0x6478696F
    minor = min(c.r64() & 0xFF, 38)
    if minor >= 38:
        c.strs([])
        c.flush()
        c.rstrs()
    c.u64(0)  # cpu affinity
    c.u64(0)  # reserveSpace
    c.flush()
    if minor >= 33:
        print("daemon", c.rbytes().decode(), file=sys.stderr)
    if minor >= 35:
        print("trust", c.r64(), file=sys.stderr)
    assert c.stderr(minor) is None
    return minor


def info_fields(c, p):
    c.str_(p["deriver"])
    c.str_(p["hash"])
    c.strs(p["refs"])
    c.u64(0)
    c.u64(len(p["nar"]))
    c.u64(0)
    c.strs([])
    c.str_(p["ca"])


def add_to_store_nar(c, minor, p, hash_override=None):
    c.u64(39)
    c.str_(p["path"])
    info_fields(c, dict(p, hash=hash_override or p["hash"]))
    c.u64(0)  # repair
    c.u64(1)  # dontCheckSigs (a daemon that does not trust us ignores it)
    c.flush()
    c.framed(p["nar"])
    c.flush()
    return c.stderr(minor)


def basic_drv(c, drv_path, show):
    d = show[drv_path]
    c.u64(36)
    c.str_(drv_path)
    outs = sorted(d["outputs"].items())
    c.u64(len(outs))
    for name, o in outs:
        c.str_(name), c.str_(o["path"]), c.str_(o.get("hashAlgo", "")), c.str_(o.get("hash", ""))
    c.strs(sorted(d["inputSrcs"]))
    c.str_(d["system"]), c.str_(d["builder"]), c.strs(d["args"])
    env = sorted(d["env"].items())
    c.u64(len(env))
    for k, v in env:
        c.str_(k), c.str_(v)
    c.u64(0)  # buildMode normal
    c.flush()


def build_result(c, minor):
    status, msg = c.r64(), c.rbytes()
    c.r64(), c.r64(), c.r64(), c.r64()  # timesBuilt, isNonDeterministic, startTime, stopTime
    if minor >= 37:  # cpuUser, cpuSystem: each an optional microsecond count
        for _ in range(2):
            if c.r64():
                c.r64()
    for _ in range(c.r64()):
        c.rbytes(), c.rbytes()
    print("  build status", status, msg.decode(errors="replace"), file=sys.stderr)


def main():
    mode, prefix = sys.argv[1], sys.argv[2]
    env = os.environ
    hello = {"path": env["WG_HELLO"], "deriver": "", "hash": env["WG_HELLO_HASH"], "refs": [], "ca": env["WG_HELLO_CA"],
             "nar": open(env["WG_HELLO_NAR"], "rb").read()}
    dirp = {"path": env["WG_DIR"], "deriver": "", "hash": env["WG_DIR_HASH"], "refs": [], "ca": env["WG_DIR_CA"],
            "nar": open(env["WG_DIR_NAR"], "rb").read()}
    ia = {"path": env["WG_IA"], "deriver": "", "hash": env["WG_HELLO_HASH"], "refs": [env["WG_HELLO"]], "ca": "",
          "nar": hello["nar"]}
    missing = env["WG_MISSING"]
    show = json.loads(open(env["WG_SHOW"]).read())
    if mode == "trusted":
        cmd = json.loads(env["WG_DAEMON"]) if env.get("WG_DAEMON") else ["nix-daemon", "--stdio"]
        daemon = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        c = Conn(daemon.stdout, daemon.stdin)
        minor = handshake(c)
        # SetOptions: keepFailed, keepGoing, tryFallback, verbosity, maxBuildJobs, maxSilentTime,
        # useBuildHook, verboseBuild, logType, printBuildTrace, buildCores, useSubstitutes, overrides
        c.u64(19)
        for v in [0, 0, 0, 3, 1, 0, 1, 0, 0, 0, 0, 0]:
            c.u64(v)
        c.u64(1)
        c.str_("builders"), c.str_("")
        c.flush()
        assert c.stderr(minor) is None
        for upload in (True, False):
            c.u64(31), c.strs(sorted([hello["path"], missing])), c.u64(0), c.flush()
            assert c.stderr(minor) is None
            print("  valid", c.rstrs(), file=sys.stderr)
            if upload:
                assert add_to_store_nar(c, minor, hello) is None
        for p in (hello["path"], missing):
            c.u64(26), c.str_(p), c.flush()
            assert c.stderr(minor) is None
            if c.r64():
                c.rbytes(), c.rbytes(), c.rstrs(), c.r64(), c.r64(), c.r64(), c.rstrs(), c.rbytes()
        assert add_to_store_nar(c, minor, dict(hello, path=env["WG_BAD"], ca=""), hash_override="0" * 64) is not None
        # AddMultipleToStore: dir (content-addressed) and ia (input-addressed, refers to hello)
        c.u64(44), c.u64(0), c.u64(1), c.flush()
        payload = Conn(None, None)
        payload.u64(2)
        for p in (dirp, ia):
            payload.str_(p["path"])
            info_fields(payload, p)
            payload.out += p["nar"]
        c.framed(bytes(payload.out))
        c.flush()
        assert c.stderr(minor) is None
        c.u64(38), c.str_(hello["path"]), c.flush()
        assert c.stderr(minor) is None
        assert c.read(len(hello["nar"])) == hello["nar"]
        for drv in (env["WG_DRV_OK"], env["WG_DRV_FAIL"]):
            basic_drv(c, drv, show)
            assert c.stderr(minor) is None
            build_result(c, minor)
        c.u64(43), c.str_("sha256:" + "0" * 64 + "!out"), c.flush()
        if c.stderr(minor) is None:
            print("  realisations", c.rstrs(), file=sys.stderr)
        # last, as it ends the session: the NAR of a path that does not exist
        c.u64(38), c.str_(missing), c.flush()
        assert c.stderr(minor) is None
        daemon.stdin.close()
        c.s2c += daemon.stdout.read()
        daemon.wait(timeout=30)
        open(prefix + "-c2s.bin", "wb").write(c.c2s)
    else:
        s = socket.socket(socket.AF_UNIX)
        s.connect(sys.argv[3])
        c = Conn(s.makefile("rb"), s.makefile("wb"))
        minor = handshake(c)
        assert add_to_store_nar(c, minor, ia) is not None
        basic_drv(c, env["WG_DRV_OK"], show)
        assert c.stderr(minor) is not None
        c.u64(26), c.str_(hello["path"]), c.flush()
        assert c.stderr(minor) is None
        c.r64(), c.rbytes(), c.rbytes(), c.rstrs(), c.r64(), c.r64(), c.r64(), c.rstrs(), c.rbytes()
        s.shutdown(socket.SHUT_WR)
        c.s2c += c.rf.read()
    open(prefix + "-s2c.bin", "wb").write(c.s2c)


main()
