"""Writes a 160,000-record HH-RLHF-shaped file (1-4 turns per dialogue), as JSONL and Parquet,
for the README's reading-memory figure:
    python scripts/make_big_hh.py /tmp/hhbig   # -> /tmp/hhbig.jsonl (239 MB), /tmp/hhbig.parquet (86 MB)
Needs pyarrow."""

import json
import random
import sys

import pyarrow as pa
import pyarrow.parquet as pq

W = ("the cat dog sun rain tree river song bread blue quiet happy slow bright cold warm small old new "
     "light dark green loud soft sweet bitter early late").split()


def main(stem):
    rng = random.Random(2)

    def w(n):
        return " ".join(rng.choice(W) for _ in range(n))

    rows = []
    for i in range(160000):
        turns = "".join(f"\n\nHuman: {w(14)}?\n\nAssistant: {w(24)}." for _ in range(rng.randint(1, 3)))
        head = f"{turns}\n\nHuman: {w(12)} {i}?\n\nAssistant:"
        rows.append({"chosen": f"{head} {w(40)}.", "rejected": f"{head} {w(30)}!"})
    pq.write_table(pa.Table.from_pylist(rows), f"{stem}.parquet")
    with open(f"{stem}.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
