"""Writes tests/fixtures/data: the same preference / supervised records as JSON Lines and as
Parquet (written by Hugging Face `datasets`, as the Hub serves them), a folder of shards, bad
files, and a fake Hugging Face cache (tests/fixtures/data/hub) laid out as `huggingface_hub` and
`hf-hub` keep it, for the offline `hf:` id path.

Run with any Python that has datasets and pyarrow (e.g. the reference venv):
    python scripts/make_data_fixtures.py
"""

import gzip
import json
import os
import random
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
from datasets import Dataset

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "data")
WORDS = ("the cat dog sun rain tree river song bread blue quiet happy slow bright cold warm small "
         "old new light dark green loud soft sweet bitter early late").split()


def words(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def trl_rows(rng, n):
    return [{"prompt": f"Q{i}: {words(rng, 6)}?", "chosen": f" {words(rng, rng.randint(2, 8))}.",
             "rejected": f" {words(rng, rng.randint(2, 8))}!"} for i in range(n)]


def chat_rows(rng, n):
    # trl-lib/ultrafeedback_binarized's shape: implicit prompt, scores beside.
    rows = []
    for i in range(n):
        user = {"role": "user", "content": f"Tell me about {words(rng, 3)} ({i})"}
        rows.append({
            "chosen": [user, {"role": "assistant", "content": words(rng, rng.randint(3, 9))}],
            "rejected": [user, {"role": "assistant", "content": "no " + words(rng, rng.randint(1, 5))}],
            "score_chosen": round(rng.uniform(5, 10), 2),
            "score_rejected": round(rng.uniform(0, 5), 2),
        })
    return rows


def hh_rows(rng, n):
    rows = []
    for i in range(n):
        turns = "".join(f"\n\nHuman: {words(rng, 4)}?\n\nAssistant: {words(rng, 5)}."
                        for _ in range(rng.randint(0, 2)))
        head = f"{turns}\n\nHuman: {words(rng, 5)} {i}?\n\nAssistant:"
        rows.append({"chosen": f"{head} {words(rng, 6)}.", "rejected": f"{head} {words(rng, 3)}!"})
    return rows


def tldr_rows(rng, n):
    # openai/summarize_from_feedback "comparisons": nested struct and list of structs, nulls.
    rows = []
    for i in range(n):
        rows.append({
            "info": {"id": f"t3_{i}", "post": words(rng, 20), "title": words(rng, 4),
                     "subreddit": rng.choice(["cats", "relationships", None]), "site": None,
                     "article": None},
            "summaries": [{"text": f" {words(rng, 6)}", "policy": "sup1", "note": None},
                          {"text": words(rng, 7), "policy": "ref", "note": rng.choice([None, "ok"])}],
            "choice": rng.randint(0, 1), "worker": f"w{rng.randint(0, 9)}", "batch": "batch3",
            "split": "train", "extra": {"confidence": rng.choice([None, 5, 8])},
        })
    return rows


def sft_rows(rng, n):
    return [{"messages": [{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": f"{words(rng, 5)} {i}?"},
                          {"role": "assistant", "content": words(rng, rng.randint(2, 9))}]}
            for i in range(n)]


def llama_factory_rows(rng, n):
    # LLaMA-Factory's ShareGPT-style preference rows: structs for the two answers.
    return [{"conversations": [{"from": "human", "value": f"{words(rng, 5)} {i}?"}],
             "chosen": {"from": "gpt", "value": words(rng, rng.randint(2, 8))},
             "rejected": {"from": "gpt", "value": "not " + words(rng, rng.randint(1, 6))},
             "system": rng.choice(["", "Answer briefly."])} for i in range(n)]


def write_jsonl(path, rows, gz=False):
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if gz:
        with gzip.GzipFile(path, "wb", mtime=0) as f:
            f.write(text.encode())
    else:
        with open(path, "w") as f:
            f.write(text)


def write_parquet(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Dataset.from_list(rows).to_parquet(path)


def fake_cache_repo(root, repo, revision, files, commit):
    """A dataset repo in the HF cache: refs/{revision} -> snapshots/{commit}/... (plain files;
    the real cache links them to blobs/)."""
    base = os.path.join(root, "datasets--" + repo.replace("/", "--"))
    ref = os.path.join(base, "refs", revision)
    os.makedirs(os.path.dirname(ref), exist_ok=True)
    with open(ref, "w") as f:
        f.write(commit)
    for rel, writer in files.items():
        path = os.path.join(base, "snapshots", commit, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        writer(path)


def main():
    shutil.rmtree(OUT, ignore_errors=True)
    os.makedirs(OUT)
    rng = random.Random(20)
    sets = {"trl": trl_rows(rng, 200), "chat": chat_rows(rng, 150), "hh": hh_rows(rng, 200),
            "tldr": tldr_rows(rng, 150), "sft": sft_rows(rng, 150)}
    sets["llama_factory"] = llama_factory_rows(random.Random(21), 120)
    for name, rows in sets.items():
        write_jsonl(os.path.join(OUT, f"{name}.jsonl"), rows)
        write_parquet(os.path.join(OUT, f"{name}.parquet"), rows)

    # A folder of shards: train in three, plus a test shard the training role must not read.
    hh = sets["hh"]
    for k, part in enumerate([hh[:70], hh[70:140], hh[140:]]):
        write_parquet(os.path.join(OUT, "shards", f"train-{k:05d}-of-00003.parquet"), part)
    write_parquet(os.path.join(OUT, "shards", "test-00000-of-00001.parquet"), hh_rows(rng, 20))

    # Bad files: a wrong column type, a missing column.
    write_parquet(os.path.join(OUT, "bad_type.parquet"),
                  [{"prompt": r["prompt"], "chosen": i, "rejected": r["rejected"]}
                   for i, r in enumerate(sets["trl"][:10])])
    write_parquet(os.path.join(OUT, "missing_column.parquet"),
                  [{"prompt": r["prompt"], "chosen": r["chosen"]} for r in sets["trl"][:10]])

    hub = os.path.join(OUT, "hub")
    trl = sets["trl"]
    # Sharded data/{split}-NNNNN-of-NNNNN.parquet on main (one shard zstd-compressed).
    fake_cache_repo(hub, "meet-fixtures/prefs", "main", {
        "README.md": lambda p: open(p, "w").write("---\nlicense: mit\n---\n"),
        "data/train-00000-of-00002.parquet": lambda p: write_parquet(p, trl[:100]),
        "data/train-00001-of-00002.parquet": lambda p: write_parquet(p, trl[100:160]),
        "data/test-00000-of-00001.parquet":
            lambda p: pq.write_table(pa.Table.from_pylist(trl[160:]), p, compression="zstd"),
    }, "1111111111111111111111111111111111111111")
    # HH-RLHF's layout: subsets in folders, split keywords in .jsonl.gz names.
    fake_cache_repo(hub, "meet-fixtures/hh", "main", {
        "harmless-base/train.jsonl.gz": lambda p: write_jsonl(p, hh[:60], gz=True),
        "helpful-base/train.jsonl.gz": lambda p: write_jsonl(p, hh[60:150], gz=True),
        "helpful-base/test.jsonl.gz": lambda p: write_jsonl(p, hh[150:], gz=True),
    }, "2222222222222222222222222222222222222222")
    # A dataset whose main branch holds no data files (a loading script): the Hub's Parquet
    # conversion, {config}/{split}/NNNN.parquet, on refs/convert/parquet.
    tldr = sets["tldr"]
    fake_cache_repo(hub, "meet-fixtures/tldr", "main", {
        "summarize_from_feedback.py": lambda p: open(p, "w").write("# a loading script\n"),
    }, "3333333333333333333333333333333333333333")
    fake_cache_repo(hub, "meet-fixtures/tldr", "refs/convert/parquet", {
        "comparisons/train/0000.parquet": lambda p: write_parquet(p, tldr[:120]),
        "comparisons/validation/0000.parquet": lambda p: write_parquet(p, tldr[120:]),
    }, "4444444444444444444444444444444444444444")
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(OUT) for f in fs)
    print(f"wrote {OUT} ({total} bytes)")


if __name__ == "__main__":
    main()
