// SPDX-License-Identifier: MIT OR Apache-2.0
//! Order statistics over samples.

use serde::{Deserialize, Serialize};

/// An empty sample's order statistics are NaN, which JSON writes as null;
/// read null back as NaN.
fn nan_if_null<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Summary {
    pub n: usize,
    #[serde(deserialize_with = "nan_if_null")]
    pub p10: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub p50: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub p90: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub p99: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub p999: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub max: f64,
}

/// Nearest-rank percentile of sorted samples (`q` in 0..=1).
fn rank(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[idx]
}

pub fn summarize(samples: &[f64]) -> Summary {
    let mut sorted: Vec<f64> = samples.iter().copied().filter(|v| !v.is_nan()).collect();
    sorted.sort_by(f64::total_cmp);
    Summary {
        n: sorted.len(),
        p10: rank(&sorted, 0.10),
        p50: rank(&sorted, 0.50),
        p90: rank(&sorted, 0.90),
        p99: rank(&sorted, 0.99),
        p999: rank(&sorted, 0.999),
        max: sorted.last().copied().unwrap_or(f64::NAN),
    }
}

/// A median with its 95 % confidence interval, µs.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Median {
    pub n: usize,
    pub p50: f64,
    pub lo: f64,
    pub hi: f64,
}

/// The median of `samples` and a distribution-free 95 % interval for it:
/// the order statistics of ranks j = ⌊n/2 − 1.96·√n/2⌋ and n − j + 1 (the
/// normal approximation of the binomial count of samples below the median;
/// fine from n ≈ 20).
pub fn median_ci(samples: &[f64]) -> Median {
    let mut sorted: Vec<f64> = samples.iter().copied().filter(|v| !v.is_nan()).collect();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    if n == 0 {
        return Median {
            n,
            p50: f64::NAN,
            lo: f64::NAN,
            hi: f64::NAN,
        };
    }
    let half = 1.96 * (n as f64).sqrt() / 2.0;
    // 1-based ranks.
    let j = ((n as f64 / 2.0 - half).floor().max(1.0) as usize).min(n);
    let k = n - j + 1;
    Median {
        n,
        p50: rank(&sorted, 0.50),
        lo: sorted[j - 1],
        hi: sorted[k - 1],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank() {
        let v: Vec<f64> = (1..=10).map(f64::from).collect();
        let s = summarize(&v);
        assert_eq!(s.p50, 5.0);
        assert_eq!(s.p10, 1.0);
        assert_eq!(s.p90, 9.0);
        assert_eq!(s.max, 10.0);
        assert!(summarize(&[]).p50.is_nan());
        let back: Summary = serde_json::from_str(&serde_json::to_string(&summarize(&[])).unwrap()).unwrap();
        assert!(back.p99.is_nan());
    }

    #[test]
    fn median_interval_brackets_the_median() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        let m = median_ci(&v);
        assert_eq!(m.p50, 50.0);
        // n = 100: j = ⌊50 − 9.8⌋ = 40, and n − j + 1 = 61.
        assert_eq!((m.lo, m.hi), (40.0, 61.0));
        assert!(median_ci(&[]).p50.is_nan());
        let one = median_ci(&[7.0]);
        assert_eq!((one.lo, one.p50, one.hi), (7.0, 7.0, 7.0));
    }
}
