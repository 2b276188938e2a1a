"""What a GPT-Neo training run needs in memory, from the architecture (README "Scale notes").

    python3 scripts/memory_estimate.py                   # GPT-Neo 1.3B and the 125M shape, batch 4 x 512
    python3 scripts/memory_estimate.py --batch 4 --seq 128 --shape 125m --r 64   # the bench race's run

f32 throughout (as meet trains). Parameters: embeddings, positions, per layer q/k/v (no bias), out
proj, c_fc, c_proj (with biases), two LayerNorms; the LM head is tied. Full fine-tuning keeps weights,
gradients and AdamW's two moments (4 x params). LoRA (r on every projection) and prompt tuning (20
virtual tokens) keep the frozen weights plus their own small trainable state, and meet keeps a
transposed copy of each frozen projection for its product kernels (the tied head excepted).

Activations kept for the backward pass, per token and layer, in floats: the block input, both
LayerNorm outputs, q, k, v, the attention output, the out-proj output, the MLP's c_fc output and GELU
output (4h each), c_proj output: about 11 h + 8 h = 19 h, plus the attention probabilities (heads x
keys per query). Per token once: the logits and their gradient (2 x vocab) in full fine-tuning; with
a frozen head the fused log-prob op keeps none.
"""
import argparse

SHAPES = {
    "1.3b": dict(h=2048, layers=24, heads=16, vocab=50257, positions=2048, inner=8192),
    "125m": dict(h=768, layers=12, heads=12, vocab=50257, positions=2048, inner=3072),
}


def params(s):
    h, i = s["h"], s["inner"]
    layer = 3 * h * h + (h * h + h) + (h * i + i) + (i * h + h) + 4 * h
    return s["vocab"] * h + s["positions"] * h + s["layers"] * layer + 2 * h


def lora_params(s, r):
    h, i = s["h"], s["inner"]
    per_layer = 4 * r * (h + h) + r * (h + i) + r * (i + h)
    return s["layers"] * per_layer


def activations(s, tokens, seq, full_head):
    per_token = s["layers"] * (19 * s["h"] + s["heads"] * seq) + (2 * s["vocab"] if full_head else 0)
    return tokens * per_token * 4


def projections(s):
    h, i = s["h"], s["inner"]
    return s["layers"] * (4 * h * h + 2 * h * i)


def report(name, s, batch, seq, r):
    gib = lambda b: b / 2**30
    p = params(s)
    tokens = batch * seq
    rows = [
        ("full fine-tuning", 16 * p, activations(s, tokens, seq, True)),
        (f"LoRA r {r}, all projections", 4 * (p + projections(s)) + 16 * lora_params(s, r),
         activations(s, tokens, seq, False)),
        ("prompt tuning, 20 tokens", 4 * (p + projections(s)) + 16 * 20 * s["h"],
         activations(s, tokens + 20 * batch, seq + 20, False)),
    ]
    print(f"{name}: {p / 1e6:.1f}M parameters ({gib(4 * p):.2f} GiB f32), batch {batch} x {seq} tokens")
    for what, state, act in rows:
        print(f"  {what:30} weights+optimizer {gib(state):6.2f} GiB  activations {gib(act):6.2f} GiB  "
              f"total {gib(state + act):6.2f} GiB  ({act / tokens / 2**20:.2f} MiB/token)")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--shape", choices=list(SHAPES), action="append")
    ap.add_argument("--r", type=int, default=16, help="LoRA rank")
    a = ap.parse_args()
    for name in a.shape or ["1.3b", "125m"]:
        report(f"GPT-Neo {name}", SHAPES[name], a.batch, a.seq, a.r)
