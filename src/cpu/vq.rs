//! Vector quantization (VQ-VAE-2's `Quantize`) and code-frequency histograms.
//!
//! Layouts: features `x` `[n, d, hw]` (NCHW with H·W folded; the vector of a
//! position is one pixel across the `d` channels), codebook `embed` `[d, K]`
//! with column `k` the code `e_k` (vq-vae-2-pytorch's transposed layout),
//! codes `ids` `[n, hw]`.
//!
//! Every dot product and squared norm is a chain of `mul_add` over
//! `c = 0..d` starting from 0, the order the kernels in `kernels/vq.cu` use
//! with `fmaf`, so distances, codes and errors are bitwise equal on every
//! device.

use super::{check_len, chunk, numel};
use crate::error::{Error, Result};
use rayon::prelude::*;

/// Positions per rayon task of the lookup.
const POSITIONS_PER_TASK: usize = 256;

/// Squared norms of the codes: `norms[k] = Σ_c embed[c, k]²`, `embed`
/// `[d, n_embed]`, `norms` `[n_embed]`.
pub fn vq_code_norms(d: usize, n_embed: usize, embed: &[f32], norms: &mut [f32]) -> Result<()> {
    const OP: &str = "vq_code_norms";
    check_len(OP, "embed", embed.len(), numel(OP, &[d, n_embed])?)?;
    check_len(OP, "norms", norms.len(), n_embed)?;
    for (k, out) in norms.iter_mut().enumerate() {
        *out = (0..d).fold(0.0f32, |acc, c| {
            let v = embed[c * n_embed + k];
            v.mul_add(v, acc)
        });
    }
    Ok(())
}

/// Codes scored together: independent `mul_add` chains, one per code, that
/// the compiler turns into vector FMAs across codes (each chain keeps its own
/// order over `c`, so results are unchanged).
const CODE_BLOCK: usize = 16;

/// Vectors looked up together: a block of [`GROUP`] vectors × [`CODE_BLOCK`]
/// codes keeps 8 independent FMA chains in registers per step of `c` (one
/// vector alone has 2 and waits on their latency), the codebook row loaded
/// once for all of them.
const GROUP: usize = 4;

/// The nearest codes of [`GROUP`] vectors packed in `xp` `[d, GROUP]` (vector
/// `r`'s element `c` at `xp[c·GROUP + r]`) among the columns of `embed`
/// (`[d, K]`): argmin of `(||x||² − 2 x·e_k) + ||e_k||²`, ties to the lowest
/// `k`; a NaN distance never wins, so a NaN vector gets code 0. Each dot
/// product and norm is one `mul_add` chain over `c`, as in the kernels, and
/// grouping changes no chain: a vector's code does not depend on its group.
#[inline(always)]
fn nearest_group_impl(xp: &[f32], embed: &[f32], norms: &[f32]) -> [usize; GROUP] {
    let k_total = norms.len();
    let (xp, _) = xp.as_chunks::<GROUP>();
    let mut xx = [0.0f32; GROUP];
    for xc in xp {
        for (acc, &v) in xx.iter_mut().zip(xc) {
            *acc = v.mul_add(v, *acc);
        }
    }
    let mut best = [f32::INFINITY; GROUP];
    let mut best_k = [0usize; GROUP];
    for k0 in (0..k_total).step_by(CODE_BLOCK) {
        let m = CODE_BLOCK.min(k_total - k0);
        let mut dot = [[0.0f32; CODE_BLOCK]; GROUP];
        for (c, xc) in xp.iter().enumerate() {
            let row = &embed[c * k_total + k0..][..m];
            // A whole block as an array, so that the loops unroll into
            // vector FMAs (2.5× faster than the general slice).
            match <&[f32; CODE_BLOCK]>::try_from(row) {
                Ok(whole) => accumulate(&mut dot, xc, whole),
                Err(_) => accumulate(&mut dot, xc, row),
            }
        }
        for r in 0..GROUP {
            for (j, (&dot, &ee)) in dot[r].iter().zip(&norms[k0..k0 + m]).enumerate() {
                let dist = (xx[r] - 2.0 * dot) + ee;
                if dist < best[r] {
                    best[r] = dist;
                    best_k[r] = k0 + j;
                }
            }
        }
    }
    best_k
}

/// `dot[r][j] = xc[r]·row[j] + dot[r][j]`, one step of every chain.
#[inline(always)]
fn accumulate(dot: &mut [[f32; CODE_BLOCK]; GROUP], xc: &[f32; GROUP], row: &[f32]) {
    for (dot_r, &x) in dot.iter_mut().zip(xc) {
        for (acc, &e) in dot_r.iter_mut().zip(row) {
            *acc = x.mul_add(e, *acc);
        }
    }
}

/// [`nearest_group_impl`] compiled for CPUs with hardware FMA, where
/// `mul_add` is one instruction instead of a libm call.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn nearest_group_fma(xp: &[f32], embed: &[f32], norms: &[f32]) -> [usize; GROUP] {
    nearest_group_impl(xp, embed, norms)
}

/// The nearest codes of [`GROUP`] vectors packed `[d, GROUP]`, with hardware
/// FMA where the CPU has it (same results either way: `mul_add` is a fused
/// multiply-add by definition).
fn nearest_group(xp: &[f32], embed: &[f32], norms: &[f32]) -> [usize; GROUP] {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: both features were just detected on this CPU.
        return unsafe { nearest_group_fma(xp, embed, norms) };
    }
    nearest_group_impl(xp, embed, norms)
}

/// Nearest-code lookup for every position of `x` `[n, d, hw]` against
/// `embed` `[d, n_embed]` with `norms` from [`vq_code_norms`]:
/// `ids[s, pix] = argmin_k ||x[s, :, pix] − e_k||²` (computed as
/// `(||x||² − 2 x·e_k) + ||e_k||²`, ties to the lowest `k`),
/// `quant[s, :, pix] = e_{ids[s, pix]}` `[n, d, hw]` and
/// `err[s, pix] = Σ_c (x − e)²` `[n, hw]` summed directly; `quant` and `err`
/// are written only when given.
#[allow(clippy::too_many_arguments)]
pub fn vq_lookup_forward(
    n: usize,
    d: usize,
    hw: usize,
    n_embed: usize,
    x: &[f32],
    embed: &[f32],
    norms: &[f32],
    ids: &mut [i32],
    quant: Option<&mut [f32]>,
    err: Option<&mut [f32]>,
) -> Result<()> {
    const OP: &str = "vq_lookup_forward";
    let positions = numel(OP, &[n, hw])?;
    let plane = numel(OP, &[d, hw])?;
    check_len(OP, "x", x.len(), numel(OP, &[positions, d])?)?;
    check_len(OP, "embed", embed.len(), numel(OP, &[d, n_embed])?)?;
    check_len(OP, "norms", norms.len(), n_embed)?;
    check_len(OP, "ids", ids.len(), positions)?;
    if let Some(q) = &quant {
        check_len(OP, "quant", q.len(), x.len())?;
    }
    if let Some(e) = &err {
        check_len(OP, "err", e.len(), positions)?;
    }
    if positions == 0 {
        return Ok(());
    }
    if d == 0 || n_embed == 0 {
        return Err(Error::shape(
            OP,
            format!("the codebook [{d}, {n_embed}] is empty: no code to assign"),
        ));
    }
    if i32::try_from(n_embed).is_err() {
        return Err(Error::shape(
            OP,
            format!("{n_embed} codes do not fit 32-bit ids"),
        ));
    }
    // Position p's vector into dst[0], dst[stride], …, dst[(d − 1)·stride].
    let vector = |p: usize, dst: &mut [f32], stride: usize| {
        let (s, pix) = (p / hw, p % hw);
        for (c, v) in dst.iter_mut().step_by(stride).take(d).enumerate() {
            *v = x[s * plane + c * hw + pix];
        }
    };

    ids.par_chunks_mut(POSITIONS_PER_TASK)
        .enumerate()
        .for_each(|(task, ids)| {
            let p0 = task * POSITIONS_PER_TASK;
            let mut xp = vec![0.0f32; d * GROUP];
            for (g, ids) in ids.chunks_mut(GROUP).enumerate() {
                // A short last group repeats its last vector; the extra codes
                // are dropped.
                for r in 0..GROUP {
                    vector(p0 + g * GROUP + r.min(ids.len() - 1), &mut xp[r..], GROUP);
                }
                for (id, k) in ids.iter_mut().zip(nearest_group(&xp, embed, norms)) {
                    // Fits: n_embed ≤ i32::MAX was checked above.
                    *id = k as i32;
                }
            }
        });
    let ids: &[i32] = ids;

    if let Some(quant) = quant {
        quant
            .par_chunks_mut(chunk(hw))
            .enumerate()
            .for_each(|(sc, q)| {
                let (s, c) = (sc / d, sc % d);
                for (q, &k) in q.iter_mut().zip(&ids[s * hw..(s + 1) * hw]) {
                    *q = embed[c * n_embed + k as usize];
                }
            });
    }
    if let Some(err) = err {
        err.par_chunks_mut(POSITIONS_PER_TASK)
            .enumerate()
            .for_each(|(task, err)| {
                let mut xv = vec![0.0f32; d];
                for (i, e2) in err.iter_mut().enumerate() {
                    let p = task * POSITIONS_PER_TASK + i;
                    vector(p, &mut xv, 1);
                    let k = ids[p] as usize;
                    *e2 = xv.iter().enumerate().fold(0.0f32, |acc, (c, &x)| {
                        let t = x - embed[c * n_embed + k];
                        t.mul_add(t, acc)
                    });
                }
            });
    }
    Ok(())
}

/// Checks `row_offsets` (segment `s` owns rows `row_offsets[s]..row_offsets[s + 1]`)
/// against `rows` and returns the number of segments.
pub(crate) fn check_row_offsets(
    op: &'static str,
    rows: usize,
    row_offsets: &[usize],
) -> Result<usize> {
    let (first, last) = match row_offsets {
        [first, .., last] => (*first, *last),
        _ => {
            return Err(Error::shape(
                op,
                format!("row offsets need at least 2 entries, got {row_offsets:?}"),
            ))
        }
    };
    if first != 0 || last != rows || row_offsets.windows(2).any(|w| w[0] > w[1]) {
        return Err(Error::shape(
            op,
            format!(
                "row offsets must rise from 0 to the {rows} rows without decreasing, got {:?}{}",
                &row_offsets[..row_offsets.len().min(8)],
                if row_offsets.len() > 8 { " …" } else { "" }
            ),
        ));
    }
    Ok(row_offsets.len() - 1)
}

/// Code-frequency histograms, ADDED into `hist` `[segments, n_embed]`: `ids`
/// `[rows, row_len]` holds one row of codes per image or patch and segment `s`
/// (a sample) owns rows `row_offsets[s]..row_offsets[s + 1]`, so
/// `hist[s, k] += #{codes == k in its rows}`. Zero `hist` first for plain
/// counts; adding lets a caller accumulate a sample over batches. A code
/// outside `[0, n_embed)` or a count beyond `i32::MAX` is an error (and
/// `hist` is then partly updated).
pub fn code_histogram_accumulate(
    rows: usize,
    row_len: usize,
    n_embed: usize,
    ids: &[i32],
    row_offsets: &[usize],
    hist: &mut [i32],
) -> Result<()> {
    const OP: &str = "code_histogram_accumulate";
    let segments = check_row_offsets(OP, rows, row_offsets)?;
    check_len(OP, "ids", ids.len(), numel(OP, &[rows, row_len])?)?;
    check_len(OP, "hist", hist.len(), numel(OP, &[segments, n_embed])?)?;
    if n_embed == 0 && !ids.is_empty() {
        return Err(Error::shape(OP, "no codes to count into (n_embed = 0)"));
    }
    hist.par_chunks_mut(chunk(n_embed))
        .zip(row_offsets.par_windows(2))
        .try_for_each(|(h, range)| {
            for &k in &ids[range[0] * row_len..range[1] * row_len] {
                let slot = usize::try_from(k)
                    .ok()
                    .and_then(|k| h.get_mut(k))
                    .ok_or_else(|| {
                        Error::invalid(format!("{OP}: code {k} is outside [0, {n_embed})"))
                    })?;
                *slot = slot
                    .checked_add(1)
                    .ok_or_else(|| Error::invalid(format!("{OP}: a count exceeds i32::MAX")))?;
            }
            Ok(())
        })
}

/// One exponential-moving-average codebook update (vq-vae-2-pytorch's
/// `Quantize` in training mode), from the vectors `x` `[n, d, hw]` that were
/// quantized and their codes `ids` `[n, hw]` (chosen with the codebook
/// *before* this update). With `O` the one-hot assignments, `decay` d and
/// `K = n_embed`:
///
/// - `cluster_size ← d·cluster_size + (1−d)·Σ O` (codes counted);
/// - `embed_avg ← d·embed_avg + (1−d)·Xᵀ O` (per code, the sum of its vectors);
/// - `N = Σ cluster_size`, `cs_k = (cluster_size_k + eps) / (N + K·eps) · N`
///   (Laplace smoothing, so an unused code never divides by zero);
/// - `embed[:, k] = embed_avg[:, k] / cs_k`.
///
/// `cluster_size` `[K]`, `embed_avg` and `embed` `[d, K]` are updated in
/// place. Counts and vector sums are f64, accumulated sequentially in
/// position order, so the update is deterministic; the moving averages are
/// then stepped in f32 as PyTorch does. A code outside `[0, K)` is an error
/// and leaves everything unchanged.
#[allow(clippy::too_many_arguments)]
pub fn vq_ema_update(
    n: usize,
    d: usize,
    hw: usize,
    n_embed: usize,
    x: &[f32],
    ids: &[i32],
    decay: f32,
    eps: f32,
    cluster_size: &mut [f32],
    embed_avg: &mut [f32],
    embed: &mut [f32],
) -> Result<()> {
    const OP: &str = "vq_ema_update";
    check_len(OP, "x", x.len(), numel(OP, &[n, d, hw])?)?;
    check_len(OP, "ids", ids.len(), numel(OP, &[n, hw])?)?;
    check_len(OP, "cluster_size", cluster_size.len(), n_embed)?;
    let codebook = numel(OP, &[d, n_embed])?;
    check_len(OP, "embed_avg", embed_avg.len(), codebook)?;
    check_len(OP, "embed", embed.len(), codebook)?;
    if !((0.0..=1.0).contains(&decay) && eps.is_finite() && eps >= 0.0) {
        return Err(Error::invalid(format!(
            "{OP}: decay must be in [0, 1] and eps finite and ≥ 0, got decay {decay}, eps {eps}"
        )));
    }
    let mut counts = vec![0f64; n_embed];
    let mut sums = vec![0f64; codebook];
    for ni in 0..n {
        for p in 0..hw {
            let k = ids[ni * hw + p];
            let k = usize::try_from(k)
                .ok()
                .filter(|&k| k < n_embed)
                .ok_or_else(|| {
                    Error::invalid(format!("{OP}: code {k} is outside [0, {n_embed})"))
                })?;
            counts[k] += 1.0;
            for c in 0..d {
                sums[c * n_embed + k] += x[(ni * d + c) * hw + p] as f64;
            }
        }
    }
    let keep = 1.0 - decay;
    for (cs, &count) in cluster_size.iter_mut().zip(&counts) {
        *cs = *cs * decay + keep * count as f32;
    }
    for (avg, &sum) in embed_avg.iter_mut().zip(&sums) {
        *avg = *avg * decay + keep * sum as f32;
    }
    let total: f64 = cluster_size.iter().map(|&v| v as f64).sum();
    if !(total > 0.0 && total.is_finite()) {
        return Err(Error::invalid(format!(
            "{OP}: the cluster sizes sum to {total}; no code has been used to normalize by"
        )));
    }
    let denom = total + n_embed as f64 * eps as f64;
    for (k, &size) in cluster_size.iter().enumerate() {
        let cs = (size as f64 + eps as f64) / denom * total;
        for c in 0..d {
            let i = c * n_embed + k;
            embed[i] = (embed_avg[i] as f64 / cs) as f32;
        }
    }
    Ok(())
}
