"""Pre-tokenizer splits and SmolLM2 token ids from the Python `tokenizers` library, for the tokenizer
`meet` rebuilds from GGUF metadata (tests/loading.rs: gguf_tokenizers_split_as_hf_tokenizers).

    $REF_HOME/venv/bin/python scripts/make_tokenizer_fixture.py

For every `tokenizer.ggml.pre` name meet accepts, the pre-tokenizer of that family's own
tokenizer.json (SmolLM2 / StarCoder: Digits(individual) then ByteLevel; GPT-2: ByteLevel; Llama 3 and
Qwen2: their Split regex then ByteLevel without its regex) splits a text set rich in Unicode numerals
(with and without a space before them), other scripts and whitespace. The SmolLM2 ids come from the
reference folder's vocabulary and merges under SmolLM2's own pre-tokenizer (HuggingFaceTB/SmolLM2-135M
tokenizer.json: Sequence[Digits(individual_digits=true), ByteLevel(add_prefix_space=false, trim_offsets=true,
use_regex=true)]); transformers' GGUF loader drops the Digits step, so its folder is not the reference
here. Writes tests/fixtures/pretokenizers.json.
"""
import json, os
import tokenizers
from tokenizers import Regex, Tokenizer, pre_tokenizers as P

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "tests", "fixtures", "pretokenizers.json")
REF = os.path.join(os.environ.get("REF_HOME", os.path.expanduser("~/.cache/meet-reference")), "smollm2-135m-hf")

LLAMA3 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN2 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"

NUMERALS = ["½", "²", "①", "٣", "١٢", "०९", "७", "Ⅻ", "३.५", "¼x", "x²", "12½", "𝟙", "〇", "六"]
TEXTS = []
for n in NUMERALS:
    TEXTS += [f"x {n} y", f"x{n}y", f"{n}", f" {n}", f"x  {n}", f"({n})", f"\n{n}\n"]
TEXTS += [
    "The price is 1234.56 dollars, not 1,000,000!",
    "Arabic-Indic ٠١٢٣٤٥٦٧٨٩ and Devanagari ०१२३४५६७८९ digits",
    "I'm sure they'll say it's fine, don't you think? We've seen it.",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\nmixed\n\n\n end",
    "non\u00a0breaking\u2003em space\u3000ideographic",
    "Café naïve résumé e\u0301 combining",
    "你好，世界！这是一个测试。123",
    "Emoji: 😀👍🏽 and ❤️ 3️⃣",
    "def foo(x):\n    return x ** 2  # 2nd power",
    "Ünïcödé ¹²³ superscripts and ₁₂₃ subscripts",
    "line\u2028separator and next\u0085line",
]

PRE = {
    "smollm": P.Sequence([P.Digits(individual_digits=True),
                          P.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)]),
    "gpt-2": P.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    "llama-bpe": P.Sequence([P.Split(Regex(LLAMA3), behavior="isolated", invert=False),
                             P.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)]),
    "qwen2": P.Sequence([P.Split(Regex(QWEN2), behavior="isolated", invert=False),
                         P.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)]),
}

out = {"tokenizers_version": tokenizers.__version__, "texts": TEXTS, "splits": {}}
for name, pre in PRE.items():
    out["splits"][name] = [[piece for piece, _ in pre.pre_tokenize_str(t)] for t in TEXTS]

tok = Tokenizer.from_file(os.path.join(REF, "tokenizer.json"))
tok.pre_tokenizer = PRE["smollm"]
out["smollm2_ids"] = [tok.encode(t, add_special_tokens=False).ids for t in TEXTS]
with open(OUT, "w") as f:
    json.dump(out, f, ensure_ascii=False, indent=0)
print("wrote", OUT, len(TEXTS), "texts")
