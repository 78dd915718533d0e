#!/usr/bin/env bash
# recipes/toy-paper.sh: the paper's comparison (TMD Table 1, Table 6, Figure 7) at toy scale, with stated budgets.
#
# Goal:     on the bundled `toy` teacher: the teacher at 50 steps x CFG and at 1, 2 and 4 steps; DMD2-v at 1 (with its
#           KD warm-up), 2 and 4 steps; TMD at M = 1 and M = 2 with two (N, H) settings (N2H4, N4H2 of 12 blocks);
#           and the ablations TM vs TM-MF (Table 6) and rollout vs none (Figure 7), all on the same data, prompts
#           and seeds. Writes docs/toy-paper/ (results.md with the command, machine and run time, the report table,
#           results.json and quality_vs_nfe.png), all produced by `tmd eval --suite toy`; no number is typed by hand.
# Hardware: 2 CPU cores, or a GPU (DEVICE=cuda; raise PRETRAIN_ITERS and DISTILL_ITERS tenfold there).
# Wall time: about 35-45 minutes on 2 cores with the default budgets (measured: docs/toy-paper/results.md). The toy
#           transformer is 0.2 GFLOP per clip per step, so no TFLOP/s assumption applies; CPU overheads dominate.
# Targets:  the paper's orderings, not its numbers: TMD above DMD2-v at similar effective NFE; one-step-class TMD
#           (M = 1) above one-step DMD2-v; TM-MF above TM; rollout above none.
#
# Knobs: TMD_HOME (./tmd-toy-paper: its own home, so every student carries the name this recipe gives it; the data
#        stages are the same as recipes/toy.sh's), PRETRAIN_ITERS (80) x
#        PRETRAIN_BATCH (32), DISTILL_ITERS (80) x DISTILL_BATCH (16), KD_ITERS (40) on KD_PAIRS (64) teacher
#        pairs (synth-videos --kd-pairs), EVAL_PROMPTS (16 per split),
#        DEVICE (auto), OUT_DIR (docs/toy-paper), DRY_RUN=1. Rerunning resumes and reuses finished students.
set -euo pipefail

RECIPE=toy-paper
RECIPES_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
: "${TMD_HOME:=$PWD/tmd-toy-paper}" "${KD_ITERS:=40}" "${KD_PAIRS:=64}" "${OUT_DIR:=$RECIPES_DIR/../docs/toy-paper}"
# shellcheck source=recipes/_toy_lib.sh
source "$RECIPES_DIR/_toy_lib.sh"

toy_data
# the one-step DMD2-v baseline's KD pairs (METHOD.md 5.4): the teacher's (noise, sample) pairs with CFG + skip-layer
# guidance (block 10 of the toy's 12 left out of the unconditional pass), and their text embeddings
KD_VIDEOS=$(run "KD pairs" synth-videos --teacher toy --steps "$SYNTH_STEPS" --batch-size 64 --kd-pairs \
  --limit "$KD_PAIRS")
run "KD pairs latents" encode-latents --teacher toy --batch-size 64 --videos "${KD_VIDEOS:-latest}" >/dev/null
use_latents  # the KD latents may be the newest

MODELS+=(--model toy --model toy@1 --model toy@2 --model toy@4)
p=$PRETRAIN_ITERS d=$DISTILL_ITERS TMMF_M2=
# TMD: Stage 1 then Stage 2, for M in {2, 1} and (N, H) in {(2, 4), (4, 2)}
for m in 2 1; do
  for nh in "2 4" "4 2"; do
    read -r n h <<< "$nh"
    init=$(pretrain "tmmf-m$m-n${n}h$h-${p}it" --outer-steps "$m" --inner-steps "$n" --head-blocks "$h")
    [[ $m$n$h == 224 ]] && TMMF_M2=$init
    distill "tmd-m$m-n${n}h$h-${p}+${d}it" "$init" --outer-steps "$m" --inner-steps "$n" --head-blocks "$h"
  done
done
# DMD2-v baselines: 1 step (KD warm-up first), 2 steps, 4 steps (gamma_t = 5, TMD App. B.6)
distill "dmd2v-m1-kd${KD_ITERS}+${d}it" "" --method dmd2v --outer-steps 1 --kd-warmup "$KD_ITERS"
distill "dmd2v-m2-${d}it" "" --method dmd2v --outer-steps 2
distill "dmd2v-m4-${d}it" "" --method dmd2v --outer-steps 4 --outer-gamma 5
# ablations on TMD M2 N2H4: plain transition matching in Stage 1 (Table 6); no rollout in Stage 2 (Figure 7)
init=$(pretrain "tm-m2-n2h4-${p}it" --inner-steps 2 --head-blocks 4 --objective tm)
distill "tmd-from-tm-m2-n2h4-${p}+${d}it" "$init" --inner-steps 2 --head-blocks 4
distill "tmd-no-rollout-m2-n2h4-${p}+${d}it" "$TMMF_M2" --inner-steps 2 --head-blocks 4 --no-rollout

[[ $DRY_RUN == 1 ]] && { echo "[$RECIPE] dry run done" >&2; exit 0; }
EVAL=$(run "evaluation of every model" eval --suite toy "${MODELS[@]}" --toy-prompts "$EVAL_PROMPTS" \
  --samples-per-prompt 2 --batch-size 32)
write_results "$EVAL" "Toy-scale comparison (recipes/toy-paper.sh)" \
  "PRETRAIN_ITERS=$PRETRAIN_ITERS DISTILL_ITERS=$DISTILL_ITERS KD_ITERS=$KD_ITERS EVAL_PROMPTS=$EVAL_PROMPTS DEVICE=$DEVICE bash recipes/toy-paper.sh"
