"""Loads a `meet train` reward model (method = "reward") with transformers as
LlamaForSequenceClassification and re-scores the responses of a `meet eval --judge reward:FOLDER
--out FILE` run, tokenised as meet does (prompt with the tokenizer's special tokens, response
without, then EOS); prints the largest difference. Usage (reference venv):

    python scripts/check_reward_model.py runs/reward/final /tmp/rm_eval.jsonl
"""
import json, sys
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

folder, samples = sys.argv[1], sys.argv[2]
tok = AutoTokenizer.from_pretrained(folder)
model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32).eval()
worst = 0.0
rows = [json.loads(l) for l in open(samples)]
for r in rows:
    ids = tok(r["prompt"])["input_ids"] + tok(r["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    with torch.no_grad():
        hf = model(torch.tensor([ids])).logits[0, 0].item()
    worst = max(worst, abs(hf - r["score"]))
print(f"{len(rows)} responses: largest |transformers - meet| reward difference {worst:.2e}")
sys.exit(0 if worst < 1e-3 else 1)
