#!/usr/bin/env bash
# L1 hot-key benchmark (issue 4). One standalone redis; tierproxy with L1 off, L1 on
# (two instances, A and B, for the staleness trials); all on loopback.
#
#  1. zipf workload with the project's load driver (bench/load.rs): 100k keys, s=1.1,
#     90% GET, values 100 B–1 KB, -c 50 -P 16: direct / L1 off / L1 on, interleaved rounds.
#     For L1 on: hit ratio (INFO l1) and backend GET calls per client GET (INFO commandstats).
#  2. redis-benchmark GET of one hot key, -c 50, -P 1 and -P 16: direct / L1 off / L1 on.
#  3. staleness after a write through B, read through A: 1,000 trials.
#
# Usage: cargo build --release --bins --examples && bench/l1.sh
#        (ROUNDS=3 DURATION=10 HOT_ROUNDS=7 N_P1=200000 N_P16=3000000)
# Each redis-benchmark run lasts about two seconds at either depth: at -P 16 a run of
# 200,000 requests was over in 0.15 s and its rate swung by ±15 % from run to run.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
# The hot-key runs sit within a few per cent of direct Redis, inside the noise of one
# run: more rounds, interleaved, for their medians.
HOT_ROUNDS=${HOT_ROUNDS:-7}
DURATION=${DURATION:-10}
N_P1=${N_P1:-200000}
N_P16=${N_P16:-3000000}
BIN=${TIERPROXY_BIN:-target/release/tierproxy}
LOAD=${LOAD_BIN:-target/release/examples/load}
for f in "$BIN" "$LOAD"; do
    [ -x "$f" ] || { echo "l1.sh: $f missing: run cargo build --release --examples" >&2; exit 1; }
done
for t in redis-server redis-cli redis-benchmark; do
    command -v $t >/dev/null || { echo "l1.sh: $t missing (apt-get install redis-server redis-tools)" >&2; exit 1; }
done

TMP=$(mktemp -d /tmp/tierproxy-l1bench.XXXXXX)
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
redis-server --bind 127.0.0.1 --port "$RP" --save '' --appendonly no --dir "$TMP" --daemonize no >"$TMP/redis.log" 2>&1 &
PIDS+=($!)
wait_ping "$RP"

# Sets PORT; not run in a subshell, so that its pid reaches PIDS (and the cleanup).
start_proxy() { # name, l1 on|off
    local port; port=$(free_port)
    printf '[l1]\nenabled = %s\nmax_entries = 200000\n' "$([ "$2" = on ] && echo true || echo false)" >"$TMP/$1.toml"
    "$BIN" --config "$TMP/$1.toml" --listen "127.0.0.1:$port" --admin-listen "" --upstream "127.0.0.1:$RP" >"$TMP/$1.out" 2>"$TMP/$1.err" &
    PIDS+=($!)
    wait_ping "$port"
    # Wait until the proxy knows its upstream.
    for _ in $(seq 100); do redis-cli -p "$port" get __warm__ >/dev/null 2>&1 && break; sleep 0.1; done
    PORT=$port
}
start_proxy off off; OFF=$PORT
start_proxy on on; ON=$PORT
start_proxy onb on; ONB=$PORT

"$LOAD" --mode prefill --addr "127.0.0.1:$RP" >/dev/null

field() { tr ' ' '\n' | sed -n "s/^$1=//p"; }
info_field() { redis-cli -p "$1" info "$2" | tr -d '\r' | sed -n "s/^$3://p"; }
get_calls() { redis-cli -p "$RP" info commandstats | tr -d '\r' | sed -n 's/^cmdstat_get:calls=\([0-9]*\),.*/\1/p'; }

declare -A ZOPS ZP50 ZP99
for round in $(seq "$ROUNDS"); do
    order=(direct off on)
    # rotate the order each round
    for _ in $(seq $((round % 3))); do order=("${order[@]:1}" "${order[0]}"); done
    for t in "${order[@]}"; do
        case $t in direct) p=$RP ;; off) p=$OFF ;; on) p=$ON ;; esac
        g0=$(get_calls)
        if [ "$t" = on ]; then h0=$(info_field "$ON" l1 l1_hits); m0=$(info_field "$ON" l1 l1_misses); fi
        line=$("$LOAD" --mode zipf --addr "127.0.0.1:$p" --duration-secs "$DURATION")
        g1=$(get_calls)
        ZOPS[$t]+="$(echo "$line" | field ops_per_sec) "
        ZP50[$t]+="$(echo "$line" | field p50_us) "
        ZP99[$t]+="$(echo "$line" | field p99_us) "
        if [ "$t" = on ]; then
            h1=$(info_field "$ON" l1 l1_hits); m1=$(info_field "$ON" l1 l1_misses)
            reads=$(echo "$line" | field reads)
            HIT="$(python3 -c "print(f'{($h1-$h0)/max(1,($h1-$h0)+($m1-$m0))*100:.1f}')")"
            CALLS="$(python3 -c "print(f'{($g1-$g0)/max(1,$reads):.3f}')")"
        fi
    done
done

median() { python3 -c "import statistics,sys; v=[float(x) for x in sys.argv[1:]]; print(f'{statistics.median(v):.0f}')" $1; }

declare -A HOPS HP99
for P in 1 16; do
    for round in $(seq "$HOT_ROUNDS"); do
        order=(direct off on)
        [ $((round % 2)) = 0 ] && order=(on off direct)
        for t in "${order[@]}"; do
            case $t in direct) p=$RP ;; off) p=$OFF ;; on) p=$ON ;; esac
            # No -r: every request is GET of the same key ("key:__rand_int__").
            n=$N_P1
            [ "$P" = 16 ] && n=$N_P16
            csv=$(timeout 300 redis-benchmark -p "$p" -t get -n "$n" -c 50 -P "$P" --csv 2>/dev/null | grep '"GET"' | tail -1)
            HOPS[$t$P]+="$(echo "$csv" | cut -d, -f2 | tr -d '"') "
            HP99[$t$P]+="$(echo "$csv" | cut -d, -f7 | tr -d '"') "
        done
    done
done

STALE=$("$LOAD" --mode staleness --addr "127.0.0.1:$ON" --writer "127.0.0.1:$ONB" --trials 1000 --prefix "stale:")
STALE_DIRECT=$("$LOAD" --mode staleness --addr "127.0.0.1:$ON" --writer "127.0.0.1:$RP" --trials 1000 --prefix "stale2:")

ratio() { python3 -c "print(f'{float(\"$1\")/float(\"$2\"):.2f}')"; }
OUT=bench/results/l1-latest.md
mkdir -p bench/results
{
    echo "# L1 benchmark ($(date -u '+%Y-%m-%d %H:%M UTC'))"
    echo
    echo "Machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(uname -sr); $(redis-server --version | cut -d' ' -f3); rounds=$ROUNDS (hot key: $HOT_ROUNDS)."
    echo
    echo "## zipf (100k keys, s=1.1, 90% GET, 100 B–1 KB values, 50 conns × pipeline 16, ${DURATION}s runs; load driver bench/load.rs)"
    echo
    echo "| target | median ops/s | median p50 µs | median p99 µs | vs direct |"
    echo "|---|---:|---:|---:|---:|"
    d=$(median "${ZOPS[direct]}")
    for t in direct off on; do
        o=$(median "${ZOPS[$t]}")
        echo "| $t | $o | $(median "${ZP50[$t]}") | $(median "${ZP99[$t]}") | $(ratio "$o" "$d") |"
    done
    echo
    echo "L1 on, last round: hit ratio ${HIT}%, backend GET calls per client GET ${CALLS}."
    echo
    echo "## redis-benchmark, GET of one hot key, -c 50, n=$N_P1 at -P 1 and $N_P16 at -P 16"
    echo
    echo "| pipeline | target | median rps | median p99 ms | vs direct |"
    echo "|---:|---|---:|---:|---:|"
    for P in 1 16; do
        d=$(median "${HOPS[direct$P]}")
        for t in direct off on; do
            o=$(median "${HOPS[$t$P]}")
            p99=$(python3 -c "import statistics,sys; print(f'{statistics.median([float(x) for x in sys.argv[1:]]):.3f}')" ${HP99[$t$P]})
            echo "| $P | $t | $o | $p99 | $(ratio "$o" "$d") |"
        done
    done
    echo
    echo "Runs, in round order (rps / p99 ms):"
    echo
    for P in 1 16; do
        for t in direct off on; do
            echo "- -P $P $t: ${HOPS[$t$P]}/ ${HP99[$t$P]}"
        done
    done
    echo
    echo "## Staleness: a write acknowledged, then polled through another proxy (1,000 trials)"
    echo
    echo "Time from the write's acknowledgement until a read through proxy A returns the new value (includes one read round trip)."
    echo
    echo "- written through proxy B: $STALE"
    echo "- written to Redis directly: $STALE_DIRECT"
} >"$OUT"
cat "$OUT"
