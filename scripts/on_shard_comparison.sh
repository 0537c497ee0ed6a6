#!/usr/bin/env bash
# Records that stay on the shard (docs/benchmarks.md, section 3, "Sources and sinks on the
# shard"): the stage fed from user threads, the stage with its source and sink on the shard,
# the adapter, the current-thread tokio programs and the blocking client, at 1, 16, 64 and 256
# in flight; then `sluice enrich` on one thread, with a reader thread, and the hand-written
# tokio program at 64 in flight. Redis pinned to core 1, every client to core 0. Writes
# docs/figures/on-shard-*. Needs redis-server, taskset; run from the repository root after
# `cargo build --release --workspace && cargo build --release --examples`.
set -euo pipefail
port=${PORT:-16381}
out=docs/figures
rounds=${ROUNDS:-3}
mkdir -p "$out"
. scripts/pinned_redis.sh
start_pinned_redis "$port"
./target/release/sluice bench --redis "$url" --load --keys 1000000 --shards 1 --capacities 1 \
    --modes unordered --duration 0.1s --server-limit 1e9 --json /tmp/on-shard-load.json \
    --svg /tmp/on-shard-load.svg >/dev/null
stamp="# commit $(git rev-parse --short HEAD), $(date -u +%F), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(nproc) cores"
{
    echo "$stamp"
    taskset -c 0 ./target/release/sluice bench --redis "$url" --keys 1000000 --shards 1 \
        --capacities 1,16,64,256 --duration 2s --repeat "$rounds" --server-limit 1e9 \
        --modes sync-map,tokio-local-unordered,tokio-local-buffered,ordered,unordered,on-shard-ordered,on-shard-unordered,adapter-unordered \
        --json "$out/on-shard-redis.json" --svg "$out/on-shard-redis.svg" 2>&1
} | tee "$out/on-shard-redis.txt"
./target/release/loadgen records --count 1000000 --keys 1000000 >/tmp/on-shard-in.jsonl
TIMEFORMAT='%R %U %S'
{
    echo "$stamp"
    echo "# sluice enrich, one shard, capacity 64, 1M lines, uniform keys; wall user sys (s)"
    for round in $(seq "$rounds"); do
        t=$({ time taskset -c 0 ./target/release/sluice enrich --redis "$url" --key 'user:{user_id}' \
            --shards 1 --capacity 64 --input /tmp/on-shard-in.jsonl \
            --output /tmp/on-shard-one.jsonl 2>/dev/null; } 2>&1)
        echo "round $round sluice enrich, one thread (--input FILE): $t"
        t=$({ time taskset -c 0 ./target/release/sluice enrich --redis "$url" --key 'user:{user_id}' \
            --shards 1 --capacity 64 </tmp/on-shard-in.jsonl >/tmp/on-shard-threads.jsonl \
            2>/dev/null; } 2>&1)
        echo "round $round sluice enrich, reader thread (standard input): $t"
        t=$({ time taskset -c 0 ./target/release/examples/tokio_enrich "$url" user_id user: 64 0 \
            </tmp/on-shard-in.jsonl >/tmp/on-shard-tokio.jsonl 2>/dev/null; } 2>&1)
        echo "round $round tokio_enrich: $t"
    done
    cmp /tmp/on-shard-one.jsonl /tmp/on-shard-threads.jsonl && echo "# outputs identical (one thread, reader thread)"
    cmp /tmp/on-shard-one.jsonl /tmp/on-shard-tokio.jsonl && echo "# outputs identical (one thread, tokio_enrich)"
} | tee "$out/on-shard-enrich.txt"
