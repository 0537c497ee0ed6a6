#!/usr/bin/env python3
"""Summarises scripts/lookup_layer_comparison.sh's rounds: medians over rounds of records/s
and CPU per record for each client, and the target ratios taken within each round.

Usage: lookup_layer_rounds.py LOOKUP_LAYER_ROUNDS_TXT ROUNDS"""
import json
import re
import statistics
import sys

RECORDS = 1_000_000  # the enrich input's lines


def main(txt, rounds):
    figures = sys.argv[1].rsplit("/", 1)[0]
    rb, mget, enrich = {}, {}, {}
    for line in open(txt):
        if m := re.match(r"round (\d+) redis-benchmark GET -c 1 -P (\d+): ([\d.]+)", line):
            rb[(int(m[1]), int(m[2]))] = float(m[3])
        elif m := re.match(r"round (\d+) redis-benchmark MGET of \d+ .*: ([\d.]+)", line):
            mget[int(m[1])] = float(m[2])
        elif m := re.match(r"round (\d+) enrich (\S+) cache (\d+): wall/user/sys ([\d.]+) ([\d.]+) ([\d.]+)", line):
            wall, user, sys_ = map(float, m.group(4, 5, 6))
            enrich[(int(m[1]), m[2], int(m[3]))] = (RECORDS / wall, (user + sys_) * 1e6 / RECORDS)
    points = {}  # (dist, round, mode, in flight) -> point
    for dist in ("uniform", "zipf"):
        for r in range(1, rounds + 1):
            for p in json.load(open(f"{figures}/lookup-layer-{dist}-round{r}.json"))["points"]:
                points[(dist, r, p["mode"], p["in_flight"])] = p
    med = statistics.median

    def span(values, fmt):
        return f"{fmt.format(med(values))} [{fmt.format(min(values))}-{fmt.format(max(values))}]"

    print(f"rounds: {rounds}; medians over rounds, ranges in brackets; ratios within a round")
    for dist in ("uniform", "zipf"):
        print()
        print(f"## {dist} keys" + (" (cache of 100k entries per shard)" if dist == "zipf" else ""))
        print()
        print("| client | in flight | records/s | cpu us/record | vs r-b GET | cpu vs tokio-local | vs tokio-local | vs tokio-cached |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        modes = sorted({k[2] for k in points if k[0] == dist})
        for n in (64, 256):
            for mode in modes:
                rows = [(r, points[(dist, r, mode, n)]) for r in range(1, rounds + 1)]
                rps = [p["rps"] for _, p in rows]
                cpu = [p["cpu_us_per_record"] for _, p in rows]
                vs_rb = [p["rps"] / rb[(r, n)] for r, p in rows]
                base = [points[(dist, r, "tokio-local-unordered", n)] for r, _ in rows]
                cpu_vs = [p["cpu_us_per_record"] / b["cpu_us_per_record"] for (_, p), b in zip(rows, base)]
                vs_tokio = [p["rps"] / b["rps"] for (_, p), b in zip(rows, base)]
                cached = "-"
                if dist == "zipf":
                    c = [p["rps"] / points[(dist, r, "tokio-cached-unordered", n)]["rps"] for r, p in rows]
                    cached = span(c, "{:.2f}x")
                print(f"| {mode} | {n} | {span(rps, '{:,.0f}')} | {span(cpu, '{:.2f}')} | "
                      f"{span(vs_rb, '{:.2f}x')} | {span(cpu_vs, '{:.2f}x')} | {span(vs_tokio, '{:.2f}x')} | {cached} |")
    print()
    print("redis-benchmark GET -c 1 -P N (records/s): " + ", ".join(
        f"{n}: {span([rb[(r, n)] for r in range(1, rounds + 1)], '{:,.0f}')}" for n in (64, 256)))
    print(f"server's MGET limit (keys/s, -c 4 -P 16): {span(list(mget.values()), '{:,.0f}')}")
    print()
    print("## enrich, zipf keys, 1M lines, one shard, capacity 256")
    print()
    print("| program | records/s | cpu us/record | sluice vs it |")
    print("|---|---:|---:|---:|")
    for prog, cache in (("tokio_enrich", 0), ("tokio_enrich", 100000), ("sluice", 100000)):
        rows = [enrich[(r, prog, cache)] for r in range(1, rounds + 1)]
        ratio = [enrich[(r, "sluice", 100000)][0] / enrich[(r, prog, cache)][0] for r in range(1, rounds + 1)]
        print(f"| {prog} (cache {cache}) | {span([x[0] for x in rows], '{:,.0f}')} | "
              f"{span([x[1] for x in rows], '{:.2f}')} | {span(ratio, '{:.2f}x')} |")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
