#!/usr/bin/env bash
# Issue 19's GPU run in one call (~8 min on an H200): train the small Mixtral-style MoE on the corpus
# (hare bench train-moe), then the accuracy table (hare bench accuracy: every density x method x block width and the
# unstructured / 2:4 references, evaluated in float32) and the time of the reconstruct pruner on a random
# Mixtral-8x7B-sized layer. Writes to $OUT: accuracy_$NAME.json (with GPU, date, commit), .png (perplexity vs
# density), .md (the README table), train_info.json and accuracy.log. The trained weights stay in $MODEL_DIR.
#
#   bash scripts/fetch_corpus.sh            # once, on a machine with apt-get: builds .corpus/ (carry it)
#   bash scripts/accuracy_run.sh            # on the GPU machine
#   HARE_ACCURACY_SIZE=toy bash scripts/accuracy_run.sh   # the same steps at toy size on a CPU (~1 min)
#
# Env: OUT (default ./device_out), ACCURACY_ARGS (extra `hare bench accuracy` options), NAME (default pydoc-moe_h200, toy for the toy size), CORPUS (default .corpus),
# MODEL_DIR (default a fresh temporary folder), PYTHON (default python3), TRAIN_SECONDS (training cap, default 240),
# HARE_COMMIT (the commit under test where the tree travels without .git).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/device_out}
CORPUS=${CORPUS:-.corpus}
PY=${PYTHON:-python3}
SIZE=${HARE_ACCURACY_SIZE:-small}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
export HARE_COMMIT=${HARE_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
[ -f "$CORPUS/train.txt" ] || { echo "no corpus in $CORPUS: run scripts/fetch_corpus.sh and carry .corpus" >&2; exit 1; }
MODEL_DIR=${MODEL_DIR:-$(mktemp -d /tmp/hare-accuracy-model.XXXXXX)}
case "$SIZE" in
  small) NAME=${NAME:-pydoc-moe_h200}
         TRAIN=(--size small --max-seconds "${TRAIN_SECONDS:-240}")
         ACC=(--valid-tokens 65536 --calib-tokens 65536 --time-layer mixtral) ;;
  toy)   NAME=${NAME:-toy}
         TRAIN=(--size toy --steps 200)
         ACC=(--valid-tokens 4096 --calib-tokens 4096 --time-layer toy) ;;
  *) echo "HARE_ACCURACY_SIZE: expected small or toy, got $SIZE" >&2; exit 2 ;;
esac
log=$OUT/accuracy.log
echo "commit $HARE_COMMIT, size $SIZE, model in $MODEL_DIR" | tee "$log"
start=$SECONDS
"$PY" -m hare.cli bench train-moe "$CORPUS" "$MODEL_DIR" --seed 0 "${TRAIN[@]}" 2>&1 | tee -a "$log"
cp "$MODEL_DIR/train_info.json" "$OUT/"
echo "training done after $((SECONDS - start)) s" | tee -a "$log"
# ACCURACY_ARGS: more `hare bench accuracy` options (later ones win), e.g. "--densities 0.25,0.1 --bws 16"
"$PY" -m hare.cli bench accuracy "$MODEL_DIR" --corpus "$CORPUS" --out-json "$OUT/accuracy_$NAME.json" "${ACC[@]}" \
    ${ACCURACY_ARGS:-} 2>&1 | tee -a "$log"
echo "all done after $((SECONDS - start)) s" | tee -a "$log"
