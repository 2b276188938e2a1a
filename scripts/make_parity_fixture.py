"""Writes tests/fixtures/smollm2_parity.json: transformers' logits and the HF tokenizer's ids for
SmolLM2-135M-Instruct, which the Rust tests compare against without Python.

Run with the reference venv (../shared/reference/setup.sh builds it, with the dequantized HF folder):
    $REF_HOME/venv/bin/python scripts/make_parity_fixture.py

Model: the reference's HF folder, i.e. the Q4_1 GGUF dequantized to f32 by transformers + gguf-py.

Tokenizer: SmolLM2's own tokenizer.json splits every digit into its own pre-token
(pre_tokenizer = Sequence[Digits(individual_digits=True), ByteLevel(add_prefix_space=False)]; the
GGUF names it `smollm`, which llama.cpp implements the same way). transformers' GGUF loader drops
the Digits step (GGUFGPTConverter builds a plain GPT-2 ByteLevel pre-tokenizer), so its ids differ
on runs of digits. The fixture therefore uses the reference tokenizer.json with SmolLM2's
pre-tokenizer restored, through the `tokenizers` library, and records the GGUF-loader ids too so
the difference stays visible.
"""
import json, os, sys
import torch
from tokenizers import Tokenizer, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer

torch.set_num_threads(2)
REF_HOME = os.environ.get("REF_HOME", os.path.expanduser("~/.cache/meet-reference"))
MODEL = os.path.join(REF_HOME, "smollm2-135m-hf")
HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "tests", "fixtures", "smollm2_parity.json")

hf_tok = AutoTokenizer.from_pretrained(MODEL)
tok = Tokenizer.from_file(os.path.join(MODEL, "tokenizer.json"))
tok.pre_tokenizer = pre_tokenizers.Sequence(
    [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
)

TEXTS = [
    "Hello world, this is a test.",
    "Numbers: 12345 and 3.14159, year 2024, phone +1 (555) 010-9999.",
    "Whitespace   runs\tand\ttabs\n\n\nnew lines    end   ",
    "  leading spaces and trailing  ",
    "Unicode: café, naïve, Straße, Ελληνικά, русский, 日本語のテキスト, 한국어, emoji 🤗🚀👩‍💻.",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "Special tokens inline: <|endoftext|> then <|im_end|>text",
    "Code: def f(x):\n    return x**2 + 10  # comment\n",
    "Mixed: AI-2027 'quotes' \"double\" don't it's you'll we've I'm",
    "",
]

with open(os.path.join(HERE, "..", "..", "shared", "reference", "corpus.txt")) as f:
    corpus = f.read()
chat = hf_tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, tokenize=False)
PROMPTS = {
    "plain": "The capital of France is",
    "chat": chat,
    "long": corpus[:700],
}

model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
fixture = {"model": "SmolLM2-135M-Instruct Q4_1 GGUF, dequantized to f32 (transformers + gguf-py)",
           "transformers": __import__("transformers").__version__, "torch": torch.__version__,
           "tokenizer": [], "logits": []}
for text in TEXTS:
    ids = tok.encode(text, add_special_tokens=True).ids
    fixture["tokenizer"].append({"text": text, "ids": ids,
                                 "gguf_loader_ids": hf_tok(text, add_special_tokens=True).input_ids,
                                 "decoded": tok.decode(ids, skip_special_tokens=False)})

g = torch.Generator().manual_seed(0)
cols = sorted(set(range(0, 48)) | set(torch.randint(48, 49152, (48,), generator=g).tolist()))
for name, text in PROMPTS.items():
    ids = tok.encode(text, add_special_tokens=True).ids
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    t = len(ids)
    rows = sorted({0, t // 2, t - 1})
    fixture["logits"].append({
        "name": name, "text": text, "ids": ids, "positions": rows, "columns": cols,
        "values": [[round(float(logits[r, c]), 6) for c in cols] for r in rows],
        "argmax": [int(logits[r].argmax()) for r in rows],
        "logsumexp": [round(float(torch.logsumexp(logits[r], -1)), 6) for r in rows],
    })
    print(name, "tokens:", t, "argmax last:", fixture["logits"][-1]["argmax"][-1], file=sys.stderr)

# Greedy generation: one prompt, and a left-padded batch of two (transformers' own padding and
# position ids), 24 new tokens, EOS allowed to stop a row.
def generate(texts):
    hf_tok.padding_side = "left"
    ids = [tok.encode(t, add_special_tokens=True).ids for t in texts]
    width = max(len(i) for i in ids)
    pad = hf_tok.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(i)) + i for i in ids])
    mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=24, do_sample=False,
                             pad_token_id=pad)
    return {"prompts": texts, "prompt_ids": ids, "new_ids": [o[width:].tolist() for o in out],
            "pad_token_id": pad, "eos_token_id": model.generation_config.eos_token_id}

fixture["generate_single"] = generate(["The capital of France is"])
fixture["generate_batch"] = generate(["The capital of France is", "Once upon a time, in a land far away, there lived a"])
print("greedy:", repr(hf_tok.decode(fixture["generate_single"]["new_ids"][0])), file=sys.stderr)

with open(OUT, "w") as f:
    json.dump(fixture, f, ensure_ascii=False, indent=None, separators=(",", ":"))
print("wrote", OUT, os.path.getsize(OUT), "bytes", file=sys.stderr)
