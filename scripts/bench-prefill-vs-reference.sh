#!/usr/bin/env bash
# Races `meet bench prefill` (the GGUF's own Q4_1/Q8_0 weights, and every weight in f32) against
# transformers (scripts/bench_prefill.py: f32, SDPA attention) on prompts of LENGTHS tokens, plus one
# greedy token each, alternating the programs ROUNDS times on this machine (2 threads each), and prints
# median seconds and the ratios. Needs the reference venv (../shared/reference/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
REF_HOME=${REF_HOME:-$HOME/.cache/meet-reference}
ROUNDS=${ROUNDS:-2}
LENGTHS=${LENGTHS:-1024,4096,8000}
OUT=runs/bench-prefill-$(date +%Y%m%d-%H%M%S)
mkdir -p "$OUT"
./scripts/fetch-model.sh >/dev/null
cargo build --release --quiet
for r in $(seq "$ROUNDS"); do
  echo "round $r/$ROUNDS (loadavg $(cut -d' ' -f1-3 /proc/loadavg))" >&2
  MEET_THREADS=2 ./target/release/meet bench prefill --lengths "$LENGTHS" --reps 1 2>/dev/null | grep '^{' >> "$OUT/meet.jsonl"
  env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE REF_HOME="$REF_HOME" "$REF_HOME/venv/bin/python" \
      scripts/bench_prefill.py --lengths "$LENGTHS" --reps 1 --threads 2 2>/dev/null | grep '^{' >> "$OUT/reference.jsonl"
  MEET_THREADS=2 ./target/release/meet bench prefill --weights f32 --lengths "$LENGTHS" --reps 1 2>/dev/null \
      | grep '^{' >> "$OUT/meet-f32.jsonl"
done
python3 - "$OUT" <<'PY'
import json, statistics, sys
out = sys.argv[1]
load = lambda f: [json.loads(l)["results"] for l in open(f"{out}/{f}")]
runs = {name: load(f) for name, f in [("meet", "meet.jsonl"), ("meet f32", "meet-f32.jsonl"), ("ref", "reference.jsonl")]}
med = lambda name, i: statistics.median(r[i]["seconds_median"] for r in runs[name])
print(f"{'tokens':>6} {'meet s':>8} {'meet f32 s':>10} {'transformers s':>14} {'ratio':>6} {'ratio f32':>9}   (ratio = transformers / meet)")
for i, row in enumerate(runs["ref"][0]):
    m, f, r = med("meet", i), med("meet f32", i), med("ref", i)
    print(f"{row['prompt_tokens']:6d} {m:8.2f} {f:10.2f} {r:14.2f} {r / m:5.2f}x {r / f:8.2f}x")
print(f"rounds: {len(runs['ref'])}; raw results in {out}")
PY
