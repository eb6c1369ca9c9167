//! Stratified, seeded subsets: the small proxy datasets of the search are cut this way.

use super::{DataError, ImageSource, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

/// `limit`: total images, split across classes in proportion to their frequency.
/// `per_class`: at most this many images of every class. Both may be given (per-class cap
/// first, then the total).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubsetSpec {
    pub limit: Option<usize>,
    pub per_class: Option<usize>,
    pub seed: u64,
    /// Validation images held out first ([`holdout_indices`]): the subset never holds them.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub holdout: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// Seeds the held-out validation draw. Fixed, so every run and seed that holds out N images
/// of a data set holds out the same N, and their validation scores compare.
pub const HOLDOUT_SEED: u64 = 0x7661_6c69_6461_7465;

/// The `n` validation images held out of `source` (its train split): a stratified draw with
/// [`HOLDOUT_SEED`], ascending.
pub fn holdout_indices(source: &dyn ImageSource, n: usize) -> Result<Vec<usize>> {
    if n == 0 {
        return Ok(Vec::new());
    }
    if n >= source.len() {
        return Err(DataError::BadSubset(format!(
            "cannot hold out {n} of {} images: nothing would be left to train on",
            source.len()
        )));
    }
    stratified_subset(source, &SubsetSpec::limited(Some(n), HOLDOUT_SEED))
}

impl SubsetSpec {
    /// At most `limit` images in all (`None`: everything), stratified, drawn with `seed`.
    pub fn limited(limit: Option<usize>, seed: u64) -> Self {
        Self {
            limit,
            per_class: None,
            seed,
            holdout: 0,
        }
    }

    pub fn is_full(&self) -> bool {
        self.limit.is_none() && self.per_class.is_none() && self.holdout == 0
    }
}

/// Indices of a stratified subset of `source` (ascending order).
pub fn stratified_subset(source: &dyn ImageSource, spec: &SubsetSpec) -> Result<Vec<usize>> {
    let n = source.len();
    if spec.is_full() {
        return Ok((0..n).collect());
    }
    if spec.limit == Some(0) || spec.per_class == Some(0) {
        return Err(DataError::BadSubset("subset size must be positive".into()));
    }
    let held: std::collections::HashSet<usize> =
        holdout_indices(source, spec.holdout)?.into_iter().collect();
    let mut by_class: Vec<Vec<usize>> = vec![Vec::new(); source.num_classes()];
    for i in (0..n).filter(|i| !held.contains(i)) {
        by_class[source.label(i) as usize].push(i);
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(spec.seed);
    for members in by_class.iter_mut() {
        members.shuffle(&mut rng);
        if let Some(k) = spec.per_class {
            members.truncate(k);
        }
    }
    let available: usize = by_class.iter().map(Vec::len).sum();
    let quotas: Vec<usize> = match spec.limit {
        Some(limit) if limit < available => proportional_quotas(&by_class, limit),
        Some(limit) if limit > available => {
            return Err(DataError::BadSubset(format!(
                "asked for {limit} images but only {available} are available"
            )))
        }
        _ => by_class.iter().map(Vec::len).collect(),
    };
    let mut out: Vec<usize> = by_class
        .iter()
        .zip(quotas)
        .flat_map(|(m, q)| m[..q].iter().copied())
        .collect();
    out.sort_unstable();
    Ok(out)
}

/// Largest-remainder apportionment of `limit` over the classes' sizes.
fn proportional_quotas(by_class: &[Vec<usize>], limit: usize) -> Vec<usize> {
    let total: usize = by_class.iter().map(Vec::len).sum();
    let mut quotas: Vec<usize> = by_class.iter().map(|m| m.len() * limit / total).collect();
    let mut rest: Vec<(usize, usize)> = by_class
        .iter()
        .enumerate()
        .map(|(c, m)| (c, (m.len() * limit) % total))
        .collect();
    // Largest remainder first; ties go to the lower class index, so the result is deterministic.
    rest.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let missing = limit - quotas.iter().sum::<usize>();
    for &(c, _) in rest.iter().take(missing) {
        quotas[c] += 1;
    }
    quotas
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::InMemoryDataset;

    fn toy(labels: Vec<i64>) -> InMemoryDataset {
        InMemoryDataset {
            shape: [1, 1, 1],
            pixels: vec![0; labels.len()],
            labels,
            num_classes: 3,
            description: "toy".into(),
        }
    }

    #[test]
    fn holdout_is_fixed_stratified_and_disjoint_from_the_subset() {
        let labels: Vec<i64> = (0..300).map(|i| i % 3).collect();
        let d = toy(labels);
        let held = holdout_indices(&d, 30).unwrap();
        assert_eq!(held.len(), 30);
        for c in 0..3 {
            assert_eq!(held.iter().filter(|&&i| i % 3 == c).count(), 10);
        }
        let spec = |seed, limit| SubsetSpec {
            limit,
            per_class: None,
            seed,
            holdout: 30,
        };
        for (seed, limit) in [(0, None), (5, Some(100))] {
            let train = stratified_subset(&d, &spec(seed, limit)).unwrap();
            assert_eq!(train.len(), limit.unwrap_or(270));
            assert!(train.iter().all(|i| !held.contains(i)));
        }
        // The same images whatever the subset's seed.
        assert_eq!(holdout_indices(&d, 30).unwrap(), held);
        assert!(holdout_indices(&d, 300).is_err());
    }

    #[test]
    fn stratified_limit_is_proportional_and_seeded() {
        // 60 of class 0, 30 of class 1, 10 of class 2.
        let labels: Vec<i64> = (0..100)
            .map(|i| {
                if i < 60 {
                    0
                } else if i < 90 {
                    1
                } else {
                    2
                }
            })
            .collect();
        let d = toy(labels);
        let spec = SubsetSpec {
            limit: Some(10),
            per_class: None,
            seed: 7,
            holdout: 0,
        };
        let s = stratified_subset(&d, &spec).unwrap();
        let count = |c| s.iter().filter(|&&i| d.labels[i] == c).count();
        assert_eq!((count(0), count(1), count(2)), (6, 3, 1));
        assert_eq!(s, stratified_subset(&d, &spec).unwrap());
        let other = stratified_subset(&d, &SubsetSpec { seed: 8, ..spec }).unwrap();
        assert_ne!(s, other);
    }

    #[test]
    fn per_class_caps_and_too_large_limit_errors() {
        let labels: Vec<i64> = (0..30).map(|i| i % 3).collect();
        let d = toy(labels);
        let s = stratified_subset(
            &d,
            &SubsetSpec {
                limit: None,
                per_class: Some(2),
                seed: 0,
                holdout: 0,
            },
        )
        .unwrap();
        assert_eq!(s.len(), 6);
        assert!(stratified_subset(
            &d,
            &SubsetSpec {
                limit: Some(31),
                per_class: None,
                seed: 0,
                holdout: 0,
            }
        )
        .is_err());
    }
}
