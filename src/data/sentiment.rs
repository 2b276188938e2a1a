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

/// The first `n` words of `text` (whitespace-separated), as a continuation prompt.
pub fn prefix_words(text: &str, n: usize) -> String {
    text.split_whitespace().take(n).collect::<Vec<_>>().join(" ")
}

/// The controlled-sentiment task of the DPO paper's IMDb experiment, on rated snippets: prompts
/// are the first words of snippets (train and held-out evaluation sets from disjoint snippets),
/// and a second pair set compares snippets by their human rating under one instruction.
#[derive(Debug, Clone, PartialEq)]
pub struct SentimentTask {
    pub train_prompts: Vec<String>,
    pub eval_prompts: Vec<String>,
    /// `(instruction, higher-rated snippet, lower-rated snippet)`.
    pub rating_pairs: Vec<(String, String, String)>,
}

/// Options of [`sentiment_task`].
#[derive(Debug, Clone, PartialEq)]
pub struct TaskOptions {
    /// Words per prompt.
    pub words: usize,
    pub train: usize,
    pub eval: usize,
    /// Human-rating pairs, from the training snippets.
    pub pairs: usize,
    /// Smallest rating gap between the two snippets of a pair.
    pub min_gap: f64,
    pub instruction: String,
    pub seed: u64,
}

impl Default for TaskOptions {
    fn default() -> Self {
        Self {
            words: 4,
            train: 2000,
            eval: 200,
            pairs: 2000,
            min_gap: 2.0,
            instruction: "Write a short movie review.".into(),
            seed: 0,
        }
    }
}

/// Builds the task from `snippets` (seeded shuffle; snippets with fewer than `words + 2` words
/// are not used as prompts, so every prompt leaves something to continue).
pub fn sentiment_task(snippets: &[Snippet], o: &TaskOptions) -> Result<SentimentTask> {
    use rand::seq::SliceRandom;
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(o.seed);
    let mut usable: Vec<&Snippet> =
        snippets.iter().filter(|s| s.text.split_whitespace().count() >= o.words + 2).collect();
    if usable.len() < o.train + o.eval {
        return Err(Error::Invalid(format!(
            "{} snippets of at least {} words, {} + {} asked for",
            usable.len(),
            o.words + 2,
            o.train,
            o.eval
        )));
    }
    usable.shuffle(&mut rng);
    let (eval, rest) = usable.split_at(o.eval);
    let train = &rest[..o.train];
    let mut rating_pairs = Vec::with_capacity(o.pairs);
    let mut tries = 0;
    while rating_pairs.len() < o.pairs && tries < 100 * o.pairs.max(1) {
        tries += 1;
        let (a, b) = (train[rng.gen_range(0..train.len())], train[rng.gen_range(0..train.len())]);
        if (a.rating - b.rating).abs() >= o.min_gap {
            let (hi, lo) = if a.rating > b.rating { (a, b) } else { (b, a) };
            rating_pairs.push((o.instruction.clone(), hi.text.clone(), lo.text.clone()));
        }
    }
    if rating_pairs.len() < o.pairs {
        return Err(Error::Invalid(format!("only {} pairs have a rating gap of {}", rating_pairs.len(), o.min_gap)));
    }
    let prompts = |s: &[&Snippet]| s.iter().map(|x| prefix_words(&x.text, o.words)).collect();
    Ok(SentimentTask { train_prompts: prompts(train), eval_prompts: prompts(eval), rating_pairs })
}

/// Writes a task into `dir`: `human_pairs.jsonl` (TRL preference records), `train_prompts.jsonl`
/// and, last (its presence marks a whole task), `eval_prompts.jsonl` (`{"prompt"}` lines).
pub fn write_task(t: &SentimentTask, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let pairs: Vec<_> =
        t.rating_pairs.iter().map(|(i, c, r)| serde_json::json!({"prompt": i, "chosen": c, "rejected": r})).collect();
    crate::files::write_jsonl(&dir.join("human_pairs.jsonl"), &pairs)?;
    let prompts = |p: &[String]| p.iter().map(|x| serde_json::json!({ "prompt": x })).collect::<Vec<_>>();
    crate::files::write_jsonl(&dir.join("train_prompts.jsonl"), &prompts(&t.train_prompts))?;
    crate::files::write_jsonl(&dir.join("eval_prompts.jsonl"), &prompts(&t.eval_prompts))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snippets(n: usize) -> Vec<Snippet> {
        (0..n)
            .map(|i| Snippet {
                id: i.to_string(),
                rating: (i % 9) as f64 - 4.0,
                text: format!("snippet {i} is about a film that was {}", if i % 2 == 0 { "good" } else { "bad" }),
            })
            .collect()
    }

    #[test]
    fn the_task_splits_disjoint_prompts_and_orders_pairs_by_rating() {
        let s = snippets(300);
        let o = TaskOptions { train: 100, eval: 50, pairs: 40, ..Default::default() };
        let t = sentiment_task(&s, &o).unwrap();
        assert_eq!((t.train_prompts.len(), t.eval_prompts.len(), t.rating_pairs.len()), (100, 50, 40));
        assert!(t.train_prompts.iter().all(|p| p.split_whitespace().count() == 4));
        assert!(t.eval_prompts.iter().all(|p| !t.train_prompts.contains(p)), "held-out prompts leak");
        let rating = |text: &str| s.iter().find(|x| x.text == text).unwrap().rating;
        assert!(t.rating_pairs.iter().all(|(_, hi, lo)| rating(hi) >= rating(lo) + 2.0));
        assert_eq!(sentiment_task(&s, &o).unwrap(), t, "seeded");
        assert_ne!(sentiment_task(&s, &TaskOptions { seed: 1, ..o.clone() }).unwrap().train_prompts, t.train_prompts);
        assert!(sentiment_task(&s, &TaskOptions { train: 290, ..o }).is_err());
        assert_eq!(prefix_words("  a b\tc d e ", 3), "a b c");
    }
}
