//! Parameter-efficient tuning: LoRA adapters ([`lora`]) and soft prompts ([`prompt`]), saved and
//! loaded as PEFT adapter folders ([`folder`]).

pub mod folder;
pub mod lora;
pub mod merge;
pub mod prompt;
