#!/usr/bin/env bash
# Try the balancer by hand: N hotmerge replicas on the embedded default model plus HAProxy,
# all on loopback. Ctrl-C stops everything (replicas drain first).
#
#   deploy/run-local.sh [N]          # default 3 replicas; HAProxy (gRPC) on 127.0.0.1:8000
#   hotmerge generate --target 127.0.0.1:8000 --adapter sql hello
#
# Replica i listens on gRPC port 50050+i and on HTTP port 8080+i (LoRAX REST, OpenAI API,
# /readyz, /metrics); each has its
# own data dir under $WORK (default: a temp dir). Needs `hotmerge` and `haproxy` on PATH.
set -euo pipefail
N=${1:-3}
LB_PORT=${LB_PORT:-8000}
WORK=${WORK:-$(mktemp -d -t hotmerge-local.XXXXXX)}
HERE=$(cd "$(dirname "$0")" && pwd)
pids=()

cleanup() {
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    wait || true
}
trap cleanup EXIT INT TERM

cp "$HERE/haproxy.cfg" "$WORK/haproxy.cfg"
for i in $(seq 1 "$N"); do
    port=$((50050 + i)) http=$((8080 + i))
    hotmerge serve --host 127.0.0.1 --port "$port" --http-port "$http" \
        --data-dir "$WORK/r$i" >"$WORK/r$i.log" 2>&1 &
    pids+=($!)
    echo "    server r$i 127.0.0.1:$port proto h2 check check-proto h1 port $http" >>"$WORK/haproxy.cfg"
    echo "replica r$i: grpc 127.0.0.1:$port, http://127.0.0.1:$http (LoRAX, OpenAI, /readyz), log $WORK/r$i.log"
done

HOTMERGE_LB_ADDR=127.0.0.1:$LB_PORT HOTMERGE_LB_STATS=$WORK/haproxy.sock \
    haproxy -db -f "$WORK/haproxy.cfg" &
pids+=($!)
echo "balancer: 127.0.0.1:$LB_PORT (admin socket $WORK/haproxy.sock); Ctrl-C stops all"
wait -n
