# shellcheck shell=bash disable=SC2034  # words is read by the sourcing script
# Helpers shared by the top-level *.sh scripts (sourced, not run). Plain bash 3.2+
# (it also runs with macOS's /bin/bash): no associative arrays, no namerefs, and
# possibly-empty arrays expand as ${a[@]+"${a[@]}"}, which is safe under set -u
# in bash < 4.4.
# The sourcing script sets CALLER_DIR=$PWD before changing directory (or calls
# sweep_begin, which does it).

die() {
  echo "error: $*" >&2
  exit 1
}

# resolve_from_caller VAR [existing]: make a relative path in $VAR absolute,
# relative to the caller's directory. With "existing", only if it exists there
# (so "THUDM/CogVideoX-5b" stays a hub id and repo-relative paths still work).
resolve_from_caller() {
  local value=${!1:-}
  case $value in
    '' | /*) return 0 ;;
  esac
  if [[ "${2:-}" == existing && ! -e "$CALLER_DIR/$value" ]]; then
    return 0
  fi
  printf -v "$1" '%s/%s' "$CALLER_DIR" "$value"
}

# split_words STRING: split STRING on whitespace into the array `words`
# (no quote removal, no globbing).
split_words() {
  local IFS=$' \t\n'
  words=()
  read -r -d '' -a words <<<"$1" || true
}

# split_list VAR: split_words on the value of $VAR, which must not be blank.
split_list() {
  [[ "${!1}" =~ [^[:space:]] ]] || die "$1 is empty"
  split_words "${!1}"
}

# split_separated STRING: split STRING on the validation separator ::: into the
# array `words`, keeping empty items ("a:::" gives "a" and "").
split_separated() {
  local rest=$1
  words=()
  while [[ "$rest" == *:::* ]]; do
    words+=("${rest%%:::*}")
    rest=${rest#*:::}
  done
  words+=("$rest")
}

# =========================================================== training sweeps
# The train_*.sh scripts are thin: a header, their own defaults, and
#   sweep_begin                     # before their defaults
#   sweep_data RAW_DATA_ROOT RAW_CAPTION_COLUMN
#   sweep_run TRAINER RUN_NAME [TRAINER FLAG...]
# Each runs the trainer once per point of the grid
#   LEARNING_RATES x LR_SCHEDULES x OPTIMIZERS x MAX_TRAIN_STEPS
# (space-separated lists), in OUTPUT_ROOT/RUN_NAME__optimizer_..._learning-rate_...,
# and stops at the first run that fails.
#
# Settings shared by the sweeps. Each can be set in the environment; otherwise
# the script's default applies, else the one given here in brackets:
#   GPU_IDS [0]; ACCELERATE_CONFIG_FILE [accelerate_configs/uncompiled_1.yaml]
#     (for uncompiled_2.yaml or deepspeed.yaml set GPU_IDS=0,1);
#   ACCELERATE_BIN [accelerate]; MODEL_PATH (a hub id or a local folder);
#   LOAD_TENSORS [0]: 1 trains on the latents and prompt embeddings written by
#     prepare_dataset.sh (DATA_ROOT/manifest.json), 0 from raw videos, encoding
#     them with the VAE and T5 at every step;
#   DATA_ROOT, CAPTION_COLUMN: see sweep_data; VIDEO_COLUMN [videos.txt];
#   OUTPUT_ROOT [outputs]; ID_TOKEN ["" = no --id_token];
#   HEIGHT_BUCKETS [480], WIDTH_BUCKETS [720], FRAME_BUCKETS [49] (lists; with
#     prepared data every clip keeps the bucket prepare_dataset.sh gave it, and
#     these only set the validation size); MAX_NUM_FRAMES [the largest frame bucket];
#   VALIDATION_PROMPT: prompts joined by ::: ("" = no validation);
#   VALIDATION_IMAGES (image-to-video only): one image per prompt, joined by :::
#     ("" = no validation, as the trainer needs an image for every prompt);
#   VALIDATION_EPOCHS [10]; CHECKPOINTING_STEPS [1000]; TRAIN_BATCH_SIZE [1];
#   GRADIENT_ACCUMULATION_STEPS [1]; LR_WARMUP_STEPS [400]; LR_SCHEDULES
#     [cosine_with_restarts]; MIXED_PRECISION [bf16]; REPORT_TO [wandb]; SEED [42];
#   DATALOADER_NUM_WORKERS [8]; DRY_RUN [0]: 1 prints the commands only;
#   SP_SIZE [1]: with 2 or more, each sample's video tokens are split over that
#     many processes (--enable_sequence_parallelism --sequence_parallel_shards);
#     it must divide the processes (GPU_IDS with a multi-GPU config);
#   EXTRA_ARGS: split on whitespace (no quoting, no globbing) and appended to
#     every command; a flag given there overrides the same flag set earlier.
#   CONFIG: a run config file (--config, docs/training.md "One run, one config"). The runs
#     then take every setting from it, except the settings above (and the
#     script's own: RANK, LORA_ALPHA, NOISED_IMAGE_DROPOUT) that you set in the
#     environment, which override it; the scripts' defaults do not apply. The
#     grid is the lists you set (LEARNING_RATES="1e-4 3e-4": two runs), each in
#     OUTPUT_ROOT/RUN_NAME__<the settings you set>; with none set, one run in the
#     config's output_dir. GPU_IDS and ACCELERATE_CONFIG_FILE keep their defaults.
# Relative paths given in the environment are taken from the directory you run
# the script from (inputs only when they exist there); the defaults are
# relative to this repository, which the scripts change into.
#
# The scripts check only what the trainer cannot: their own settings (LOAD_TENSORS,
# DRY_RUN, empty lists, FRAME_BUCKETS for MAX_NUM_FRAMES) and whether
# ACCELERATE_BIN exists. Everything the flags mean (data, manifest.json, images,
# accumulation under DeepSpeed, ...) the trainer checks before it loads any model,
# with one `error:` line per problem; the sweep stops at its first failed run.

# sweep_begin: resolve the caller's relative paths, change into the
# repository and export the training environment.
sweep_begin() {
  CALLER_DIR=$PWD
  # What you set yourself (before the script's defaults): with CONFIG only these override the file.
  local name
  SWEEP_SET_BY_USER=" "
  for name in "${SWEEP_SETTINGS[@]}"; do
    if [[ -n "${!name+set}" ]]; then
      SWEEP_SET_BY_USER+="$name "
    fi
  done
  resolve_from_caller CONFIG existing
  resolve_from_caller ACCELERATE_CONFIG_FILE existing
  resolve_from_caller MODEL_PATH existing
  resolve_from_caller DATA_ROOT existing
  resolve_from_caller OUTPUT_ROOT
  if [[ -n "${VALIDATION_IMAGES:-}" ]]; then
    local image joined='' separator=''
    split_separated "$VALIDATION_IMAGES"
    for image in "${words[@]}"; do
      if [[ -n "$image" ]]; then
        resolve_from_caller image existing
      fi
      joined+=$separator$image
      separator=':::'
    done
    VALIDATION_IMAGES=$joined
  fi
  cd "$(dirname "${BASH_SOURCE[0]}")/.." || die "cannot change into the repository"

  # Upstream always set TORCH_LOGS="+dynamo,recompiles,graph_breaks" and
  # TORCHDYNAMO_VERBOSE=1, which floods the log on every run. Here it is opt-in:
  # set TORCH_LOGS yourself (e.g. when debugging accelerate_configs/compiled_1.yaml).
  if [[ -n "${TORCH_LOGS:-}" ]]; then
    export TORCH_LOGS
    export TORCHDYNAMO_VERBOSE="${TORCHDYNAMO_VERBOSE:-1}"
  fi
  # wandb cannot reach its server offline; `wandb sync` uploads the runs later.
  export WANDB_MODE="${WANDB_MODE:-offline}"
  # Disables NCCL peer-to-peer transfers, which hang on some consumer GPUs that
  # lack P2P support; set NCCL_P2P_DISABLE=0 on NVLink machines for speed.
  export NCCL_P2P_DISABLE="${NCCL_P2P_DISABLE:-1}"
  export TORCH_NCCL_ENABLE_MONITORING="${TORCH_NCCL_ENABLE_MONITORING:-0}"
}

# The settings a sweep turns into trainer flags (with CONFIG: only those you set).
SWEEP_SETTINGS=(MODEL_PATH DATA_ROOT CAPTION_COLUMN VIDEO_COLUMN ID_TOKEN HEIGHT_BUCKETS WIDTH_BUCKETS FRAME_BUCKETS
  MAX_NUM_FRAMES VALIDATION_PROMPT VALIDATION_IMAGES VALIDATION_EPOCHS CHECKPOINTING_STEPS TRAIN_BATCH_SIZE
  GRADIENT_ACCUMULATION_STEPS LR_WARMUP_STEPS LR_SCHEDULES MIXED_PRECISION REPORT_TO SEED DATALOADER_NUM_WORKERS
  LOAD_TENSORS SP_SIZE LEARNING_RATES OPTIMIZERS MAX_TRAIN_STEPS OUTPUT_ROOT RANK LORA_ALPHA NOISED_IMAGE_DROPOUT)

user_set() { [[ "$SWEEP_SET_BY_USER" == *" $1 "* ]]; }

# sweep_data RAW_DATA_ROOT RAW_CAPTION_COLUMN: check LOAD_TENSORS and default
# the data to match prepare_dataset.sh: raw videos in RAW_DATA_ROOT (captions
# in RAW_CAPTION_COLUMN), or with LOAD_TENSORS=1 what prepare_dataset.sh writes
# for them, RAW_DATA_ROOT-prepared (captions in prompts.txt).
sweep_data() {
  : "${LOAD_TENSORS:=0}"
  case $LOAD_TENSORS in
    0) : "${DATA_ROOT:=$1}" "${CAPTION_COLUMN:=$2}" ;;
    1) : "${DATA_ROOT:=$1-prepared}" "${CAPTION_COLUMN:=prompts.txt}" ;;
    *) die "LOAD_TENSORS must be 0 or 1, got '$LOAD_TENSORS'" ;;
  esac
}

# sweep_validation_flags TRAINER: the validation flags in the array `words`
# (none when there is nothing to validate with). Whether there is one image per
# prompt and whether the images exist is the trainer's to check.
sweep_validation_flags() {
  words=()
  [[ -n "$VALIDATION_PROMPT" ]] || return 0
  words=(--validation_prompt "$VALIDATION_PROMPT")
  case $1 in
    *image_to_video*)
      if [[ -z "${VALIDATION_IMAGES:-}" ]]; then
        echo "note: VALIDATION_IMAGES is empty, so these runs skip validation; set it to one image per prompt, e.g. VALIDATION_IMAGES=/path/1.png:::/path/2.png" >&2
        words=()
        return 0
      fi
      words=(--validation_prompt "$VALIDATION_PROMPT" --validation_images "$VALIDATION_IMAGES")
      ;;
  esac
  words+=(
    --validation_prompt_separator :::
    --num_validation_videos 1
    --validation_epochs "$VALIDATION_EPOCHS"
  )
}

# sweep_run TRAINER RUN_NAME [TRAINER FLAG...]: run (or with DRY_RUN=1 print)
# TRAINER once per point of the sweep grid. The trainer flags go after the
# shared ones and before EXTRA_ARGS.
sweep_run() {
  local trainer=$1 run_name=$2
  shift 2
  : "${GPU_IDS:=0}" "${ACCELERATE_CONFIG_FILE:=accelerate_configs/uncompiled_1.yaml}"
  : "${ACCELERATE_BIN:=accelerate}" "${VIDEO_COLUMN:=videos.txt}" "${OUTPUT_ROOT:=outputs}"
  : "${ID_TOKEN:=}" "${HEIGHT_BUCKETS:=480}" "${WIDTH_BUCKETS:=720}" "${FRAME_BUCKETS:=49}"
  : "${VALIDATION_PROMPT:=}" "${VALIDATION_EPOCHS:=10}" "${CHECKPOINTING_STEPS:=1000}"
  : "${TRAIN_BATCH_SIZE:=1}" "${GRADIENT_ACCUMULATION_STEPS:=1}" "${LR_WARMUP_STEPS:=400}"
  : "${LR_SCHEDULES:=cosine_with_restarts}" "${MIXED_PRECISION:=bf16}" "${REPORT_TO:=wandb}"
  : "${SEED:=42}" "${DATALOADER_NUM_WORKERS:=8}" "${EXTRA_ARGS:=}" "${DRY_RUN:=0}" "${SP_SIZE:=1}"
  case $DRY_RUN in
    0 | 1) ;;
    *) die "DRY_RUN must be 0 or 1, got '$DRY_RUN'" ;;
  esac
  [[ "$SP_SIZE" =~ ^[1-9][0-9]*$ ]] || die "SP_SIZE must be a whole number of processes per sample (1: off), got '$SP_SIZE'"
  [[ -n "${DATA_ROOT:-}" ]] || die "the script must call sweep_data before sweep_run"
  if [[ -n "${CONFIG:-}" ]]; then
    sweep_run_with_config "$trainer" "$run_name"
    return
  fi

  local learning_rates lr_schedules optimizers max_train_steps
  local height_buckets width_buckets frame_buckets extra_args validation_flags frames
  split_list LEARNING_RATES && learning_rates=("${words[@]}")
  split_list LR_SCHEDULES && lr_schedules=("${words[@]}")
  split_list OPTIMIZERS && optimizers=("${words[@]}")
  split_list MAX_TRAIN_STEPS && max_train_steps=("${words[@]}")
  split_list HEIGHT_BUCKETS && height_buckets=("${words[@]}")
  split_list WIDTH_BUCKETS && width_buckets=("${words[@]}")
  split_list FRAME_BUCKETS && frame_buckets=("${words[@]}")
  split_words "$EXTRA_ARGS" && extra_args=(${words[@]+"${words[@]}"})
  if [[ -z "${MAX_NUM_FRAMES:-}" ]]; then
    MAX_NUM_FRAMES=0
    for frames in "${frame_buckets[@]}"; do
      [[ "$frames" =~ ^[0-9]+$ ]] || die "FRAME_BUCKETS must hold frame counts, got '$frames'"
      if ((10#$frames > MAX_NUM_FRAMES)); then
        MAX_NUM_FRAMES=$((10#$frames))
      fi
    done
  fi
  sweep_validation_flags "$trainer" && validation_flags=(${words[@]+"${words[@]}"})

  if [[ "$DRY_RUN" == 0 ]] && ! command -v "$ACCELERATE_BIN" >/dev/null 2>&1; then
    die "'$ACCELERATE_BIN' not found: activate the environment with accelerate installed, or set ACCELERATE_BIN"
  fi

  local learning_rate lr_schedule optimizer steps output_dir cmd
  for learning_rate in "${learning_rates[@]}"; do
    for lr_schedule in "${lr_schedules[@]}"; do
      for optimizer in "${optimizers[@]}"; do
        for steps in "${max_train_steps[@]}"; do
          output_dir="$OUTPUT_ROOT/${run_name}__optimizer_${optimizer}__steps_${steps}__lr-schedule_${lr_schedule}__learning-rate_${learning_rate}"
          # --quiet: when the trainer stops with its one-line `error:`, accelerate's launcher (one process) exits
          # 1 without adding a CalledProcessError traceback under it.
          cmd=(
            "$ACCELERATE_BIN" launch --quiet
            --config_file "$ACCELERATE_CONFIG_FILE"
            --gpu_ids "$GPU_IDS"
            "$trainer"
            --pretrained_model_name_or_path "$MODEL_PATH"
            --data_root "$DATA_ROOT"
            --caption_column "$CAPTION_COLUMN"
            --video_column "$VIDEO_COLUMN"
          )
          if [[ -n "$ID_TOKEN" ]]; then
            cmd+=(--id_token "$ID_TOKEN")
          fi
          cmd+=(
            --height_buckets "${height_buckets[@]}"
            --width_buckets "${width_buckets[@]}"
            --frame_buckets "${frame_buckets[@]}"
            --dataloader_num_workers "$DATALOADER_NUM_WORKERS"
            --pin_memory
            ${validation_flags[@]+"${validation_flags[@]}"}
            --seed "$SEED"
            --mixed_precision "$MIXED_PRECISION"
            --output_dir "$output_dir"
            --max_num_frames "$MAX_NUM_FRAMES"
            --train_batch_size "$TRAIN_BATCH_SIZE"
            --max_train_steps "$steps"
            --checkpointing_steps "$CHECKPOINTING_STEPS"
            --gradient_accumulation_steps "$GRADIENT_ACCUMULATION_STEPS"
            --gradient_checkpointing
            --learning_rate "$learning_rate"
            --lr_scheduler "$lr_schedule"
            --lr_warmup_steps "$LR_WARMUP_STEPS"
            --lr_num_cycles 1
            --enable_slicing
            --enable_tiling
            ${1+"$@"}
          )
          if [[ "$LOAD_TENSORS" == 1 ]]; then
            cmd+=(--load_tensors)
          fi
          if ((10#$SP_SIZE > 1)); then
            cmd+=(--enable_sequence_parallelism --sequence_parallel_shards "$((10#$SP_SIZE))")
          fi
          cmd+=(
            --optimizer "$optimizer"
            --beta1 0.9
            --beta2 0.95
            --weight_decay 0.001
            --max_grad_norm 1.0
            --allow_tf32
            --report_to "$REPORT_TO"
            --nccl_timeout 1800
            ${extra_args[@]+"${extra_args[@]}"}
          )

          sweep_launch "$output_dir" "${cmd[@]}"
        done
      done
    done
  done
}

# sweep_launch OUTPUT_DIR COMMAND...: print the command; unless DRY_RUN=1, run it.
sweep_launch() {
  local output_dir=$1
  shift
  printf '%q ' "$@"
  printf '\n'
  [[ "$DRY_RUN" == 0 ]] || return 0
  # The Python that filters the launch's stderr: the one next to ACCELERATE_BIN, else python3 (none: unfiltered).
  local filter_python
  filter_python="$(dirname "$(command -v "$ACCELERATE_BIN")")/python"
  [[ -x "$filter_python" ]] || filter_python=$(command -v python3 || true)
  if [[ -n "$filter_python" ]]; then
    # stderr through scripts/launch_errors_only.py (stdout stays as it is): after the trainer's own `error:` lines,
    # the launcher's traceback (torchrun's with several processes) is dropped. The pipeline's status is the
    # launch's (pipefail).
    { "$@" 2>&1 1>&3 3>&- | "$filter_python" scripts/launch_errors_only.py >&2 3>&-; } 3>&1
  else
    "$@"
  fi
  echo "-------------------- finished $output_dir --------------------"
}

# sweep_run_with_config TRAINER RUN_NAME: the sweep over CONFIG (see CONFIG above): the file, then the settings you
# set, then EXTRA_ARGS.
sweep_run_with_config() {
  local trainer=$1 run_name=$2 name flag
  [[ -f "$CONFIG" ]] || die "CONFIG=$CONFIG: no such file"
  local -a base=("$ACCELERATE_BIN" launch --quiet --config_file "$ACCELERATE_CONFIG_FILE" --gpu_ids "$GPU_IDS"
    "$trainer" --config "$CONFIG")
  local -A flags=([MODEL_PATH]=--pretrained_model_name_or_path [DATA_ROOT]=--data_root
    [CAPTION_COLUMN]=--caption_column [VIDEO_COLUMN]=--video_column [ID_TOKEN]=--id_token
    [MAX_NUM_FRAMES]=--max_num_frames [VALIDATION_EPOCHS]=--validation_epochs
    [CHECKPOINTING_STEPS]=--checkpointing_steps [TRAIN_BATCH_SIZE]=--train_batch_size
    [GRADIENT_ACCUMULATION_STEPS]=--gradient_accumulation_steps [LR_WARMUP_STEPS]=--lr_warmup_steps
    [MIXED_PRECISION]=--mixed_precision [REPORT_TO]=--report_to [SEED]=--seed
    [DATALOADER_NUM_WORKERS]=--dataloader_num_workers [RANK]=--rank [LORA_ALPHA]=--lora_alpha
    [NOISED_IMAGE_DROPOUT]=--noised_image_dropout)
  for name in MODEL_PATH DATA_ROOT CAPTION_COLUMN VIDEO_COLUMN ID_TOKEN MAX_NUM_FRAMES VALIDATION_EPOCHS \
    CHECKPOINTING_STEPS TRAIN_BATCH_SIZE GRADIENT_ACCUMULATION_STEPS LR_WARMUP_STEPS MIXED_PRECISION REPORT_TO SEED \
    DATALOADER_NUM_WORKERS RANK LORA_ALPHA NOISED_IMAGE_DROPOUT; do
    if user_set "$name"; then
      case $name in
        RANK | LORA_ALPHA) [[ "$trainer" == *lora* ]] || continue ;;  # the full fine-tunes have no adapter
        NOISED_IMAGE_DROPOUT) [[ "$trainer" == *image_to_video* ]] || continue ;;
      esac
      base+=("${flags[$name]}" "${!name}")
    fi
  done
  for name in HEIGHT_BUCKETS WIDTH_BUCKETS FRAME_BUCKETS; do
    if user_set "$name"; then
      flag=--$(echo "$name" | tr '[:upper:]' '[:lower:]')
      split_list "$name" && base+=("$flag" "${words[@]}")
    fi
  done
  if user_set VALIDATION_PROMPT || user_set VALIDATION_IMAGES; then
    sweep_validation_flags "$trainer" && base+=(${words[@]+"${words[@]}"})
  fi
  if user_set LOAD_TENSORS && [[ "$LOAD_TENSORS" == 1 ]]; then
    base+=(--load_tensors)
  fi
  if user_set SP_SIZE && ((10#$SP_SIZE > 1)); then
    base+=(--enable_sequence_parallelism --sequence_parallel_shards "$((10#$SP_SIZE))")
  fi

  # The grid: the lists you set; a list you did not set is the config's one value ("").
  local -a learning_rates=("") lr_schedules=("") optimizers=("") max_train_steps=("") extra_args=()
  user_set LEARNING_RATES && split_list LEARNING_RATES && learning_rates=("${words[@]}")
  user_set LR_SCHEDULES && split_list LR_SCHEDULES && lr_schedules=("${words[@]}")
  user_set OPTIMIZERS && split_list OPTIMIZERS && optimizers=("${words[@]}")
  user_set MAX_TRAIN_STEPS && split_list MAX_TRAIN_STEPS && max_train_steps=("${words[@]}")
  split_words "$EXTRA_ARGS" && extra_args=(${words[@]+"${words[@]}"})
  local named=0
  if user_set LEARNING_RATES || user_set LR_SCHEDULES || user_set OPTIMIZERS || user_set MAX_TRAIN_STEPS ||
    user_set OUTPUT_ROOT; then
    named=1
  fi
  if [[ "$DRY_RUN" == 0 ]] && ! command -v "$ACCELERATE_BIN" >/dev/null 2>&1; then
    die "'$ACCELERATE_BIN' not found: activate the environment with accelerate installed, or set ACCELERATE_BIN"
  fi

  local learning_rate lr_schedule optimizer steps output_dir
  local -a cmd
  for learning_rate in "${learning_rates[@]}"; do
    for lr_schedule in "${lr_schedules[@]}"; do
      for optimizer in "${optimizers[@]}"; do
        for steps in "${max_train_steps[@]}"; do
          cmd=("${base[@]}")
          output_dir="$OUTPUT_ROOT/$run_name"
          if [[ -n "$optimizer" ]]; then cmd+=(--optimizer "$optimizer"); output_dir+="__optimizer_$optimizer"; fi
          if [[ -n "$steps" ]]; then cmd+=(--max_train_steps "$steps"); output_dir+="__steps_$steps"; fi
          if [[ -n "$lr_schedule" ]]; then cmd+=(--lr_scheduler "$lr_schedule"); output_dir+="__lr-schedule_$lr_schedule"; fi
          if [[ -n "$learning_rate" ]]; then cmd+=(--learning_rate "$learning_rate"); output_dir+="__learning-rate_$learning_rate"; fi
          if [[ "$named" == 1 ]]; then
            cmd+=(--output_dir "$output_dir")
          else
            output_dir="the output_dir of $CONFIG"
          fi
          cmd+=(${extra_args[@]+"${extra_args[@]}"})
          sweep_launch "$output_dir" "${cmd[@]}"
        done
      done
    done
  done
}
