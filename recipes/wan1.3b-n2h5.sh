#!/usr/bin/env bash
# Goal: the paper's main 1.3B run, TMD-N2H5 with M = 2 outer steps (effective NFE 2.33), end to end:
#   make-prompts (VidProM, Qwen2.5-7B-Instruct expansion) -> synth-videos (Wan2.1 14B teacher, 81x480x832)
#   -> encode-latents (Wan2.1 1.3B VAE + umT5) -> pretrain-head (Stage 1, TM-MeanFlow, 3k iterations)
#   -> distill (Stage 2, DMD2-v + flow-head rollout, 4k iterations) -> sample -> eval (VBench).
# Target (TMD Table 1, METHOD.md section 7): TMD-N2H5, NFE 2.33, VBench total 84.68 / quality 85.71 / semantic
#   80.55 (teacher Wan2.1 1.3B at 50x2 NFE: 84.26; DMD2-v 2 steps: 84.39).
# Hardware: one node with 8 x 80 GB GPUs (H100 or A100). Peak memory per GPU, from tmdcli/runtime/estimates.py
#   (an estimate, not a measurement), with --checkpointing and micro-batch 1: pretrain-head 8.5 GiB sharded over
#   8 GPUs by FSDP2 (30.0 GiB unsharded), distill 15.2 GiB (60.8 GiB unsharded, so DDP or a single 80 GB GPU also
#   fit); without checkpointing distill needs ~175 GiB even sharded. The dry-run plans run as one plain process,
#   so they print the unsharded figure and "1 GPU(s) x 64 accumulation".
# Wall time, derived from the estimator's FLOP counts, assuming 40% of the H100's dense bf16 peak (989 TFLOP/s),
#   i.e. 396 TFLOP/s achieved per GPU (an assumption; nothing is measured at this scale yet), on 8 GPUs:
#   synth-videos  14B teacher, 100 NFE x 1.68 PFLOP per clip: 424 GPU-s a clip, 500k clips = 58.9k GPU-hours
#                 (~307 days on 8 GPUs; the dominant cost; made once per TMD_HOME and shared by every recipe;
#                 use more nodes, or NUM_PROMPTS=... for a smaller data set)
#   make-prompts  not covered by the estimator (Qwen2.5-7B generation on one GPU): time NUM_PROMPTS=1000 first
#   encode-latents reuses the latents synth-videos saved (text encoding only); a full VAE re-encode would be
#                 ~240 GPU-hours (1.73 s a clip measured on an H200, benchmarks/data_throughput.py)
#   pretrain-head 92.1 PFLOP per iteration x 3,000 = ~24 h
#   distill       142.5 PFLOP per iteration (1 student + 4 critic iterations averaged) x 4,000 = ~50 h
#   eval          VBench, 946 prompts x 5 seeds on one GPU: ~6 h (2.2 h transformer + ~3.7 h VAE decode);
#                 EVAL_TEACHER=1 adds the teacher's 50x2-NFE samples, ~94 h
#   => ~80 h on 8 GPUs once the data exist.
# Knobs: environment variables only (recipes/_lib.sh lists them; defaults are the paper's). Rerun to resume.
# Dry run (prints every stage's plan, no GPU, no weights needed with the override):
#   DRY_RUN=1 TMD_TEACHER_OVERRIDE=tiny-random bash recipes/wan1.3b-n2h5.sh
# Two nodes: on each node NUM_NODES=2 NODE_RANK=<0|1> MAIN_ADDR=<node 0> RUN_ID=<same id> bash recipes/...
set -euo pipefail
RECIPE=wan1.3b-n2h5
source "$(dirname "${BASH_SOURCE[0]}")/_lib.sh"

TEACHER=wan2.1-1.3b
STUDENT_OPTS=(--teacher "$TEACHER" --outer-steps 2 --inner-steps 2 --head-blocks 5)

# 1-3. Data: VidProM prompts -> 14B-teacher videos -> 1.3B latents (sets PROMPTS, VIDEOS, LATENTS).
make_data "$TEACHER"

# 4. Stage 1: TM-MeanFlow pretraining of the flow head (TMD Table 7, 1.3B: lr 3e-5, 3k iterations, CFG 3,
#    gated fusion, condition dropout 0.1, FD delta 5e-3, r = s for 75%, c = d).
STAGE1=$(step stage1-m2n2h5 train pretrain-head "${STUDENT_OPTS[@]}" --latents "${LATENTS:-latest}" \
         --iters 3000 --lr 3e-5 "${TRAIN_OPTS[@]}")

# 5. Stage 2: DMD2-v with flow-head rollout (lr 1e-5 for student, fake score and discriminator; teacher CFG 5;
#    GAN weight 0.03 on blocks 15, 22, 29; t_dmd shift 5; student update every 5th iteration; 4k iterations).
STUDENT=$(step distill-m2n2h5 train distill "${STUDENT_OPTS[@]}" --latents "${LATENTS:-latest}" \
          ${STAGE1:+--init "$STAGE1"} --iters 4000 --lr 1e-5 "${TRAIN_OPTS[@]}")

# 6. A look at one clip (Algorithm 1, deterministic, effective NFE 2.33).
SAMPLE=$(step sample-m2n2h5 single sample "$SAMPLE_PROMPT" ${STUDENT:+--model "$STUDENT"} \
         --out "$SAMPLES_DIR/$RECIPE.mp4")

# 7. VBench (946 prompts x 5 seeds; TMD_VBENCH_PYTHON and VBENCH_CACHE_DIR as for `tmd eval --suite vbench`).
eval_args "$TEACHER" "$STUDENT"
EVAL=$(step eval-m2n2h5 single eval "${EVAL_ARGS[@]}")

dry_run || printf 'student\t%s\nsample\t%s\neval\t%s\n' "$STUDENT" "$SAMPLE" "$EVAL"
