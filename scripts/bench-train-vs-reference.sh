#!/usr/bin/env bash
# Races `meet bench train` against the Python reference (../shared/reference/bench_train.py: its
# fixed 4x128 batch of SmolLM2, f32, AdamW; full fine-tuning, LoRA r 64 on all projections, prompt
# tuning with 20 virtual tokens), alternating the two programs ROUNDS times per mode on this
# machine, and prints medians, ratios and peak memory. Needs the reference venv (its setup.sh).
# GPT=1: the same race on a random GPT-Neo of gpt-neo-125m's shape (scripts/bench_gpt_neo.py makes
# it once under runs/gpt-neo-125m-random; both programs train the same weights on the same batch).
# DTYPES="f32 bf16": each round runs every mode in each precision (bf16: meet's autocast against
# PyTorch's torch.autocast(bfloat16); both keep f32 weights and AdamW state).
set -euo pipefail
cd "$(dirname "$0")/.."
REF=${REF:-$(cd ../shared/reference && pwd)}
REF_HOME=${REF_HOME:-$HOME/.cache/meet-reference}
ROUNDS=${ROUNDS:-1}
STEPS=${STEPS:-4}
MODES=${MODES:-full lora prompt}
DTYPES=${DTYPES:-f32}
OUT=runs/bench-train-$(date +%Y%m%d-%H%M%S)
mkdir -p "$OUT"
./scripts/fetch-model.sh >/dev/null
cargo build --release --quiet
PY_REF() { env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE REF_HOME="$REF_HOME" "$REF_HOME/venv/bin/python" "$@"; }
if [ "${GPT:-0}" = 1 ]; then
  NEO=runs/gpt-neo-125m-random
  [ -f "$NEO/model.safetensors" ] || PY_REF scripts/bench_gpt_neo.py make "$NEO" >&2
  # A tokenizer for meet to load (the batch is token ids; the bench never tokenises).
  cp tests/fixtures/tiny-gpt2/vocab.json tests/fixtures/tiny-gpt2/merges.txt "$NEO/"
  BATCH=tests/fixtures/lm_batch_4x128.json
fi
if [ "${GPT:-0}" = 1 ] && [ "$DTYPES" != f32 ]; then echo "GPT=1 races f32 only (scripts/bench_gpt_neo.py has no autocast)" >&2; exit 2; fi
for r in $(seq "$ROUNDS"); do
  for mode in $MODES; do
    for dtype in $DTYPES; do
      echo "round $r/$ROUNDS $mode $dtype (loadavg $(cut -d' ' -f1-3 /proc/loadavg))" >&2
      if [ "${GPT:-0}" = 1 ]; then
        PY_REF scripts/bench_gpt_neo.py "$mode" "$NEO" "$BATCH" --steps "$STEPS" --warmup 1 2>/dev/null \
            | sed -n 's/^RESULT //p' >> "$OUT/reference.jsonl"
        ./target/release/meet bench train --mode "$mode" --model "$NEO" --steps "$STEPS" --warmup 1 \
            --batch "$BATCH" --dtype "$dtype" 2>/dev/null | grep '^{' >> "$OUT/meet.jsonl"
      else
        PY_REF "$REF/bench_train.py" "$mode" --steps "$STEPS" --warmup 1 --dtype "$dtype" 2>/dev/null \
            | sed -n 's/^RESULT //p' >> "$OUT/reference.jsonl"
        ./target/release/meet bench train --mode "$mode" --steps "$STEPS" --warmup 1 \
            --batch "$REF/data/lm_batch_4x128.json" --dtype "$dtype" 2>/dev/null | grep '^{' >> "$OUT/meet.jsonl"
      fi
    done
  done
done
python3 - "$OUT" <<'PY'
import json, statistics, sys
out = sys.argv[1]
ref = [json.loads(l) for l in open(f"{out}/reference.jsonl")]
ours = [dict(json.loads(l)["result"], dtype=json.loads(l).get("dtype", "f32")) for l in open(f"{out}/meet.jsonl")]
med = statistics.median
print(f"{'mode':13} {'meet tok/s':>10} {'ref tok/s':>10} {'ratio':>6} {'meet s/step (fwd/bwd/opt)':>28} "
      f"{'ref s/step (fwd/bwd/opt)':>26} {'meet MiB':>9} {'ref MiB':>8}")
for mode, dtype in dict.fromkeys((o["mode"], o["dtype"]) for o in ours):
    o = [x for x in ours if x["mode"] == mode and x["dtype"] == dtype]
    r = [x for x in ref if x["bench"] == f"train_{mode}" and x.get("dtype", "f32") == dtype]
    mt, rt = med(x["tokens_per_s_median"] for x in o), med(x["tokens_per_s_median"] for x in r)
    ms = "%.2f (%.2f/%.2f/%.2f)" % tuple(med(x[k] for x in o) for k in ["sec_per_step_median", "fwd_median", "bwd_median", "opt_median"])
    rs = "%.2f (%.2f/%.2f/%.2f)" % (med(x["sec_per_step"]["median"] for x in r), *(med(x[k] for x in r) for k in ["fwd_median", "bwd_median", "opt_median"]))
    label = f"{mode} {dtype}"
    print(f"{label:13} {mt:10.1f} {rt:10.1f} {mt / rt:5.2f}x {ms:>28} {rs:>26} "
          f"{med(x['peak_rss_mib'] for x in o):9.0f} {med(x['peak_rss_mib_self'] for x in r):8.0f}")
    print(f"    rounds meet/ref: {', '.join('%.2f' % (a['tokens_per_s_median'] / b['tokens_per_s_median']) for a, b in zip(o, r))}")
    print(f"              losses meet {o[0]['losses'][:3]}  ref {r[0]['losses'][:3]}")
print(f"rounds: {len(ours)}; raw results in {out}")
PY
