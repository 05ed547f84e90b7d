//! Incremental Internet checksum updates (RFC 1624: HC' = ~(~HC + ~m + m')).
//! Words are taken exactly as loaded from the packet; one's-complement sums are
//! byte-order agnostic, so no swapping is needed.

#[inline(always)]
fn fold(mut sum: u64) -> u16 {
    sum = (sum & 0xFFFF_FFFF) + (sum >> 32);
    sum = (sum & 0xFFFF_FFFF) + (sum >> 32);
    sum = (sum & 0xFFFF) + (sum >> 16);
    sum = (sum & 0xFFFF) + (sum >> 16);
    sum as u16
}

/// Checksum after replacing the 32-bit word `old` with `new`.
#[inline(always)]
pub fn replace32(check: u16, old: u32, new: u32) -> u16 {
    let sum = (!check) as u64 + (!old) as u64 + new as u64;
    !fold(sum)
}

/// Checksum after replacing the 16-bit word `old` with `new`.
#[inline(always)]
pub fn replace16(check: u16, old: u16, new: u16) -> u16 {
    let sum = (!check) as u64 + (!old) as u64 + new as u64;
    !fold(sum)
}

/// Checksum after replacing a whole (IPv4 or IPv6) address.
#[inline(always)]
pub fn replace_addr(check: u16, old: &[u32; 4], new: &[u32; 4]) -> u16 {
    let mut sum = (!check) as u64;
    sum += (!old[0]) as u64 + new[0] as u64;
    sum += (!old[1]) as u64 + new[1] as u64;
    sum += (!old[2]) as u64 + new[2] as u64;
    sum += (!old[3]) as u64 + new[3] as u64;
    !fold(sum)
}

/// The 32-bit one's-complement difference of replacing address `old` with `new` (the
/// kernel's `__wsum` diff, as `bpf_l4_csum_replace` takes it with a size of 0): one
/// helper call for an IPv6 address instead of one per word.
#[inline(always)]
pub fn addr_diff(old: &[u32; 4], new: &[u32; 4]) -> u32 {
    let mut sum = 0u64;
    let mut i = 0;
    while i < 4 {
        sum += (!old[i]) as u64 + new[i] as u64;
        i += 1;
    }
    sum = (sum & 0xFFFF_FFFF) + (sum >> 32);
    sum = (sum & 0xFFFF_FFFF) + (sum >> 32);
    sum as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Full checksum over native-endian 16-bit words, as the kernel would load them.
    fn full(words: &[u16]) -> u16 {
        !fold(words.iter().map(|&w| w as u64).sum())
    }

    #[test]
    fn incremental_matches_recomputation() {
        let mut words: [u16; 10] = [
            0x4500, 0x0054, 0x1c46, 0x4000, 0x4006, 0, 0xc612, 0x0102, 0xc613, 0x000a,
        ];
        let check = full(&words);
        // Replace the last address (two words) and a port-like word.
        let old = ((words[9] as u32) << 16) | words[8] as u32;
        words[8] = 0xc612;
        words[9] = 0x0302;
        let new = ((words[9] as u32) << 16) | words[8] as u32;
        assert_eq!(replace32(check, old, new), full(&words));
        let check = full(&words);
        let old16 = words[2];
        words[2] = 0xffff;
        assert_eq!(replace16(check, old16, 0xffff), full(&words));
    }

    #[test]
    fn address_replacement_covers_all_words() {
        let mut data = [0x2001u16, 0x0db8, 0xffff, 0, 0, 0, 0, 0x10, 0x1234, 0x0006];
        let check = full(&data);
        let as_words = |d: &[u16]| -> [u32; 4] {
            core::array::from_fn(|i| ((d[2 * i + 1] as u32) << 16) | d[2 * i] as u32)
        };
        let old = as_words(&data);
        data[..8].copy_from_slice(&[0x2001, 0x0db8, 3, 0, 0, 0, 0, 2]);
        let new = as_words(&data);
        assert_eq!(replace_addr(check, &old, &new), full(&data));
    }

    #[test]
    fn an_address_diff_applied_to_a_checksum_is_the_address_replacement() {
        let cases: [([u32; 4], [u32; 4], u16); 3] = [
            ([0x0102_c612, 0, 0, 0], [0x0203_c612, 0, 0, 0], 0x1c46),
            (
                [0xb80d_0120, 0, 0xffff, 0x1000_0000],
                [0xb80d_0120, 0, 2, 0x0200_0000],
                0xffff,
            ),
            ([u32::MAX; 4], [0; 4], 0),
        ];
        for (old, new, check) in cases {
            // How the kernel applies a diff to a complete checksum.
            let applied = !fold((!check) as u64 + addr_diff(&old, &new) as u64);
            assert_eq!(
                applied,
                replace_addr(check, &old, &new),
                "{old:x?} -> {new:x?}"
            );
        }
    }
}
