//! Prompt tuning: `n` trainable virtual-token embeddings placed before the input embeddings, the
//! model frozen. Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning";
//! mirrors PEFT's `tuners/prompt_tuning` (`PromptEmbedding`, `prompt_embeddings: [n, hidden]`),
//! with several named prompts on one model and a per-row choice (MEET: one per preference).

use crate::models::CausalLm;
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::Distribution;
use serde::{Deserialize, Serialize};

/// How fresh prompts are filled (PEFT's `PromptTuningInit`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PromptInit {
    /// Standard normal, as PEFT's `torch.nn.Embedding` default (`RANDOM`).
    #[default]
    Random,
    /// Embeddings of the tokens of `init_text`, repeated to fill `n` (`TEXT`).
    Text,
    /// Embeddings of `n` vocabulary rows drawn uniformly (`SAMPLE_VOCAB`).
    SampleVocab,
}

/// Soft-prompt hyper-parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromptConfig {
    /// Virtual tokens per prompt.
    #[serde(default = "default_n", alias = "num_virtual_tokens")]
    pub n: usize,
    #[serde(default)]
    pub init: PromptInit,
    /// The text for [`PromptInit::Text`].
    #[serde(default)]
    pub init_text: Option<String>,
}

fn default_n() -> usize {
    20
}

impl Default for PromptConfig {
    fn default() -> Self {
        Self { n: default_n(), init: PromptInit::Random, init_text: None }
    }
}

/// Named soft prompts of `n` virtual tokens each.
pub struct SoftPrompts {
    pub names: Vec<String>,
    pub config: PromptConfig,
    /// `[n, hidden]` per prompt, trainable.
    pub vars: Vec<Var>,
}

impl SoftPrompts {
    /// Fresh prompts for `model`, drawn from `seed` (each name its own stream).
    pub fn new(
        names: &[String],
        config: &PromptConfig,
        model: &dyn CausalLm,
        tokenizer: &Tokenizer,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        if config.n == 0 {
            return Err(Error::Invalid("prompt tuning: n (num_virtual_tokens) must be at least 1".into()));
        }
        if names.is_empty() {
            return Err(Error::Invalid("prompt tuning: no prompt names given".into()));
        }
        let (n, hidden, vocab) = (config.n, model.hidden_size(), model.vocab_size());
        let text_ids = match (&config.init, &config.init_text) {
            (PromptInit::Text, Some(t)) => {
                let ids = tokenizer.encode(t, false)?;
                if ids.is_empty() {
                    return Err(Error::Invalid("prompt tuning: init_text has no tokens".into()));
                }
                Some(ids)
            }
            (PromptInit::Text, None) => {
                return Err(Error::Invalid("prompt tuning: init = \"text\" needs init_text".into()));
            }
            _ => None,
        };
        let vars = names
            .iter()
            .map(|name| {
                let h = name.bytes().fold(0xcbf29ce484222325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3));
                let mut rng = ChaCha8Rng::seed_from_u64(seed ^ h);
                let t = match config.init {
                    PromptInit::Random => {
                        let normal = rand_distr::StandardNormal;
                        let v: Vec<f32> = (0..n * hidden).map(|_| normal.sample(&mut rng)).collect();
                        Tensor::from_vec(v, (n, hidden), device)?
                    }
                    PromptInit::Text | PromptInit::SampleVocab => {
                        // PEFT repeats the text's ids to fill n, then cuts to n.
                        let ids: Vec<u32> = match &text_ids {
                            Some(ids) => ids.iter().cycle().take(n).copied().collect(),
                            None => (0..n).map(|_| rng.gen_range(0..vocab as u32)).collect(),
                        };
                        model.embed(&Tensor::new(ids.as_slice(), device)?)?.detach()
                    }
                };
                Ok(Var::from_tensor(&t)?)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { names: names.to_vec(), config: config.clone(), vars })
    }

    /// Virtual tokens per prompt.
    pub fn n(&self) -> usize {
        self.config.n
    }

    /// `(b, n + t, hidden)`: row `r` of `embeds` after prompt `choice[r]`.
    pub fn prepend(&self, embeds: &Tensor, choice: &[usize]) -> Result<Tensor> {
        let b = embeds.dims()[0];
        if choice.len() != b {
            return Err(Error::Invalid(format!("{} prompt choices for a batch of {b} rows", choice.len())));
        }
        let rows = choice
            .iter()
            .map(|&i| {
                self.vars.get(i).map(|v| v.as_tensor().clone()).ok_or_else(|| {
                    Error::Invalid(format!("prompt index {i} is out of range ({} prompts)", self.vars.len()))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&[Tensor::stack(&rows, 0)?, embeds.clone()], 1)?)
    }

    /// Row `r` of `embeds: (b, t, hidden)` after the prompts `choice[r]` one after another (several
    /// preference dimensions: one prompt each, in dimension order; none: the plain row). Rows
    /// with fewer virtual tokens than the longest are left-padded with zeros; returns the
    /// `(b, n + t, hidden)` embeddings and each row's count of padding positions, which the
    /// attention mask must hide (positions then count real tokens only, so a row gives what it
    /// gives alone). When every row has exactly one prompt this is [`Self::prepend`].
    pub fn prepend_rows(&self, embeds: &Tensor, choice: &[Vec<usize>]) -> Result<(Tensor, Vec<usize>)> {
        let b = embeds.dims()[0];
        if choice.len() != b {
            return Err(Error::Invalid(format!("{} prompt choices for a batch of {b} rows", choice.len())));
        }
        if choice.iter().all(|c| c.len() == 1) {
            let one: Vec<usize> = choice.iter().map(|c| c[0]).collect();
            return Ok((self.prepend(embeds, &one)?, vec![0; b]));
        }
        let n = self.n();
        let longest = choice.iter().map(|c| c.len()).max().unwrap_or(0) * n;
        if longest == 0 {
            return Ok((embeds.clone(), vec![0; b]));
        }
        let hidden = embeds.dims()[2];
        let mut pads = Vec::with_capacity(b);
        let rows = choice
            .iter()
            .map(|c| {
                let pad = longest - c.len() * n;
                pads.push(pad);
                let mut parts = Vec::with_capacity(c.len() + 1);
                if pad > 0 {
                    parts.push(Tensor::zeros((pad, hidden), embeds.dtype(), embeds.device())?);
                }
                for &i in c {
                    parts.push(self.vars.get(i).map(|v| v.as_tensor().clone()).ok_or_else(|| {
                        Error::Invalid(format!("prompt index {i} is out of range ({} prompts)", self.vars.len()))
                    })?);
                }
                Ok(Tensor::cat(&parts, 0)?)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((Tensor::cat(&[Tensor::stack(&rows, 0)?, embeds.clone()], 1)?, pads))
    }

    /// Replaces prompt `index` with `t: [n, hidden]`.
    pub fn load(&self, index: usize, t: &Tensor) -> Result<()> {
        let v = &self.vars[index];
        if t.dims() != v.dims() {
            return Err(Error::Invalid(format!(
                "prompt_embeddings has shape {:?}, expected {:?} (num_virtual_tokens, hidden)",
                t.dims(),
                v.dims()
            )));
        }
        Ok(v.set(&t.to_dtype(DType::F32)?)?)
    }
}
