#!/usr/bin/env bash
# How the issue #21 ablation runs were made on a lent GPU machine (docs/results.md): train one
# sprites-reader variant from scratch on a step schedule (or resume it, RESUME=1), export it int8, and
# sample the test requests into an .npz (no PyAV needed there); SHIPPED=1 also samples models/sprites.
# On your own machine `STEPS=4776 VARIANTS=no-slots scripts/sprites.sh` does the same and scores it.
#   STEPS=4776 MAXT=00:00:08:00 VARIANT=no-slots SEED=0 OUT=out bash benchmarks/device/sprites_variant.sh
# Here the scores: python benchmarks/sprites_recipe.py videos --npz out/no-slots-seed0.npz --out V, then
# bindweave eval --data "data/sprites/test/shard-*.tar" --ground_truth --run no-slots=V --by_subjects
# WHEELS: wheels of the packages the machine lacks (installed into /tmp/site); STUB: a stand-in `av`;
# REQUESTS: the test split's requests.jsonl with its references/ beside it (bindweave data sprites --split test).
set -uo pipefail
WHEELS=${WHEELS:-.gpu/speed/whl}; STUB=${STUB:-.gpu/sprites/stub}; REQUESTS=${REQUESTS:-.gpu/sprites/testreq/requests.jsonl}
OUT=${OUT:-outputs/device}; mkdir -p "$OUT"
[ -d "$WHEELS" ] && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD:$PWD/$STUB PYTHONUNBUFFERED=1
VARIANT=${VARIANT:-full}; SEED=${SEED:-0}; STEPS=${STEPS:-4776}; MAXT=${MAXT:-00:00:08:00}; RESUME=${RESUME:-0}
SHIPPED=${SHIPPED:-0}; TRAIN=${TRAIN:-1}
tag=$VARIANT-seed$SEED
root=/tmp/runs/$tag
mkdir -p "$root"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
configs=(-c configs/sprites-reader.yaml)
[ "$VARIANT" != full ] && configs+=(-c "configs/sprites-reader/$VARIANT.yaml")
python3 - > "$root/schedule.yaml" <<'PY'
import yaml
callbacks = yaml.safe_load(open("configs/sprites-reader.yaml"))["trainer"]["callbacks"]
for callback in callbacks:
    if callback["class_path"] == "callbacks.LRSchedule":
        callback["init_args"]["budget"] = None   # the schedule spans max_steps (STEPS), the same on any card
print(yaml.safe_dump({"trainer": {"callbacks": callbacks}}, sort_keys=False))
PY
configs+=(-c "$root/schedule.yaml")
extra=(--seed_everything "$SEED" --trainer.default_root_dir "$root" --trainer.max_steps "$STEPS" --trainer.max_time "$MAXT"
       --data.init_args.num_workers 12)
[ "$RESUME" = 1 ] && extra+=(--ckpt_path "$root/checkpoints/last.ckpt")
if [ "$TRAIN" = 1 ]; then
  nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader,nounits -lms 1000 > "$OUT/util-$tag.txt" &
  smi=$!
  python3 benchmarks/sprites_recipe.py fit --json "$OUT/fit-$tag.json" -- "${configs[@]}" "${extra[@]}" ${FIT_EXTRA:-} > "$OUT/fit-$tag.log" 2>&1
  echo "fit rc=$?"; kill $smi
  grep -v "it/s\]$" "$OUT/fit-$tag.log" | tail -15
fi
python3 -m bindweave.cli weights export "$root/checkpoints/last.ckpt" "$root/export" --int8 2>&1 | tail -3
tar -C "$root" -cf "$OUT/$tag-model.tar" export
python3 benchmarks/sprites_recipe.py sample --model "$root/export" --requests "$REQUESTS" \
  --npz "$OUT/$tag.npz" --batch-size 256 2>&1 | tail -3
if [ "$SHIPPED" = 1 ]; then
  python3 benchmarks/sprites_recipe.py sample --model models/sprites --requests "$REQUESTS" \
    --npz "$OUT/full-seed0-shipped.npz" --batch-size 256 2>&1 | tail -3
fi
ls -la "$OUT"
