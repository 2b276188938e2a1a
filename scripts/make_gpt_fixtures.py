"""Writes small random GPT-Neo and GPT-2 models that transformers itself builds, with what the Rust
tests compare against (tests/gpt.rs): logits of a fixed input and of a left-padded batch, greedy
ids (single and left-padded batch), a PEFT LoRA adapter and its logits, the first four losses of
full fine-tuning with AdamW on a fixed batch, and the ids the tokenizer gives a few texts.

The tokenizer is a byte-level BPE trained here on the reference corpus: GPT-Neo's folder gets it as
`tokenizer.json`, GPT-2's as `vocab.json` + `merges.txt` only (the original GPT-2 layout).

    $REF_HOME/venv/bin/python scripts/make_gpt_fixtures.py
"""
import json, os, shutil, tempfile
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
from transformers import (AutoTokenizer, GPT2Config, GPT2LMHeadModel, GPTNeoConfig, GPTNeoForCausalLM,
                          PreTrainedTokenizerFast)
from peft import LoraConfig, get_peft_model

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "tests", "fixtures")
CORPUS = os.path.join(HERE, "..", "..", "shared", "reference", "corpus.txt")
EOS = "<|endoftext|>"


def tokenizer(dir_):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    text = open(CORPUS).read() if os.path.exists(CORPUS) else "the quick brown fox jumps over the lazy dog " * 50
    tok.train_from_iterator([text], trainer)
    tok.model.save(dir_)  # vocab.json, merges.txt
    tok.save(os.path.join(dir_, "tokenizer.json"))
    return PreTrainedTokenizerFast(tokenizer_file=os.path.join(dir_, "tokenizer.json"), eos_token=EOS, bos_token=EOS)


def rows(t):
    return [[round(float(v), 6) for v in r] for r in t]


def main():
    torch.manual_seed(0)
    tmp = tempfile.mkdtemp()
    hf_tok = tokenizer(tmp)
    vocab = len(hf_tok)
    eos = hf_tok.convert_tokens_to_ids(EOS)
    texts = ["The cat sat on the mat.", "Hello, world! 1234", "  two  spaces\nand a newline", "naïve café ½"]
    variants = {
        "tiny-gpt-neo": (GPTNeoForCausalLM, GPTNeoConfig(
            vocab_size=vocab, hidden_size=32, num_layers=4, num_heads=4, max_position_embeddings=64,
            attention_types=[[["global", "local"], 2]], window_size=5, intermediate_size=None,
            bos_token_id=eos, eos_token_id=eos, layer_norm_epsilon=1e-5),
            ["q_proj", "v_proj", "out_proj", "c_fc"], False),
        "tiny-gpt2": (GPT2LMHeadModel, GPT2Config(
            vocab_size=vocab, n_embd=32, n_layer=3, n_head=4, n_positions=64, n_inner=None,
            scale_attn_by_inverse_layer_idx=True, bos_token_id=eos, eos_token_id=eos),
            ["c_attn", "c_proj", "c_fc"], True),
    }
    ids = hf_tok("The quick brown fox jumps over the lazy dog again and")["input_ids"][:14]
    short = ids[:6]
    for name, (cls, cfg, targets, fan_in_fan_out) in variants.items():
        torch.manual_seed(1)
        model = cls(cfg).eval()
        with torch.no_grad():
            for p in model.parameters():  # larger than the 0.02 init, so every path moves the logits
                p.normal_(0.0, 0.1)
        d = os.path.join(OUT, name)
        shutil.rmtree(d, ignore_errors=True)
        model.save_pretrained(d, safe_serialization=True)
        if name == "tiny-gpt2":
            for f in ["vocab.json", "merges.txt"]:
                shutil.copy(os.path.join(tmp, f), d)
        else:
            shutil.copy(os.path.join(tmp, "tokenizer.json"), d)
        exp = {"ids": ids, "texts": texts, "text_ids": [hf_tok(t)["input_ids"] for t in texts]}
        if name == "tiny-gpt2":  # transformers reads the vocab.json + merges.txt folder the same way
            folder_tok = AutoTokenizer.from_pretrained(d)
            assert [folder_tok(t)["input_ids"] for t in texts] == exp["text_ids"], "vocab/merges tokenizer differs"
        with torch.no_grad():
            exp["logits"] = rows(model(torch.tensor([ids])).logits[0])
            pad = len(ids) - len(short)
            batch = torch.tensor([ids, [eos] * pad + short])
            mask = torch.tensor([[1] * len(ids), [0] * pad + [1] * len(short)])
            # Positions follow the padding, as transformers' generate sets them.
            positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
            out = model(batch, attention_mask=mask, position_ids=positions).logits
            exp["padded"] = {"ids": batch.tolist(), "mask": mask.tolist(), "logits_row1": rows(out[1, pad:])}
            g = model.generate(torch.tensor([short]), max_new_tokens=10, do_sample=False, pad_token_id=eos)
            exp["greedy"] = {"prompt": short, "new_ids": g[0, len(short):].tolist()}
            g = model.generate(batch[:, -8:], attention_mask=mask[:, -8:], max_new_tokens=8, do_sample=False,
                               pad_token_id=eos)
            exp["greedy_padded"] = {"ids": batch[:, -8:].tolist(), "mask": mask[:, -8:].tolist(),
                                    "new_ids": g[:, 8:].tolist()}
        # Full fine-tuning: AdamW lr 1e-3, no weight decay, no clipping, mean CE over all next tokens.
        train = cls.from_pretrained(d).train()
        for m in train.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        opt = torch.optim.AdamW(train.parameters(), lr=1e-3, weight_decay=0.0)
        x = torch.tensor([ids, ids[::-1]])
        losses = []
        for _ in range(4):
            loss = train(x, labels=x).loss
            losses.append(round(float(loss), 6))
            opt.zero_grad()
            loss.backward()
            opt.step()
        exp["train"] = {"ids": x.tolist(), "lr": 1e-3, "losses": losses}
        # A PEFT LoRA adapter with random A and B.
        torch.manual_seed(2)
        base = cls.from_pretrained(d).eval()
        lcfg = LoraConfig(r=4, lora_alpha=8, target_modules=targets, fan_in_fan_out=fan_in_fan_out,
                          init_lora_weights=False, lora_dropout=0.0)
        peft = get_peft_model(base, lcfg).eval()
        ad = os.path.join(OUT, name + "-lora")
        shutil.rmtree(ad, ignore_errors=True)
        peft.save_pretrained(ad)
        with torch.no_grad():
            exp["lora_logits"] = rows(peft(torch.tensor([ids])).logits[0])
        with open(os.path.join(d, "expected.json"), "w") as f:
            json.dump(exp, f)
        size = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))
        print(name, "params", sum(p.numel() for p in model.parameters()), f"{size / 1e6:.2f} MB ->", d)


if __name__ == "__main__":
    main()
