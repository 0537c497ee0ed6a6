#!/usr/bin/env python3
"""Prints criterion medians as a Markdown table of records/s, one row per group/capacity,
one column per implementation. Reads target/criterion/<group>/<impl>/<capacity>/new/."""
import json, pathlib, sys

root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "target/criterion")
rows = {}
impls = []
for est in sorted(root.glob("*/*/*/new/estimates.json")):
    cap_dir = est.parent.parent
    impl_dir = cap_dir.parent
    group = impl_dir.parent.name
    bench = json.loads((est.parent / "benchmark.json").read_text())
    elements = bench.get("throughput", {}).get("Elements")
    median_ns = json.loads(est.read_text())["median"]["point_estimate"]
    if not elements:
        continue
    rps = elements / (median_ns / 1e9)
    rows.setdefault((group, int(cap_dir.name)), {})[impl_dir.name] = rps
    if impl_dir.name not in impls:
        impls.append(impl_dir.name)
order = [i for i in ["sluice_ordered", "sluice_unordered", "sluice_key_ordered",
                     "futures_buffered", "futures_buffer_unordered"] if i in impls]
print("| group | capacity | " + " | ".join(order) + " | ordered / buffered | unordered / buffer_unordered |")
print("|---|---:|" + "---:|" * len(order) + "---:|---:|")
def fmt(v):
    return f"{v/1e6:.2f} M/s" if v >= 1e6 else f"{v/1e3:.1f} k/s"
for (group, cap), r in sorted(rows.items(), key=lambda kv: (["ready", "yield_once", "timer_1ms"].index(kv[0][0]) if kv[0][0] in ["ready", "yield_once", "timer_1ms"] else 9, kv[0][1])):
    cells = [fmt(r[i]) if i in r else "-" for i in order]
    ro = r.get("sluice_ordered", 0) / r["futures_buffered"] if r.get("futures_buffered") else 0
    ru = r.get("sluice_unordered", 0) / r["futures_buffer_unordered"] if r.get("futures_buffer_unordered") else 0
    print(f"| {group} | {cap} | " + " | ".join(cells) + f" | {ro:.2f}x | {ru:.2f}x |")
