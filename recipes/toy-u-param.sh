#!/usr/bin/env bash
# recipes/toy-u-param.sh: the two parametrisations of the average velocity (METHOD.md 2.4, D19) on the toy world.
#
# Goal:     for M = 2 and M = 1, N2H4 on the bundled `toy` teacher: Stage-1-only students and Stage-2 students, each
#           with `--u-param paper` (u = y1 - head, TMD Eq. 14) and `--u-param consistent` (u = (y_s - head)/s), on the
#           same data, seeds and budgets; then `tmd eval --suite toy` (adherence per split, analyzer Frechet, seed
#           diversity ratio). Writes docs/u-param/ from the eval's own files.
# Hardware: 2 CPU cores, or a GPU (DEVICE=cuda; raise PRETRAIN_ITERS and DISTILL_ITERS tenfold there).
# Wall time: about 30 minutes on 2 quiet cores with the defaults (data stages, 8 students, the eval); measured runs
#           are in docs/u-param/results.md. The toy transformer is 0.2 GFLOP per clip per step, so no TFLOP/s
#           assumption applies; CPU overheads dominate.
# Targets:  the analytic tests (tests/test_analytic_world.py) predict that a perfect Stage-1 head samples exactly
#           under `consistent` and misplaces the inner spread under `paper` (0.62x for N(0, 1)); this measures how
#           much of that survives Stage 2 on a trained network.
#
# Knobs: those of recipes/_toy_lib.sh, TMD_HOME (./tmd-toy-u-param), OUT_DIR (docs/u-param), EVAL_PROMPTS (32),
#        OUTER_STEPS ("2 1": the values of M to study).
# Rerunning resumes and reuses finished students.
set -euo pipefail

RECIPE=toy-u-param
RECIPES_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
: "${TMD_HOME:=$PWD/tmd-toy-u-param}" "${OUT_DIR:=$RECIPES_DIR/../docs/u-param}" "${EVAL_PROMPTS:=32}"
: "${OUTER_STEPS:=2 1}"
# shellcheck source=recipes/_toy_lib.sh
source "$RECIPES_DIR/_toy_lib.sh"

toy_data
use_latents
MODELS+=(--model toy --model toy@2 --model toy@4)
p=$PRETRAIN_ITERS d=$DISTILL_ITERS
for m in $OUTER_STEPS; do
  for form in paper consistent; do
    name="tmmf-m$m-n2h4-$form-${p}it"
    init=$(pretrain "$name" --outer-steps "$m" --inner-steps 2 --head-blocks 4 --u-param "$form")
    MODELS+=(--model "$name")
    distill "tmd-m$m-n2h4-$form-${p}+${d}it" "$init" --outer-steps "$m" --inner-steps 2 --head-blocks 4
  done
done

[[ $DRY_RUN == 1 ]] && { echo "[$RECIPE] dry run done" >&2; exit 0; }
EVAL=$(run "evaluation of every model" eval --suite toy "${MODELS[@]}" --toy-prompts "$EVAL_PROMPTS" \
  --samples-per-prompt 2 --batch-size 32)
write_results "$EVAL" "The average-velocity parametrisation at toy scale (recipes/toy-u-param.sh)" \
  "OUTER_STEPS='$OUTER_STEPS' PRETRAIN_ITERS=$PRETRAIN_ITERS DISTILL_ITERS=$DISTILL_ITERS EVAL_PROMPTS=$EVAL_PROMPTS DEVICE=$DEVICE bash recipes/toy-u-param.sh"
