//! Vector quantization (VQ-VAE-2's `Quantize`: nearest-code lookup) and
//! code-frequency histograms. Kernels: `kernels/vq.cu`; CPU reference:
//! `crate::cpu::vq`. Codes, quantized vectors and squared errors are bitwise
//! equal on every device (both sides sum in the same order with fused
//! multiply-adds).

use super::{expect_shape, on_device};
use crate::backend::{Backend, KernelArg, LaunchCfg};
use crate::cpu;
use crate::device::Device;
use crate::error::{Error, Result};
use crate::tensor::{check_device, Tensor};

/// Positions per block of `vq_lookup_f32` (`kVqThreads` in the kernel).
const LOOKUP_THREADS: usize = 128;
/// Codes per shared-memory tile of the lookup (`kVqTile` in the kernel).
const LOOKUP_TILE: usize = 32;
/// Channels per shared-memory tile of the lookup: a 32 × 128 tile is 16 KiB.
const LOOKUP_MAX_CHANNELS: usize = 128;
/// Threads per block of `code_histogram_i32`.
const HIST_THREADS: usize = 256;
/// Codes each histogram thread counts per (row, chunk), so that a block's
/// flush of the bins is amortized over enough codes.
const HIST_PER_THREAD: usize = 16;
/// Grid cap of the histogram (grid-stride over (row, chunk) pairs).
const HIST_MAX_BLOCKS: usize = 65535;
/// Shared memory every device offers a kernel without opting in.
const SHARED_LIMIT: usize = 48 * 1024;

/// A 64-bit kernel argument, or an error naming the size.
fn i64_arg(what: &str, v: usize) -> Result<KernelArg> {
    i64::try_from(v).map(KernelArg::I64).map_err(|_| {
        Error::invalid(format!(
            "{what} = {v} does not fit a 64-bit kernel argument"
        ))
    })
}

/// A VQ codebook on a device: `embed` `[dim, n_embed]` (column `k` is code
/// `e_k`, vq-vae-2-pytorch's layout) and the squared norms `||e_k||²`
/// computed once when it is built.
#[derive(Debug)]
pub struct Codebook {
    embed: Tensor,
    norms: Tensor,
}

impl Codebook {
    /// Takes `embed` `[dim, n_embed]` (on `be`'s device) and computes the
    /// code norms there.
    pub fn new(be: &Backend, embed: Tensor) -> Result<Self> {
        const OP: &str = "vq_codebook";
        check_device(OP, be, &embed)?;
        let (d, k) = match embed.shape() {
            &[d, k] if d > 0 && k > 0 => (d, k),
            s => {
                return Err(Error::shape(
                    OP,
                    format!("a codebook is [dim, n_embed] with both at least 1, got {s:?}"),
                ))
            }
        };
        let mut norms = Tensor::zeros(be, &[k])?;
        if be.device() == Device::Cpu {
            cpu::vq_code_norms(d, k, embed.host_for(OP)?, norms.host_mut_for(OP)?)?;
        } else {
            let args = [
                embed.arg(),
                KernelArg::int("codebook dim", d)?,
                KernelArg::int("codebook size", k)?,
                norms.arg_mut(),
            ];
            // SAFETY: embed holds d·k f32 and norms k f32 on be's device
            // (checked above / allocated there), both outlive the launch;
            // vq_code_norms_f32(const float*, int d, int k, float*) reads
            // embed[c·k + j] and writes norms[j] for j < k only.
            unsafe { be.launch("vq_code_norms_f32", LaunchCfg::linear(k, 128)?, &args)? };
        }
        Ok(Codebook { embed, norms })
    }

    /// The embedding dimension `d` (channels of the features quantized).
    pub fn dim(&self) -> usize {
        self.embed.shape()[0]
    }

    /// The number of codes `K`.
    pub fn n_embed(&self) -> usize {
        self.embed.shape()[1]
    }

    /// The codes `[dim, n_embed]`.
    pub fn embed(&self) -> &Tensor {
        &self.embed
    }

    /// `||e_k||²` `[n_embed]`.
    pub fn norms(&self) -> &Tensor {
        &self.norms
    }
}

/// The outputs of [`vq_lookup`].
#[derive(Debug)]
pub struct VqOutput {
    /// The nearest code per position `[n, h, w]`.
    pub ids: Tensor<i32>,
    /// The code vectors `[n, d, h, w]` (`e_{ids}` at each position).
    pub quant: Tensor,
    /// `||x − e_{ids}||²` per position `[n, h, w]`, summed directly.
    pub err: Tensor,
}

/// Where [`vq_lookup_into`] writes: the codes always, the quantized vectors
/// and the squared errors when given (a caller that needs only codes saves
/// the `[n, d, h, w]` write).
#[derive(Debug)]
pub struct VqOut<'a> {
    /// Codes `[n, h, w]`.
    pub ids: &'a mut Tensor<i32>,
    /// Quantized vectors `[n, d, h, w]`, or `None`.
    pub quant: Option<&'a mut Tensor>,
    /// Squared errors `[n, h, w]`, or `None`.
    pub err: Option<&'a mut Tensor>,
}

/// Shapes of a lookup of `x` `[n, d, spatial…]`: (n, hw, ids/err shape).
fn lookup_shapes(
    op: &'static str,
    x: &Tensor,
    cb: &Codebook,
) -> Result<(usize, usize, Vec<usize>)> {
    let (n, d, spatial) = match x.shape() {
        [n, d, spatial @ ..] => (*n, *d, spatial),
        s => {
            return Err(Error::shape(
                op,
                format!("input must be [n, dim, …] (channels = embedding dim), got {s:?}"),
            ))
        }
    };
    if d != cb.dim() {
        return Err(Error::shape(
            op,
            format!(
                "input {:?} has {d} channels but the codebook {:?} has dim {}",
                x.shape(),
                cb.embed.shape(),
                cb.dim()
            ),
        ));
    }
    let hw = spatial.iter().product();
    let mut pos_shape = vec![n];
    pos_shape.extend_from_slice(spatial);
    Ok((n, hw, pos_shape))
}

/// Checks devices and shapes of a lookup's outputs; returns (n, hw).
fn check_lookup(
    op: &'static str,
    be: &Backend,
    x: &Tensor,
    cb: &Codebook,
    out: &VqOut,
) -> Result<(usize, usize)> {
    on_device(op, be, &[x, &cb.embed, &cb.norms])?;
    let (n, hw, pos_shape) = lookup_shapes(op, x, cb)?;
    check_device(op, be, out.ids)?;
    expect_shape(op, "ids", out.ids, &pos_shape)?;
    if let Some(q) = &out.quant {
        check_device(op, be, q)?;
        expect_shape(op, "quant", q, x.shape())?;
    }
    if let Some(e) = &out.err {
        check_device(op, be, e)?;
        expect_shape(op, "err", e, &pos_shape)?;
    }
    Ok((n, hw))
}

/// Nearest-code lookup (vq-vae-2-pytorch's `Quantize.forward` at inference):
/// for every position of `x` `[n, d, h, w]` the code
/// `argmin_k ||x − e_k||²`, computed as `(||x||² − 2 x·e_k) + ||e_k||²` with
/// ties to the lowest `k`; its vector; and the squared error.
pub fn vq_lookup(be: &Backend, x: &Tensor, cb: &Codebook) -> Result<VqOutput> {
    let (_, _, pos_shape) = lookup_shapes("vq_lookup", x, cb)?;
    let mut ids = Tensor::zeros(be, &pos_shape)?;
    let mut quant = Tensor::zeros(be, x.shape())?;
    let mut err = Tensor::zeros(be, &pos_shape)?;
    vq_lookup_into(
        be,
        x,
        cb,
        VqOut {
            ids: &mut ids,
            quant: Some(&mut quant),
            err: Some(&mut err),
        },
    )?;
    Ok(VqOutput { ids, quant, err })
}

/// [`vq_lookup`] into preallocated outputs.
pub fn vq_lookup_into(be: &Backend, x: &Tensor, cb: &Codebook, out: VqOut) -> Result<()> {
    const OP: &str = "vq_lookup";
    let (n, hw) = check_lookup(OP, be, x, cb, &out)?;
    if be.device() == Device::Cpu {
        return lookup_cpu(OP, n, hw, x, cb, out);
    }
    launch_lookup(be, x, cb, n, hw, out, None)
}

/// [`vq_lookup_into`] fused with [`code_histogram_accumulate`]: the codes
/// are also counted into `hist` `[segments, n_embed]` (ADDED to it), row `s`
/// of `x` (an image or patch) counting into segment `s` when `row_offsets`
/// is `None`, else segment `j` owning rows `row_offsets[j]..row_offsets[j + 1]`.
pub fn vq_lookup_hist_into(
    be: &Backend,
    x: &Tensor,
    cb: &Codebook,
    out: VqOut,
    row_offsets: Option<&[usize]>,
    hist: &mut Tensor<i32>,
) -> Result<()> {
    const OP: &str = "vq_lookup_hist";
    let (n, hw) = check_lookup(OP, be, x, cb, &out)?;
    let offsets = segment_offsets(OP, n, row_offsets)?;
    check_device(OP, be, hist)?;
    expect_shape(OP, "hist", hist, &[offsets.len() - 1, cb.n_embed()])?;
    if be.device() == Device::Cpu {
        lookup_cpu(
            OP,
            n,
            hw,
            x,
            cb,
            VqOut {
                ids: &mut *out.ids,
                ..out
            },
        )?;
        return cpu::code_histogram_accumulate(
            n,
            hw,
            cb.n_embed(),
            out.ids.host_for(OP)?,
            &offsets,
            hist.host_mut_for(OP)?,
        );
    }
    let hist_bytes = 2 * cb.n_embed() * std::mem::size_of::<i32>();
    if lookup_shared_bytes(cb.dim()) + hist_bytes > SHARED_LIMIT {
        // Too many codes for bins in shared memory beside the code tile: the
        // two kernels one after the other count the same.
        let ids: &Tensor<i32> = launch_lookup_ids(be, x, cb, n, hw, out)?;
        return code_histogram_accumulate(be, ids, row_offsets, hist);
    }
    let segments = row_segment_map(be, row_offsets, &offsets)?;
    launch_lookup(be, x, cb, n, hw, out, Some((hist, segments.as_ref())))
}

/// Runs the CPU reference of the lookup.
fn lookup_cpu(
    op: &'static str,
    n: usize,
    hw: usize,
    x: &Tensor,
    cb: &Codebook,
    out: VqOut,
) -> Result<()> {
    cpu::vq_lookup_forward(
        n,
        cb.dim(),
        hw,
        cb.n_embed(),
        x.host_for(op)?,
        cb.embed.host_for(op)?,
        cb.norms.host_for(op)?,
        out.ids.host_mut_for(op)?,
        out.quant.map(|q| q.host_mut_for(op)).transpose()?,
        out.err.map(|e| e.host_mut_for(op)).transpose()?,
    )
}

/// Dynamic shared memory of `vq_lookup_f32` for embedding dim `d`.
fn lookup_shared_bytes(d: usize) -> usize {
    (d.min(LOOKUP_MAX_CHANNELS) * LOOKUP_TILE + LOOKUP_TILE) * std::mem::size_of::<f32>()
}

/// [`launch_lookup`] without a histogram, handing the codes back.
fn launch_lookup_ids<'a>(
    be: &Backend,
    x: &Tensor,
    cb: &Codebook,
    n: usize,
    hw: usize,
    out: VqOut<'a>,
) -> Result<&'a Tensor<i32>> {
    let VqOut { ids, quant, err } = out;
    launch_lookup(
        be,
        x,
        cb,
        n,
        hw,
        VqOut {
            ids: &mut *ids,
            quant,
            err,
        },
        None,
    )?;
    Ok(ids)
}

/// Launches `vq_lookup_f32`, or `vq_lookup_hist_f32` with `hist` and its
/// optional row → segment map. Shapes and devices were checked by the caller.
fn launch_lookup(
    be: &Backend,
    x: &Tensor,
    cb: &Codebook,
    n: usize,
    hw: usize,
    out: VqOut,
    hist: Option<(&mut Tensor<i32>, Option<&Tensor<i32>>)>,
) -> Result<()> {
    let positions = n * hw;
    if positions == 0 {
        return Ok(());
    }
    let d = cb.dim();
    let k = cb.n_embed();
    let blocks = u32::try_from(positions.div_ceil(LOOKUP_THREADS)).map_err(|_| {
        Error::invalid(format!(
            "vq_lookup: {positions} positions need more than 2^32 blocks"
        ))
    })?;
    let mut cfg = LaunchCfg {
        grid: (blocks, 1, 1),
        block: (LOOKUP_THREADS as u32, 1, 1),
        shared_bytes: lookup_shared_bytes(d) as u32,
    };
    let null = KernelArg::Ptr(0);
    let mut args = vec![
        x.arg(),
        cb.embed.arg(),
        cb.norms.arg(),
        i64_arg("batch", n)?,
        KernelArg::int("codebook dim", d)?,
        i64_arg("positions per image", hw)?,
        KernelArg::int("codebook size", k)?,
        KernelArg::int("channel tile", d.min(LOOKUP_MAX_CHANNELS))?,
        out.ids.arg_mut(),
        out.quant.map_or(null, |q| q.arg_mut()),
        out.err.map_or(null, |e| e.arg_mut()),
    ];
    let kernel = match hist {
        None => "vq_lookup_f32",
        Some((hist, segments)) => {
            cfg.shared_bytes += (2 * k * std::mem::size_of::<i32>()) as u32;
            args.push(hist.arg_mut());
            args.push(segments.map_or(null, |s| s.arg()));
            "vq_lookup_hist_f32"
        }
    };
    // SAFETY: the callers checked that x [n, d, hw], the codebook ([d, k]
    // and [k]), ids and err [n, hw], quant [n, d, hw] (null when absent),
    // hist [segments, k] and the row map [n] (values < segments, or null)
    // live on be's device and outlive the launch. The argument list matches
    // vq_lookup_f32 / vq_lookup_hist_f32 in kernels/vq.cu; the kernels touch
    // positions < n·hw, codes < k and dc = min(d, 128) channels per tile,
    // which the shared-memory size covers (plus 2·k bins for the histogram).
    unsafe { be.launch(kernel, cfg, &args) }
}

/// Segment boundaries in rows: `row_offsets` checked against `rows`, or one
/// segment per row.
fn segment_offsets(
    op: &'static str,
    rows: usize,
    row_offsets: Option<&[usize]>,
) -> Result<Vec<usize>> {
    match row_offsets {
        Some(o) => {
            cpu::check_row_offsets(op, rows, o)?;
            Ok(o.to_vec())
        }
        None => Ok((0..=rows).collect()),
    }
}

/// The row → segment map the kernels read, uploaded to `be`; `None` (the
/// kernels' identity) when each row is its own segment.
fn row_segment_map(
    be: &Backend,
    row_offsets: Option<&[usize]>,
    offsets: &[usize],
) -> Result<Option<Tensor<i32>>> {
    if row_offsets.is_none() {
        return Ok(None);
    }
    let rows = offsets.last().copied().unwrap_or(0);
    let mut map = Vec::with_capacity(rows);
    for (s, w) in offsets.windows(2).enumerate() {
        let s = i32::try_from(s)
            .map_err(|_| Error::invalid(format!("segment {s} does not fit a 32-bit index")))?;
        map.extend(std::iter::repeat_n(s, w[1] - w[0]));
    }
    Tensor::from_vec(be, &[rows], map).map(Some)
}

/// Code-frequency histograms `[segments, n_embed]` (int32) of `ids`
/// `[rows, …]`: one row per image or patch, row `r` counting into segment
/// `r` when `row_offsets` is `None`, else segment `j` owning rows
/// `row_offsets[j]..row_offsets[j + 1]`. A code outside `[0, n_embed)` is an
/// error.
pub fn code_histogram(
    be: &Backend,
    ids: &Tensor<i32>,
    n_embed: usize,
    row_offsets: Option<&[usize]>,
) -> Result<Tensor<i32>> {
    let rows = ids.shape().first().copied().unwrap_or(1);
    let segments = segment_offsets("code_histogram", rows, row_offsets)?.len() - 1;
    let mut hist = Tensor::zeros(be, &[segments, n_embed])?;
    code_histogram_accumulate(be, ids, row_offsets, &mut hist)?;
    Ok(hist)
}

/// [`code_histogram`] ADDED into `hist` `[segments, n_embed]`, so a caller
/// can accumulate samples over batches. On a code outside `[0, n_embed)`
/// the error comes after `hist` was updated with the valid codes.
pub fn code_histogram_accumulate(
    be: &Backend,
    ids: &Tensor<i32>,
    row_offsets: Option<&[usize]>,
    hist: &mut Tensor<i32>,
) -> Result<()> {
    const OP: &str = "code_histogram";
    check_device(OP, be, ids)?;
    check_device(OP, be, hist)?;
    let (rows, row_len) = match ids.shape() {
        [rows, rest @ ..] => (*rows, rest.iter().product::<usize>()),
        [] => (1, 1),
    };
    let offsets = segment_offsets(OP, rows, row_offsets)?;
    let segments = offsets.len() - 1;
    let n_embed = match hist.shape() {
        &[s, k] if s == segments => k,
        s => {
            return Err(Error::shape(
                OP,
                format!(
                    "hist has shape {s:?}, expected [{segments}, n_embed] for ids {:?}",
                    ids.shape()
                ),
            ))
        }
    };
    if be.device() == Device::Cpu {
        return cpu::code_histogram_accumulate(
            rows,
            row_len,
            n_embed,
            ids.host_for(OP)?,
            &offsets,
            hist.host_mut_for(OP)?,
        );
    }
    if rows == 0 || row_len == 0 {
        return Ok(());
    }
    let shared = n_embed * std::mem::size_of::<i32>();
    if n_embed == 0 || shared > SHARED_LIMIT {
        return Err(Error::shape(
            OP,
            format!(
                "{n_embed} codes: the kernel keeps 1 to {} bins in shared memory",
                SHARED_LIMIT / std::mem::size_of::<i32>()
            ),
        ));
    }
    let chunks_per_row = row_len.div_ceil(HIST_THREADS * HIST_PER_THREAD);
    let blocks = rows.saturating_mul(chunks_per_row).min(HIST_MAX_BLOCKS);
    let cfg = LaunchCfg {
        grid: (blocks as u32, 1, 1),
        block: (HIST_THREADS as u32, 1, 1),
        shared_bytes: shared as u32,
    };
    let segment_map = row_segment_map(be, row_offsets, &offsets)?;
    let mut invalid = Tensor::<i32>::zeros(be, &[1])?;
    let args = [
        ids.arg(),
        i64_arg("rows", rows)?,
        i64_arg("row length", row_len)?,
        KernelArg::int("codebook size", n_embed)?,
        segment_map.as_ref().map_or(KernelArg::Ptr(0), |m| m.arg()),
        i64_arg("chunks per row", chunks_per_row)?,
        hist.arg_mut(),
        invalid.arg_mut(),
    ];
    // SAFETY: ids [rows, row_len], hist [segments, n_embed], the row map
    // [rows] with values < segments (or null) and the 1-element invalid
    // counter live on be's device (checked or allocated there) and outlive
    // the launch; code_histogram_i32 reads ids of rows < rows, counts only
    // codes in [0, n_embed) into n_embed shared bins and adds them to
    // hist[segment, code].
    unsafe { be.launch("code_histogram_i32", cfg, &args)? };
    let bad = invalid.to_vec()?.first().copied().unwrap_or(0);
    if bad != 0 {
        return Err(Error::invalid(format!(
            "{OP}: {bad} codes of ids {:?} are outside [0, {n_embed})",
            ids.shape()
        )));
    }
    Ok(())
}
