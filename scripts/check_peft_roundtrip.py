"""Loads the LoRA adapters and soft prompts that `meet` trained and saved (tests/fixtures/meet-trained*/,
written by `MEET_WRITE_FIXTURES=1 cargo test --release --test training adapters_trained_here`) with
Python PEFT 0.21 on the tiny Llama, GPT-Neo and GPT-2 fixtures, and records PEFT's logits for
tests/training.rs.

    $REF_HOME/venv/bin/python scripts/check_peft_roundtrip.py
"""
import json, os
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))
FIX = os.path.join(HERE, "..", "tests", "fixtures")
for fixture, base_name in [("meet-trained", "tiny-llama3"), ("meet-trained-gpt-neo", "tiny-gpt-neo"),
                           ("meet-trained-gpt2", "tiny-gpt2")]:
    D = os.path.join(FIX, fixture)
    meet = json.load(open(os.path.join(D, "meet_logits.json")))
    ids = torch.tensor([meet["ids"]])
    out = {"ids": meet["ids"]}
    for kind in ["lora", "prompt"]:
        base = AutoModelForCausalLM.from_pretrained(os.path.join(FIX, base_name), dtype=torch.float32).eval()
        model = PeftModel.from_pretrained(base, os.path.join(D, kind)).eval()
        with torch.no_grad():
            logits = model(ids).logits[0]
        if kind == "prompt":
            logits = logits[model.peft_config["default"].num_virtual_tokens:]
        out[kind] = [[round(float(v), 6) for v in r] for r in logits]
        diff = (logits - torch.tensor(meet["meet_logits"][kind])).abs().max().item()
        print(f"{fixture} {kind}: max |logit diff| PEFT vs meet = {diff:.2e}")
    json.dump(out, open(os.path.join(D, "peft_logits.json"), "w"))
