#!/usr/bin/env bash
# Races `meet bench dpo` against the Python reference's hand-written DPO step
# (../shared/reference/bench_dpo_manual.py: its 4 fixed pairs of 64 + 64 tokens, sigmoid loss,
# beta 0.1, full f32 SmolLM2, AdamW lr 1e-6), alternating the two programs ROUNDS times on this
# machine; prints medians, ratios and peak memory. The reference runs its frozen reference model
# every step; meet runs it once before training, so the fair single-epoch figure adds that pass to
# meet's step time. DTYPES="f32 bf16" also races `meet bench dpo --dtype bf16` against the same
# step under PyTorch's bf16 autocast (scripts/bench_dpo_autocast.py). Needs the reference venv (its
# setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
REF=${REF:-$(cd ../shared/reference && pwd)}
REF_HOME=${REF_HOME:-$HOME/.cache/meet-reference}
ROUNDS=${ROUNDS:-1}
STEPS=${STEPS:-4}
DTYPES=${DTYPES:-f32}
OUT=runs/bench-dpo-$(date +%Y%m%d-%H%M%S)
mkdir -p "$OUT"
./scripts/fetch-model.sh >/dev/null
cargo build --release --quiet
for r in $(seq "$ROUNDS"); do
  for dt in $DTYPES; do
    echo "round $r/$ROUNDS $dt (loadavg $(cut -d' ' -f1-3 /proc/loadavg))" >&2
    if [ "$dt" = f32 ]; then
      ref_script=("$REF/bench_dpo_manual.py")
    else
      ref_script=(scripts/bench_dpo_autocast.py --dtype "$dt")
    fi
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE REF="$REF" REF_HOME="$REF_HOME" "$REF_HOME/venv/bin/python" \
        "${ref_script[@]}" --steps "$STEPS" --warmup 1 2>/dev/null | sed -n 's/^RESULT //p' >> "$OUT/reference-$dt.jsonl"
    ./target/release/meet bench dpo --steps "$STEPS" --warmup 1 --dtype "$dt" \
        --pairs "$REF/data/dpo_pairs_4x64+64.json" 2>/dev/null | grep '^{' >> "$OUT/meet-$dt.jsonl"
  done
done
python3 - "$OUT" $DTYPES <<'PY'
import json, statistics, sys
out, dtypes = sys.argv[1], sys.argv[2:]
med = statistics.median
for dt in dtypes:
    ref = [json.loads(l) for l in open(f"{out}/reference-{dt}.jsonl")]
    ours = [json.loads(l)["result"] for l in open(f"{out}/meet-{dt}.jsonl")]
    ms = med(o["sec_per_step_median"] for o in ours)
    mref = med(o["reference_s"] for o in ours)
    rs = med(r["sec_per_step"]["median"] for r in ref)
    print(f"== {dt}")
    print(f"meet: {ms:.2f} s/step (fwd {med(o['fwd_median'] for o in ours):.2f}, bwd {med(o['bwd_median'] for o in ours):.2f}, "
          f"opt {med(o['opt_median'] for o in ours):.2f}) + reference pass {mref:.2f} s once; peak RSS {med(o['peak_rss_mib'] for o in ours):.0f} MiB")
    print(f"reference: {rs:.2f} s/step (ref fwd {med(r['ref_fwd_median'] for r in ref):.2f}, pol fwd {med(r['pol_fwd_median'] for r in ref):.2f}, "
          f"bwd {med(r['bwd_median'] for r in ref):.2f}, opt {med(r['opt_median'] for r in ref):.2f}); peak RSS {med(r['peak_rss_mib_self'] for r in ref):.0f} MiB")
    print(f"pairs/s: meet {4 / ms:.3f} per training step ({4 / (ms + mref):.3f} with the reference pass) vs {4 / rs:.3f}: "
          f"ratio {rs / ms:.2f}x ({rs / (ms + mref):.2f}x with the pass); per round "
          + ", ".join(f"{r['sec_per_step']['median'] / o['sec_per_step_median']:.2f}x" for r, o in zip(ref, ours)))
    print("losses meet", [round(x, 4) for x in ours[0]["losses"]], "reference", [round(x, 4) for x in ref[0]["losses"]])
print(f"rounds: {len(ours)}; raw results in {out}")
PY
