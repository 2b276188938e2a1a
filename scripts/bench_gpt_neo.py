"""The reference side of the GPT-Neo training race (scripts/bench-gpt-neo-vs-reference.sh).

    python bench_gpt_neo.py make DIR          # a random GPT-Neo of gpt-neo-125m's shape, seed 0, saved as
                                              # an HF folder (the weights both programs train)
    python bench_gpt_neo.py {full,lora,prompt} DIR BATCH.json [--steps N] [--warmup W]

The training bench is the shared reference's bench_train.py on this model: f32, AdamW without weight
decay, the same batch file `meet bench train --batch` reads; LoRA r 64 / alpha 128 on every
projection PEFT names for GPT-Neo; prompt tuning with 20 random virtual tokens. It prints one
`RESULT {json}` line with the fields bench_train.py writes.
"""
import argparse, json, resource, statistics, time
import torch

GPT_NEO_125M = dict(vocab_size=50257, hidden_size=768, num_layers=12, num_heads=12, max_position_embeddings=2048,
                    attention_types=[[["global", "local"], 6]], window_size=256, intermediate_size=None,
                    layer_norm_epsilon=1e-5, bos_token_id=50256, eos_token_id=50256,
                    embed_dropout=0.0, attention_dropout=0.0, resid_dropout=0.0)
TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "c_fc", "c_proj"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["make", "full", "lora", "prompt"])
    ap.add_argument("dir")
    ap.add_argument("batch", nargs="?")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from transformers import GPTNeoConfig, GPTNeoForCausalLM
    if args.mode == "make":
        model = GPTNeoForCausalLM(GPTNeoConfig(**GPT_NEO_125M))
        model.save_pretrained(args.dir, safe_serialization=True)
        print(f"params {sum(p.numel() for p in model.parameters())} -> {args.dir}")
        return
    t0 = time.perf_counter()
    model = GPTNeoForCausalLM.from_pretrained(args.dir, dtype=torch.float32)
    load_s = time.perf_counter() - t0
    model.config.use_cache = False
    rows = json.load(open(args.batch))["input_ids"]
    x = torch.tensor(rows, dtype=torch.long)
    lr = {"full": 1e-5, "lora": 1e-4, "prompt": 1e-3}[args.mode]
    if args.mode == "lora":
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=64, lora_alpha=128, lora_dropout=0.0, bias="none",
                                                 target_modules=TARGETS, task_type="CAUSAL_LM"))
    elif args.mode == "prompt":
        from peft import PromptTuningConfig, PromptTuningInit, get_peft_model
        model = get_peft_model(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20,
                                                         prompt_tuning_init=PromptTuningInit.RANDOM))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    steps, fwd, bwd, ost, losses = [], [], [], [], []
    for i in range(args.warmup + args.steps):
        a = time.perf_counter()
        out = model(input_ids=x, labels=x)
        b = time.perf_counter()
        out.loss.backward()
        c = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        d = time.perf_counter()
        losses.append(out.loss.item())
        if i >= args.warmup:
            steps.append(d - a); fwd.append(b - a); bwd.append(c - b); ost.append(d - c)
    med = statistics.median
    tokens = x.numel()
    res = {"bench": f"train_{args.mode}", "model": "gpt-neo-125m shape (random)", "batch": x.shape[0],
           "seq": x.shape[1], "trainable_params": sum(p.numel() for p in params),
           "sec_per_step": {"median": med(steps), "all": steps}, "tokens_per_s_median": tokens / med(steps),
           "fwd_median": med(fwd), "bwd_median": med(bwd), "opt_median": med(ost), "losses": losses,
           "load_s": load_s, "peak_rss_mib_self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
    print("RESULT " + json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
