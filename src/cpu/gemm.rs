//! Cache-blocked f32 matrix product `C += A·B` for the convolutions and the
//! linear layer.
//!
//! Both operands are packed first, as in BLIS: A in strips of [`MR`] rows and
//! B in strips of [`NR`] columns, each strip stored k-major (`a[kk·MR + r]`,
//! `b[kk·NR + l]`) and zero-padded to a whole strip, so that the micro-kernel
//! reads both sequentially and never handles an edge. The micro-kernel keeps
//! an MR×NR block of C in registers and adds one rank-1 update per k (MR
//! broadcasts of A times one NR-wide row of B), written over fixed-size arrays
//! so that LLVM vectorizes it; on x86-64 the same code is also compiled with
//! AVX and picked at run time, and whole MR×NR blocks run on an AVX
//! intrinsics kernel that keeps C in registers from load to store (the
//! generic kernel's copies of C in and out became `memcpy` calls, a third of
//! the time at depth 16). C is any [`RowsMut`]: one strided slice, or rows in
//! separate slices (a conv's output planes, written in place). Blocks of
//! [`KC`] k's keep a B strip in L1 and the A block in L2 while every A strip
//! passes over it.
//!
//! Every element of C is accumulated in increasing k, starting from its value
//! on entry, with separate multiplies and adds (Rust never fuses them into
//! FMAs), so the result is bit for bit that of the plain loop
//! `for kk in 0..k { c += a[kk]·b[kk] }`.

/// Rows of A (and C) per micro-kernel block. 4×16 keeps 8 AVX accumulators
/// plus the B row, a broadcast and a product in 16 registers; 4×24 spilled
/// and 6×16 ran about 10% slower on the dev machine.
pub(super) const MR: usize = 4;
/// Columns of B (and C) per micro-kernel block.
pub(super) const NR: usize = 16;
/// k's per cache block.
pub(super) const KC: usize = 256;

/// Length of `rows` rows (or columns) of a `k`-deep operand packed in
/// strips of `strip`: whole strips, zero-padded.
pub(super) fn packed_len(rows: usize, strip: usize, k: usize) -> usize {
    rows.div_ceil(strip) * strip * k
}

/// Packs the row-major `m × k` matrix `src` (row stride `ld`) as A into
/// `out` (length [`packed_len`]`(m, MR, k)`).
pub(super) fn pack_a(m: usize, k: usize, src: &[f32], ld: usize, out: &mut [f32]) {
    if k == 0 {
        return;
    }
    for (s, strip) in out.chunks_exact_mut(k * MR).enumerate() {
        for r in 0..MR {
            let i = s * MR + r;
            if i < m {
                let row = &src[i * ld..][..k];
                for (d, &v) in strip[r..].iter_mut().step_by(MR).zip(row) {
                    *d = v;
                }
            } else {
                strip[r..].iter_mut().step_by(MR).for_each(|d| *d = 0.0);
            }
        }
    }
}

/// Packs B (`k × n`) given by its transpose, the row-major `n × k` matrix
/// `src` (row stride `ld`: column j of B is row j of `src`), into `out`
/// (length [`packed_len`]`(n, NR, k)`).
pub(super) fn pack_b_transposed(n: usize, k: usize, src: &[f32], ld: usize, out: &mut [f32]) {
    if k == 0 {
        return;
    }
    for (s, strip) in out.chunks_exact_mut(k * NR).enumerate() {
        for l in 0..NR {
            let j = s * NR + l;
            if j < n {
                let col = &src[j * ld..][..k];
                for (d, &v) in strip[l..].iter_mut().step_by(NR).zip(col) {
                    *d = v;
                }
            } else {
                strip[l..].iter_mut().step_by(NR).for_each(|d| *d = 0.0);
            }
        }
    }
}

/// The rows of a GEMM's C: row `i` from the product's first column on.
pub(super) trait RowsMut {
    /// Row `i` of C (at least `n` long for a product of width `n`).
    fn row(&mut self, i: usize) -> &mut [f32];
    /// Rows `i0 .. i0 + MR` at once (disjoint borrows), each from column
    /// `j0` on.
    fn block(&mut self, i0: usize, j0: usize) -> [&mut [f32]; MR];
}

/// A row-major C in one slice, row stride `ld`.
pub(super) struct Strided<'c> {
    pub c: &'c mut [f32],
    pub ld: usize,
}

impl RowsMut for Strided<'_> {
    fn row(&mut self, i: usize) -> &mut [f32] {
        &mut self.c[i * self.ld..]
    }

    fn block(&mut self, i0: usize, j0: usize) -> [&mut [f32]; MR] {
        let mut rest = &mut self.c[i0 * self.ld..];
        let mut rows: [&mut [f32]; MR] = Default::default();
        for (r, row) in rows.iter_mut().enumerate() {
            let taken = std::mem::take(&mut rest);
            let (this, tail) = if r + 1 < MR {
                taken.split_at_mut(self.ld.min(taken.len()))
            } else {
                (taken, Default::default())
            };
            *row = &mut this[j0..];
            rest = tail;
        }
        rows
    }
}

/// C row `i` is `rows[i][col..]`: rows in separate slices (the output
/// planes of one image, say).
pub(super) struct Scattered<'r, 'c> {
    pub rows: &'r mut [&'c mut [f32]],
    pub col: usize,
}

impl RowsMut for Scattered<'_, '_> {
    fn row(&mut self, i: usize) -> &mut [f32] {
        &mut self.rows[i][self.col..]
    }

    fn block(&mut self, i0: usize, j0: usize) -> [&mut [f32]; MR] {
        let col = self.col + j0;
        let (block, _) = self.rows[i0..].split_first_chunk_mut::<MR>().unzip();
        let mut rows: [&mut [f32]; MR] = Default::default();
        if let Some(block) = block {
            for (row, src) in rows.iter_mut().zip(block.iter_mut()) {
                *row = &mut src[col..];
            }
        }
        rows
    }
}

/// `C[m × n] += A[m × k] · B[k × n]` with `a` packed by [`pack_a`], `b`
/// packed in strips of [`NR`] columns (see the module docs) and `c`
/// row-major with row stride `ldc`.
pub(super) fn gemm(m: usize, n: usize, k: usize, a: &[f32], b: &[f32], c: &mut [f32], ldc: usize) {
    gemm_rows(m, n, k, a, b, &mut Strided { c, ld: ldc });
}

/// [`gemm`] into the rows of any C.
pub(super) fn gemm_rows<C: RowsMut>(m: usize, n: usize, k: usize, a: &[f32], b: &[f32], c: &mut C) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx") {
        // SAFETY: `gemm_avx` only requires AVX, which this CPU has (checked
        // just above).
        unsafe { gemm_avx(m, n, k, a, b, c) };
        return;
    }
    gemm_blocked::<C, false>(m, n, k, a, b, c);
}

/// [`gemm_blocked`] compiled for 256-bit vectors, with the AVX micro-kernel.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
fn gemm_avx<C: RowsMut>(m: usize, n: usize, k: usize, a: &[f32], b: &[f32], c: &mut C) {
    gemm_blocked::<C, true>(m, n, k, a, b, c);
}

/// The blocked loops of [`gemm`]; always inlined so that each caller
/// compiles it (and the micro-kernel) for its own target features. `AVX`
/// (set only by [`gemm_avx`], which requires AVX) runs whole MR×NR blocks
/// on [`micro_kernel_avx`].
#[inline(always)]
fn gemm_blocked<C: RowsMut, const AVX: bool>(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    b: &[f32],
    c: &mut C,
) {
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    let a = &a[..packed_len(m, MR, k)];
    let b = &b[..packed_len(n, NR, k)];
    for k0 in (0..k).step_by(KC) {
        let kc = KC.min(k - k0);
        for (j, b_strip) in b.chunks_exact(k * NR).enumerate() {
            let b_block = &b_strip[k0 * NR..][..kc * NR];
            let (j0, cols) = (j * NR, NR.min(n - j * NR));
            for (i, a_strip) in a.chunks_exact(k * MR).enumerate() {
                let a_block = &a_strip[k0 * MR..][..kc * MR];
                let (i0, rows) = (i * MR, MR.min(m - i * MR));
                #[cfg(target_arch = "x86_64")]
                if AVX && rows == MR && cols == NR {
                    let block = c.block(i0, j0).map(|r| &mut r[..NR]);
                    // SAFETY: AVX is only set by `gemm_avx`, whose caller
                    // checked that the CPU has AVX.
                    unsafe { micro_kernel_avx(a_block, b_block, block) };
                    continue;
                }
                let mut acc = [[0.0f32; NR]; MR];
                for (r, acc_r) in acc.iter_mut().enumerate().take(rows) {
                    acc_r[..cols].copy_from_slice(&c.row(i0 + r)[j0..][..cols]);
                }
                micro_kernel(a_block, b_block, &mut acc);
                for (r, acc_r) in acc.iter().enumerate().take(rows) {
                    c.row(i0 + r)[j0..][..cols].copy_from_slice(&acc_r[..cols]);
                }
            }
        }
    }
}

/// [`micro_kernel`] on a whole MR×NR block of C, kept in eight AVX
/// registers from load to store (the generic kernel's C copies compile to
/// `memcpy` calls, costly when the depth is small). Multiplies and adds stay
/// separate, in the same order, so the results are the generic kernel's bit
/// for bit.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
fn micro_kernel_avx(a: &[f32], b: &[f32], c: [&mut [f32]; MR]) {
    use std::arch::x86_64::*;
    const _: () = assert!(MR == 4 && NR == 16);
    let kc = b.len() / NR;
    assert!(a.len() >= kc * MR && c.iter().all(|r| r.len() >= NR));
    let [c0, c1, c2, c3] = c;
    // SAFETY: every load and store stays inside its slice: C rows hold NR
    // floats (asserted), B holds kc·NR and A kc·MR (asserted), and the loop
    // reads k-step `kk` at `b[kk·NR..][..NR]` and `a[kk·MR..][..MR]`.
    unsafe {
        let mut acc = [
            _mm256_loadu_ps(c0.as_ptr()),
            _mm256_loadu_ps(c0.as_ptr().add(8)),
            _mm256_loadu_ps(c1.as_ptr()),
            _mm256_loadu_ps(c1.as_ptr().add(8)),
            _mm256_loadu_ps(c2.as_ptr()),
            _mm256_loadu_ps(c2.as_ptr().add(8)),
            _mm256_loadu_ps(c3.as_ptr()),
            _mm256_loadu_ps(c3.as_ptr().add(8)),
        ];
        let (ap, bp) = (a.as_ptr(), b.as_ptr());
        for kk in 0..kc {
            let b0 = _mm256_loadu_ps(bp.add(kk * NR));
            let b1 = _mm256_loadu_ps(bp.add(kk * NR + 8));
            for r in 0..MR {
                let av = _mm256_broadcast_ss(&*ap.add(kk * MR + r));
                acc[2 * r] = _mm256_add_ps(acc[2 * r], _mm256_mul_ps(av, b0));
                acc[2 * r + 1] = _mm256_add_ps(acc[2 * r + 1], _mm256_mul_ps(av, b1));
            }
        }
        for (r, row) in [c0, c1, c2, c3].into_iter().enumerate() {
            _mm256_storeu_ps(row.as_mut_ptr(), acc[2 * r]);
            _mm256_storeu_ps(row.as_mut_ptr().add(8), acc[2 * r + 1]);
        }
    }
}

/// `acc += A·B` over one block: `a` holds `MR` values per k, `b` `NR`.
#[inline(always)]
fn micro_kernel(a: &[f32], b: &[f32], acc: &mut [[f32; NR]; MR]) {
    let mut t = *acc;
    let (a, _) = a.as_chunks::<MR>();
    let (b, _) = b.as_chunks::<NR>();
    for (ak, bk) in a.iter().zip(b) {
        for (t_r, &av) in t.iter_mut().zip(ak) {
            for (t_rl, &bv) in t_r.iter_mut().zip(bk) {
                *t_rl += av * bv;
            }
        }
    }
    *acc = t;
}

#[cfg(test)]
mod tests {
    use super::super::test_data as data;
    use super::*;

    /// Every size around the strip and block edges, with C starting nonzero
    /// and a row stride wider than n: the result must equal the plain loop
    /// exactly, since both sum the same products in the same order.
    #[test]
    fn gemm_matches_the_plain_loop_exactly() {
        let sizes_m = [1, MR - 1, MR, MR + 1, 3 * MR + 2];
        let sizes_n = [1, NR - 1, NR, NR + 1, 2 * NR + 5];
        let sizes_k = [0, 1, 7, KC, KC + 3, 2 * KC + 1];
        let mut seed = 0;
        for &m in &sizes_m {
            for &n in &sizes_n {
                for &k in &sizes_k {
                    seed += 1;
                    let ldc = n + 3;
                    let a_rm = data(seed, m * k);
                    // B given by its transpose [n, k], as the linear layer packs it.
                    let b_t = data(seed + 1000, n * k);
                    let c0 = data(seed + 2000, m * ldc);
                    let mut a = vec![f32::NAN; packed_len(m, MR, k)];
                    let mut b = vec![f32::NAN; packed_len(n, NR, k)];
                    pack_a(m, k, &a_rm, k, &mut a);
                    pack_b_transposed(n, k, &b_t, k, &mut b);
                    let mut c = c0.clone();
                    gemm(m, n, k, &a, &b, &mut c, ldc);
                    for i in 0..m {
                        for j in 0..ldc {
                            let mut want = c0[i * ldc + j];
                            if j < n {
                                for kk in 0..k {
                                    want += a_rm[i * k + kk] * b_t[j * k + kk];
                                }
                            }
                            assert_eq!(
                                c[i * ldc + j].to_bits(),
                                want.to_bits(),
                                "seed {seed}: m {m}, n {n}, k {k}, C[{i}, {j}]"
                            );
                        }
                    }
                }
            }
        }
    }
}
