"""Loads a `meet train` control-token output folder with transformers and checks that it is an
ordinary HF model: the control tokens are special tokens of the tokenizer (never split), the
embedding matrix has their rows, and greedy generation under `<|good|>` / `<|bad|>` gives the same
tokens as `meet generate --control`. Usage (reference venv):

    python scripts/check_control_token.py runs/control-token/final
"""
import json, subprocess, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

folder = sys.argv[1]
spec = json.load(open(f"{folder}/meet_controls.json"))
tok = AutoTokenizer.from_pretrained(folder)
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
prompt = "How do I boil an egg?"
messages = [{"role": "user", "content": prompt}]
ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
if isinstance(ids, dict) or hasattr(ids, "input_ids"):
    ids = ids["input_ids"]
ok = True
for name, marker in zip(spec["names"], spec["markers"]):
    tid = tok.convert_tokens_to_ids(marker)
    assert tok(marker, add_special_tokens=False)["input_ids"] == [tid], f"{marker} is split"
    assert tid < model.get_input_embeddings().weight.shape[0]
    with torch.no_grad():
        out = model.generate(torch.tensor([[tid] + list(ids)]), max_new_tokens=24, do_sample=False)
    hf = tok.decode(out[0, len(ids) + 1:], skip_special_tokens=True)
    ours = subprocess.run(["./target/release/meet", "generate", "--model", folder, "--chat", "--control", name,
                           "--max-new-tokens", "24", "--prompt", prompt], capture_output=True, text=True, check=True).stdout.strip()
    same = hf.strip() == ours
    ok &= same
    print(f"{name} ({marker} = id {tid}): transformers {hf.strip()!r}\n{'':>{len(name)}}   meet         {ours!r}  {'same' if same else 'DIFFERENT'}")
sys.exit(0 if ok else 1)
