#!/usr/bin/env python3
"""A hostile builder: a fake `nix-store --serve --write` (used as the test
builder's `remote-program`) that speaks just enough of the serve protocol to
take a build and then lie about its output. It says every input is valid,
"builds" without building, and answers QueryPathInfos and DumpStorePath as
MODE says. Never used for real work; see tests/faults.sh.

usage: fake-builder.py MODE [ignored nix-store arguments...]
MODE: deriver-newline | ref-outside-store | ref-unknown | nar-longer |
      nar-shorter | nar-endless | bad-hash | fixed-forged
"""
import hashlib, os, struct, sys

MODE = sys.argv[1]
rd, wr = sys.stdin.buffer, sys.stdout.buffer

def u64():
    b = rd.read(8)
    if len(b) < 8:
        sys.exit(0)
    return struct.unpack("<Q", b)[0]

def bstr():
    n = u64(); b = rd.read(n); rd.read((8 - n % 8) % 8); return b

def strs():
    return [bstr() for _ in range(u64())]

def w64(v): wr.write(struct.pack("<Q", v))

def wstr(b):
    if isinstance(b, str): b = b.encode()
    w64(len(b)); wr.write(b); wr.write(b"\0" * ((8 - len(b) % 8) % 8))

def wstrs(l):
    w64(len(l))
    for x in l: wstr(x)

def nar_file(contents):
    out = []
    def s(b):
        if isinstance(b, str): b = b.encode()
        out.append(struct.pack("<Q", len(b)) + b + b"\0" * ((8 - len(b) % 8) % 8))
    for t in ["nix-archive-1", "(", "type", "regular", "contents"]: s(t)
    s(contents)
    s(")")
    return b"".join(out)

B32 = "0123456789abcdfghijklmnpqrsvwxyz"
def nix32(h):
    n = len(h) * 8 // 5 + (1 if len(h) * 8 % 5 else 0)
    out = []
    for i in range(n - 1, -1, -1):
        b = i * 5; j, k = b // 8, b % 8
        c = (h[j] >> k) | ((h[j + 1] << (8 - k)) if j + 1 < len(h) else 0)
        out.append(B32[c & 0x1f])
    return "".join(out)

outputs = []          # output paths of the "built" derivation
content = b"forged\n" if MODE == "fixed-forged" else b"built by a liar\n"
nar = nar_file(content)
store = "/nix/store"

# handshake
assert u64() == 0x390c9deb
u64()
w64(0x5452eecb); w64(0x207); wr.flush()
while True:
    cmd = u64()
    if cmd == 1:                      # QueryValidPaths: everything is valid here
        u64(); u64(); paths = strs(); wstrs(paths)
    elif cmd == 8:                    # BuildDerivation: read it, "build" nothing
        bstr()
        for _ in range(u64()):
            name, path, algo, h = bstr(), bstr(), bstr(), bstr(); outputs.append(path.decode())
        strs(); bstr(); bstr(); strs()
        for _ in range(u64()): bstr(); bstr()
        for _ in range(6): u64()      # build options of protocol 2.7
        w64(0); wstr(""); w64(1); w64(0); w64(0); w64(0); w64(0)
    elif cmd == 2:                    # QueryPathInfos: the lies
        for p in strs():
            p = p.decode()
            size, h = len(nar), "sha256:" + nix32(hashlib.sha256(nar).digest())
            deriver, refs = "", []
            forged = store + "/" + "0" * 32 + "-forged"
            if MODE == "deriver-newline":
                deriver = store + "/" + "1" * 32 + "-x.drv\n" + forged + "\n" + h + "\n120\n\n0"
            elif MODE == "ref-outside-store":
                refs = ["/etc/passwd"]
            elif MODE == "ref-unknown":
                refs = [forged]
            elif MODE == "nar-longer":
                size = 120
            elif MODE == "nar-shorter":
                size = len(nar) + 64
            elif MODE == "nar-endless":
                size = 1 << 20
            elif MODE == "bad-hash":
                h = "sha256:" + nix32(hashlib.sha256(b"something else").digest())
            wstr(p); wstr(deriver); wstrs(refs); w64(0); w64(size); wstr(h); wstr(""); wstrs([])
        wstr("")
    elif cmd == 3:                    # DumpStorePath
        bstr()
        if MODE == "nar-endless":
            head = b"".join(struct.pack("<Q", len(t)) + t + b"\0" * ((8 - len(t) % 8) % 8) for t in [b"nix-archive-1", b"(", b"type", b"regular", b"contents"])
            wr.write(head + struct.pack("<Q", 1 << 40)); wr.flush()
            zeros = b"\0" * 65536
            try:
                while True: wr.write(zeros)
            except BrokenPipeError:
                sys.exit(0)
        wr.write(nar)
    else:
        sys.stderr.write(f"fake-builder: command {cmd} not faked\n"); sys.exit(1)
    wr.flush()
