//! Several training sources mixed by weight (`[[data.sources]]`), and a held-out share split off
//! the training data (`[data] eval_share`). Both are seeded: a run gives the same data each time.

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The order of a weighted mixture of sources of `sizes` examples: `len` draws, each picking
/// source `i` with probability `weights[i] / Σ weights`, then that source's next example in a
/// seeded shuffled pass; a source that runs out starts a new pass (so a small source with a
/// large weight is repeated, as `datasets`' `interleave_datasets` with probabilities does under
/// `stopping_strategy="all_exhausted"`). Returns `(source, index)` per draw.
pub fn mixture(sizes: &[usize], weights: &[f64], len: usize, seed: u64) -> Vec<(usize, usize)> {
    assert_eq!(sizes.len(), weights.len(), "one weight per source");
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x4D49_5845);
    let total: f64 = weights.iter().sum();
    let mut passes: Vec<(Vec<usize>, usize, u64)> = sizes.iter().map(|&n| (Vec::new(), n, 0)).collect();
    let mut next_of = |s: usize| -> usize {
        let (order, at, pass) = &mut passes[s];
        if *at >= order.len() {
            *order = (0..sizes[s]).collect();
            order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed ^ ((s as u64) << 32) ^ *pass));
            *pass += 1;
            *at = 0;
        }
        *at += 1;
        order[*at - 1]
    };
    (0..len)
        .map(|_| {
            let mut u = rng.gen::<f64>() * total;
            let mut s = 0;
            while s + 1 < weights.len() && u >= weights[s] {
                u -= weights[s];
                s += 1;
            }
            // A source with no examples is never drawn (its weight is refused earlier).
            (s, next_of(s))
        })
        .collect()
}

/// A seeded held-out share of `n` examples: `(train, eval)` indices, each in the original
/// order; `round(n · share)` held out, at least one, and at least one left to train on.
pub fn split_share(n: usize, share: f64, seed: u64) -> std::result::Result<(Vec<usize>, Vec<usize>), String> {
    let k = ((n as f64) * share).round().max(1.0) as usize;
    if k >= n {
        return Err(format!("eval_share {share} of {n} examples leaves none to train on"));
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed ^ 0x4556_414C));
    let mut eval = order[..k].to_vec();
    let mut train = order[k..].to_vec();
    eval.sort_unstable();
    train.sort_unstable();
    Ok((train, eval))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mixture_draws_each_source_in_proportion_to_its_weight() {
        let (sizes, weights) = ([50, 300, 20], [0.5, 0.3, 0.2]);
        for seed in [0, 7] {
            let draws = mixture(&sizes, &weights, 10_000, seed);
            for (s, w) in weights.iter().enumerate() {
                let share = draws.iter().filter(|d| d.0 == s).count() as f64 / draws.len() as f64;
                assert!((share - w).abs() <= 0.02, "seed {seed} source {s}: {share} vs {w}");
            }
            // Passes cover a source before repeating it: the 20-example source, drawn ~2000
            // times, gives each example ~100 times.
            let mut seen = [0usize; 20];
            draws.iter().filter(|d| d.0 == 2).for_each(|d| seen[d.1] += 1);
            assert!(seen.iter().all(|&c| c >= 90), "{seen:?}");
        }
        assert_eq!(mixture(&sizes, &weights, 100, 3), mixture(&sizes, &weights, 100, 3), "seeded");
        assert_ne!(mixture(&sizes, &weights, 100, 3), mixture(&sizes, &weights, 100, 4));
    }

    #[test]
    fn held_out_share_is_seeded_disjoint_and_leaves_training_data() {
        let (train, eval) = split_share(100, 0.1, 5).unwrap();
        assert_eq!((train.len(), eval.len()), (90, 10));
        let mut all = [train.clone(), eval.clone()].concat();
        all.sort_unstable();
        assert_eq!(all, (0..100).collect::<Vec<_>>());
        assert_eq!(split_share(100, 0.1, 5).unwrap().1, eval);
        assert_eq!(split_share(3, 0.01, 0).unwrap().1.len(), 1, "at least one held out");
        assert!(split_share(1, 0.5, 0).is_err());
    }
}
