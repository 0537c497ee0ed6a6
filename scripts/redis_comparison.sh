#!/usr/bin/env bash
# sluice against a real redis-server, beside redis-benchmark and the tokio + redis-rs baseline,
# at the same requests in flight (64 = -c 4 -P 16, 256 = -c 8 -P 32). Server pinned to core 1,
# every client to core 0, in ROUNDS (default 3) rounds. Writes docs/figures/redis-*.{json,svg,txt}.
# Needs redis-server, redis-benchmark, taskset and python3; run from the repository root after
# `cargo build --release`.
set -euo pipefail
port=${PORT:-16380}
out=docs/figures
mkdir -p "$out"
. scripts/pinned_redis.sh
start_pinned_redis "$port"
# redis-benchmark's own keys (key:000000xxxxxx), 128-byte values, 100k keys.
redis-benchmark -p "$port" -t set -n 300000 -r 100000 -d 128 -q >/dev/null
# Rounds, each with redis-benchmark at 64 and 256 in flight and then every client mode at both,
# so that each ratio to redis-benchmark is taken within one round: Redis's own speed drifts by
# tens of percent over minutes on a shared VM.
# Each redis-benchmark line ends with its own CPU time (user + system, bash's `time`) per GET.
rounds=${ROUNDS:-3}
TIMEFORMAT='%U %S'
limit=
: >"$out/redis-benchmark.txt"
rm -f "$out"/redis-1shard-round*.json
for round in $(seq "$rounds"); do
    for cp in "4 16" "8 32"; do
        set -- $cp
        printf 'run %s, -c %s -P %s (%s in flight): ' "$round" "$1" "$2" $(($1 * $2))
        cpu=$({ time taskset -c 0 redis-benchmark -p "$port" -t get -c "$1" -P "$2" -n 3000000 \
            -r 100000 -d 128 --csv | tail -1 >/tmp/redis-benchmark-line; } 2>&1)
        printf '%s cpu_us_per_get %s\n' "$(cat /tmp/redis-benchmark-line)" \
            "$(echo "$cpu" | awk '{printf "%.2f", ($1 + $2) * 1e6 / 3000000}')"
    done | tee -a "$out/redis-benchmark.txt"
    # The first round measures the server limit (the ideal's cap); later rounds reuse it.
    # Each round starts the mode list two places further on, so that no mode always runs
    # right after the same one (Redis's slow phase seems to outlast the run that caused it).
    modes=(tokio-buffered tokio-unordered tokio-local-unordered ordered unordered key-ordered adapter-unordered)
    shift=$(( (round - 1) * 2 % ${#modes[@]} ))
    order=$(IFS=,; echo "${modes[*]:shift},${modes[*]:0:shift}" | sed 's/,$//')
    load=--load
    [ "$round" -gt 1 ] && load="--server-limit $limit"
    taskset -c 0 ./target/release/sluice bench --redis "redis://127.0.0.1:$port" $load --shards 1 \
        --capacities 64,256 --modes "$order" \
        --duration 3s --json "$out/redis-1shard-round$round.json" --svg "$out/redis-1shard.svg" |
        sed "s/^/round $round: /"
    limit=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["server_limit_rps"])' \
        "$out/redis-1shard-round1.json")
done | tee "$out/redis-1shard-rounds.txt"
# Reports in round order (a glob would put round 10 before round 2).
python3 scripts/redis_rounds.py "$out/redis-benchmark.txt" \
    $(seq -f "$out/redis-1shard-round%g.json" "$rounds") |
    tee "$out/redis-1shard.txt"
# With REPLY_SPLIT=1, also the connection driver's reply split (docs/decisions/reply-split.md):
# 1 completes every reply that arrived before writing; N completes at most 1/N of the window
# per turn. Alternating invocations, 3 rounds; the server's CPU share (from /proc) over each
# invocation, which measures no server limit (--server-limit: `eff.` there is Little's law only).
[ "${REPLY_SPLIT:-0}" = 1 ] || exit 0
pid=$(pgrep -f "redis-server 127.0.0.1:$port" | head -1)
cpu_ticks() { awk '{print $14 + $15}' "/proc/$pid/stat"; }
{
    for round in 1 2 3; do
        for split in 1 2 4; do
            for cap in 64 256; do
                for mode in unordered adapter-unordered; do
                    t0=$(cpu_ticks); s0=$(date +%s%N)
                    line=$(taskset -c 0 ./target/release/sluice bench --redis "redis://127.0.0.1:$port" \
                        --shards 1 --capacities "$cap" --modes "$mode" --duration 3s --reply-split "$split" --server-limit 1e9 \
                        --json /tmp/sluice-split.json --svg /tmp/sluice-split.svg 2>/dev/null | grep "^$mode")
                    t1=$(cpu_ticks); s1=$(date +%s%N)
                    share=$(( (t1 - t0) * 1000000000 / (s1 - s0) ))
                    echo "round $round split $split redis-cpu ${share}% $line"
                done
            done
        done
    done
} | tee "$out/redis-reply-split.txt"
