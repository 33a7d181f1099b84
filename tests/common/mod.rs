//! Helpers shared by the test suites (each test file includes this module
//! with `mod common;`).

/// Uniform values in [−1, 1) from a SplitMix64 stream seeded with `seed`.
pub fn data(seed: u64, len: usize) -> Vec<f32> {
    cellmorph::rng::signed_unit_vec(seed, len)
}
