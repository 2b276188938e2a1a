//! Estimates with 95% bootstrap confidence intervals (percentile method, seeded resampling):
//! the mean of a score, and the win rate of method A over method B on the same prompts (ties
//! count half). Across training seeds: the mean and the spread of per-seed figures.

use crate::{Error, Result};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// A point estimate with its 95% confidence interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Estimate {
    pub value: f64,
    pub lo: f64,
    pub hi: f64,
    /// Observations it rests on.
    pub n: usize,
}

/// Bootstrap resamples used by default.
pub const RESAMPLES: usize = 2000;

pub fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len() as f64
}

/// The `q`-quantile of sorted values, linearly interpolated (numpy's default).
fn quantile(sorted: &[f64], q: f64) -> f64 {
    let pos = q * (sorted.len() - 1) as f64;
    let (i, f) = (pos.floor() as usize, pos - pos.floor());
    if i + 1 < sorted.len() {
        sorted[i] * (1.0 - f) + sorted[i + 1] * f
    } else {
        sorted[i]
    }
}

/// The statistic `stat` of `xs` with a percentile bootstrap 95% interval from `resamples`
/// resamples drawn from `seed`.
pub fn bootstrap(xs: &[f64], stat: impl Fn(&[f64]) -> f64, resamples: usize, seed: u64) -> Result<Estimate> {
    if xs.is_empty() {
        return Err(Error::Invalid("bootstrap: no observations".into()));
    }
    if let Some(x) = xs.iter().find(|x| !x.is_finite()) {
        return Err(Error::Invalid(format!("bootstrap: observation {x} is not finite")));
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut sample = vec![0.0; xs.len()];
    let mut stats: Vec<f64> = (0..resamples.max(1))
        .map(|_| {
            sample.iter_mut().for_each(|s| *s = xs[rng.gen_range(0..xs.len())]);
            stat(&sample)
        })
        .collect();
    stats.sort_by(f64::total_cmp);
    Ok(Estimate { value: stat(xs), lo: quantile(&stats, 0.025), hi: quantile(&stats, 0.975), n: xs.len() })
}

/// Mean score with its 95% interval.
pub fn mean_ci(xs: &[f64], seed: u64) -> Result<Estimate> {
    bootstrap(xs, mean, RESAMPLES, seed)
}

/// Outcome of A against B on each prompt: 1 when A scores higher, 0.5 on a tie, else 0.
pub fn outcomes(a: &[f64], b: &[f64]) -> Result<Vec<f64>> {
    if a.len() != b.len() {
        return Err(Error::Invalid(format!("win rate: {} scores against {} (same prompts needed)", a.len(), b.len())));
    }
    Ok(a.iter()
        .zip(b)
        .map(|(x, y)| match x.total_cmp(y) {
            std::cmp::Ordering::Greater => 1.0,
            std::cmp::Ordering::Equal => 0.5,
            std::cmp::Ordering::Less => 0.0,
        })
        .collect())
}

/// Win rate of A over B on the same prompts (ties half) with its 95% interval (prompts
/// resampled).
pub fn win_rate(a: &[f64], b: &[f64], seed: u64) -> Result<Estimate> {
    bootstrap(&outcomes(a, b)?, mean, RESAMPLES, seed)
}

/// Mean and sample standard deviation of per-seed figures.
pub fn across_seeds(xs: &[f64]) -> (f64, f64) {
    let m = mean(xs);
    let var = if xs.len() > 1 { xs.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (xs.len() - 1) as f64 } else { 0.0 };
    (m, var.sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_like_numpy() {
        let s = [1.0, 2.0, 3.0, 4.0];
        // numpy.quantile([1, 2, 3, 4], [0.025, 0.5, 0.975]) = [1.075, 2.5, 3.925]
        for (q, want) in [(0.025, 1.075), (0.5, 2.5), (0.975, 3.925)] {
            assert!((quantile(&s, q) - want).abs() < 1e-12);
        }
    }

    #[test]
    fn a_constant_has_a_zero_width_interval_and_ties_are_half() {
        let e = mean_ci(&[0.25; 50], 1).unwrap(); // exact in binary: the sums are exact
        assert_eq!((e.value, e.lo, e.hi, e.n), (0.25, 0.25, 0.25, 50));
        let w = win_rate(&[1.0, 2.0, 3.0], &[1.0, 2.0, 3.0], 1).unwrap();
        assert_eq!((w.value, w.lo, w.hi), (0.5, 0.5, 0.5));
        assert_eq!(outcomes(&[2.0, 0.0, 1.0], &[1.0, 1.0, 1.0]).unwrap(), vec![1.0, 0.0, 0.5]);
        assert!(win_rate(&[1.0], &[1.0, 2.0], 0).is_err());
        assert!(mean_ci(&[], 0).is_err() && mean_ci(&[f64::NAN], 0).is_err());
    }

    #[test]
    fn the_interval_covers_the_true_mean_about_95_percent_of_the_time() {
        // Scores ~ Uniform(0, 1), true mean 0.5; 400 experiments of 100 observations.
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        let trials = 400;
        let mut covered = 0;
        let mut width = 0.0;
        for t in 0..trials {
            let xs: Vec<f64> = (0..100).map(|_| rng.gen::<f64>()).collect();
            let e = bootstrap(&xs, mean, 500, t).unwrap();
            covered += (e.lo <= 0.5 && 0.5 <= e.hi) as usize;
            width += e.hi - e.lo;
        }
        let rate = covered as f64 / trials as f64;
        // Normal theory: half-width 1.96 * sqrt(1/12) / 10 = 0.0566.
        let mean_width = width / trials as f64;
        assert!((0.91..=0.98).contains(&rate), "coverage {rate}");
        assert!((mean_width - 0.113).abs() < 0.01, "width {mean_width}");
    }

    #[test]
    fn spread_across_seeds() {
        let (m, s) = across_seeds(&[1.0, 2.0, 3.0]);
        assert_eq!((m, s), (2.0, 1.0));
        assert_eq!(across_seeds(&[4.0]), (4.0, 0.0));
    }
}
