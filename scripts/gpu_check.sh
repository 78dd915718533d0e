#!/usr/bin/env bash
# One device call (an H100/H200 with no network): full-size training-step benchmarks (Stage 1 and Stage 2, 1.3B
# shapes, random weights), the same Stage-2 step with LoRA rank 256, the full-size sampling benchmark, then the toy
# bundle training. SKIP_TRAIN_STEP=1, SKIP_LORA=1, SKIP_SAMPLE=1 or SKIP_TOY=1 leave a part out.
# Expects diffusers (and importlib_metadata) wheels in .whl/ (see the device README); writes everything under $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/tmd-gpu-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed" >&2; exit 3; }
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"
} > "$OUT/gpu.txt" 2>&1
if [ -z "${SKIP_TRAIN_STEP:-}" ]; then
  start=$(date +%s)
  # Stage 1 with checkpointing off and on; Stage 2 only with it on (off needs ~2.6 GiB per block of activations)
  timeout "${STEP_TIMEOUT:-200}" python3 benchmarks/train_step.py --config wan1.3b --device cuda --stage pretrain-head \
    --iters 3 --warmup 1 --checkpointing off,on --out "$OUT/train_step_pretrain_gpu.json" > "$OUT/train_step.log" 2>&1
  echo "train_step pretrain rc=$? after $(( $(date +%s) - start )) s" >> "$OUT/gpu.txt"
  start=$(date +%s)
  timeout "${STEP_TIMEOUT:-200}" python3 benchmarks/train_step.py --config wan1.3b --device cuda --stage distill \
    --iters 2 --warmup 1 --checkpointing on --out "$OUT/train_step_distill_gpu.json" >> "$OUT/train_step.log" 2>&1
  echo "train_step distill rc=$? after $(( $(date +%s) - start )) s" >> "$OUT/gpu.txt"
fi
# Issue 17: the Stage-2 step with LoRA rank 256 (frozen fp32 bases, adapters trained) on one GPU, to compare with
# the full fine-tuning rows above and with `dmd_estimate(lora_rank=256)` (needs peft: a wheel in .whl/).
if [ -z "${SKIP_LORA:-}" ]; then
  start=$(date +%s)
  timeout "${STEP_TIMEOUT:-200}" python3 benchmarks/train_step.py --config wan1.3b --device cuda --stage distill \
    --iters 2 --warmup 1 --checkpointing on --lora-rank 256 --out "$OUT/train_step_distill_lora_gpu.json" \
    >> "$OUT/train_step.log" 2>&1
  echo "train_step distill lora rc=$? after $(( $(date +%s) - start )) s" >> "$OUT/gpu.txt"
  # Not measured here: the sharded frozen teacher (FSDP2) only shards with >= 2 ranks; one GPU shows no effect.
  echo "sharded-frozen memory: needs >= 2 GPUs (not in this script)" >> "$OUT/gpu.txt"
fi
[ -n "${SKIP_SAMPLE:-}" ] || {
start=$(date +%s)
# issue 18: text encoder, every decoder variant (PSNR vs fp32) and transformer stacks (eager, installed attention
# backends, per-block compile, CUDA graphs) for teacher and students; ~8-9 min, so run it alone:
#   SKIP_TRAIN_STEP=1 SKIP_TOY=1 bash scripts/gpu_check.sh   (the JSON is rewritten after each section)
timeout "${BENCH_TIMEOUT:-540}" python3 benchmarks/sample_speed.py --config wan1.3b --device cuda \
  --teacher-measure-steps 3 --repeats 2 --students "2,2,5;2,4,5;1,2,5;1,4,5" --compile --vae-chunks 4 \
  ${TAEHV:+--taehv "$TAEHV"} --out "$OUT/sample_speed_gpu.json" > "$OUT/bench.log" 2>&1
echo "bench rc=$? after $(( $(date +%s) - start )) s" >> "$OUT/gpu.txt"
}
[ -n "${SKIP_TOY:-}" ] || {
start=$(date +%s)
# issue 16: TOY_WARM=bundle continues from the committed bundle (VAE until its bar holds, then the teacher)
timeout "${TRAIN_TIMEOUT:-430}" python3 -m tmdcli.toy.train --out /tmp/toyrun --device cuda \
  --time-budget-s "${TRAIN_BUDGET:-300}" --vae-share "${VAE_SHARE:-0.3}" --eval-prompts 64 \
  ${TOY_WARM:+--warm-start "$TOY_WARM"} > "$OUT/train.log" 2>&1
echo "train rc=$? after $(( $(date +%s) - start )) s" >> "$OUT/gpu.txt"
# issue 16's before/after: training steps/s per phase of this code (label it with TOY_SPEED_LABEL), one JSON line
python3 -m tmdcli.toy.throughput /tmp/toyrun "${TOY_SPEED_LABEL:-$(git rev-parse --short HEAD 2>/dev/null)}" \
  > "$OUT/toy_steps_per_s.json" 2>>"$OUT/gpu.txt" && cat "$OUT/toy_steps_per_s.json" >> "$OUT/gpu.txt"
tar czf "$OUT/toy_run.tgz" -C /tmp/toyrun bundle summary.json 2>>"$OUT/gpu.txt"
}
cat "$OUT/gpu.txt"
tail -5 "$OUT"/*.log
