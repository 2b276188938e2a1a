//! Model sources (HF folders, sharded folders, the HF cache, GGUF) and the errors bad input gets.

mod common;

use candle_core::{Device, Tensor};
use common::{max_diff, tiny_raw};
use meet::models::pretrained::save_hf_folder;
use meet::LoadOptions;
use meet::Pretrained;
use std::path::Path;

fn logits(p: &Pretrained) -> Tensor {
    let x = Tensor::new(&[[3u32, 70, 12, 5, 199, 42]], &Device::Cpu).unwrap();
    p.model.forward(&x).unwrap()
}

fn load(path: &Path) -> meet::Result<Pretrained> {
    Pretrained::load(path.to_str().unwrap(), &LoadOptions::default())
}

fn err(path: &Path) -> String {
    match load(path) {
        Ok(_) => panic!("{} loaded but should not", path.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn hf_folder_round_trip_is_exact() {
    let dir = tempfile::tempdir().unwrap();
    let raw = tiny_raw(1, 64);
    let want = logits(&Pretrained::from_raw(raw.clone(), &LoadOptions::default()).unwrap());
    save_hf_folder(&raw, dir.path()).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
        assert!(dir.path().join(f).is_file(), "{f} missing");
    }
    let back = load(dir.path()).unwrap();
    assert_eq!(max_diff(&logits(&back), &want), 0.0);
    assert_eq!(
        back.tokenizer.encode("héllo <|im_end|>", false).unwrap(),
        raw.tokenizer.encode("héllo <|im_end|>", false).unwrap()
    );
    assert_eq!(back.tokenizer.chat_template, raw.tokenizer.chat_template);
    assert_eq!(back.generation.eos_token_ids, vec![258]);
    // Tied embeddings are stored once, as transformers does.
    let st = std::fs::read(dir.path().join("model.safetensors")).unwrap();
    let names: Vec<String> =
        safetensors::SafeTensors::deserialize(&st).unwrap().names().into_iter().map(String::from).collect();
    assert!(!names.iter().any(|n| n == "lm_head.weight"));
}

#[test]
fn sharded_folders_load_like_single_files() {
    let dir = tempfile::tempdir().unwrap();
    let raw = tiny_raw(2, 64);
    save_hf_folder(&raw, dir.path()).unwrap();
    let want = logits(&load(dir.path()).unwrap());
    // Split the tensors over two shards with an index, as transformers writes big models.
    let all = candle_core::safetensors::load(dir.path().join("model.safetensors"), &Device::Cpu).unwrap();
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    let mut names: Vec<&String> = all.keys().collect();
    names.sort();
    let mut weight_map = serde_json::Map::new();
    for (i, chunk) in names.chunks(names.len() / 2 + 1).enumerate() {
        let file = format!("model-{:05}-of-00002.safetensors", i + 1);
        let part: std::collections::HashMap<String, Tensor> =
            chunk.iter().map(|n| ((*n).clone(), all[*n].clone())).collect();
        candle_core::safetensors::save(&part, dir.path().join(&file)).unwrap();
        for n in chunk {
            weight_map.insert((*n).clone(), serde_json::json!(file));
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(dir.path().join("model.safetensors.index.json"), index.to_string()).unwrap();
    assert_eq!(max_diff(&logits(&load(dir.path()).unwrap()), &want), 0.0);
    // An index that names a tensor no shard holds is refused.
    let mut broken = index.clone();
    broken["weight_map"]["model.layers.9.mlp.up_proj.weight"] = serde_json::json!("model-00001-of-00002.safetensors");
    std::fs::write(dir.path().join("model.safetensors.index.json"), broken.to_string()).unwrap();
    let e = err(dir.path());
    assert!(e.contains("model.safetensors.index.json") && e.contains("model.layers.9.mlp.up_proj.weight"), "{e}");
}

/// Lays out an HF cache entry (`models--org--name/{refs/main, snapshots/<rev>/...}`) for `src`.
fn fake_hub_cache(cache: &Path, repo: &str, src: &Path) {
    let folder = cache.join(format!("models--{}", repo.replace('/', "--")));
    let rev = "0123456789abcdef0123456789abcdef01234567";
    std::fs::create_dir_all(folder.join("refs")).unwrap();
    std::fs::write(folder.join("refs/main"), rev).unwrap();
    let snap = folder.join("snapshots").join(rev);
    std::fs::create_dir_all(&snap).unwrap();
    for f in std::fs::read_dir(src).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, snap.join(f.file_name().unwrap())).unwrap();
    }
}

#[test]
fn hub_repo_ids_resolve_through_the_local_cache() {
    let src = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let raw = tiny_raw(3, 64);
    save_hf_folder(&raw, src.path()).unwrap();
    fake_hub_cache(cache.path(), "meet-test/tiny-llama", src.path());
    let snap = meet::io::hub::snapshot_in(hf_hub::Cache::new(cache.path().to_path_buf()), "meet-test/tiny-llama", true)
        .unwrap();
    let p = load(&snap).unwrap();
    assert_eq!(max_diff(&logits(&p), &logits(&load(src.path()).unwrap())), 0.0);
    // A repo that is not cached, offline: the error names the file and the cache.
    let e = meet::io::hub::snapshot_in(hf_hub::Cache::new(cache.path().to_path_buf()), "meet-test/absent", true)
        .unwrap_err()
        .to_string();
    assert!(e.contains("meet-test/absent") && e.contains("config.json") && e.contains("HF_HUB_OFFLINE"), "{e}");
}

#[test]
fn folder_errors_name_the_file_and_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    save_hf_folder(&tiny_raw(4, 64), dir.path()).unwrap();
    let cfg = dir.path().join("config.json");
    let good_cfg = std::fs::read_to_string(&cfg).unwrap();

    std::fs::remove_file(&cfg).unwrap();
    assert!(err(dir.path()).contains("no config.json"));

    std::fs::write(&cfg, "{ not json").unwrap();
    let e = err(dir.path());
    assert!(e.contains("config.json") && e.contains("invalid JSON"), "{e}");

    let mut v: serde_json::Value = serde_json::from_str(&good_cfg).unwrap();
    v.as_object_mut().unwrap().remove("hidden_size");
    std::fs::write(&cfg, v.to_string()).unwrap();
    let e = err(dir.path());
    assert!(e.contains("config.json") && e.contains("hidden_size"), "{e}");

    let mut v: serde_json::Value = serde_json::from_str(&good_cfg).unwrap();
    v["model_type"] = serde_json::json!("mamba");
    std::fs::write(&cfg, v.to_string()).unwrap();
    let e = err(dir.path());
    assert!(e.contains("unsupported model_type 'mamba'"), "{e}");

    let mut v: serde_json::Value = serde_json::from_str(&good_cfg).unwrap();
    v["num_hidden_layers"] = serde_json::json!(3);
    std::fs::write(&cfg, v.to_string()).unwrap();
    let e = err(dir.path());
    assert!(e.contains("missing tensor 'model.layers.2"), "{e}");
    std::fs::write(&cfg, &good_cfg).unwrap();

    // Truncated weights.
    let st = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    std::fs::write(&st, &bytes[..bytes.len() / 2]).unwrap();
    let e = err(dir.path());
    assert!(e.contains("model.safetensors") && e.contains("truncated"), "{e}");

    // A tensor type meet does not read.
    let ints = Tensor::new(&[1i64, 2, 3], &Device::Cpu).unwrap();
    candle_core::safetensors::save(&std::collections::HashMap::from([("model.norm.weight".to_string(), ints)]), &st)
        .unwrap();
    let e = err(dir.path());
    assert!(e.contains("model.norm.weight") && e.contains("unsupported tensor type I64"), "{e}");

    // Misshapen tensor.
    let mut all = tiny_raw(4, 64).tensors;
    all.insert("model.norm.weight".into(), Tensor::zeros(31, candle_core::DType::F32, &Device::Cpu).unwrap());
    candle_core::safetensors::save(&all, &st).unwrap();
    let e = err(dir.path());
    assert!(e.contains("model.norm.weight") && e.contains("32"), "{e}");
}

#[test]
fn unusable_model_arguments_are_explained() {
    let e = Pretrained::load("/no/such/place", &LoadOptions::default()).err().unwrap().to_string();
    assert!(e.contains("/no/such/place") && e.contains("no such file"), "{e}");
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("weights.bin");
    std::fs::write(&f, b"not a model").unwrap();
    let e = err(&f);
    assert!(e.contains("weights.bin") && e.contains("not a GGUF file"), "{e}");
}

fn gguf_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

#[test]
fn gguf_errors_name_the_file_and_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    // A tensor of type 20 (IQ4_NL), which meet cannot read.
    let path = dir.path().join("iq4.gguf");
    let mut b = b"GGUF".to_vec();
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&1u64.to_le_bytes()); // tensors
    b.extend_from_slice(&1u64.to_le_bytes()); // metadata entries
    gguf_string(&mut b, "general.architecture");
    b.extend_from_slice(&8u32.to_le_bytes()); // string
    gguf_string(&mut b, "llama");
    gguf_string(&mut b, "token_embd.weight");
    b.extend_from_slice(&2u32.to_le_bytes());
    b.extend_from_slice(&32u64.to_le_bytes());
    b.extend_from_slice(&4u64.to_le_bytes());
    b.extend_from_slice(&20u32.to_le_bytes());
    b.extend_from_slice(&0u64.to_le_bytes());
    b.resize(b.len().next_multiple_of(32) + 4 * 18, 0);
    std::fs::write(&path, &b).unwrap();
    let e = err(&path);
    assert!(e.contains("iq4.gguf") && e.contains("unsupported GGUF tensor type 20 (IQ4_NL)"), "{e}");

    // An architecture meet does not implement.
    use candle_core::quantized::{gguf_file, QTensor};
    let path = dir.path().join("gpt2.gguf");
    let t = QTensor::quantize(
        &Tensor::zeros((4, 32), candle_core::DType::F32, &Device::Cpu).unwrap(),
        candle_core::quantized::GgmlDType::F32,
    )
    .unwrap();
    let arch = gguf_file::Value::String("gpt2".into());
    let mut f = std::fs::File::create(&path).unwrap();
    gguf_file::write(&mut f, &[("general.architecture", &arch)], &[("token_embd.weight", &t)]).unwrap();
    drop(f);
    let e = err(&path);
    assert!(e.contains("gpt2.gguf") && e.contains("unsupported GGUF architecture 'gpt2'"), "{e}");

    // A truncated file.
    let real = std::fs::read(&path).unwrap();
    let cut = dir.path().join("cut.gguf");
    std::fs::write(&cut, &real[..40]).unwrap();
    let e = err(&cut);
    assert!(e.contains("cut.gguf") && e.contains("GGUF"), "{e}");
}

#[test]
fn hf_folders_match_transformers_for_llama3_rope_biases_and_qwen2() {
    // Tiny random models saved by transformers (scripts/make_tiny_fixtures.py) with its logits.
    for name in ["tiny-llama3", "tiny-qwen2"] {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name);
        let expected: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("expected_logits.json")).unwrap()).unwrap();
        let ids: Vec<u32> = expected["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        let want: Vec<f32> = expected["logits"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|r| r.as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32))
            .collect();
        let p = load(&dir).unwrap();
        let x = Tensor::from_vec(ids.clone(), (1, ids.len()), &Device::Cpu).unwrap();
        let got = p.model.forward(&x).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(got.len(), want.len());
        let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst < 1e-4, "{name}: max |logit - transformers| = {worst}");
    }
}
