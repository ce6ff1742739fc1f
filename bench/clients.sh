#!/usr/bin/env bash
# Many clients (issue 9, target 4), one standalone redis behind tierproxy (L1 off), all
# on loopback:
#  1. tierproxy's RSS with IDLE idle client connections (default 10,000; one in a
#     hundred sends a PING, so they are served connections, not just accepted sockets),
#     against its RSS before they opened.
#  2. redis-benchmark GET, -r 100000 -d 3, with -c 50 and with -c 1000, at -P 1 and
#     -P 16: ROUNDS interleaved rounds, medians, and the ratio 1000 / 50.
# Targets: 10,000 idle connections <= 200 MiB RSS; throughput with 1,000 clients >= 0.9x
# with 50.
#
# Usage: cargo build --release && bench/clients.sh     (ROUNDS=3 IDLE=10000 N_P1=200000 N_P16=2000000)
# Runs last a few seconds at either depth: at -P 16, 200,000 requests from 1,000 clients
# were 200 each, over in a quarter of a second, mostly connecting.
# Needs a descriptor limit above IDLE for this shell (ulimit -n), redis-server,
# redis-benchmark and python3.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
IDLE=${IDLE:-10000}
N_P1=${N_P1:-200000}
N_P16=${N_P16:-2000000}
BIN=${TIERPROXY_BIN:-target/release/tierproxy}
[ -x "$BIN" ] || { echo "clients.sh: $BIN missing: cargo build --release" >&2; exit 1; }
for t in redis-server redis-cli redis-benchmark python3; do
    command -v $t >/dev/null || { echo "clients.sh: $t missing" >&2; exit 1; }
done
# The client side holds IDLE sockets, the proxy IDLE more: each needs the headroom.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -le $((IDLE + 100)) ]; then
    echo "clients.sh: descriptor limit $(ulimit -n) is too low for IDLE=$IDLE" >&2
    exit 1
fi

TMP=$(mktemp -d /tmp/tierproxy-clients.XXXXXX)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$TMP"
}
trap cleanup EXIT INT TERM
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_ping() { for _ in $(seq 300); do redis-cli -p "$1" ping 2>/dev/null | grep -q PONG && return 0; sleep 0.1; done; echo "port $1 never answered" >&2; exit 1; }

RP=$(free_port)
redis-server --bind 127.0.0.1 --port "$RP" --save '' --appendonly no --dir "$TMP" \
    --maxclients $((IDLE + 2000)) --daemonize no >"$TMP/redis.log" 2>&1 &
PIDS+=($!)
wait_ping "$RP"
PP=$(free_port)
# Forwarding only (L1 is on by default): this measures connections, not the cache.
printf '[client]\nmaxclients = %d\n[l1]\nenabled = false\n' $((IDLE + 1000)) >"$TMP/proxy.toml"
"$BIN" --config "$TMP/proxy.toml" --listen "127.0.0.1:$PP" --admin-listen "" --upstream "127.0.0.1:$RP" \
    >"$TMP/proxy.out" 2>"$TMP/proxy.err" &
PXPID=$!
PIDS+=($PXPID)
wait_ping "$PP"
for _ in $(seq 100); do redis-cli -p "$PP" get __warm__ >/dev/null 2>&1 && break; sleep 0.1; done

rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
before=$(rss_kib "$PXPID")
python3 - "$PP" "$IDLE" "$TMP/idle.ready" <<'PY' &
import socket, sys, time, os
port, n, ready = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
conns = []
for i in range(n):
    s = socket.create_connection(("127.0.0.1", port))
    if i % 100 == 0:
        s.sendall(b"PING\r\n")
        assert s.recv(16) == b"+PONG\r\n"
    conns.append(s)
open(ready, "w").close()
time.sleep(600)
PY
IDLEPID=$!
PIDS+=($IDLEPID)
for _ in $(seq 600); do [ -e "$TMP/idle.ready" ] && break; kill -0 "$IDLEPID" 2>/dev/null || { echo "clients.sh: the idle client failed" >&2; exit 1; }; sleep 0.1; done
[ -e "$TMP/idle.ready" ] || { echo "clients.sh: idle connections never opened" >&2; exit 1; }
sleep 1
during=$(rss_kib "$PXPID")
connected=$(redis-cli -p "$PP" info clients | tr -d '\r' | sed -n 's/^connected_clients://p')
kill "$IDLEPID" 2>/dev/null || true
wait "$IDLEPID" 2>/dev/null || true
sleep 1

declare -A OPS P99
for round in $(seq "$ROUNDS"); do
    for P in 1 16; do
        order=(50 1000)
        [ $((round % 2)) = 0 ] && order=(1000 50)
        for c in "${order[@]}"; do
            n=$N_P1
            [ "$P" = 16 ] && n=$N_P16
            csv=$(timeout 300 redis-benchmark -p "$PP" -t get -r 100000 -d 3 -n "$n" -c "$c" -P "$P" --csv 2>/dev/null | grep '"GET"' | tail -1)
            OPS[$c/$P]+="$(echo "$csv" | cut -d, -f2 | tr -d '"') "
            P99[$c/$P]+="$(echo "$csv" | cut -d, -f7 | tr -d '"') "
        done
    done
done

median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
OUT=bench/results/clients-latest.md
{
    echo "# Many clients ($(date -u '+%Y-%m-%d %H:%M UTC'), $(git rev-parse --short HEAD 2>/dev/null || echo '?'))"
    echo
    echo "Machine: $(nproc) cores, $(uname -sr); $(redis-server --version | cut -d' ' -f3). tierproxy L1 off, one standalone redis."
    echo
    echo "## Idle connections"
    echo
    echo "$IDLE idle connections (connected_clients $connected): RSS $((before / 1024)) MiB before, $((during / 1024)) MiB with them open ($(( (during - before) * 1024 / IDLE )) bytes each)."
    echo
    echo "## redis-benchmark GET, -r 100000 -d 3, n=$N_P1 at -P 1 and $N_P16 at -P 16, $ROUNDS rounds (medians)"
    echo
    echo "| pipeline | -c 50 rps | -c 1000 rps | 1000 / 50 | p99 ms, 50 / 1000 |"
    echo "|---:|---:|---:|---:|---|"
    for P in 1 16; do
        a=$(echo "${OPS[50/$P]}" | median)
        b=$(echo "${OPS[1000/$P]}" | median)
        echo "| $P | $a | $b | $(python3 -c "print(f'{$b/$a:.2f}')") | $(echo "${P99[50/$P]}" | median) / $(echo "${P99[1000/$P]}" | median) |"
    done
    echo
    for P in 1 16; do echo "Runs at -P $P (rps): -c 50: ${OPS[50/$P]}; -c 1000: ${OPS[1000/$P]}"; echo; done
} >"$OUT"
cat "$OUT"
