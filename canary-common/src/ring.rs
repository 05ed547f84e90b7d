//! Maglev consistent hashing (Eisenbud et al., NSDI 2016, as Katran and Cilium use it)
//! for the choice of a backend inside a version. Each backend has its own permutation
//! of the ring's entries, derived from its address alone; backends take turns claiming
//! their next free entry. Taking one of N backends out frees only its entries, which
//! the others claim in turn, so about 1/N of the hashes move and the rest keep their
//! backend: `client-ip` sticky clients survive a health change or a scale-down.
//! Built by the agent, read by the datapath (`Group::pick`) and the router.

use crate::{
    maps::{Backend, Group, MAX_GROUP_BACKENDS, RING_SIZE},
    select::backend_hash,
};

/// Fills `group.ring` over its backends that are up and sets `group.up`.
pub fn build(group: &mut Group) {
    let count = (group.count as usize).min(MAX_GROUP_BACKENDS);
    let mut offset = [0u32; MAX_GROUP_BACKENDS];
    let mut skip = [0u32; MAX_GROUP_BACKENDS];
    let mut next = [0u32; MAX_GROUP_BACKENDS];
    let mut up = 0u16;
    for i in 0..count {
        if group.is_down(i) {
            continue;
        }
        let (o, s) = permutation(&group.backends[i]);
        offset[i] = o;
        skip[i] = s;
        up += 1;
    }
    group.up = up;
    if up == 0 {
        group.ring = [0; RING_SIZE];
        return;
    }
    let mut taken = [false; RING_SIZE];
    let mut filled = 0;
    while filled < RING_SIZE {
        for i in 0..count {
            if group.is_down(i) {
                continue;
            }
            // Backend i's next entry in its permutation that nobody holds yet: at most
            // RING_SIZE probes, since skip and RING_SIZE are coprime.
            let mut entry =
                ((offset[i] as u64 + next[i] as u64 * skip[i] as u64) % RING_SIZE as u64) as usize;
            while taken[entry] {
                next[i] += 1;
                entry = ((offset[i] as u64 + next[i] as u64 * skip[i] as u64) % RING_SIZE as u64)
                    as usize;
            }
            taken[entry] = true;
            group.ring[entry] = i as u8;
            next[i] += 1;
            filled += 1;
            if filled == RING_SIZE {
                break;
            }
        }
    }
}

/// A backend's permutation: its first entry and its stride, both from its address
/// and port, so every node builds the same ring from the same backends.
fn permutation(b: &Backend) -> (u32, u32) {
    let offset = (backend_hash(&b.addr, b.port, 0) % RING_SIZE as u64) as u32;
    let skip = (backend_hash(&b.addr, b.port, 1) % (RING_SIZE as u64 - 1)) as u32 + 1;
    (offset, skip)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::select::client_hash;

    fn group(n: usize) -> Group {
        let mut g = Group {
            count: n as u16,
            ..Group::default()
        };
        for i in 0..n {
            g.backends[i] = Backend {
                addr: [
                    u32::from_ne_bytes([198, 18, (i >> 8) as u8, i as u8]),
                    0,
                    0,
                    0,
                ],
                port: 8080u16.to_be(),
                stats: 0,
            };
        }
        build(&mut g);
        g
    }

    fn picks(g: &Group, clients: u32) -> std::vec::Vec<u8> {
        (0..clients)
            .map(|c| {
                let h = client_hash(&[(0xC612_0000 | c).to_be(), 0, 0, 0]);
                g.pick(h).expect("a backend is up").0
            })
            .collect()
    }

    extern crate std;

    #[test]
    fn every_backend_gets_a_fair_share_of_the_ring() {
        for n in [1usize, 2, 3, 16, 64, 256] {
            let g = group(n);
            assert_eq!(g.up as usize, n);
            let mut per = [0usize; MAX_GROUP_BACKENDS];
            for &i in g.ring.iter() {
                assert!((i as usize) < n);
                per[i as usize] += 1;
            }
            let fair = RING_SIZE / n;
            for &k in &per[..n] {
                assert!(
                    k >= fair && k <= fair + 1,
                    "n={n}: {k} entries, fair {fair}"
                );
            }
        }
    }

    #[test]
    fn taking_one_of_64_out_moves_little_more_than_its_own_clients() {
        let before = group(64);
        let mut after = before;
        after.down[0] |= 1 << 17;
        build(&mut after);
        assert_eq!(after.up, 63);
        let (a, b) = (picks(&before, 10_000), picks(&after, 10_000));
        let moved = a.iter().zip(&b).filter(|(x, y)| x != y).count();
        let own = a.iter().filter(|&&x| x == 17).count();
        assert!(b.iter().all(|&x| x != 17));
        std::println!("1 of 64 out: {moved} of 10000 clients moved, {own} were on it");
        // Those of the removed backend must move; Maglev moves few others.
        assert!(moved >= own);
        assert!(
            moved as f64 / 10_000.0 <= 1.0 / 64.0 + 0.02,
            "{moved} of 10000 moved ({own} were on the removed backend)"
        );
    }

    #[test]
    fn the_ring_depends_on_the_backends_not_on_the_call() {
        assert_eq!(group(5).ring, group(5).ring);
        let mut none = group(3);
        none.down[0] = 0b111;
        build(&mut none);
        assert_eq!(none.up, 0);
        assert!(none.pick(42).is_none());
    }
}
