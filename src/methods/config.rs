//! A training run from a TOML file, tagged by its method: the sections every run has (the model
//! and what trains on it — the weights, LoRA adapters, soft prompts, any combination — the data,
//! the loop) and the one section of the chosen method, typed by that method's file.
//!
//! ```toml
//! method = "meet"                # required: sft | coh | control-token | meet | dpo | reward
//! output_dir = "runs/meet"
//! [model]
//! source = "models/SmolLM2-135M-Instruct.Q4_1.gguf"
//! train_weights = false          # full fine-tuning of every weight
//! controls = ["good", "bad"]     # chosen responses train the first, rejected the second
//! [prompt]                       # present: one soft prompt per control ([lora]: one adapter)
//! n = 20
//! [data]
//! train = "data/prefs.jsonl"
//! [train]
//! lr = 1e-5
//! control_lr = 1e-3
//! [meet]                         # only under method = "meet": a [dpo] here is an error
//! steps = "both"
//! ```
//!
//! Errors keep toml's line and column; a section of another method names that method.

use crate::data::preference::{Format, PreferenceOptions};
use crate::io;
use crate::methods::{self, Method};
use crate::peft::lora::LoraConfig;
use crate::peft::prompt::PromptConfig;
use crate::train::TrainConfig;
use crate::{Error, Result};
use serde::de::{DeserializeOwned, DeserializeSeed, IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// `[model]`: what to load and what trains.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// HF folder, GGUF file or Hub repo id.
    pub source: String,
    /// Train every weight of the model (full fine-tuning).
    #[serde(default)]
    pub train_weights: bool,
    /// Names of the controls (LoRA adapters / soft prompts / control tokens / feedback phrases),
    /// one per preference; with preference data the chosen response trains the first and the
    /// rejected the second. Default: the method's (`["good", "bad"]`, `["default"]` for SFT,
    /// DPO and reward models).
    #[serde(default)]
    pub controls: Option<Vec<String>>,
    /// Several preference dimensions, each with its controls
    /// (`{ sentiment = ["positive", "negative"], length = ["concise", "verbose"] }`), instead of
    /// `controls`: the control list is every dimension's controls, dimensions in name order (the
    /// order soft prompts are prepended in, and control tokens / phrases placed in). A preference
    /// record names its dimension (`"dimension"`): its chosen response trains that dimension's
    /// first control, its rejected one the second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dimensions: Option<BTreeMap<String, Vec<String>>>,
    /// Start the adapters / prompts from PEFT folders saved earlier (this folder's `lora/` and
    /// `prompts/`, or a PEFT adapter folder directly).
    #[serde(default)]
    pub init_adapters: Option<PathBuf>,
}

/// One preference dimension (`sentiment`) and its controls (`positive`, `negative`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dimension {
    pub name: String,
    pub controls: Vec<String>,
}

/// `[data]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// The training data: a JSONL / JSON / Parquet file (plain or `.gz`), a folder of shards, or a
    /// Hub dataset id `hf:OWNER/NAME[/CONFIG][@REVISION][:SPLIT]` (split `train` by default);
    /// supervised rows (see [`crate::data`]) or preference records (see
    /// [`crate::data::preference`]). Leave it out when giving `[[data.sources]]`.
    #[serde(default, skip_serializing_if = "is_empty_path")]
    pub train: PathBuf,
    /// Several training sources mixed by weight, instead of `train`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sources: Vec<SourceSection>,
    /// Read at most this many records of `train` (the first ones).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_records: Option<usize>,
    /// Held-out data, read like `train` (split `test` by default): its loss (and the objective's
    /// figures) is logged to `metrics.jsonl` as `eval_loss` every `train.eval_every` steps and at
    /// the end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval: Option<PathBuf>,
    /// Instead of `eval`: hold out this share of the training records (seeded by `train.seed`;
    /// of each source when there are several).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_share: Option<f64>,
    /// Read at most this many records of `eval`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_max_records: Option<usize>,
    /// Longest sequence in tokens (virtual tokens not counted).
    #[serde(default = "default_max_length")]
    pub max_length: usize,
    /// Preference layout; detected from the first record by default.
    #[serde(default)]
    pub format: Format,
    /// Longest prompt of preference data (its end is kept).
    #[serde(default = "default_max_prompt_length")]
    pub max_prompt_length: Option<usize>,
    /// Longest response of preference data.
    #[serde(default)]
    pub max_completion_length: Option<usize>,
    /// Skip invalid records (counted and listed in the log) instead of stopping at the first.
    #[serde(default)]
    pub skip_invalid: bool,
}

/// One `[[data.sources]]` entry: a training source (anything `data.train` takes), its weight in
/// the mixture, and optionally how many of its records to read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceSection {
    pub path: PathBuf,
    /// Relative share of the draws (positive; the weights need not sum to 1).
    pub weight: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_records: Option<usize>,
}

fn is_empty_path(p: &std::path::Path) -> bool {
    p.as_os_str().is_empty()
}

fn default_max_length() -> usize {
    1024
}

fn default_max_prompt_length() -> Option<usize> {
    Some(512)
}

impl DataSection {
    /// `train` with the default reading options.
    pub fn new(train: impl Into<PathBuf>) -> Self {
        Self {
            train: train.into(),
            sources: vec![],
            max_records: None,
            eval: None,
            eval_share: None,
            eval_max_records: None,
            max_length: default_max_length(),
            format: Format::Auto,
            max_prompt_length: default_max_prompt_length(),
            max_completion_length: None,
            skip_invalid: false,
        }
    }

    /// The training sources: `train` (weight 1) or `sources`.
    pub fn training_sources(&self) -> Vec<SourceSection> {
        if self.sources.is_empty() {
            vec![SourceSection { path: self.train.clone(), weight: 1.0, max_records: self.max_records }]
        } else {
            self.sources.clone()
        }
    }

    /// How the training data is named in messages: `train`, or the sources.
    pub fn shown(&self) -> PathBuf {
        if self.sources.is_empty() {
            self.train.clone()
        } else {
            let names: Vec<String> = self.sources.iter().map(|s| s.path.display().to_string()).collect();
            PathBuf::from(format!("data.sources [{}]", names.join(", ")))
        }
    }

    /// Checks the combinations the types allow but reading cannot use.
    pub fn check(&self) -> Result<()> {
        match (is_empty_path(&self.train), self.sources.is_empty()) {
            (true, true) => return Err(Error::Invalid("data: give train, or [[data.sources]]".into())),
            (false, false) => {
                return Err(Error::Invalid("data: give train or [[data.sources]], not both".into()));
            }
            _ => {}
        }
        if !self.sources.is_empty() && self.max_records.is_some() {
            return Err(Error::Invalid(
                "data: max_records applies to train; with [[data.sources]] give each source its max_records".into(),
            ));
        }
        for (i, s) in self.sources.iter().enumerate() {
            if !(s.weight.is_finite() && s.weight > 0.0) {
                return Err(Error::Invalid(format!("data.sources[{i}].weight {} must be a positive number", s.weight)));
            }
        }
        let zero = |k: &str, v: Option<usize>| match v {
            Some(0) => Err(Error::Invalid(format!("data: {k} must be at least 1"))),
            _ => Ok(()),
        };
        zero("max_records", self.max_records)?;
        zero("eval_max_records", self.eval_max_records)?;
        for (i, s) in self.sources.iter().enumerate() {
            zero(&format!("sources[{i}].max_records"), s.max_records)?;
        }
        if self.eval.is_some() && self.eval_share.is_some() {
            return Err(Error::Invalid("data: give eval or eval_share, not both".into()));
        }
        if let Some(x) = self.eval_share.filter(|x| !(*x > 0.0 && *x < 1.0)) {
            return Err(Error::Invalid(format!("data: eval_share {x} must be between 0 and 1")));
        }
        if self.eval_share.is_none() && self.eval_max_records.is_some() && self.eval.is_none() {
            return Err(Error::Invalid("data: eval_max_records without eval".into()));
        }
        Ok(())
    }

    /// The reading options of preference data.
    pub fn preference_options(&self) -> PreferenceOptions {
        PreferenceOptions {
            format: self.format,
            max_length: self.max_length,
            max_prompt_length: self.max_prompt_length,
            max_completion_length: self.max_completion_length,
            skip_invalid: self.skip_invalid,
            dimensions: vec![],
        }
    }
}

/// The sections every run has; `method` picks the recipe (and the one extra section it owns).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Common {
    method: String,
    output_dir: PathBuf,
    model: ModelSection,
    #[serde(default)]
    lora: Option<LoraConfig>,
    #[serde(default)]
    prompt: Option<PromptConfig>,
    data: DataSection,
    #[serde(default)]
    train: TrainConfig,
}

/// The top-level keys of [`Common`].
const COMMON_KEYS: [&str; 7] = ["method", "output_dir", "model", "lora", "prompt", "data", "train"];

/// A whole run.
#[derive(Debug, Clone, PartialEq)]
pub struct RunConfig {
    /// The method's name in the registry (see [`crate::methods`]).
    pub method: String,
    /// Where checkpoints, metrics and the outputs go.
    pub output_dir: PathBuf,
    pub model: ModelSection,
    pub lora: Option<LoraConfig>,
    pub prompt: Option<PromptConfig>,
    pub data: DataSection,
    pub train: TrainConfig,
    /// The method's own section with its defaults filled in (empty for a method without one);
    /// read typed with [`RunConfig::options`].
    options: toml::Table,
}

impl Serialize for RunConfig {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Shape<'a> {
            #[serde(flatten)]
            common: Common,
            #[serde(flatten)]
            options: BTreeMap<&'a str, &'a toml::Table>,
        }
        let mut options = BTreeMap::new();
        if let Some(section) = self.recipe().ok().and_then(|m| m.section()) {
            options.insert(section, &self.options);
        }
        Shape { common: self.common(), options }.serialize(s)
    }
}

/// Sets `key` (dotted path, e.g. `train.lr`) in a TOML table to `value`, read as a TOML value
/// (`1e-4`, `true`, `["a", "b"]`) or else as a string.
pub fn set_key(table: &mut toml::Table, key: &str, value: &str) -> Result<()> {
    let parsed: toml::Value = toml::from_str::<toml::Table>(&format!("v = {value}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(value.to_string()));
    let mut parts: Vec<&str> = key.split('.').collect();
    let last = parts.pop().filter(|k| !k.is_empty()).ok_or_else(|| Error::Invalid(format!("empty key in '{key}'")))?;
    let mut t = table;
    for p in parts {
        t = t
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(Default::default()))
            .as_table_mut()
            .ok_or_else(|| Error::Invalid(format!("'{p}' in '{key}' is not a table")))?;
    }
    t.insert(last.to_string(), parsed);
    Ok(())
}

/// A run file as text (errors then keep toml's line and column) or as a table built in code.
#[derive(Debug, Clone, Copy)]
pub enum Document<'a> {
    Text(&'a str),
    Table(&'a toml::Table),
}

impl Document<'_> {
    /// The top-level key `key` as `T` (`None` when absent).
    pub fn get<T: DeserializeOwned>(&self, key: &str) -> std::result::Result<Option<T>, String> {
        let shown = |e: toml::de::Error| e.to_string().trim_end().to_string();
        match self {
            Document::Text(text) => read_key(text, key).map_err(shown),
            // Name the key as toml does for the sections it reads itself ("…\nin `dpo.beta`").
            Document::Table(t) => t
                .get(key)
                .map(|v| {
                    v.clone().try_into().map_err(|e| match shown(e) {
                        m if m.contains("\nin `") => m.replacen("\nin `", &format!("\nin `{key}."), 1),
                        m => format!("{m}\nin `{key}`"),
                    })
                })
                .transpose(),
        }
    }
}

/// Reads the top-level key `key` of a TOML document as `T` (`None` when absent). Deserialising
/// from the text, not from a parsed table, keeps toml's line and column in errors.
fn read_key<T: DeserializeOwned>(text: &str, key: &str) -> std::result::Result<Option<T>, toml::de::Error> {
    struct Pick<'k, T>(&'k str, PhantomData<T>);
    impl<'de, T: Deserialize<'de>> DeserializeSeed<'de> for Pick<'_, T> {
        type Value = Option<T>;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<Option<T>, D::Error> {
            d.deserialize_map(self)
        }
    }
    impl<'de, T: Deserialize<'de>> Visitor<'de> for Pick<'_, T> {
        type Value = Option<T>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            write!(f, "a table")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<Option<T>, A::Error> {
            let mut out = None;
            while let Some(k) = map.next_key::<String>()? {
                if k == self.0 {
                    out = Some(map.next_value::<T>()?);
                } else {
                    map.next_value::<IgnoredAny>()?;
                }
            }
            Ok(out)
        }
    }
    Pick(key, PhantomData).deserialize(toml::Deserializer::new(text))
}

/// The 1-based line where top-level key `key` is set (`key = …`, `[key]`, `[key.sub]`).
fn line_of(text: &str, key: &str) -> Option<usize> {
    text.lines()
        .position(|l| {
            let l = l.trim_start();
            let l = l.strip_prefix("[[").or_else(|| l.strip_prefix('[')).unwrap_or(l).trim_start();
            l.strip_prefix(key).is_some_and(|rest| {
                let rest = rest.trim_start();
                rest.starts_with('=') || rest.starts_with(']') || rest.starts_with('.')
            })
        })
        .map(|i| i + 1)
}

impl RunConfig {
    /// A run of `method` on `source` with `data`, every other option at its default.
    pub fn new(method: &str, source: &str, data: DataSection, output_dir: impl Into<PathBuf>) -> Result<Self> {
        let recipe = methods::find(method)?;
        Ok(Self {
            method: method.into(),
            output_dir: output_dir.into(),
            model: ModelSection {
                source: source.into(),
                train_weights: false,
                controls: None,
                dimensions: None,
                init_adapters: None,
            },
            lora: None,
            prompt: None,
            data,
            train: TrainConfig::default(),
            options: recipe.read_options(Document::Table(&Default::default())).map_err(Error::Invalid)?,
        })
    }

    /// Reads a TOML file; unknown keys and other methods' sections are errors naming the file,
    /// line and column.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_str(&text).map_err(|e| Error::parse(path, e.to_string()))
    }

    /// The TOML table of a run file (syntax errors name the file and line).
    pub fn read_table(path: &Path) -> Result<toml::Table> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        toml::from_str(&text).map_err(|e| Error::parse(path, e.to_string()))
    }

    /// Builds a configuration from a TOML table and `key=value` overrides.
    pub fn from_table(mut table: toml::Table, overrides: &[(String, String)]) -> Result<Self> {
        for (k, v) in overrides {
            set_key(&mut table, k, v)?;
        }
        Self::parse(&table, Document::Table(&table))
    }

    /// Parses and checks a run file's text.
    #[allow(clippy::should_implement_trait)] // our Error, not FromStr's associated one
    pub fn from_str(text: &str) -> Result<Self> {
        let table: toml::Table = toml::from_str(text).map_err(|e| Error::Invalid(e.to_string().trim_end().into()))?;
        Self::parse(&table, Document::Text(text))
    }

    fn parse(table: &toml::Table, doc: Document) -> Result<Self> {
        let at = |key: &str| match doc {
            Document::Text(text) => line_of(text, key).map(|l| format!("line {l}: ")).unwrap_or_default(),
            Document::Table(_) => String::new(),
        };
        let Some(name) = table.get("method") else {
            return Err(Error::Invalid(format!(
                "missing field `method`: no method is assumed; choose one of {}",
                methods::names().join(", ")
            )));
        };
        let name = name.as_str().ok_or_else(|| Error::Invalid(format!("{}`method` must be a string", at("method"))))?;
        let recipe = methods::find(name).map_err(|_| {
            // Worded as serde's unknown enum variant, with the key as toml names it (the CLI
            // blames the flag that set it).
            let known: Vec<String> = methods::names().iter().map(|n| format!("`{n}`")).collect();
            let key = if matches!(doc, Document::Table(_)) { "\nin `method`" } else { "" };
            Error::Invalid(format!(
                "{}unknown variant `{name}`, expected one of {}{key}",
                at("method"),
                known.join(", ")
            ))
        })?;
        for key in table.keys() {
            if COMMON_KEYS.contains(&key.as_str()) || recipe.section() == Some(key.as_str()) {
                continue;
            }
            let owner = methods::all().into_iter().find(|m| m.section() == Some(key.as_str()));
            return Err(Error::Invalid(match owner {
                Some(m) => format!(
                    "{}[{key}] is the options of method {}, but this run's method is {name}: remove the section, \
                     or set method = \"{}\"",
                    at(key),
                    m.name(),
                    m.name()
                ),
                None => format!(
                    "{}unknown field `{key}`; a run has {}{}",
                    at(key),
                    COMMON_KEYS.join(", "),
                    recipe.section().map(|s| format!(" and, for method {name}, [{s}]")).unwrap_or_default()
                ),
            }));
        }
        let common: Common = match doc {
            Document::Text(text) => toml::from_str(text).map_err(|e| e.to_string()),
            Document::Table(t) => toml::Value::Table(t.clone()).try_into().map_err(|e| e.to_string()),
        }
        .map_err(|e| Error::Invalid(e.trim_end().into()))?;
        let options = recipe.read_options(doc).map_err(Error::Invalid)?;
        let Common { method, output_dir, model, lora, prompt, data, train } = common;
        let cfg = Self { method, output_dir, model, lora, prompt, data, train, options };
        cfg.check()?;
        Ok(cfg)
    }

    fn common(&self) -> Common {
        Common {
            method: self.method.clone(),
            output_dir: self.output_dir.clone(),
            model: self.model.clone(),
            lora: self.lora.clone(),
            prompt: self.prompt.clone(),
            data: self.data.clone(),
            train: self.train.clone(),
        }
    }

    /// The method's recipe.
    pub fn recipe(&self) -> Result<Arc<dyn Method>> {
        methods::find(&self.method)
    }

    /// The method's options, typed (its section, defaults filled in).
    pub fn options<T: DeserializeOwned>(&self) -> Result<T> {
        toml::Value::Table(self.options.clone())
            .try_into()
            .map_err(|e: toml::de::Error| Error::Invalid(format!("{}: {}", self.method, e.to_string().trim_end())))
    }

    /// Replaces the method's options (checked as the method's section).
    pub fn set_options<T: Serialize>(&mut self, options: &T) -> Result<()> {
        let table = toml::Table::try_from(options).map_err(|e| Error::Invalid(e.to_string()))?;
        let section = self
            .recipe()?
            .section()
            .ok_or_else(|| Error::Invalid(format!("method {} takes no options of its own", self.method)))?;
        let doc = toml::Table::from_iter([(section.to_string(), toml::Value::Table(table))]);
        self.options = self.recipe()?.read_options(Document::Table(&doc)).map_err(Error::Invalid)?;
        Ok(())
    }

    /// The preference dimensions (see [`ModelSection::dimensions`]), in name order; empty for a
    /// run with one (`controls`).
    pub fn dimensions(&self) -> Vec<Dimension> {
        self.model
            .dimensions
            .iter()
            .flatten()
            .map(|(name, controls)| Dimension { name: name.clone(), controls: controls.clone() })
            .collect()
    }

    /// Each dimension's name with the indices of its controls in [`Self::controls`] (which holds
    /// the dimensions' controls one dimension after another); empty for a run with one.
    pub fn dimension_indices(&self) -> Vec<(String, Vec<usize>)> {
        let mut next = 0;
        self.dimensions()
            .into_iter()
            .map(|d| {
                let at = (next..next + d.controls.len()).collect();
                next += d.controls.len();
                (d.name, at)
            })
            .collect()
    }

    /// The control names (see [`ModelSection::controls`]; with dimensions, theirs in order).
    pub fn controls(&self) -> Vec<String> {
        if let Some(d) = &self.model.dimensions {
            return d.values().flatten().cloned().collect();
        }
        match (&self.model.controls, self.recipe()) {
            (Some(c), _) => c.clone(),
            (None, Ok(m)) => m.default_controls(),
            (None, Err(_)) => vec![],
        }
    }

    /// Names of the LoRA adapters / soft prompts: one per control for the methods whose controls
    /// they are, else the single `default` adapter.
    pub fn adapter_names(&self) -> Vec<String> {
        match self.recipe() {
            Ok(m) if m.adapter_per_control() => self.controls(),
            _ => vec!["default".into()],
        }
    }

    /// Checks that something trains, the names are usable, and the method's needs are met.
    pub fn check(&self) -> Result<()> {
        let recipe = self.recipe()?;
        if self.controls().is_empty() {
            return Err(Error::Invalid("model.controls is empty".into()));
        }
        if let Some(dims) = &self.model.dimensions {
            if self.model.controls.is_some() {
                return Err(Error::Invalid(
                    "model: give either controls (one dimension) or dimensions (several), not both".into(),
                ));
            }
            let all = self.controls();
            for (name, cs) in dims {
                if name.is_empty() || cs.len() < 2 {
                    return Err(Error::Invalid(format!(
                        "model.dimensions.{name}: a dimension needs a name and at least two controls, got {cs:?}"
                    )));
                }
                if let Some(c) = cs.iter().find(|c| all.iter().filter(|a| a == c).count() > 1) {
                    return Err(Error::Invalid(format!(
                        "model.dimensions: control '{c}' is named twice; control names must be distinct across dimensions"
                    )));
                }
            }
        }
        recipe.check(self)?;
        if !self.model.train_weights && self.lora.is_none() && self.prompt.is_none() {
            return Err(Error::Invalid(
                "nothing to train: set model.train_weights = true, or add a [lora] or [prompt] section".into(),
            ));
        }
        self.train.check()?;
        if let Some(l) = &self.lora {
            l.validate()?;
        }
        if self.prompt.as_ref().is_some_and(|p| p.n == 0) {
            return Err(Error::Invalid("prompt: n (virtual tokens) must be at least 1".into()));
        }
        if self.data.max_length == 0 {
            return Err(Error::Invalid("data: max_length must be at least 1".into()));
        }
        self.data.check()?;
        Ok(())
    }

    /// Checks that the files the run reads are there: the model, the training data, adapters to
    /// start from, and those the method names. Run before anything is written.
    pub fn check_sources(&self) -> Result<()> {
        io::resolve(&self.model.source)?;
        if self.data.sources.is_empty() {
            crate::data::source::check("data.train", &self.data.train, "train")?;
        }
        for (i, s) in self.data.sources.iter().enumerate() {
            crate::data::source::check(&format!("data.sources[{i}].path"), &s.path, "train")?;
        }
        if let Some(e) = &self.data.eval {
            crate::data::source::check("data.eval", e, "test")?;
        }
        if let Some(p) = self.model.init_adapters.as_ref().filter(|p| !p.is_dir()) {
            return Err(Error::Invalid(format!("model.init_adapters: {} is not a folder", p.display())));
        }
        self.recipe()?.check_sources(self)
    }
}
