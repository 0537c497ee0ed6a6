#!/usr/bin/env python3
"""Summarises scripts/redis_comparison.sh's rounds as a Markdown table.

Usage: redis_rounds.py REDIS_BENCHMARK_TXT ROUND1.json [ROUND2.json ...]

Round r of the JSON reports is set beside redis-benchmark's run r (same requests in flight),
so every ratio is taken within one round, and the figures printed are medians over rounds:
records/s, p50/p99 (us), CPU us per record, the rate as a share of redis-benchmark's, and the
CPU per record as a share of the tokio baseline's cheapest mode in the same round."""
import json
import re
import statistics
import sys

LINE = re.compile(r'run (\d+), .*\((\d+) in flight\): "GET","([\d.]+)","[\d.]+","[\d.]+",'
                  r'"([\d.]+)","[\d.]+","([\d.]+)","[\d.]+" cpu_us_per_get ([\d.]+)')


def main(benchmark_txt, reports):
    benchmark = {}  # (round, in flight) -> (rps, p50 us, p99 us, cpu us)
    for line in open(benchmark_txt):
        if line.startswith("#"):  # the stamp: commit, date, machine
            continue
        m = LINE.search(line)
        if m is None:
            sys.exit(f"{benchmark_txt}: not a redis-benchmark line: {line.strip()!r}")
        r, n, rps, p50, p99, cpu = m.groups()
        benchmark[(int(r), int(n))] = (float(rps), float(p50) * 1000, float(p99) * 1000, float(cpu))
    rounds = {}  # (mode, in flight) -> [(round, point)]
    for r, path in enumerate(reports, start=1):
        for p in json.load(open(path))["points"]:
            rounds.setdefault((p["mode"], p["in_flight"]), []).append((r, p))
    med = statistics.median
    print(f"rounds: {len(reports)}; medians over rounds; 'vs r-b' and 'cpu vs tokio' are "
          "taken within each round, then the median; ranges in brackets")
    print()
    print("| client | in flight | records/s | vs r-b | p50 us | p99 us | cpu us/record | cpu vs tokio |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for n in sorted({n for _, n in benchmark}):
        runs = [v for (r, m), v in sorted(benchmark.items()) if m == n]
        rps = [v[0] for v in runs]
        cpu = [v[3] for v in runs]
        tokio = {r: min(p["cpu_us_per_record"] for mode in ("tokio-buffered", "tokio-unordered", "tokio-local-unordered")
                        for rr, p in rounds.get((mode, n), []) if rr == r)
                 for r in range(1, len(reports) + 1)}
        cpu_ratio = [benchmark[(r, n)][3] / tokio[r] for r in tokio if (r, n) in benchmark]
        print(f"| redis-benchmark | {n} | {med(rps):.0f} ({min(rps):.0f}-{max(rps):.0f}) | 100% | "
              f"{med(v[1] for v in runs):.0f} | {med(v[2] for v in runs):.0f} | "
              f"{med(cpu):.2f} ({min(cpu):.2f}-{max(cpu):.2f}) | {fmt_ratio(cpu_ratio)} |")
        for (mode, m), points in rounds.items():
            if m != n:
                continue
            rps = [p["rps"] for _, p in points]
            share = [p["rps"] / benchmark[(r, n)][0] for r, p in points if (r, n) in benchmark]
            cpu = [p["cpu_us_per_record"] for _, p in points]
            cpu_ratio = [p["cpu_us_per_record"] / tokio[r] for r, p in points]
            print(f"| {mode} | {n} | {med(rps):.0f} ({min(rps):.0f}-{max(rps):.0f}) | "
                  f"{fmt_pct(share)} | {med(p['p50_us'] for _, p in points):.0f} | "
                  f"{med(p['p99_us'] for _, p in points):.0f} | "
                  f"{med(cpu):.2f} ({min(cpu):.2f}-{max(cpu):.2f}) | {fmt_ratio(cpu_ratio)} |")


def fmt_pct(xs):
    return f"{statistics.median(xs) * 100:.0f}% ({min(xs) * 100:.0f}-{max(xs) * 100:.0f}%)"


def fmt_ratio(xs):
    return f"{statistics.median(xs):.2f}x ({min(xs):.2f}-{max(xs):.2f})"


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2:])
