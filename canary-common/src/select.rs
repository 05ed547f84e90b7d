//! Backend selection, shared by the XDP path and the agent (and later the sockmap
//! path): the same input gives the same answer in the kernel, in userspace and on
//! every node.

use crate::maps::{GROUP_CANARY, GROUP_STABLE, WEIGHT_SCALE};

const K1: u64 = 0x9E37_79B9_7F4A_7C15;
const K2: u64 = 0xBF58_476D_1CE4_E5B9;
const K3: u64 = 0x94D0_49BB_1331_11EB;

#[inline(always)]
fn absorb(h: u64, v: u64) -> u64 {
    (h ^ v).wrapping_mul(K1).rotate_left(31)
}

/// splitmix64's finaliser: every input bit affects every output bit.
#[inline(always)]
fn finish(mut h: u64) -> u64 {
    h = (h ^ (h >> 30)).wrapping_mul(K2);
    h = (h ^ (h >> 27)).wrapping_mul(K3);
    h ^ (h >> 31)
}

#[inline(always)]
fn absorb_addr(h: u64, a: &[u32; 4]) -> u64 {
    let h = absorb(h, ((a[0] as u64) << 32) | a[1] as u64);
    absorb(h, ((a[2] as u64) << 32) | a[3] as u64)
}

/// Hash of a connection's 5-tuple (`sticky = "connection"`).
#[inline(always)]
pub fn flow_hash(src: &[u32; 4], dst: &[u32; 4], sport: u16, dport: u16, proto: u8) -> u64 {
    let h = absorb_addr(K3, src);
    let h = absorb_addr(h, dst);
    finish(absorb(
        h,
        ((sport as u64) << 32) | ((dport as u64) << 16) | proto as u64,
    ))
}

/// Hash of the client address alone (`sticky = "client-ip"`).
#[inline(always)]
pub fn client_hash(src: &[u32; 4]) -> u64 {
    finish(absorb_addr(K2, src))
}

/// Hash of a user key (a header or cookie value) for routing that is sticky per
/// user: the same key lands in the same [`bucket`] on every node and connection.
pub fn key_hash(key: &[u8]) -> u64 {
    let mut h = absorb(K1, key.len() as u64);
    for chunk in key.chunks(8) {
        let mut word = [0u8; 8];
        word[..chunk.len()].copy_from_slice(chunk);
        h = absorb(h, u64::from_le_bytes(word));
    }
    finish(h)
}

/// One of `WEIGHT_SCALE` buckets. A hash lands on canary when its bucket is below the
/// weight, so raising the weight only ever adds canary buckets: a sticky client that
/// reached canary at 5 % still reaches it at 20 %.
#[inline(always)]
pub fn bucket(hash: u64) -> u16 {
    ((hash & 0xFFFF_FFFF) % WEIGHT_SCALE as u64) as u16
}

/// Hash mode: the group a hash belongs to at this weight.
#[inline(always)]
pub fn hash_group(hash: u64, weight_bp: u16) -> u8 {
    if bucket(hash) < weight_bp {
        GROUP_CANARY
    } else {
        GROUP_STABLE
    }
}

/// Hash of a backend's address and port under `seed`: the two seeds give its
/// Maglev permutation ([`crate::ring`]).
#[inline(always)]
pub fn backend_hash(addr: &[u32; 4], port: u16, seed: u64) -> u64 {
    finish(absorb(absorb_addr(K1 ^ seed, addr), port as u64))
}

/// Exact mode: a smooth weighted counter. Over any N picks starting from any state the
/// number of canary picks is within one of N·w, because the accumulator always stays in
/// `0..WEIGHT_SCALE` and each canary pick removes exactly one full share.
#[inline(always)]
pub fn smooth_pick(acc: &mut u32, weight_bp: u16) -> u8 {
    let next = *acc + weight_bp as u32;
    if next >= WEIGHT_SCALE as u32 {
        *acc = next - WEIGHT_SCALE as u32;
        GROUP_CANARY
    } else {
        *acc = next;
        GROUP_STABLE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(a: u8, b: u8, c: u8, d: u8) -> [u32; 4] {
        [u32::from_ne_bytes([a, b, c, d]), 0, 0, 0]
    }

    #[test]
    fn hash_is_deterministic_and_sensitive_to_every_field() {
        let (s, d) = (v4(198, 18, 1, 2), v4(198, 19, 0, 10));
        let base = flow_hash(&s, &d, 40000, 80, 6);
        assert_eq!(base, flow_hash(&s, &d, 40000, 80, 6));
        assert_ne!(base, flow_hash(&s, &d, 40001, 80, 6));
        assert_ne!(base, flow_hash(&s, &d, 40000, 81, 6));
        assert_ne!(base, flow_hash(&s, &d, 40000, 80, 17));
        assert_ne!(base, flow_hash(&v4(198, 18, 1, 3), &d, 40000, 80, 6));
        assert_ne!(base, flow_hash(&s, &v4(198, 19, 0, 11), 40000, 80, 6));
    }

    #[test]
    fn buckets_are_uniform_over_ports() {
        let (s, d) = (v4(198, 18, 1, 2), v4(198, 19, 0, 10));
        let mut per_decile = [0u32; 10];
        for port in 0..60_000u16 {
            per_decile[(bucket(flow_hash(&s, &d, port, 80, 6)) / 1000) as usize] += 1;
        }
        for n in per_decile {
            assert!((5_700..6_300).contains(&n), "decile count {n}");
        }
    }

    #[test]
    fn canary_set_only_grows_with_weight() {
        for i in 0..5_000u32 {
            let h = client_hash(&[i.to_be(), 0, 0, 0]);
            let mut was_canary = false;
            for w in (0..=WEIGHT_SCALE).step_by(250) {
                let canary = hash_group(h, w) == GROUP_CANARY;
                assert!(canary || !was_canary, "client {i} left canary at {w} bp");
                was_canary = canary;
            }
            assert_eq!(hash_group(h, 0), GROUP_STABLE);
            assert_eq!(hash_group(h, WEIGHT_SCALE), GROUP_CANARY);
        }
    }

    #[test]
    fn user_keys_spread_over_buckets() {
        let mut per_decile = [0u32; 10];
        for i in 0..20_000u32 {
            let mut key = *b"user-0000";
            key[5..].copy_from_slice(&i.to_be_bytes());
            let h = key_hash(&key);
            per_decile[(bucket(h) / 1000) as usize] += 1;
        }
        for n in per_decile {
            assert!((1_850..2_150).contains(&n), "decile count {n}");
        }
        assert_ne!(key_hash(b"a"), key_hash(b"a\0"));
        assert_eq!(key_hash(b"user-1"), key_hash(b"user-1"));
    }

    #[test]
    fn smooth_pick_stays_within_one_of_target() {
        for w in [0u16, 1, 333, 1000, 2500, 5000, 9999, 10_000] {
            for start in [0u32, 1, 5000, 9999] {
                let mut acc = start;
                let mut canary = 0u64;
                for n in 1..=20_000u64 {
                    canary += (smooth_pick(&mut acc, w) == GROUP_CANARY) as u64;
                    let ideal = n as f64 * w as f64 / WEIGHT_SCALE as f64;
                    assert!((canary as f64 - ideal).abs() <= 1.0, "w={w} n={n}");
                }
            }
        }
    }
}
