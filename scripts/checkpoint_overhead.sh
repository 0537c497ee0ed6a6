#!/usr/bin/env bash
# Throughput of `sluice enrich` with a checkpoint every second against none: the same input,
# the embedded loadgen server (1 ms replies), 2 shards x capacity 256, interleaved and
# repeated; prints every run and the medians. Writes docs/figures/checkpoint-overhead.txt.
# Run from the repository root after `cargo build --release`.
set -euo pipefail
lines=${LINES:-2000000}
repeat=${REPEAT:-5}
bin=./target/release/sluice
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
./target/release/loadgen records --count "$lines" --keys 100000 >"$work/in.jsonl"
run() { # $1: label, rest: extra flags
    local label=$1
    shift
    rm -rf "$work/ck" "$work/out.jsonl"
    "$bin" enrich --loadgen --loadgen-latency 1ms --key 'user:{user_id}' --shards 2 \
        --capacity 256 --input "$work/in.jsonl" --output "$work/out.jsonl" \
        --metrics-json "$work/m.json" "$@" 2>/dev/null
    python3 -c "import json,sys; m=json.load(open('$work/m.json')); print('$label', round(m['records_per_s']), m['checkpoints'])"
}
{
    echo "# label records_per_s checkpoints ($lines lines per run)"
    for _ in $(seq "$repeat"); do
        run none
        run every-1s --checkpoint-dir "$work/ck" --checkpoint-interval 1s
    done
} | tee "$work/runs.txt"
python3 - "$work/runs.txt" <<'PY' | tee -a "$work/runs.txt"
import statistics, sys
runs = {}
for line in open(sys.argv[1]):
    if line.startswith('#'):
        continue
    label, rps, _ = line.split()
    runs.setdefault(label, []).append(float(rps))
none, ckpt = statistics.median(runs['none']), statistics.median(runs['every-1s'])
print(f"median none {none:.0f}/s, every-1s {ckpt:.0f}/s, ratio {ckpt / none:.3f} ({(1 - ckpt / none) * 100:.1f}% lower)")
PY
mkdir -p docs/figures
cp "$work/runs.txt" docs/figures/checkpoint-overhead.txt
