//! 2-D convolution and transposed convolution (dilation 1, groups 1).
//!
//! Both ops, forward and backward, link a *small* plane (the conv output, or
//! the transposed conv's input) and a *big* plane (the conv input, or the
//! transposed conv's output) through a kernel window, with
//! `big[i·s + k − p] ↔ small[i]` along each axis; the weights are always
//! `[small channels, big channels, kh, kw]`. Everything reduces to three
//! products:
//!
//! - *correlate*: `small[cs, i, j] = Σ_{cb, ky, kx} w[cs, cb, ky, kx] · big[cb, i·s + ky − p, j·s + kx − p]`
//!   (conv forward, transposed-conv input gradient);
//! - *scatter*: `big[cb, i·s + ky − p, j·s + kx − p] += Σ_cs w[cs, cb, ky, kx] · small[cs, i, j]`
//!   (transposed-conv forward, conv input gradient);
//! - *weight gradient*: `dw[cs, cb, ky, kx] = Σ_{n, i, j} small[n, cs, i, j] · big[n, cb, i·s + ky − p, j·s + kx − p]`
//!   (both weight gradients), one GEMM per image with the big plane's taps
//!   gathered straight into the packed B (`weight_grad`; specification
//!   `reference::weight_grad_planes`).
//!
//! Correlate and scatter run as implicit GEMMs (`GemmConv`): the weights
//! `[c_out, c_in·taps]` times patches `[c_in·taps, pixels]` that are gathered
//! tile by tile, into small reused buffers, from a zero-padded copy of the
//! input rows one task needs (never a whole-image im2col); runs of positions
//! along one input row are copied as slices. With one GEMM pass (depth
//! ≤ `KC`) a conv writes its output planes directly as the GEMM's C; deeper
//! GEMMs use a compact C tile copied out at the end. Scatter is first
//! split into `stride_h·stride_w` phases, the output pixels with the same
//! `(oy mod s, ox mod s)`: a phase meets only the taps `ky ≡ oy + p (mod s)`,
//! each at a fixed input offset, so it is a stride-1 correlation with part of
//! the kernel and the same GEMM applies.
//!
//! Every output starts from its bias and adds its products in the order of
//! the plain loop nest (input channel, then ky, then kx), a tap in the zero
//! padding adding an exact zero where the loop nest skipped it. On the exact
//! GEMM path (`CELLMORPH_CPU_GEMM=exact`, see `gemm`) each step is one
//! multiply and one add, so the results equal those of that loop nest, the
//! public specification ([`reference::conv2d`],
//! [`reference::conv_transpose2d`]), bit for bit; on the FMA paths (the
//! default where the CPU has them) each step is one fused multiply-add, and
//! the results are within the summation error bound of it. The unit tests
//! check both on every path the CPU runs.

use super::gemm::{
    self, gemm, gemm_rows, interleave, pack_a, packed_a_len, packed_len, scratch, Kernel,
    Scattered, KC, NR,
};
use super::{check_len, chunk, numel};
use crate::error::{Error, Result};
use crate::geometry::{Conv2dGeom, ConvTranspose2dGeom};
use rayon::prelude::*;
use std::ops::Range;

/// Target size of one gathered patch tile (GEMM B), in floats: with the
/// weights' current block it stays within L2.
const TILE_FLOATS: usize = 1 << 16;
/// Most output positions per tile (bounds the output tile, GEMM C).
const MAX_TILE: usize = 16 * NR;
/// Most output pixels per rayon task (bounds its input window).
const MAX_TASK_PIXELS: usize = 2048;
/// Tasks per thread to aim for, so that uneven tasks still balance.
const TASKS_PER_THREAD: usize = 4;

/// The window linking a small plane to a big plane (see the module docs).
#[derive(Clone, Copy, Debug)]
struct Window {
    small_h: usize,
    small_w: usize,
    big_h: usize,
    big_w: usize,
    kh: usize,
    kw: usize,
    stride_h: usize,
    stride_w: usize,
    pad_h: usize,
    pad_w: usize,
}

impl Window {
    /// Conv2d: the output is the small plane, the input the big one.
    fn conv(g: &Conv2dGeom) -> Self {
        Window {
            small_h: g.oh,
            small_w: g.ow,
            big_h: g.h,
            big_w: g.w,
            kh: g.kh,
            kw: g.kw,
            stride_h: g.stride_h,
            stride_w: g.stride_w,
            pad_h: g.pad_h,
            pad_w: g.pad_w,
        }
    }

    /// Transposed conv: the input is the small plane, the output the big one.
    fn transposed(g: &ConvTranspose2dGeom) -> Self {
        Window {
            small_h: g.h,
            small_w: g.w,
            big_h: g.oh,
            big_w: g.ow,
            kh: g.kh,
            kw: g.kw,
            stride_h: g.stride_h,
            stride_w: g.stride_w,
            pad_h: g.pad_h,
            pad_w: g.pad_w,
        }
    }

    fn small_len(&self) -> usize {
        self.small_h * self.small_w
    }

    fn big_len(&self) -> usize {
        self.big_h * self.big_w
    }

    fn kernel_len(&self) -> usize {
        self.kh * self.kw
    }

    /// Small rows `i` whose big row `i·s + ky − p` lies inside the big plane.
    fn rows(&self, ky: usize) -> Range<usize> {
        valid_range(self.small_h, self.big_h, self.stride_h, self.pad_h, ky)
    }

    /// Small columns `j` whose big column `j·s + kx − p` lies inside the big plane.
    fn cols(&self, kx: usize) -> Range<usize> {
        valid_range(self.small_w, self.big_w, self.stride_w, self.pad_w, kx)
    }
}

/// Indices `o < small_len` with `0 ≤ o·stride + k − pad < big_len`.
fn valid_range(
    small_len: usize,
    big_len: usize,
    stride: usize,
    pad: usize,
    k: usize,
) -> Range<usize> {
    let lo = pad.saturating_sub(k).div_ceil(stride);
    let hi = (big_len + pad)
        .saturating_sub(k)
        .div_ceil(stride)
        .min(small_len);
    lo..hi.max(lo)
}

/// One axis of a GEMM phase: position `g < len` is output index
/// `out0 + g·out_step` and reads, through its `t`-th tap, input index
/// `g·in_step + offs[t]` (zero outside the input).
#[derive(Debug)]
struct Axis {
    len: usize,
    out0: usize,
    out_step: usize,
    in_step: usize,
    /// Kernel index of each tap, ascending.
    taps: Vec<usize>,
    /// Input offset of each tap.
    offs: Vec<isize>,
}

impl Axis {
    /// Correlate: small index `i` reads every tap `kk` at big index `i·s + kk − p`.
    fn correlate(small: usize, stride: usize, pad: usize, k: usize) -> Self {
        Axis {
            len: small,
            out0: 0,
            out_step: 1,
            in_step: stride,
            taps: (0..k).collect(),
            offs: (0..k).map(|kk| kk as isize - pad as isize).collect(),
        }
    }

    /// Scatter, phase `r`: big index `r + g·s` is reached by the taps
    /// `kk ≡ r + p (mod s)`, from small index `g + (r + p − kk)/s`.
    fn scatter(big: usize, stride: usize, pad: usize, k: usize, r: usize) -> Self {
        let taps: Vec<usize> = ((r + pad) % stride..k).step_by(stride).collect();
        let offs = taps
            .iter()
            .map(|&kk| ((r + pad) as isize - kk as isize) / stride as isize)
            .collect();
        Axis {
            len: big.saturating_sub(r).div_ceil(stride),
            out0: r,
            out_step: stride,
            in_step: 1,
            taps,
            offs,
        }
    }

    /// Positions whose output index lies in `out`.
    fn positions(&self, out: &Range<usize>) -> Range<usize> {
        let first_at = |o: usize| {
            o.saturating_sub(self.out0)
                .div_ceil(self.out_step)
                .min(self.len)
        };
        first_at(out.start)..first_at(out.end)
    }

    /// Smallest tap offset (0 without taps).
    fn min_off(&self) -> isize {
        self.offs.iter().copied().min().unwrap_or(0)
    }

    /// Input indices read by `positions`, or `None` if they read none.
    fn reads(&self, positions: &Range<usize>) -> Option<Range<isize>> {
        let hi = self.offs.iter().copied().max()?;
        if positions.is_empty() {
            return None;
        }
        let first = (positions.start * self.in_step) as isize + self.min_off();
        let last = ((positions.end - 1) * self.in_step) as isize + hi;
        Some(first..last + 1)
    }
}

/// The smallest range holding both.
fn union(a: Range<isize>, b: Range<isize>) -> Range<isize> {
    a.start.min(b.start)..a.end.max(b.end)
}

/// Length of a range that may start below zero.
fn span(r: &Range<isize>) -> usize {
    (r.end - r.start).max(0) as usize
}

/// One GEMM of a [`GemmConv`]: the outputs on the grid `rows × cols`, each
/// summing over (input channel, row tap, column tap).
struct Phase {
    rows: Axis,
    cols: Axis,
    /// GEMM depth: input channels × row taps × column taps.
    k: usize,
    /// The weights `[c_out, k]`, packed as GEMM A.
    a: Vec<f32>,
}

impl Phase {
    /// `w` holds the weights `[c_out, k]` row-major, columns ordered as the
    /// GEMM depth.
    fn new(kernel: Kernel, c_out: usize, rows: Axis, cols: Axis, k: usize, w: &[f32]) -> Self {
        let mut a = vec![0.0; packed_a_len(kernel, c_out, k)];
        pack_a(kernel, c_out, k, w, k, &mut a);
        Phase { rows, cols, k, a }
    }
}

/// `n` images of `c_in` planes `in_h × in_w` to `c_out` planes
/// `out_h × out_w` (overwritten, starting from the bias), as one GEMM per
/// phase.
struct GemmConv<'b> {
    kernel: Kernel,
    n: usize,
    c_in: usize,
    in_h: usize,
    in_w: usize,
    c_out: usize,
    out_h: usize,
    out_w: usize,
    phases: Vec<Phase>,
    bias: Option<&'b [f32]>,
    /// Input columns that some phase reads: the columns of every window.
    cols: Range<isize>,
}

/// The output rows one rayon task computes: rows `rows` of images `imgs`
/// (all rows when there are several images), as one slice per (image,
/// channel) in that order.
struct Task<'y> {
    imgs: Range<usize>,
    rows: Range<usize>,
    pieces: Vec<&'y mut [f32]>,
}

impl<'b> GemmConv<'b> {
    /// Correlate: big planes (`c_big` channels) in, small planes out.
    fn correlate(
        kernel: Kernel,
        win: &Window,
        n: usize,
        c_big: usize,
        c_small: usize,
        w: &[f32],
        bias: Option<&'b [f32]>,
    ) -> Self {
        // w [c_small, c_big, kh, kw] already is the GEMM's A [c_small, c_big·kh·kw].
        let phase = Phase::new(
            kernel,
            c_small,
            Axis::correlate(win.small_h, win.stride_h, win.pad_h, win.kh),
            Axis::correlate(win.small_w, win.stride_w, win.pad_w, win.kw),
            c_big * win.kernel_len(),
            w,
        );
        let input = (c_big, win.big_h, win.big_w);
        let output = (c_small, win.small_h, win.small_w);
        GemmConv::new(kernel, n, input, output, vec![phase], bias)
    }

    /// Scatter: small planes (`c_small` channels) in, big planes out.
    fn scatter(
        kernel: Kernel,
        win: &Window,
        n: usize,
        c_small: usize,
        c_big: usize,
        w: &[f32],
        bias: Option<&'b [f32]>,
    ) -> Self {
        let k_len = win.kernel_len();
        let mut phases = Vec::with_capacity(win.stride_h * win.stride_w);
        let mut w_phase = Vec::new();
        for ry in 0..win.stride_h {
            for rx in 0..win.stride_w {
                let rows = Axis::scatter(win.big_h, win.stride_h, win.pad_h, win.kh, ry);
                let cols = Axis::scatter(win.big_w, win.stride_w, win.pad_w, win.kw, rx);
                // A [c_big, c_small·taps] from w [c_small, c_big, kh, kw].
                w_phase.clear();
                for cb in 0..c_big {
                    for cs in 0..c_small {
                        let w_k = &w[(cs * c_big + cb) * k_len..][..k_len];
                        for &ky in &rows.taps {
                            w_phase.extend(cols.taps.iter().map(|&kx| w_k[ky * win.kw + kx]));
                        }
                    }
                }
                let k = c_small * rows.taps.len() * cols.taps.len();
                phases.push(Phase::new(kernel, c_big, rows, cols, k, &w_phase));
            }
        }
        let input = (c_small, win.small_h, win.small_w);
        let output = (c_big, win.big_h, win.big_w);
        GemmConv::new(kernel, n, input, output, phases, bias)
    }

    fn new(
        kernel: Kernel,
        n: usize,
        (c_in, in_h, in_w): (usize, usize, usize),
        (c_out, out_h, out_w): (usize, usize, usize),
        phases: Vec<Phase>,
        bias: Option<&'b [f32]>,
    ) -> Self {
        let cols = phases
            .iter()
            .filter(|p| p.k > 0)
            .filter_map(|p| p.cols.reads(&(0..p.cols.len)))
            .reduce(union)
            .unwrap_or(0..0);
        GemmConv {
            kernel,
            n,
            c_in,
            in_h,
            in_w,
            c_out,
            out_h,
            out_w,
            phases,
            bias,
            cols,
        }
    }

    /// Computes `y` `[n, c_out, out_h, out_w]` from `x` `[n, c_in, in_h, in_w]`.
    fn run(&self, x: &[f32], y: &mut [f32]) {
        if y.is_empty() {
            return;
        }
        let tile = self
            .phases
            .iter()
            .map(|p| tile_len(p.k))
            .max()
            .unwrap_or(NR);
        let pixels = self.n * self.out_h * self.out_w;
        let target = pixels
            .div_ceil(TASKS_PER_THREAD * rayon::current_num_threads())
            .clamp(tile, MAX_TASK_PIXELS.max(tile));
        self.tasks(y, target)
            .into_par_iter()
            .for_each(|task| self.run_task(x, task));
    }

    /// Splits `y` into tasks of about `target` output pixels: groups of whole
    /// images when a plane is smaller, else blocks of rows of one image.
    fn tasks<'y>(&self, y: &'y mut [f32], target: usize) -> Vec<Task<'y>> {
        let plane = self.out_h * self.out_w;
        if plane < target {
            let group = target / plane;
            return y
                .chunks_mut(group * self.c_out * plane)
                .enumerate()
                .map(|(t, y_group)| Task {
                    imgs: t * group..(t * group + group).min(self.n),
                    rows: 0..self.out_h,
                    pieces: y_group.chunks_mut(plane).collect(),
                })
                .collect();
        }
        let block = target.div_ceil(self.out_w).min(self.out_h);
        let blocks = self.out_h.div_ceil(block);
        let mut tasks: Vec<Task<'y>> = (0..self.n * blocks)
            .map(|t| {
                let row0 = t % blocks * block;
                Task {
                    imgs: t / blocks..t / blocks + 1,
                    rows: row0..(row0 + block).min(self.out_h),
                    pieces: Vec::with_capacity(self.c_out),
                }
            })
            .collect();
        for (img, y_img) in y.chunks_mut(self.c_out * plane).enumerate() {
            for y_plane in y_img.chunks_mut(plane) {
                for (b, piece) in y_plane.chunks_mut(block * self.out_w).enumerate() {
                    tasks[img * blocks + b].pieces.push(piece);
                }
            }
        }
        tasks
    }

    /// Computes one task's outputs, phase by phase and tile by tile.
    fn run_task(&self, x: &[f32], task: Task<'_>) {
        let Task {
            imgs,
            rows,
            mut pieces,
        } = task;
        let win_rows = self
            .phases
            .iter()
            .filter(|p| p.k > 0)
            .filter_map(|p| p.rows.reads(&p.rows.positions(&rows)))
            .reduce(union)
            .unwrap_or(0..0);
        let wc = span(&self.cols);
        // When the windows span exactly the input's columns and the rows lie
        // inside it (no padding read: 1×1 convs, say), the input itself is
        // the window, its planes `in_h·in_w` apart: gathered in place, with
        // no copy.
        let direct = self.cols == (0..self.in_w as isize)
            && win_rows.start >= 0
            && win_rows.end <= self.in_h as isize;
        let mut copied = None;
        let (window, plane): (&[f32], usize) = if direct {
            let start = imgs.start * self.c_in * self.in_h * self.in_w
                + win_rows.start as usize * self.in_w;
            (x.get(start..).unwrap_or(&[]), self.in_h * self.in_w)
        } else {
            let w = copied.insert(self.window(x, &imgs, &win_rows));
            (&w[..], span(&win_rows) * wc)
        };
        // Reused per tile: window offsets and output slots of its positions, its
        // patches (GEMM B) and its outputs (GEMM C), the latter two from the
        // thread's scratch buffers (every element read is written first).
        let (mut pix, mut outs) = (Vec::new(), Vec::new());
        let tiles = self.phases.iter().map(|p| (tile_len(p.k), p.k));
        let max_patches = tiles.clone().map(|(t, k)| packed_len(t, NR, k)).max();
        let max_tile = tiles.map(|(t, _)| t).max().unwrap_or(0);
        let mut patches = scratch::take(max_patches.unwrap_or(0));
        let mut out_tile = scratch::take(self.c_out * max_tile);
        for p in &self.phases {
            let g_rows = p.rows.positions(&rows);
            let (na, nb) = (g_rows.len(), p.cols.len);
            let count = imgs.len() * na * nb;
            if count == 0 {
                continue;
            }
            let tile = tile_len(p.k);
            // Window offset of each (row tap, column tap) beyond the first.
            let (min_r, min_c) = (p.rows.min_off(), p.cols.min_off());
            let taps: Vec<usize> = p
                .rows
                .offs
                .iter()
                .flat_map(|&dy| {
                    p.cols
                        .offs
                        .iter()
                        .map(move |&dx| (dy - min_r) as usize * wc + (dx - min_c) as usize)
                })
                .collect();
            let gather_tile = |pix: &[usize], b_tile: &mut [f32]| {
                gather(window, plane, self.c_in, &taps, pix, p.cols.in_step, b_tile)
            };
            // Pixel offset in the window of a position's first tap.
            let first_tap = |img: usize, gy: usize, gx: usize| {
                let row = (gy * p.rows.in_step) as isize + min_r - win_rows.start;
                let col = (gx * p.cols.in_step) as isize + min_c - self.cols.start;
                img * self.c_in * plane + row as usize * wc + col as usize
            };
            let in_place = p.rows.out_step == 1
                && p.cols.out_step == 1
                && p.rows.out0 == 0
                && p.cols.out0 == 0
                && p.k <= KC;
            if in_place {
                // Position q of image i is pixel q of the image's pieces (one per
                // output channel, starting at output row `rows.start`): the tiles
                // are runs of pixels of one image, computed in place. Only for
                // one pass over C (depth ≤ KC): C rows lie a plane apart, and
                // reloading them once per depth block cost more than the
                // compact tile and its copy-out (8% at depth 1152).
                let per_img = na * nb;
                for (i, img_pieces) in pieces.chunks_mut(self.c_out).enumerate() {
                    for q0 in (0..per_img).step_by(tile) {
                        let len = tile.min(per_img - q0);
                        pix.clear();
                        if p.k > 0 {
                            pix.extend(
                                (q0..q0 + len).map(|q| first_tap(i, g_rows.start + q / nb, q % nb)),
                            );
                        }
                        let b_tile = &mut patches[..packed_len(len, NR, p.k)];
                        gather_tile(&pix, b_tile);
                        for (co, piece) in img_pieces.iter_mut().enumerate() {
                            piece[q0..q0 + len].fill(self.bias.map_or(0.0, |b| b[co]));
                        }
                        let mut c = Scattered {
                            rows: img_pieces,
                            col: q0,
                        };
                        gemm_rows(self.kernel, self.c_out, len, p.k, &p.a, b_tile, &mut c);
                    }
                }
                continue;
            }
            let c_tile = &mut out_tile[..self.c_out * tile];
            for q0 in (0..count).step_by(tile) {
                let len = tile.min(count - q0);
                pix.clear();
                outs.clear();
                for q in q0..q0 + len {
                    let (img, gy, gx) = (q / (na * nb), g_rows.start + q / nb % na, q % nb);
                    if p.k > 0 {
                        pix.push(first_tap(img, gy, gx));
                    }
                    let oy = p.rows.out0 + gy * p.rows.out_step - rows.start;
                    let ox = p.cols.out0 + gx * p.cols.out_step;
                    outs.push((img * self.c_out, oy * self.out_w + ox));
                }
                let b_tile = &mut patches[..packed_len(len, NR, p.k)];
                gather_tile(&pix, b_tile);
                for (co, c_row) in c_tile.chunks_exact_mut(tile).enumerate() {
                    c_row[..len].fill(self.bias.map_or(0.0, |b| b[co]));
                }
                gemm(
                    self.kernel,
                    self.c_out,
                    len,
                    p.k,
                    &p.a,
                    b_tile,
                    c_tile,
                    tile,
                );
                write_out(c_tile, tile, &outs, p.cols.out_step, &mut pieces);
            }
        }
        [Some(patches), Some(out_tile), copied]
            .into_iter()
            .flatten()
            .for_each(scratch::give);
    }

    /// Input rows `rows` and columns `self.cols` of images `imgs`, zero
    /// outside the input: `[imgs, c_in, rows, cols]`.
    fn window(&self, x: &[f32], imgs: &Range<usize>, rows: &Range<isize>) -> Vec<f32> {
        let (wr, wc) = (span(rows), span(&self.cols));
        // A scratch buffer: every element is written below (zero outside the input).
        let mut win = scratch::take(imgs.len() * self.c_in * wr * wc);
        // The input columns inside the window.
        let (x0, x1) = (
            self.cols.start.max(0),
            self.cols.end.min(self.in_w as isize),
        );
        if win.is_empty() || x1 <= x0 || self.in_h == 0 {
            win.fill(0.0);
            return win;
        }
        let (src, dst, len) = (
            x0 as usize,
            (x0 - self.cols.start) as usize,
            (x1 - x0) as usize,
        );
        let in_plane = self.in_h * self.in_w;
        let x_imgs = &x[imgs.start * self.c_in * in_plane..][..imgs.len() * self.c_in * in_plane];
        for (w_plane, x_plane) in win
            .chunks_exact_mut(wr * wc)
            .zip(x_imgs.chunks_exact(in_plane))
        {
            for (r, w_row) in rows.clone().zip(w_plane.chunks_exact_mut(wc)) {
                if (0..self.in_h as isize).contains(&r) {
                    let x_row = &x_plane[r as usize * self.in_w..][..self.in_w];
                    w_row[..dst].fill(0.0);
                    copy_short(&mut w_row[dst..][..len], &x_row[src..][..len]);
                    w_row[dst + len..].fill(0.0);
                } else {
                    w_row.fill(0.0);
                }
            }
        }
        win
    }
}

/// Output positions per tile: whole strips, and about [`TILE_FLOATS`] of
/// gathered patches at GEMM depth `k`.
fn tile_len(k: usize) -> usize {
    (TILE_FLOATS / k.max(1)).clamp(NR, MAX_TILE) / NR * NR
}

/// Fills the packed patches (GEMM B) of one tile: lane `l` of strip `s` is
/// the position whose first tap is at `pix[s·NR + l]` in `window`; row
/// `(ci, t)` adds `ci·plane + taps[t]`. Lanes whose positions lie `step`
/// apart in the window (part of one output row, typically) form a run,
/// copied as a slice when `step` is 1; lanes past the tile are zero.
fn gather(
    window: &[f32],
    plane: usize,
    c_in: usize,
    taps: &[usize],
    pix: &[usize],
    step: usize,
    b: &mut [f32],
) {
    let k = c_in * taps.len();
    if k == 0 {
        return;
    }
    // (first lane, window offset, lanes) of each run of the current strip.
    let mut runs: Vec<(usize, usize, usize)> = Vec::with_capacity(NR);
    for (lanes, strip) in pix.chunks(NR).zip(b.chunks_exact_mut(k * NR)) {
        runs.clear();
        let mut l0 = 0;
        for l in 1..=lanes.len() {
            if l == lanes.len() || lanes[l] != lanes[l - 1] + step {
                runs.push((l0, lanes[l0], l - l0));
                l0 = l;
            }
        }
        let whole = lanes.len() == NR && runs.len() == 1;
        let mut rows = strip.chunks_exact_mut(NR);
        for ci in 0..c_in {
            for (&t, dst) in taps.iter().zip(rows.by_ref()) {
                let base = ci * plane + t;
                if whole && step == 1 {
                    dst.copy_from_slice(&window[base + lanes[0]..][..NR]);
                    continue;
                }
                for &(l0, p0, len) in &runs {
                    let d = &mut dst[l0..l0 + len];
                    if step == 1 {
                        copy_short(d, &window[base + p0..][..len]);
                    } else {
                        let src = &window[base + p0..][..(len - 1) * step + 1];
                        for (l, d) in d.iter_mut().enumerate() {
                            *d = src[l * step];
                        }
                    }
                }
                dst[lanes.len()..].fill(0.0);
            }
        }
    }
}

/// `d.copy_from_slice(&s[..d.len()])`; a run of at most 16 goes in
/// fixed-size pieces that compile to vector moves, not a `memcpy` call (the
/// gathers copy many runs of a few floats).
#[inline(always)]
fn copy_short(d: &mut [f32], s: &[f32]) {
    let n = d.len();
    let s = &s[..n];
    if n > 16 {
        d.copy_from_slice(s);
        return;
    }
    let mut i = 0;
    for piece in [8, 8, 4, 2, 1] {
        if n - i >= piece {
            d[i..][..piece].copy_from_slice(&s[i..][..piece]);
            i += piece;
        }
    }
}

/// Copies a tile's outputs, `c` `[c_out, ld]` (the first `outs.len()`
/// columns), to the task's pieces: output `j` goes to `pieces[outs[j].0 + co]`
/// at offset `outs[j].1`. Outputs `step` apart in one piece are written as a
/// run.
fn write_out(
    c: &[f32],
    ld: usize,
    outs: &[(usize, usize)],
    step: usize,
    pieces: &mut [&mut [f32]],
) {
    let runs: Vec<bool> = outs
        .chunks(NR)
        .map(|lanes| {
            let (p0, o0) = lanes[0];
            lanes
                .iter()
                .enumerate()
                .all(|(l, &(p, o))| p == p0 && o == o0 + l * step)
        })
        .collect();
    for (co, c_row) in c.chunks_exact(ld).enumerate() {
        let strips = outs.chunks(NR).zip(c_row[..outs.len()].chunks(NR));
        for ((lanes, vals), &run) in strips.zip(&runs) {
            let (p0, o0) = lanes[0];
            if run {
                let dst = &mut pieces[p0 + co][o0..][..(vals.len() - 1) * step + 1];
                if step == 1 {
                    dst.copy_from_slice(vals);
                } else {
                    for (l, &v) in vals.iter().enumerate() {
                        dst[l * step] = v;
                    }
                }
            } else {
                for (&(p, o), &v) in lanes.iter().zip(vals) {
                    pieces[p + co][o] = v;
                }
            }
        }
    }
}

/// The weight gradient shared by conv2d and conv_transpose2d: `dw[sc,
/// (bc, ky, kx)] = Σ_{n, p} small[n, sc, p] · big[n, bc, tap(p, ky, kx)]`
/// (zero where the tap falls in the padding), with `small` the small
/// plane's tensor `[n, small_c, P]` and `big` the big plane's
/// `[n, big_c, ·]`; overwrites `dw` `[small_c, big_c, kh, kw]`.
///
/// A GEMM `dw += A·B` per depth block of small-plane rows (about [`KC`]
/// positions) of each image: A is `small` on those positions, B the big
/// plane's taps there, gathered straight into the packed layout
/// ([`Taps::pack`]; no separate im2col). The rayon tasks own blocks of `dw`
/// (groups of A strips × groups of B strips, split to pack the least),
/// each accumulating its block in a compact buffer over every image and
/// depth block in order, packing only its own A and B into small reused
/// buffers that stay in cache. Every element therefore sums image by image
/// and, within an image, in increasing small-plane position, from zero,
/// whatever the thread count or the split (C stays f32 between GEMM calls,
/// so splitting the depth changes no bit): deterministic, and bit for bit
/// `reference::weight_grad_planes` on the exact GEMM path.
#[allow(clippy::too_many_arguments)]
fn weight_grad(
    kernel: Kernel,
    win: &Window,
    n_img: usize,
    small_c: usize,
    big_c: usize,
    small: &[f32],
    big: &[f32],
    dw: &mut [f32],
) {
    let (p_len, big_plane, k_len) = (win.small_len(), win.big_len(), win.kernel_len());
    let cols = big_c * k_len;
    dw.fill(0.0);
    if p_len == 0 || cols == 0 || small_c == 0 {
        return;
    }
    let taps = Taps::new(win, big_c);
    // Tasks: row groups (whole A strips) × column groups (whole B strips).
    // A task packs its rows of A and its columns of B, so each A row is
    // packed once per column group and each B column once per row group:
    // of the splits giving about `target` tasks, the one packing least.
    let target = TASKS_PER_THREAD * rayon::current_num_threads();
    let (b_strips, a_strips) = (cols.div_ceil(NR), small_c.div_ceil(kernel.mr()));
    let (row_groups, col_groups) = (1..=a_strips.min(target))
        .map(|r| (r, target.div_ceil(r).min(b_strips)))
        .min_by_key(|&(r, c)| c * small_c + r * cols)
        .unwrap_or((1, 1));
    let (a_per, b_per) = (a_strips.div_ceil(row_groups), b_strips.div_ceil(col_groups));
    let (row_groups, col_groups) = (a_strips.div_ceil(a_per), b_strips.div_ceil(b_per));
    let block_rows = (KC / win.small_w).clamp(1, win.small_h);
    let blocks: Vec<(Range<usize>, Range<usize>, Vec<f32>)> = (0..row_groups * col_groups)
        .into_par_iter()
        .map(|t| {
            let (rg, cg) = (t / col_groups, t % col_groups);
            let r = rg * a_per * kernel.mr()..((rg + 1) * a_per * kernel.mr()).min(small_c);
            let c = cg * b_per * NR..((cg + 1) * b_per * NR).min(cols);
            let (m, w) = (r.len(), c.len());
            let mut acc = vec![0.0; m * w];
            let max_depth = block_rows * win.small_w;
            let mut a_buf = scratch::take(packed_a_len(kernel, m, max_depth));
            let mut b_buf = scratch::take(packed_len(w, NR, max_depth));
            let mut lanes = scratch::take(NR * win.small_w);
            for n in 0..n_img {
                let small_n = &small[(n * small_c + r.start) * p_len..][..m * p_len];
                let big_n = &big[n * big_c * big_plane..][..big_c * big_plane];
                for i0 in (0..win.small_h).step_by(block_rows) {
                    let i_rows = i0..(i0 + block_rows).min(win.small_h);
                    let (p0, depth) = (i0 * win.small_w, i_rows.len() * win.small_w);
                    let a = &mut a_buf[..packed_a_len(kernel, m, depth)];
                    pack_a(kernel, m, depth, &small_n[p0..], p_len, a);
                    let b = &mut b_buf[..packed_len(w, NR, depth)];
                    taps.pack(big_n, c.clone(), i_rows, &mut lanes, b);
                    gemm(kernel, m, w, depth, a, b, &mut acc, w);
                }
            }
            [a_buf, b_buf, lanes].into_iter().for_each(scratch::give);
            (r, c, acc)
        })
        .collect();
    for (r, c, acc) in blocks {
        for (i, row) in r.zip(acc.chunks_exact(c.len())) {
            dw[i * cols..][c.clone()].copy_from_slice(row);
        }
    }
}

/// How `weight_grad` gathers the big plane's taps: column `(bc, ky, kx)` of
/// B at small position `(i, j)` is `big[bc, i·s + ky − p, j·s + kx − p]`.
struct Taps<'w> {
    win: &'w Window,
    /// Small rows / columns whose tap lies inside the big plane, per ky / kx.
    rows: Vec<Range<usize>>,
    cols: Vec<Range<usize>>,
    big_c: usize,
}

impl<'w> Taps<'w> {
    fn new(win: &'w Window, big_c: usize) -> Self {
        // `valid_range` may start past the plane when the padding exceeds it.
        let clamp = |r: Range<usize>, len: usize| r.start.min(len)..r.end.min(len);
        Taps {
            win,
            rows: (0..win.kh)
                .map(|ky| clamp(win.rows(ky), win.small_h))
                .collect(),
            cols: (0..win.kw)
                .map(|kx| clamp(win.cols(kx), win.small_w))
                .collect(),
            big_c,
        }
    }

    /// Packs columns `cols` of B on the small rows `i_rows` of one image
    /// (`big_n` `[big_c, big plane]`) into `out`: strip `s` (columns
    /// `cols.start + s·NR …`, zero past `cols.end`) holds position `q` of the
    /// rows, lane `l` at `q·NR + l`. Each small row is first gathered lane
    /// by lane into `lanes` (`NR` rows of `small_w`, contiguous runs) and
    /// then interleaved, so that every element of `out` is written once, by
    /// whole `NR`-float rows.
    fn pack(
        &self,
        big_n: &[f32],
        cols: Range<usize>,
        i_rows: Range<usize>,
        lanes: &mut [f32],
        out: &mut [f32],
    ) {
        let win = self.win;
        let (sw, k_len, big_plane) = (win.small_w, win.kernel_len(), win.big_len());
        let depth = i_rows.len() * sw;
        if depth == 0 {
            return;
        }
        debug_assert!(cols.end <= self.big_c * k_len);
        let lanes = &mut lanes[..NR * sw];
        for (s, strip) in out.chunks_exact_mut(depth * NR).enumerate() {
            let col0 = cols.start + s * NR;
            for (q_row, i) in i_rows.clone().enumerate() {
                for (l, dst) in lanes.chunks_exact_mut(sw).enumerate() {
                    let col = col0 + l;
                    if col >= cols.end {
                        dst.fill(0.0);
                        continue;
                    }
                    let (bc, tap) = (col / k_len, col % k_len);
                    let (ky, kx) = (tap / win.kw, tap % win.kw);
                    let js = self.cols[kx].clone();
                    if !self.rows[ky].contains(&i) || js.is_empty() {
                        dst.fill(0.0);
                        continue;
                    }
                    let by = i * win.stride_h + ky - win.pad_h;
                    let row = &big_n[bc * big_plane + by * win.big_w..][..win.big_w];
                    let bx0 = js.start * win.stride_w + kx - win.pad_w;
                    dst[..js.start].fill(0.0);
                    dst[js.end..].fill(0.0);
                    let d = &mut dst[js];
                    if win.stride_w == 1 {
                        d.copy_from_slice(&row[bx0..][..d.len()]);
                    } else {
                        let src = &row[bx0..=bx0 + (d.len() - 1) * win.stride_w];
                        for (t, d) in d.iter_mut().enumerate() {
                            *d = src[t * win.stride_w];
                        }
                    }
                }
                let rows: [&[f32]; NR] = std::array::from_fn(|l| &lanes[l * sw..][..sw]);
                interleave(&rows, sw, NR, &mut strip[q_row * sw * NR..][..sw * NR]);
            }
        }
    }
}

fn check_stride(op: &'static str, stride_h: usize, stride_w: usize) -> Result<()> {
    if stride_h == 0 || stride_w == 0 {
        return Err(Error::shape(op, "stride must be at least 1"));
    }
    Ok(())
}

/// The slice lengths of a conv2d forward on `g` (stride, `x`, `w`, `b`, `y`).
fn check_conv2d(
    op: &'static str,
    g: &Conv2dGeom,
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    y: &[f32],
) -> Result<()> {
    check_stride(op, g.stride_h, g.stride_w)?;
    check_len(op, "x", x.len(), numel(op, &[g.n, g.c_in, g.h, g.w])?)?;
    check_len(op, "w", w.len(), numel(op, &[g.c_out, g.c_in, g.kh, g.kw])?)?;
    if let Some(b) = b {
        check_len(op, "b", b.len(), g.c_out)?;
    }
    check_len(op, "y", y.len(), numel(op, &[g.n, g.c_out, g.oh, g.ow])?)
}

/// The slice lengths of a transposed conv2d forward on `g`.
fn check_conv_transpose2d(
    op: &'static str,
    g: &ConvTranspose2dGeom,
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    y: &[f32],
) -> Result<()> {
    check_stride(op, g.stride_h, g.stride_w)?;
    check_len(op, "x", x.len(), numel(op, &[g.n, g.c_in, g.h, g.w])?)?;
    check_len(op, "w", w.len(), numel(op, &[g.c_in, g.c_out, g.kh, g.kw])?)?;
    if let Some(b) = b {
        check_len(op, "b", b.len(), g.c_out)?;
    }
    check_len(op, "y", y.len(), numel(op, &[g.n, g.c_out, g.oh, g.ow])?)
}

/// Conv2d forward: `y[n, co] = b[co] + Σ_ci x[n, ci] ⋆ w[co, ci]` (cross-correlation
/// with stride and zero padding, as PyTorch's `Conv2d`). The fast path, an
/// implicit GEMM; its specification is [`reference::conv2d`], which it
/// equals bit for bit on the exact GEMM path and within rounding on the FMA
/// paths (module docs; unit-tested).
///
/// Shapes: `x` `[n, c_in, h, w]`, `w` `[c_out, c_in, kh, kw]`, `b` `[c_out]`,
/// `y` `[n, c_out, oh, ow]` (overwritten).
pub fn conv2d_forward(
    g: &Conv2dGeom,
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    y: &mut [f32],
) -> Result<()> {
    conv2d_forward_with(gemm::selected()?, g, x, w, b, y)
}

/// [`conv2d_forward`] on the GEMM `kernel`.
fn conv2d_forward_with(
    kernel: Kernel,
    g: &Conv2dGeom,
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    y: &mut [f32],
) -> Result<()> {
    check_conv2d("conv2d_forward", g, x, w, b, y)?;
    GemmConv::correlate(kernel, &Window::conv(g), g.n, g.c_in, g.c_out, w, b).run(x, y);
    Ok(())
}

/// Conv2d backward: from `dy` `[n, c_out, oh, ow]`, overwrites `dx`
/// `[n, c_in, h, w]`, `dw` `[c_out, c_in, kh, kw]` and, if given, `db` `[c_out]`.
pub fn conv2d_backward(
    g: &Conv2dGeom,
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    dx: &mut [f32],
    dw: &mut [f32],
    db: Option<&mut [f32]>,
) -> Result<()> {
    conv2d_backward_with(gemm::selected()?, g, x, w, dy, dx, dw, db)
}

/// [`conv2d_backward`] on the GEMM `kernel`.
#[allow(clippy::too_many_arguments)]
fn conv2d_backward_with(
    kernel: Kernel,
    g: &Conv2dGeom,
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    dx: &mut [f32],
    dw: &mut [f32],
    db: Option<&mut [f32]>,
) -> Result<()> {
    const OP: &str = "conv2d_backward";
    check_stride(OP, g.stride_h, g.stride_w)?;
    let x_len = numel(OP, &[g.n, g.c_in, g.h, g.w])?;
    let w_len = numel(OP, &[g.c_out, g.c_in, g.kh, g.kw])?;
    check_len(OP, "x", x.len(), x_len)?;
    check_len(OP, "w", w.len(), w_len)?;
    check_len(OP, "dy", dy.len(), numel(OP, &[g.n, g.c_out, g.oh, g.ow])?)?;
    check_len(OP, "dx", dx.len(), x_len)?;
    check_len(OP, "dw", dw.len(), w_len)?;
    if let Some(db) = &db {
        check_len(OP, "db", db.len(), g.c_out)?;
    }

    let win = Window::conv(g);
    let y_plane = win.small_len();

    // dx[n, ci] = Σ_co dy[n, co] scattered through w[co, ci]: a transposed conv.
    GemmConv::scatter(kernel, &win, g.n, g.c_out, g.c_in, w, None).run(dy, dx);

    // dw[co, (ci, ky, kx)] = Σ_n Σ_p dy[n, co, p] · x[n, ci, tap(p, ky, kx)].
    weight_grad(kernel, &win, g.n, g.c_out, g.c_in, dy, x, dw);

    if let Some(db) = db {
        bias_grad(g.n, g.c_out, y_plane, dy, db);
    }
    Ok(())
}

/// `db[c] = Σ_{n, i} dy[n, c, i]` for `dy` `[n, c, plane]`.
fn bias_grad(n: usize, c: usize, plane: usize, dy: &[f32], db: &mut [f32]) {
    db.par_iter_mut().enumerate().for_each(|(co, d)| {
        *d = (0..n)
            .map(|ni| dy[(ni * c + co) * plane..][..plane].iter().sum::<f32>())
            .sum();
    });
}

/// Transposed conv2d forward (PyTorch's `ConvTranspose2d`, the gradient of a
/// conv2d with respect to its input): `y[n, co] = b[co] + Σ_ci x[n, ci]`
/// scattered through `w[ci, co]`. The fast path, an implicit GEMM per
/// output phase; its specification is [`reference::conv_transpose2d`],
/// which it equals bit for bit on the exact GEMM path and within rounding
/// on the FMA paths (module docs; unit-tested).
///
/// Shapes: `x` `[n, c_in, h, w]`, `w` `[c_in, c_out, kh, kw]`, `b` `[c_out]`,
/// `y` `[n, c_out, oh, ow]` (overwritten).
pub fn conv_transpose2d_forward(
    g: &ConvTranspose2dGeom,
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    y: &mut [f32],
) -> Result<()> {
    conv_transpose2d_forward_with(gemm::selected()?, g, x, w, b, y)
}

/// [`conv_transpose2d_forward`] on the GEMM `kernel`.
fn conv_transpose2d_forward_with(
    kernel: Kernel,
    g: &ConvTranspose2dGeom,
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    y: &mut [f32],
) -> Result<()> {
    check_conv_transpose2d("conv_transpose2d_forward", g, x, w, b, y)?;
    let win = Window::transposed(g);
    GemmConv::scatter(kernel, &win, g.n, g.c_in, g.c_out, w, b).run(x, y);
    Ok(())
}

/// Transposed conv2d backward: from `dy` `[n, c_out, oh, ow]`, overwrites `dx`
/// `[n, c_in, h, w]`, `dw` `[c_in, c_out, kh, kw]` and, if given, `db` `[c_out]`.
pub fn conv_transpose2d_backward(
    g: &ConvTranspose2dGeom,
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    dx: &mut [f32],
    dw: &mut [f32],
    db: Option<&mut [f32]>,
) -> Result<()> {
    conv_transpose2d_backward_with(gemm::selected()?, g, x, w, dy, dx, dw, db)
}

/// [`conv_transpose2d_backward`] on the GEMM `kernel`.
#[allow(clippy::too_many_arguments)]
fn conv_transpose2d_backward_with(
    kernel: Kernel,
    g: &ConvTranspose2dGeom,
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    dx: &mut [f32],
    dw: &mut [f32],
    db: Option<&mut [f32]>,
) -> Result<()> {
    const OP: &str = "conv_transpose2d_backward";
    check_stride(OP, g.stride_h, g.stride_w)?;
    let x_len = numel(OP, &[g.n, g.c_in, g.h, g.w])?;
    let w_len = numel(OP, &[g.c_in, g.c_out, g.kh, g.kw])?;
    check_len(OP, "x", x.len(), x_len)?;
    check_len(OP, "w", w.len(), w_len)?;
    check_len(OP, "dy", dy.len(), numel(OP, &[g.n, g.c_out, g.oh, g.ow])?)?;
    check_len(OP, "dx", dx.len(), x_len)?;
    check_len(OP, "dw", dw.len(), w_len)?;
    if let Some(db) = &db {
        check_len(OP, "db", db.len(), g.c_out)?;
    }

    let win = Window::transposed(g);
    let y_plane = win.big_len();

    // dx[n, ci] = Σ_co dy[n, co] ⋆ w[ci, co]: an ordinary strided convolution.
    GemmConv::correlate(kernel, &win, g.n, g.c_out, g.c_in, w, None).run(dy, dx);

    // dw[ci, (co, ky, kx)] = Σ_n Σ_p x[n, ci, p] · dy[n, co, tap(p, ky, kx)].
    weight_grad(kernel, &win, g.n, g.c_in, g.c_out, x, dy, dw);

    if let Some(db) = db {
        bias_grad(g.n, g.c_out, y_plane, dy, db);
    }
    Ok(())
}

/// The specification of conv2d and conv_transpose2d: the plain loop nest the
/// GEMM path replaced, readable and slow.
///
/// Rayon over output planes, one pair of (input, output) planes at a time,
/// the innermost loop along a row, taps in the zero padding skipped. Each
/// output starts from its bias and adds its products in the order input
/// channel, ky, kx, one multiply and one add at a time. The fast path
/// ([`conv2d_forward`], [`conv_transpose2d_forward`], and the input
/// gradients of the backward functions) sums the same products in the same
/// order, and the unit tests of this module check that it equals this loop
/// nest bit for bit on the exact GEMM path (within the summation bound on
/// the FMA paths) on random shapes and on shapes past its blocking edges.
pub mod reference {
    use super::{check_conv2d, check_conv_transpose2d, chunk, Window};
    use crate::error::Result;
    use crate::geometry::{Conv2dGeom, ConvTranspose2dGeom};
    use rayon::prelude::*;

    /// Conv2d forward, the specification of [`conv2d_forward`](super::conv2d_forward):
    /// `y[n, co, oy, ox] = b[co] + Σ_{ci, ky, kx} w[co, ci, ky, kx] ·
    /// x[n, ci, oy·sh + ky − ph, ox·sw + kx − pw]` over the taps inside the
    /// input (PyTorch's `Conv2d`, dilation 1, groups 1).
    ///
    /// Shapes: `x` `[n, c_in, h, w]`, `w` `[c_out, c_in, kh, kw]`, `b`
    /// `[c_out]`, `y` `[n, c_out, oh, ow]` (overwritten); a length that does
    /// not match `g` is an [`Error::Shape`](crate::Error::Shape).
    pub fn conv2d(
        g: &Conv2dGeom,
        x: &[f32],
        w: &[f32],
        b: Option<&[f32]>,
        y: &mut [f32],
    ) -> Result<()> {
        check_conv2d("reference::conv2d", g, x, w, b, y)?;
        correlate_planes(&Window::conv(g), g.c_in, g.c_out, x, w, b, y);
        Ok(())
    }

    /// Transposed conv2d forward, the specification of
    /// [`conv_transpose2d_forward`](super::conv_transpose2d_forward): every
    /// input pixel scattered through the kernel,
    /// `y[n, co, iy·sh + ky − ph, ix·sw + kx − pw] += w[ci, co, ky, kx] · x[n, ci, iy, ix]`,
    /// onto outputs that start from `b[co]` (PyTorch's `ConvTranspose2d`,
    /// groups 1).
    ///
    /// Shapes: `x` `[n, c_in, h, w]`, `w` `[c_in, c_out, kh, kw]`, `b`
    /// `[c_out]`, `y` `[n, c_out, oh, ow]` (overwritten); a length that does
    /// not match `g` is an [`Error::Shape`](crate::Error::Shape).
    pub fn conv_transpose2d(
        g: &ConvTranspose2dGeom,
        x: &[f32],
        w: &[f32],
        b: Option<&[f32]>,
        y: &mut [f32],
    ) -> Result<()> {
        check_conv_transpose2d("reference::conv_transpose2d", g, x, w, b, y)?;
        scatter_planes(&Window::transposed(g), g.c_in, g.c_out, x, w, b, y);
        Ok(())
    }

    /// `small[i, j] += Σ K[ky, kx] · big[i·s + ky − p, j·s + kx − p]`.
    fn correlate(win: &Window, big: &[f32], kernel: &[f32], small: &mut [f32]) {
        for ky in 0..win.kh {
            for i in win.rows(ky) {
                let big_row = &big[(i * win.stride_h + ky - win.pad_h) * win.big_w..][..win.big_w];
                let small_row = &mut small[i * win.small_w..][..win.small_w];
                for kx in 0..win.kw {
                    let k = kernel[ky * win.kw + kx];
                    let cols = win.cols(kx);
                    if cols.is_empty() {
                        continue;
                    }
                    let b0 = cols.start * win.stride_w + kx - win.pad_w;
                    let len = cols.len();
                    let out = &mut small_row[cols];
                    if win.stride_w == 1 {
                        for (o, &v) in out.iter_mut().zip(&big_row[b0..b0 + len]) {
                            *o += k * v;
                        }
                    } else {
                        // Indexing a span cut to the exact extent lets the compiler drop the
                        // bounds checks; `step_by` here ran about half as fast.
                        let span = &big_row[b0..=b0 + (len - 1) * win.stride_w];
                        for (t, o) in out.iter_mut().enumerate() {
                            *o += k * span[t * win.stride_w];
                        }
                    }
                }
            }
        }
    }

    /// `big[i·s + ky − p, j·s + kx − p] += K[ky, kx] · small[i, j]`.
    fn scatter(win: &Window, small: &[f32], kernel: &[f32], big: &mut [f32]) {
        for ky in 0..win.kh {
            for i in win.rows(ky) {
                let small_row = &small[i * win.small_w..][..win.small_w];
                let big_row =
                    &mut big[(i * win.stride_h + ky - win.pad_h) * win.big_w..][..win.big_w];
                for kx in 0..win.kw {
                    let k = kernel[ky * win.kw + kx];
                    let cols = win.cols(kx);
                    if cols.is_empty() {
                        continue;
                    }
                    let b0 = cols.start * win.stride_w + kx - win.pad_w;
                    let inp = &small_row[cols];
                    if win.stride_w == 1 {
                        for (o, &v) in big_row[b0..b0 + inp.len()].iter_mut().zip(inp) {
                            *o += k * v;
                        }
                    } else {
                        let span = &mut big_row[b0..=b0 + (inp.len() - 1) * win.stride_w];
                        for (t, &v) in inp.iter().enumerate() {
                            span[t * win.stride_w] += k * v;
                        }
                    }
                }
            }
        }
    }

    /// `small[n, cs] = bias[cs] + Σ_cb big[n, cb] ⋆ w[cs, cb]`.
    pub(super) fn correlate_planes(
        win: &Window,
        c_big: usize,
        c_small: usize,
        big: &[f32],
        w: &[f32],
        bias: Option<&[f32]>,
        small: &mut [f32],
    ) {
        let (b_len, k_len) = (win.big_len(), win.kernel_len());
        small
            .par_chunks_mut(chunk(win.small_len()))
            .enumerate()
            .for_each(|(p, out)| {
                let (img, cs) = (p / c_small, p % c_small);
                out.fill(bias.map_or(0.0, |b| b[cs]));
                for cb in 0..c_big {
                    let inp = &big[(img * c_big + cb) * b_len..][..b_len];
                    correlate(win, inp, &w[(cs * c_big + cb) * k_len..][..k_len], out);
                }
            });
    }

    /// `big[n, cb] = bias[cb] + Σ_cs small[n, cs]` scattered through `w[cs, cb]`.
    pub(super) fn scatter_planes(
        win: &Window,
        c_small: usize,
        c_big: usize,
        small: &[f32],
        w: &[f32],
        bias: Option<&[f32]>,
        big: &mut [f32],
    ) {
        let (s_len, k_len) = (win.small_len(), win.kernel_len());
        big.par_chunks_mut(chunk(win.big_len()))
            .enumerate()
            .for_each(|(p, out)| {
                let (img, cb) = (p / c_big, p % c_big);
                out.fill(bias.map_or(0.0, |b| b[cb]));
                for cs in 0..c_small {
                    let inp = &small[(img * c_small + cs) * s_len..][..s_len];
                    scatter(win, inp, &w[(cs * c_big + cb) * k_len..][..k_len], out);
                }
            });
    }

    /// The weight gradient of conv2d and conv_transpose2d, the specification
    /// of their `dw`: `dw[sc, bc, ky, kx] = Σ_n Σ_{i, j} small[n, sc, i, j] ·
    /// big[n, bc, i·sh + ky − ph, j·sw + kx − pw]` over the taps inside the
    /// big plane, summed image by image, then row by row and column by
    /// column, one multiply and one add at a time. For conv2d the small
    /// plane is `dy` and the big one `x`; for the transposed conv, `x` and
    /// `dy`. The GEMM path sums the same products in the same order (the
    /// unit tests check it bit for bit on the exact GEMM path; test builds
    /// only, as it takes the module's private window type). With `fused`,
    /// each step is one `mul_add` instead: what an FMA GEMM path computes,
    /// bit for bit (a tap in the padding adds an exact zero there).
    #[cfg(test)]
    #[allow(clippy::too_many_arguments)]
    pub(super) fn weight_grad_planes(
        fused: bool,
        win: &Window,
        n_img: usize,
        small_c: usize,
        big_c: usize,
        small: &[f32],
        big: &[f32],
        dw: &mut [f32],
    ) {
        let (p_len, big_plane, k_len) = (win.small_len(), win.big_len(), win.kernel_len());
        dw.par_chunks_mut(k_len.max(1))
            .enumerate()
            .for_each(|(p, dk)| {
                let (sc, bc) = (p / big_c, p % big_c);
                dk.fill(0.0);
                for (tap, d) in dk.iter_mut().enumerate() {
                    let (ky, kx) = (tap / win.kw, tap % win.kw);
                    for n in 0..n_img {
                        let s_plane = &small[(n * small_c + sc) * p_len..][..p_len];
                        let b_plane = &big[(n * big_c + bc) * big_plane..][..big_plane];
                        for i in win.rows(ky) {
                            let by = i * win.stride_h + ky - win.pad_h;
                            for j in win.cols(kx) {
                                let bx = j * win.stride_w + kx - win.pad_w;
                                let (s, b) =
                                    (s_plane[i * win.small_w + j], b_plane[by * win.big_w + bx]);
                                *d = if fused { s.mul_add(b, *d) } else { *d + s * b };
                            }
                        }
                    }
                }
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::geometry::{Conv2dParams, ConvTranspose2dParams};
    use std::time::Instant;

    /// SplitMix64.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        /// Uniform in `lo..=hi`.
        fn int(&mut self, lo: usize, hi: usize) -> usize {
            lo + (self.next() % (hi - lo + 1) as u64) as usize
        }

        /// `len` values uniform in [−1, 1).
        fn data(&mut self, len: usize) -> Vec<f32> {
            (0..len)
                .map(|_| ((self.next() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0)
                .collect()
        }
    }

    /// The exact GEMM sums the same products as the loop nest in the same
    /// order (module docs), so its outputs must be equal, not just close. An
    /// FMA GEMM rounds each step once instead of twice: both it and the loop
    /// nest are within `γ_{terms+1}·mag` of the exact sum (`mag` = |bias| +
    /// Σ|w||x|, the loop nest run on absolute values, itself within a few
    /// ulps), so they may differ by twice that, with 1 % for `mag`'s own
    /// rounding.
    fn assert_close(
        what: &str,
        kernel: Kernel,
        terms: usize,
        got: &[f32],
        want: &[f32],
        mag: &[f32],
    ) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        let exact = kernel.path() == gemm::Path::Exact;
        let ku = (terms + 1) as f64 * f64::from(f32::EPSILON) / 2.0;
        let gamma = ku / (1.0 - ku);
        for (i, ((&g, &w), &m)) in got.iter().zip(want).zip(mag).enumerate() {
            if exact {
                assert!(g == w, "{what}: output {i} is {g}, the loop nest gives {w}");
            } else {
                let bound = 2.02 * gamma * f64::from(m);
                let err = (f64::from(g) - f64::from(w)).abs();
                assert!(
                    err <= bound,
                    "{what}, {kernel:?}: output {i} is {g}, the loop nest gives {w} (bound {bound:e})"
                );
            }
        }
    }

    fn abs(v: &[f32]) -> Vec<f32> {
        v.iter().map(|x| x.abs()).collect()
    }

    /// Conv2d forward and input gradient, both against the loop nest, on
    /// every GEMM kernel this CPU runs.
    fn check_conv(what: &str, rng: &mut Rng, g: &Conv2dGeom) {
        let win = Window::conv(g);
        let x = rng.data(g.n * g.c_in * g.h * g.w);
        let w = rng.data(g.c_out * g.c_in * g.kh * g.kw);
        let b = rng.data(g.c_out);
        let dy = rng.data(g.n * g.c_out * g.oh * g.ow);
        let (ax, aw, ab, ady) = (abs(&x), abs(&w), abs(&b), abs(&dy));
        let taps = g.kh * g.kw;

        let (mut want_y, mut mag_y) = (vec![0.0; dy.len()], vec![0.0; dy.len()]);
        reference::conv2d(g, &x, &w, Some(&b), &mut want_y).unwrap();
        reference::conv2d(g, &ax, &aw, Some(&ab), &mut mag_y).unwrap();
        let (mut want_dx, mut mag_dx) = (vec![0.0; x.len()], vec![0.0; x.len()]);
        reference::scatter_planes(&win, g.c_out, g.c_in, &dy, &w, None, &mut want_dx);
        reference::scatter_planes(&win, g.c_out, g.c_in, &ady, &aw, None, &mut mag_dx);
        let (mut want_dw, mut mag_dw) = (vec![f32::NAN; w.len()], vec![f32::NAN; w.len()]);
        reference::weight_grad_planes(false, &win, g.n, g.c_out, g.c_in, &dy, &x, &mut want_dw);
        reference::weight_grad_planes(false, &win, g.n, g.c_out, g.c_in, &ady, &ax, &mut mag_dw);
        let mut fused_dw = vec![f32::NAN; w.len()];
        reference::weight_grad_planes(true, &win, g.n, g.c_out, g.c_in, &dy, &x, &mut fused_dw);

        for kernel in Kernel::all() {
            let mut got = vec![f32::NAN; dy.len()];
            conv2d_forward_with(kernel, g, &x, &w, Some(&b), &mut got).unwrap();
            let y_terms = g.c_in * taps;
            assert_close(
                &format!("{what}: conv2d forward"),
                kernel,
                y_terms,
                &got,
                &want_y,
                &mag_y,
            );

            let (mut dx, mut dw) = (vec![f32::NAN; x.len()], vec![0.0; w.len()]);
            conv2d_backward_with(kernel, g, &x, &w, &dy, &mut dx, &mut dw, None).unwrap();
            let dx_terms = g.c_out * taps;
            assert_close(
                &format!("{what}: conv2d dx"),
                kernel,
                dx_terms,
                &dx,
                &want_dx,
                &mag_dx,
            );
            let dw_terms = g.n * g.oh * g.ow;
            assert_close(
                &format!("{what}: conv2d dw"),
                kernel,
                dw_terms,
                &dw,
                &want_dw,
                &mag_dw,
            );
            assert_fused(&format!("{what}: conv2d dw"), kernel, &dw, &fused_dw);
        }
    }

    /// On an FMA path the weight gradient is exactly the fused loop nest
    /// (`reference::weight_grad_planes` with `fused`): each element's
    /// chain of fused multiply-adds in the same order, whatever the tasks,
    /// depth blocks and packing.
    fn assert_fused(what: &str, kernel: Kernel, got: &[f32], fused: &[f32]) {
        if kernel.path() == gemm::Path::Exact {
            return;
        }
        for (i, (&g, &f)) in got.iter().zip(fused).enumerate() {
            assert!(
                g.to_bits() == f.to_bits(),
                "{what}, {kernel:?}: output {i} is {g}, the fused loop nest gives {f}"
            );
        }
    }

    /// Transposed conv2d forward and input gradient, both against the loop
    /// nest, on every GEMM kernel this CPU runs.
    fn check_transposed(what: &str, rng: &mut Rng, g: &ConvTranspose2dGeom) {
        let win = Window::transposed(g);
        let x = rng.data(g.n * g.c_in * g.h * g.w);
        let w = rng.data(g.c_in * g.c_out * g.kh * g.kw);
        let b = rng.data(g.c_out);
        let dy = rng.data(g.n * g.c_out * g.oh * g.ow);
        let (ax, aw, ab, ady) = (abs(&x), abs(&w), abs(&b), abs(&dy));
        let taps = g.kh * g.kw;

        let (mut want_y, mut mag_y) = (vec![0.0; dy.len()], vec![0.0; dy.len()]);
        reference::conv_transpose2d(g, &x, &w, Some(&b), &mut want_y).unwrap();
        reference::conv_transpose2d(g, &ax, &aw, Some(&ab), &mut mag_y).unwrap();
        let (mut want_dx, mut mag_dx) = (vec![0.0; x.len()], vec![0.0; x.len()]);
        reference::correlate_planes(&win, g.c_out, g.c_in, &dy, &w, None, &mut want_dx);
        reference::correlate_planes(&win, g.c_out, g.c_in, &ady, &aw, None, &mut mag_dx);
        let (mut want_dw, mut mag_dw) = (vec![f32::NAN; w.len()], vec![f32::NAN; w.len()]);
        reference::weight_grad_planes(false, &win, g.n, g.c_in, g.c_out, &x, &dy, &mut want_dw);
        reference::weight_grad_planes(false, &win, g.n, g.c_in, g.c_out, &ax, &ady, &mut mag_dw);
        let mut fused_dw = vec![f32::NAN; w.len()];
        reference::weight_grad_planes(true, &win, g.n, g.c_in, g.c_out, &x, &dy, &mut fused_dw);

        for kernel in Kernel::all() {
            let mut got = vec![f32::NAN; dy.len()];
            conv_transpose2d_forward_with(kernel, g, &x, &w, Some(&b), &mut got).unwrap();
            let y_terms = g.c_in * taps;
            let at = format!("{what}: conv_transpose2d forward");
            assert_close(&at, kernel, y_terms, &got, &want_y, &mag_y);

            let (mut dx, mut dw) = (vec![f32::NAN; x.len()], vec![0.0; w.len()]);
            conv_transpose2d_backward_with(kernel, g, &x, &w, &dy, &mut dx, &mut dw, None).unwrap();
            let dx_terms = g.c_out * taps;
            let at = format!("{what}: conv_transpose2d dx");
            assert_close(&at, kernel, dx_terms, &dx, &want_dx, &mag_dx);
            let dw_terms = g.n * g.h * g.w;
            let at = format!("{what}: conv_transpose2d dw");
            assert_close(&at, kernel, dw_terms, &dw, &want_dw, &mag_dw);
            assert_fused(&at, kernel, &dw, &fused_dw);
        }
    }

    /// Random shapes: kernels 1–7, strides 1–3 (each axis), any padding,
    /// planes from 1×1 to 40×40, odd channel counts; seeds in the messages.
    #[test]
    fn gemm_path_equals_the_loop_nest_on_random_shapes() {
        for seed in 0..300u64 {
            let mut rng = Rng(seed);
            let (kh, kw) = (rng.int(1, 7), rng.int(1, 7));
            let (sh, sw) = (rng.int(1, 3), rng.int(1, 3));
            let (ph, pw) = (rng.int(0, kh), rng.int(0, kw));
            let big = rng.int(0, 3) == 0;
            let (h, w) = if big {
                (rng.int(20, 40), rng.int(20, 40))
            } else {
                (rng.int(1, 12), rng.int(1, 12))
            };
            let (n, c_in, c_out) = (rng.int(1, 3), rng.int(1, 9), rng.int(1, 13));

            let p = Conv2dParams {
                stride: (sh, sw),
                padding: (ph, pw),
            };
            if let Ok(g) = Conv2dGeom::new(&[n, c_in, h, w], &[c_out, c_in, kh, kw], p) {
                check_conv(&format!("seed {seed}, {g:?}"), &mut rng, &g);
            }
            let p = ConvTranspose2dParams {
                stride: (sh, sw),
                padding: (ph, pw),
                output_padding: (rng.int(0, sh - 1), rng.int(0, sw - 1)),
            };
            if let Ok(g) = ConvTranspose2dGeom::new(&[n, c_in, h, w], &[c_in, c_out, kh, kw], p) {
                check_transposed(&format!("seed {seed}, {g:?}"), &mut rng, &g);
            }
        }
    }

    /// Shapes past the blocking edges: several tiles per task, GEMM depth
    /// beyond one cache block (a compact C tile) and within one (C computed
    /// in the output), images grouped into tasks (small planes) and split
    /// into row blocks (a large plane), 1×1 convs, no input channels, convs
    /// reading no padding (their input gathered in place).
    #[test]
    fn gemm_path_equals_the_loop_nest_past_the_block_edges() {
        let convs: [([usize; 4], [usize; 4], usize, usize); 10] = [
            ([3, 40, 21, 23], [13, 40, 3, 3], 1, 1),
            // Depth ≤ KC, computed in place: images grouped into tasks, strips
            // spanning several 5-wide rows, whole MR×NR blocks.
            ([37, 12, 5, 5], [16, 12, 3, 3], 1, 1),
            ([2, 40, 21, 23], [9, 40, 3, 3], 2, 1),
            ([37, 30, 4, 4], [10, 30, 3, 3], 1, 1),
            ([1, 8, 64, 64], [9, 8, 4, 4], 2, 1),
            ([2, 33, 17, 19], [7, 33, 1, 1], 1, 0),
            ([1, 3, 70, 70], [5, 3, 7, 7], 2, 3),
            ([2, 0, 5, 6], [3, 0, 3, 3], 1, 1),
            // No padding read: gathered from the input in place, images in row
            // blocks (1×1, and a 3×3 "valid" conv).
            ([1, 5, 70, 66], [6, 5, 1, 1], 1, 0),
            ([2, 4, 50, 61], [5, 4, 3, 3], 1, 0),
        ];
        for (seed, &(xs, ws, s, p)) in convs.iter().enumerate() {
            let mut rng = Rng(1000 + seed as u64);
            let g = Conv2dGeom::new(&xs, &ws, Conv2dParams::new(s, p)).unwrap();
            check_conv(&format!("seed {}, {g:?}", 1000 + seed), &mut rng, &g);
        }
        let transposed: [([usize; 4], [usize; 4], usize, usize); 4] = [
            ([2, 40, 20, 20], [40, 11, 4, 4], 2, 1),
            ([29, 30, 4, 4], [30, 10, 3, 3], 1, 1),
            ([1, 8, 33, 31], [8, 9, 3, 3], 3, 0),
            ([2, 0, 5, 6], [0, 3, 3, 3], 2, 1),
        ];
        for (seed, &(xs, ws, s, p)) in transposed.iter().enumerate() {
            let mut rng = Rng(2000 + seed as u64);
            let g = ConvTranspose2dGeom::new(&xs, &ws, ConvTranspose2dParams::new(s, p)).unwrap();
            check_transposed(&format!("seed {}, {g:?}", 2000 + seed), &mut rng, &g);
        }
    }

    /// GFLOP/s of the loop nest and of the GEMM path on the models' shapes
    /// (those of `benches/ops.rs` and the CP2Image generator's 256 → 128
    /// convs). Run in release: `cargo test --release --lib cpu::conv --
    /// --ignored --nocapture`.
    #[test]
    #[ignore = "timing; run in release with --nocapture"]
    fn throughput_against_the_loop_nest() {
        /// (label, x shape, weight shape, stride, padding)
        type ConvCase = (&'static str, [usize; 4], [usize; 4], usize, usize);
        let convs: &[ConvCase] = &[
            ("vqvae_enc0_4x4s2", [8, 1, 160, 160], [64, 1, 4, 4], 2, 1),
            ("vqvae_3x3_128", [8, 128, 40, 40], [128, 128, 3, 3], 1, 1),
            ("vqvae_res1x1", [8, 32, 40, 40], [128, 32, 1, 1], 1, 0),
            (
                "densenet_conv0_7x7s2",
                [4, 3, 224, 224],
                [64, 3, 7, 7],
                2,
                3,
            ),
            (
                "densenet_3x3_128to32",
                [8, 128, 56, 56],
                [32, 128, 3, 3],
                1,
                1,
            ),
            (
                "densenet_1x1_256to128",
                [8, 256, 28, 28],
                [128, 256, 1, 1],
                1,
                0,
            ),
            (
                "cp2image_3x3_64to32",
                [64, 64, 16, 16],
                [32, 64, 3, 3],
                1,
                1,
            ),
            (
                "cp2image_256to128_4x4",
                [256, 256, 4, 4],
                [128, 256, 3, 3],
                1,
                1,
            ),
            (
                "cp2image_256to128_8x8",
                [256, 256, 8, 8],
                [128, 256, 3, 3],
                1,
                1,
            ),
            (
                "cp2image_256to128_16x16 (n 64)",
                [64, 256, 16, 16],
                [128, 256, 3, 3],
                1,
                1,
            ),
            (
                "cp2image_256to128_32x32 (n 16)",
                [16, 256, 32, 32],
                [128, 256, 3, 3],
                1,
                1,
            ),
            (
                "vqvae_3x3_128 (n 1)",
                [1, 128, 40, 40],
                [128, 128, 3, 3],
                1,
                1,
            ),
            (
                "cp2image_gen_128to64_8x8",
                [256, 128, 8, 8],
                [64, 128, 3, 3],
                1,
                1,
            ),
            (
                "cp2image_gen_64to32_16x16",
                [256, 64, 16, 16],
                [32, 64, 3, 3],
                1,
                1,
            ),
            (
                "cp2image_gen_32to16_32x32",
                [256, 32, 32, 32],
                [16, 32, 3, 3],
                1,
                1,
            ),
            (
                "cp2image_gen_out_16to3_64x64",
                [256, 16, 64, 64],
                [3, 16, 3, 3],
                1,
                1,
            ),
        ];
        /// Best of three runs after a warm-up, in seconds.
        fn best(mut f: impl FnMut()) -> f64 {
            f();
            (0..3)
                .map(|_| {
                    let t = Instant::now();
                    f();
                    t.elapsed().as_secs_f64()
                })
                .fold(f64::INFINITY, f64::min)
        }
        let report = |label: &str, flops: f64, naive: f64, gemm: f64| {
            println!(
                "{label:32} loop nest {:6.1} GFLOP/s   gemm {:6.1} GFLOP/s   ×{:.1}",
                flops / naive / 1e9,
                flops / gemm / 1e9,
                naive / gemm
            );
        };
        let mut rng = Rng(7);
        for &(label, xs, ws, s, p) in convs {
            let g = Conv2dGeom::new(&xs, &ws, Conv2dParams::new(s, p)).unwrap();
            let win = Window::conv(&g);
            let (x, w, b) = (
                rng.data(xs.iter().product()),
                rng.data(ws.iter().product()),
                rng.data(ws[0]),
            );
            let mut y = vec![0.0; g.out_shape().iter().product()];
            let naive = best(|| {
                reference::correlate_planes(&win, g.c_in, g.c_out, &x, &w, Some(&b), &mut y)
            });
            let gemm = best(|| conv2d_forward(&g, &x, &w, Some(&b), &mut y).unwrap());
            report(label, g.flops(), naive, gemm);
        }
        let g = ConvTranspose2dGeom::new(
            &[8, 64, 20, 20],
            &[64, 64, 4, 4],
            ConvTranspose2dParams::new(2, 1),
        )
        .unwrap();
        let win = Window::transposed(&g);
        let (x, w) = (rng.data(8 * 64 * 20 * 20), rng.data(64 * 64 * 16));
        let mut y = vec![0.0; g.out_shape().iter().product()];
        let naive = best(|| reference::scatter_planes(&win, g.c_in, g.c_out, &x, &w, None, &mut y));
        let gemm = best(|| conv_transpose2d_forward(&g, &x, &w, None, &mut y).unwrap());
        report("conv_transpose_4x4s2_64", g.flops(), naive, gemm);
    }
}
