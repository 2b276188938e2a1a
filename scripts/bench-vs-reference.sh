#!/usr/bin/env bash
# Races `meet bench generate` against the Python reference (../shared/reference/bench_generate.py:
# transformers, f32, greedy, 64 new tokens, batch 1), alternating the two programs ROUNDS times on
# this machine, and prints medians and the ratio. Needs the reference venv (its setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
REF=${REF:-$(cd ../shared/reference && pwd)}
REF_HOME=${REF_HOME:-$HOME/.cache/meet-reference}
ROUNDS=${ROUNDS:-3}
OUT=runs/bench-generate-$(date +%Y%m%d-%H%M%S)
mkdir -p "$OUT"
./scripts/fetch-model.sh >/dev/null
cargo build --release --quiet
for r in $(seq "$ROUNDS"); do
  echo "round $r/$ROUNDS (loadavg $(cut -d' ' -f1-3 /proc/loadavg))" >&2
  env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE REF_HOME="$REF_HOME" "$REF_HOME/venv/bin/python" \
      "$REF/bench_generate.py" --reps 3 2>/dev/null | sed -n 's/^RESULT //p' >> "$OUT/reference.jsonl"
  ./target/release/meet bench generate --reps 3 2>/dev/null | grep '^{' >> "$OUT/meet.jsonl"
done
python3 - "$OUT" <<'PY'
import json, statistics, sys
out = sys.argv[1]
ref = [json.loads(l) for l in open(f"{out}/reference.jsonl")]
ours = [json.loads(l) for l in open(f"{out}/meet.jsonl")]
med = statistics.median
ref_dec = med(r["decode_tokens_per_s_median"] for r in ref)
b1 = [next(x for x in o["results"] if x["batch"] == 1) for o in ours]
b16 = [next(x for x in o["results"] if x["batch"] == 16) for o in ours]
rows = [
    ("batch 1 greedy decode", med(x["decode_tokens_per_s"] for x in b1), ref_dec),
    ("batch 1 prefill", med(x["prefill_tokens_per_s"] for x in b1), None),
    ("batch 16 sampled decode (aggregate)", med(x["decode_tokens_per_s"] for x in b16), None),
    ("batch 16 prefill", med(x["prefill_tokens_per_s"] for x in b16), None),
]
print(f"{'figure':40} {'meet tok/s':>10} {'reference':>10} {'ratio':>6}")
for name, m, r in rows:
    print(f"{name:40} {m:10.1f} {r if r is None else round(r, 1)!s:>10} {'' if r is None else f'{m / r:.1f}x':>6}")
print(f"rounds: {len(ours)}; meet peak RSS {med(o['peak_rss_mib'] for o in ours):.0f} MiB, "
      f"reference {med(r['peak_rss_mib_self'] for r in ref):.0f} MiB; raw results in {out}")
PY
