"""Long-prompt prefill in transformers, as `meet bench prefill` measures it: for each length, a prompt of that
many tokens (the rows of tests/fixtures/lm_batch_4x128.json joined and repeated) and generate(max_new_tokens=1,
greedy, KV cache), timed `--reps` times after one warm-up; f32, 2 threads by default.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE $REF_HOME/venv/bin/python scripts/bench_prefill.py --lengths 1024,4096,8000

Prints one JSON line. Needs the reference folder ($REF_HOME/smollm2-135m-hf, ../shared/reference/setup.sh).
"""
import argparse, json, os, statistics, time
import torch
from transformers import AutoModelForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))
ap = argparse.ArgumentParser()
ap.add_argument("--lengths", default="1024,4096,8000")
ap.add_argument("--reps", type=int, default=2)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--ids", default=os.path.join(HERE, "..", "tests", "fixtures", "lm_batch_4x128.json"))
ap.add_argument("--model", default=os.path.join(os.environ.get("REF_HOME", os.path.expanduser("~/.cache/meet-reference")),
                                                "smollm2-135m-hf"))
args = ap.parse_args()
torch.set_num_threads(args.threads)
model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
pool = [t for row in json.load(open(args.ids))["input_ids"] for t in row]
results = []
for i, n in enumerate(int(x) for x in args.lengths.split(",")):
    ids = torch.tensor([[pool[j % len(pool)] for j in range(n)]])

    def run():
        with torch.inference_mode():
            a = time.perf_counter()
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, min_new_tokens=1,
                           do_sample=False, use_cache=True, pad_token_id=0)
            return time.perf_counter() - a

    if i == 0:
        run()
    times = [run() for _ in range(args.reps)]
    med = statistics.median(times)
    results.append({"prompt_tokens": n, "seconds_median": med, "seconds_all": times, "tokens_per_s": n / med})
    print(f"prefill {n:>5} tokens: {med:.2f} s, {n / med:.0f} tok/s", flush=True)
print(json.dumps({"bench": "prefill", "reference": "transformers", "threads": args.threads,
                  "attn_implementation": model.config._attn_implementation, "results": results}))
