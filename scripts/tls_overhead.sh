#!/usr/bin/env bash
# What mutual TLS on both hops costs: a plaintext stack and a mutual-TLS stack (engine + tokenizer service each)
# on one model, with workload B (clients/serving_bench.py) run against them in turn, ROUNDS times. It prints each
# run's output tok/s, the medians and the median of the per-round TLS/plaintext ratios (docs/SECURITY.md).
#   bash scripts/tls_overhead.sh [MODEL_DIR] [ROUNDS]     # default: the demo model (.demo_model), 5 rounds
# The certificates come from the openssl recipe in docs/SECURITY.md, in a temporary directory.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY=.venv/bin/python
MODEL="${1:-.demo_model}"
ROUNDS="${2:-5}"
[ -d "$MODEL" ] || "$PY" -c "from scripts.demo_model import build_demo_model; build_demo_model('$MODEL')"
WORK="$(mktemp -d)"
PIDS=()
trap 'kill -TERM "${PIDS[@]}" 2>/dev/null || true; wait; rm -rf "$WORK"' EXIT
cd "$WORK"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 \
    -subj "/CN=llmserve-bench-ca" -keyout ca.key -out ca.crt 2>/dev/null
leaf() {  # name, subjectAltName
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$1" -keyout "$1.key" -out "$1.csr" 2>/dev/null
  openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 1 -out "$1.crt" \
    -extfile <(printf "subjectAltName=%s\nextendedKeyUsage=serverAuth,clientAuth" "$2") 2>/dev/null
}
leaf engine "DNS:localhost,IP:127.0.0.1"
leaf tokenizer "DNS:localhost,IP:127.0.0.1"
leaf client "DNS:client"
cd "$ROOT"
free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
E1=$(free_port); T1=$(free_port); E2=$(free_port); T2=$(free_port); H1=$(free_port); H2=$(free_port)
C="$WORK"
common=(--model "$MODEL" --host 127.0.0.1 --metrics-port 0)
engine=(--device cpu --dtype float32 --canary-interval-s 0)
"$PY" -m engine_service.server "${common[@]}" "${engine[@]}" --port "$E1" > "$WORK/engine_plain.log" 2>&1 &
PIDS+=($!)
"$PY" -m engine_service.server "${common[@]}" "${engine[@]}" --port "$E2" \
    --tls-cert "$C/engine.crt" --tls-key "$C/engine.key" --tls-client-ca "$C/ca.crt" > "$WORK/engine_tls.log" 2>&1 &
PIDS+=($!)
"$PY" -m tokenizer_service.server "${common[@]}" --port "$T1" --health-port "$H1" --engines "127.0.0.1:$E1" \
    > "$WORK/tokenizer_plain.log" 2>&1 &
PIDS+=($!)
"$PY" -m tokenizer_service.server "${common[@]}" --port "$T2" --health-port "$H2" --engines "localhost:$E2" \
    --tls-cert "$C/tokenizer.crt" --tls-key "$C/tokenizer.key" --tls-client-ca "$C/ca.crt" \
    --engine-tls-ca "$C/ca.crt" --engine-tls-cert "$C/tokenizer.crt" --engine-tls-key "$C/tokenizer.key" \
    > "$WORK/tokenizer_tls.log" 2>&1 &
PIDS+=($!)
# Both tokenizer services SERVING (an engine connected), asked on their plaintext health-only ports.
"$PY" - "$H1" "$H2" <<'EOF'
import sys, time
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
deadline = time.monotonic() + 120
for port in sys.argv[1:]:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                    break
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                sys.exit(f"the tokenizer service with health port {port} was not SERVING within 120 s")
            time.sleep(0.2)
EOF
client_tls=(--tls-ca "$C/ca.crt" --tls-cert "$C/client.crt" --tls-key "$C/client.key")
for round in $(seq 1 "$ROUNDS"); do
  # Each run's prompts are salted, so no run hits an earlier run's prefix cache.
  "$PY" -m clients.serving_bench --target "127.0.0.1:$T1" --num-requests 64 --json "$WORK/plain_$round.json" >/dev/null 2>&1 \
    || { echo "plaintext run $round failed; logs in $WORK" >&2; tail -5 "$WORK"/*.log >&2; exit 1; }
  "$PY" -m clients.serving_bench --target "localhost:$T2" "${client_tls[@]}" --num-requests 64 \
      --json "$WORK/tls_$round.json" >/dev/null 2>&1 \
    || { echo "TLS run $round failed; logs in $WORK" >&2; tail -5 "$WORK"/*.log >&2; exit 1; }
  echo "round $round of $ROUNDS done (load average $(cut -d' ' -f1-3 /proc/loadavg))"
done
"$PY" - "$WORK" "$ROUNDS" <<'EOF'
import json, statistics, sys
work, rounds = sys.argv[1], int(sys.argv[2])
runs = {mode: [json.load(open(f"{work}/{mode}_{i}.json"))["runs"][0] for i in range(1, rounds + 1)]
        for mode in ("plain", "tls")}
for mode, rows in runs.items():
    tps = [r["output_throughput"] for r in rows]
    print(f"{mode:5s} output tok/s {[round(t) for t in tps]}: median {statistics.median(tps):.0f}; "
          f"ITL p50 median {statistics.median(r['itl_ms_p50'] for r in rows):.2f} ms; "
          f"failed {sum(r['failed'] for r in rows)}")
ratios = [t["output_throughput"] / p["output_throughput"] for p, t in zip(runs["plain"], runs["tls"])]
print(f"TLS / plaintext output tok/s, per round: {[round(r, 3) for r in ratios]}; "
      f"median {statistics.median(ratios):.3f}")
EOF
