#!/usr/bin/env python3
"""Runs a command (the builder's nix-store) and damages its input (up) or its
output (down) at byte OFFSET: 'flip' inverts that byte, 'cut' ends the stream
there. Exits as soon as the command does, like the command alone would.
Used as a test builder's `remote-program` to corrupt a transfer in flight.
usage: mangle.py up|down flip|cut OFFSET CMD ARGS..."""
import os, subprocess, sys, threading
direction, mode, offset, cmd = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]

def pump(src, dst, close_dst):
    pos = 0
    try:
        while True:
            b = os.read(src, 65536)
            if not b:
                break
            if pos <= offset < pos + len(b):
                i = offset - pos
                if mode == "cut":
                    os.write(dst, b[:i]); break
                b = b[:i] + bytes([b[i] ^ 0xFF]) + b[i + 1:]
            pos += len(b)
            while b:
                b = b[os.write(dst, b):]
    except OSError:
        pass
    if close_dst:
        os.close(dst)

if direction == "up":
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE)
    threading.Thread(target=pump, args=(0, p.stdin.fileno(), True), daemon=True).start()
    os._exit(p.wait())
else:
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE)
    pump(p.stdout.fileno(), 1, False)
    os._exit(p.wait() if mode != "cut" else 0)
