//! The human-rated snippets of Hutto & Gilbert (ICWSM 2014), as `scripts/fetch-data.sh` puts
//! them in `data/sentiment/`: `{id}\t{mean rating}\t{text}` per line, the rating the mean of 20
//! raters on −4 (very negative) … +4 (very positive).

use crate::{Error, Result};
use std::path::Path;

/// One rated snippet.
#[derive(Debug, Clone, PartialEq)]
pub struct Snippet {
    pub id: String,
    pub rating: f64,
    pub text: String,
}

/// Reads a `*_GroundTruth.txt` file; a malformed line is an error naming it.
pub fn read_snippets(path: &Path) -> Result<Vec<Snippet>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let text = std::str::from_utf8(&bytes).map_err(|e| {
        let line = bytes[..e.valid_up_to()].iter().filter(|&&b| b == b'\n').count() + 1;
        Error::parse(path, format!("line {line}: not valid UTF-8"))
    })?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() {
            continue;
        }
        let mut parts = line.splitn(3, '\t');
        let (Some(id), Some(rating), Some(text)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(Error::parse(path, format!("line {}: expected id, rating and text separated by tabs", i + 1)));
        };
        let rating: f64 =
            rating.trim().parse().ok().filter(|r: &f64| (-4.0..=4.0).contains(r)).ok_or_else(|| {
                Error::parse(path, format!("line {}: rating '{rating}' is not a number in -4..4", i + 1))
            })?;
        out.push(Snippet { id: id.to_string(), rating, text: text.trim().to_string() });
    }
    if out.is_empty() {
        return Err(Error::parse(path, "no snippets"));
    }
    Ok(out)
}
