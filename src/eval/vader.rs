//! VADER sentiment (Hutto & Gilbert, ICWSM 2014) as a judge: the compound score in [−1, 1] of the
//! response (or of prompt + response, for continuations judged as one text).
//!
//! A line-by-line port of the Python reference `vaderSentiment` 3.3.2 (MIT; its lexicons and
//! licence are in this folder), quirks included — `_but_check` scales the *first* sentiment
//! equal to each value, as Python's `list.index` does — so that scores equal the ones the
//! sentiment data's authors' package gives. The `vader_sentiment` crate (0.1.1) was measured
//! first: its older lexicon and rules differ from 3.3.2 on 45 of 208 test texts (by up to 0.64).

use crate::eval::Judge;
use crate::Result;
use std::collections::{HashMap, HashSet};
use std::sync::OnceLock;

const B_INCR: f64 = 0.293;
const B_DECR: f64 = -0.293;
const C_INCR: f64 = 0.733;
const N_SCALAR: f64 = -0.74;

const NEGATE: &[&str] = &[
    "aint",
    "arent",
    "cannot",
    "cant",
    "couldnt",
    "darent",
    "didnt",
    "doesnt",
    "ain't",
    "aren't",
    "can't",
    "couldn't",
    "daren't",
    "didn't",
    "doesn't",
    "dont",
    "hadnt",
    "hasnt",
    "havent",
    "isnt",
    "mightnt",
    "mustnt",
    "neither",
    "don't",
    "hadn't",
    "hasn't",
    "haven't",
    "isn't",
    "mightn't",
    "mustn't",
    "neednt",
    "needn't",
    "never",
    "none",
    "nope",
    "nor",
    "not",
    "nothing",
    "nowhere",
    "oughtnt",
    "shant",
    "shouldnt",
    "uhuh",
    "wasnt",
    "werent",
    "oughtn't",
    "shan't",
    "shouldn't",
    "uh-uh",
    "wasn't",
    "weren't",
    "without",
    "wont",
    "wouldnt",
    "won't",
    "wouldn't",
    "rarely",
    "seldom",
    "despite",
];

const BOOST_UP: &[&str] = &[
    "absolutely",
    "amazingly",
    "awfully",
    "completely",
    "considerable",
    "considerably",
    "decidedly",
    "deeply",
    "effing",
    "enormous",
    "enormously",
    "entirely",
    "especially",
    "exceptional",
    "exceptionally",
    "extreme",
    "extremely",
    "fabulously",
    "flipping",
    "flippin",
    "frackin",
    "fracking",
    "fricking",
    "frickin",
    "frigging",
    "friggin",
    "fully",
    "fuckin",
    "fucking",
    "fuggin",
    "fugging",
    "greatly",
    "hella",
    "highly",
    "hugely",
    "incredible",
    "incredibly",
    "intensely",
    "major",
    "majorly",
    "more",
    "most",
    "particularly",
    "purely",
    "quite",
    "really",
    "remarkably",
    "so",
    "substantially",
    "thoroughly",
    "total",
    "totally",
    "tremendous",
    "tremendously",
    "uber",
    "unbelievably",
    "unusually",
    "utter",
    "utterly",
    "very",
];

const BOOST_DOWN: &[&str] = &[
    "almost",
    "barely",
    "hardly",
    "just enough",
    "kind of",
    "kinda",
    "kindof",
    "kind-of",
    "less",
    "little",
    "marginal",
    "marginally",
    "occasional",
    "occasionally",
    "partly",
    "scarce",
    "scarcely",
    "slight",
    "slightly",
    "somewhat",
    "sort of",
    "sorta",
    "sortof",
    "sort-of",
];

const SPECIAL_CASES: &[(&str, f64)] = &[
    ("the shit", 3.0),
    ("the bomb", 3.0),
    ("bad ass", 1.5),
    ("badass", 1.5),
    ("bus stop", 0.0),
    ("yeah right", -2.0),
    ("kiss of death", -1.5),
    ("to die for", 3.0),
    ("beating heart", 3.5),
];

struct Tables {
    lexicon: HashMap<String, f64>,
    emojis: HashMap<char, String>,
    booster: HashMap<&'static str, f64>,
    negate: HashSet<&'static str>,
    special: HashMap<&'static str, f64>,
}

fn tables() -> &'static Tables {
    static T: OnceLock<Tables> = OnceLock::new();
    T.get_or_init(|| {
        let mut lexicon = HashMap::new();
        for line in include_str!("vader_lexicon.txt").trim_end_matches('\n').split('\n') {
            let mut f = line.trim().split('\t');
            if let (Some(w), Some(m)) = (f.next(), f.next()) {
                if let Ok(v) = m.parse::<f64>() {
                    lexicon.insert(w.to_string(), v);
                }
            }
        }
        // Python looks emojis up one code point at a time: only single-code-point keys can match.
        let mut emojis = HashMap::new();
        for line in include_str!("emoji_utf8_lexicon.txt").trim_end_matches('\n').split('\n') {
            let mut f = line.trim().split('\t');
            if let (Some(e), Some(d)) = (f.next(), f.next()) {
                let mut cs = e.chars();
                if let (Some(c), None) = (cs.next(), cs.next()) {
                    emojis.insert(c, d.to_string());
                }
            }
        }
        let booster = BOOST_UP.iter().map(|w| (*w, B_INCR)).chain(BOOST_DOWN.iter().map(|w| (*w, B_DECR))).collect();
        Tables {
            lexicon,
            emojis,
            booster,
            negate: NEGATE.iter().copied().collect(),
            special: SPECIAL_CASES.iter().copied().collect(),
        }
    })
}

/// Python's `str.isupper()`: some cased character, and none lowercase.
fn is_upper(s: &str) -> bool {
    s.chars().any(|c| c.is_uppercase()) && !s.chars().any(|c| c.is_lowercase())
}

/// Python's `str.strip(string.punctuation)`, kept only when more than two characters remain
/// (shorter tokens are likely emoticons such as `:)`).
fn strip_punc_if_word(token: &str) -> &str {
    let stripped = token.trim_matches(|c: char| c.is_ascii_punctuation());
    if stripped.chars().count() <= 2 {
        token
    } else {
        stripped
    }
}

fn negated(word: &str) -> bool {
    tables().negate.contains(word) || word.contains("n't")
}

fn scalar_inc_dec(word: &str, valence: f64, is_cap_diff: bool) -> f64 {
    let Some(&b) = tables().booster.get(word.to_lowercase().as_str()) else { return 0.0 };
    let mut scalar = if valence < 0.0 { -b } else { b };
    if is_upper(word) && is_cap_diff {
        scalar += if valence > 0.0 { C_INCR } else { -C_INCR };
    }
    scalar
}

/// The compound score of `text`, as `SentimentIntensityAnalyzer().polarity_scores(text)
/// ["compound"]` (rounded to 4 decimals as Python reports it).
pub fn compound(text: &str) -> f64 {
    let t = tables();
    // Emojis become their descriptions.
    let mut clean = String::with_capacity(text.len());
    let mut prev_space = true;
    for c in text.chars() {
        match t.emojis.get(&c) {
            Some(d) => {
                if !prev_space {
                    clean.push(' ');
                }
                clean.push_str(d);
                prev_space = false;
            }
            None => {
                clean.push(c);
                prev_space = c == ' ';
            }
        }
    }
    let text = clean.trim();
    let words: Vec<&str> = text.split_whitespace().map(strip_punc_if_word).collect();
    let lower: Vec<String> = words.iter().map(|w| w.to_lowercase()).collect();
    let caps = words.iter().filter(|w| is_upper(w)).count();
    let is_cap_diff = caps > 0 && caps < words.len();
    let in_lex = |w: &str| t.lexicon.contains_key(w);

    let mut sentiments: Vec<f64> = Vec::with_capacity(words.len());
    for i in 0..words.len() {
        if t.booster.contains_key(lower[i].as_str())
            || (i + 1 < words.len() && lower[i] == "kind" && lower[i + 1] == "of")
        {
            sentiments.push(0.0);
            continue;
        }
        let Some(&base) = t.lexicon.get(&lower[i]) else {
            sentiments.push(0.0);
            continue;
        };
        let mut valence = base;
        if lower[i] == "no" && i + 1 < words.len() && in_lex(&lower[i + 1]) {
            valence = 0.0;
        }
        if (i > 0 && lower[i - 1] == "no")
            || (i > 1 && lower[i - 2] == "no")
            || (i > 2 && lower[i - 3] == "no" && (lower[i - 1] == "or" || lower[i - 1] == "nor"))
        {
            valence = base * N_SCALAR;
        }
        if is_upper(words[i]) && is_cap_diff {
            valence += if valence > 0.0 { C_INCR } else { -C_INCR };
        }
        for start in 0..3 {
            if i > start && !in_lex(&lower[i - (start + 1)]) {
                let mut s = scalar_inc_dec(words[i - (start + 1)], valence, is_cap_diff);
                if start == 1 && s != 0.0 {
                    s *= 0.95;
                }
                if start == 2 && s != 0.0 {
                    s *= 0.9;
                }
                valence += s;
                valence = negation_check(valence, &lower, start, i);
                if start == 2 {
                    valence = special_idioms_check(valence, &lower, i);
                }
            }
        }
        // "least" as negation (not in "at least" / "very least").
        if i > 1 && !in_lex(&lower[i - 1]) && lower[i - 1] == "least" {
            if lower[i - 2] != "at" && lower[i - 2] != "very" {
                valence *= N_SCALAR;
            }
        } else if i > 0 && !in_lex(&lower[i - 1]) && lower[i - 1] == "least" {
            valence *= N_SCALAR;
        }
        sentiments.push(valence);
    }
    but_check(&lower, &mut sentiments);
    if sentiments.is_empty() {
        return 0.0;
    }
    let mut sum: f64 = sentiments.iter().sum();
    let emphasis = punctuation_emphasis(text);
    if sum > 0.0 {
        sum += emphasis;
    } else if sum < 0.0 {
        sum -= emphasis;
    }
    let norm = (sum / (sum * sum + 15.0).sqrt()).clamp(-1.0, 1.0);
    (norm * 1e4).round() / 1e4
}

fn negation_check(valence: f64, w: &[String], start: usize, i: usize) -> f64 {
    match start {
        0 if negated(&w[i - 1]) => valence * N_SCALAR,
        1 => {
            if w[i - 2] == "never" && (w[i - 1] == "so" || w[i - 1] == "this") {
                valence * 1.25
            } else if w[i - 2] == "without" && w[i - 1] == "doubt" {
                valence
            } else if negated(&w[i - 2]) {
                valence * N_SCALAR
            } else {
                valence
            }
        }
        2 => {
            // Python's precedence: (never and (so or this)) or (so or this).
            if (w[i - 3] == "never" && (w[i - 2] == "so" || w[i - 2] == "this"))
                || (w[i - 1] == "so" || w[i - 1] == "this")
            {
                valence * 1.25
            } else if w[i - 3] == "without" && (w[i - 2] == "doubt" || w[i - 1] == "doubt") {
                valence
            } else if negated(&w[i - 3]) {
                valence * N_SCALAR
            } else {
                valence
            }
        }
        _ => valence,
    }
}

fn special_idioms_check(mut valence: f64, w: &[String], i: usize) -> f64 {
    let t = tables();
    let onezero = format!("{} {}", w[i - 1], w[i]);
    let twoonezero = format!("{} {} {}", w[i - 2], w[i - 1], w[i]);
    let twoone = format!("{} {}", w[i - 2], w[i - 1]);
    let threetwoone = format!("{} {} {}", w[i - 3], w[i - 2], w[i - 1]);
    let threetwo = format!("{} {}", w[i - 3], w[i - 2]);
    for seq in [&onezero, &twoonezero, &twoone, &threetwoone, &threetwo] {
        if let Some(&v) = t.special.get(seq.as_str()) {
            valence = v;
            break;
        }
    }
    if w.len() - 1 > i {
        if let Some(&v) = t.special.get(format!("{} {}", w[i], w[i + 1]).as_str()) {
            valence = v;
        }
    }
    if w.len() - 1 > i + 1 {
        if let Some(&v) = t.special.get(format!("{} {} {}", w[i], w[i + 1], w[i + 2]).as_str()) {
            valence = v;
        }
    }
    for ngram in [&threetwoone, &threetwo, &twoone] {
        if let Some(&b) = t.booster.get(ngram.as_str()) {
            valence += b;
        }
    }
    valence
}

/// The contrastive "but": sentiments before the first "but" halved, after it ×1.5 — each applied
/// to the first sentiment equal to the value visited, exactly as the Python loop does.
fn but_check(lower: &[String], sentiments: &mut [f64]) {
    let Some(bi) = lower.iter().position(|w| w == "but") else { return };
    for k in 0..sentiments.len() {
        let v = sentiments[k];
        let si = sentiments.iter().position(|&x| x == v).unwrap_or(k);
        if si < bi {
            sentiments[si] = v * 0.5;
        } else if si > bi {
            sentiments[si] = v * 1.5;
        }
    }
}

fn punctuation_emphasis(text: &str) -> f64 {
    let ep = text.matches('!').count().min(4) as f64 * 0.292;
    let qm = match text.matches('?').count() {
        0 | 1 => 0.0,
        n @ 2..=3 => n as f64 * 0.18,
        _ => 0.96,
    };
    ep + qm
}

/// What VADER reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Scope {
    /// The response alone.
    #[default]
    Response,
    /// The prompt followed by the response (a continuation judged as one text).
    Full,
}

/// VADER's compound score as a [`Judge`].
#[derive(Debug, Clone, Default)]
pub struct Vader {
    pub scope: Scope,
}

impl Vader {
    pub fn new(scope: Scope) -> Self {
        Self { scope }
    }

    /// The compound score of `text`.
    pub fn compound(&self, text: &str) -> f64 {
        compound(text)
    }
}

impl Judge for Vader {
    fn name(&self) -> &str {
        "vader"
    }

    fn score(&self, items: &[(&str, &str)]) -> Result<Vec<f64>> {
        Ok(items
            .iter()
            .map(|(p, r)| match self.scope {
                Scope::Response => compound(r),
                Scope::Full => compound(&format!("{p}{r}")),
            })
            .collect())
    }
}
