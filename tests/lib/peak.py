#!/usr/bin/env python3
"""Reads an events file ("<host> start|stop <unix time> <name>" per line) and
prints, per host, the peak number of builds running at once, as "host peak"."""
import sys
from collections import defaultdict
evs = defaultdict(list)
for line in open(sys.argv[1]):
    parts = line.split()
    if len(parts) < 3:
        continue
    host, kind, t = parts[0], parts[1], float(parts[2])
    # at equal times, count stops before starts
    evs[host].append((t, 0 if kind == "stop" else 1))
for host in sorted(evs):
    cur = peak = 0
    for _, k in sorted(evs[host]):
        cur += 1 if k else -1
        peak = max(peak, cur)
    print(host, peak)
