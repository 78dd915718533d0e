# shellcheck shell=bash
# Shared by the toy-scale study recipes (toy-paper.sh, toy-u-param.sh): source it after `set -euo pipefail` with
# RECIPE=<name> and TMD_HOME set. It provides the defaults, `run` (one stage, prints the artifact id), the shared data
# stages (`toy_data`), `pretrain` / `distill` (named students, collected into MODELS) and `write_results` (the
# eval's own files plus what produced them, into OUT_DIR). No number is typed by hand: every table comes from
# `tmd eval --suite toy`.
#
# Knobs: TOY_PROMPTS (192) SYNTH_STEPS (16) PRETRAIN_ITERS (80) x PRETRAIN_BATCH (32), DISTILL_ITERS (80) x
#        DISTILL_BATCH (16), EVAL_PROMPTS (16 per split), DEVICE (auto), DRY_RUN=1, TMD (tmd).

: "${TOY_PROMPTS:=192}" "${SYNTH_STEPS:=16}" "${PRETRAIN_ITERS:=80}" "${DISTILL_ITERS:=80}"
: "${PRETRAIN_BATCH:=32}" "${DISTILL_BATCH:=16}" "${EVAL_PROMPTS:=16}" "${DEVICE:=auto}" "${DRY_RUN:=0}" "${TMD:=tmd}"
export TMD_HOME HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
DRY=()
[[ $DRY_RUN == 1 ]] && DRY=(--dry-run)
start=$(date +%s)
MODELS=()

run() {  # run TITLE ARGS...: one stage; prints the artifact id (nothing in a dry run)
  local title=$1 out
  shift
  echo "[$RECIPE] $title ($(( $(date +%s) - start )) s)" >&2
  out=$("$TMD" "$@" --home "$TMD_HOME" --device "$DEVICE" "${DRY[@]}" | tail -n 1)
  [[ -n $out ]] && basename "$out"
  return 0
}

PRE=(--iters "$PRETRAIN_ITERS" --batch "$PRETRAIN_BATCH" --micro-batch "$PRETRAIN_BATCH" --lr 1e-4 --save-every 40
     --sample-every 0 --num-sample-prompts 0)
DIS=(--iters "$DISTILL_ITERS" --batch "$DISTILL_BATCH" --micro-batch "$DISTILL_BATCH" --lr 2e-5 --save-every 40
     --sample-every 0 --num-sample-prompts 0)

toy_data() {  # the data stages of recipes/toy.sh (reused when they ran before with the same settings)
  run "prompts" make-prompts --source "toy:$TOY_PROMPTS" >/dev/null
  run "teacher videos" synth-videos --teacher toy --steps "$SYNTH_STEPS" --batch-size 64 --save-latents >/dev/null
  LATENTS=$(run "latents" encode-latents --teacher toy --batch-size 64)
}

use_latents() {  # training reads the main latents by id (other latents, e.g. KD pairs, may be newer)
  [[ -n ${LATENTS:-} ]] && PRE+=(--latents "$LATENTS") && DIS+=(--latents "$LATENTS")
  return 0
}

# Students are named after what they are (and their budgets), so the report's rows say it; each distill names its
# Stage-1 student explicitly with --init (in a dry run the init is "not made yet").
pretrain() {  # pretrain NAME ARGS...: prints the artifact id
  local name=$1
  shift
  run "$name" pretrain-head --teacher toy --name "$name" "$@" "${PRE[@]}"
}

distill() {  # distill NAME INIT ARGS... (INIT empty: none); adds the student to MODELS
  local name=$1 init=$2 with_init=()
  shift 2
  [[ -n $init && $DRY_RUN != 1 ]] && with_init=(--init "$init")
  run "$name" distill --teacher toy --name "$name" "${with_init[@]}" "$@" "${DIS[@]}" >/dev/null
  MODELS+=(--model "$name")
}

write_results() {  # write_results EVAL_ID TITLE COMMAND: OUT_DIR/{results.json,report.md,quality_vs_nfe.png,results.md}
  local eval_id=$1 title=$2 command=$3 seconds folder
  seconds=$(( $(date +%s) - start ))
  folder=$TMD_HOME/eval/$eval_id
  mkdir -p "$OUT_DIR"
  cp "$folder/results.json" "$folder/report.md" "$OUT_DIR/"
  [[ -f $folder/quality_vs_nfe.png ]] && cp "$folder/quality_vs_nfe.png" "$OUT_DIR/"  # absent without matplotlib
  {
    echo "# $title"
    echo
    echo "Command: \`$command\`"
    echo
    echo "Machine: $(python3 -c 'import platform, torch; print(platform.processor() or platform.machine(), "-", torch.get_num_threads(), "torch threads,", "cuda" if torch.cuda.is_available() else "no GPU")') ($(nproc) cores)"
    echo "Run time: ${seconds} s (data stages included when they ran; $(date -u +%Y-%m-%d))"
    echo "Eval artifact: $eval_id. Rows are named after the student (budgets in iterations); \`tmd show NAME --home"
    echo "$TMD_HOME\` gives each one's full configuration. The table below is the eval's report.md, unchanged."
    echo
    cat "$folder/report.md"
    echo
    echo "## Which student is which"
    echo
    "$TMD" ls student --json --home "$TMD_HOME" | python3 "$RECIPES_DIR/_students_table.py"
  } > "$OUT_DIR/results.md"
  echo "[$RECIPE] done in ${seconds} s: $OUT_DIR/results.md" >&2
}
