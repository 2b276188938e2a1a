//! Parameter-efficient tuning: LoRA adapters ([`lora`]) and soft prompts ([`prompt`]), saved and
//! loaded as PEFT adapter folders ([`folder`]).

pub mod folder;
pub mod lora;
pub mod merge;
pub mod prompt;

/// The controls one batch row runs under: `(index, weight)` pairs, indices into the model's soft
/// prompts / LoRA adapters, at most one per preference dimension, in dimension order (soft prompts
/// are prepended in this order). An empty list is the plain model. Training uses weight 1; at
/// inference a LoRA control may take another weight (its delta is scaled by it).
pub type RowControls = Vec<(usize, f32)>;
