"""PEFT adapters saved by Python PEFT 0.21 on the tiny Llama fixture, with the logits PEFT computes
through them, so that `meet` is checked to load PEFT's folders and give the same numbers (tests/peft.rs).

    $REF_HOME/venv/bin/python scripts/make_peft_fixtures.py

Writes tests/fixtures/peft-lora/ (adapter "default" at the root, "bad" in bad/, as PEFT saves several
adapters), tests/fixtures/peft-prompt/ and tests/fixtures/peft_expected.json; and tests/fixtures/peft-lora-order/
(target_modules=["q_proj", "v_proj", "down_proj"], which PEFT saves as a set, in its own order) with its
logits in peft_expected.json as "lora_order".
"""
import json, os
import torch
from peft import LoraConfig, PromptTuningConfig, PromptTuningInit, get_peft_model
from transformers import AutoModelForCausalLM

torch.manual_seed(0)
HERE = os.path.dirname(os.path.abspath(__file__))
FIX = os.path.join(HERE, "..", "tests", "fixtures")
BASE = os.path.join(FIX, "tiny-llama3")
ids = torch.tensor([[5, 17, 3, 60, 41, 9, 2, 33, 33, 12, 50, 7]])
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def rows(t):
    return [[round(float(v), 6) for v in r] for r in t]


out = {"ids": ids[0].tolist()}
model = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32).eval()
with torch.no_grad():
    out["base"] = rows(model(ids).logits[0])

lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=ALL, lora_dropout=0.0,
                                        task_type="CAUSAL_LM"))
lora.add_adapter("bad", LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], use_rslora=True,
                                   lora_dropout=0.0, task_type="CAUSAL_LM"))
with torch.no_grad():
    for n, p in lora.named_parameters():
        if "lora_" in n:  # B starts at zero; trained-looking values make every adapter path count
            p.normal_(0.0, 0.3)
lora.eval()
with torch.no_grad():
    for name in ["default", "bad"]:
        lora.set_adapter(name)
        out[f"lora_{name}"] = rows(lora(ids).logits[0])
lora.save_pretrained(os.path.join(FIX, "peft-lora"), selected_adapters=["default", "bad"])

model = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32).eval()
order = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                         lora_dropout=0.0, task_type="CAUSAL_LM"))
with torch.no_grad():
    for n, p in order.named_parameters():
        if "lora_" in n:
            p.normal_(0.0, 0.3)
order.eval()
with torch.no_grad():
    out["lora_order"] = rows(order(ids).logits[0])
order.save_pretrained(os.path.join(FIX, "peft-lora-order"))
saved = json.load(open(os.path.join(FIX, "peft-lora-order", "adapter_config.json")))["target_modules"]
print("peft-lora-order: PEFT saved target_modules as", saved)

model = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32).eval()
pt = get_peft_model(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3,
                                              prompt_tuning_init=PromptTuningInit.RANDOM)).eval()
with torch.no_grad():
    logits = pt(ids).logits[0]  # (n + t, v): the virtual positions come first
    out["prompt"] = rows(logits[3:])
pt.save_pretrained(os.path.join(FIX, "peft-prompt"))
with open(os.path.join(FIX, "peft_expected.json"), "w") as f:
    json.dump(out, f)
for d in ["peft-lora", "peft-prompt", "peft-lora-order"]:  # PEFT writes a model card; nothing reads it
    os.remove(os.path.join(FIX, d, "README.md"))
print("wrote", FIX)
