#!/usr/bin/env bash
# ProLong in miniature: does this code's stage chain extend a model's usable context?
#
#   bash examples/miniature/run.sh            # the full experiment (docs/miniature.md)
#   MINIATURE_SCALE=ci bash examples/miniature/run.sh   # the plumbing only, a minute or two
#
# Per seed: pre-train the `tiny` model at 512 tokens (RoPE base 10,000), then continue it from
# that checkpoint at 4,096 tokens in four arms with the same token budget (continue.yaml):
#   a  RoPE base unchanged (10,000)
#   b  RoPE base raised as ProLong raises it (500,000: base / length as 8M / 64K), 60% long /
#      40% short data                                          (the recipe itself)
#   c  as b with long data only
#   d  as b trained at 8,192 tokens, 2x the longest evaluation length (base 1,000,000)
# Every run and the short checkpoint are then scored by tools/evaluate.py at 512, 1K, 2K and 4K
# tokens; examples/miniature/report.py writes the table and the picture.
#
# Environment: MINIATURE_SCALE full|ci, MINIATURE_SEEDS ("1 2"), MINIATURE_JOBS (runs side by
# side, one single-threaded process each: 2, one per core), MINIATURE_OUT (runs/miniature/<scale>),
# MINIATURE_DOCS (where miniature.md/.png go: docs), MINIATURE_CORPUS (runs/miniature/corpus).
# Run it again to resume: finished runs and evaluations are kept.
set -euo pipefail
cd "$(dirname "$0")/../.."

SCALE=${MINIATURE_SCALE:-full}
SEEDS=${MINIATURE_SEEDS:-"1 2"}
JOBS=${MINIATURE_JOBS:-2}
OUT=${MINIATURE_OUT:-runs/miniature/$SCALE}
DOCS=${MINIATURE_DOCS:-docs}
PY=${PYTHON:-python}
export MINIATURE_CORPUS=${MINIATURE_CORPUS:-runs/miniature/corpus}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# What the scales change: steps, rows per step and how many evaluation examples; never the
# lengths, the bases, the data or the learning rates.
case "$SCALE" in
  full) ROWS=4                       # 4,096-token rows per continuation step
        PRE=()                       # the recipes' own: 160 steps x 16 x 512 tokens
        CONT=()                      # 32 steps x 4 x 4,096 tokens
        EVAL=(--depths 0 0.25 0.5 0.75 1 --examples 2)
        VAL_ROWS=6 ;;
  ci)   ROWS=2
        PRE=(training.train_steps=2 training.global_batch_size=2 evaluation.interval=2)
        CONT=(training.train_steps=2 evaluation.interval=2)
        EVAL=(--depths 0.5 --examples 1)
        VAL_ROWS=1 ;;
  *)    echo "error: MINIATURE_SCALE=$SCALE: choose full or ci" >&2; exit 2 ;;
esac
ARMS="a b c d"
arm_overrides() {
  case "$1" in
    a) echo "model.rotary_base=10000 training.global_batch_size=$ROWS" ;;
    b) echo "training.global_batch_size=$ROWS" ;;
    c) echo "data.mixture=examples/miniature/mix_long_only.yaml training.global_batch_size=$ROWS" ;;
    d) echo "training.seq_length=8192 training.global_batch_size=$((ROWS / 2))" \
            "model.rotary_base=1000000 evaluation.position_buckets=[512,1024,2048,4096]" \
            "evaluation.long_document_tokens=4096" ;;
  esac
}

# One phase: its command's output appended to LOG (a resumed run keeps its history), its wall
# and CPU seconds to the seed's timings.
timed() {  # timed TIMINGS PHASE LOG command...
  local timings=$1 phase=$2 log=$3; shift 3
  local timer=()  # GNU time when installed (Debian/Ubuntu package `time`); else untimed
  [ -x /usr/bin/time ] && timer=(/usr/bin/time -f "$phase\t%e\t%U\t%S" -a -o "$timings")
  if ! "${timer[@]}" "$@" >>"$log" 2>&1; then
    echo "error: $phase failed; its log: $log" >&2
    tail -n 5 "$log" >&2
    return 1
  fi
}

# The project's evaluation of one checkpoint, at the same 4,096-token validation rows for every
# run: json_kv at 512-4K (niah_mk's fixed text alone takes 539 byte tokens: 1K-4K) with the
# validation loss per domain and by position; then the recall documents alone by position.
evaluate() {  # evaluate RUN_DIR OUT_DIR TIMINGS NAME
  local run=$1 out=$2 timings=$3 name=$4
  local common=(--checkpoint "$run" --template plain --no-plots "${EVAL[@]}"
                training.seq_length=4096 evaluation.position_buckets=[512,1024,2048]
                evaluation.long_document_tokens=4096 evaluation.validation_rows=$VAL_ROWS)
  mkdir -p "$out"
  [ -f "$out/all/results.json" ] || timed "$timings" "eval_$name" "$out/all.log" \
    "$PY" tools/evaluate.py "${common[@]}" --validation --tasks json_kv \
      --lengths 512 1024 2048 4096 --out "$out/all"
  [ -f "$out/recall_docs/results.json" ] || timed "$timings" "eval_${name}_recall_docs" \
    "$out/recall_docs.log" "$PY" tools/evaluate.py "${common[@]}" --validation \
      --tasks niah_mk --lengths 1024 2048 4096 --out "$out/recall_docs" \
      evaluation.validation_mixture=examples/miniature/mix_validation_recall.yaml
}

pretrain() {  # pretrain SEED: the short model of this seed
  local seed=$1 dir=$OUT/seed$1
  mkdir -p "$dir"
  echo "seed $seed: pre-training at 512 tokens ($dir/pretrain.log)"
  timed "$dir/timings.tsv" pretrain "$dir/pretrain.log" "$PY" -m megatron_prolong.train \
    examples/miniature/pretrain.yaml run_dir="$dir/pretrain" training.seed="$seed" "${PRE[@]}"
}

arm() {  # arm SEED ARM: continue the seed's short model as the arm says, then evaluate it
  local seed=$1 arm=$2 dir=$OUT/seed$1
  echo "seed $seed: arm $arm ($dir/arm_$arm.log)"
  # shellcheck disable=SC2046  # the overrides are words
  timed "$dir/timings.tsv" "arm_$arm" "$dir/arm_$arm.log" "$PY" -m megatron_prolong.train \
    examples/miniature/continue.yaml run_dir="$dir/arm_$arm" checkpoint.load="$dir/pretrain" \
    training.seed="$seed" $(arm_overrides "$arm") "${CONT[@]}"
  evaluate "$dir/arm_$arm" "$dir/eval/arm_$arm" "$dir/timings.tsv" "arm_$arm"
}

limited() {  # run "$@" in the background once fewer than JOBS runs are going
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n || true; done
  "$@" &
}
finished() {  # finished RUN...: wait for every run, then check that each one's results exist
  wait || true
  local missing=0 run
  for run in "$@"; do
    if [ ! -f "$OUT/$run/recall_docs/results.json" ]; then
      echo "error: $OUT/$run has no results: see the logs in $OUT/${run%%/*}/" >&2
      missing=1
    fi
  done
  [ "$missing" = 0 ] || exit 1
}

mkdir -p "$OUT"
START=$(date +%s)
LOAD=$(cut -d' ' -f1-3 /proc/loadavg)
"$PY" examples/miniature/corpus.py "$MINIATURE_CORPUS"
for seed in $SEEDS; do limited pretrain "$seed"; done
wait || true
for seed in $SEEDS; do
  [ -e "$OUT/seed$seed/pretrain/checkpoints/latest" ] ||
    { echo "error: pre-training of seed $seed failed: $OUT/seed$seed/pretrain.log" >&2; exit 1; }
done
for seed in $SEEDS; do
  limited evaluate "$OUT/seed$seed/pretrain" "$OUT/seed$seed/eval/short" \
    "$OUT/seed$seed/timings.tsv" short
  for a in $ARMS; do limited arm "$seed" "$a"; done
done
finished $(for seed in $SEEDS; do for run in short arm_a arm_b arm_c arm_d; do
             echo "seed$seed/eval/$run"; done; done)

END=$(date +%s)
cat >"$OUT/run.json" <<EOF
{"scale": "$SCALE", "seeds": "$SEEDS", "jobs": $JOBS, "wall_seconds": $((END - START)),
 "load_average_at_start": "$LOAD", "cpus": $(nproc --all),
 "finished": "$(date -u +%Y-%m-%dT%H:%MZ)",
 "command": "MINIATURE_SCALE=$SCALE bash examples/miniature/run.sh"}
EOF
"$PY" examples/miniature/report.py "$OUT" --markdown "$DOCS/miniature.md" \
  --picture "$DOCS/miniature.png"
