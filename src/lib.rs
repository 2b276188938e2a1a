//! `meet`: align causal language models with human preferences (MEET — alignment with
//! parameter-efficient tuning — and its baselines) on candle.
//!
//! Layout: [`models`] (one file per architecture), [`nn`] (layers and fused differentiable ops),
//! [`io`] (model sources and HF folders), [`tokenizer`], [`generate`], [`bench`].

pub mod bench;
pub mod data;
pub mod error;
pub mod generate;
pub mod io;
pub mod models;
pub mod nn;
pub mod objectives;
pub mod peft;
pub mod policy;
pub mod run;
pub mod tokenizer;
pub mod train;

pub use error::{Error, Result};
pub use io::{LoadOptions, Packing, Pretrained};
