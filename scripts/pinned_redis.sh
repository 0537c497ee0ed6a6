# Sourced by the comparison scripts: start_pinned_redis PORT starts a redis-server without
# persistence on core 1, stops it when the script exits, waits until it answers, and sets
# `url` to it.
start_pinned_redis() {
    local port=$1
    taskset -c 1 redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no \
        --daemonize yes --logfile "/tmp/redis-$port.log"
    # shellcheck disable=SC2064 # the port is fixed now, on purpose
    trap "redis-cli -p $port shutdown nosave >/dev/null 2>&1 || true" EXIT
    for _ in $(seq 50); do
        redis-cli -p "$port" ping >/dev/null 2>&1 && break
        sleep 0.1
    done
    url=redis://127.0.0.1:$port
}
