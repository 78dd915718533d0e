#!/usr/bin/env bash
# recipes/toy.sh: all seven stages of TMD on the bundled `toy` teacher, in minutes on 2 CPU cores.
#
# Goal:     the whole pipeline of the paper at toy scale, as one command anybody can run: toy-grammar prompts ->
#           teacher videos (the toy teacher at 16 UniPC steps x CFG) -> latents -> Stage 1 (TM-MeanFlow, N2H4,
#           M = 2) -> Stage 2 (DMD2-v + rollout) -> a sample -> `tmd eval --suite toy` against the teacher at 50
#           and at 2 steps. Its last lines are the report table.
# Hardware: 2 CPU cores, no GPU, no network.
# Wall time: about 7 minutes on 2 cores (measured; the README gives the run). Compute is tiny: the toy transformer is
#           0.2 GFLOP per clip per step, so no TFLOP/s assumption matters here; process start-up and the CPU's
#           small-matrix speed dominate.
# Target:   that a TMD student with effective NFE 2.67 is far better than the teacher at 2 steps (NFE 4) on
#           adherence and Frechet distance, and how close it gets to the 50-step teacher in a few minutes of
#           training. recipes/toy-paper.sh runs the paper's whole comparison with longer budgets.
#
# Knobs: TMD_HOME (default ./tmd-toy), TOY_PROMPTS (192), SYNTH_STEPS (16), PRETRAIN_ITERS (60) x PRETRAIN_BATCH
#        (32), DISTILL_ITERS (50) x DISTILL_BATCH (16), EVAL_PROMPTS (8 per split), DEVICE (auto), DRY_RUN=1 (every
#        stage's plan only).
# Rerunning resumes: finished stages print "(up to date)" and are not redone.
set -euo pipefail

: "${TMD_HOME:=$PWD/tmd-toy}" "${TOY_PROMPTS:=192}" "${SYNTH_STEPS:=16}" "${PRETRAIN_ITERS:=60}" "${DISTILL_ITERS:=50}"
: "${PRETRAIN_BATCH:=32}" "${DISTILL_BATCH:=16}"
: "${EVAL_PROMPTS:=8}" "${DEVICE:=auto}" "${DRY_RUN:=0}" "${TMD:=tmd}"
export TMD_HOME HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
STUDENT=(--teacher toy --inner-steps 2 --head-blocks 4)  # M = 2 (default): 2 backbone passes + 2 x 2 head passes of 4 of 12 blocks
DRY=()
[[ $DRY_RUN == 1 ]] && DRY=(--dry-run)
start=$(date +%s)

stage() {  # stage TITLE ARGS...: run one stage, print its result path (nothing in a dry run)
  local title=$1
  shift
  echo "[toy] $title ($(( $(date +%s) - start )) s)" >&2
  local out
  out=$("$TMD" "$@" --home "$TMD_HOME" "${DRY[@]}" | tail -n 1)
  [[ -n $out ]] && basename "$out"  # the artifact id (its folder name)
  return 0
}

stage "1/7 prompts from the toy grammar" make-prompts --source "toy:$TOY_PROMPTS" >/dev/null
stage "2/7 teacher videos" synth-videos --teacher toy --steps "$SYNTH_STEPS" --batch-size 64 --save-latents \
  --device "$DEVICE" >/dev/null
stage "3/7 latents" encode-latents --teacher toy --batch-size 64 --device "$DEVICE" >/dev/null
PRETRAINED=$(stage "4/7 Stage 1: TM-MeanFlow" pretrain-head "${STUDENT[@]}" --name "toy-stage1-${PRETRAIN_ITERS}it" \
  --iters "$PRETRAIN_ITERS" \
  --batch "$PRETRAIN_BATCH" --micro-batch "$PRETRAIN_BATCH" --lr 1e-4 --save-every 20 --sample-every 0 \
  --num-sample-prompts 2 --device "$DEVICE")
INIT=()
[[ -n $PRETRAINED ]] && INIT=(--init "$PRETRAINED")
DISTILLED=$(stage "5/7 Stage 2: DMD2-v with rollout" distill "${STUDENT[@]}" "${INIT[@]}" \
  --name "toy-tmd-${PRETRAIN_ITERS}+${DISTILL_ITERS}it" --iters "$DISTILL_ITERS" \
  --batch "$DISTILL_BATCH" --micro-batch "$DISTILL_BATCH" --lr 2e-5 --save-every 25 --sample-every 0 --num-sample-prompts 2 --device "$DEVICE")
stage "6/7 a sample" sample "a red circle moving left on a gray background" --model "${DISTILLED:-latest}" \
  --out "$TMD_HOME/toy-sample.mp4" --device "$DEVICE" >/dev/null
MODELS=(--model toy --model toy@2)
[[ $DRY_RUN == 1 ]] && MODELS+=(--model latest) || MODELS+=(--model "toy-stage1-${PRETRAIN_ITERS}it" \
  --model "toy-tmd-${PRETRAIN_ITERS}+${DISTILL_ITERS}it")
stage "7/7 evaluation against the teacher at 50 and 2 steps" eval --suite toy "${MODELS[@]}" \
  --toy-prompts "$EVAL_PROMPTS" --samples-per-prompt 2 --batch-size 32 --device "$DEVICE" >/dev/null
echo "[toy] done in $(( $(date +%s) - start )) s; report: tmd show eval:latest --home $TMD_HOME" >&2
