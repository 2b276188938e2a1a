//! Shared helpers: a tiny random Llama with a byte-level tokenizer, and the real model's path.
#![allow(dead_code)]

use candle_core::{Device, Tensor};
use meet::io::generation::GenerationDefaults;
use meet::models::pretrained::RawModel;
use meet::tokenizer::Tokenizer;
use serde_json::json;
use std::path::PathBuf;
use std::str::FromStr;

/// The SmolLM2 GGUF that `scripts/fetch-model.sh` downloads.
pub fn smollm2() -> String {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(p.is_file(), "{} is missing: run scripts/fetch-model.sh first", p.display());
    p.to_string_lossy().into_owned()
}

/// A 2-layer Llama config with GQA (4 query heads, 2 kv heads), vocab 300.
pub fn tiny_config(max_positions: usize) -> serde_json::Value {
    json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 300,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": max_positions,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": true,
        "initializer_range": 0.2,
        "bos_token_id": 257,
        "eos_token_id": 258,
    })
}

/// Byte-level BPE without merges: one token per byte (ids 0..256), plus ChatML specials.
pub fn tiny_tokenizer() -> Tokenizer {
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    let mut alphabet: Vec<char> = ByteLevel::alphabet().into_iter().collect();
    alphabet.sort();
    let vocab: serde_json::Map<String, serde_json::Value> =
        alphabet.iter().enumerate().map(|(i, c)| (c.to_string(), json!(i))).collect();
    let special = |id: usize, s: &str| json!({"id": id, "content": s, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true});
    let tj = json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [special(256, "<|endoftext|>"), special(257, "<|im_start|>"), special(258, "<|im_end|>")],
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "vocab": vocab, "merges": []}
    });
    Tokenizer {
        inner: tokenizers::Tokenizer::from_str(&tj.to_string()).expect("tiny tokenizer"),
        chat_template: Some(
            "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}".into(),
        ),
        bos_token: Some("<|im_start|>".into()),
        eos_token: Some("<|im_end|>".into()),
        pad_token: Some("<|endoftext|>".into()),
        unk_token: None,
        extra_config: Default::default(),
    }
}

/// A tiny random model as it would be read from a source.
pub fn tiny_raw(seed: u64, max_positions: usize) -> RawModel {
    let config = tiny_config(max_positions);
    let tensors = meet::models::random_weights(&config, seed, &Device::Cpu).unwrap();
    let tokenizer = tiny_tokenizer();
    let mut generation = GenerationDefaults::from_config(&config, tokenizer.eos_id());
    generation.pad_token_id = Some(256);
    RawModel { config, tensors, packed: Default::default(), tokenizer, generation, origin: PathBuf::from("<tiny>") }
}

/// Largest absolute difference between two tensors.
pub fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
}

/// Checks autograd against central finite differences for every `(name, var)`, at each tensor's
/// largest-gradient coordinate (so a wrong backward pass cannot hide in noise).
pub fn check_finite_differences(vars: &[(String, candle_core::Var)], loss: &dyn Fn() -> Tensor) {
    let grads = loss().backward().unwrap();
    let h = 1e-2f32;
    for (name, var) in vars {
        let shape = var.shape().clone();
        let w0 = var.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"))
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let i = (0..g.len()).max_by(|&a, &b| g[a].abs().total_cmp(&g[b].abs())).unwrap();
        assert!(g[i] != 0.0, "{name}: gradient is zero everywhere");
        let at = |delta: f32| {
            let mut w = w0.clone();
            w[i] += delta;
            var.set(&Tensor::from_vec(w, shape.clone(), &Device::Cpu).unwrap()).unwrap();
            loss().to_scalar::<f32>().unwrap()
        };
        let numeric = (at(h) - at(-h)) / (2.0 * h);
        var.set(&Tensor::from_vec(w0, shape.clone(), &Device::Cpu).unwrap()).unwrap();
        // f32 central differences: rounding ~ eps * loss / h ~ 4e-5.
        let tol = 2e-4 + 1e-2 * g[i].abs();
        assert!((numeric - g[i]).abs() <= tol, "{name}[{i}]: finite difference {numeric} vs autograd {}", g[i]);
    }
}

/// A LoRA config of rank `r` (alpha 2r, no dropout) on `targets`.
pub fn lora_config(r: usize, targets: &[&str]) -> meet::peft::lora::LoraConfig {
    meet::peft::lora::LoraConfig {
        r,
        alpha: 2.0 * r as f64,
        dropout: 0.0,
        target_modules: targets.iter().map(|s| s.to_string()).collect(),
        use_rslora: false,
        fan_in_fan_out: false,
    }
}

/// Normal values with standard deviation `std`, seeded by `name` so that every run checks the same
/// numbers (candle's `randn` draws from an unseeded generator).
pub fn seeded_normal(name: &str, std: f64, shape: &candle_core::Shape) -> Tensor {
    use rand::SeedableRng;
    use rand_distr::Distribution;
    let seed = name.bytes().fold(7u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64));
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let normal = rand_distr::Normal::new(0.0, std).unwrap();
    let v: Vec<f32> = (0..shape.elem_count()).map(|_| normal.sample(&mut rng) as f32).collect();
    Tensor::from_vec(v, shape.clone(), &Device::Cpu).unwrap()
}

/// `meet serve` on a free loopback port as a child process, killed when dropped.
pub struct ServeChild {
    pub child: std::process::Child,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
}

impl Drop for ServeChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `meet serve --model MODEL EXTRA...` on a free port.
pub fn serve_child(model: &str, extra: &[&str]) -> ServeChild {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_meet"));
    cmd.args(["serve", "--model", model, "--addr", "127.0.0.1:0"]).args(extra).env_remove("MEET_API_KEY");
    listening(cmd)
}

/// Spawns a `meet serve` command and waits until it listens; its stderr is drained in the
/// background.
pub fn listening(mut cmd: std::process::Command) -> ServeChild {
    use std::io::{BufRead, BufReader};
    let mut child = cmd
        .env("RAYON_NUM_THREADS", "2")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let url = loop {
        let line = lines.next().expect("meet serve ended before listening").unwrap();
        if let Some(rest) = line.split("on http://").nth(1) {
            break format!("http://{}", rest.split_whitespace().next().unwrap().trim_end_matches("/v1"));
        }
    };
    std::thread::spawn(move || lines.for_each(drop));
    ServeChild { child, url }
}

/// The step lines of a run's `metrics.jsonl`.
pub fn metrics(out: &std::path::Path) -> Vec<meet::train::StepLog> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}
