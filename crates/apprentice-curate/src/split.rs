//! Train/validation split by episode: the side is a hash of the seed and the episode id, so every
//! inference of an episode lands on the same side (no leakage through shared context), and the
//! split is the same on every run and does not shift when other episodes come or go.

use uuid::Uuid;

use crate::export::Fnv1a;

pub(crate) fn in_validation(seed: u64, episode: Uuid, fraction: f64) -> bool {
    let mut hash = Fnv1a::new();
    hash.write(&seed.to_le_bytes());
    hash.write(episode.as_bytes());
    // FNV's low bits mix poorly; one more avalanche step (from SplitMix64) spreads them.
    let mut x = hash.finish();
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^= x >> 31;
    let unit = (x >> 11) as f64 / (1u64 << 53) as f64;
    unit < fraction
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fraction_bounds_and_rough_share() {
        let episodes: Vec<Uuid> = (0..2000u128).map(Uuid::from_u128).collect();
        assert!(episodes.iter().all(|e| !in_validation(1, *e, 0.0)));
        assert!(episodes.iter().all(|e| in_validation(1, *e, 1.0)));
        let held_out = episodes.iter().filter(|e| in_validation(1, **e, 0.2)).count();
        assert!((300..500).contains(&held_out), "{held_out} of 2000 at 0.2");
    }
}
