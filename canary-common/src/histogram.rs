//! Log-linear latency histogram over nanoseconds, shared with the eBPF program.
//!
//! This file must stay `#![no_std]`-compatible and acceptable to the BPF verifier: pure
//! integer arithmetic, no floats, no allocation, no loops, and only shifts/masks by
//! constants or by a bit position that is bounded by construction.
//!
//! Layout (index → range of nanoseconds, upper bound exclusive):
//! - bucket 0: `[0, 1024)` — everything below ~1 µs; request latencies that small are
//!   not distinguishable from measurement noise anyway.
//! - buckets `1 ..= 416`: for every octave `[2^e, 2^(e+1))` with `e` in `10..36`,
//!   16 equal-width sub-buckets. A sub-bucket's width is `2^e / 16`, so its midpoint is
//!   within `1/32` (≈ 3.1 %) of any value in it: a quantile estimated from the midpoint
//!   has relative error below 5 %.
//! - bucket 417: `[2^36, ∞)` — everything from ~68.7 s on.

/// log2 of the first value that gets its own octave (1024 ns ≈ 1 µs).
const MIN_EXP: u32 = 10;
/// log2 of the first value that lands in the overflow bucket (2^36 ns ≈ 68.7 s).
const MAX_EXP: u32 = 36;
/// Sub-buckets per octave are `2^SUB_BITS`.
const SUB_BITS: u32 = 4;
const SUBS: u32 = 1 << SUB_BITS;
/// Index of the overflow bucket.
const LAST: u32 = 1 + (MAX_EXP - MIN_EXP) * SUBS;

/// Number of buckets (418): one underflow bucket, 26 octaves of 16, one overflow bucket.
pub const LATENCY_BUCKETS: usize = LAST as usize + 1;

/// Bucket index for a latency in nanoseconds.
///
/// The octave is the position of the highest set bit (from `leading_zeros`), the
/// sub-bucket the next 4 bits below it.
#[inline(always)]
pub fn latency_bucket(ns: u64) -> u32 {
    if ns < (1u64 << MIN_EXP) {
        return 0;
    }
    if ns >= (1u64 << MAX_EXP) {
        return LAST;
    }
    // ns is in [2^10, 2^36), so exp is in 10..36 and exp - SUB_BITS never underflows.
    let exp = 63 - ns.leading_zeros();
    let sub = ((ns >> (exp - SUB_BITS)) as u32) & (SUBS - 1);
    1 + ((exp - MIN_EXP) << SUB_BITS) + sub
}

/// Smallest nanosecond value that falls into bucket `idx` (indices past the end are
/// treated as the overflow bucket).
#[inline(always)]
pub fn bucket_lower_ns(idx: u32) -> u64 {
    if idx == 0 {
        return 0;
    }
    if idx >= LAST {
        return 1u64 << MAX_EXP;
    }
    let i = idx - 1;
    let exp = MIN_EXP + (i >> SUB_BITS);
    let sub = (i & (SUBS - 1)) as u64;
    ((SUBS as u64) + sub) << (exp - SUB_BITS)
}

/// Exclusive upper bound of bucket `idx`; `u64::MAX` for the overflow bucket, which has
/// no upper bound.
#[inline(always)]
pub fn bucket_upper_ns(idx: u32) -> u64 {
    if idx >= LAST {
        u64::MAX
    } else {
        bucket_lower_ns(idx + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Straightforward reference: walk the bucket bounds.
    fn reference_bucket(ns: u64) -> u32 {
        (0..LATENCY_BUCKETS as u32)
            .rev()
            .find(|&i| bucket_lower_ns(i) <= ns)
            .unwrap()
    }

    #[test]
    fn layout_constants() {
        assert_eq!(LATENCY_BUCKETS, 418);
        assert_eq!(bucket_upper_ns(0), 1024);
        assert_eq!(bucket_lower_ns(1), 1024);
        assert_eq!(bucket_lower_ns(LAST), 1 << 36);
        assert_eq!(bucket_upper_ns(LAST - 1), 1 << 36);
        assert_eq!(bucket_upper_ns(LAST), u64::MAX);
        // Out-of-range indices clamp to the overflow bucket.
        assert_eq!(bucket_lower_ns(LAST + 7), 1 << 36);
        assert_eq!(bucket_upper_ns(u32::MAX), u64::MAX);
    }

    #[test]
    fn every_bucket_edge_maps_back() {
        for i in 0..LATENCY_BUCKETS as u32 {
            let lo = bucket_lower_ns(i);
            let hi = bucket_upper_ns(i);
            assert!(lo < hi, "bucket {i} empty");
            assert_eq!(latency_bucket(lo), i, "lower edge of {i}");
            assert_eq!(latency_bucket(hi - 1), i, "upper edge of {i}");
            if i + 1 < LATENCY_BUCKETS as u32 {
                assert_eq!(hi, bucket_lower_ns(i + 1), "gap after {i}");
                assert_eq!(latency_bucket(hi), i + 1);
            }
            if lo > 0 {
                assert_eq!(latency_bucket(lo - 1), i - 1);
            }
        }
    }

    #[test]
    fn powers_of_two_and_extremes() {
        for k in 0..64u32 {
            let p = 1u64 << k;
            for ns in [p - 1, p, p + 1] {
                assert_eq!(latency_bucket(ns), reference_bucket(ns), "ns = {ns}");
            }
        }
        assert_eq!(latency_bucket(0), 0);
        assert_eq!(latency_bucket(1023), 0);
        assert_eq!(latency_bucket(1024), 1);
        assert_eq!(latency_bucket((1 << 36) - 1), LAST - 1);
        assert_eq!(latency_bucket(1 << 36), LAST);
        assert_eq!(latency_bucket(u64::MAX), LAST);
    }

    #[test]
    fn exhaustive_low_range_and_strided_high_range() {
        for ns in 0..=(1u64 << 17) {
            assert_eq!(latency_bucket(ns), reference_bucket(ns), "ns = {ns}");
        }
        // A stride that is coprime with every power of two hits all sub-bucket phases.
        let mut ns = 1u64 << 17;
        while ns < (1u64 << 37) {
            assert_eq!(latency_bucket(ns), reference_bucket(ns), "ns = {ns}");
            ns += 999_983;
        }
    }

    #[test]
    fn midpoint_relative_error_below_five_percent() {
        for i in 1..LAST {
            let lo = bucket_lower_ns(i);
            let hi = bucket_upper_ns(i);
            let mid = (lo + hi) / 2;
            // Worst case is a value at the lower edge: (mid - lo) / lo.
            assert!((mid - lo) * 20 < lo, "bucket {i}: {lo}..{hi}");
            // ... and just below the upper edge: (hi - 1 - mid) / (hi - 1).
            assert!((hi - 1 - mid) * 20 < hi - 1);
        }
    }

    #[test]
    fn monotone() {
        let mut prev = 0;
        for ns in (0..(1u64 << 37)).step_by(1 << 20) {
            let b = latency_bucket(ns);
            assert!(b >= prev);
            prev = b;
        }
    }
}
