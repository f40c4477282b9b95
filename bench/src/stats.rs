//! Order statistics over samples.

use serde::Serialize;

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Summary {
    pub n: usize,
    pub p10: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
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
    }
}
