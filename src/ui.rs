//! What a user sees while `meet` works, on stderr: a header per stage, a progress bar per phase
//! (counts, rate, ETA) on a terminal or a plain line every ~5% when piped, and a one-line summary
//! when a phase ends. Colour and bars only on a terminal, so logs stay plain text.

use std::io::IsTerminal;
use std::time::Instant;

/// Whether stderr is a terminal (bars and colour) or a pipe / file (plain lines).
pub fn is_terminal() -> bool {
    std::io::stderr().is_terminal()
}

/// A stage header: `==> MEET step 1/2: controls (model frozen)`.
pub fn header(text: &str) {
    if is_terminal() {
        eprintln!("\x1b[1m==> {text}\x1b[0m");
    } else {
        eprintln!("==> {text}");
    }
}

/// A line under the current header (a summary, a note).
pub fn note(text: &str) {
    eprintln!("    {text}");
}

/// Seconds as `42s`, `3m05s` or `1h02m`.
pub fn duration(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

enum Kind {
    Bar(indicatif::ProgressBar),
    Lines { next: usize, every: usize },
}

/// Progress of one phase over `total` units (`steps`, `prompts`, `pairs`, ...).
pub struct Progress {
    kind: Kind,
    label: String,
    unit: String,
    total: usize,
    /// Position when this process started (a resumed run), for the rate and the ETA.
    start_pos: usize,
    pos: usize,
    started: Instant,
}

impl Progress {
    /// Starts a phase at `done` of `total` units; `total` 0 when it is not known (a count
    /// without a bar, as for a JSON Lines file read as a stream).
    pub fn new(label: &str, total: usize, unit: &str, done: usize) -> Self {
        let kind = if is_terminal() {
            let bar = indicatif::ProgressBar::new(total as u64);
            let template = if total == 0 {
                format!("{{prefix}} {{spinner}} {{pos}} {unit}  {{msg}}  [{{elapsed}}]")
            } else {
                format!("{{prefix}} {{bar:30}} {{pos}}/{{len}} {unit}  {{msg}}  [{{elapsed}} < {{eta}}]")
            };
            let style = indicatif::ProgressStyle::with_template(&template)
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
            bar.set_style(style);
            bar.set_prefix(label.to_string());
            bar.set_position(done as u64);
            Kind::Bar(bar)
        } else {
            let every = if total == 0 { 10_000 } else { (total / 20).max(1) };
            Kind::Lines { next: done + 1, every }
        };
        Self {
            kind,
            label: label.into(),
            unit: unit.into(),
            total,
            start_pos: done,
            pos: done,
            started: Instant::now(),
        }
    }

    /// Seconds left at the rate of this process so far.
    pub fn eta_s(&self) -> f64 {
        let done = self.pos.saturating_sub(self.start_pos);
        if done == 0 || self.total == 0 {
            return f64::NAN;
        }
        self.started.elapsed().as_secs_f64() / done as f64 * self.total.saturating_sub(self.pos) as f64
    }

    /// Moves to `pos` with a status message (`loss 2.31  lr 1e-5`).
    pub fn update(&mut self, pos: usize, msg: &str) {
        self.pos = pos;
        let eta = self.eta_s();
        match &mut self.kind {
            Kind::Bar(b) => {
                b.set_message(msg.to_string());
                b.set_position(pos as u64);
            }
            Kind::Lines { next, every } => {
                if pos >= *next || pos == self.total {
                    let eta = if eta.is_finite() { format!("  eta {}", duration(eta)) } else { String::new() };
                    let sep = if msg.is_empty() { "" } else { "  " };
                    let of = if self.total == 0 { String::new() } else { format!("/{}", self.total) };
                    eprintln!("    {}: {pos}{of} {}{sep}{msg}{eta}", self.label, self.unit);
                    // The first unit, then every ~5%, then the last.
                    *next = if pos < *every { *every } else { (pos / *every + 1) * *every };
                }
            }
        }
    }

    /// Adds `n` units.
    pub fn inc(&mut self, n: usize, msg: &str) {
        let pos = self.pos + n;
        self.update(pos, msg);
    }

    /// Ends the phase with a one-line summary (`24 steps in 1m05s, final loss 1.93`).
    pub fn finish(self, summary: &str) {
        if let Kind::Bar(b) = &self.kind {
            b.finish_and_clear();
        }
        let took = duration(self.started.elapsed().as_secs_f64());
        let sep = if summary.is_empty() { "" } else { ", " };
        eprintln!("    {}: {} {} in {took}{sep}{summary}", self.label, self.pos, self.unit);
    }
}
