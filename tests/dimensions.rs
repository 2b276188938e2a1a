//! Several preference dimensions in one model: controls of different dimensions composed in one
//! forward pass — LoRA deltas summed with weights, soft prompts one after another — and rows of one
//! batch under different combinations, each as if alone. Plus the control selection syntax and the
//! data fields that name dimensions.

mod common;

use candle_core::{Device, Tensor};
use common::{lora_config, max_diff, seeded_normal, tiny_raw, tiny_tokenizer};
use meet::data::preference::{read_preferences, PreferenceOptions};
use meet::data::{read_supervised, SupervisedOptions};
use meet::methods::spec::{ControlKind, ControlSpec, Dimension};
use meet::peft::lora::{Adapters, Routing, TARGETABLE};
use meet::peft::prompt::{PromptConfig, SoftPrompts};
use meet::policy::{Batch, Policy, RowControls};
use meet::{LoadOptions, Pretrained};

const SEED: u64 = 21;

/// A tiny model with two adapters of two dimensions (`positive` on every linear layer, `concise`
/// on three), both with non-zero A and B.
fn two_adapters() -> (Policy, std::sync::Arc<Adapters>) {
    let adapters = Adapters::new(
        vec![
            ("positive".into(), lora_config(4, TARGETABLE)),
            ("concise".into(), lora_config(2, &["q_proj", "v_proj", "down_proj"])),
        ],
        5,
    )
    .unwrap();
    let p = Pretrained::from_raw(
        tiny_raw(SEED, 64),
        &LoadOptions { adapters: Some(adapters.source()), ..Default::default() },
    )
    .unwrap();
    for (k, v) in adapters.varmap.data().lock().unwrap().iter() {
        v.set(&seeded_normal(k, 0.2, v.shape())).unwrap();
    }
    (Policy { pretrained: p, lora: Some(adapters.clone()), prompts: None }, adapters)
}

/// Logits of the real tokens of every row of `rows` (token ids), each row under its controls.
fn logits(policy: &Policy, rows: &[Vec<u32>], controls: Option<Vec<RowControls>>) -> Vec<Tensor> {
    let mut batch = Batch::from_rows(&rows.iter().map(|r| (r.clone(), 0)).collect::<Vec<_>>(), 0).unwrap();
    batch.controls = controls;
    let (h, n) = policy.hidden(&batch).unwrap();
    let all = policy.pretrained.model.lm_head(&h.narrow(1, n, batch.t).unwrap()).unwrap();
    rows.iter().enumerate().map(|(r, ids)| all.narrow(0, r, 1).unwrap().narrow(1, 0, ids.len()).unwrap()).collect()
}

fn ids() -> Vec<Vec<u32>> {
    vec![vec![3, 70, 12, 5, 199, 42], vec![9, 8, 100, 31], vec![44, 144, 14, 41, 240]]
}

#[test]
fn two_lora_controls_together_equal_the_base_with_both_deltas_merged() {
    let (policy, adapters) = two_adapters();
    let rows = &ids()[..1];
    // positive at weight 1 and concise at weight 0.5, both active.
    let both = vec![vec![(0, 1.0), (1, 0.5)]];
    let composed = logits(&policy, rows, Some(both)).remove(0);
    // The same through Routing::Several (what generation routes for a whole batch).
    adapters.route(Routing::Several(vec![(0, 1.0), (1, 0.5)]));
    let ids = Tensor::new(rows[0].as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let several = policy.pretrained.model.forward(&ids).unwrap();
    // The merged model: W + 1.0 · s_p B_p A_p + 0.5 · s_c B_c A_c for every wrapped module.
    let mut raw = tiny_raw(SEED, 64);
    for (i, weight) in [(0usize, 1.0f64), (1, 0.5)] {
        let scale = adapters.configs[i].scale() * weight;
        let t: std::collections::HashMap<String, Tensor> = adapters.tensors(i).unwrap().into_iter().collect();
        let mut merged = 0;
        for (name, a) in &t {
            let Some(path) = name.strip_suffix(".lora_A.weight") else { continue };
            let b = &t[&format!("{path}.lora_B.weight")];
            let key = format!("{path}.weight");
            let w = &raw.tensors[&key];
            let nw = (w + (b.matmul(a).unwrap() * scale).unwrap()).unwrap();
            raw.tensors.insert(key, nw);
            merged += 1;
        }
        assert_eq!(merged, if i == 0 { 2 * 7 } else { 2 * 3 }, "adapter {i} wraps every targeted module of 2 layers");
    }
    let merged = Pretrained::from_raw(raw, &LoadOptions::default()).unwrap();
    let expected = merged.model.forward(&ids).unwrap();
    let plain = {
        adapters.route(Routing::Off);
        policy.pretrained.model.forward(&ids).unwrap()
    };
    assert!(max_diff(&plain, &expected) > 1e-2, "the deltas must matter for this test to mean anything");
    let d = max_diff(&composed.squeeze(0).unwrap(), &expected.squeeze(0).unwrap());
    assert!(d < 1e-5, "both adapters active vs both merged: {d}");
    assert!(max_diff(&several, &expected) < 1e-5, "Routing::Several vs merged");
}

#[test]
fn a_batch_mixing_lora_combinations_equals_each_row_alone() {
    let (policy, _) = two_adapters();
    let rows = ids();
    let combos: Vec<RowControls> = vec![vec![(0, 1.0), (1, 1.0)], vec![(1, 0.25)], vec![]];
    let mixed = logits(&policy, &rows, Some(combos.clone()));
    for r in 0..rows.len() {
        let alone = logits(&policy, &rows[r..r + 1], Some(vec![combos[r].clone()])).remove(0);
        let d = max_diff(&mixed[r], &alone);
        // Different batch sizes take different gemm blockings: equal up to f32 rounding.
        assert!(d < 1e-5, "row {r} in the mixed batch vs alone: {d}");
    }
    // And the combinations differ from one another (the routing is not ignored).
    let one = logits(&policy, &rows[..1], Some(vec![vec![(0, 1.0)]])).remove(0);
    assert!(max_diff(&mixed[0], &one) > 1e-3);
}

/// A tiny model with soft prompts `names`, `n` virtual tokens each, filled with `fill(name)`.
fn prompt_policy(names: &[&str], n: usize, fill: &dyn Fn(&str) -> Tensor) -> Policy {
    let p = Pretrained::from_raw(tiny_raw(SEED, 64), &LoadOptions::default()).unwrap();
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    let cfg = PromptConfig { n, ..Default::default() };
    let prompts = SoftPrompts::new(&names, &cfg, p.model.as_ref(), &p.tokenizer, 3, &Device::Cpu).unwrap();
    for (i, name) in names.iter().enumerate() {
        prompts.load(i, &fill(name)).unwrap();
    }
    Policy { pretrained: p, lora: None, prompts: Some(prompts) }
}

#[test]
fn two_soft_prompts_together_equal_one_prompt_holding_both() {
    let hidden = 32;
    let part = |name: &str| seeded_normal(name, 1.0, &(3, hidden).into());
    let two = prompt_policy(&["positive", "concise"], 3, &part);
    let joined = Tensor::cat(&[part("positive"), part("concise")], 0).unwrap();
    let one = prompt_policy(&["both"], 6, &|_| joined.clone());
    let rows = &ids()[..1];
    let composed = logits(&two, rows, Some(vec![vec![(0, 1.0), (1, 1.0)]])).remove(0);
    let single = logits(&one, rows, Some(vec![vec![(0, 1.0)]])).remove(0);
    let d = max_diff(&composed, &single);
    assert!(d < 1e-6, "two prompts vs one holding both: {d}");
    // Order is the row's (dimension) order: the other order is another prefix.
    let swapped = logits(&two, rows, Some(vec![vec![(1, 1.0), (0, 1.0)]])).remove(0);
    assert!(max_diff(&swapped, &single) > 1e-4);
    // Weights are for LoRA controls only.
    let mut batch = Batch::from_rows(&[(rows[0].clone(), 0)], 0).unwrap();
    batch.controls = Some(vec![vec![(0, 0.5)]]);
    let err = two.hidden(&batch).err().unwrap().to_string();
    assert!(err.contains("soft prompts take no weights"), "{err}");
}

#[test]
fn a_batch_mixing_soft_prompt_combinations_equals_each_row_alone() {
    let two = prompt_policy(&["positive", "concise"], 3, &|name| seeded_normal(name, 1.0, &(3, 32).into()));
    let rows = ids();
    // Two prompts, one, none: the shorter prefixes are padded and masked.
    let combos: Vec<RowControls> = vec![vec![(0, 1.0), (1, 1.0)], vec![(1, 1.0)], vec![]];
    let mixed = logits(&two, &rows, Some(combos.clone()));
    for r in 0..rows.len() {
        let alone = logits(&two, &rows[r..r + 1], Some(vec![combos[r].clone()])).remove(0);
        let d = max_diff(&mixed[r], &alone);
        assert!(d < 1e-5, "row {r} in the mixed batch vs alone: {d}");
    }
    let plain = Pretrained::from_raw(tiny_raw(SEED, 64), &LoadOptions::default()).unwrap();
    let ids = Tensor::new(rows[2].as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let d = max_diff(&mixed[2], &plain.model.forward(&ids).unwrap());
    assert!(d < 1e-5, "a row without controls is the plain model: {d}");
}

fn spec(kind: ControlKind) -> ControlSpec {
    ControlSpec {
        method: "meet".into(),
        kind,
        names: ["concise", "verbose", "negative", "positive"].map(String::from).to_vec(),
        markers: vec![],
        base_model: "m".into(),
        stop_strings: vec![],
        dimensions: vec![
            Dimension { name: "length".into(), controls: vec!["concise".into(), "verbose".into()] },
            Dimension { name: "sentiment".into(), controls: vec!["negative".into(), "positive".into()] },
        ],
        score_stats: vec![],
    }
}

#[test]
fn control_selections_parse_into_dimension_order() {
    let s = spec(ControlKind::Lora);
    assert_eq!(s.select("positive").unwrap(), vec![(3, 1.0)]);
    // Dimension order (length, sentiment), whatever the order written.
    assert_eq!(s.select("positive, concise").unwrap(), vec![(0, 1.0), (3, 1.0)]);
    assert_eq!(s.select("sentiment=positive:1.0,length=concise:0.5").unwrap(), vec![(0, 0.5), (3, 1.0)]);
    let err = |t: &str| s.select(t).err().unwrap().to_string();
    assert!(err("positive,negative").contains("both of dimension 'sentiment'"), "{}", err("positive,negative"));
    assert!(err("length=positive").contains("of dimension 'sentiment', not 'length'"));
    assert!(err("tone=positive").contains("unknown dimension 'tone' (this model has: length, sentiment)"));
    assert!(err("happy").contains("unknown control 'happy'"));
    assert!(err("positive:x").contains("weight 'x' is not a number"));
    assert!(err("positive:inf").contains("not finite"));
    assert!(err("positive,").contains("empty item"));
    // Weights scale LoRA deltas; a soft prompt or a token cannot be weighted.
    let p = spec(ControlKind::SoftPrompt);
    assert_eq!(p.select("concise,positive").unwrap(), vec![(0, 1.0), (3, 1.0)]);
    assert!(p.select("positive:0.5").err().unwrap().to_string().contains("weights are for LoRA controls"));
}

#[test]
fn data_rows_name_their_dimension_or_their_controls() {
    let tok = tiny_tokenizer();
    let dir = tempfile::tempdir().unwrap();
    // Supervised rows: a control per dimension.
    let opts = SupervisedOptions {
        max_length: 32,
        controls: ["concise", "verbose", "negative", "positive"].map(String::from).to_vec(),
        dimensions: vec![
            ("length".into(), vec!["concise".into(), "verbose".into()]),
            ("sentiment".into(), vec!["negative".into(), "positive".into()]),
        ],
        scores: vec![],
        default_control: None,
        eos_id: Some(258),
        skip_invalid: false,
    };
    let path = dir.path().join("sft.jsonl");
    std::fs::write(
        &path,
        "{\"prompt\": \"a\", \"completion\": \"b\", \"controls\": {\"sentiment\": \"positive\", \"length\": \"concise\"}}\n\
         {\"prompt\": \"a\", \"completion\": \"b\", \"controls\": {\"sentiment\": \"negative\"}}\n\
         {\"prompt\": \"a\", \"completion\": \"b\"}\n",
    )
    .unwrap();
    let (ex, _) = read_supervised(&path, &tok, &opts).unwrap();
    let controls: Vec<Vec<usize>> = ex.iter().map(|e| e.controls.clone()).collect();
    assert_eq!(controls, vec![vec![0, 3], vec![2], vec![]]);
    for (row, msg) in [
        (
            "{\"prompt\": \"a\", \"completion\": \"b\", \"controls\": {\"length\": \"positive\"}}",
            "line 1: controls.length: 'positive' is not a control of 'length'",
        ),
        (
            "{\"prompt\": \"a\", \"completion\": \"b\", \"controls\": {\"tone\": \"x\"}}",
            "line 1: unknown dimension 'tone'",
        ),
        (
            "{\"prompt\": \"a\", \"completion\": \"b\", \"controls\": [\"x\"]}",
            "line 1: field 'controls' must be an object",
        ),
        (
            "{\"prompt\": \"a\", \"completion\": \"b\", \"control\": \"positive\", \"controls\": {}}",
            "line 1: give 'control' or 'controls', not both",
        ),
    ] {
        std::fs::write(&path, format!("{row}\n")).unwrap();
        let err = read_supervised(&path, &tok, &opts).err().unwrap().to_string();
        assert!(err.contains(msg) && err.contains("sft.jsonl"), "{err}");
    }
    // Preference records name their dimension; the run's dimensions check it.
    let path = dir.path().join("pairs.jsonl");
    std::fs::write(
        &path,
        "{\"prompt\": \"a\", \"chosen\": \"b\", \"rejected\": \"c\", \"dimension\": \"length\"}\n\
         {\"prompt\": \"a\", \"chosen\": \"b\", \"rejected\": \"c\", \"dimension\": \"sentiment\"}\n",
    )
    .unwrap();
    let dims = PreferenceOptions { dimensions: vec!["length".into(), "sentiment".into()], ..Default::default() };
    let (pairs, _) = read_preferences(&path, &tok, &dims).unwrap();
    let got: Vec<Option<&str>> = pairs.iter().map(|p| p.dimension.as_deref()).collect();
    assert_eq!(got, vec![Some("length"), Some("sentiment")]);
    let err = read_preferences(&path, &tok, &PreferenceOptions::default()).err().unwrap().to_string();
    assert!(err.contains("line 1: the record names dimension 'length', but the run has none"), "{err}");
    std::fs::write(&path, "{\"prompt\": \"a\", \"chosen\": \"b\", \"rejected\": \"c\", \"dimension\": \"tone\"}\n")
        .unwrap();
    let err = read_preferences(&path, &tok, &dims).err().unwrap().to_string();
    assert!(err.contains("line 1: unknown dimension 'tone' (the run has: length, sentiment)"), "{err}");
    std::fs::write(&path, "{\"prompt\": \"a\", \"chosen\": \"b\", \"rejected\": \"c\"}\n").unwrap();
    let err = read_preferences(&path, &tok, &dims).err().unwrap().to_string();
    assert!(err.contains("line 1: no 'dimension'"), "{err}");
}
