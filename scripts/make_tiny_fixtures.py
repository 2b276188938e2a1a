"""Writes tiny random HF models with transformers' own logits, to check the HF-folder path and the
architecture variants SmolLM2 does not exercise: Llama with llama3 RoPE scaling, q/k/v/o biases, an
untied LM head, head_dim != hidden/heads; and Qwen2 (q/k/v biases). A few tens of KB each.

    $REF_HOME/venv/bin/python scripts/make_tiny_fixtures.py
"""
import json, os
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

torch.manual_seed(0)
HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "tests", "fixtures")

common = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
variants = {
    "tiny-llama3": (LlamaForCausalLM, LlamaConfig(
        **common, head_dim=16, attention_bias=True, tie_word_embeddings=False, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16})),
    "tiny-qwen2": (Qwen2ForCausalLM, Qwen2Config(**common, tie_word_embeddings=True, rope_theta=1000000.0,
                                                 use_sliding_window=False)),
}
ids = [[5, 17, 3, 60, 41, 9, 2, 33, 33, 12, 50, 7, 1, 0, 22, 63, 8, 30, 19, 44]]
for name, (cls, cfg) in variants.items():
    model = cls(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():  # larger than the 0.02 init, so every path moves the logits
            p.normal_(0.0, 0.3)
        logits = model(torch.tensor(ids)).logits[0]
    d = os.path.join(OUT, name)
    model.save_pretrained(d, safe_serialization=True)
    vocab = {f"t{i}": i for i in range(64)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(os.path.join(d, "tokenizer.json"))
    with open(os.path.join(d, "expected_logits.json"), "w") as f:
        json.dump({"ids": ids[0], "logits": [[round(float(v), 6) for v in row] for row in logits]}, f)
    print(name, "params", sum(p.numel() for p in model.parameters()), "->", d)
