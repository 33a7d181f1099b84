//! Seeded randomness, written once for the library, its tests and benches:
//! SplitMix64 (Steele, Lea & Flood 2014), a small, fast, counter-style
//! generator whose output passes BigCrush, and the streams built on it.
//!
//! The fixture scripts (`scripts/fixtures/`) implement [`seeded_tensor`] in
//! numpy, so weights too large to keep in the repository are regenerated
//! bit-identically from a seed and a tensor name by both sides.

/// SplitMix64 (Steele, Lea & Flood 2014): a small, fast, deterministic
/// generator whose output passes BigCrush; ample for synthetic data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitMix64 {
    state: u64,
}

const GOLDEN_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// The SplitMix64 output function (a bijective 64-bit mixer).
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// 64 random bits for element `index` of step `step` under `seed`: a
/// stateless counter-based draw (each key mixed through `mix64`, so any
/// element can be drawn alone, in any order, on any device). The device
/// kernels compute the same integer arithmetic; it is the source of every
/// training-time random mask (dropout).
pub fn counter_u64(seed: u64, step: u64, index: u64) -> u64 {
    let k = mix64(seed.wrapping_add(GOLDEN_GAMMA));
    let k = mix64(k ^ step.wrapping_mul(GOLDEN_GAMMA));
    mix64(k ^ index.wrapping_mul(0xD1B5_4A32_D192_ED03))
}

/// Whether dropout with drop probability `p` keeps element `index` of step
/// `step` under `seed`: the top 24 bits of [`counter_u64`] as a uniform
/// `u` in [0, 1) on a 2⁻²⁴ grid (exact in `f32`), kept when `u >= p`. The
/// kept elements are scaled by `1/(1−p)` by the caller, as PyTorch does.
pub fn dropout_keep(seed: u64, step: u64, index: u64, p: f32) -> bool {
    let u = (counter_u64(seed, step, index) >> 40) as f32 * (1.0 / (1u32 << 24) as f32);
    u >= p
}

impl SplitMix64 {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> SplitMix64 {
        SplitMix64 { state: seed }
    }

    /// An independent generator for sub-stream `stream`, derived from the
    /// current state without advancing it (so parallel work stays
    /// deterministic).
    pub fn fork(&self, stream: u64) -> SplitMix64 {
        SplitMix64::new(mix64(self.state ^ mix64(stream.wrapping_add(GOLDEN_GAMMA))))
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GOLDEN_GAMMA);
        mix64(self.state)
    }

    /// Uniform in [0, 1), with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in [lo, hi).
    pub fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.next_f64()
    }

    /// Uniform integer in [0, n) by multiply-shift (bias below 2⁻⁶⁴·n,
    /// irrelevant here); 0 when `n` is 0.
    pub fn below(&mut self, n: usize) -> usize {
        ((u128::from(self.next_u64()) * n as u128) >> 64) as usize
    }

    /// Standard normal by the Box–Muller transform.
    pub fn normal(&mut self) -> f64 {
        // 1 − u lies in (0, 1], so the logarithm is finite.
        let r = (-2.0 * (1.0 - self.next_f64()).ln()).sqrt();
        r * (std::f64::consts::TAU * self.next_f64()).cos()
    }

    /// Poisson with mean `lambda` (0 for a non-positive or non-finite mean).
    /// Exact (Knuth's product of uniforms) below 30; above, the normal
    /// approximation rounded to an integer, whose error (skewness 1/√λ) is
    /// far below the log-normal gene noise it is added to.
    pub fn poisson(&mut self, lambda: f64) -> u64 {
        if !(lambda > 0.0 && lambda.is_finite()) {
            return 0;
        }
        if lambda < 30.0 {
            let limit = (-lambda).exp();
            let mut k = 0;
            let mut p = self.next_f64();
            while p > limit {
                k += 1;
                p *= self.next_f64();
            }
            return k;
        }
        (lambda + lambda.sqrt() * self.normal()).round().max(0.0) as u64
    }
}

impl SplitMix64 {
    /// Uniform in [0, 1) with 24 random bits, exact in `f32`.
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
    }

    /// Uniform in [lo, hi) in `f32` arithmetic: `lo + (hi − lo) · u` with
    /// `u` from [`SplitMix64::next_f32`].
    pub fn uniform_f32(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.next_f32()
    }

    /// `len` values of [`SplitMix64::uniform_f32`].
    pub fn uniform_vec(&mut self, len: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..len).map(|_| self.uniform_f32(lo, hi)).collect()
    }
}

/// `len` values uniform in [−1, 1) (`2u − 1`, `u` with 24 bits) from a
/// generator seeded with `seed`: the test suites' data.
pub fn signed_unit_vec(seed: u64, len: usize) -> Vec<f32> {
    let mut rng = SplitMix64::new(seed);
    (0..len).map(|_| rng.next_f32() * 2.0 - 1.0).collect()
}

/// FNV-1a (64-bit) of a string: the per-name stream key of [`seeded_tensor`].
pub fn fnv1a64(text: &str) -> u64 {
    text.bytes().fold(0xCBF2_9CE4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01B3)
    })
}

/// The values of tensor `name` in a seeded weights file: element `i` is
/// `bound · (2u − 1)`, `u` the `i`-th [`SplitMix64::next_f32`] of a
/// generator seeded with `seed ^ fnv1a64(name)`, all in `f32`.
/// `scripts/fixtures/seeded.py` computes the same bits in numpy.
pub fn seeded_tensor(seed: u64, name: &str, len: usize, bound: f32) -> Vec<f32> {
    let mut rng = SplitMix64::new(seed ^ fnv1a64(name));
    (0..len)
        .map(|_| bound * (rng.next_f32() * 2.0 - 1.0))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_tensor_is_a_plain_splitmix_stream() {
        let v = seeded_tensor(5, "a.weight", 3, 0.5);
        let mut r = SplitMix64::new(5 ^ fnv1a64("a.weight"));
        for x in v {
            assert_eq!(x, 0.5 * (r.next_f32() * 2.0 - 1.0));
            assert!((-0.5..0.5).contains(&x));
        }
        // The same three values from scripts/fixtures/seeded.py (numpy).
        let bits: Vec<u32> = seeded_tensor(5, "a.weight", 3, 0.5)
            .iter()
            .map(|v| v.to_bits())
            .collect();
        assert_eq!(bits, [0xbef1_a83a, 0xbe6f_9814, 0x3ead_df44]);
        // FNV-1a reference values.
        assert_eq!(fnv1a64(""), 0xCBF2_9CE4_8422_2325);
        assert_eq!(fnv1a64("a"), 0xAF63_DC4C_8601_EC8C);
    }

    #[test]
    fn dropout_mask_keeps_about_one_minus_p_and_depends_on_every_key() {
        let n = 20_000u64;
        for &p in &[0.1f32, 0.5, 0.9] {
            let kept = (0..n).filter(|&i| dropout_keep(7, 3, i, p)).count() as f64;
            // Binomial: 4 standard deviations of n·p·(1−p) at most ~0.85 %.
            let expect = n as f64 * (1.0 - p as f64);
            assert!(
                (kept - expect).abs() < 4.0 * (n as f64 * 0.25).sqrt(),
                "{p}: {kept}"
            );
        }
        assert!((0..n).all(|i| dropout_keep(7, 3, i, 0.0)));
        assert!((0..n).all(|i| !dropout_keep(7, 3, i, 1.0)));
        let mask = |seed, step| {
            (0..256)
                .map(|i| dropout_keep(seed, step, i, 0.5))
                .collect::<Vec<_>>()
        };
        assert_eq!(mask(1, 2), mask(1, 2));
        assert_ne!(mask(1, 2), mask(2, 2));
        assert_ne!(mask(1, 2), mask(1, 3));
        // Values from an independent Python transcription of the formula
        // pin the arithmetic the device kernels repeat.
        assert_eq!(counter_u64(1, 2, 3), 0x1900_8981_fc87_ad91);
        assert_eq!(counter_u64(0, 0, 0), 0x33fe_8bd4_f9c5_7863);
        assert_ne!(counter_u64(0, 0, 1), counter_u64(0, 1, 0));
    }
}
