"""Checks that a folder written by `meet convert` loads in transformers unchanged and computes
the same logits and token ids as the reference HF folder.

    ./target/release/meet convert models/SmolLM2-135M-Instruct.Q4_1.gguf --out /tmp/smollm2-meet
    $REF_HOME/venv/bin/python scripts/check_convert.py /tmp/smollm2-meet
"""
import os, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

torch.set_num_threads(2)
ours = sys.argv[1]
ref = os.path.join(os.environ.get("REF_HOME", os.path.expanduser("~/.cache/meet-reference")), "smollm2-135m-hf")
tok = AutoTokenizer.from_pretrained(ours)
ref_tok = AutoTokenizer.from_pretrained(ref)
model = AutoModelForCausalLM.from_pretrained(ours, dtype=torch.float32).eval()
ref_model = AutoModelForCausalLM.from_pretrained(ref, dtype=torch.float32).eval()
msgs = [{"role": "user", "content": "What is 12 + 30?"}]
chat = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
assert chat == ref_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False), "chat template differs"
worst = 0.0
for text in ["The capital of France is", chat, "Digits 1234567 and unicode: café 日本 🤗"]:
    ids = tok(text, return_tensors="pt").input_ids
    with torch.no_grad():
        d = (model(ids).logits - ref_model(ids).logits).abs().max().item()
    worst = max(worst, d)
    print(f"{len(ids[0]):3d} tokens: max |logit diff| = {d:.2e}")
print("tokenizer class:", type(tok).__name__, "| eos:", tok.eos_token, "| vocab:", len(tok))
print("OK" if worst < 1e-4 else "MISMATCH", f"worst {worst:.2e}")
