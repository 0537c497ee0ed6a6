#!/usr/bin/env bash
# sluice enrich from a JetStream stream to another against the same records from a JSON Lines
# file to a file, one process, lookups in the embedded loadgen server (1 ms), ordered, capacity
# 256, in ROUNDS (default 3) rounds, the two paths interleaved. The NATS rate is records over
# the time from the run's start until the output stream holds them all. Needs a NATS server
# with JetStream at NATS_URL (default nats://127.0.0.1:4222); run from the repository root after
# `cargo build --release --workspace && cargo build --release --examples`.
set -euo pipefail
url=${NATS_URL:-nats://127.0.0.1:4222}
count=${COUNT:-200000}
rounds=${ROUNDS:-3}
shards=${SHARDS:-2}
dir=$(mktemp -d)
trap 'rm -rf "$dir"; ./target/release/examples/nats_streams drop "$url" BENCH_IN BENCH_OUT' EXIT
./target/release/loadgen records --count "$count" >"$dir/records.jsonl"
common=(--loadgen --key 'user:{user_id}' --mode ordered --capacity 256 --shards "$shards")
for round in $(seq "$rounds"); do
    file=$(./target/release/sluice enrich "${common[@]}" --input "$dir/records.jsonl" \
        --output "$dir/out.jsonl" 2>&1 | sed -n 's/.*(\([0-9]*\) records\/s.*/\1/p')
    ./target/release/examples/nats_streams fill "$url" BENCH_IN bench.in BENCH_OUT bench.out \
        <"$dir/records.jsonl"
    ./target/release/sluice enrich "${common[@]}" --input "$url/BENCH_IN?consumer=bench" \
        --output "$url/bench.out" 2>"$dir/nats.log" &
    pid=$!
    secs=$(./target/release/examples/nats_streams wait "$url" BENCH_OUT "$count")
    kill -INT "$pid"
    wait "$pid" || true
    nats=$(python3 -c "print(round($count / $secs))")
    echo "round $round: file to file $file records/s, stream to stream $nats records/s ($(python3 -c "print(f'{$nats / $file:.2f}')")x)"
    grep 'nats:' "$dir/nats.log"
done
