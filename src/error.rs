//! The library's one error type. Every variant carries the context a user needs to fix the problem:
//! the file, the field or tensor, and what was expected.

use std::path::PathBuf;

/// Errors raised by `meet`. Binaries wrap them with `anyhow` for display.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be opened, read or written. The OS reason is part of the message (not a
    /// `source`), so `{:#}` chains print it once.
    #[error("{path}: {reason}")]
    Io { path: PathBuf, reason: std::io::Error },

    /// A JSON/TOML file does not parse or lacks a required field.
    #[error("{path}: {msg}")]
    Parse { path: PathBuf, msg: String },

    /// A file is readable but its content is not what `meet` can use (truncated, wrong tensor type,
    /// unsupported architecture, missing tensor, wrong shape).
    #[error("{path}: {msg}")]
    Format { path: PathBuf, msg: String },

    /// A model reference (`--model`) that is neither a folder, a GGUF file nor a cached hub repo.
    #[error("cannot resolve model '{model}': {msg}")]
    ModelSource { model: String, msg: String },

    /// The tokenizer or chat template failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// A request the model cannot serve (prompt longer than the context, empty batch, bad option).
    #[error("{0}")]
    Invalid(String),

    /// An error inside candle (shapes, dtypes, devices).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// `Result` with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Builds an [`Error::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), reason: source }
    }

    /// Builds an [`Error::Format`] for `path`.
    pub fn format(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Format { path: path.into(), msg: msg.into() }
    }

    /// Builds an [`Error::Parse`] for `path`.
    pub fn parse(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Parse { path: path.into(), msg: msg.into() }
    }
}

impl From<tokenizers::Error> for Error {
    fn from(e: tokenizers::Error) -> Self {
        Error::Tokenizer(e.to_string())
    }
}
