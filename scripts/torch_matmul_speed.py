"""GFLOP/s of PyTorch's f32 products on the shapes of `cargo run --release --example gemm_speed`
(a 512-row batch against SmolLM2's projections and LM head, and LoRA r 64 on GPT-Neo-125M's), the
same three products per shape (y = x Wᵀ, dx = dy W, dW = dyᵀ x), with the threads `meet` uses:
    MEET_THREADS=2 cargo run --release --example gemm_speed
    ~/.cache/meet-reference/venv/bin/python scripts/torch_matmul_speed.py --threads 2
`--dtype bf16`: bf16 operands (what `torch.autocast("cpu", torch.bfloat16)` hands oneDNN), against
`gemm_speed bf16`.
"""
import argparse
import time

import torch

SHAPES = [
    ("q/o 576x576", 576, 576),
    ("k/v 192x576", 192, 576),
    ("gate/up 1536x576", 1536, 576),
    ("down 576x1536", 576, 1536),
    ("lm_head 49152x576", 49152, 576),
    ("lora A 64x768", 64, 768),
    ("lora B 768x64", 768, 64),
    ("lora A 64x3072", 64, 3072),
    ("lora B 3072x64", 3072, 64),
]


def rate(f, flop, reps):
    f()
    t = time.perf_counter()
    for _ in range(reps):
        f()
    return flop * reps / (time.perf_counter() - t) / 1e9


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
    args = ap.parse_args()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    torch.set_num_threads(args.threads)
    rows = 512
    for name, n, k in SHAPES:
        x, w, dy = (torch.full(s, v, dtype=dtype) for s, v in [((rows, k), 0.5), ((n, k), 0.25), ((rows, n), 0.1)])
        reps = 3 if n > 10000 else 20
        flop = 2.0 * rows * n * k
        f = rate(lambda: x @ w.T, flop, reps)
        d = rate(lambda: dy @ w, flop, reps)
        g = rate(lambda: dy.T @ x, flop, reps)
        print(f"{name:>20}: fwd {f:6.1f}  dx {d:6.1f}  dW {g:6.1f} GFLOP/s")


if __name__ == "__main__":
    main()
