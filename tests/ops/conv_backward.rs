//! The convolution backward ops (`conv2d_backward`,
//! `conv_transpose2d_backward`; kernels/conv_backward.cu for the weight and
//! bias gradients, the forward kernels of kernels/conv.cu for the input
//! gradients) on the emulated device and (ignored without a GPU) on CUDA,
//! against the CPU reference (`cellmorph::cpu::conv`) over random shapes and
//! fixed tile-edge shapes, against PyTorch's gradients in
//! `tests/fixtures/ops_backward.safetensors`, for determinism (two runs give
//! the same bits), and for shape errors.
//!
//! Tolerance: `super::conv::compare`'s, per gradient element,
//! |got − ref| ≤ 1e-4 + 1e-4·|ref| + 2·√K·u·S with S the same gradient of
//! |x|, |w|, |dy| and K the products summed into one element: at most
//! c_out·kh·kw for dx, the pixels of the sum (n·oh·ow for conv2d, n·h·w for
//! the transposed conv) for dw and db. The kernels and the reference add
//! the same products in different orders (the weight gradient in chunks of
//! pixels summed afterwards, the reference kernel row by kernel row), so
//! they differ by rounding only; 2·√K·u·S bounds two f32 sums of K terms
//! with high probability (Higham), far below one missing or wrong product
//! (~|x·dy| ≤ 1 here). Against PyTorch the fixture's own tolerance is used
//! (max |Δ| ≤ 1e-4·max |ref|, see `super::golden_backward`).

use cellmorph::geometry::{Conv2dGeom, Conv2dParams, ConvTranspose2dGeom, ConvTranspose2dParams};
use cellmorph::io::TensorFile;
use cellmorph::ops::{self, ConvGrads};
use cellmorph::{Backend, Error, Tensor};
use proptest::prelude::*;
use serde_json::Value;

use crate::common::data;
use crate::conv::{abs, compare, cuda, emulated, property, CUDA_CASES, EMU_CASES};

/// A conv2d (or, `transposed`, a conv_transpose2d) backward problem.
#[derive(Clone, Debug)]
struct Case {
    transposed: bool,
    n: usize,
    c_in: usize,
    c_out: usize,
    h: usize,
    w: usize,
    k: (usize, usize),
    stride: (usize, usize),
    pad: (usize, usize),
    output_padding: (usize, usize),
    bias: bool,
    seed: u64,
}

impl Case {
    fn x_shape(&self) -> [usize; 4] {
        [self.n, self.c_in, self.h, self.w]
    }
    fn w_shape(&self) -> [usize; 4] {
        let (kh, kw) = self.k;
        if self.transposed {
            [self.c_in, self.c_out, kh, kw]
        } else {
            [self.c_out, self.c_in, kh, kw]
        }
    }
    fn conv_params(&self) -> Conv2dParams {
        Conv2dParams {
            stride: self.stride,
            padding: self.pad,
        }
    }
    fn transpose_params(&self) -> ConvTranspose2dParams {
        ConvTranspose2dParams {
            stride: self.stride,
            padding: self.pad,
            output_padding: self.output_padding,
        }
    }
    /// `dy`'s shape, or the geometry's error.
    fn dy_shape(&self) -> cellmorph::Result<[usize; 4]> {
        if self.transposed {
            Ok(
                ConvTranspose2dGeom::new(
                    &self.x_shape(),
                    &self.w_shape(),
                    self.transpose_params(),
                )?
                .out_shape(),
            )
        } else {
            Ok(Conv2dGeom::new(&self.x_shape(), &self.w_shape(), self.conv_params())?.out_shape())
        }
    }
    /// Products per element of (dx, dw and db).
    fn sum_lengths(&self) -> (usize, usize) {
        let (kh, kw) = self.k;
        let dy = self.dy_shape().unwrap_or_default();
        let pixels = if self.transposed {
            self.n * self.h * self.w
        } else {
            self.n * dy[2] * dy[3]
        };
        (self.c_out * kh * kw, pixels)
    }
    fn backward(
        &self,
        be: &Backend,
        x: &Tensor,
        w: &Tensor,
        dy: &Tensor,
    ) -> cellmorph::Result<ConvGrads> {
        if self.transposed {
            ops::conv_transpose2d_backward(be, x, w, dy, self.transpose_params(), self.bias)
        } else {
            ops::conv2d_backward(be, x, w, dy, self.conv_params(), self.bias)
        }
    }
}

/// Random shapes: batch 1–3, odd and even sizes, kernels 1–7, strides 1–2,
/// paddings 0–3, `c_out` in `c_out`; shapes with no output are rejected.
fn cases(transposed: bool, c_out: std::ops::RangeInclusive<usize>) -> impl Strategy<Value = Case> {
    (
        (1usize..=3, 1usize..=6, c_out, 1usize..=13, 1usize..=13),
        (
            1usize..=7,
            1usize..=7,
            1usize..=2,
            1usize..=2,
            0usize..=3,
            0usize..=3,
        ),
        (any::<bool>(), any::<u64>(), 0usize..2, 0usize..2),
    )
        .prop_map(
            move |((n, c_in, c_out, h, w), (kh, kw, sh, sw, ph, pw), (bias, seed, oph, opw))| {
                Case {
                    transposed,
                    n,
                    c_in,
                    c_out,
                    h,
                    w,
                    k: (kh, kw),
                    stride: (sh, sw),
                    pad: (ph, pw),
                    output_padding: (oph % sh, opw % sw),
                    bias,
                    seed,
                }
            },
        )
        .prop_filter("no output for this shape", |c| c.dy_shape().is_ok())
}

type Grads = (Vec<f32>, Vec<f32>, Vec<f32>);

/// The `_into` form on `be`, into gradients prefilled with NaN (so an
/// element a kernel leaves unwritten fails the comparison).
fn run_into(
    be: &Backend,
    c: &Case,
    xv: &[f32],
    wv: &[f32],
    dyv: &[f32],
) -> cellmorph::Result<Grads> {
    let dy_shape = c.dy_shape()?;
    let x = Tensor::from_slice(be, &c.x_shape(), xv)?;
    let w = Tensor::from_slice(be, &c.w_shape(), wv)?;
    let dy = Tensor::from_slice(be, &dy_shape, dyv)?;
    let nan =
        |shape: &[usize]| Tensor::from_slice(be, shape, &vec![f32::NAN; shape.iter().product()]);
    let (mut dx, mut dw, mut db) = (nan(&c.x_shape())?, nan(&c.w_shape())?, nan(&[c.c_out])?);
    let db_arg = if c.bias { Some(&mut db) } else { None };
    if c.transposed {
        ops::conv_transpose2d_backward_into(
            be,
            &x,
            &w,
            &dy,
            c.transpose_params(),
            &mut dx,
            &mut dw,
            db_arg,
        )?;
    } else {
        ops::conv2d_backward_into(be, &x, &w, &dy, c.conv_params(), &mut dx, &mut dw, db_arg)?;
    }
    let db = if c.bias { db.to_vec()? } else { Vec::new() };
    Ok((dx.to_vec()?, dw.to_vec()?, db))
}

fn inputs(c: &Case) -> cellmorph::Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
    let dy_len = c.dy_shape()?.iter().product();
    Ok((
        data(c.seed, c.x_shape().iter().product()),
        data(c.seed ^ 1, c.w_shape().iter().product()),
        data(c.seed ^ 2, dy_len),
    ))
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).fold(0.0, |m, (x, y)| m.max((x - y).abs()))
}

/// Runs `c` on `be` and on the CPU and compares the three gradients; returns
/// the max |Δ| of (dx, dw, db).
fn check(be: &Backend, c: &Case) -> Result<(f32, f32, f32), String> {
    let (xv, wv, dyv) = inputs(c).map_err(|e| e.to_string())?;
    let cpu = Backend::cpu();
    let want = run_into(&cpu, c, &xv, &wv, &dyv).map_err(|e| e.to_string())?;
    let mag = run_into(&cpu, c, &abs(&xv), &abs(&wv), &abs(&dyv)).map_err(|e| e.to_string())?;
    let got = run_into(be, c, &xv, &wv, &dyv).map_err(|e| format!("{}: {e}", be.device()))?;
    let (k_dx, k_dw) = c.sum_lengths();
    let ctx = |what: &str| format!("{what} of {c:?} on {}", be.device());
    compare(&ctx("dx"), &got.0, &want.0, &mag.0, k_dx)?;
    compare(&ctx("dw"), &got.1, &want.1, &mag.1, k_dw)?;
    compare(&ctx("db"), &got.2, &want.2, &mag.2, k_dw)?;
    Ok((
        max_abs_diff(&got.0, &want.0),
        max_abs_diff(&got.1, &want.1),
        max_abs_diff(&got.2, &want.2),
    ))
}

#[test]
fn conv2d_backward_emulated_matches_cpu() {
    let be = emulated();
    property(EMU_CASES, cases(false, 1..=6), |c| {
        check(&be, c).map(|_| ())
    });
}

#[test]
fn conv_transpose2d_backward_emulated_matches_cpu() {
    let be = emulated();
    property(EMU_CASES, cases(true, 1..=6), |c| check(&be, c).map(|_| ()));
}

/// More than 64 output channels: two row tiles of the weight-gradient GEMM
/// and the 64-wide channel tile of the input-gradient GEMM.
#[test]
fn conv_backward_wide_emulated_matches_cpu() {
    let be = emulated();
    property(4, cases(false, 60..=70), |c| check(&be, c).map(|_| ()));
    property(4, cases(true, 60..=70), |c| check(&be, c).map(|_| ()));
}

#[test]
#[ignore = "needs a CUDA device (none here, so it did not run): scripts/gpu-check.sh runs it with --include-ignored"]
fn conv_backward_cuda_matches_cpu() {
    let be = cuda();
    for transposed in [false, true] {
        property(CUDA_CASES, cases(transposed, 1..=6), |c| {
            check(&be, c).map(|_| ())
        });
        property(CUDA_CASES / 4, cases(transposed, 60..=70), |c| {
            check(&be, c).map(|_| ())
        });
    }
}

/// Fixed shapes at the tile and chunk edges: weight-gradient M (c_out) and N
/// (c_in·kh·kw) at and past 64, pixel sums of 1, 255–257 (one or two
/// chunks) and past 16·256 (sixteen chunks), strides, paddings, one pixel.
fn fixed() -> Vec<Case> {
    #[allow(clippy::too_many_arguments)]
    let case = |transposed, n, c_in, c_out, (h, w), (kh, kw), s: usize, p: usize| Case {
        transposed,
        n,
        c_in,
        c_out,
        h,
        w,
        k: (kh, kw),
        stride: (s, s),
        pad: (p, p),
        output_padding: (0, 0),
        bias: true,
        seed: (n * 1000 + c_in * 100 + c_out * 10 + h) as u64,
    };
    vec![
        // M = 65, N = 72, 81 pixels.
        case(false, 1, 8, 65, (9, 9), (3, 3), 1, 1),
        // M = 64, N = 64, 255 pixels (one chunk).
        case(false, 1, 4, 64, (15, 17), (4, 4), 1, 0),
        // 257 pixels: two chunks.
        case(false, 1, 3, 5, (1, 257), (1, 1), 1, 0),
        // 4608 pixels: sixteen chunks.
        case(false, 2, 2, 3, (48, 48), (3, 3), 1, 1),
        // One pixel, kernel larger than the input with padding.
        case(false, 1, 2, 3, (1, 1), (3, 3), 1, 1),
        // Stride 2, 7×7 with padding 3 (DenseNet's stem, smaller).
        case(false, 2, 3, 8, (13, 11), (7, 7), 2, 3),
        // Transposed: VQ-VAE decoder 4×4 stride 2 pad 1; kernel 1 stride 2
        // (phases with no taps); N = c_out·kh·kw = 65·1.
        case(true, 2, 6, 4, (7, 9), (4, 4), 2, 1),
        case(true, 1, 3, 4, (5, 5), (1, 1), 2, 0),
        case(true, 1, 70, 65, (3, 3), (1, 1), 1, 0),
    ]
}

#[test]
fn conv_backward_tile_edges_emulated() {
    let be = emulated();
    for c in fixed() {
        let (dx, dw, db) = check(&be, &c).unwrap();
        eprintln!("max |Δ| vs CPU: dx {dx:e}, dw {dw:e}, db {db:e} for {c:?}");
    }
}

#[test]
#[ignore = "needs a CUDA device (none here, so it did not run): scripts/gpu-check.sh runs it with --include-ignored"]
fn conv_backward_tile_edges_cuda() {
    let be = cuda();
    for c in fixed() {
        check(&be, &c).unwrap();
    }
}

/// Two runs give the same bits (no atomics; chunking by shape only), for
/// a problem whose gradient sums span several chunks.
fn deterministic(be: &Backend) {
    for transposed in [false, true] {
        let c = Case {
            transposed,
            n: 3,
            c_in: 5,
            c_out: 7,
            h: 17,
            w: 19,
            k: (3, 3),
            stride: (1, 1),
            pad: (1, 1),
            output_padding: (0, 0),
            bias: true,
            seed: 42,
        };
        let (xv, wv, dyv) = inputs(&c).unwrap();
        let once = || {
            let x = Tensor::from_slice(be, &c.x_shape(), &xv).unwrap();
            let w = Tensor::from_slice(be, &c.w_shape(), &wv).unwrap();
            let dy = Tensor::from_slice(be, &c.dy_shape().unwrap(), &dyv).unwrap();
            let g = c.backward(be, &x, &w, &dy).unwrap();
            let bits = |t: &Tensor| -> Vec<u32> {
                t.to_vec().unwrap().iter().map(|v| v.to_bits()).collect()
            };
            (bits(&g.dx), bits(&g.dw), bits(g.db.as_ref().unwrap()))
        };
        let (a, b) = (once(), once());
        assert!(a == b, "two runs of {c:?} on {} differ", be.device());
        let (_, parts) = ops::conv_grad_chunks(c.sum_lengths().1);
        assert!(parts > 1, "the case must span several chunks");
    }
}

#[test]
fn conv_backward_deterministic_emulated() {
    deterministic(&emulated());
}

#[test]
#[ignore = "needs a CUDA device (none here, so it did not run): scripts/gpu-check.sh runs it with --include-ignored"]
fn conv_backward_deterministic_cuda() {
    deterministic(&cuda());
}

#[test]
fn grad_chunks_cover_the_sum() {
    assert_eq!(ops::conv_grad_chunks(0), (0, 0));
    for k in (1..5000).chain([65_536, 1 << 20, 123_456_789]) {
        let (len, parts) = ops::conv_grad_chunks(k);
        assert!(
            (1..=ops::CONV_GRAD_MAX_CHUNKS).contains(&parts),
            "k {k}: {parts} chunks"
        );
        assert!(
            len * parts >= k && len * (parts - 1) < k,
            "k {k}: {parts} × {len}"
        );
        assert_eq!(len % 16, 0, "k {k}: chunk {len}");
    }
    assert_eq!(ops::conv_grad_workspace_len(100, 4, 256), 0);
    assert_eq!(ops::conv_grad_workspace_len(100, 4, 1 << 20), 16 * 104);
}

/// Max |Δ| / max |ref| per gradient against PyTorch: the fixture README's 1e-4.
const GOLDEN_TOL: f32 = 1e-4;

fn golden_check(case: &str, what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{case}.{what}: length");
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-30);
    let err = max_abs_diff(got, want);
    assert!(
        err <= GOLDEN_TOL * scale,
        "{case}.{what}: max |Δ| {err:e} > {GOLDEN_TOL:e} × {scale:e}"
    );
}

/// The conv2d and conv_transpose2d cases of the PyTorch backward fixture on
/// the emulated device.
#[test]
fn conv_backward_emulated_matches_pytorch() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/ops_backward.safetensors"
    );
    let f = TensorFile::open(path).expect("ops_backward fixture");
    let cases: Vec<Value> = serde_json::from_str(
        f.metadata()
            .and_then(|m| m.get("cases"))
            .expect("metadata key cases"),
    )
    .expect("cases is JSON");
    let be = emulated();
    let mut checked = 0;
    for c in &cases {
        let name = c["name"].as_str().expect("case name");
        let op = c["op"].as_str().expect("case op");
        if op != "conv2d" && op != "conv_transpose2d" {
            continue;
        }
        let t = |what: &str| -> (Vec<usize>, Vec<f32>) {
            f.f32(&format!("{name}.{what}"))
                .unwrap_or_else(|e| panic!("{name}.{what}: {e}"))
        };
        let p = |key: &str| {
            c["params"][key]
                .as_u64()
                .unwrap_or_else(|| panic!("{name}: param {key}")) as usize
        };
        let (xs, x) = t("x");
        let (ws, w) = t("weight");
        let (dys, dy) = t("dy");
        let up = |s: &[usize], v: &[f32]| Tensor::from_slice(&be, s, v).unwrap();
        let (x, w, dy) = (up(&xs, &x), up(&ws, &w), up(&dys, &dy));
        let g = if op == "conv2d" {
            ops::conv2d_backward(
                &be,
                &x,
                &w,
                &dy,
                Conv2dParams::new(p("stride"), p("padding")),
                true,
            )
        } else {
            ops::conv_transpose2d_backward(
                &be,
                &x,
                &w,
                &dy,
                ConvTranspose2dParams::new(p("stride"), p("padding")),
                true,
            )
        }
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        golden_check(name, "dx", &g.dx.to_vec().unwrap(), &t("dx").1);
        golden_check(name, "dweight", &g.dw.to_vec().unwrap(), &t("dweight").1);
        golden_check(
            name,
            "dbias",
            &g.db.unwrap().to_vec().unwrap(),
            &t("dbias").1,
        );
        checked += 1;
    }
    assert!(
        checked >= 2,
        "the fixture has conv2d and conv_transpose2d cases ({checked} checked)"
    );
}

#[test]
fn conv_backward_shape_errors() {
    let be = emulated();
    let z = |s: &[usize]| Tensor::zeros(&be, s).unwrap();
    let expect = |r: cellmorph::Result<()>, op: &str, parts: &[&str]| match r {
        Err(Error::Shape { op: got, msg }) => {
            assert_eq!(got, op, "{msg}");
            for p in parts {
                assert!(msg.contains(p), "{op}: {msg:?} does not mention {p:?}");
            }
        }
        other => panic!("{op}: expected a shape error, got {other:?}"),
    };
    let p = Conv2dParams::new(2, 1);
    // x [1, 2, 5, 5], w [3, 2, 3, 3] → dy [1, 3, 3, 3].
    let (x, w) = (z(&[1, 2, 5, 5]), z(&[3, 2, 3, 3]));
    expect(
        ops::conv2d_backward_into(
            &be,
            &x,
            &w,
            &z(&[1, 3, 4, 4]),
            p,
            &mut z(&[1, 2, 5, 5]),
            &mut z(&[3, 2, 3, 3]),
            None,
        ),
        "conv2d_backward",
        &["dy", "[1, 3, 4, 4]", "[1, 3, 3, 3]"],
    );
    expect(
        ops::conv2d_backward_into(
            &be,
            &x,
            &w,
            &z(&[1, 3, 3, 3]),
            p,
            &mut z(&[1, 2, 5, 5]),
            &mut z(&[3, 2, 3, 2]),
            None,
        ),
        "conv2d_backward",
        &["dw", "[3, 2, 3, 2]", "[3, 2, 3, 3]"],
    );
    expect(
        ops::conv2d_backward_into(
            &be,
            &x,
            &w,
            &z(&[1, 3, 3, 3]),
            p,
            &mut z(&[1, 2, 5, 5]),
            &mut z(&[3, 2, 3, 3]),
            Some(&mut z(&[2])),
        ),
        "conv2d_backward",
        &["db", "[2]", "[3]"],
    );
    expect(
        ops::conv2d_backward(&be, &x, &z(&[3, 4, 3, 3]), &z(&[1, 3, 3, 3]), p, false).map(|_| ()),
        "conv2d_backward",
        &["[1, 2, 5, 5]"],
    );
    // Transposed: x [1, 2, 3, 3], w [2, 4, 3, 3], stride 2 pad 1 → dy [1, 4, 5, 5].
    let tp = ConvTranspose2dParams::new(2, 1);
    let (x, w) = (z(&[1, 2, 3, 3]), z(&[2, 4, 3, 3]));
    expect(
        ops::conv_transpose2d_backward_into(
            &be,
            &x,
            &w,
            &z(&[1, 4, 5, 5]),
            tp,
            &mut z(&[1, 2, 3, 4]),
            &mut z(&[2, 4, 3, 3]),
            None,
        ),
        "conv_transpose2d_backward",
        &["dx", "[1, 2, 3, 4]", "[1, 2, 3, 3]"],
    );
    expect(
        ops::conv_transpose2d_backward(&be, &x, &w, &z(&[1, 4, 6, 6]), tp, true).map(|_| ()),
        "conv_transpose2d_backward",
        &["dy", "[1, 4, 6, 6]", "[1, 4, 5, 5]"],
    );
}
