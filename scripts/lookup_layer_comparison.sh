#!/usr/bin/env bash
# The lookup layer's targets (docs/benchmarks.md, "The lookup layer"): sluice with batching
# (and, under skew, its cache) against redis-benchmark, the tokio + redis-rs baselines and a
# hand-written tokio enrich program, side by side in ROUNDS (default 3) interleaved rounds.
# Redis pinned to core 1, every client to core 0; 1M keys of 128-byte values. Writes
# docs/figures/lookup-layer-*. Needs redis-server, redis-benchmark, taskset and python3; run
# from the repository root after `cargo build --release --workspace --examples`.
set -euo pipefail
port=${PORT:-16380}
out=docs/figures
rounds=${ROUNDS:-3}
batch=${BATCH:-16}
mkdir -p "$out"
. scripts/pinned_redis.sh
start_pinned_redis "$port"
# redis-benchmark's own keyspace (key:000000xxxxxx, 128-byte values) so that its GETs hit,
# and loadgen's (user:user_xxxxxx) for sluice, the baselines and the enrich input.
redis-benchmark -p "$port" -t set -n 4000000 -r 1000000 -d 128 -P 64 -q >/dev/null
./target/release/sluice bench --redis "$url" --load --keys 1000000 --shards 1 --capacities 1 \
    --modes unordered --duration 0.1s --server-limit 1e9 --json /tmp/lookup-load.json \
    --svg /tmp/lookup-load.svg >/dev/null
./target/release/loadgen records --count 1000000 --zipf 1.0 --keys 1000000 >/tmp/lookup-in.jsonl
mget=""
for _ in $(seq "$batch"); do mget="$mget key:__rand_int__"; done
stamp="# commit $(git rev-parse --short HEAD), $(date -u +%F), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(nproc) cores"
TIMEFORMAT='%R %U %S'
{
    echo "$stamp"
    for round in $(seq "$rounds"); do
        for p in 64 256; do
            rb=$(taskset -c 0 redis-benchmark -p "$port" -t get -c 1 -P "$p" -n 2000000 -r 1000000 \
                -d 128 --csv | tail -1 | cut -d, -f2 | tr -d '"')
            echo "round $round redis-benchmark GET -c 1 -P $p: $rb"
        done
        mg=$(taskset -c 0 redis-benchmark -p "$port" -c 4 -P 16 -n $((8000000 / batch)) -r 1000000 \
            --csv MGET $mget | tail -1 | cut -d, -f2 | tr -d '"')
        echo "round $round redis-benchmark MGET of $batch -c 4 -P 16 keys/s: $(python3 -c "print(round($mg * $batch))")"
        for dist in uniform zipf; do
            if [ "$dist" = uniform ]; then
                flags=(--key-distribution uniform --modes tokio-local-unordered,unordered,adapter-unordered)
            else
                flags=(--key-distribution zipf:1.0 --cache-size 100000
                    --modes tokio-local-unordered,tokio-cached-unordered,unordered,adapter-unordered)
            fi
            taskset -c 0 ./target/release/sluice bench --redis "$url" --keys 1000000 --shards 1 \
                --capacities 64,256 --duration 3s --server-limit 1e9 --batch-size "$batch" \
                "${flags[@]}" --json "$out/lookup-layer-$dist-round$round.json" \
                --svg /tmp/lookup-layer.svg | grep -E '^(tokio|unordered|adapter)' |
                sed "s/^/round $round $dist: /"
        done
        for cache in 0 100000; do
            t=$({ time taskset -c 0 ./target/release/examples/tokio_enrich "$url" user_id user: \
                256 "$cache" </tmp/lookup-in.jsonl >/tmp/lookup-tokio.jsonl 2>/dev/null; } 2>&1)
            echo "round $round enrich tokio_enrich cache $cache: wall/user/sys $t"
        done
        t=$({ time taskset -c 0 ./target/release/sluice enrich --redis "$url" \
            --key 'user:{user_id}' --input /tmp/lookup-in.jsonl --output /tmp/lookup-sluice.jsonl \
            --shards 1 --capacity 256 --cache-size 100000 --batch-size "$batch" 2>/dev/null; } 2>&1)
        echo "round $round enrich sluice cache 100000: wall/user/sys $t"
    done
} | tee "$out/lookup-layer-rounds.txt"
python3 scripts/lookup_layer_rounds.py "$out/lookup-layer-rounds.txt" "$rounds" |
    tee "$out/lookup-layer.txt"
