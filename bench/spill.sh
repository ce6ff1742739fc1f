#!/usr/bin/env bash
# Spill benchmark (issue 5): Redis memory for 100 x 5 MiB values written directly vs
# through tierproxy (spilled), store latency, and GET throughput of a spilled 5 MiB value
# with L1 off and on, for the local-directory store and S3 (moto on loopback); and
# redis-benchmark GET of a 1 MiB value, direct against spilled (issue 9, target 5).
# Usage: cargo build --release && bench/spill.sh      (needs redis-server, python3 + redis, moto[server])
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${TIERPROXY_BIN:-target/release/tierproxy}
[ -x "$BIN" ] || { echo "spill.sh: $BIN missing: cargo build --release" >&2; exit 1; }
TMP=$(mktemp -d /tmp/tierproxy-spillbench.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$TMP"; }
trap cleanup EXIT INT TERM
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_ping() { for _ in $(seq 300); do redis-cli -p "$1" ping 2>/dev/null | grep -q PONG && return 0; sleep 0.1; done; echo "port $1 down" >&2; exit 1; }

RP=$(free_port)
redis-server --bind 127.0.0.1 --port "$RP" --save '' --appendonly no --dir "$TMP" --daemonize no >"$TMP/redis.log" 2>&1 &
PIDS+=($!); wait_ping "$RP"
S3P=$(free_port)
python3 -m moto.server -H 127.0.0.1 -p "$S3P" >"$TMP/moto.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:$S3P/" && break; sleep 0.2; done
curl -s -X PUT "http://127.0.0.1:$S3P/spillbench" -o /dev/null

# Sets PORT; not run in a subshell, so that its pid reaches PIDS (and the cleanup).
start_proxy() { # name, store (dir|s3), l1 (true|false)
    local port; port=$(free_port)
    {
        printf '[l1]\nenabled = %s\nmax_value_bytes = 16777216\nmax_bytes = 1073741824\n' "$3"
        printf '[l3]\nenabled = true\nsweep_interval_secs = 0\nsigning_key = "bench-signing-key-0123456789"\n'
        if [ "$2" = s3 ]; then printf 'bucket = "spillbench"\n'; else printf 'dir = "%s/spill-%s"\n' "$TMP" "$1"; fi
    } >"$TMP/$1.toml"
    AWS_ENDPOINT_URL="http://127.0.0.1:$S3P" AWS_ACCESS_KEY_ID=x AWS_SECRET_ACCESS_KEY=x AWS_REGION=us-east-1 \
        "$BIN" --config "$TMP/$1.toml" --listen "127.0.0.1:$port" --admin-listen "" --upstream "127.0.0.1:$RP" \
        >"$TMP/$1.out" 2>"$TMP/$1.err" &
    PIDS+=($!)
    wait_ping "$port"
    for _ in $(seq 100); do redis-cli -p "$port" get __warm__ >/dev/null 2>&1 && break; sleep 0.1; done
    PORT=$port
}
start_proxy dir-off dir false; DIR_OFF=$PORT
start_proxy dir-on dir true; DIR_ON=$PORT
start_proxy s3-off s3 false; S3_OFF=$PORT
start_proxy s3-on s3 true; S3_ON=$PORT

OUT=bench/results/spill-latest.md
python3 - "$RP" "$DIR_OFF" "$DIR_ON" "$S3_OFF" "$S3_ON" >"$TMP/report.md" <<'PY'
import os, sys, time, statistics, redis
rp, dir_off, dir_on, s3_off, s3_on = map(int, sys.argv[1:])
direct = redis.Redis(port=rp)
MiB = 1 << 20
# Half random, half repetitive: a realistic mix for compression.
value = os.urandom(5 * MiB // 2) + b"json-like " * (5 * MiB // 20)
lines = []
for i in range(100):
    direct.set(f"direct:{i}", value)
p = redis.Redis(port=dir_off)
t = time.perf_counter()
for i in range(100):
    p.set(f"spilled:{i}", value)
write_s = (time.perf_counter() - t) / 100
# MEMORY USAGE per key (used_memory also moves with client buffers, so it misleads here).
mem_direct = sum(direct.memory_usage(f"direct:{i}") for i in range(100))
mem_proxy = sum(direct.memory_usage(f"spilled:{i}") for i in range(100))
lines.append("## Redis memory for 100 x 5 MiB values (sum of MEMORY USAGE)\n")
lines.append("| written | Redis memory | per value |")
lines.append("|---|---:|---:|")
lines.append(f"| directly to Redis | {mem_direct/MiB:.1f} MiB | {mem_direct/100/1024:.0f} KiB |")
lines.append(f"| through tierproxy (spilled, local dir) | {mem_proxy/1024:.1f} KiB | {mem_proxy/100:.0f} B |")
lines.append(f"\nRedis holds {mem_proxy/mem_direct*100:.4f} % of the direct figure. Mean spilled SET through the proxy (compress + fsynced write + stub): {write_s*1000:.1f} ms.\n")

def bench_get(port, key, seconds=4.0):
    c = redis.Redis(port=port)
    c.get(key); c.get(key)  # admit / warm
    n, lat = 0, []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter(); v = c.get(key); lat.append(time.perf_counter() - t); n += 1
        assert v == value
    lat.sort()
    return n / seconds, lat[len(lat)//2] * 1000, lat[int(len(lat)*0.99)] * 1000

direct.set("plain", value)
rows = [("Redis directly (value in Redis)", rp, "plain")]
for name, port in [("tierproxy, local dir, L1 off", dir_off), ("tierproxy, local dir, L1 on", dir_on),
                   ("tierproxy, S3 (moto), L1 off", s3_off), ("tierproxy, S3 (moto), L1 on", s3_on)]:
    redis.Redis(port=port).set(f"hot:{port}", value)
    rows.append((name, port, f"hot:{port}"))
lines.append("## GET of one 5 MiB value, one client, 4 s each\n")
lines.append("| target | GET/s | MiB/s | p50 ms | p99 ms |")
lines.append("|---|---:|---:|---:|---:|")
d = None
for name, port, key in rows:
    ops, p50, p99 = bench_get(port, key)
    d = d or ops
    lines.append(f"| {name} | {ops:.0f} | {ops*5:.0f} | {p50:.2f} | {p99:.2f} |")
for name, port in [("local dir", dir_off), ("S3 (moto)", s3_off)]:
    info = redis.Redis(port=port).info("spill")
    lines.append(f"\nStore latency, {name}: mean {info['spill_store_avg_ms']} ms over {info['spill_store_ops']} calls.")
print("\n".join(lines))
PY
# Issue 9, target 5: redis-benchmark GET of one 1 MiB value, -c 4, direct Redis (the
# value in Redis) against tierproxy (spilled: L1 on = a hot value served from L1, L1 off =
# read from the local-directory store every time). Each target first SETs the value
# itself (redis-benchmark's key is the same for all), rounds interleaved, medians.
ROUNDS=${ROUNDS:-3}
declare -A BOPS BP99
for round in $(seq "$ROUNDS"); do
    for t in direct on off; do
        case $t in direct) p=$RP ;; on) p=$DIR_ON ;; off) p=$DIR_OFF ;; esac
        redis-benchmark -p "$p" -t set -d 1048576 -n 4 -c 1 -q >/dev/null 2>&1
        csv=$(timeout 300 redis-benchmark -p "$p" -t get -d 1048576 -n 3000 -c 4 --csv 2>/dev/null | grep '"GET"' | tail -1)
        BOPS[$t]+="$(echo "$csv" | cut -d, -f2 | tr -d '"') "
        BP99[$t]+="$(echo "$csv" | cut -d, -f7 | tr -d '"') "
    done
done
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
{
    echo
    echo "## redis-benchmark GET of one 1 MiB value, -c 4, n=3000, $ROUNDS rounds (medians)"
    echo
    echo "| target | GET/s | p99 ms | vs direct |"
    echo "|---|---:|---:|---:|"
    d=$(echo "${BOPS[direct]}" | median)
    for t in direct on off; do
        case $t in direct) name="Redis directly (value in Redis)" ;; on) name="tierproxy, spilled, L1 on (hot)" ;; off) name="tierproxy, spilled, L1 off (store read each time)" ;; esac
        o=$(echo "${BOPS[$t]}" | median)
        echo "| $name | $o | $(echo "${BP99[$t]}" | median) | $(python3 -c "print(f'{$o/$d:.2f}')") |"
    done
    echo
    echo "Runs (GET/s): direct ${BOPS[direct]}; L1 on ${BOPS[on]}; L1 off ${BOPS[off]}"
} >>"$TMP/report.md"
{
    echo "# Spill benchmark ($(date -u '+%Y-%m-%d %H:%M UTC'))"
    echo
    echo "Machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(uname -sr); $(redis-server --version | cut -d' ' -f3). Threshold 512 KiB, zstd level 3."
    echo
    cat "$TMP/report.md"
} >"$OUT"
cat "$OUT"
