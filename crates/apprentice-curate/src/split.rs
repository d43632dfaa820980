//! Train/validation split by episode: the side is a hash of the seed and the episode id, so every
//! inference of an episode lands on the same side (no leakage through shared context), and the
//! split is the same on every run and does not shift when other episodes come or go.

use uuid::Uuid;

pub(crate) fn in_validation(seed: u64, episode: Uuid, fraction: f64) -> bool {
    let (high, low) = episode.as_u64_pair();
    let x = mix(mix(mix(seed) ^ high) ^ low);
    let unit = (x >> 11) as f64 / (1u64 << 53) as f64;
    unit < fraction
}

/// SplitMix64's finaliser: every input bit affects every output bit, so UUIDv7's mostly-constant
/// timestamp bits do not bias the split.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
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
