"""Loads what a two-dimension `meet` run saved (one PEFT folder per control) with transformers + PEFT
and checks that greedy continuations equal `meet generate`'s under single controls, under two LoRA
controls active together (PEFT's several active adapters: deltas summed) and under a weighted
combination (PEFT's `set_scale`), and for soft prompts under each control alone (PEFT has no
concatenation of several prompt-tuning adapters).

    $REF_HOME/venv/bin/python scripts/check_peft_dimensions.py \
        runs/two-dimensions/runs/meet-lora-seed0/final runs/two-dimensions/runs/meet-prompt-seed0/final

Prints one line per (folder, control, prompt) and exits non-zero on any difference.
"""
import json, os, subprocess, sys
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForCausalLM, AutoTokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
MEET = os.path.join(HERE, "..", "target", "release", "meet")
PROMPTS = ["The movie was", "I thought the acting", "This film is a", "By the end of it"]
NEW = 24


def meet_text(folder, control, prompt):
    out = subprocess.run([MEET, "generate", "--model", folder, "--control", control, "--prompt", prompt,
                          "--max-new-tokens", str(NEW)], check=True, capture_output=True, text=True)
    # The streamed text ends with a newline of its own.
    return out.stdout[:-1] if out.stdout.endswith("\n") else out.stdout


def greedy(model, tok, prompt):
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def greedy_forward(model, tok, prompt):
    """Greedy decoding by full forward passes (PEFT's generate path for prompt tuning is not used:
    the model's logits are what is compared)."""
    ids = tok(prompt, return_tensors="pt").input_ids
    new = []
    with torch.no_grad():
        for _ in range(NEW):
            x = torch.cat([ids, torch.tensor([new], dtype=ids.dtype)], 1) if new else ids
            nxt = int(model(input_ids=x).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            new.append(nxt)
    return tok.decode(new, skip_special_tokens=True)


def main(folders):
    bad = 0
    for folder in folders:
        spec = json.load(open(os.path.join(folder, "meet_controls.json")))
        dims = spec.get("dimensions")
        assert dims, f"{folder}: meet_controls.json has no dimensions"
        kind = "lora" if os.path.isdir(os.path.join(folder, "lora")) else "prompts"
        tok = AutoTokenizer.from_pretrained(folder)
        base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        names = [c for d in dims for c in d["controls"]] if isinstance(dims, list) else [c for cs in dims.values() for c in cs]
        model = None
        if kind == "lora":
            for name in names:
                path = os.path.join(folder, kind, name)
                if model is None:
                    model = PeftModel.from_pretrained(base, path, adapter_name=name).eval()
                else:
                    model.load_adapter(path, adapter_name=name)
        # (meet's --control, PEFT's active adapters with their scale)
        checks = [(n, {n: 1.0}) for n in names]
        if kind == "lora":
            checks += [("positive,concise", {"positive": 1.0, "concise": 1.0}),
                       ("negative,verbose", {"negative": 1.0, "verbose": 1.0}),
                       ("sentiment=positive:0.5,length=concise:1.0", {"positive": 0.5, "concise": 1.0})]
        for control, active in checks:
            if kind == "lora":
                model.base_model.set_adapter(list(active))
                for m in model.modules():
                    if isinstance(m, LoraLayer):
                        for a, w in active.items():
                            if a in m.lora_A:
                                m.set_scale(a, w)
            else:
                # One prompt-tuning adapter per model, loaded alone.
                fresh = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
                model = PeftModel.from_pretrained(fresh, os.path.join(folder, kind, control)).eval()
            for p in PROMPTS:
                want = meet_text(folder, control, p)
                got = greedy(model, tok, p) if kind == "lora" else greedy_forward(model, tok, p)
                same = want == got
                bad += not same
                print(f"{os.path.basename(os.path.dirname(folder.rstrip('/')))} {control!r} {p!r}: "
                      f"{'same' if same else 'DIFFERENT'}{'' if same else f' meet={want!r} peft={got!r}'}")
    print(f"{bad} differences")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main(sys.argv[1:])
