"""The reference's hand-written DPO step (../shared/reference/bench_dpo_manual.py: 4 pairs of
64 + 64 tokens, sigmoid loss, beta 0.1, AdamW lr 1e-6, full SmolLM2 with f32 weights) with
`--dtype bf16`: both forwards and the backward under torch.autocast("cpu", torch.bfloat16), f32
weights, f32 AdamW state and f32 log-prob sums, as a PyTorch user turns on bf16. `--dtype f32` is
the reference's own step. Prints a `RESULT {json}` line as the reference's scripts do.
Run with the reference venv: REF=../shared/reference python scripts/bench_dpo_autocast.py.
"""
import argparse, contextlib, os, sys, time

sys.path.insert(0, os.environ.get("REF", os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../shared/reference")))
import common  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--steps", type=int, default=6)
ap.add_argument("--warmup", type=int, default=1)
ap.add_argument("--beta", type=float, default=0.1)
ap.add_argument("--dtype", choices=["f32", "bf16"], required=True)
ap.add_argument("--threads", type=int, default=2)
args = ap.parse_args()

common.setup(args.threads)
policy, tok = common.load(torch.float32)
ref, _ = common.load(torch.float32)
policy.config.use_cache = False
ref.config.use_cache = False
policy.train()
ref.eval()
ref.requires_grad_(False)
autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if args.dtype == "bf16" else contextlib.nullcontext
pairs = common.dpo_pairs(tok)
P = len(pairs[0]["prompt_ids"])
ids = torch.tensor([p["prompt_ids"] + p["chosen_ids"] for p in pairs] + [p["prompt_ids"] + p["rejected_ids"] for p in pairs])
B2, T = ids.shape
mask = torch.zeros(B2, T - 1)
mask[:, P - 1:] = 1.0
targets = ids[:, 1:]
opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-6, weight_decay=0.0)


def seq_logps(model):
    with autocast():
        logits = model(input_ids=ids).logits[:, :-1]
    logits = logits.float()
    tok_lp = -F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="none")
    return (tok_lp.view(B2, T - 1) * mask).sum(-1)


steps, losses = [], []
ph = {"ref_fwd": [], "pol_fwd": [], "bwd": [], "opt": []}
for i in range(args.warmup + args.steps):
    a = time.perf_counter()
    with torch.no_grad():
        r = seq_logps(ref)
    b = time.perf_counter()
    p = seq_logps(policy)
    pc, pr = p.chunk(2)
    rc, rr = r.chunk(2)
    loss = -F.logsigmoid(args.beta * ((pc - rc) - (pr - rr))).mean()
    c = time.perf_counter()
    loss.backward()
    d = time.perf_counter()
    opt.step()
    opt.zero_grad(set_to_none=True)
    e = time.perf_counter()
    losses.append(loss.item())
    print(f"step {i} loss={losses[-1]:.6f} total={e - a:.3f}s", flush=True)
    if i >= args.warmup:
        steps.append(e - a)
        for k, v in zip(ph, (b - a, c - b, d - c, e - d)):
            ph[k].append(v)

s = common.summarize(steps)
common.save(f"dpo_autocast_{args.dtype}", {
    "bench": "dpo_autocast", "dtype": args.dtype, "pairs": B2 // 2, "seq": T, "beta": args.beta, "sec_per_step": s,
    **{f"{k}_median": common.summarize(v)["median"] for k, v in ph.items()}, "losses": losses})
