#!/usr/bin/env bash
# Cross-checks `chatmesh bench fanout` against the independent generator,
# back to back on one machine: for each system, the independent generator
# (7 runs per workload, median: a run of workload (a) lasts well under a
# second, so medians of 3 moved by up to 1.5x) against servers this script starts, then
# `chatmesh bench fanout --only SYSTEM` (as many runs, median), then the ratio.
#
#   bench/independent/run.sh [SYSTEM...]
#
# SYSTEM: chatmesh-tcp ngircd-1 ngircd-3 nats-server (default: all four).
# Env: CHATMESH (default target/release/chatmesh), RUNS (7), WORKLOADS
# ("10x10x200 1x100x50"), OUT (a temporary directory; keeps logs and JSON),
# ACKS ("quick": the independent generator acknowledges every read at once,
# as the bench does, see src/bench/wire.rs; "default": the kernel's delayed
# ACKs, which against ngircd's Nagle measure the 40 ms ACK timer instead),
# GEN (a prebuilt fanout-independent; default: built here with cargo).
# Needs ngircd and nats-server (apt-get install ngircd nats-server).
# Everything listens on 127.0.0.1; everything started is killed at exit.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
CHATMESH=${CHATMESH:-$ROOT/target/release/chatmesh}
RUNS=${RUNS:-7}
WORKLOADS=${WORKLOADS:-"10x10x200 1x100x50"}
OUT=${OUT:-$(mktemp -d /tmp/fanout-independent.XXXXXX)}
ACKS=${ACKS:-quick}
SYSTEMS=("$@")
[ ${#SYSTEMS[@]} -gt 0 ] || SYSTEMS=(chatmesh-tcp ngircd-1 ngircd-3 nats-server)
mkdir -p "$OUT"

if [ -z "${GEN:-}" ]; then
    (cd "$ROOT/bench/independent" && cargo build --release -q)
    GEN=$ROOT/bench/independent/target/release/fanout-independent
fi
[ -x "$CHATMESH" ] || (cd "$ROOT" && cargo build --release -q)

PIDS=()
stop_all() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    PIDS=()
}
trap stop_all EXIT

wait_port() {
    for _ in $(seq 200); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
        sleep 0.05
    done
    echo "nothing listens on port $1" >&2
    return 1
}

# Below the ephemeral range (32768-60999), where earlier connections may hold a port.
BASE=$((20000 + RANDOM % 12000))
PORTS=()

start_chatmesh() {
    local dir=$OUT/chatmesh conf=$OUT/chatmesh/cluster.toml
    mkdir -p "$dir"
    : >"$conf"
    PORTS=()
    for i in 1 2 3; do
        local p=$((BASE + 10 * i))
        printf '[[server]]\nid = "s%d"\nhost = "127.0.0.1"\nclient_port = %d\nmesh_port = %d\nadmin_port = %d\n\n' \
            "$i" "$p" $((p + 1)) $((p + 2)) >>"$conf"
        PORTS+=("$p")
    done
    "$CHATMESH" certs --config "$conf" --out "$dir/certs" >/dev/null
    for i in 1 2 3; do
        "$CHATMESH" node --config "$conf" --id "s$i" --certs "$dir/certs" 2>"$dir/s$i.log" &
        PIDS+=($!)
        wait_port "${PORTS[$((i - 1))]}"
    done
    sleep 2 # the mesh links up and agrees on a leader
}

# The bench's ngircd configuration (src/bench/procs.rs), linked in a chain.
start_ngircd() {
    local n=$1 dir=$OUT/ngircd$1
    mkdir -p "$dir"
    PORTS=()
    for ((i = 0; i < n; i++)); do PORTS+=($((BASE + 100 + i))); done
    for ((i = 0; i < n; i++)); do
        {
            printf '[Global]\nName = irc%d.bench\nInfo = independent\nListen = 127.0.0.1\nPorts = %d\n' "$i" "${PORTS[$i]}"
            printf 'MotdPhrase = bench\nPidFile = %s/ngircd%d.pid\n' "$dir" "$i"
            printf '[Limits]\nMaxConnections = 0\nMaxConnectionsIP = 0\nMaxJoins = 0\nMaxNickLength = 16\n'
            printf 'MaxPenaltyTime = 0\nPingTimeout = 600\nPongTimeout = 600\nConnectRetry = 1\n'
            printf '[Options]\nDNS = no\nIdent = no\nPAM = no\n'
            for j in $((i - 1)) $((i + 1)); do
                if [ "$j" -ge 0 ] && [ "$j" -lt "$n" ]; then
                    local lo=$((i < j ? i : j))
                    printf '[Server]\nName = irc%d.bench\nHost = 127.0.0.1\nMyPassword = bench%d\nPeerPassword = bench%d\n' "$j" "$lo" "$lo"
                    if [ "$j" -lt "$i" ]; then printf 'Port = %d\n' "${PORTS[$j]}"; fi
                fi
            done
        } >"$dir/ngircd$i.conf"
        /usr/sbin/ngircd -n -f "$dir/ngircd$i.conf" >"$dir/ngircd$i.log" 2>&1 &
        PIDS+=($!)
        wait_port "${PORTS[$i]}"
    done
    sleep $((n > 1 ? 3 : 0)) # the links come up
}

start_nats() {
    local dir=$OUT/nats
    mkdir -p "$dir"
    PORTS=($((BASE + 200)))
    printf 'listen: "127.0.0.1:%d"\n' "${PORTS[0]}" >"$dir/nats.conf"
    nats-server -c "$dir/nats.conf" >"$dir/nats.log" 2>&1 &
    PIDS+=($!)
    wait_port "${PORTS[0]}"
}

load() { cut -d' ' -f1-3 /proc/loadavg; }

SUMMARY=$OUT/summary.txt
: >"$SUMMARY"
for system in "${SYSTEMS[@]}"; do
    case $system in
        chatmesh-tcp) start_chatmesh; proto=chat; place=room ;;
        ngircd-1) start_ngircd 1; proto=irc; place=member ;;
        ngircd-3) start_ngircd 3; proto=irc; place=member ;;
        nats-server) start_nats; proto=nats; place=member ;;
        *) echo "unknown system $system" >&2; exit 2 ;;
    esac
    pids=$(IFS=,; echo "${PIDS[*]}")
    ports=$(IFS=,; echo "${PORTS[*]}")
    declare -A indep=()
    for w in $WORKLOADS; do
        echo "== $system $w: independent (load $(load))"
        "$GEN" --proto $proto --ports "$ports" --place $place --workload "$w" --runs "$RUNS" --pids "$pids" --acks "$ACKS" \
            | tee "$OUT/$system-$w.independent"
        indep[$w]=$(sed -n 's/^median .*deliveries_per_s=\([0-9.]*\).*/\1/p' "$OUT/$system-$w.independent")
    done
    stop_all
    set -- $WORKLOADS
    echo "== $system: chatmesh bench fanout (load $(load))"
    "$CHATMESH" bench fanout --only "$system" --runs "$RUNS" --no-install \
        --workload-a "$1" --workload-b "$2" --out "$OUT/bench-$system" | tee "$OUT/$system.bench"
    for w in $WORKLOADS; do
        name=a; [ "$w" = "$1" ] || name=b
        b=$(jq -r --arg w "$name" '.cells[] | select(.workload == $w) | .median.deliveries_per_s // 0' \
            "$OUT/bench-$system/fanout.json")
        i=${indep[$w]:-0}
        printf '%s %s independent(acks=%s)=%.0f bench=%.0f ratio=%s load=%s\n' "$system" "$w" "$ACKS" "$i" "$b" \
            "$(awk -v b="$b" -v i="$i" 'BEGIN { if (i > 0) printf "%.2f", b / i; else print "n/a" }')" \
            "$(load | tr ' ' /)" | tee -a "$SUMMARY"
    done
    unset indep
done
echo "== summary (bench / independent, deliveries/s, medians of $RUNS runs); logs in $OUT"
cat "$SUMMARY"
