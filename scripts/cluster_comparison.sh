#!/usr/bin/env bash
# One Redis against a 3-master Redis Cluster, as sluice sees them (docs/benchmarks.md, "Redis
# Cluster"): every server pinned to core 1, the client (examples/backend_cost.rs) to core 0,
# the same 1M keys of 128 bytes in both; ROUNDS (default 3) alternating runs of 500 000 uniform
# lookups at 256 in flight, batches of 16. The servers' CPU comes from /proc: the single
# server works only in its phases and the cluster's nodes only in theirs. Writes
# docs/figures/cluster-rate.txt. Needs redis-server, redis-cli, taskset and python3; run from
# the repository root after `cargo build --release --examples`.
set -euo pipefail
single=${SINGLE_PORT:-16380}
ports=(${CLUSTER_PORTS:-16391 16392 16393})
rounds=${ROUNDS:-3}
dir=$(mktemp -d)
trap 'for p in "$single" "${ports[@]}"; do redis-cli -p "$p" shutdown nosave >/dev/null 2>&1 || true; done; rm -rf "$dir"' EXIT
start() { # port, extra args...
    local port=$1
    shift
    (cd "$dir" && taskset -c 1 redis-server --port "$port" --bind 127.0.0.1 --save '' \
        --appendonly no --daemonize yes --logfile "$dir/$port.log" "$@")
    for _ in $(seq 50); do redis-cli -p "$port" ping >/dev/null 2>&1 && return; sleep 0.1; done
    echo "redis-server on $port did not start" >&2
    exit 1
}
start "$single"
for p in "${ports[@]}"; do start "$p" --cluster-enabled yes --cluster-config-file "nodes-$p.conf"; done
redis-cli --cluster create $(printf '127.0.0.1:%s ' "${ports[@]}") --cluster-yes >/dev/null
for p in "${ports[@]}"; do
    until redis-cli -p "$p" cluster info | grep -q cluster_state:ok; do sleep 0.1; done
done
# The keys, as RESP, for the single server and for each node (by hash slot).
python3 - "$dir" "$single" "${ports[@]}" <<'PY'
import sys
out, single, ports = sys.argv[1], sys.argv[2], sys.argv[3:]
def crc16(data):
    crc = 0
    for b in data:
        crc ^= b << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc
# The slot ranges redis-cli --cluster create gives three masters.
bounds = [(0, 5460), (5461, 10922), (10923, 16383)]
files = {p: open(f"{out}/{p}.resp", "wb") for p in ports}
whole = open(f"{out}/{single}.resp", "wb")
value = b"v" * 128
for i in range(1_000_000):
    key = b"user:user_%06d" % i
    cmd = b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$128\r\n%s\r\n" % (len(key), key, value)
    whole.write(cmd)
    slot = crc16(key) % 16384
    node = next(n for n, (a, b) in enumerate(bounds) if a <= slot <= b)
    files[ports[node]].write(cmd)
PY
for p in "${ports[@]}"; do
    # Which node got which range: ask the node, and load what its slots hold.
    redis-cli -p "$p" --pipe <"$dir/$p.resp" >/dev/null
done
redis-cli -p "$single" --pipe <"$dir/$single.resp" >/dev/null
ticks() { awk '{print $14 + $15}' "/proc/$(pgrep -f "redis-server 127.0.0.1:$1" | head -1)/stat"; }
before=(); for p in "$single" "${ports[@]}"; do before+=("$(ticks "$p")"); done
{
    echo "# commit $(git rev-parse --short HEAD), $(date -u +%F), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(nproc) cores; Redis $(redis-server --version | grep -o 'v=[0-9.]*' | cut -d= -f2), every server on core 1, the client on core 0"
    taskset -c 0 ./target/release/examples/backend_cost "redis://127.0.0.1:$single" \
        "redis://127.0.0.1:${ports[0]}" --cluster --in-flight 256 --batch 16 --rounds "$rounds"
    i=0
    for p in "$single" "${ports[@]}"; do
        after=$(ticks "$p")
        echo "server $p: $(( (after - before[i]) * 10 )) ms of CPU over the run"
        i=$((i + 1))
    done
} | tee docs/figures/cluster-rate.txt
