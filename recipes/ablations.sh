#!/usr/bin/env bash
# Goal: the paper's 1.3B ablations of TMD (all M = 2 unless SWEEP_M says otherwise), each as its own eval:
#   objective  Table 6: Stage 1 TM-MeanFlow vs plain transition matching (r = s), N2H5 and N4H5
#   fusion     Table 9 / Fig. 13: gated vs concat fusion, N2H5 and N4H5
#   rollout    Fig. 7: N4H5, 2k Stage 2 iterations with vs without the flow-head rollout
#   sweep      Fig. 6: (N, H) in N2H3 N2H5 N2H8 N4H2 N4H3 N4H5 (SWEEP="N:H ..."; SWEEP_M=1 for Fig. 11's
#              one-step points, with 12k Stage 2 iterations)
#   ABLATIONS="objective fusion rollout sweep" (default: all) picks them. Runs shared between tables (and with
#   wan1.3b-n2h5.sh: N2H5 TM-MF gated) are made once: the same command finds its artifact "up to date".
#   Not included (the CLI has the options): Table 5's shifts (distill --t-gamma 1, --outer-gamma 1) and Table 3's
#   no-GAN row (distill --gan-weight 0).
# Targets (METHOD.md section 7, VBench total / quality / semantic):
#   Table 6: N2H5 TM-MF 84.68 vs TM 84.61; N4H5 TM-MF 84.67 vs TM 84.29.
#   Table 9: N2H5 gated 84.68 vs concat 84.76; N4H5 gated 84.67 vs concat 84.66 (concat less stable, Fig. 13).
#   Fig. 7: rollout trains faster and ends higher (VBench about 82-84 over 2k iterations; values not tabulated).
#   Fig. 6: VBench rises with effective NFE (2.20 for N2H3 ... 3.00 for N4H5), about 84.40-84.64, above 2- and
#   3-step DMD2-v (84.39, 84.48).
# Hardware: one node with 8 x 80 GB GPUs (per GPU with FSDP2 and --checkpointing: pretrain-head 8.5 GiB, distill
#   15-16 GiB; estimates from tmdcli/runtime/estimates.py, not measurements).
# Wall time from the estimator's FLOP counts at an assumed 396 TFLOP/s achieved per GPU (40% of the H100's dense
#   bf16 peak), 8 GPUs: each Stage 1 ~24 h (3k iterations, 92 PFLOP each), each Stage 2 49-53 h (4k iterations,
#   140-152 PFLOP each), each 2k-iteration rollout run ~27 h (the estimator counts the rollout's FLOPs in both).
#   All four tables: 10 Stage 1 + 12 Stage 2 runs = ~240 h + ~570 h = ~810 h (~34 days; ~74 h less when
#   wan1.3b-n2h5.sh already ran), plus VBench ~6 h per student per table on one GPU (16 evaluations, ~95 h).
# Knobs: environment variables (recipes/_lib.sh), plus ABLATIONS, SWEEP, SWEEP_M. Rerun to resume.
# Dry run: DRY_RUN=1 TMD_TEACHER_OVERRIDE=tiny-random bash recipes/ablations.sh
set -euo pipefail
RECIPE=ablations
source "$(dirname "${BASH_SOURCE[0]}")/_lib.sh"
: "${ABLATIONS:=objective fusion rollout sweep}" "${SWEEP:=2:3 2:5 2:8 4:2 4:3 4:5}" "${SWEEP_M:=2}"

TEACHER=wan2.1-1.3b
make_data "$TEACHER"

declare -A DONE=()  # key -> artifact path (empty in a dry run): each distinct run is made once

# stage1 M N H OBJECTIVE FUSION -> REPLY: the Stage 1 student (TMD Table 7, 1.3B: lr 3e-5, 3k iterations).
stage1() {
  local key="stage1-m$1n$2h$3-$4-$5"
  if [[ -z ${DONE[$key]+set} ]]; then
    DONE[$key]=$(step "$key" train pretrain-head --teacher "$TEACHER" --outer-steps "$1" --inner-steps "$2" \
                 --head-blocks "$3" --objective "$4" --fusion "$5" --latents "${LATENTS:-latest}" \
                 --iters 3000 --lr 3e-5 "${TRAIN_OPTS[@]}")
  fi
  REPLY=${DONE[$key]}
}

# tmd_run M N H OBJECTIVE FUSION ROLLOUT ITERS -> REPLY: Stage 1 then Stage 2 (lr 1e-5).
tmd_run() {
  stage1 "$1" "$2" "$3" "$4" "$5"
  local init=$REPLY key="distill-m$1n$2h$3-$4-$5-$6-$7"
  if [[ -z ${DONE[$key]+set} ]]; then
    DONE[$key]=$(step "$key" train distill --teacher "$TEACHER" --outer-steps "$1" --inner-steps "$2" \
                 --head-blocks "$3" --"$6" --latents "${LATENTS:-latest}" ${init:+--init "$init"} \
                 --iters "$7" --lr 1e-5 "${TRAIN_OPTS[@]}")
  fi
  REPLY=${DONE[$key]}
}

# evaluate NAME STUDENT...: one VBench eval per table.
evaluate() {
  local name=$1
  shift
  eval_args "$TEACHER" "$@"
  local out
  out=$(step "eval-$name" single eval "${EVAL_ARGS[@]}")
  dry_run || printf 'eval %s\t%s\n' "$name" "$out"
}

for ablation in $ABLATIONS; do
  MODELS=()
  case $ablation in
    objective)  # Table 6
      for NH in "2 5" "4 5"; do
        for OBJ in tmmf tm; do tmd_run 2 ${NH% *} ${NH#* } "$OBJ" gated rollout 4000; MODELS+=("$REPLY"); done
      done ;;
    fusion)  # Table 9
      for NH in "2 5" "4 5"; do
        for FUSION in gated concat; do tmd_run 2 ${NH% *} ${NH#* } tmmf "$FUSION" rollout 4000; MODELS+=("$REPLY"); done
      done ;;
    rollout)  # Fig. 7
      for ROLLOUT in rollout no-rollout; do tmd_run 2 4 5 tmmf gated "$ROLLOUT" 2000; MODELS+=("$REPLY"); done ;;
    sweep)  # Fig. 6 (Fig. 11 with SWEEP_M=1)
      ITERS=4000
      [[ $SWEEP_M == 1 ]] && ITERS=12000
      for NH in $SWEEP; do tmd_run "$SWEEP_M" ${NH%:*} ${NH#*:} tmmf gated rollout "$ITERS"; MODELS+=("$REPLY"); done ;;
    *) die "ABLATIONS: unknown ablation '$ablation' (objective, fusion, rollout, sweep)" ;;
  esac
  evaluate "$ablation" "${MODELS[@]}"
done
