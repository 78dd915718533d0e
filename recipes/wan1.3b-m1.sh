#!/usr/bin/env bash
# Goal: the one-step class on Wan2.1 1.3B: TMD-N2H5 with M = 1 outer step (effective NFE 1.17): the shared data
#   stages, pretrain-head (Stage 1 at M = 1, 3k iterations), distill (12k iterations, TMD Table 7), sample, eval.
# Target (TMD Table 1, METHOD.md section 7): TMD-N2H5, NFE 1.17, VBench total 83.80 / quality 85.07 / semantic
#   78.69 (one-step baselines: DMD2-v with KD warm-up 83.24, rCM 82.65).
# Hardware: one node with 8 x 80 GB GPUs. Peak memory per GPU (tmdcli/runtime/estimates.py; an estimate, not a
#   measurement; the estimator does not depend on M): as wan1.3b-n2h5.sh, pretrain-head 8.5 GiB and distill
#   15.2 GiB with FSDP2 over 8 GPUs and --checkpointing (30.0 / 60.8 GiB unsharded).
# Wall time from the estimator's FLOP counts at an assumed 396 TFLOP/s achieved per GPU (40% of the H100's dense
#   bf16 peak), 8 GPUs:
#   data          shared with wan1.3b-n2h5.sh ("up to date" when it ran first in this TMD_HOME); otherwise
#                 58.9k GPU-hours of 14B-teacher synthesis for 500k clips (see wan1.3b-n2h5.sh)
#   pretrain-head 92.1 PFLOP per iteration x 3,000 = ~24 h
#   distill       142.5 PFLOP per iteration x 12,000 = ~150 h
#   eval          VBench 4,730 clips on one GPU: ~4.7 h (1.1 h transformer + ~3.7 h VAE decode)
#   => ~180 h on 8 GPUs once the data exist.
# Knobs: environment variables (recipes/_lib.sh). Rerun to resume.
# Dry run: DRY_RUN=1 TMD_TEACHER_OVERRIDE=tiny-random bash recipes/wan1.3b-m1.sh
set -euo pipefail
RECIPE=wan1.3b-m1
source "$(dirname "${BASH_SOURCE[0]}")/_lib.sh"

TEACHER=wan2.1-1.3b
STUDENT_OPTS=(--teacher "$TEACHER" --outer-steps 1 --inner-steps 2 --head-blocks 5)

# 1-3. Data (shared with every 1.3B recipe).
make_data "$TEACHER"

# 4. Stage 1 at M = 1 (TMD Table 7, 1.3B: lr 3e-5, 3k iterations).
STAGE1=$(step stage1-m1n2h5 train pretrain-head "${STUDENT_OPTS[@]}" --latents "${LATENTS:-latest}" \
         --iters 3000 --lr 3e-5 "${TRAIN_OPTS[@]}")

# 5. Stage 2: DMD2-v + rollout, 12k iterations for M = 1 (Table 7), lr 1e-5. No KD warm-up for TMD.
STUDENT=$(step distill-m1n2h5 train distill "${STUDENT_OPTS[@]}" --latents "${LATENTS:-latest}" \
          ${STAGE1:+--init "$STAGE1"} --iters 12000 --lr 1e-5 "${TRAIN_OPTS[@]}")

# 6-7. One clip, then VBench.
SAMPLE=$(step sample-m1n2h5 single sample "$SAMPLE_PROMPT" ${STUDENT:+--model "$STUDENT"} \
         --out "$SAMPLES_DIR/$RECIPE.mp4")
eval_args "$TEACHER" "$STUDENT"
EVAL=$(step eval-m1n2h5 single eval "${EVAL_ARGS[@]}")

dry_run || printf 'student\t%s\nsample\t%s\neval\t%s\n' "$STUDENT" "$SAMPLE" "$EVAL"
