//! Behaviour of the decoder, the loaders and generation on a tiny random Llama (seconds to run).

mod common;

use candle_core::{DType, Device, IndexOp, Tensor, D};
use common::{max_diff, tiny_raw};
use meet::generate::{generate, SamplingParams};
use meet::models::AttentionInputs;
use meet::{LoadOptions, Pretrained};

fn ids(rows: &[&[u32]]) -> Tensor {
    let t = rows[0].len();
    Tensor::from_vec(rows.concat(), (rows.len(), t), &Device::Cpu).unwrap()
}

/// Next-token cross-entropy over a batch, the loss later issues train with.
fn lm_loss(p: &Pretrained, x: &Tensor) -> Tensor {
    let (b, t) = x.dims2().unwrap();
    let logits = p.model.forward(x).unwrap();
    let logits = logits.narrow(1, 0, t - 1).unwrap().reshape((b * (t - 1), ())).unwrap();
    let targets = x.narrow(1, 1, t - 1).unwrap().flatten_all().unwrap();
    candle_nn::loss::cross_entropy(&logits, &targets).unwrap()
}

fn trainable(seed: u64) -> Pretrained {
    Pretrained::from_raw(tiny_raw(seed, 64), &LoadOptions { trainable: true, ..Default::default() }).unwrap()
}

#[test]
fn every_weight_receives_a_gradient() {
    let p = trainable(1);
    let x = ids(&[&[1, 5, 9, 33, 7, 2, 90, 4], &[8, 8, 100, 3, 250, 17, 6, 5]]);
    let grads = lm_loss(&p, &x).backward().unwrap();
    let vars = p.varmap.as_ref().unwrap().data().lock().unwrap();
    // 2 layers x 9 tensors + embeddings + final norm (tied head).
    assert_eq!(vars.len(), 2 * 9 + 2);
    for (name, var) in vars.iter() {
        let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("no gradient for {name}"));
        let norm: f32 = g.sqr().unwrap().sum_all().unwrap().sqrt().unwrap().to_scalar().unwrap();
        assert!(norm > 0.0 && norm.is_finite(), "{name}: gradient norm {norm}");
    }
}

#[test]
fn gradients_match_finite_differences() {
    let p = trainable(2);
    let x = ids(&[&[1, 5, 9, 33, 7, 2], &[8, 8, 100, 3, 250, 17]]);
    let mut vars: Vec<(String, candle_core::Var)> =
        p.varmap.as_ref().unwrap().data().lock().unwrap().iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    common::check_finite_differences(&vars, &|| lm_loss(&p, &x));
}

#[test]
fn kv_cache_steps_match_the_full_forward() {
    let p = Pretrained::from_raw(tiny_raw(3, 64), &LoadOptions::default()).unwrap();
    let seq: Vec<u32> = vec![3, 70, 12, 5, 199, 42, 8, 1, 77];
    let full = p.model.forward(&ids(&[&seq])).unwrap(); // (1, 9, v)
    let mut cache = p.model.new_cache(1, 16, &Device::Cpu).unwrap();
    let step = |cache: &mut meet::models::KvCache, toks: &[u32]| {
        let inp = AttentionInputs::new(1, toks.len(), cache.len, None).unwrap();
        let h = p.model.forward_embeds(&p.model.embed(&ids(&[toks])).unwrap(), &inp, Some(cache)).unwrap();
        p.model.lm_head(&h).unwrap()
    };
    let prefill = step(&mut cache, &seq[..5]);
    assert!(max_diff(&prefill, &full.narrow(1, 0, 5).unwrap()) < 1e-5);
    for i in 5..seq.len() {
        let l = step(&mut cache, &seq[i..i + 1]);
        assert!(max_diff(&l, &full.narrow(1, i, 1).unwrap()) < 1e-5, "step {i}");
    }
    // The cache refuses to overflow.
    let mut small = p.model.new_cache(1, 4, &Device::Cpu).unwrap();
    step(&mut small, &seq[..4]);
    let inp = AttentionInputs::new(1, 1, 4, None).unwrap();
    let err = p.model.forward_embeds(&p.model.embed(&ids(&[&[1]])).unwrap(), &inp, Some(&mut small));
    assert!(err.err().unwrap().to_string().contains("KV cache capacity"));
}

#[test]
fn left_padded_batches_generate_what_single_rows_do() {
    let p = Pretrained::from_raw(tiny_raw(4, 64), &LoadOptions::default()).unwrap();
    let prompts: Vec<Vec<u32>> = vec![vec![5, 9, 13], vec![200, 3, 4, 5, 6, 7, 8], vec![42]];
    let params = SamplingParams { max_new_tokens: 12, ..Default::default() };
    let run = |ps: &[Vec<u32>]| {
        generate(p.model.as_ref(), &p.tokenizer, ps, &params, &p.generation, &Device::Cpu, |_, _| Ok(())).unwrap()
    };
    let batch = run(&prompts);
    for (i, prompt) in prompts.iter().enumerate() {
        let single = run(std::slice::from_ref(prompt));
        assert_eq!(batch[i].tokens, single[0].tokens, "row {i}");
        assert_eq!(batch[i].finish, single[0].finish, "row {i}");
    }
    // Padded logits equal unpadded ones at the real positions.
    let padded = ids(&[&[256, 256, 256, 256, 5, 9, 13]]);
    let mask = vec![vec![0u8, 0, 0, 0, 1, 1, 1]];
    let inp = AttentionInputs::new(1, 7, 0, Some(&mask)).unwrap();
    let h = p.model.forward_embeds(&p.model.embed(&padded).unwrap(), &inp, None).unwrap();
    let a = p.model.lm_head(&h.i((.., 4.., ..)).unwrap()).unwrap();
    let b = p.model.forward(&ids(&[&[5, 9, 13]])).unwrap();
    assert!(max_diff(&a, &b) < 1e-5);
}

#[test]
fn sampling_is_seeded_and_stops_where_asked() {
    let p = Pretrained::from_raw(tiny_raw(5, 64), &LoadOptions::default()).unwrap();
    let prompt = vec![vec![10u32, 20, 30]];
    let gen = |params: &SamplingParams| {
        generate(p.model.as_ref(), &p.tokenizer, &prompt, params, &p.generation, &Device::Cpu, |_, _| Ok(())).unwrap()
    };
    let sampled =
        SamplingParams { temperature: 1.0, top_p: Some(0.9), seed: 11, max_new_tokens: 16, ..Default::default() };
    assert_eq!(gen(&sampled)[0].tokens, gen(&sampled)[0].tokens);
    let other = gen(&SamplingParams { seed: 12, ..sampled.clone() });
    assert_ne!(gen(&sampled)[0].tokens, other[0].tokens, "different seeds should differ on a random model");
    // A stop string cuts the text before it and ends the row.
    let free = gen(&SamplingParams { max_new_tokens: 16, ..Default::default() });
    let text = free[0].text.clone();
    let stop: String = text.chars().skip(3).take(2).collect();
    let stopped = gen(&SamplingParams { max_new_tokens: 16, stop_strings: vec![stop.clone()], ..Default::default() });
    assert_eq!(stopped[0].finish, meet::generate::FinishReason::Stop);
    assert_eq!(stopped[0].text, text[..text.find(&stop).unwrap()]);
    // Suppressed tokens are never picked, greedy or sampled.
    let banned: Vec<u32> = free[0].tokens.clone();
    for t in [0.0, 1.0] {
        let g = gen(&SamplingParams {
            temperature: t,
            max_new_tokens: 16,
            suppress_tokens: banned.clone(),
            ..sampled.clone()
        });
        assert!(g[0].tokens.iter().all(|x| !banned.contains(x)), "{:?} vs {banned:?}", g[0].tokens);
    }
    // The token budget.
    assert_eq!(free[0].tokens.len(), 16);
    assert_eq!(free[0].finish, meet::generate::FinishReason::Length);
}

#[test]
fn too_long_prompts_are_refused() {
    let p = Pretrained::from_raw(tiny_raw(6, 16), &LoadOptions::default()).unwrap();
    let long: Vec<u32> = (0..20).collect();
    let err = generate(
        p.model.as_ref(),
        &p.tokenizer,
        std::slice::from_ref(&long),
        &SamplingParams::default(),
        &p.generation,
        &Device::Cpu,
        |_, _| Ok(()),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("20 tokens") && err.contains("context of 16"), "{err}");
    let err = p.model.forward(&ids(&[&long])).unwrap_err().to_string();
    assert!(err.contains("longer than the model's context of 16"), "{err}");
    // A prompt that fits but leaves room for only 3 new tokens stops at the context.
    let fits: Vec<u32> = (0..13).collect();
    let out = generate(
        p.model.as_ref(),
        &p.tokenizer,
        &[fits],
        &SamplingParams { max_new_tokens: 50, ..Default::default() },
        &p.generation,
        &Device::Cpu,
        |_, _| Ok(()),
    )
    .unwrap();
    assert!(out[0].tokens.len() <= 3);
}

#[test]
fn packed_weights_give_the_dense_logits_of_their_values() {
    // Round every matrix to Q8_0, then compare the packed kernels with a dense model holding the
    // same (dequantized) values.
    use meet::nn::packed::{PackedFormat, PackedWeight};
    let raw = tiny_raw(7, 64);
    let mut dense = raw.clone();
    let mut packed = raw.clone();
    for (name, t) in raw.tensors.iter().filter(|(_, t)| t.rank() == 2) {
        let (n, k) = t.dims2().unwrap();
        let p = PackedWeight::quantize(PackedFormat::Q8_0, n, k, &t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
            .unwrap();
        dense.tensors.insert(name.clone(), Tensor::from_vec(p.dequantize(), (n, k), &Device::Cpu).unwrap());
        packed.tensors.remove(name);
        packed.packed.insert(name.clone(), std::sync::Arc::new(p));
    }
    let a = Pretrained::from_raw(dense, &LoadOptions::default()).unwrap();
    let b = Pretrained::from_raw(packed, &LoadOptions::default()).unwrap();
    let x = ids(&[&[1, 5, 9, 33, 7, 2, 90, 4]]);
    let la = a.model.forward(&x).unwrap();
    let lb = b.model.forward(&x).unwrap();
    assert!(max_diff(&la, &lb) < 1e-4, "{}", max_diff(&la, &lb));
    // And single-row decoding (the fused gemv path).
    let l1 = a.model.forward(&ids(&[&[9]])).unwrap();
    let l2 = b.model.forward(&ids(&[&[9]])).unwrap();
    assert!(max_diff(&l1, &l2) < 1e-4);
    assert_eq!(la.dtype(), DType::F32);
    let _ = la.argmax(D::Minus1).unwrap();
}
