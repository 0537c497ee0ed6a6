#!/usr/bin/env python3
"""sluice enrich --postgres against the tokio + tokio-postgres program a Rust user would write
(examples/tokio_postgres_enrich.rs), on the same JSON Lines, at the same lookups in flight.

A PostgreSQL of the script's own (initdb in a temporary directory, trust login on 127.0.0.1,
port PORT, default 15432) runs pinned to core 1, every client to core 0; each client's
whole-process CPU (user + system, from wait4) is divided by the records. Rounds (ROUNDS,
default 3) interleave the clients, and figures are medians over rounds.
Writes docs/figures/postgres-comparison.{txt,json}.

Run from the repository root after
`cargo build --release --workspace && cargo build --release --examples`.
Needs PostgreSQL's server binaries (initdb, pg_ctl, postgres, psql) and taskset.
"""

import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

PORT = int(os.environ.get("PORT", "15432"))
ROUNDS = int(os.environ.get("ROUNDS", "3"))
RECORDS = int(os.environ.get("RECORDS", "200000"))
ROWS = 100_000
DEPTHS = [int(d) for d in os.environ.get("DEPTHS", "1,16,64,256").split(",")]
URL = f"postgres://postgres@127.0.0.1:{PORT}/postgres"
QUERY = "SELECT name, tier, since, score FROM users WHERE id = $1"
BATCH_QUERY = "SELECT id, name, tier, since, score FROM users WHERE id = ANY($1)"


def pg_bin():
    for d in [os.environ.get("PG_BIN", "")] + sorted(glob.glob("/usr/lib/postgresql/*/bin")):
        if d and os.path.exists(os.path.join(d, "initdb")):
            return d
    sys.exit("no PostgreSQL server binaries (set PG_BIN)")


def as_postgres(cmd):
    """initdb and the server refuse to run as root."""
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--"] + cmd
    return cmd


def start_server(data):
    bin_ = pg_bin()
    if os.geteuid() == 0:
        shutil.chown(data, "postgres")
    subprocess.run(as_postgres([f"{bin_}/initdb", "-D", data, "-U", "postgres", "--auth=trust"]),
                   check=True, stdout=subprocess.DEVNULL)
    opts = (f"-p {PORT} -k {data} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c shared_buffers=256MB")
    subprocess.run(["taskset", "-c", "1"] + as_postgres(
        [f"{bin_}/pg_ctl", "-D", data, "-l", f"{data}/log", "-o", opts, "-w", "start"]),
        check=True, stdout=subprocess.DEVNULL)
    return bin_


def stop_server(bin_, data):
    subprocess.run(as_postgres([f"{bin_}/pg_ctl", "-D", data, "-m", "fast", "stop"]),
                   stdout=subprocess.DEVNULL)


def psql(bin_, sql):
    subprocess.run([f"{bin_}/psql", "-h", "127.0.0.1", "-p", str(PORT), "-U", "postgres",
                    "-qc", sql], check=True)


def run(cmd, stdin, stdout):
    """Runs cmd pinned to core 0; returns (seconds, CPU seconds of the whole process)."""
    started = time.monotonic()
    with open(stdin) as i, open(stdout, "w") as o:
        p = subprocess.Popen(["taskset", "-c", "0"] + cmd, stdin=i, stdout=o,
                             stderr=subprocess.PIPE)
        _, status, usage = os.wait4(p.pid, 0)
        err = p.stderr.read().decode()
    wall = time.monotonic() - started
    if status != 0:
        sys.exit(f"{cmd[0]} failed: {err}")
    return wall, usage.ru_utime + usage.ru_stime


def clients(depth, inp, out):
    sluice = ["./target/release/sluice", "enrich", "--postgres", URL, "--query", QUERY,
              "--params", "{user_id}", "--shards", "1", "--capacity", str(depth),
              "--input", inp, "--output", out]
    tokio = ["./target/release/examples/tokio_postgres_enrich", URL, QUERY, "user_id",
             str(depth)]
    yield "tokio-postgres buffered", tokio + ["ordered"]
    yield "tokio-postgres buffer_unordered", tokio + ["unordered"]
    yield "sluice ordered", sluice + ["--mode", "ordered"]
    yield "sluice unordered", sluice + ["--mode", "unordered"]
    if depth >= 8:
        yield "sluice unordered, batch query", sluice + [
            "--mode", "unordered", "--batch-size", "64", "--batch-query", BATCH_QUERY]


def main():
    data = tempfile.mkdtemp(prefix="sluice-pg-")
    bin_ = start_server(data)
    try:
        psql(bin_, "CREATE TABLE users (id int PRIMARY KEY, name text, tier text, since int, "
                   "score float8); INSERT INTO users SELECT i, 'user ' || i, CASE WHEN i % 3 = 0 "
                   "THEN 'gold' ELSE 'free' END, 2000 + i % 20, i / 7.0 "
                   f"FROM generate_series(1, {ROWS}) AS i; ANALYZE users;")
        inp = os.path.join(data, "in.jsonl")
        import random
        rng = random.Random(1)
        with open(inp, "w") as f:
            for n in range(RECORDS):
                f.write(json.dumps({"n": n, "user_id": rng.randint(1, ROWS),
                                    "amount": rng.randint(1, 1000)}) + "\n")
        out = os.path.join(data, "out.jsonl")
        results = {}
        for r in range(ROUNDS):
            for depth in DEPTHS:
                # Fewer records at depth 1: a round trip each.
                records = RECORDS if depth > 1 else RECORDS // 10
                src = inp
                if records != RECORDS:
                    src = os.path.join(data, "in-small.jsonl")
                    with open(inp) as i, open(src, "w") as o:
                        for _, line in zip(range(records), i):
                            o.write(line)
                for name, cmd in clients(depth, src, out):
                    cmd = [c if c != inp else src for c in cmd]
                    wall, cpu = run(cmd, src, out)
                    results.setdefault((depth, name), []).append(
                        (records / wall, cpu * 1e6 / records))
                    print(f"round {r + 1}, {depth} in flight, {name}: "
                          f"{records / wall:,.0f} records/s, {cpu * 1e6 / records:.1f} us CPU/record",
                          flush=True)
        lines = ["| in flight | client | records/s | CPU us/record | rate vs tokio buffer_unordered "
                 "| CPU vs tokio buffer_unordered |", "|---:|---|---:|---:|---:|---:|"]
        rows = []
        for depth in DEPTHS:
            base = results[(depth, "tokio-postgres buffer_unordered")]
            base_rate = statistics.median(x[0] for x in base)
            base_cpu = statistics.median(x[1] for x in base)
            for (d, name), xs in results.items():
                if d != depth:
                    continue
                rate = statistics.median(x[0] for x in xs)
                cpu = statistics.median(x[1] for x in xs)
                # Ratios per round, then their median: each round's clients ran side by side.
                rate_ratio = statistics.median(x[0] / b[0] for x, b in zip(xs, base))
                cpu_ratio = statistics.median(x[1] / b[1] for x, b in zip(xs, base))
                rows.append({"in_flight": depth, "client": name, "records_per_s": rate,
                             "cpu_us_per_record": cpu, "rate_ratio": rate_ratio,
                             "cpu_ratio": cpu_ratio, "rounds": xs})
                lines.append(f"| {depth} | {name} | {rate:,.0f} | {cpu:.1f} | {rate_ratio:.2f}x "
                             f"| {cpu_ratio:.2f}x |")
        os.makedirs("docs/figures", exist_ok=True)
        with open("docs/figures/postgres-comparison.txt", "w") as f:
            f.write("\n".join(lines) + "\n")
        with open("docs/figures/postgres-comparison.json", "w") as f:
            json.dump({"rounds": ROUNDS, "records": RECORDS, "rows": rows}, f, indent=1)
        print("\n".join(lines))
    finally:
        stop_server(bin_, data)
        shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    main()
