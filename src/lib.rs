//! `meet`: align causal language models with human preferences (MEET — alignment with
//! parameter-efficient tuning — and its baselines) on candle.
//!
//! Layout: [`models`] (one file per architecture), [`nn`] (layers and fused differentiable ops),
//! [`io`] (model sources and HF folders), [`tokenizer`], [`generate`], [`peft`] (LoRA, soft
//! prompts, PEFT folders), [`data`], [`objectives`] (losses), [`train`] (the loop), [`methods`]
//! (one recipe per alignment method), [`controls`] (controls at inference), [`serve`] (the
//! OpenAI-compatible server), [`bench`].

// Every unsafe block says why it is sound; every unsafe fn says what its caller must uphold.
#![warn(clippy::undocumented_unsafe_blocks, clippy::missing_safety_doc)]

pub mod bench;
pub mod controls;
pub mod data;
pub mod error;
pub mod eval;
pub mod experiment;
pub mod files;
pub mod generate;
pub mod io;
pub mod methods;
pub mod models;
pub mod nn;
pub mod objectives;
pub mod peft;
pub mod policy;
pub mod provenance;
pub mod serve;
pub mod tokenizer;
pub mod train;
pub mod ui;

pub use error::{Error, Result};
pub use models::pretrained::{LoadOptions, Packing, Pretrained};
