# A made-up build history for the learned-speed examples in
# docs/operations.md: two builders, 2 slots each, both configured speed 1;
# the second really builds 1.8x as fast. Four rounds of 14 derivations two
# hours apart, scheduled as Nix's rule would (ties to the first in the list).
# Usage: python3 bench/learned-history.py LOAD_DIR  (writes LOAD_DIR/build-hook/history.jsonl)
import json, os, random, sys
random.seed(13)
names = {"linux-6.6.30": 620, "gcc-13.2.0": 880, "python3-3.11.9": 240, "openssl-3.0.13": 130,
         "git-2.44.0": 75, "curl-8.7.1": 48, "perl-5.38.2": 160, "hello-2.12.1": 9,
         "zlib-1.3.1": 7, "xz-5.4.6": 22, "bash-5.2p26": 35, "coreutils-9.4": 95,
         "jq-1.7.1": 18, "nix-2.18.2": 300}
speed = {"ssh://root@10.201.11.2": 1.0, "ssh://root@10.201.12.2": 1.8}
machines = list(speed)
slots = {m: 2 for m in machines}
jobs = []
t0 = 1795000000.0
for rnd in range(4):
    t = t0 + rnd * 7200
    order = list(names); random.shuffle(order)
    for n in order:
        jobs.append((t, n)); t += random.uniform(0, 20)
jobs.sort()
running = {m: [] for m in machines}  # end times
queue = []; recs = []; i = 0; now = jobs[0][0]
def rank(m): return (len(running[m]) / 1.0, -1.0, len(running[m]), machines.index(m))
while i < len(jobs) or queue or any(running.values()):
    for m in machines: running[m] = [e for e in running[m] if e > now]
    while i < len(jobs) and jobs[i][0] <= now: queue.append(jobs[i]); i += 1
    while queue:
        free = [m for m in machines if len(running[m]) < slots[m]]
        if not free: break
        m = min(free, key=rank)
        arr, n = queue.pop(0)
        b = names[n] / speed[m] * random.uniform(0.93, 1.08)
        up, down = random.uniform(0.1, 2), random.uniform(0.1, 3)
        start = now
        end = start + up + b + down + 0.4
        running[m].append(end)
        recs.append(dict(start=start, drv="/nix/store/%032d-%s.drv" % (len(recs), n), name=n, system="x86_64-linux",
                         machine=m, slot=len(running[m]) - 1, end=end, slot_wait=now - arr, upload_bytes=int(up * 4e7),
                         upload_secs=up, build_secs=b, download_bytes=int(down * 4e7), download_secs=down, result="built"))
    nxt = [e for v in running.values() for e in v] + ([jobs[i][0]] if i < len(jobs) else [])
    if not nxt: break
    now = min(nxt)
# one failed and one lost attempt, which the learning ignores
recs.append(dict(recs[-1], start=recs[-1]["end"] + 5, end=recs[-1]["end"] + 9, build_secs=3.1, result="failed", reason="builder for '...' failed with exit code 2"))
recs.sort(key=lambda r: r["start"])
os.makedirs(os.path.join(sys.argv[1], "build-hook"), exist_ok=True)
with open(os.path.join(sys.argv[1], "build-hook", "history.jsonl"), "w") as f:
    for r in recs: f.write(json.dumps(r) + "\n")
print(len(recs), "records; recorded span", max(r["end"] for r in recs) - min(r["start"] - r["slot_wait"] for r in recs))
