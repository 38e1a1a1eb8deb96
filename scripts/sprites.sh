#!/usr/bin/env bash
# The sprites recipe in one command (docs/sprites.md): generate the data, train the full model and
# each ablation, sample the test split, score every run and write the tables to $RESULTS
# (outputs/sprites-results.md; docs/results.md keeps the runs reported so far, by hand).
#   scripts/sprites.sh                         # everything, variants one after another
#   PARALLEL=1 WORKERS=2 scripts/sprites.sh    # all variants at once (spread over the host's GPUs; small models leave one idle)
#   SEEDS="0 1" scripts/sprites.sh             # each variant with two training seeds (seed N > 0 in <run>-seedN)
#   VARIANTS="full noref" scripts/sprites.sh   # a subset (full = the recipe's config alone)
#   STEPS=200 TEST=32 scripts/sprites.sh       # a quick run
#   GUIDANCE="1 4" scripts/sprites.sh          # sample and score at each guidance scale (the default)
#   BUDGET=00:00:25:00 scripts/sprites.sh      # each run's training time (default: the config's, 7 min)
#   RECIPE=cached scripts/sprites.sh           # the earlier recipe (configs/sprites.yaml: shards, frozen random towers)
# The default recipe, reader (configs/sprites-reader.yaml, issue #21), made the shipped models/sprites:
#   VARIANTS="full noref" GUIDANCE=1 scripts/sprites.sh   (its export: outputs/sprites-model)
# BINDWEAVE overrides the command (default: the installed `bindweave`).
set -euo pipefail
DATA=${DATA:-data/sprites}
TRAIN=${TRAIN:-20000}
VAL=${VAL:-256}
TEST=${TEST:-256}
SEED=${SEED:-0}
STEPS=${STEPS:-}
MAX_TIME=${MAX_TIME:-}   # e.g. 00:00:05:30: stop each training there (the step count is in its log)
WORKERS=${WORKERS:-}
PARALLEL=${PARALLEL:-0}
CSV_LOG=${CSV_LOG:-0}    # 1: log to <run>/lightning_logs/*/metrics.csv (flushed every 20 steps) instead of TensorBoard
VARIANTS=${VARIANTS:-"full noref t5-only t5-mllm no-clip no-slots"}
SEEDS=${SEEDS:-0}        # training seeds (seed_everything) of every variant: one seed's differences can be noise
PREDICT_BATCH=${PREDICT_BATCH:-8}
GUIDANCE=${GUIDANCE:-"1 4"}  # classifier-free guidance scales to sample the test split at (each scored alone)
CPUS=$(nproc)
CACHE=${CACHE:-0}        # 1: run the frozen encoders once (bindweave data cache) and train every variant from that
CACHE_DEVICE=${CACHE_DEVICE:-$(python3 -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")}
CACHE_PARTS=${CACHE_PARTS:-1}  # processes caching in parallel (CPU-bound: video decoding, the MLLM processor)
CACHE_THREADS=${CACHE_THREADS:-1}  # torch threads per caching process (more oversubscribes the cores)
CACHE_DTYPE=${CACHE_DTYPE:-bfloat16}  # half the bytes of float32 for the loaders to read (trained as float32)
MEMORY=${MEMORY:-1}      # with CACHE=1: hold the cache in GPU memory (configs/sprites/in-memory.yaml); 0: stream it
SAMPLE_EVERY=${SAMPLE_EVERY:-}  # N: sample the first 16 validation requests every N steps into <run>/samples/step-*/
PREDICT=${PREDICT:-1}    # 0: train only (sample and score elsewhere, e.g. from exported weights)
RESUME=${RESUME:-0}      # 1: continue each variant from its last.ckpt (MAX_TIME and STEPS count from the start)
FIT_ARGS=${FIT_ARGS:-}   # more `bindweave fit` arguments, e.g. "--data.init_args.pin_memory false"
BINDWEAVE=${BINDWEAVE:-bindweave}
SPRITES_ARGS=${SPRITES_ARGS:-}  # more `bindweave data sprites` options, e.g. "--max-subjects 1" (an easier world)
RECIPE=${RECIPE:-reader} # reader: configs/sprites-reader.yaml (scenes drawn while training); cached: configs/sprites.yaml (shards, frozen towers)
RESULTS=${RESULTS:-outputs/sprites-results.md}
EXPORT=${EXPORT:-outputs/sprites-model}  # the full variant's (first seed's) int8 export, as models/sprites is made
BUDGET=${BUDGET:-}       # reader: each run's training time over all its chunks (DD:HH:MM:SS; the LR schedule spans it)
case "$RECIPE" in
  cached) BASE=configs/sprites.yaml; VARIANT_DIR=configs/sprites; PREFIX=outputs/sprites; SPLITS="train val test" ;;
  reader) BASE=configs/sprites-reader.yaml; VARIANT_DIR=configs/sprites-reader; PREFIX=outputs/sprites-reader
          SPLITS="test"; CACHE=0 ;;  # training scenes are drawn on the fly: only the test split is written
  *) echo "scripts/sprites.sh: RECIPE must be cached or reader, got '$RECIPE'" >&2; exit 2 ;;
esac
[ -n "$BUDGET" ] && [ "$RECIPE" != reader ] && { echo "scripts/sprites.sh: BUDGET needs RECIPE=reader" >&2; exit 2; }

for split in $SPLITS; do
  count=$(eval echo \${${split^^}})
  if [ ! -f "$DATA/$split/sprites.json" ]; then
    # shellcheck disable=SC2086  # SPRITES_ARGS is split into words on purpose
    $BINDWEAVE data sprites --out "$DATA/$split" --split "$split" --num-samples "$count" --seed "$SEED" \
      --workers "$CPUS" $SPRITES_ARGS
  fi
done

if [ "$CACHE" = 1 ]; then  # the full model's encoders; the ablations read the features they need
  parts=()
  for split in train val; do  # both splits at once, each in up to CACHE_PARTS processes
    shards=$(ls "$DATA/$split"/shard-*.tar | wc -l)
    cached=$( (ls "$DATA/cache/$split"/shard-*.tar 2>/dev/null || true) | wc -l)
    [ -f "$DATA/cache/$split/cache.json" ] && [ "$cached" = "$shards" ] && continue  # done (a rerun, RESUME=1)
    count=$((CACHE_PARTS < shards ? CACHE_PARTS : shards))  # a part without a shard is an error
    for ((i = 0; i < count; i++)); do
      OMP_NUM_THREADS=$CACHE_THREADS $BINDWEAVE data cache -c configs/sprites.yaml --urls "$DATA/$split/shard-*.tar" \
        --output "$DATA/cache/$split" --device "$CACHE_DEVICE" --part "$i/$count" --dtype "$CACHE_DTYPE" --no_progress &
      parts+=($!)
    done
  done
  for pid in "${parts[@]}"; do wait "$pid"; done
fi

REQUESTS="$DATA/test/requests.jsonl"
SIZES=()  # the reader recipe samples at the model's own size (32 x 32; eval resizes), not the requests' 64 x 64
[ "$RECIPE" = reader ] && SIZES=(--data.init_args.use_request_sizes false)

root_of() {  # variant seed -> run folder (the variant config's own for seed 0)
  local root=$PREFIX
  [ "$1" = full ] || root="$PREFIX-$1"
  if [ "${2:-0}" = 0 ]; then echo "$root"; else echo "$root-seed$2"; fi
}

run_variant() {  # variant seed [gpu]: train, then sample the test split
  local variant=$1 seed=$2 root
  [ -n "${3:-}" ] && export CUDA_VISIBLE_DEVICES=$3  # a parallel job runs in its own subshell
  root=$(root_of "$variant" "$seed")
  local configs=(-c "$BASE")
  [ "$variant" != full ] && configs+=(-c "$VARIANT_DIR/$variant.yaml")
  local extra=()
  [ "$RECIPE" = cached ] && extra+=(--data.init_args.urls "$DATA/train/shard-*.tar" --data.init_args.val_urls "$DATA/val/shard-*.tar")
  if [ "$RECIPE" = reader ] && { [ -n "$BUDGET" ] || [ -n "$STEPS" ]; }; then
    # The LR schedule is one item of trainer.callbacks: an overlay repeats the list with its budget
    # (BUDGET) or without one (STEPS: the schedule spans max_steps).
    mkdir -p "$root"
    python3 - "$BASE" "${BUDGET:-none}" > "$root/schedule.yaml" <<'PY'
import sys, yaml
callbacks = yaml.safe_load(open(sys.argv[1]))["trainer"]["callbacks"]
for callback in callbacks:
    if callback["class_path"] == "callbacks.LRSchedule":
        callback["init_args"]["budget"] = None if sys.argv[2] == "none" else sys.argv[2]
print(yaml.safe_dump({"trainer": {"callbacks": callbacks}}, sort_keys=False))
PY
    configs+=(-c "$root/schedule.yaml")
  fi
  # checkpoints follow the root (callbacks.RunCheckpoint)
  [ "$seed" = 0 ] || extra+=(--seed_everything "$seed" --trainer.default_root_dir "$root")
  [ -n "$STEPS" ] && extra+=(--trainer.max_steps "$STEPS")
  if [ "$CACHE" = 1 ]; then
    [ "$MEMORY" = 1 ] && configs+=(-c configs/sprites/in-memory.yaml) || extra+=(--data.init_args.cached true)
    extra+=(--model.feature_cache "$DATA/cache/train"
      --data.init_args.urls "$DATA/cache/train/shard-*.tar" --data.init_args.val_urls "$DATA/cache/val/shard-*.tar")
  fi
  [ "$CSV_LOG" = 1 ] && extra+=(--trainer.logger lightning.pytorch.loggers.CSVLogger
    --trainer.logger.init_args.save_dir "$root" --trainer.logger.init_args.flush_logs_every_n_steps 20)
  [ -n "$MAX_TIME" ] && extra+=(--trainer.max_time "$MAX_TIME")
  [ -n "$WORKERS" ] && [ "$CACHE$MEMORY" != 11 ] && extra+=(--data.init_args.num_workers "$WORKERS")
  [ "$RESUME" = 1 ] && [ -f "$root/checkpoints/last.ckpt" ] && extra+=(--ckpt_path "$root/checkpoints/last.ckpt")
  if [ -n "$SAMPLE_EVERY" ]; then  # learning curves: bindweave eval --data "$DATA/val/shard-*.tar" --run N=<run>/samples/step-N
    head -16 "$DATA/val/requests.jsonl" > "$DATA/val/requests-16.jsonl"
    extra+=(--trainer.callbacks+=callbacks.SamplingCallback --trainer.callbacks.every_n_steps="$SAMPLE_EVERY"
      --trainer.callbacks.requests="$DATA/val/requests-16.jsonl" --trainer.callbacks.output_dir="$root/samples"
      --trainer.callbacks.fps=8)
  fi
  # shellcheck disable=SC2086  # FIT_ARGS is split into words on purpose
  $BINDWEAVE fit "${configs[@]}" "${extra[@]}" $FIT_ARGS
  [ "$PREDICT" = 1 ] || return 0
  for scale in $GUIDANCE; do  # videos in <root>/cfg<scale>/videos
    $BINDWEAVE predict "${configs[@]}" -c configs/predict.yaml --data.init_args.requests "$REQUESTS" "${SIZES[@]}" \
      --data.init_args.batch_size "$PREDICT_BATCH" --model.sampling.guidance_scale "$scale" \
      --trainer.default_root_dir "$root/cfg$scale" --ckpt_path "$root/checkpoints/last.ckpt"
  done
}

jobs=()  # "variant seed"
for seed in $SEEDS; do for variant in $VARIANTS; do jobs+=("$variant $seed"); done; done
log_of() { if [ "$2" = 0 ]; then echo "outputs/sprites-logs/$1.log"; else echo "outputs/sprites-logs/$1-seed$2.log"; fi; }
mkdir -p outputs/sprites-logs
if [ "$PARALLEL" = 1 ]; then
  # Each process would start one torch thread per core: 8 runs on a 64-core host sat 7 minutes in
  # start-up at a load of 480 before the first step. Share the cores instead.
  count=${#jobs[@]}
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$((CPUS / count > 1 ? CPUS / count : 1))}
  gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  pids=()
  for i in "${!jobs[@]}"; do
    read -r variant seed <<< "${jobs[$i]}"
    gpu=""  # round-robin over the host's GPUs, unless the user chose them
    [ -z "${CUDA_VISIBLE_DEVICES:-}" ] && [ "$gpus" -gt 1 ] && gpu=$((i % gpus))
    run_variant "$variant" "$seed" "$gpu" > "$(log_of "$variant" "$seed")" 2>&1 &
    pids+=($!)
  done
  failed=0
  for i in "${!pids[@]}"; do
    wait "${pids[$i]}" || { failed=1; echo "run '${jobs[$i]}' (variant seed) failed: see outputs/sprites-logs/" >&2; }
  done
  [ "$failed" = 0 ] || exit 1
else
  for job in "${jobs[@]}"; do run_variant $job; done
fi
if [[ " $VARIANTS " == *" full "* ]]; then  # the model as shipped: models/sprites is this export of the full run
  $BINDWEAVE weights export "$(root_of full "${SEEDS%% *}")/checkpoints/last.ckpt" "$EXPORT" --int8
fi
[ "$PREDICT" = 1 ] || exit 0
baseline=()
[[ " $VARIANTS " == *" noref "* ]] && baseline=(--baseline noref)  # paired differences from the no-reference run
for scale in $GUIDANCE; do
  for seed in $SEEDS; do  # each seed's variants against that seed's noref
    runs=()
    for variant in $VARIANTS; do runs+=(--run "$variant=$(root_of "$variant" "$seed")/cfg$scale/videos"); done
    $BINDWEAVE eval --data "$DATA/test/shard-*.tar" --ground_truth "${runs[@]}" "${baseline[@]}" --by_subjects --workers "$CPUS" \
      --out "outputs/sprites-eval-cfg$scale-seed$seed.json" --table "outputs/sprites-eval-cfg$scale-seed$seed.md"
  done
done
# what each level of a metric means: the ground truth with one thing wrong
$BINDWEAVE eval --data "$DATA/test/shard-*.tar" --reference_points --workers "$CPUS" \
  --out outputs/sprites-reference-points.json --table outputs/sprites-reference-points.md
{
  echo "# Sprites results"
  echo
  echo "Test split of \`bindweave data sprites\` ($(wc -l < "$DATA/test/requests.jsonl") samples, seed $SEED); \`bindweave eval\` (docs/sprites.md)."
  echo "Recipe: \`$BASE\` (variants: \`$VARIANT_DIR/*.yaml\`)${BUDGET:+; training budget $BUDGET per run}."
  echo "Generated by scripts/sprites.sh on $(date -u +%Y-%m-%d) ($(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 || echo 'no GPU'))."
  for scale in $GUIDANCE; do
    for seed in $SEEDS; do
      echo
      echo "## Classifier-free guidance $scale, training seed $seed"
      echo
      cat "outputs/sprites-eval-cfg$scale-seed$seed.md"
    done
  done
  echo
  echo "## Reference points (the ground truth with one thing wrong; docs/sprites.md)"
  echo
  cat outputs/sprites-reference-points.md
  echo
  echo "| variant | training seed | training steps |"
  echo "| --- | ---: | ---: |"
  for job in "${jobs[@]}"; do  # a MAX_TIME budget gives each run its own step count
    read -r variant seed <<< "$job"
    steps=$(python3 -c "import sys, torch; print(torch.load(sys.argv[1], map_location='cpu', weights_only=False)['global_step'])" \
      "$(root_of "$variant" "$seed")/checkpoints/last.ckpt")
    echo "| $variant | $seed | $steps |"
  done
} > "$RESULTS.tmp"
mv "$RESULTS.tmp" "$RESULTS"  # whole or not at all
echo "Wrote $RESULTS"
