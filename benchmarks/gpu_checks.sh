#!/usr/bin/env bash
# The GPU checks of the quantized base and serving round 3 in one run on one card, so every ratio
# compares figures of the same card and lease:
#   1. decode_step: bf16 and each quantized base at batch 1, 32, 64 (none / distinct adapters),
#      a process per format (one that fails loses only its own rows), bf16 measured with the
#      first and read by the others (--bf16-from); bf16 batch 32 distinct is serving's
#      decode-only ceiling;
#   2. serve_load at concurrency 32, 64, 128 on bf16 (with the shared-prefix, ties_svd and
#      merge-path-profile phases),
#      and the host cost of an adapter's slot write at 7B geometry (slot_write_cost.py), also
#      behind 50 ms of device work (a write that waits for the device takes about that long);
#   3. serve_load at concurrency 64 on the quantized base fastest at batch 64 in (1);
#   4. pytest -m gpu (the suites that need no packages beyond the serving ones), the quantized
#      engine's first.
#   5. decode_nopdl (not in the default steps): decode_step with HOTMERGE_PDL=0 for
#      NOPDL_FORMATS (default fp8), bf16 included, to set beside (1).
#   6. lora_prefill (not in the default steps): the prefill LoRA kernels' tile sweep
#      (lora_prefill_tiles.py) at a mixed step's size and a 1024-token prefill.
#   7. serve_gil (not in the default steps): serve_load at concurrency 32 and 64 with a GIL
#      switch interval of 0.5 ms (Python's default: 5), then at the default, one after the
#      other on the same card (how long the engine thread waits for the GIL after torch calls).
#   8. stream_cost (not in the default steps): grpc_stream_cost.py on this host's CPUs: a
#      streamed token's server CPU, sync vs grpc.aio, and an emulated engine thread's step.
#   9. quant_kernels (not in the default steps): the int4 and fp8 kernels at the 7B projections
#      beside torch's tinygemm int4 matmul and fp8 `_scaled_mm` (quant_kernels.py).
#  10. serve_budget (not in the default steps): serve_load at concurrency 32, 64 and 128 with a
#      prefill budget of BUDGETS tokens each (default "2048 512"), one after the other on the
#      same card (at c=32 on the H100, 512 halved TTFT p99 at the same throughput; c=64 and 128
#      not yet measured there).
# serve runs each level twice (--plan-ahead-ab): steps planned ahead, then waiting first.
# Each step has its own time limit (seconds: DECODE_S, SERVE_S, SERVE_Q_S, PYTEST_Q_S,
# PYTEST_S) and writes its log and results under OUT (default
# benchmarks/results/gpu-checks-<date>). STEPS picks some of
# decode,serve,serve_q,pytest (all by default), so a device lease can run them over several calls
# into one OUT; serve_q reads the decode step's results from OUT. DECODE_S is per format.
#     bash benchmarks/gpu_checks.sh          # needs a CUDA GPU and `make setup-test`
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu-checks-$(date -u +%F)}
FORMATS=${FORMATS:-nf4,int4,int8,fp8}
SHAPE=${SHAPE:-7b}  # tiny: a quick run of the script itself anywhere
WORK=${WORK:-/tmp/hotmerge-gpu-checks}  # the random model both serve_load runs share
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-}:$PWD/server:$PWD/kernels:$PWD:$PWD/benchmarks PYTHONUNBUFFERED=1
PY=${PY:-python3}
STEPS=,${STEPS:-decode,serve,serve_q,pytest},
want() { [[ $STEPS == *,$1,* ]]; }

step() {  # step NAME LIMIT_S COMMAND...: run it under its limit, log to OUT/NAME.log, say how it ended
  local name=$1 limit=$2 t0=$SECONDS; shift 2
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "$name: rc=$? in $((SECONDS - t0)) s" | tee -a "$OUT/$name.log"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/gpu.txt"
if want decode; then
BASELINE=
for fmt in ${FORMATS//,/ }; do
  step "decode_$fmt" "${DECODE_S:-150}" $PY benchmarks/decode_step.py --no-eager --shape "$SHAPE" \
    --quantize "$fmt" --out "$OUT/decode_$fmt.json" ${BASELINE:+--bf16-from "$BASELINE"}
  sed -n "/^base /,/^wrote/p" "$OUT/decode_$fmt.log"
  [ -z "$BASELINE" ] && [ -f "$OUT/decode_$fmt.json" ] && BASELINE=$OUT/decode_$fmt.json
done
fi
if want decode_nopdl; then  # the same step without programmatic dependent launch, side by side
for fmt in ${NOPDL_FORMATS:-fp8}; do
  step "decode_${fmt}_nopdl" "${DECODE_S:-150}" env HOTMERGE_PDL=0 $PY benchmarks/decode_step.py \
    --no-eager --shape "$SHAPE" --quantize "$fmt" --out "$OUT/decode_${fmt}_nopdl.json"
  sed -n "/^base /,/^wrote/p" "$OUT/decode_${fmt}_nopdl.log"
done
fi
if want serve; then
step serve_bf16 "${SERVE_S:-400}" $PY benchmarks/serve_load.py --shape "$SHAPE" --concurrency 32,64,128 \
  --plan-ahead-ab --max-batch-size 128 --requests 320 --merge-profile-runs 20 --work-dir "$WORK" \
  --out-dir "$OUT"
grep -E "^load c=|^- |p99 ratio" "$OUT/serve_bf16.log"
step slot_write 120 $PY benchmarks/slot_write_cost.py
tail -2 "$OUT/slot_write.log"
step slot_write_busy 120 $PY benchmarks/slot_write_cost.py --busy-ms 50  # no write may wait
grep -E "write behind" "$OUT/slot_write_busy.log" | cut -c1-160
fi
if want serve_q; then
BEST=$($PY - "$OUT"/decode_*.json <<'PY'
import json, sys
rows = [r for path in sys.argv[1:] for r in json.load(open(path))["rows"]]
quant = [r for r in rows if r.get("base", "bf16") != "bf16" and r["batch"] == 64
         and r["adapters"] == "distinct"]
print(min(quant, key=lambda r: r["step_ms"])["base"].split(":")[0] if quant else "")
PY
)
if [ -n "$BEST" ]; then
  echo "fastest quantized base at batch 64, distinct adapters: $BEST"
  step "serve_$BEST" "${SERVE_Q_S:-240}" $PY benchmarks/serve_load.py --shape "$SHAPE" --concurrency 64 \
    --max-batch-size 128 --requests 320 --merge-streams 0 --prefix-runs 0 --quantize "$BEST" \
    --work-dir "$WORK" --out-dir "$OUT" --tag="-$BEST"
  grep -E "^load c=" "$OUT/serve_$BEST.log"
fi
fi
if want serve_gil; then
for ms in 0.5 5; do
  step "serve_gil_$ms" "${SERVE_S:-400}" $PY benchmarks/serve_load.py --shape "$SHAPE" \
    --concurrency 32,64 --max-batch-size 128 --requests 320 --merge-streams 0 --prefix-runs 0 \
    --switch-interval-ms "$ms" --work-dir "$WORK" --out-dir "$OUT" --tag="-gil-$ms"
  grep -E "^load c=" "$OUT/serve_gil_$ms.log"
done
fi
if want stream_cost; then  # no GPU needed, but this host's CPUs are the ones serving runs on
step stream_cost 180 $PY benchmarks/grpc_stream_cost.py --streams 32,64,128 --steps 500 \
  --engine-releases 100 --out "$OUT/grpc_stream_cost.json"
cat "$OUT/stream_cost.log"
fi
if want quant_kernels; then
step quant_kernels 240 $PY benchmarks/quant_kernels.py --shape "$SHAPE" \
  --formats int4,int4:tinygemm,fp8,fp8:scaled_mm
grep -E "tinygemm|^int4|^fp8" "$OUT/quant_kernels.log"
fi
if want serve_budget; then
for budget in ${BUDGETS:-2048 512}; do
  step "serve_budget_$budget" "${SERVE_S:-400}" $PY benchmarks/serve_load.py --shape "$SHAPE" \
    --concurrency 32,64,128 --max-batch-size 128 --requests 320 --merge-streams 0 --prefix-runs 0 \
    --max-prefill-tokens "$budget" --work-dir "$WORK" --out-dir "$OUT" --tag="-budget-$budget"
  grep -E "^load c=" "$OUT/serve_budget_$budget.log"
done
fi
if want lora_prefill; then
step lora_prefill 300 $PY benchmarks/lora_prefill_tiles.py --out "$OUT/lora_prefill_tiles.json"
grep -E "^(qkv|gate_up|down) " "$OUT/lora_prefill.log"
fi
if want pytest; then
# The quantized engine's tests first: two leases ran out of time before reaching them.
step pytest_qengine "${PYTEST_Q_S:-240}" $PY -m pytest -v -m gpu -p no:cacheprovider \
  tests/server/test_quantized_engine_gpu.py
grep -E "passed|failed|error" "$OUT/pytest_qengine.log" | tail -2
step pytest_gpu "${PYTEST_S:-540}" $PY -m pytest -q -m gpu -p no:cacheprovider tests/kernels \
  tests/server tests/evaluation --ignore=tests/server/test_http.py \
  --deselect tests/server/test_quantized_engine_gpu.py
grep -E "passed|failed|error" "$OUT/pytest_gpu.log" | tail -2
fi
