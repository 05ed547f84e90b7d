//! Quantiles and tail counts from latency histograms (the float side of
//! [`canary_common::histogram`], kept out of the shared `no_std` file).

use canary_common::histogram::{bucket_lower_ns, bucket_upper_ns, LATENCY_BUCKETS};

/// Index of the bucket holding the value of rank ⌈q·n⌉ (1-based), or `None` for an
/// empty histogram.
pub fn quantile_bucket(counts: &[u64], q: f64) -> Option<usize> {
    let n: u64 = counts.iter().sum();
    if n == 0 {
        return None;
    }
    let rank = ((q * n as f64).ceil() as u64).clamp(1, n);
    let mut cum = 0u64;
    counts.iter().position(|&c| {
        cum += c;
        cum >= rank
    })
}

/// q-quantile estimate in nanoseconds: the midpoint of the bucket holding it (relative
/// error < 5 % by the histogram layout); the overflow bucket reports its lower bound.
pub fn quantile_ns(counts: &[u64], q: f64) -> Option<f64> {
    let b = quantile_bucket(counts, q)? as u32;
    let lo = bucket_lower_ns(b) as f64;
    Some(if b as usize + 1 >= LATENCY_BUCKETS {
        lo
    } else {
        (lo + bucket_upper_ns(b) as f64) / 2.0
    })
}

/// Number of samples certainly at or above `cut_ns` (buckets whose lower bound is
/// ≥ the cut) — rounding the cut up to a bucket edge undercounts, the safe direction
/// when asking "is the canary slower".
pub fn count_at_or_above(counts: &[u64], cut_ns: u64) -> u64 {
    counts
        .iter()
        .enumerate()
        .filter(|&(i, _)| bucket_lower_ns(i as u32) >= cut_ns)
        .map(|(_, &c)| c)
        .sum()
}

/// Number of samples possibly at or above `cut_ns` (buckets whose upper bound exceeds
/// the cut) — overcounts, the safe direction when asking "is the canary faster".
pub fn count_possibly_above(counts: &[u64], cut_ns: u64) -> u64 {
    counts
        .iter()
        .enumerate()
        .filter(|&(i, _)| bucket_upper_ns(i as u32) > cut_ns)
        .map(|(_, &c)| c)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use canary_common::histogram::latency_bucket;

    #[test]
    fn quantile_within_five_percent() {
        let mut counts = vec![0u64; LATENCY_BUCKETS];
        // 1..=10_000 µs uniformly: true p99 = 9_900 µs, p50 = 5_000 µs.
        for us in 1..=10_000u64 {
            counts[latency_bucket(us * 1000) as usize] += 1;
        }
        for (q, truth) in [(0.99, 9.9e6), (0.5, 5.0e6), (0.01, 1.0e5)] {
            let est = quantile_ns(&counts, q).unwrap();
            assert!((est / truth - 1.0).abs() < 0.05, "q={q}: {est} vs {truth}");
        }
        assert_eq!(quantile_ns(&[0; 4], 0.5), None);
    }

    #[test]
    fn tail_counts_round_in_the_safe_direction() {
        let mut counts = vec![0u64; LATENCY_BUCKETS];
        let b = latency_bucket(3_000_000) as usize;
        counts[b] = 7;
        counts[b + 1] = 5;
        let inside = bucket_lower_ns(b as u32) + 1;
        assert_eq!(count_at_or_above(&counts, inside), 5);
        assert_eq!(count_possibly_above(&counts, inside), 12);
        assert_eq!(count_at_or_above(&counts, bucket_lower_ns(b as u32)), 12);
    }
}
