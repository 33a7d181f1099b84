//! The VQ ops (`kernels/vq.cu`) on the emulated device and on CUDA against
//! the CPU reference (`cellmorph::cpu::vq`), over random shapes.
//!
//! Tolerance: none. Both sides compute every dot product, norm and squared
//! error as the same chain of fused multiply-adds over the channels, so
//! codes, quantized vectors and errors must be bitwise equal, and histograms
//! are exact integer counts. Ties are built in on purpose (duplicated code
//! columns, inputs equal to a code) and must go to the lowest index. The
//! reference itself is checked against a brute-force f64 search.

use cellmorph::backend::cuda_device_count;
use cellmorph::ops::{
    code_histogram, code_histogram_accumulate, vq_lookup, vq_lookup_hist_into, Codebook, VqOut,
};
use cellmorph::{Backend, Device, Tensor};
use proptest::prelude::*;

/// splitmix64: a seeded generator for test data.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn uniform(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// A lookup problem: x `[n, d, h, w]` and a codebook `[d, k]` with
/// duplicated columns and some inputs set exactly to a code.
struct Problem {
    shape: [usize; 4],
    k: usize,
    x: Vec<f32>,
    embed: Vec<f32>,
}

impl Problem {
    fn new(seed: u64, shape: [usize; 4], k: usize) -> Self {
        let mut rng = Rng(seed);
        let [n, d, h, w] = shape;
        let hw = h * w;
        let mut embed: Vec<f32> = (0..d * k).map(|_| rng.uniform()).collect();
        // Duplicate about a quarter of the codes into later columns: exact ties.
        for _ in 0..k / 4 {
            let (a, b) = (rng.below(k), rng.below(k));
            for c in 0..d {
                embed[c * k + a.max(b)] = embed[c * k + a.min(b)];
            }
        }
        let mut x: Vec<f32> = (0..n * d * hw).map(|_| rng.uniform()).collect();
        // Every third position sits exactly on a (possibly duplicated) code.
        for p in (0..n * hw).step_by(3) {
            let code = rng.below(k);
            let (s, pix) = (p / hw, p % hw);
            for c in 0..d {
                x[(s * d + c) * hw + pix] = embed[c * k + code];
            }
        }
        Problem { shape, k, x, embed }
    }

    fn codebook(&self, be: &Backend) -> Codebook {
        let embed = Tensor::from_slice(be, &[self.shape[1], self.k], &self.embed).unwrap();
        Codebook::new(be, embed).unwrap()
    }

    fn vector(&self, p: usize) -> Vec<f32> {
        let [_, d, h, w] = self.shape;
        let hw = h * w;
        (0..d)
            .map(|c| self.x[((p / hw) * d + c) * hw + p % hw])
            .collect()
    }

    fn code(&self, k: usize) -> Vec<f32> {
        (0..self.shape[1])
            .map(|c| self.embed[c * self.k + k])
            .collect()
    }
}

/// Lookup outputs copied to the host.
#[derive(Debug, PartialEq)]
struct Looked {
    ids: Vec<i32>,
    quant: Vec<u32>,
    err: Vec<u32>,
    norms: Vec<u32>,
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.to_vec().unwrap().iter().map(|v| v.to_bits()).collect()
}

fn lookup(be: &Backend, pr: &Problem) -> Looked {
    let cb = pr.codebook(be);
    let x = Tensor::from_slice(be, &pr.shape, &pr.x).unwrap();
    let out = vq_lookup(be, &x, &cb).unwrap();
    let [n, _, h, w] = pr.shape;
    assert_eq!(out.ids.shape(), &[n, h, w]);
    assert_eq!(out.quant.shape(), &pr.shape);
    Looked {
        ids: out.ids.to_vec().unwrap(),
        quant: bits(&out.quant),
        err: bits(&out.err),
        norms: bits(cb.norms()),
    }
}

/// The CPU reference against a brute-force f64 search: the chosen code is
/// within rounding of the true nearest distance, no earlier code is an exact
/// duplicate of it (ties go to the lowest index), and the error is its
/// distance within rounding.
fn check_reference(pr: &Problem, r: &Looked) {
    let d = pr.shape[1];
    let eps = f64::from(f32::EPSILON);
    for (p, &id) in r.ids.iter().enumerate() {
        let xv = pr.vector(p);
        // (exact distance, rounding bound of the f32 expanded formula): a
        // chain of d fmas errs by at most (d + 2)·ε·Σ|terms| (Higham), the
        // terms of ||x||² − 2x·e + ||e||² summing to Σ(x² + 2|x·e| + e²).
        let dist = |k: usize| -> (f64, f64) {
            let (mut exact, mut mass) = (0.0, 0.0);
            for (&a, b) in xv.iter().zip(pr.code(k)) {
                let (a, b) = (f64::from(a), f64::from(b));
                exact += (a - b).powi(2);
                mass += a * a + 2.0 * (a * b).abs() + b * b;
            }
            (exact, (d + 2) as f64 * eps * mass)
        };
        let id = id as usize;
        let (chosen, chosen_slack) = dist(id);
        let (best, best_slack) =
            (0..pr.k)
                .map(dist)
                .fold((f64::INFINITY, 0.0), |m, v| if v.0 < m.0 { v } else { m });
        assert!(
            chosen <= best + chosen_slack + best_slack,
            "position {p}: code {id} at {chosen} but the nearest is at {best}"
        );
        let code = pr.code(id);
        assert!(
            (0..id).all(|k| pr.code(k) != code),
            "position {p}: code {id} has an identical earlier code"
        );
        // Σ(x − e)² directly: each term rounds twice, the chain d times.
        let err = f64::from(f32::from_bits(r.err[p]));
        assert!(
            (err - chosen).abs() <= (d + 3) as f64 * eps * chosen + f64::from(f32::MIN_POSITIVE),
            "position {p}: err {err} vs {chosen}"
        );
    }
}

/// Random segment boundaries over `rows` rows (some segments empty).
fn offsets(rng: &mut Rng, rows: usize) -> Vec<usize> {
    let segments = 1 + rng.below(rows + 2);
    let mut o: Vec<usize> = (0..segments - 1).map(|_| rng.below(rows + 1)).collect();
    o.push(0);
    o.push(rows);
    o.sort_unstable();
    o
}

/// Histograms on `be` equal the CPU's and a naive count: plain, by
/// segments, accumulated on top of existing counts, and fused into the
/// lookup.
fn check_histograms(be: &Backend, cpu: &Backend, seed: u64, rows: usize, row_len: usize, k: usize) {
    let mut rng = Rng(seed);
    let ids: Vec<i32> = (0..rows * row_len).map(|_| rng.below(k) as i32).collect();
    let o = offsets(&mut rng, rows);
    let mut naive = vec![0i32; (o.len() - 1) * k];
    for (s, w) in o.windows(2).enumerate() {
        for &id in &ids[w[0] * row_len..w[1] * row_len] {
            naive[s * k + id as usize] += 1;
        }
    }
    let mut naive_rows = vec![0i32; rows * k];
    for (r, row) in ids.chunks_exact(row_len).enumerate() {
        for &id in row {
            naive_rows[r * k + id as usize] += 1;
        }
    }
    let start: Vec<i32> = (0..naive.len()).map(|_| rng.below(100) as i32).collect();
    for b in [be, cpu] {
        let t = Tensor::from_slice(b, &[rows, row_len], &ids).unwrap();
        let per_row = code_histogram(b, &t, k, None).unwrap().to_vec().unwrap();
        assert_eq!(per_row, naive_rows, "{}: per row", b.device());
        let seg = code_histogram(b, &t, k, Some(&o))
            .unwrap()
            .to_vec()
            .unwrap();
        assert_eq!(seg, naive, "{}: segments {o:?}", b.device());
        let mut acc = Tensor::from_slice(b, &[o.len() - 1, k], &start).unwrap();
        code_histogram_accumulate(b, &t, Some(&o), &mut acc).unwrap();
        let expect: Vec<i32> = start.iter().zip(&naive).map(|(a, b)| a + b).collect();
        assert_eq!(acc.to_vec().unwrap(), expect, "{}: accumulate", b.device());
    }
}

/// The fused lookup + histogram on `be` against the plain lookup and the
/// separate histogram on the CPU.
fn check_fused(be: &Backend, cpu: &Backend, pr: &Problem, seed: u64) {
    let [n, _, h, w] = pr.shape;
    let reference = lookup(cpu, pr);
    let o = offsets(&mut Rng(seed ^ 0x5eed), n);
    let ids_cpu = Tensor::from_slice(cpu, &[n, h, w], &reference.ids).unwrap();
    let expect = code_histogram(cpu, &ids_cpu, pr.k, Some(&o))
        .unwrap()
        .to_vec()
        .unwrap();
    for b in [be, cpu] {
        let cb = pr.codebook(b);
        let x = Tensor::from_slice(b, &pr.shape, &pr.x).unwrap();
        let mut ids = Tensor::zeros(b, &[n, h, w]).unwrap();
        let mut hist = Tensor::zeros(b, &[o.len() - 1, pr.k]).unwrap();
        let out = VqOut {
            ids: &mut ids,
            quant: None,
            err: None,
        };
        vq_lookup_hist_into(b, &x, &cb, out, Some(&o), &mut hist).unwrap();
        assert_eq!(
            ids.to_vec().unwrap(),
            reference.ids,
            "{}: fused ids",
            b.device()
        );
        assert_eq!(
            hist.to_vec().unwrap(),
            expect,
            "{}: fused hist, segments {o:?}",
            b.device()
        );
    }
}

fn emulated() -> Backend {
    Backend::new(Device::Emulated).unwrap()
}

/// CUDA device 0. CUDA-only tests are `#[ignore]`d so that a machine without a
/// GPU reports them as ignored, never as passed; forced to run there, they fail.
fn cuda() -> Backend {
    assert!(
        cuda_device_count() > 0,
        "skipped: no CUDA device (this test needs a GPU)"
    );
    Backend::new(Device::Cuda(0)).unwrap()
}

/// CUDA device 0 when present, for tests that cover several devices.
fn cuda_if_present() -> Option<Backend> {
    if cuda_device_count() == 0 {
        println!("skipped: no CUDA device (CUDA part of this test)");
        return None;
    }
    Some(cuda())
}

/// Embedding dims: tiny, the paper's 64, around the 128-channel tile, 256.
fn dims() -> impl Strategy<Value = usize> {
    prop_oneof![1usize..=8, Just(64usize), 120usize..=136, Just(256usize)]
}

/// Codebook sizes: below, at and across the 32-code tile, up to 512.
fn codes() -> impl Strategy<Value = usize> {
    prop_oneof![1usize..=40, Just(64usize), 60usize..=70, Just(512usize)]
}

fn lookup_matches(be: &Backend, seed: u64, shape: [usize; 4], k: usize) {
    println!("seed {seed}, x {shape:?}, {k} codes on {}", be.device());
    let pr = Problem::new(seed, shape, k);
    let reference = lookup(&Backend::cpu(), &pr);
    check_reference(&pr, &reference);
    assert_eq!(lookup(be, &pr), reference);
}

proptest! {
    #![proptest_config(crate::common::proptest_config(24))]

    #[test]
    fn lookup_emulated_matches_cpu(seed in any::<u64>(), n in 1usize..=3, d in dims(), k in codes(), h in 1usize..=12, w in 1usize..=12) {
        lookup_matches(&emulated(), seed, [n, d, h, w], k);
    }

    #[test]
    fn histogram_emulated_matches_cpu(seed in any::<u64>(), rows in 1usize..=6, row_len in 1usize..=5000, k in 1usize..=600) {
        println!("seed {seed}, ids [{rows}, {row_len}], {k} codes");
        check_histograms(&emulated(), &Backend::cpu(), seed, rows, row_len, k);
    }

    #[test]
    fn fused_emulated_matches_cpu(seed in any::<u64>(), n in 1usize..=6, d in 1usize..=20, k in codes(), h in 1usize..=14, w in 1usize..=14) {
        println!("seed {seed}, x [{n}, {d}, {h}, {w}], {k} codes");
        check_fused(&emulated(), &Backend::cpu(), &Problem::new(seed, [n, d, h, w], k), seed);
    }
}

/// The largest sizes the brief names (d = 256, K = 512) and a dim past two
/// channel tiles, on a few hundred positions.
#[test]
fn lookup_large_codebooks_emulated() {
    let be = emulated();
    lookup_matches(&be, 7, [2, 256, 9, 11], 512);
    lookup_matches(&be, 8, [1, 300, 13, 7], 100);
}

/// A codebook too large for histogram bins beside the code tile in shared
/// memory (2·K ints) takes the lookup-then-histogram path: same results.
#[test]
fn fused_huge_codebook_emulated() {
    let pr = Problem::new(11, [3, 130, 5, 7], 4200);
    check_fused(&emulated(), &Backend::cpu(), &pr, 11);
}

/// Codes outside [0, K) are reported on every device, not counted.
#[test]
fn histogram_rejects_bad_codes() {
    let mut devices = vec![Backend::cpu(), emulated()];
    devices.extend(cuda_if_present());
    for be in &devices {
        for bad in [-1, 5] {
            let ids = Tensor::from_vec(be, &[2, 3], vec![0, 1, 2, bad, 4, 0]).unwrap();
            let err = code_histogram(be, &ids, 5, None).unwrap_err().to_string();
            assert!(err.contains("outside [0, 5)"), "{}: {err}", be.device());
        }
        let ids = Tensor::from_vec(be, &[2, 3], vec![0; 6]).unwrap();
        assert!(
            code_histogram(be, &ids, 5, Some(&[0, 3])).is_err(),
            "offsets past the rows"
        );
        assert!(
            code_histogram(be, &ids, 5, Some(&[0, 2, 1, 2])).is_err(),
            "decreasing offsets"
        );
    }
}

/// Shape errors name the op and the shapes.
#[test]
fn lookup_shape_errors() {
    let be = Backend::cpu();
    let cb = Codebook::new(&be, Tensor::zeros(&be, &[4, 8]).unwrap()).unwrap();
    let x = Tensor::zeros(&be, &[1, 3, 2, 2]).unwrap();
    let err = vq_lookup(&be, &x, &cb).unwrap_err().to_string();
    assert!(
        err.contains("vq_lookup") && err.contains("[1, 3, 2, 2]"),
        "{err}"
    );
    assert!(Codebook::new(&be, Tensor::zeros(&be, &[4, 0]).unwrap()).is_err());
    assert!(Codebook::new(&be, Tensor::zeros(&be, &[4]).unwrap()).is_err());
}

#[test]
#[ignore = "needs a CUDA device: scripts/gpu-check.sh runs it with --include-ignored"]
fn vq_ops_cuda_match_cpu() {
    let be = cuda();
    let cpu = Backend::cpu();
    for (i, (shape, k)) in [
        ([2, 64, 20, 20], 64),
        ([3, 16, 12, 16], 24),
        ([2, 256, 9, 11], 512),
        ([1, 300, 13, 7], 100),
        ([4, 5, 1, 1], 33),
        ([1, 64, 160, 160], 64),
    ]
    .into_iter()
    .enumerate()
    {
        let seed = 1000 + i as u64;
        lookup_matches(&be, seed, shape, k);
        check_fused(&be, &cpu, &Problem::new(seed, shape, k), seed);
    }
    for (seed, rows, row_len, k) in [
        (1, 3, 1600, 64),
        (2, 1024, 400, 64),
        (3, 5, 100_000, 512),
        (4, 7, 1, 3),
    ] {
        check_histograms(&be, &cpu, seed, rows, row_len, k);
    }
}
