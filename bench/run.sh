#!/usr/bin/env bash
# bench/run.sh — throughput and proxy CPU cost of tierproxy against direct Redis and
# twemproxy (nutcracker), measured with redis-benchmark GET and SET, -c 50, -P 1 and -P 16.
#
# Starts everything it needs in a temp dir on free 127.0.0.1 ports (a 3-master Redis
# Cluster, one standalone Redis, nutcracker in front of the standalone, tierproxy in front
# of each) and stops it all on exit, Ctrl-C or error. Targets:
#   direct-cluster        redis-benchmark --cluster against the cluster itself
#   tierproxy-cluster     tierproxy in front of that cluster
#   direct-standalone     the standalone Redis itself
#   twemproxy-standalone  nutcracker in front of it
#   tierproxy-standalone  tierproxy in front of it
# For each pipeline depth and op, ROUNDS rounds; each round runs every target once, in an
# order rotated from round to round. Prints medians, proxy CPU µs per request (utime+stime
# from /proc/PID/stat) and ratios as markdown on stdout; progress goes to stderr. Writes
# the summary to bench/results/latest.md and the raw per-run rows to bench/results/latest.csv.
#
#   cargo build --release && bench/run.sh
#   QUICK=1 bench/run.sh                    # smoke test: small N, 1 round
#   SKIP_TIERPROXY=1 QUICK=1 bench/run.sh   # only direct Redis and twemproxy
#
# Knobs (env): ROUNDS (5), N_P1 (150000), N_P16 (1000000; used for every pipeline > 1),
# PIPELINES ("1 16"), OPS ("get set"), CLIENTS (50), KEYSPACE (100000, redis-benchmark -r),
# DATA_SIZE (3, -d), WARMUP_N (20000), BENCH_TIMEOUT (300 s per redis-benchmark run),
# WAIT_TIMEOUT (30 s for each server to come up), CLUSTER_RUN_SECONDS (8: direct-cluster
# runs are sized to last about this long, see below), QUICK (0), SKIP_TIERPROXY (0),
# TIERPROXY_BIN (target/release/tierproxy), BENCH_BUILD (0: 1 = cargo build --release if
# the binary is missing), NUTCRACKER_SERVER_CONNECTIONS (1), RESULTS_DIR (bench/results),
# KEEP_TMP (0: 1 = keep the temp dir with all logs), BENCH_L1 (false: tierproxy's L1, which
# is on by default, is off here because issue 9's forwarding targets are measured without it).
set -euo pipefail
export LC_ALL=C

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$SCRIPT_DIR/.." && pwd)

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
warn() { printf '[bench %s] WARNING: %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() {
    printf '[bench] ERROR: %s\n' "$*" >&2
    exit 1
}

# ---------------------------------------------------------------- configuration
QUICK=${QUICK:-0}
if [ "$QUICK" = 1 ]; then
    d_rounds=1 d_np1=5000 d_np16=20000 d_warm=2000 d_tmo=120 d_crs=2
else
    d_rounds=5 d_np1=150000 d_np16=1000000 d_warm=20000 d_tmo=300 d_crs=8
fi
ROUNDS=${ROUNDS:-$d_rounds}
N_P1=${N_P1:-$d_np1}
N_P16=${N_P16:-$d_np16}
WARMUP_N=${WARMUP_N:-$d_warm}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-$d_tmo}
WAIT_TIMEOUT=${WAIT_TIMEOUT:-30}
CLUSTER_RUN_SECONDS=${CLUSTER_RUN_SECONDS:-$d_crs}
CLIENTS=${CLIENTS:-50}
KEYSPACE=${KEYSPACE:-100000}
DATA_SIZE=${DATA_SIZE:-3}
PIPELINES=${PIPELINES:-1 16}
OPS=${OPS:-get set}
SKIP_TIERPROXY=${SKIP_TIERPROXY:-0}
BENCH_BUILD=${BENCH_BUILD:-0}
KEEP_TMP=${KEEP_TMP:-0}
NUTCRACKER_SERVER_CONNECTIONS=${NUTCRACKER_SERVER_CONNECTIONS:-1}
RESULTS_DIR=${RESULTS_DIR:-$ROOT/bench/results}

for v in ROUNDS N_P1 N_P16 WARMUP_N BENCH_TIMEOUT WAIT_TIMEOUT CLUSTER_RUN_SECONDS CLIENTS KEYSPACE DATA_SIZE \
    NUTCRACKER_SERVER_CONNECTIONS; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive integer (got '${!v}')"
done
for p in $PIPELINES; do
    [[ $p =~ ^[1-9][0-9]*$ ]] || die "PIPELINES must be positive integers (got '$PIPELINES')"
done
for o in $OPS; do
    case $o in get | set) ;; *) die "OPS may contain only 'get' and 'set' (got '$OPS')" ;; esac
done
[ "$KEYSPACE" -le 1000000000000 ] || die "KEYSPACE too large"

# ---------------------------------------------------------------- tools and binary
for t in redis-server redis-cli redis-benchmark nutcracker timeout awk sort getconf ss mktemp; do
    command -v "$t" >/dev/null 2>&1 || die "'$t' not found in PATH (Debian: apt-get install redis-server redis-tools nutcracker coreutils iproute2 gawk)"
done
CLK_TCK=$(getconf CLK_TCK)

TIERPROXY=""
if [ "$SKIP_TIERPROXY" != 1 ]; then
    TIERPROXY=${TIERPROXY_BIN:-$ROOT/target/release/tierproxy}
    if [ ! -x "$TIERPROXY" ]; then
        if [ -n "${TIERPROXY_BIN:-}" ]; then
            die "TIERPROXY_BIN='$TIERPROXY' is not an executable file"
        elif [ "$BENCH_BUILD" = 1 ]; then
            command -v cargo >/dev/null 2>&1 || die "BENCH_BUILD=1 but cargo is not in PATH"
            log "building tierproxy: cargo build --release (BENCH_BUILD=1)"
            (cd "$ROOT" && cargo build --release) || die "cargo build --release failed"
            [ -x "$TIERPROXY" ] || die "cargo build --release did not produce $TIERPROXY"
        else
            die "tierproxy binary not found at $TIERPROXY.
  Build it first:   cargo build --release && bench/run.sh
  or let this script build it: BENCH_BUILD=1 bench/run.sh
  or use another binary:       TIERPROXY_BIN=/path/to/tierproxy bench/run.sh
  or benchmark only direct Redis and twemproxy: SKIP_TIERPROXY=1 bench/run.sh"
        fi
    fi
    newer=$(find "$ROOT/src" "$ROOT/Cargo.toml" "$ROOT/Cargo.lock" -newer "$TIERPROXY" -print 2>/dev/null | head -1 || true)
    if [ -z "${TIERPROXY_BIN:-}" ] && [ -n "$newer" ]; then
        warn "$TIERPROXY is older than $newer — run 'cargo build --release' to benchmark the current source"
    fi
fi

# ---------------------------------------------------------------- process bookkeeping
TMP=$(mktemp -d "${TMPDIR:-/tmp}/tierproxy-bench.XXXXXX")
PIDS=()
BENCH_PID=""

alive() { # pid: running and not a zombie
    local s
    s=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    s=${s##*) }
    [ "${s:0:1}" != Z ]
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    set +e
    if [ -n "$BENCH_PID" ]; then kill -TERM "$BENCH_PID" 2>/dev/null; fi
    if [ "${#PIDS[@]}" -gt 0 ]; then
        kill -TERM "${PIDS[@]}" 2>/dev/null
        local _ p any
        for _ in $(seq 100); do # up to 10 s, then SIGKILL
            any=0
            for p in "${PIDS[@]}"; do alive "$p" && any=1; done
            [ "$any" = 0 ] && break
            sleep 0.1
        done
        for p in "${PIDS[@]}"; do alive "$p" && kill -KILL "$p" 2>/dev/null; done
    fi
    wait 2>/dev/null
    if [ "$KEEP_TMP" = 1 ]; then
        log "kept temp dir $TMP (KEEP_TMP=1)"
    else
        rm -rf "$TMP"
    fi
    [ "$rc" -ne 0 ] && printf '[bench] exiting with status %s (rerun with KEEP_TMP=1 to keep all logs)\n' "$rc" >&2
    exit "$rc"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT
trap 'log "terminated"; exit 143' TERM

# ---------------------------------------------------------------- ports
RANGE_LO=10000
RANGE_HI=$(awk '{print $1 - 10000}' /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 22768)
[ "$RANGE_HI" -gt $((RANGE_LO + 1000)) ] || RANGE_HI=22768
USED_PORTS=" "
port_busy() { [ -n "$(ss -Htan "( sport = :$1 )" 2>/dev/null)" ]; }
PICKED=""
pick_port() { # sets PICKED to a free port whose +10000 (cluster bus) is free too
    local _ p
    for _ in $(seq 500); do
        p=$((RANGE_LO + (RANDOM * 32768 + RANDOM) % (RANGE_HI - RANGE_LO)))
        case $USED_PORTS in *" $p "* | *" $((p + 10000)) "*) continue ;; esac
        port_busy "$p" && continue
        port_busy $((p + 10000)) && continue
        USED_PORTS+="$p $((p + 10000)) "
        PICKED=$p
        return 0
    done
    die "could not find a free loopback port"
}

rcli() { timeout 5 redis-cli -h 127.0.0.1 "$@"; }

LAST_PID=""
spawn() { # logfile cmd...: start in the background, remember the pid
    local logf=$1
    shift
    "$@" >"$logf" 2>&1 &
    LAST_PID=$!
    PIDS+=("$LAST_PID")
}

wait_ping() { # name port pid logfile
    local name=$1 port=$2 pid=$3 logf=$4 deadline=$((SECONDS + WAIT_TIMEOUT))
    while :; do
        if ! alive "$pid"; then
            tail -n 20 "$logf" >&2 2>/dev/null || true
            die "$name (pid $pid, port $port) exited during start-up; log above ($logf)"
        fi
        if [ "$(rcli -p "$port" ping 2>/dev/null)" = PONG ]; then return 0; fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            tail -n 20 "$logf" >&2 2>/dev/null || true
            die "$name on 127.0.0.1:$port did not answer PING within ${WAIT_TIMEOUT}s"
        fi
        sleep 0.1
    done
}

start_redis() { # name port dir [extra redis-server args]
    local name=$1 port=$2 dir=$3
    shift 3
    mkdir -p "$dir"
    spawn "$dir/stdout.log" redis-server --bind 127.0.0.1 --port "$port" --dir "$dir" \
        --save '' --appendonly no --protected-mode no --daemonize no \
        --logfile "$dir/redis.log" "$@"
    wait_ping "$name" "$port" "$LAST_PID" "$dir/redis.log"
}

# ---------------------------------------------------------------- machine description
machine_md() {
    local cpu
    cpu=$(awk -F': ' '/^model name/{print $2; exit}' /proc/cpuinfo 2>/dev/null)
    echo "- date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "- nproc: $(nproc)"
    echo "- CPU: ${cpu:-unknown}"
    echo "- kernel: $(uname -srm)"
    echo "- load average at start: $LOADAVG_START"
    echo "- $(redis-server --version)"
    echo "- nutcracker: $(nutcracker --version 2>&1 | head -1)"
    if [ -n "$TIERPROXY" ]; then
        local rev
        rev=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
        if [ -n "$(git -C "$ROOT" status --porcelain --untracked-files=no 2>/dev/null)" ]; then rev="$rev+dirty"; fi
        echo "- tierproxy: $TIERPROXY (repo at $rev, binary built $(date -u -r "$TIERPROXY" '+%Y-%m-%d %H:%M UTC'))"
    else
        echo "- tierproxy: skipped (SKIP_TIERPROXY=1)"
    fi
}
LOADAVG_START=$(cut -d' ' -f1-3 /proc/loadavg)
MACHINE=$(machine_md)
log "machine:"
printf '%s\n' "$MACHINE" >&2
log "temp dir $TMP"

# ---------------------------------------------------------------- servers
CL_PORTS=()
for _ in 1 2 3; do
    pick_port
    CL_PORTS+=("$PICKED")
done
CL_PIDS=()
for p in "${CL_PORTS[@]}"; do
    start_redis "cluster node" "$p" "$TMP/cluster/$p" --cluster-enabled yes \
        --cluster-config-file nodes.conf --cluster-node-timeout 5000
    CL_PIDS+=("$LAST_PID")
done
log "creating cluster on ports ${CL_PORTS[*]}"
timeout 60 redis-cli --cluster create "${CL_PORTS[@]/#/127.0.0.1:}" --cluster-yes \
    >"$TMP/cluster/create.log" 2>&1 || {
    tail -n 20 "$TMP/cluster/create.log" >&2
    die "redis-cli --cluster create failed"
}
deadline=$((SECONDS + WAIT_TIMEOUT))
while :; do
    ok=1
    for p in "${CL_PORTS[@]}"; do
        info=$(rcli -p "$p" cluster info 2>/dev/null | tr -d '\r') || info=""
        grep -q '^cluster_state:ok' <<<"$info" || ok=0
        grep -q '^cluster_known_nodes:3' <<<"$info" || ok=0
    done
    [ "$ok" = 1 ] && break
    [ "$SECONDS" -ge "$deadline" ] && die "cluster did not reach cluster_state:ok on all nodes within ${WAIT_TIMEOUT}s"
    sleep 0.2
done
log "cluster ok"

pick_port
SA_PORT=$PICKED
start_redis "standalone redis" "$SA_PORT" "$TMP/standalone"
SA_PID=$LAST_PID
log "standalone redis on $SA_PORT"

pick_port
NC_PORT=$PICKED
pick_port
NC_STATS_PORT=$PICKED
mkdir -p "$TMP/nutcracker"
cat >"$TMP/nutcracker/nutcracker.yml" <<EOF
bench:
  listen: 127.0.0.1:$NC_PORT
  hash: fnv1a_64
  distribution: ketama
  redis: true
  preconnect: true
  auto_eject_hosts: false
  server_connections: $NUTCRACKER_SERVER_CONNECTIONS
  servers:
   - 127.0.0.1:$SA_PORT:1
EOF
nutcracker -t -c "$TMP/nutcracker/nutcracker.yml" >"$TMP/nutcracker/check.log" 2>&1 || {
    cat "$TMP/nutcracker/check.log" >&2
    die "nutcracker rejected its configuration"
}
spawn "$TMP/nutcracker/stdout.log" nutcracker -c "$TMP/nutcracker/nutcracker.yml" \
    -o "$TMP/nutcracker/nutcracker.log" -a 127.0.0.1 -s "$NC_STATS_PORT" \
    -p "$TMP/nutcracker/nutcracker.pid"
NC_PID=$LAST_PID
wait_ping nutcracker "$NC_PORT" "$NC_PID" "$TMP/nutcracker/nutcracker.log"
log "nutcracker on $NC_PORT -> $SA_PORT"

TPC_PORT="" TPC_PID="" TPS_PORT="" TPS_PID=""
start_tierproxy() { # name dir upstreams -> sets TP_PORT, TP_PID
    local name=$1 dir=$2 ups=$3 admin
    pick_port
    TP_PORT=$PICKED
    pick_port
    admin=$PICKED
    mkdir -p "$dir"
    CACHE_L1_ENABLED=${BENCH_L1:-false} "$TIERPROXY" --listen "127.0.0.1:$TP_PORT" \
        --admin-listen "127.0.0.1:$admin" --upstream "$ups" >"$dir/stdout.log" 2>"$dir/stderr.log" &
    TP_PID=$!
    PIDS+=("$TP_PID")
    if ! wait_ping_quiet "$TP_PORT" "$TP_PID"; then
        tail -n 20 "$dir/stdout.log" "$dir/stderr.log" >&2 2>/dev/null || true
        if alive "$TP_PID"; then
            die "$name (127.0.0.1:$TP_PORT, upstream $ups) did not answer PING within ${WAIT_TIMEOUT}s; its output is above"
        fi
        local st=0
        wait "$TP_PID" || st=$?
        die "$name ($TIERPROXY, upstream $ups) exited with status $st during start-up; its output is above"
    fi
    grep -q 'tierproxy listening on' "$dir/stdout.log" ||
        warn "$name answers PING but did not print 'tierproxy listening on' on stdout"
    log "$name on $TP_PORT -> $ups"
}
wait_ping_quiet() { # port pid: 0 when PONG, 1 on exit/timeout
    local deadline=$((SECONDS + WAIT_TIMEOUT))
    while alive "$2" && [ "$SECONDS" -lt "$deadline" ]; do
        [ "$(rcli -p "$1" ping 2>/dev/null)" = PONG ] && return 0
        sleep 0.1
    done
    return 1
}
if [ -n "$TIERPROXY" ]; then
    ups=$(printf '127.0.0.1:%s,' "${CL_PORTS[@]}")
    start_tierproxy tierproxy-cluster "$TMP/tierproxy-cluster" "${ups%,}"
    TPC_PORT=$TP_PORT TPC_PID=$TP_PID
    start_tierproxy tierproxy-standalone "$TMP/tierproxy-standalone" "127.0.0.1:$SA_PORT"
    TPS_PORT=$TP_PORT TPS_PID=$TP_PID
fi

# ---------------------------------------------------------------- targets
# name -> redis-benchmark address args, proxy pid, backend pids, backend ports
declare -A T_ARGS T_PROXY T_BPIDS T_BPORTS T_LOG
T_LOG[tierproxy-cluster]=$TMP/tierproxy-cluster/stderr.log
T_LOG[tierproxy-standalone]=$TMP/tierproxy-standalone/stderr.log
T_LOG[twemproxy-standalone]=$TMP/nutcracker/nutcracker.log
TARGETS=(direct-cluster)
T_ARGS[direct-cluster]="--cluster -h 127.0.0.1 -p ${CL_PORTS[0]}"
T_PROXY[direct-cluster]=""
T_BPIDS[direct-cluster]="${CL_PIDS[*]}"
T_BPORTS[direct-cluster]="${CL_PORTS[*]}"
if [ -n "$TIERPROXY" ]; then
    TARGETS+=(tierproxy-cluster)
    T_ARGS[tierproxy-cluster]="-h 127.0.0.1 -p $TPC_PORT"
    T_PROXY[tierproxy-cluster]=$TPC_PID
    T_BPIDS[tierproxy-cluster]="${CL_PIDS[*]}"
    T_BPORTS[tierproxy-cluster]="${CL_PORTS[*]}"
fi
TARGETS+=(direct-standalone twemproxy-standalone)
T_ARGS[direct-standalone]="-h 127.0.0.1 -p $SA_PORT"
T_PROXY[direct-standalone]=""
T_ARGS[twemproxy-standalone]="-h 127.0.0.1 -p $NC_PORT"
T_PROXY[twemproxy-standalone]=$NC_PID
if [ -n "$TIERPROXY" ]; then
    TARGETS+=(tierproxy-standalone)
    T_ARGS[tierproxy-standalone]="-h 127.0.0.1 -p $TPS_PORT"
    T_PROXY[tierproxy-standalone]=$TPS_PID
fi
for t in direct-standalone twemproxy-standalone tierproxy-standalone; do
    T_BPIDS[$t]=$SA_PID
    T_BPORTS[$t]=$SA_PORT
done

# ---------------------------------------------------------------- populate
# redis-benchmark -r KEYSPACE uses keys "key:" + 12-digit number, values of DATA_SIZE 'x'.
# With --cluster it puts a fixed per-node hash tag in: "key:{TAG}:" + number. Write every
# key of each form so that GET always hits: a short --cluster SET run reveals the tags,
# then one RESP stream with all keys goes to every node, and each node keeps the keys of
# its own slots (the rest are answered with MOVED, which --pipe reports as errors).
log "discovering redis-benchmark's cluster hash tags"
timeout 60 redis-benchmark --cluster -h 127.0.0.1 -p "${CL_PORTS[0]}" -c 6 -n 600 \
    -r "$KEYSPACE" -d "$DATA_SIZE" -t set -P 16 --csv -q >"$TMP/cluster/tags.log" 2>&1 || {
    tail -n 20 "$TMP/cluster/tags.log" >&2
    die "redis-benchmark --cluster SET (tag discovery) failed"
}
: >"$TMP/prefixes"
for p in "${CL_PORTS[@]}"; do
    rcli -p "$p" --scan --pattern 'key:{*' | tr -d '\r' |
        awk 'length($0) > 12 {print substr($0, 1, length($0) - 12)}' | sort -u >>"$TMP/prefixes"
done
ntags=$(sort -u "$TMP/prefixes" | wc -l)
[ "$ntags" -ge 1 ] || die "no hash-tagged keys found after redis-benchmark --cluster SET"
[ "$ntags" = 3 ] || warn "expected 3 cluster hash tags (one per node), found $ntags: $(tr '\n' ' ' <"$TMP/prefixes")"
sort -u "$TMP/prefixes" -o "$TMP/prefixes"
echo "key:" >>"$TMP/prefixes"

gen_resp() { # prefix file -> RESP SETs for prefix + %012d, 0..KEYSPACE-1
    awk -v n="$KEYSPACE" -v size="$DATA_SIZE" '
        BEGIN { v = ""; for (i = 0; i < size; i++) v = v "x" }
        { for (i = 0; i < n; i++) {
              k = $0 sprintf("%012d", i)
              printf "*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n", length(k), k, size, v } }' "$1"
}
log "populating $KEYSPACE keys x $((ntags + 1)) key forms in the cluster and $KEYSPACE in the standalone"
gen_resp "$TMP/prefixes" >"$TMP/cluster.resp"
for p in "${CL_PORTS[@]}"; do
    timeout 120 redis-cli -h 127.0.0.1 -p "$p" --pipe <"$TMP/cluster.resp" >"$TMP/cluster/populate-$p.log" 2>&1 || true
done
rm -f "$TMP/cluster.resp"
echo "key:" >"$TMP/prefix-plain"
gen_resp "$TMP/prefix-plain" | timeout 120 redis-cli -h 127.0.0.1 -p "$SA_PORT" --pipe \
    >"$TMP/standalone/populate.log" 2>&1 || {
    tail -n 5 "$TMP/standalone/populate.log" >&2
    die "populating the standalone redis failed"
}
total=0
for p in "${CL_PORTS[@]}"; do total=$((total + $(rcli -p "$p" dbsize | tr -d '\r'))); done
[ "$total" -ge $((KEYSPACE * (ntags + 1))) ] ||
    die "cluster holds $total keys after populating, expected $((KEYSPACE * (ntags + 1)))"
sa_keys=$(rcli -p "$SA_PORT" dbsize | tr -d '\r')
[ "$sa_keys" -ge "$KEYSPACE" ] || die "standalone holds $sa_keys keys after populating, expected $KEYSPACE"
log "cluster: $total keys, standalone: $sa_keys keys"

# ---------------------------------------------------------------- sanity: every target answers correctly
want=$(printf "%${DATA_SIZE}s" "" | tr ' ' x)
probe=$(printf 'key:%012d' $((KEYSPACE - 1)))
for t in "${TARGETS[@]}"; do
    if [ "$t" = direct-cluster ]; then
        got=$(rcli -c -p "${CL_PORTS[0]}" get "$(head -1 "$TMP/prefixes")$(printf '%012d' 0)" | tr -d '\r')
    else
        port=${T_ARGS[$t]##* }
        got=$(rcli -p "$port" get "$probe" | tr -d '\r')
        rcli -p "$port" set bench:sanity "$t" >/dev/null
        [ "$(rcli -p "$port" get bench:sanity | tr -d '\r')" = "$t" ] || die "$t: SET/GET round trip failed"
    fi
    [ "$got" = "$want" ] || die "$t: GET of a populated key returned '$got', expected '$want'"
done
log "all targets answer GET/SET correctly: ${TARGETS[*]}"

# ---------------------------------------------------------------- measurement helpers
proc_ticks() { # pids... -> sum of utime+stime (clock ticks)
    local total=0 p s
    local -a f
    for p in "$@"; do
        s=$(cat "/proc/$p/stat") || die "process $p is gone"
        s=${s##*) }
        read -r -a f <<<"$s"
        total=$((total + f[11] + f[12])) # fields 14 and 15 of /proc/PID/stat
    done
    echo "$total"
}
hits_misses() { # ports... -> "hits misses" summed from INFO stats
    local p h=0 m=0 a b
    for p in "$@"; do
        read -r a b < <(rcli -p "$p" info stats | tr -d '\r' |
            awk -F: '/^keyspace_hits:/{h=$2} /^keyspace_misses:/{m=$2} END{print h+0, m+0}')
        h=$((h + a)) m=$((m + b))
    done
    echo "$h $m"
}
us_per_req() { awk -v t="$1" -v hz="$CLK_TCK" -v n="$2" 'BEGIN{printf "%.2f", t / hz * 1e6 / n}'; }

RAW=$TMP/raw.csv
echo "pipeline,op,round,position,target,requests,rps,proxy_cpu_us_per_req,redis_cpu_us_per_req,get_hit_pct,wall_s,status" >"$RAW"
mkdir -p "$TMP/runs"
FAILURES=0

# run_bench target op pipeline requests tag -> sets R_RPS R_PCPU R_BCPU R_HIT R_WALL R_STATUS
run_bench() {
    local t=$1 op=$2 pp=$3 n=$4 tag=$5
    local out="$TMP/runs/$tag.out" err="$TMP/runs/$tag.err"
    local proxy=${T_PROXY[$t]}
    local -a bpids bports addr
    read -r -a bpids <<<"${T_BPIDS[$t]}"
    read -r -a bports <<<"${T_BPORTS[$t]}"
    read -r -a addr <<<"${T_ARGS[$t]}"
    local pt0=0 pt1=0 bt0 bt1 hm0 hm1 t0 t1 rc=0
    [ -n "$proxy" ] && pt0=$(proc_ticks "$proxy")
    bt0=$(proc_ticks "${bpids[@]}")
    hm0=$(hits_misses "${bports[@]}")
    t0=$(date +%s.%N)
    timeout -k 5 "$BENCH_TIMEOUT" redis-benchmark "${addr[@]}" -c "$CLIENTS" -n "$n" \
        -r "$KEYSPACE" -d "$DATA_SIZE" -t "$op" -P "$pp" --csv -q >"$out" 2>"$err" &
    BENCH_PID=$!
    wait "$BENCH_PID" || rc=$?
    BENCH_PID=""
    t1=$(date +%s.%N)
    if [ -n "$proxy" ] && ! alive "$proxy"; then
        tail -n 20 "${T_LOG[$t]}" >&2 2>/dev/null || true
        die "the $t proxy (pid $proxy) exited during a run; its log is above (${T_LOG[$t]})"
    fi
    [ -n "$proxy" ] && pt1=$(proc_ticks "$proxy")
    bt1=$(proc_ticks "${bpids[@]}")
    hm1=$(hits_misses "${bports[@]}")
    R_WALL=$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.2f", b - a}')
    R_RPS=$(tr -d '\r' <"$out" | awk -F, -v want="\"${op^^}\"" '$1 == want {gsub(/"/, "", $2); print $2; exit}')
    R_PCPU=""
    [ -n "$proxy" ] && R_PCPU=$(us_per_req $((pt1 - pt0)) "$n")
    R_BCPU=$(us_per_req $((bt1 - bt0)) "$n")
    R_HIT=""
    if [ "$op" = get ]; then
        R_HIT=$(awk -v a="$hm0" -v b="$hm1" 'BEGIN{split(a, x, " "); split(b, y, " ");
            h = y[1] - x[1]; m = y[2] - x[2]; if (h + m > 0) printf "%.2f", 100 * h / (h + m)}')
    fi
    R_STATUS=ok
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        R_STATUS=timeout
    elif [ "$rc" != 0 ]; then
        R_STATUS="exit-$rc"
    elif [ -z "$R_RPS" ]; then
        R_STATUS=no-result
    elif grep -q -e 'Error from server' -e 'Unexpected error' "$out" "$err"; then
        R_STATUS=error-replies
    fi
    if [ "$R_STATUS" != ok ]; then
        warn "$t $op -P $pp: $R_STATUS; redis-benchmark said: $(tail -n 3 "$err" "$out" 2>/dev/null | tr '\n' ' ' | cut -c1-400)"
        R_RPS=""
    fi
}

fmt0() { if [ -n "$1" ]; then awk -v x="$1" 'BEGIN{printf "%.0f", x}'; else echo "n/a"; fi; }
n_for() { # pipeline [target]
    if [ "${2:-}" = direct-cluster ] && [ -n "${N_CLUSTER[$1]:-}" ]; then
        echo "${N_CLUSTER[$1]}"
    elif [ "$1" = 1 ]; then echo "$N_P1"; else echo "$N_P16"; fi
}

# ---------------------------------------------------------------- warm-up
log "warm-up: GET -P 16 -n $WARMUP_N on every target"
for t in "${TARGETS[@]}"; do
    run_bench "$t" get 16 "$WARMUP_N" "warmup-$t"
    [ "$R_STATUS" = ok ] || die "warm-up against $t failed ($R_STATUS)"
done

# ---------------------------------------------------------------- direct-cluster run length
# redis-benchmark --cluster runs one thread per node, and a thread whose clients have
# nothing left to send only notices the end of the run on its next 250 ms timer tick, so
# the measured duration is rounded up to a multiple of 250 ms: short runs understate the
# cluster's rps badly. direct-cluster therefore gets as many requests as it serves in
# about CLUSTER_RUN_SECONDS (never fewer than the other targets), which bounds that error
# by 250 ms / CLUSTER_RUN_SECONDS. The other targets are single-threaded clients and stop
# at once.
read -r -a PLIST <<<"$PIPELINES"
read -r -a OLIST <<<"$OPS"
declare -A N_CLUSTER
for pp in "${PLIST[@]}"; do
    base=$(n_for "$pp")
    n=$base
    while :; do
        run_bench direct-cluster get "$pp" "$n" "calibrate-P$pp-$n"
        [ "$R_STATUS" = ok ] || die "direct-cluster calibration run failed ($R_STATUS)"
        if awk -v w="$R_WALL" 'BEGIN{exit !(w >= 1.5)}' || [ "$n" -ge 100000000 ]; then break; fi
        n=$((n * 4))
    done
    N_CLUSTER[$pp]=$(awk -v r="$R_RPS" -v s="$CLUSTER_RUN_SECONDS" -v b="$base" \
        'BEGIN{n = int(r * s / 1000 + 0.5) * 1000; if (n < b) n = b; printf "%d", n}')
    log "direct-cluster -P $pp: ~$(fmt0 "$R_RPS") rps in calibration -> ${N_CLUSTER[$pp]} requests per run (others: $base)"
done

# ---------------------------------------------------------------- measurement
NT=${#TARGETS[@]}
total_runs=$((${#PLIST[@]} * ${#OLIST[@]} * ROUNDS * NT))
log "measuring: pipelines (${PLIST[*]}) x ops (${OLIST[*]}) x $ROUNDS rounds x $NT targets = $total_runs runs"
rot=0 done_runs=0
for pp in "${PLIST[@]}"; do
    for op in "${OLIST[@]}"; do
        for ((r = 1; r <= ROUNDS; r++)); do
            for ((i = 0; i < NT; i++)); do
                t=${TARGETS[$(((i + rot) % NT))]}
                n=$(n_for "$pp" "$t")
                run_bench "$t" "$op" "$pp" "$n" "P$pp-$op-r$r-$t"
                done_runs=$((done_runs + 1))
                [ "$R_STATUS" = ok ] || FAILURES=$((FAILURES + 1))
                echo "$pp,${op^^},$r,$((i + 1)),$t,$n,${R_RPS},${R_PCPU},${R_BCPU},${R_HIT},${R_WALL},${R_STATUS}" >>"$RAW"
                msg="[$done_runs/$total_runs] -P $pp ${op^^} round $r/$ROUNDS  $(printf '%-21s' "$t") ${R_RPS:-FAILED} rps"
                [ -n "$R_PCPU" ] && msg+="  proxy ${R_PCPU} µs/req"
                msg+="  redis ${R_BCPU} µs/req"
                [ -n "$R_HIT" ] && msg+="  hits ${R_HIT}%"
                log "$msg"
            done
            rot=$((rot + 1))
        done
    done
done

# ---------------------------------------------------------------- summary
# median of the ok rows of column COL for (pipeline, op, target); "" when none
median() { # pipeline OP target column
    awk -F, -v p="$1" -v o="$2" -v t="$3" -v c="$4" \
        'NR > 1 && $1 == p && $2 == o && $5 == t && $12 == "ok" && $c != "" {print $c}' "$RAW" |
        sort -g | awk '{v[NR] = $1} END {if (NR == 0) exit;
            if (NR % 2) m = v[(NR + 1) / 2]; else m = (v[NR / 2] + v[NR / 2 + 1]) / 2; print m}'
}
minmax() {
    awk -F, -v p="$1" -v o="$2" -v t="$3" \
        'NR > 1 && $1 == p && $2 == o && $5 == t && $12 == "ok" {print $7}' "$RAW" |
        sort -g | awk 'NR == 1 {lo = $1} {hi = $1} END {if (NR) printf "%.0f–%.0f", lo, hi}'
}
fmt2() { if [ -n "$1" ]; then awk -v x="$1" 'BEGIN{printf "%.2f", x}'; else echo "–"; fi; }
ratio() { if [ -n "$1" ] && [ -n "$2" ]; then awk -v a="$1" -v b="$2" 'BEGIN{if (b > 0) printf "%.2f", a / b; else print "n/a"}'; else echo "n/a"; fi; }

SUMMARY=$TMP/summary.md
{
    echo "# tierproxy benchmark"
    echo
    if [ "$QUICK" = 1 ]; then mode="QUICK=1 smoke run: tiny runs, the numbers are not meaningful"; else mode=full; fi
    [ -z "$TIERPROXY" ] && mode="$mode; SKIP_TIERPROXY=1: no tierproxy targets"
    echo "- mode: $mode"
    echo "- load: redis-benchmark -c $CLIENTS -r $KEYSPACE -d $DATA_SIZE, one op (-t get or -t set) per run; GETs hit populated keys"
    printf -- '- requests per run: %s at -P 1, %s at deeper pipelines; direct-cluster: ' "$N_P1" "$N_P16"
    sep=""
    for pp in "${PLIST[@]}"; do
        printf '%s%s at -P %s' "$sep" "${N_CLUSTER[$pp]}" "$pp"
        sep=", "
    done
    echo " (sized to last ~${CLUSTER_RUN_SECONDS} s: redis-benchmark --cluster rounds run time up to 250 ms)"
    echo "- $ROUNDS round(s); each round runs every target once, in an order rotated from round to round; medians over rounds"
    echo "- proxy CPU = utime+stime of the proxy process per request; redis CPU = the same for the backend redis-server process(es), summed"
    [ "$FAILURES" -gt 0 ] && echo "- **$FAILURES run(s) failed; they are left out of the medians (see the raw CSV)**"
    echo
    echo "## Machine"
    echo
    printf '%s\n' "$MACHINE"
    echo
    echo "## Throughput (medians)"
    echo
    echo "| pipeline | op | target | median rps | min–max rps | proxy CPU µs/req | redis CPU µs/req | GET hit % |"
    echo "|---:|---|---|---:|---:|---:|---:|---:|"
    for pp in "${PLIST[@]}"; do
        for op in "${OLIST[@]}"; do
            OP=${op^^}
            for t in "${TARGETS[@]}"; do
                echo "| $pp | $OP | $t | $(fmt0 "$(median "$pp" "$OP" "$t" 7)") | $(minmax "$pp" "$OP" "$t") | $(fmt2 "$(median "$pp" "$OP" "$t" 8)") | $(fmt2 "$(median "$pp" "$OP" "$t" 9)") | $(fmt2 "$(median "$pp" "$OP" "$t" 10)") |"
            done
        done
    done
    echo
    echo "## Ratios (of median rps; CPU ratio of median proxy µs/req)"
    echo
    echo "| pipeline | op | tierproxy-standalone / twemproxy | tierproxy-standalone / direct-standalone | tierproxy-cluster / direct-cluster | twemproxy / direct-standalone | CPU tierproxy-standalone / twemproxy |"
    echo "|---:|---|---:|---:|---:|---:|---:|"
    for pp in "${PLIST[@]}"; do
        for op in "${OLIST[@]}"; do
            OP=${op^^}
            tps=$(median "$pp" "$OP" tierproxy-standalone 7)
            tw=$(median "$pp" "$OP" twemproxy-standalone 7)
            ds=$(median "$pp" "$OP" direct-standalone 7)
            tpc=$(median "$pp" "$OP" tierproxy-cluster 7)
            dc=$(median "$pp" "$OP" direct-cluster 7)
            ctp=$(median "$pp" "$OP" tierproxy-standalone 8)
            ctw=$(median "$pp" "$OP" twemproxy-standalone 8)
            echo "| $pp | $OP | $(ratio "$tps" "$tw") | $(ratio "$tps" "$ds") | $(ratio "$tpc" "$dc") | $(ratio "$tw" "$ds") | $(ratio "$ctp" "$ctw") |"
        done
    done
    echo
    echo "Raw per-run rows: \`latest.csv\` next to this file (columns: $(head -1 "$RAW"))."
} >"$SUMMARY"

mkdir -p "$RESULTS_DIR"
cp "$SUMMARY" "$RESULTS_DIR/latest.md"
cp "$RAW" "$RESULTS_DIR/latest.csv"
echo
cat "$SUMMARY"
echo
log "summary written to $RESULTS_DIR/latest.md, raw rows to $RESULTS_DIR/latest.csv (and $RAW while running)"
if [ "$FAILURES" -gt 0 ]; then
    die "$FAILURES of $total_runs runs failed"
fi
