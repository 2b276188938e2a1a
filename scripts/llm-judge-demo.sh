#!/usr/bin/env bash
# The LLM judge end to end through `meet serve` (README "meet eval, meet compare"): SmolLM2 served as
# the judge, MEET-LoRA's `good` responses against its `bad` ones on examples/data/prompts.jsonl.
# Needs runs/meet-lora/final (`meet train examples/meet-lora.toml`). Output: the compare line.
set -euo pipefail
cd "$(dirname "$0")/.."
meet=./target/release/meet
work=$(mktemp -d)
for c in good bad; do
  "$meet" eval --model runs/meet-lora/final --control $c --prompts examples/data/prompts.jsonl --chat \
    --samples 2 --max-new-tokens 48 --temperature 0.7 --out "$work/$c.jsonl" 2>/dev/null >/dev/null
done
"$meet" serve --model models/SmolLM2-135M-Instruct.Q4_1.gguf --served-model-name smol --addr 127.0.0.1:0 \
  2>"$work/serve.log" &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
for _ in $(seq 100); do grep -q "on http://" "$work/serve.log" && break; sleep 0.2; done
url=$(grep -o "http://[0-9.:]*/v1" "$work/serve.log")
export MEET_JUDGE_CACHE="$work/cache"
for pass in first rerun; do
  echo "== $pass"
  "$meet" compare "$work/good.jsonl" "$work/bad.jsonl" --judge "llm:$url#smol" --out "$work/judgements.jsonl" \
    2>&1 >/dev/null | grep "LLM judge" | sed "s|$work/||g; s|$url|http://127.0.0.1:PORT/v1|"
done
echo "== first answers"
python3 -c "
import json,sys
for l in list(open('$work/judgements.jsonl'))[:2]:
    j=json.loads(l); print(repr(j['answers'][0][:300]), '->', j['positions'][0])
"
