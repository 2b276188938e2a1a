//! Controls at inference: how a trained model is told which preference to follow. A run saves
//! `meet_controls.json` next to its outputs; [`Controlled::load`] reads the folder back (the
//! model, its LoRA adapters / soft prompts) and [`Controlled::generate`] generates under a named
//! control, so switching `--control good` to `--control bad` switches the behaviour of one model.

pub use crate::methods::spec::{ControlKind, ControlSpec, FILE};

use crate::generate::{generate_with_prefix, Generation, SamplingParams};
use crate::objectives::logps::label_logps;
use crate::peft::folder;
use crate::peft::lora::{Adapters, Routing};
use crate::peft::prompt::SoftPrompts;
use crate::policy::{Batch, Policy, RowControls};
use crate::{Error, LoadOptions, Pretrained, Result};
use candle_core::Tensor;
use std::path::Path;

/// A model with the controls it was trained with.
pub struct Controlled {
    pub policy: Policy,
    pub spec: Option<ControlSpec>,
    /// What was loaded (`--model`), for messages.
    pub source: String,
}

/// Everything a control selection changes about generation from a batch of prompts.
pub struct Prepared {
    /// The prompts' ids, with control tokens or phrases where the method puts them.
    pub ids: Vec<Vec<u32>>,
    /// Soft-prompt embeddings `(n, hidden)` to put before every prompt.
    pub prefix: Option<Tensor>,
    /// The LoRA adapters (with weights) every row routes to; empty: as [`Controlled::row_routing`].
    pub adapters: RowControls,
    /// Strings generation stops at (Chain-of-Hindsight's feedback phrases).
    pub stop_strings: Vec<String>,
    /// Tokens never generated (control tokens).
    pub suppress_tokens: Vec<u32>,
}

/// What a control selection does to a batch of prompts: their ids (with control tokens or
/// phrases), the soft prompts to put first (in dimension order), and the LoRA adapters (with
/// weights) to route to.
struct Applied {
    ids: Vec<Vec<u32>>,
    prompts: Vec<usize>,
    adapters: RowControls,
    stop_strings: Vec<String>,
}

impl Controlled {
    /// Loads `model`: a run's output folder (with `meet_controls.json`), or any model `meet`
    /// reads (no controls).
    pub fn load(model: &str, opts: &LoadOptions) -> Result<Self> {
        let dir = Path::new(model);
        let spec_path = dir.join(FILE);
        if !spec_path.is_file() {
            let policy = Policy::plain(Pretrained::load(model, opts)?);
            return Ok(Self { policy, spec: None, source: model.into() });
        }
        let spec = ControlSpec::read(dir)?;
        let source = if dir.join("config.json").is_file() { model.to_string() } else { spec.base_model.clone() };
        let mut opts = opts.clone();
        let lora_dir = dir.join("lora");
        let lora = if lora_dir.is_dir() {
            let adapters = folder::adapter_names(&lora_dir)?
                .iter()
                .map(|n| Ok((n.clone(), folder::read_lora(&folder::adapter_dir(&lora_dir, n))?.0)))
                .collect::<Result<Vec<_>>>()?;
            Some(Adapters::new(adapters, 0)?)
        } else {
            None
        };
        opts.adapters = lora.as_ref().map(Adapters::source);
        let pretrained = Pretrained::load(&source, &opts)?;
        if let Some(l) = &lora {
            folder::load_lora(l, &lora_dir)?;
        }
        let prompts = if spec.kind == ControlKind::SoftPrompt {
            let pdir = dir.join("prompts");
            let first = spec.names.first().ok_or_else(|| Error::format(&spec_path, "no control names"))?;
            let (cfg, _) = folder::read_prompt(&folder::adapter_dir(&pdir, first))?;
            let p = SoftPrompts::new(
                &spec.names,
                &cfg,
                pretrained.model.as_ref(),
                &pretrained.tokenizer,
                0,
                &pretrained.device,
            )?;
            folder::load_prompts(&p, &pdir)?;
            Some(p)
        } else {
            None
        };
        Ok(Self { policy: Policy { pretrained, lora, prompts }, spec: Some(spec), source: model.into() })
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &crate::tokenizer::Tokenizer {
        &self.policy.pretrained.tokenizer
    }

    /// Applies `control`: a selection as [`ControlSpec::select`] parses it (`good`, or one control
    /// per dimension, `sentiment=positive,length=concise:0.5`).
    fn apply(&self, prompts: &[Vec<u32>], control: Option<&str>) -> Result<Applied> {
        let p = &self.policy.pretrained;
        let mut out = Applied { ids: prompts.to_vec(), prompts: vec![], adapters: vec![], stop_strings: vec![] };
        let (c, spec) = match (control, &self.spec) {
            (None, _) => return Ok(out),
            (Some(c), None) => {
                return Err(Error::Invalid(format!(
                    "control '{c}' asked for, but {} has no controls (no {FILE}): runs of method sft, dpo or \
                     reward train none; controls come from meet, control-token and coh runs — leave out --control",
                    self.source
                )))
            }
            (Some(c), Some(spec)) => (c, spec),
        };
        let selected = spec.select(c)?;
        out.stop_strings = spec.stop_strings.clone();
        match spec.kind {
            ControlKind::Lora => {
                let l = self.policy.lora.as_ref().ok_or_else(|| Error::Invalid("no LoRA adapters loaded".into()))?;
                for &(i, w) in &selected {
                    let name = &spec.names[i];
                    let j = l
                        .names
                        .iter()
                        .position(|n| n == name)
                        .ok_or_else(|| Error::Invalid(format!("no LoRA adapter named '{name}' in this folder")))?;
                    out.adapters.push((j, w));
                }
            }
            ControlKind::SoftPrompt => out.prompts = selected.iter().map(|&(i, _)| i).collect(),
            // Tokens and phrases are the method's own: its recipe knows where they go.
            ControlKind::Token | ControlKind::Text | ControlKind::Scores => {
                crate::methods::find(&spec.method)?.apply_control(spec, &selected, &p.tokenizer, &mut out.ids)?
            }
        }
        Ok(out)
    }

    /// Routes the adapters for every row: the selected ones (a single one at weight 1 as
    /// [`Routing::All`]), else the only one, else none.
    pub fn route(&self, adapters: &RowControls) {
        if let Some(l) = &self.policy.lora {
            l.set_training_step(None);
            l.route(match adapters.as_slice() {
                [(j, w)] if *w == 1.0 => Routing::All(*j),
                [] if l.names.len() == 1 => Routing::All(0),
                [] => Routing::Off,
                several => Routing::Several(several.to_vec()),
            });
        }
    }

    /// Routes each batch row to its own adapters (each as [`Self::row_routing`] gives them).
    pub fn route_rows(&self, rows: &[RowControls]) {
        if let Some(l) = &self.policy.lora {
            l.set_training_step(None);
            let rows: Vec<RowControls> = rows.iter().map(|r| self.row_routing(r)).collect();
            l.route(Routing::of_rows(&rows));
        }
    }

    /// What generating under `control` takes (see [`Prepared`]), for decoders that drive the
    /// model themselves (`meet serve`'s batcher). Routes nothing.
    pub fn prepare(&self, prompts: &[Vec<u32>], control: Option<&str>) -> Result<Prepared> {
        let a = self.apply(prompts, control)?;
        let mut suppress_tokens = vec![];
        if let Some(spec) = &self.spec {
            let tok = &self.policy.pretrained.tokenizer;
            suppress_tokens.extend(crate::methods::find(&spec.method)?.suppressed_tokens(spec, tok));
        }
        // Several dimensions' prompts one after another, in dimension order.
        let prefix = match (a.prompts.as_slice(), &self.policy.prompts) {
            ([], _) => None,
            ([i], Some(sp)) => Some(sp.vars[*i].as_tensor().clone()),
            (is, Some(sp)) => {
                Some(Tensor::cat(&is.iter().map(|&i| sp.vars[i].as_tensor().clone()).collect::<Vec<_>>(), 0)?)
            }
            (_, None) => return Err(Error::Invalid("no soft prompts loaded".into())),
        };
        Ok(Prepared { ids: a.ids, prefix, adapters: a.adapters, stop_strings: a.stop_strings, suppress_tokens })
    }

    /// The routing of one row's adapters: the selected ones (a single one at weight 1 as one
    /// adapter), else the only one, else none.
    pub fn row_routing(&self, adapters: &RowControls) -> RowControls {
        match (&self.policy.lora, adapters.as_slice()) {
            (Some(l), []) if l.names.len() == 1 => vec![(0, 1.0)],
            _ => adapters.clone(),
        }
    }

    /// Generates continuations of `prompts` (token ids, as [`crate::generate::prompt_ids`] gives
    /// them) under `control` (`None`: the plain model, which a model with soft prompts or
    /// control tokens was not trained for).
    pub fn generate(
        &self,
        prompts: &[Vec<u32>],
        control: Option<&str>,
        params: &SamplingParams,
        on_token: impl FnMut(usize, u32) -> Result<()>,
    ) -> Result<Vec<Generation>> {
        let a = self.prepare(prompts, control)?;
        let mut params = params.clone();
        params.stop_strings.extend(a.stop_strings);
        params.suppress_tokens.extend(a.suppress_tokens);
        self.route(&a.adapters);
        let p = &self.policy.pretrained;
        generate_with_prefix(
            p.model.as_ref(),
            &p.tokenizer,
            &a.ids,
            a.prefix.as_ref(),
            &params,
            &p.generation,
            &p.device,
            on_token,
        )
    }

    /// Summed log-probability of each response after its prompt, under `control` (applied as in
    /// [`Self::generate`]), `batch` rows at a time.
    pub fn response_logps(
        &self,
        prompts: &[Vec<u32>],
        responses: &[Vec<u32>],
        control: Option<&str>,
        batch: usize,
    ) -> Result<Vec<f64>> {
        if prompts.len() != responses.len() {
            return Err(Error::Invalid(format!("{} prompts for {} responses", prompts.len(), responses.len())));
        }
        let a = self.apply(prompts, control)?;
        self.route(&a.adapters);
        let mut out = Vec::with_capacity(prompts.len());
        let pad = self.policy.pretrained.generation.pad_id()?;
        // The same controls for every row: the selected soft prompts, else the LoRA adapters.
        let row: RowControls =
            if a.prompts.is_empty() { a.adapters.clone() } else { a.prompts.iter().map(|&i| (i, 1.0)).collect() };
        for (ps, rs) in a.ids.chunks(batch.max(1)).zip(responses.chunks(batch.max(1))) {
            let rows: Vec<(Vec<u32>, usize)> =
                ps.iter().zip(rs).map(|(p, r)| ([p.as_slice(), r].concat(), p.len())).collect();
            let mut b = Batch::from_rows(&rows, pad)?;
            b.controls = (!row.is_empty()).then(|| vec![row.clone(); rows.len()]);
            // A row with an empty response has no labels: its log-probability is 0.
            if rs.iter().all(|r| r.is_empty()) {
                out.extend(std::iter::repeat_n(0.0, rows.len()));
                continue;
            }
            let lp = label_logps(&self.policy, &b)?.per_sequence_sum()?.to_vec1::<f32>()?;
            out.extend(lp.iter().map(|&x| x as f64));
        }
        Ok(out)
    }
}
