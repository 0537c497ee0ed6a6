#!/usr/bin/env bash
# A group of sluice processes on one partitioned JetStream stream: the same records through one
# process alone and through three, each with one shard, lookups in the embedded loadgen server
# (1 ms), ordered, capacity 256, 6 partitions, in ROUNDS (default 3) rounds. The rate is over
# the time from the first output stored to the last (a member waits one lease period before it
# takes partitions); the CPU figures are each process's and nats-server's user + system time
# over the run, per record. Needs a NATS server with JetStream at NATS_URL (default
# nats://127.0.0.1:4222) on this machine; run from the repository root after
# `cargo build --release --workspace && cargo build --release --examples`.
set -euo pipefail
url=${NATS_URL:-nats://127.0.0.1:4222}
count=${COUNT:-100000}
rounds=${ROUNDS:-3}
streams=./target/release/examples/nats_streams
dir=$(mktemp -d)
trap 'rm -rf "$dir"; $streams drop "$url" SCALE_IN SCALE_OUT' EXIT
./target/release/loadgen records --count "$count" >"$dir/records.jsonl"
server=$(pgrep -x nats-server | head -1)
cpu() { # pid: user + system clock ticks
    awk '{print $14 + $15}' "/proc/$1/stat"
}
tick=$(getconf CLK_TCK)
for round in $(seq "$rounds"); do
    for members in 1 3; do
        $streams fill "$url" SCALE_IN scale.in SCALE_OUT scale.out 6 <"$dir/records.jsonl" 2>/dev/null
        group="scale$round$members$$"
        input="$url/SCALE_IN?consumer=scale&group=$group&partitions=6&lease=500ms"
        server_before=$(cpu "$server")
        pids=()
        for _ in $(seq "$members"); do
            ./target/release/sluice enrich --loadgen --key 'user:{user_id}' --mode ordered \
                --capacity 256 --shards 1 --input "$input" --output "$url/scale.out" \
                2>>"$dir/log" &
            pids+=($!)
        done
        $streams wait "$url" SCALE_OUT 1 >/dev/null
        secs=$($streams wait "$url" SCALE_OUT "$count")
        server_cpu=$(( $(cpu "$server") - server_before ))
        own=()
        for pid in "${pids[@]}"; do own+=("$(cpu "$pid")"); done
        kill -INT "${pids[@]}"
        wait "${pids[@]}" || true
        python3 - "$round" "$members" "$count" "$secs" "$tick" "$server_cpu" "${own[@]}" <<'PY'
import sys
round_, members, count, secs, tick, server = sys.argv[1:7]
own = [int(t) for t in sys.argv[7:]]
count, secs, tick = int(count), float(secs), int(tick)
us = lambda ticks: ticks / tick * 1e6 / count
print(f"round {round_}: {members} process(es): {count / secs:.0f} records/s; sluice CPU per record "
      f"{us(sum(own)):.1f} us ({', '.join(f'{us(t):.1f}' for t in own)}), nats-server {us(int(server)):.1f} us")
PY
    done
done
