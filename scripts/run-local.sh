#!/usr/bin/env bash
# Runs tierproxy on 127.0.0.1:6380 in front of a real local 3-master Redis Cluster that
# this script starts (ports 7001-7003, data under ./data/cluster). Installs redis-server
# if it is missing (Debian). Ctrl-C stops the proxy and the cluster.
#
#   scripts/run-local.sh [extra tierproxy args...]
#
# Env: TIERPROXY_LISTEN (default 127.0.0.1:6380), CLUSTER_BASE_PORT (default 7001),
#      CARGO_PROFILE (release|dev, default release).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
BASE=${CLUSTER_BASE_PORT:-7001}
LISTEN=${TIERPROXY_LISTEN:-127.0.0.1:6380}
PROFILE=${CARGO_PROFILE:-release}
DATA=$ROOT/data
PORTS=("$BASE" "$((BASE + 1))" "$((BASE + 2))")

if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
    echo "run-local: installing redis-server and redis-tools" >&2
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server redis-tools >/dev/null
fi

PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

mkdir -p "$DATA/spill"
for p in "${PORTS[@]}"; do
    if redis-cli -p "$p" ping >/dev/null 2>&1; then
        echo "run-local: port $p is already serving Redis; stop it or set CLUSTER_BASE_PORT" >&2
        exit 1
    fi
    dir=$DATA/cluster/$p
    rm -rf "$dir" && mkdir -p "$dir"
    redis-server --bind 127.0.0.1 --port "$p" --dir "$dir" --cluster-enabled yes \
        --cluster-config-file nodes.conf --cluster-node-timeout 3000 --save '' \
        --appendonly no --logfile "$dir/redis.log" --daemonize no &
    PIDS+=($!)
done
for p in "${PORTS[@]}"; do
    for _ in $(seq 100); do redis-cli -p "$p" ping >/dev/null 2>&1 && break; sleep 0.1; done
    if ! redis-cli -p "$p" ping >/dev/null 2>&1; then
        # Typically the port or its cluster bus port (port+10000) is taken.
        echo "run-local: redis-server on port $p did not start:" >&2
        tail -n 5 "$DATA/cluster/$p/redis.log" >&2
        exit 1
    fi
done
redis-cli --cluster create "${PORTS[@]/#/127.0.0.1:}" --cluster-yes >/dev/null
for _ in $(seq 100); do
    ok=1
    for p in "${PORTS[@]}"; do
        redis-cli -p "$p" cluster info | grep -q 'cluster_state:ok' || ok=0
    done
    [ $ok = 1 ] && break
    sleep 0.2
done
echo "run-local: cluster up on ${PORTS[*]}" >&2

if [ "$PROFILE" = release ]; then
    cargo build --release --quiet
    BIN=$ROOT/target/release/tierproxy
else
    cargo build --quiet
    BIN=$ROOT/target/debug/tierproxy
fi
# The embedded default spill store: values over 512 KiB go to ./data/spill.
CACHE_L3_ENABLED=${CACHE_L3_ENABLED:-true} CACHE_L3_DIR=${CACHE_L3_DIR:-$DATA/spill} \
    "$BIN" --listen "$LISTEN" --upstream "127.0.0.1:${PORTS[0]},127.0.0.1:${PORTS[1]}" "$@" &
PIDS+=($!)
echo "run-local: try: redis-cli -p ${LISTEN##*:} ping   (Ctrl-C to stop)" >&2
wait "${PIDS[-1]}"
