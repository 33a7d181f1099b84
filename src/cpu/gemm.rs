//! Cache-blocked f32 matrix product `C += A·B` for the convolutions and the
//! linear layer, with micro-kernels picked at run time.
//!
//! Both operands are packed first, as in BLIS: A in strips of `mr` rows (the
//! chosen kernel's height, [`Kernel::mr`]) and B in strips of [`NR`]
//! columns, each strip stored k-major (`a[kk·mr + r]`, `b[kk·NR + l]`) and
//! zero-padded to a whole strip, so that the micro-kernel reads both
//! sequentially. The micro-kernel keeps an `mr`×NR block of C in registers
//! and adds one rank-1 update per k. C is any [`RowsMut`]: one strided
//! slice, or rows in separate slices (a conv's output planes, written in
//! place). Blocks of [`KC`] k's keep a B strip in L1 and the A block in L2
//! while every A strip passes over it.
//!
//! # Kernels and the determinism contract
//!
//! Every element of C is accumulated in increasing k, starting from its value
//! on entry (stored back as f32 between blocks of [`KC`]), whatever the
//! kernel. The kernels differ in how one step rounds:
//!
//! - [`Path::Exact`], the specification: a separate multiply and add
//!   (Rust never fuses them), so the result is bit for bit that of the plain
//!   loop `for kk in 0..k { c += a[kk]·b[kk] }`. 4×16 on AVX (8 accumulators
//!   plus the B row, a broadcast and a product fill the 16 registers), a
//!   generic loop LLVM vectorizes elsewhere and at the edges.
//! - [`Path::Avx2`] (6×16, 12 ymm accumulators) and [`Path::Avx512`] (16×16,
//!   16 zmm accumulators, A broadcast from memory): one fused multiply-add
//!   per step, `c = fma(a, b, c)`, rounded once. Partial blocks run the same
//!   kernel on a copy of C padded to a whole block, so each element sees the
//!   same operations wherever it falls.
//!
//! So the result depends on the path (an FMA path differs from the exact one
//! by rounding only: both are within `γ_{k+1}·(|c| + Σ|a||b|)` of the exact
//! sum, `γ_j = j·u/(1 − j·u)`, `u = 2⁻²⁴`), and each path is deterministic:
//! same machine and path → same bits, independent of the thread count and of
//! how callers split C into tasks. The path comes from the environment
//! variable `CELLMORPH_CPU_GEMM` (`exact`, `avx2`, `avx512` or `auto`, the
//! default: the fastest this CPU supports), read once per process; a forced
//! path the CPU lacks is an error naming the variable.

use crate::error::{Error, Result};
use std::sync::OnceLock;

/// Columns of B (and C) per micro-kernel block, for every path.
pub(super) const NR: usize = 16;
/// k's per cache block.
pub(super) const KC: usize = 256;
/// Rows of the exact path's blocks.
const MR_EXACT: usize = 4;
/// Rows of the AVX2 + FMA path's blocks: 12 accumulators, two B vectors and
/// a broadcast in the 16 ymm registers.
#[cfg(target_arch = "x86_64")]
const MR_AVX2: usize = 6;
/// Rows of the AVX-512 path's blocks: 16 accumulators and the B row in the
/// 32 zmm registers, A broadcast from memory inside the FMA; 16 divides the
/// models' channel counts.
#[cfg(target_arch = "x86_64")]
const MR_AVX512: usize = 16;

/// The environment variable that picks the GEMM path.
pub(crate) const PATH_ENV: &str = "CELLMORPH_CPU_GEMM";

/// A family of micro-kernels (see the module docs for what each computes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Path {
    /// Separate multiply and add: the plain loop's bits.
    Exact,
    /// AVX2 + FMA, 6×16.
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// AVX-512F, 16×16.
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Path {
    /// Every path this build knows, fastest last.
    pub(crate) const ALL: &'static [Path] = &[
        Path::Exact,
        #[cfg(target_arch = "x86_64")]
        Path::Avx2,
        #[cfg(target_arch = "x86_64")]
        Path::Avx512,
    ];

    /// The name `CELLMORPH_CPU_GEMM` uses.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Path::Exact => "exact",
            #[cfg(target_arch = "x86_64")]
            Path::Avx2 => "avx2",
            #[cfg(target_arch = "x86_64")]
            Path::Avx512 => "avx512",
        }
    }

    /// The CPU features it needs, as words for an error message.
    fn needs(self) -> &'static str {
        match self {
            Path::Exact => "nothing",
            #[cfg(target_arch = "x86_64")]
            Path::Avx2 => "AVX2 and FMA",
            #[cfg(target_arch = "x86_64")]
            Path::Avx512 => "AVX-512F",
        }
    }

    /// Whether this CPU runs it.
    pub(crate) fn supported(self) -> bool {
        match self {
            Path::Exact => true,
            #[cfg(target_arch = "x86_64")]
            Path::Avx2 => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
            }
            #[cfg(target_arch = "x86_64")]
            Path::Avx512 => std::arch::is_x86_feature_detected!("avx512f"),
        }
    }

    /// The path a `CELLMORPH_CPU_GEMM` value asks for (`None`: unset).
    fn from_setting(value: Option<&str>) -> std::result::Result<Path, String> {
        let name = value.map(str::trim).unwrap_or("");
        if name.is_empty() || name == "auto" {
            let fastest = Path::ALL.iter().rev().find(|p| p.supported());
            return Ok(fastest.copied().unwrap_or(Path::Exact));
        }
        let Some(&path) = Path::ALL.iter().find(|p| p.name() == name) else {
            let names: Vec<&str> = Path::ALL.iter().map(|p| p.name()).collect();
            return Err(format!(
                "{PATH_ENV}={name}: unknown GEMM path (expected auto, {})",
                names.join(", ")
            ));
        };
        if !path.supported() {
            return Err(format!(
                "{PATH_ENV}={name}: this CPU lacks {}, which that GEMM path needs",
                path.needs()
            ));
        }
        Ok(path)
    }
}

/// A [`Path`] this CPU supports: the only way to run one, so that the
/// intrinsics kernels are never called without their features.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Kernel(Path);

impl Kernel {
    /// `path`, if this CPU supports it.
    pub(crate) fn new(path: Path) -> Option<Kernel> {
        path.supported().then_some(Kernel(path))
    }

    /// Every kernel this CPU supports (for tests).
    #[cfg(test)]
    pub(crate) fn all() -> Vec<Kernel> {
        Path::ALL.iter().filter_map(|&p| Kernel::new(p)).collect()
    }

    /// The exact kernel, supported everywhere.
    #[cfg(test)]
    pub(crate) fn exact() -> Kernel {
        Kernel(Path::Exact)
    }

    /// Its path.
    pub(crate) fn path(self) -> Path {
        self.0
    }

    /// Rows per A strip (pack A with this kernel).
    pub(crate) fn mr(self) -> usize {
        match self.0 {
            Path::Exact => MR_EXACT,
            #[cfg(target_arch = "x86_64")]
            Path::Avx2 => MR_AVX2,
            #[cfg(target_arch = "x86_64")]
            Path::Avx512 => MR_AVX512,
        }
    }
}

/// The kernel `CELLMORPH_CPU_GEMM` selects, read on first use and kept for
/// the process; an unknown or unsupported value is an
/// [`Error::Invalid`] naming the variable.
pub(crate) fn selected() -> Result<Kernel> {
    static SELECTED: OnceLock<std::result::Result<Path, String>> = OnceLock::new();
    let path = SELECTED.get_or_init(|| {
        let value = std::env::var(PATH_ENV).ok();
        Path::from_setting(value.as_deref())
    });
    match path {
        Ok(path) => Kernel::new(*path)
            .ok_or_else(|| Error::invalid(format!("{PATH_ENV}: {} unsupported", path.name()))),
        Err(msg) => Err(Error::invalid(msg.clone())),
    }
}

/// Length of `rows` rows (or columns) of a `k`-deep operand packed in
/// strips of `strip`: whole strips, zero-padded.
pub(super) fn packed_len(rows: usize, strip: usize, k: usize) -> usize {
    rows.div_ceil(strip) * strip * k
}

/// Length of an `m × k` A packed for `kernel`.
pub(super) fn packed_a_len(kernel: Kernel, m: usize, k: usize) -> usize {
    packed_len(m, kernel.mr(), k)
}

/// Packs the row-major `m × k` matrix `src` (row stride `ld`) as A for
/// `kernel` into `out` (length [`packed_a_len`]`(kernel, m, k)`).
pub(super) fn pack_a(kernel: Kernel, m: usize, k: usize, src: &[f32], ld: usize, out: &mut [f32]) {
    let mr = kernel.mr();
    if k == 0 {
        return;
    }
    let mut rows: Vec<&[f32]> = Vec::with_capacity(mr);
    for (s, strip) in out.chunks_exact_mut(k * mr).enumerate() {
        rows.clear();
        rows.extend((s * mr..m.min(s * mr + mr)).map(|i| &src[i * ld..][..k]));
        interleave(&rows, k, mr, strip);
    }
}

/// `out[j·width + l] = rows[l][j]` for `j < k`, `l < width`, zero for
/// `l ≥ rows.len()`: up to `width` rows of `k` interleaved into `k` rows of
/// `width` (a packed strip), written row by row, each source row read as
/// runs of eight. `out` holds `k·width` floats.
pub(super) fn interleave(rows: &[&[f32]], k: usize, width: usize, out: &mut [f32]) {
    match width {
        4 => interleave_n::<4>(rows, k, out),
        6 => interleave_n::<6>(rows, k, out),
        16 => interleave_n::<16>(rows, k, out),
        _ => {
            for (j, o) in out[..k * width].chunks_exact_mut(width).enumerate() {
                for (l, o) in o.iter_mut().enumerate() {
                    *o = rows.get(l).map_or(0.0, |r| r[j]);
                }
            }
        }
    }
}

/// [`interleave`] for `width` `W`.
fn interleave_n<const W: usize>(rows: &[&[f32]], k: usize, out: &mut [f32]) {
    const ZEROS: [f32; 8] = [0.0; 8];
    assert!(rows.len() <= W && rows.iter().all(|r| r.len() >= k));
    let out = &mut out[..k * W];
    let whole = k / 8 * 8;
    for j0 in (0..whole).step_by(8) {
        let block: [[f32; 8]; W] = std::array::from_fn(|l| match rows.get(l) {
            Some(r) => {
                let mut v = ZEROS;
                v.copy_from_slice(&r[j0..j0 + 8]);
                v
            }
            None => ZEROS,
        });
        for (jj, o) in out[j0 * W..][..8 * W].chunks_exact_mut(W).enumerate() {
            for (o, b) in o.iter_mut().zip(&block) {
                *o = b[jj];
            }
        }
    }
    for (j, o) in out[whole * W..].chunks_exact_mut(W).enumerate() {
        for (l, o) in o.iter_mut().enumerate() {
            *o = rows.get(l).map_or(0.0, |r| r[whole + j]);
        }
    }
}

/// Scratch buffers of `f32`, kept per thread between calls so that the
/// per-call buffers of the ops (packed operands, gathered windows, partial
/// results) do not cost fresh zeroed pages every time.
pub(super) mod scratch {
    use std::cell::RefCell;

    /// Most buffers a thread keeps.
    const KEEP: usize = 8;

    thread_local! {
        static POOL: RefCell<Vec<Vec<f32>>> = const { RefCell::new(Vec::new()) };
    }

    /// A buffer of `len` floats from this thread's pool (or new). Its
    /// contents are left over from earlier use: the caller writes every
    /// element it reads.
    pub(in crate::cpu) fn take(len: usize) -> Vec<f32> {
        let mut v = POOL
            .with(|p| {
                let mut p = p.borrow_mut();
                // The smallest kept buffer that is large enough, else the largest.
                let i = (0..p.len())
                    .filter(|&i| p[i].capacity() >= len)
                    .min_by_key(|&i| p[i].capacity())
                    .or_else(|| (0..p.len()).max_by_key(|&i| p[i].capacity()));
                i.map(|i| p.swap_remove(i))
            })
            .unwrap_or_default();
        v.resize(len, 0.0);
        v
    }

    /// Returns `v` to this thread's pool (dropping the smallest when full).
    pub(in crate::cpu) fn give(v: Vec<f32>) {
        POOL.with(|p| {
            let mut p = p.borrow_mut();
            p.push(v);
            if p.len() > KEEP {
                if let Some(i) = (0..p.len()).min_by_key(|&i| p[i].capacity()) {
                    p.swap_remove(i);
                }
            }
        });
    }
}

/// Packs B (`k × n`) given by its transpose, the row-major `n × k` matrix
/// `src` (row stride `ld`: column j of B is row j of `src`), into `out`
/// (length [`packed_len`]`(n, NR, k)`).
pub(super) fn pack_b_transposed(n: usize, k: usize, src: &[f32], ld: usize, out: &mut [f32]) {
    if k == 0 {
        return;
    }
    let mut cols: Vec<&[f32]> = Vec::with_capacity(NR);
    for (s, strip) in out.chunks_exact_mut(k * NR).enumerate() {
        cols.clear();
        cols.extend((s * NR..n.min(s * NR + NR)).map(|j| &src[j * ld..][..k]));
        interleave(&cols, k, NR, strip);
    }
}

/// Packs the row-major `k × n` matrix `src` (row stride `ld`) as B into
/// `out` (length [`packed_len`]`(n, NR, k)`): each k-step of a strip is a
/// run of `src`'s row.
pub(super) fn pack_b(k: usize, n: usize, src: &[f32], ld: usize, out: &mut [f32]) {
    if k == 0 {
        return;
    }
    for (s, strip) in out.chunks_exact_mut(k * NR).enumerate() {
        let (j0, cols) = (s * NR, NR.min(n - s * NR));
        for (kk, dst) in strip.chunks_exact_mut(NR).enumerate() {
            dst[..cols].copy_from_slice(&src[kk * ld + j0..][..cols]);
            dst[cols..].fill(0.0);
        }
    }
}

/// Packs A (`m × k`) given by its transpose, the row-major `k × m` matrix
/// `src` (row stride `ld`: row i of A is column i of `src`), for `kernel`
/// into `out` (length [`packed_a_len`]`(kernel, m, k)`).
pub(super) fn pack_a_transposed(
    kernel: Kernel,
    m: usize,
    k: usize,
    src: &[f32],
    ld: usize,
    out: &mut [f32],
) {
    let mr = kernel.mr();
    if k == 0 {
        return;
    }
    for (s, strip) in out.chunks_exact_mut(k * mr).enumerate() {
        let (i0, rows) = (s * mr, mr.min(m - s * mr));
        for (kk, dst) in strip.chunks_exact_mut(mr).enumerate() {
            dst[..rows].copy_from_slice(&src[kk * ld + i0..][..rows]);
            dst[rows..].fill(0.0);
        }
    }
}

/// The rows of a GEMM's C: row `i` from the product's first column on.
pub(super) trait RowsMut {
    /// Row `i` of C (at least `n` long for a product of width `n`).
    fn row(&mut self, i: usize) -> &mut [f32];
    /// Rows `i0 .. i0 + R` at once (disjoint borrows), each from column
    /// `j0` on.
    fn block<const R: usize>(&mut self, i0: usize, j0: usize) -> [&mut [f32]; R];
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

    fn block<const R: usize>(&mut self, i0: usize, j0: usize) -> [&mut [f32]; R] {
        let mut rest = &mut self.c[i0 * self.ld..];
        let mut rows: [&mut [f32]; R] = std::array::from_fn(|_| Default::default());
        for (r, row) in rows.iter_mut().enumerate() {
            let taken = std::mem::take(&mut rest);
            let (this, tail) = if r + 1 < R {
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

    fn block<const R: usize>(&mut self, i0: usize, j0: usize) -> [&mut [f32]; R] {
        let col = self.col + j0;
        let (block, _) = self.rows[i0..].split_first_chunk_mut::<R>().unzip();
        let mut rows: [&mut [f32]; R] = std::array::from_fn(|_| Default::default());
        if let Some(block) = block {
            for (row, src) in rows.iter_mut().zip(block.iter_mut()) {
                *row = &mut src[col..];
            }
        }
        rows
    }
}

/// `C[m × n] += A[m × k] · B[k × n]` with `a` packed by [`pack_a`] for
/// `kernel`, `b` packed in strips of [`NR`] columns (see the module docs)
/// and `c` row-major with row stride `ldc`.
#[allow(clippy::too_many_arguments)]
pub(super) fn gemm(
    kernel: Kernel,
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    b: &[f32],
    c: &mut [f32],
    ldc: usize,
) {
    gemm_rows(kernel, m, n, k, a, b, &mut Strided { c, ld: ldc });
}

/// [`gemm`] into the rows of any C.
pub(super) fn gemm_rows<C: RowsMut>(
    kernel: Kernel,
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    b: &[f32],
    c: &mut C,
) {
    match kernel.path() {
        Path::Exact => {
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx") {
                // SAFETY: `gemm_exact_avx` only requires AVX, which this CPU
                // has (checked just above).
                unsafe { gemm_exact_avx(m, n, k, a, b, c) };
                return;
            }
            gemm_exact::<C, false>(m, n, k, a, b, c);
        }
        #[cfg(target_arch = "x86_64")]
        // SAFETY: a `Kernel` holds `Path::Avx2` only where the CPU has AVX2
        // and FMA (`Kernel::new`), all `gemm_avx2` requires.
        Path::Avx2 => unsafe { gemm_avx2(m, n, k, a, b, c) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: a `Kernel` holds `Path::Avx512` only where the CPU has
        // AVX-512F (`Kernel::new`), all `gemm_avx512` requires.
        Path::Avx512 => unsafe { gemm_avx512(m, n, k, a, b, c) },
    }
}

/// [`gemm_exact`] compiled for 256-bit vectors, with the AVX micro-kernel.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
fn gemm_exact_avx<C: RowsMut>(m: usize, n: usize, k: usize, a: &[f32], b: &[f32], c: &mut C) {
    gemm_exact::<C, true>(m, n, k, a, b, c);
}

/// The exact path's blocked loops; always inlined so that each caller
/// compiles it (and the micro-kernel) for its own target features. `AVX`
/// (set only by [`gemm_exact_avx`], which requires AVX) runs whole 4×16
/// blocks on [`micro_kernel_avx`].
#[inline(always)]
fn gemm_exact<C: RowsMut, const AVX: bool>(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    b: &[f32],
    c: &mut C,
) {
    const MR: usize = MR_EXACT;
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
                    let block = c.block::<MR>(i0, j0).map(|r| &mut r[..NR]);
                    // SAFETY: AVX is only set by `gemm_exact_avx`, whose
                    // caller checked that the CPU has AVX.
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

/// [`micro_kernel`] on a whole 4×16 block of C, kept in eight AVX
/// registers from load to store (the generic kernel's C copies compile to
/// `memcpy` calls, costly when the depth is small). Multiplies and adds stay
/// separate, in the same order, so the results are the generic kernel's bit
/// for bit.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
fn micro_kernel_avx(a: &[f32], b: &[f32], c: [&mut [f32]; MR_EXACT]) {
    use std::arch::x86_64::*;
    const MR: usize = MR_EXACT;
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

/// `acc += A·B` over one block: `a` holds `MR_EXACT` values per k, `b` `NR`.
#[inline(always)]
fn micro_kernel(a: &[f32], b: &[f32], acc: &mut [[f32; NR]; MR_EXACT]) {
    let mut t = *acc;
    let (a, _) = a.as_chunks::<MR_EXACT>();
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

/// The AVX2 + FMA path.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn gemm_avx2<C: RowsMut>(m: usize, n: usize, k: usize, a: &[f32], b: &[f32], c: &mut C) {
    gemm_fma::<C, MR_AVX2, false>(m, n, k, a, b, c);
}

/// The AVX-512 path.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn gemm_avx512<C: RowsMut>(m: usize, n: usize, k: usize, a: &[f32], b: &[f32], c: &mut C) {
    gemm_fma::<C, MR_AVX512, true>(m, n, k, a, b, c);
}

/// The FMA paths' blocked loops (R×16 blocks), inlined into their callers
/// [`gemm_avx2`] (`AVX512` false) and [`gemm_avx512`] (`AVX512` true), which
/// require the features of the kernel they select. A partial block runs the
/// same kernel on a zero-padded copy of its part of C, so every element of C
/// gets the same operations in the same order wherever it lies.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn gemm_fma<C: RowsMut, const R: usize, const AVX512: bool>(
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
    let a = &a[..packed_len(m, R, k)];
    let b = &b[..packed_len(n, NR, k)];
    let kernel = |a: &[f32], b: &[f32], c: [&mut [f32]; R]| {
        if AVX512 {
            // SAFETY: AVX512 is only set by `gemm_avx512`, whose caller holds
            // a `Kernel` for it, proof that the CPU has AVX-512F.
            unsafe { micro_kernel_avx512::<R>(a, b, c) }
        } else {
            // SAFETY: only `gemm_avx2` leaves AVX512 unset, and its caller
            // holds a `Kernel` for it, proof that the CPU has AVX2 and FMA.
            unsafe { micro_kernel_avx2::<R>(a, b, c) }
        }
    };
    for k0 in (0..k).step_by(KC) {
        let kc = KC.min(k - k0);
        for (j, b_strip) in b.chunks_exact(k * NR).enumerate() {
            let b_block = &b_strip[k0 * NR..][..kc * NR];
            let (j0, cols) = (j * NR, NR.min(n - j * NR));
            for (i, a_strip) in a.chunks_exact(k * R).enumerate() {
                let a_block = &a_strip[k0 * R..][..kc * R];
                let (i0, rows) = (i * R, R.min(m - i * R));
                if rows == R && cols == NR {
                    kernel(a_block, b_block, c.block::<R>(i0, j0));
                    continue;
                }
                let mut tile = [[0.0f32; NR]; R];
                for (r, t) in tile.iter_mut().enumerate().take(rows) {
                    t[..cols].copy_from_slice(&c.row(i0 + r)[j0..][..cols]);
                }
                kernel(a_block, b_block, tile.each_mut().map(|t| &mut t[..]));
                for (r, t) in tile.iter().enumerate().take(rows) {
                    c.row(i0 + r)[j0..][..cols].copy_from_slice(&t[..cols]);
                }
            }
        }
    }
}

/// `C += A·B` on an R×16 block with one FMA per step: two ymm accumulators
/// per row, A broadcast one value at a time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
fn micro_kernel_avx2<const R: usize>(a: &[f32], b: &[f32], c: [&mut [f32]; R]) {
    use std::arch::x86_64::*;
    let kc = b.len() / NR;
    assert!(a.len() >= kc * R && c.iter().all(|r| r.len() >= NR));
    // SAFETY: every load and store stays inside its slice: C rows hold NR
    // floats (asserted), B holds kc·NR and A kc·R (asserted), and the loop
    // reads k-step `kk` at `b[kk·NR..][..NR]` and `a[kk·R..][..R]`.
    unsafe {
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        for (acc_r, row) in acc.iter_mut().zip(&c) {
            *acc_r = [
                _mm256_loadu_ps(row.as_ptr()),
                _mm256_loadu_ps(row.as_ptr().add(8)),
            ];
        }
        let (ap, bp) = (a.as_ptr(), b.as_ptr());
        for kk in 0..kc {
            let b0 = _mm256_loadu_ps(bp.add(kk * NR));
            let b1 = _mm256_loadu_ps(bp.add(kk * NR + 8));
            for (r, acc_r) in acc.iter_mut().enumerate() {
                let av = _mm256_broadcast_ss(&*ap.add(kk * R + r));
                acc_r[0] = _mm256_fmadd_ps(av, b0, acc_r[0]);
                acc_r[1] = _mm256_fmadd_ps(av, b1, acc_r[1]);
            }
        }
        for (acc_r, row) in acc.iter().zip(c) {
            _mm256_storeu_ps(row.as_mut_ptr(), acc_r[0]);
            _mm256_storeu_ps(row.as_mut_ptr().add(8), acc_r[1]);
        }
    }
}

/// `C += A·B` on an R×16 block with one FMA per step: one zmm accumulator
/// per row, A broadcast from memory.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
fn micro_kernel_avx512<const R: usize>(a: &[f32], b: &[f32], c: [&mut [f32]; R]) {
    use std::arch::x86_64::*;
    let kc = b.len() / NR;
    assert!(a.len() >= kc * R && c.iter().all(|r| r.len() >= NR));
    // SAFETY: every load and store stays inside its slice: C rows hold NR
    // floats (asserted), B holds kc·NR and A kc·R (asserted), and the loop
    // reads k-step `kk` at `b[kk·NR..][..NR]` and `a[kk·R..][..R]`.
    unsafe {
        let mut acc = [_mm512_setzero_ps(); R];
        for (acc_r, row) in acc.iter_mut().zip(&c) {
            *acc_r = _mm512_loadu_ps(row.as_ptr());
        }
        let (ap, bp) = (a.as_ptr(), b.as_ptr());
        for kk in 0..kc {
            let bv = _mm512_loadu_ps(bp.add(kk * NR));
            for (r, acc_r) in acc.iter_mut().enumerate() {
                let av = _mm512_set1_ps(*ap.add(kk * R + r));
                *acc_r = _mm512_fmadd_ps(av, bv, *acc_r);
            }
        }
        for (acc_r, row) in acc.iter().zip(c) {
            _mm512_storeu_ps(row.as_mut_ptr(), *acc_r);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_data as data;
    use super::*;

    /// `m × k` A (row-major), B by its transpose `n × k`, packed for `kernel`.
    fn packed(kernel: Kernel, m: usize, n: usize, k: usize, seed: u64) -> [Vec<f32>; 4] {
        let a_rm = data(seed, m * k);
        let b_t = data(seed + 1000, n * k);
        let mut a = vec![f32::NAN; packed_a_len(kernel, m, k)];
        let mut b = vec![f32::NAN; packed_len(n, NR, k)];
        pack_a(kernel, m, k, &a_rm, k, &mut a);
        pack_b_transposed(n, k, &b_t, k, &mut b);
        [a_rm, b_t, a, b]
    }

    /// The sizes around `kernel`'s strips and blocks: m, n and k below, at
    /// and past a block, k = 0 and 1, k past one and two cache blocks.
    fn sizes(kernel: Kernel) -> Vec<(usize, usize, usize)> {
        let mr = kernel.mr();
        let mut out = Vec::new();
        for m in [1, mr - 1, mr, mr + 1, 3 * mr + 2] {
            for n in [1, NR - 1, NR, NR + 1, 2 * NR + 5] {
                for k in [0, 1, 7, KC, KC + 3, 2 * KC + 1] {
                    out.push((m.max(1), n, k));
                }
            }
        }
        out
    }

    /// Runs `kernel` on every size with C starting nonzero and a row stride
    /// wider than n; `check(i, j, got, c0, a row, b column)` for each element
    /// of the product, and the padding columns must be untouched.
    fn each_result(kernel: Kernel, check: impl Fn(&str, f32, f32, &[f32], &[f32])) {
        let mut seed = 0;
        for (m, n, k) in sizes(kernel) {
            seed += 1;
            let ldc = n + 3;
            let [a_rm, b_t, a, b] = packed(kernel, m, n, k, seed);
            let c0 = data(seed + 2000, m * ldc);
            let mut c = c0.clone();
            gemm(kernel, m, n, k, &a, &b, &mut c, ldc);
            for i in 0..m {
                for j in 0..ldc {
                    let at = format!("{kernel:?}, seed {seed}: m {m}, n {n}, k {k}, C[{i}, {j}]");
                    let (got, init) = (c[i * ldc + j], c0[i * ldc + j]);
                    if j < n {
                        check(&at, got, init, &a_rm[i * k..][..k], &b_t[j * k..][..k]);
                    } else {
                        assert_eq!(got.to_bits(), init.to_bits(), "{at}: padding written");
                    }
                }
            }
        }
    }

    /// The exact path sums the same products in the same order as the plain
    /// loop, one multiply and one add at a time: equal bits.
    #[test]
    fn exact_path_matches_the_plain_loop_exactly() {
        each_result(Kernel::exact(), |at, got, init, a, b| {
            let mut want = init;
            for (&x, &y) in a.iter().zip(b) {
                want += x * y;
            }
            assert_eq!(got.to_bits(), want.to_bits(), "{at}");
        });
    }

    /// Every path is within the recursive-summation bound of the exact sum
    /// (computed in f64): `|got − s| ≤ γ_{k+1}·(|c| + Σ|a||b|)`, the bound
    /// that holds for the plain loop with or without FMA (each step rounds
    /// at most twice, and |c| + Σ|a||b| bounds every partial sum). The f64
    /// reference itself is within 2⁻⁵² relative of s, far below.
    #[test]
    fn every_path_is_within_the_summation_bound() {
        for kernel in Kernel::all() {
            each_result(kernel, |at, got, init, a, b| {
                let (mut s, mut mag) = (f64::from(init), f64::from(init).abs());
                for (&x, &y) in a.iter().zip(b) {
                    s += f64::from(x) * f64::from(y);
                    mag += (f64::from(x) * f64::from(y)).abs();
                }
                let ku = (a.len() + 1) as f64 * f64::from(f32::EPSILON) / 2.0;
                let bound = ku / (1.0 - ku) * mag;
                let err = (f64::from(got) - s).abs();
                assert!(err <= bound, "{at}: error {err:e} > bound {bound:e}");
            });
        }
    }

    /// The FMA paths compute `c = fma(a, b, c)` in increasing k: equal bits
    /// to that scalar loop (and not to the exact path's, somewhere: the test
    /// would notice a path that silently ran the exact kernel).
    #[test]
    fn fma_paths_match_the_fused_loop_exactly() {
        for kernel in Kernel::all() {
            if kernel.path() == Path::Exact {
                continue;
            }
            let differs = std::cell::Cell::new(false);
            each_result(kernel, |at, got, init, a, b| {
                let (mut want, mut unfused) = (init, init);
                for (&x, &y) in a.iter().zip(b) {
                    want = x.mul_add(y, want);
                    unfused += x * y;
                }
                assert_eq!(got.to_bits(), want.to_bits(), "{at}");
                differs.set(differs.get() || got != unfused);
            });
            assert!(
                differs.get(),
                "{kernel:?} gave the unfused loop's bits everywhere"
            );
        }
    }

    /// Each path's bits do not depend on how C is split into tasks (row
    /// blocks packed separately, as the callers' rayon tasks do, at any row)
    /// nor on the layout of C (one strided slice, or rows in separate slices
    /// starting at a column offset).
    #[test]
    fn every_path_is_independent_of_the_split_and_the_layout() {
        let (m, n, k) = (45, 77, KC + 40);
        for kernel in Kernel::all() {
            let [a_rm, _, a, b] = packed(kernel, m, n, k, 7);
            let c0 = data(9, m * n);
            let mut whole = c0.clone();
            gemm(kernel, m, n, k, &a, &b, &mut whole, n);
            for split in [1, 5, kernel.mr(), 2 * kernel.mr() + 1] {
                let mut parts = c0.clone();
                for (t, c_rows) in parts.chunks_mut(split * n).enumerate() {
                    let rows = c_rows.len() / n;
                    let mut a_t = vec![0.0; packed_a_len(kernel, rows, k)];
                    pack_a(kernel, rows, k, &a_rm[t * split * k..], k, &mut a_t);
                    gemm(kernel, rows, n, k, &a_t, &b, c_rows, n);
                }
                assert!(
                    whole
                        .iter()
                        .zip(&parts)
                        .all(|(x, y)| x.to_bits() == y.to_bits()),
                    "{kernel:?}: rows split by {split} changed the result"
                );
            }
            // C rows as separate slices, the product from column 3 on.
            let mut planes: Vec<Vec<f32>> = c0
                .chunks(n)
                .map(|r| [vec![0.5; 3], r.to_vec()].concat())
                .collect();
            let mut rows: Vec<&mut [f32]> = planes.iter_mut().map(|p| &mut p[..]).collect();
            gemm_rows(
                kernel,
                m,
                n,
                k,
                &a,
                &b,
                &mut Scattered {
                    rows: &mut rows,
                    col: 3,
                },
            );
            for (i, plane) in planes.iter().enumerate() {
                assert!(
                    plane[..3].iter().all(|&v| v == 0.5),
                    "{kernel:?}: row {i} head"
                );
                assert!(
                    plane[3..]
                        .iter()
                        .zip(&whole[i * n..][..n])
                        .all(|(x, y)| x.to_bits() == y.to_bits()),
                    "{kernel:?}: scattered row {i} differs from the strided C"
                );
            }
        }
    }

    /// `pack_b` and `pack_a_transposed` give the same packed operands as
    /// `pack_b_transposed` and `pack_a` on the transposed matrices (odd
    /// sizes, padded strips, a row stride past the width); stale values in
    /// the output buffers are overwritten.
    #[test]
    fn row_major_b_and_transposed_a_pack_alike() {
        let transpose = |rows: usize, cols: usize, src: &[f32], ld: usize| -> Vec<f32> {
            (0..cols)
                .flat_map(|j| (0..rows).map(move |i| src[i * ld + j]))
                .collect()
        };
        for kernel in Kernel::all() {
            for (rows, cols) in [(1, 1), (3, 17), (KC + 5, 2 * NR + 3), (40, kernel.mr() + 1)] {
                let ld = cols + 2;
                let src = data((rows * 31 + cols) as u64, rows * ld);
                let t = transpose(rows, cols, &src, ld);
                // B = src (rows × cols): k = rows, n = cols.
                let (mut got, mut want) = (vec![f32::NAN; packed_len(cols, NR, rows)], vec![]);
                want.resize(got.len(), f32::NAN);
                pack_b(rows, cols, &src, ld, &mut got);
                pack_b_transposed(cols, rows, &t, rows, &mut want);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&want), "pack_b {rows}×{cols}");
                // A = srcᵀ (cols × rows): m = cols, k = rows.
                let len = packed_a_len(kernel, cols, rows);
                let (mut got, mut want) = (vec![f32::NAN; len], vec![f32::NAN; len]);
                pack_a_transposed(kernel, cols, rows, &src, ld, &mut got);
                pack_a(kernel, cols, rows, &t, rows, &mut want);
                assert_eq!(
                    bits(&got),
                    bits(&want),
                    "{kernel:?}: pack_a_transposed {rows}×{cols}"
                );
            }
        }
    }

    /// Splitting the depth into consecutive GEMM calls (C kept in between)
    /// changes no bit on any path: C is f32 between the calls as between
    /// the cache blocks of one call.
    #[test]
    fn splitting_the_depth_changes_no_bit() {
        let (m, n, k) = (21, 35, 2 * KC + 19);
        for kernel in Kernel::all() {
            let [a_rm, b_t, a, b] = packed(kernel, m, n, k, 11);
            let c0 = data(12, m * n);
            let mut whole = c0.clone();
            gemm(kernel, m, n, k, &a, &b, &mut whole, n);
            for cut in [1, 7, KC, KC + 1] {
                let mut split = c0.clone();
                for (k0, k1) in [(0, cut), (cut, k)] {
                    let d = k1 - k0;
                    let (mut a_p, mut b_p) = (
                        vec![0.0; packed_a_len(kernel, m, d)],
                        vec![0.0; packed_len(n, NR, d)],
                    );
                    pack_a(kernel, m, d, &a_rm[k0..], k, &mut a_p);
                    pack_b_transposed(n, d, &b_t[k0..], k, &mut b_p);
                    gemm(kernel, m, n, d, &a_p, &b_p, &mut split, n);
                }
                assert!(
                    whole
                        .iter()
                        .zip(&split)
                        .all(|(x, y)| x.to_bits() == y.to_bits()),
                    "{kernel:?}: depth cut at {cut} changed the result"
                );
            }
        }
    }

    /// `CELLMORPH_CPU_GEMM` values: unset, empty and `auto` give the fastest
    /// supported path; a known name gives that path where supported; an
    /// unknown name is an error naming the variable.
    #[test]
    fn the_setting_picks_the_path() {
        let fastest = *Path::ALL.iter().rev().find(|p| p.supported()).unwrap();
        for value in [None, Some(""), Some("auto"), Some(" auto ")] {
            assert_eq!(Path::from_setting(value), Ok(fastest), "{value:?}");
        }
        for &path in Path::ALL {
            let got = Path::from_setting(Some(path.name()));
            if path.supported() {
                assert_eq!(got, Ok(path));
            } else {
                let msg = got.unwrap_err();
                assert!(
                    msg.contains(PATH_ENV) && msg.contains(path.needs()),
                    "{msg}"
                );
            }
        }
        let msg = Path::from_setting(Some("avx9")).unwrap_err();
        assert!(msg.contains(PATH_ENV) && msg.contains("exact"), "{msg}");
    }
}
