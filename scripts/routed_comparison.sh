#!/usr/bin/env bash
# Records routed across shards from a source on shard 0 (docs/benchmarks.md, section 3,
# "Routed across shards"): at two shards, the stage fed from user threads beside the routed
# stage (one source and sink on shard 0) and the current-thread tokio program, at 1, 16, 64 and
# 256 in flight per shard; then `sluice enrich --shards 2` reading a file (routed) and standard
# input (reader thread), and the hand-written tokio program at the same depth. Redis pinned to
# core 1, every client to core 0. Writes docs/figures/routed-*. Needs redis-server, taskset;
# run from the repository root after
# `cargo build --release --workspace && cargo build --release --examples`.
set -euo pipefail
port=${PORT:-16382}
out=docs/figures
rounds=${ROUNDS:-3}
mkdir -p "$out"
. scripts/pinned_redis.sh
start_pinned_redis "$port"
./target/release/sluice bench --redis "$url" --load --keys 1000000 --shards 1 --capacities 1 \
    --modes unordered --duration 0.1s --server-limit 1e9 --json /tmp/routed-load.json \
    --svg /tmp/routed-load.svg >/dev/null
stamp="# commit $(git rev-parse --short HEAD), $(date -u +%F), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(nproc) cores"
{
    echo "$stamp"
    taskset -c 0 ./target/release/sluice bench --redis "$url" --keys 1000000 --shards 2 \
        --capacities 1,16,64,256 --duration 2s --repeat "$rounds" --server-limit 1e9 \
        --modes tokio-local-unordered,ordered,unordered,routed-ordered,routed-unordered \
        --json "$out/routed-redis.json" --svg "$out/routed-redis.svg" 2>&1
} | tee "$out/routed-redis.txt"
./target/release/loadgen records --count 1000000 --keys 1000000 >/tmp/routed-in.jsonl
TIMEFORMAT='%R %U %S'
{
    echo "$stamp"
    echo "# sluice enrich, two shards, capacity 64 per shard, 1M lines, uniform keys; wall user sys (s)"
    for round in $(seq "$rounds"); do
        t=$({ time taskset -c 0 ./target/release/sluice enrich --redis "$url" --key 'user:{user_id}' \
            --shards 2 --capacity 64 --input /tmp/routed-in.jsonl \
            --output /tmp/routed-file.jsonl 2>/dev/null; } 2>&1)
        echo "round $round sluice enrich, routed (--input FILE): $t"
        t=$({ time taskset -c 0 ./target/release/sluice enrich --redis "$url" --key 'user:{user_id}' \
            --shards 2 --capacity 64 </tmp/routed-in.jsonl >/tmp/routed-threads.jsonl \
            2>/dev/null; } 2>&1)
        echo "round $round sluice enrich, reader thread (standard input): $t"
        t=$({ time taskset -c 0 ./target/release/examples/tokio_enrich "$url" user_id user: 128 0 \
            </tmp/routed-in.jsonl >/tmp/routed-tokio.jsonl 2>/dev/null; } 2>&1)
        echo "round $round tokio_enrich (128 in flight): $t"
    done
    cmp /tmp/routed-file.jsonl /tmp/routed-threads.jsonl && echo "# outputs identical (routed, reader thread)"
    cmp /tmp/routed-file.jsonl /tmp/routed-tokio.jsonl && echo "# outputs identical (routed, tokio_enrich)"
} | tee "$out/routed-enrich.txt"
