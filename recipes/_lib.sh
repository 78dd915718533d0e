# shellcheck shell=bash
# Shared by the recipes (source it after `set -euo pipefail` and RECIPE=<name>): environment defaults, the launch
# wrapper, the DRY_RUN switch, the shared data stages and the hand-off of artifact paths between nodes.
#
# Knobs (environment variables; the defaults are the paper's setup, METHOD.md section 6):
#   NUM_GPUS=8 NUM_NODES=1 NODE_RANK=0 MAIN_ADDR= MAIN_PORT=29500 RUN_ID=$SLURM_JOB_ID   launch topology
#   TMD_HOME=./tmd-home           artifact home (on a filesystem every node sees when NUM_NODES > 1)
#   VIDPROM_FILE=$TMD_HOME/VidProM_unique.csv   NUM_PROMPTS=500000   EXPANDER=qwen2.5-7b   PROMPT_BACKEND=transformers
#   DATA_TEACHER=wan2.1-14b       the teacher that synthesises the training videos (TMD section 4.1)
#   SAVE_NOISE=1                  synth-videos --save-noise (a copy of each clip's initial noise; the KD pairs of
#                                 baselines-dmd2v.sh are made apart, with --kd-pairs); every recipe must use the
#                                 same value, or the videos are made twice
#   BATCH=64 MICRO_BATCH=1 CHECKPOINTING=1 LOG_TO=none   training (global batch, per-GPU batch, --checkpointing)
#   EVAL_SUITE=vbench EVAL_TEACHER=0 AUGMENTED_PROMPTS=   eval (TMD_VBENCH_PYTHON / VBENCH_CACHE_DIR as for tmd eval)
#   SAMPLE_PROMPT="..." SAMPLES_DIR=$TMD_HOME/recipe-samples
#   ACCEL_TRAIN_CONFIG / ACCEL_DATA_CONFIG   override the accelerate configs picked below
#   DRY_RUN=1                     every stage with --dry-run, as plain `tmd` (no accelerate launch): the whole plan
#   TMD=tmd ACCELERATE=accelerate the executables
#
# Resuming: rerun the recipe. Every stage resumes its own staging folder, and a finished stage prints
# "(up to date)" and its artifact path without redoing anything.

shopt -s inherit_errexit  # a failing command inside $(...) fails the step, with its exit code

RECIPES_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ACCEL_DIR=$RECIPES_DIR/accelerate

: "${NUM_GPUS:=8}" "${NUM_NODES:=1}" "${NODE_RANK:=0}" "${MAIN_ADDR:=}" "${MAIN_PORT:=29500}"
: "${RUN_ID:=${SLURM_JOB_ID:-}}"
: "${TMD_HOME:=$PWD/tmd-home}"
: "${VIDPROM_FILE:=$TMD_HOME/VidProM_unique.csv}"
: "${NUM_PROMPTS:=500000}" "${EXPANDER:=qwen2.5-7b}" "${PROMPT_BACKEND:=transformers}"
: "${DATA_TEACHER:=wan2.1-14b}" "${SAVE_NOISE:=1}"
: "${BATCH:=64}" "${MICRO_BATCH:=1}" "${CHECKPOINTING:=1}" "${LOG_TO:=none}"
: "${EVAL_SUITE:=vbench}" "${EVAL_TEACHER:=0}" "${AUGMENTED_PROMPTS:=}"
: "${SAMPLE_PROMPT:=A corgi in sunglasses surfs a turquoise wave at sunset, spray glittering, the camera tracking alongside.}"
: "${SAMPLES_DIR:=$TMD_HOME/recipe-samples}"
: "${DRY_RUN:=0}" "${TMD:=tmd}" "${ACCELERATE:=accelerate}"
export TMD_HOME
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TRANSFORMERS_OFFLINE=${TRANSFORMERS_OFFLINE:-1}

# Options every training stage gets (none of them changes an artifact's identity except BATCH).
TRAIN_OPTS=(--batch "$BATCH" --micro-batch "$MICRO_BATCH" --log-to "$LOG_TO")
if [[ $CHECKPOINTING == 1 ]]; then TRAIN_OPTS+=(--checkpointing); else TRAIN_OPTS+=(--no-checkpointing); fi

die() { echo "error: $*" >&2; exit 2; }
note() { echo "[$RECIPE] $*" >&2; }
quote() { printf '%q ' "$@"; }
dry_run() { [[ $DRY_RUN == 1 ]]; }
multi_node() { (( NUM_NODES > 1 )) && ! dry_run; }

if multi_node; then
  [[ -n $MAIN_ADDR ]] || die "NUM_NODES=$NUM_NODES needs MAIN_ADDR (the address of node 0)"
  [[ -n $RUN_ID ]] || die "NUM_NODES=$NUM_NODES needs RUN_ID (the same on every node, e.g. \$SLURM_JOB_ID)"
  (( NODE_RANK >= 0 && NODE_RANK < NUM_NODES )) || die "NODE_RANK=$NODE_RANK is not in 0..$((NUM_NODES - 1))"
fi
HANDOFF_DIR=$TMD_HOME/.recipes/$RECIPE-${RUN_ID:-local}

# The accelerate config of a launched stage: `data` (synth-videos, encode-latents: no process group, one launch per
# node, nodes split the shards with --shard) or `train` (pretrain-head, distill: FSDP2 over all nodes).
accel_config() {
  if [[ $1 == data ]]; then
    if [[ -n ${ACCEL_DATA_CONFIG:-} ]]; then echo "$ACCEL_DATA_CONFIG"
    elif (( NUM_GPUS == 1 )); then echo "$ACCEL_DIR/1gpu.yaml"
    else echo "$ACCEL_DIR/ddp-8gpu.yaml"; fi
  else
    if [[ -n ${ACCEL_TRAIN_CONFIG:-} ]]; then echo "$ACCEL_TRAIN_CONFIG"
    elif (( NUM_NODES > 1 )); then echo "$ACCEL_DIR/fsdp-multinode.yaml"
    elif (( NUM_GPUS == 1 )); then echo "$ACCEL_DIR/1gpu.yaml"
    else echo "$ACCEL_DIR/fsdp-8gpu.yaml"; fi
  fi
}

# Publish a stage's artifact path for the other nodes / wait for it (multi-node runs only).
handoff_put() {
  mkdir -p "$HANDOFF_DIR"
  printf '%s\n' "$2" > "$HANDOFF_DIR/$1.tmp.$$" && mv -f "$HANDOFF_DIR/$1.tmp.$$" "$HANDOFF_DIR/$1"
}
handoff_get() {
  local f=$HANDOFF_DIR/$1
  [[ -s $f ]] || note "node $NODE_RANK: waiting for step '$1' (another node finishes it; polling $f)"
  until [[ -s $f ]]; do sleep 15; done
  cat "$f"
}

# step NAME MODE STAGE ARGS...: run one stage and print its result (the artifact path) on stdout.
#   MODE single: plain `tmd` on node 0 (make-prompts, sample, eval); the other nodes wait for its result.
#   MODE data:   `accelerate launch` on every node, nodes split the shards (--shard NODE_RANK/NUM_NODES).
#   MODE train:  `accelerate launch` across all nodes (FSDP2).
# DRY_RUN=1: prints the command it would run, then `tmd STAGE ARGS --dry-run` (the plan, on stderr); prints nothing.
step() {
  local name=$1 mode=$2 stage=$3
  shift 3
  local args=("$@") cmd=()
  if [[ $mode == data ]] && (( NUM_NODES > 1 )); then args+=(--shard "$NODE_RANK/$NUM_NODES"); fi
  if [[ $mode == single ]]; then
    cmd=("$TMD" "$stage" "${args[@]}")
  else
    local launch=(--config_file "$(accel_config "$mode")")
    if [[ $mode == data ]]; then
      launch+=(--num_processes "$NUM_GPUS")
    else
      launch+=(--num_processes "$((NUM_GPUS * NUM_NODES))")
      if (( NUM_NODES > 1 )); then
        launch+=(--num_machines "$NUM_NODES" --machine_rank "$NODE_RANK" --main_process_ip "${MAIN_ADDR:-MAIN_ADDR}"
                 --main_process_port "$MAIN_PORT")
      fi
    fi
    cmd=("$ACCELERATE" launch "${launch[@]}" -m tmdcli "$stage" "${args[@]}")
  fi
  if dry_run; then
    echo >&2
    note "step $name: would run: $(quote "${cmd[@]}")"
    # plan training for the launch it would get: world size, and FSDP sharding of the trained networks
    local plan_env=()
    if [[ $mode == train ]]; then
      plan_env=("TMD_PLAN_WORLD_SIZE=$((NUM_GPUS * NUM_NODES))")
      if [[ $(accel_config train) == *fsdp* ]]; then plan_env+=(TMD_PLAN_FSDP=1); fi
    fi
    env "${plan_env[@]}" "$TMD" "$stage" "${args[@]}" --dry-run >&2
    return
  fi
  if [[ $mode == single ]] && multi_node && (( NODE_RANK != 0 )); then
    handoff_get "$name"
    return
  fi
  note "step $name: $(quote "${cmd[@]}")"
  local out
  out=$("${cmd[@]}")
  out=$(printf '%s\n' "$out" | awk 'NF { last = $0 } END { print last }')
  if multi_node; then
    if [[ -n $out ]]; then handoff_put "$name" "$out"; else out=$(handoff_get "$name"); fi
  fi
  [[ -n $out ]] || { echo "error: tmd $stage printed no result on stdout" >&2; return 1; }
  printf '%s\n' "$out"
}

# Sets PROMPT_SOURCE / PROMPT_EXPANDER for make-prompts. In a dry run a missing VidProM file (or expander model)
# is shown in make-prompts' plan as NOT AVAILABLE, and the later plans assume the prompts exist.
prompt_source() {
  PROMPT_SOURCE=$VIDPROM_FILE
  PROMPT_EXPANDER=$EXPANDER
  if dry_run && [[ ! -f $VIDPROM_FILE ]]; then
    note "VIDPROM_FILE=$VIDPROM_FILE not found: download VidProM_unique.csv yourself (CC BY-NC 4.0) before a real run"
  fi
}

# The data stages every recipe shares (same options, so the 500k clips are made once per home):
# make-prompts -> synth-videos (DATA_TEACHER) -> encode-latents (the student's teacher, $1).
# Sets PROMPTS, VIDEOS and LATENTS (empty in a dry run: the next plans then read "not made yet").
make_data() {
  local teacher=$1 synth=(--save-latents)
  [[ $SAVE_NOISE == 1 ]] && synth+=(--save-noise)
  prompt_source
  PROMPTS=$(step prompts single make-prompts --source "$PROMPT_SOURCE" --limit "$NUM_PROMPTS" \
            --expander "$PROMPT_EXPANDER" --backend "$PROMPT_BACKEND")
  VIDEOS=$(step videos data synth-videos --teacher "$DATA_TEACHER" --prompts "${PROMPTS:-latest}" "${synth[@]}")
  LATENTS=$(step "latents-$teacher" data encode-latents --teacher "$teacher" --videos "${VIDEOS:-latest}")
}

# eval_args STUDENT... -> the --model list of an eval (the teacher first when EVAL_TEACHER=1) in EVAL_ARGS.
eval_args() {
  local teacher=$1
  shift
  EVAL_ARGS=(--suite "$EVAL_SUITE")
  [[ $EVAL_TEACHER == 1 ]] && EVAL_ARGS+=(--model "$teacher")
  local s
  for s in "$@"; do EVAL_ARGS+=(--model "${s:-student:latest}"); done
  [[ -n $AUGMENTED_PROMPTS ]] && EVAL_ARGS+=(--augmented-prompts "$AUGMENTED_PROMPTS")
  return 0
}

note "NUM_GPUS=$NUM_GPUS NUM_NODES=$NUM_NODES NODE_RANK=$NODE_RANK TMD_HOME=$TMD_HOME BATCH=$BATCH" \
     "MICRO_BATCH=$MICRO_BATCH DRY_RUN=$DRY_RUN${TMD_TEACHER_OVERRIDE:+ TMD_TEACHER_OVERRIDE=$TMD_TEACHER_OVERRIDE}"
