#!/usr/bin/env bash
# bf16 mixed precision against f32 over a longer run on real text: STEPS (200) optimizer steps of
# full SFT and of LoRA SFT (examples/sft.toml, examples/sft-lora.toml) on the first 1600 movie-review
# snippets of the VADER data (scripts/fetch-data.sh), batch 8, seed 0, each in f32 and in bf16.
# Prints the mean loss of the last 20 steps of each run and bf16's relative difference to f32.
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${STEPS:-200}
OUT=runs/bf16-long-$(date +%Y%m%d-%H%M%S)
mkdir -p "$OUT"
./scripts/fetch-model.sh >/dev/null
./scripts/fetch-data.sh >/dev/null
cargo build --release --quiet
python3 - "$OUT/reviews.jsonl" <<'PY'
import json, sys
rows = [l.rstrip("\n").split("\t", 2)[2] for l in open("data/sentiment/movieReviewSnippets_GroundTruth.txt", encoding="utf-8", errors="replace") if l.count("\t") >= 2]
with open(sys.argv[1], "w") as f:
    for t in rows[:1600]:
        f.write(json.dumps({"text": t}) + "\n")
PY
for cfg in sft sft-lora; do
  for dtype in f32 bf16; do
    ./target/release/meet train "examples/$cfg.toml" --set "data.train=\"$OUT/reviews.jsonl\"" \
      --set "output_dir=\"$OUT/$cfg-$dtype\"" --set train.max_steps="$STEPS" --set train.batch_size=8 \
      --set train.save_every=0 --set "train.dtype=\"$dtype\"" 2>&1 | tail -1
  done
done
python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
def tail(run):
    losses = [json.loads(l)["loss"] for l in open(f"{out}/{run}/metrics.jsonl")]
    return sum(losses[-20:]) / len(losses[-20:]), len(losses)
for cfg in ["sft", "sft-lora"]:
    (a, n), (b, _) = tail(f"{cfg}-f32"), tail(f"{cfg}-bf16")
    print(f"{cfg:9} {n} steps: mean loss of the last 20 steps f32 {a:.4f}, bf16 {b:.4f} ({100 * (b - a) / a:+.2f}%)")
print(f"runs in {out}")
PY
