//! Golden tests of the CPU forward ops against PyTorch.
//!
//! `tests/fixtures/ops.safetensors` holds 29 single-layer cases computed with
//! PyTorch 2.15 on the CPU in float32 (see `tests/fixtures/README.md`). Every
//! case is run through the matching `cellmorph::cpu` function; a case with an
//! op this file does not know fails the test, so none is silently skipped.

use cellmorph::cpu;
use cellmorph::geometry::{
    Conv2dGeom, Conv2dParams, ConvTranspose2dGeom, ConvTranspose2dParams, Pool2dGeom, Pool2dParams,
};
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/ops.safetensors"
);
const EXPECTED_CASES: usize = 29;

/// Max |Δ| / max |ref| allowed per case. Both sides are f32 single layers; the
/// longest reduction here is a conv over c_in·kh·kw = 288 products, whose
/// rounding in a different summation order than PyTorch's is a few ulps of
/// the result (~1e-7 relative per add, growing like √terms), so 1e-5 leaves
/// a wide margin while any indexing or padding mistake gives O(1) errors.
const TOL: f32 = 1e-5;

struct Tensor {
    shape: Vec<usize>,
    data: Vec<f32>,
}

struct Case<'a> {
    name: String,
    op: String,
    params: Value,
    file: &'a SafeTensors<'a>,
}

impl Case<'_> {
    fn tensor(&self, what: &str) -> Tensor {
        let key = format!("{}.{what}", self.name);
        let view = self
            .file
            .tensor(&key)
            .unwrap_or_else(|e| panic!("{key}: {e}"));
        assert_eq!(view.dtype(), Dtype::F32, "{key} is not f32");
        let data = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        Tensor {
            shape: view.shape().to_vec(),
            data,
        }
    }

    fn usize_param(&self, key: &str) -> usize {
        self.params[key]
            .as_u64()
            .unwrap_or_else(|| panic!("{}: param {key} missing or not an integer", self.name))
            as usize
    }

    fn f32_param(&self, key: &str) -> f32 {
        self.params[key]
            .as_f64()
            .unwrap_or_else(|| panic!("{}: param {key} missing or not a number", self.name))
            as f32
    }

    fn has_bias(&self) -> bool {
        self.params["bias"].as_bool().unwrap_or(false)
    }
}

fn load_cases(file: &[u8]) -> Vec<(String, String, Value)> {
    let (_, meta) = SafeTensors::read_metadata(file).expect("read safetensors header");
    let cases = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get("cases"))
        .expect("metadata key `cases`");
    let cases: Vec<Value> = serde_json::from_str(cases).expect("`cases` is a JSON list");
    cases
        .into_iter()
        .map(|c| {
            let name = c["name"].as_str().expect("case name").to_string();
            let op = c["op"].as_str().expect("case op").to_string();
            (name, op, c["params"].clone())
        })
        .collect()
}

/// Max |got − want| / max |want|, or a message if shapes differ or `got` has
/// a non-finite value.
fn rel_err(got: &[f32], want: &[f32]) -> Result<f32, String> {
    if got.len() != want.len() {
        return Err(format!("{} values, expected {}", got.len(), want.len()));
    }
    if let Some(i) = got.iter().position(|v| !v.is_finite()) {
        return Err(format!("non-finite output {} at {i}", got[i]));
    }
    let max_diff = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    let max_ref = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    Ok(max_diff / max_ref.max(f32::MIN_POSITIVE))
}

fn zeros_like(t: &Tensor) -> Vec<f32> {
    vec![0.0; t.data.len()]
}

fn pool_geom(case: &Case, op: &'static str, x: &Tensor) -> Pool2dGeom {
    let mut p = Pool2dParams::new(
        case.usize_param("kernel"),
        case.usize_param("stride"),
        case.usize_param("padding"),
    );
    if let Some(include) = case.params["count_include_pad"].as_bool() {
        p.count_include_pad = include;
    }
    Pool2dGeom::new(op, &x.shape, p).expect("pool geometry")
}

/// Runs one case; returns (output, reference).
fn run_case(case: &Case) -> Result<(Vec<f32>, Tensor), String> {
    let y_ref = case.tensor("y");
    let mut y = zeros_like(&y_ref);
    let op = case.op.as_str();
    let result = match op {
        "conv2d" => {
            let (x, w) = (case.tensor("x"), case.tensor("weight"));
            let b = case.has_bias().then(|| case.tensor("bias"));
            let p = Conv2dParams::new(case.usize_param("stride"), case.usize_param("padding"));
            let g = Conv2dGeom::new(&x.shape, &w.shape, p).map_err(|e| e.to_string())?;
            assert_eq!(g.out_shape().as_slice(), y_ref.shape.as_slice());
            cpu::conv2d_forward(
                &g,
                &x.data,
                &w.data,
                b.as_ref().map(|b| &b.data[..]),
                &mut y,
            )
        }
        "conv_transpose2d" => {
            let (x, w) = (case.tensor("x"), case.tensor("weight"));
            let b = case.has_bias().then(|| case.tensor("bias"));
            let p =
                ConvTranspose2dParams::new(case.usize_param("stride"), case.usize_param("padding"));
            let g = ConvTranspose2dGeom::new(&x.shape, &w.shape, p).map_err(|e| e.to_string())?;
            assert_eq!(g.out_shape().as_slice(), y_ref.shape.as_slice());
            cpu::conv_transpose2d_forward(
                &g,
                &x.data,
                &w.data,
                b.as_ref().map(|b| &b.data[..]),
                &mut y,
            )
        }
        "batchnorm" => {
            let x = case.tensor("x");
            let (n, c) = (x.shape[0], x.shape[1]);
            let hw = x.shape[2..].iter().product();
            cpu::batchnorm_forward(
                n,
                c,
                hw,
                &x.data,
                &case.tensor("weight").data,
                &case.tensor("bias").data,
                &case.tensor("running_mean").data,
                &case.tensor("running_var").data,
                case.f32_param("eps"),
                &mut y,
            )
        }
        "relu" => cpu::relu_forward(&case.tensor("x").data, &mut y),
        "leaky_relu" => {
            cpu::leaky_relu_forward(case.f32_param("slope"), &case.tensor("x").data, &mut y)
        }
        "sigmoid" => cpu::sigmoid_forward(&case.tensor("x").data, &mut y),
        "softmax" => {
            let x = case.tensor("x");
            let dim = case.usize_param("dim");
            let outer = x.shape[..dim].iter().product();
            let inner = x.shape[dim + 1..].iter().product();
            cpu::softmax_forward(outer, x.shape[dim], inner, &x.data, &mut y)
        }
        "max_pool2d" => {
            let x = case.tensor("x");
            let g = pool_geom(case, "max_pool2d", &x);
            assert_eq!(g.out_shape().as_slice(), y_ref.shape.as_slice());
            cpu::max_pool2d_forward(&g, &x.data, &mut y)
        }
        "avg_pool2d" => {
            let x = case.tensor("x");
            let g = pool_geom(case, "avg_pool2d", &x);
            assert_eq!(g.out_shape().as_slice(), y_ref.shape.as_slice());
            cpu::avg_pool2d_forward(&g, &x.data, &mut y)
        }
        "global_avg_pool" => {
            let x = case.tensor("x");
            let hw = x.shape[2..].iter().product();
            cpu::global_avg_pool_forward(x.shape[0], x.shape[1], hw, &x.data, &mut y)
        }
        "upsample_nearest2x" => {
            let x = case.tensor("x");
            let s = &x.shape;
            cpu::upsample_nearest2x_forward(s[0], s[1], s[2], s[3], &x.data, &mut y)
        }
        "concat_channels" => {
            let (a, b) = (case.tensor("a"), case.tensor("b"));
            let (n, ca, cb) = (a.shape[0], a.shape[1], b.shape[1]);
            let hw = a.shape[2..].iter().product();
            cpu::copy_channels(n, ca, hw, &a.data, ca + cb, 0, &mut y)
                .and_then(|()| cpu::copy_channels(n, cb, hw, &b.data, ca + cb, ca, &mut y))
        }
        "add" => cpu::add_forward(&case.tensor("a").data, &case.tensor("b").data, &mut y),
        "linear" => {
            let (x, w, b) = (case.tensor("x"), case.tensor("weight"), case.tensor("bias"));
            let (n, in_f, out_f) = (x.shape[0], x.shape[1], w.shape[0]);
            cpu::linear_forward(n, in_f, out_f, &x.data, &w.data, Some(&b.data), &mut y)
        }
        other => return Err(format!("unknown op `{other}`: add it to this test")),
    };
    result.map_err(|e| format!("returned an error: {e}"))?;
    Ok((y, y_ref))
}

#[test]
fn every_case_matches_pytorch() {
    let bytes = std::fs::read(FIXTURE).unwrap_or_else(|e| panic!("{FIXTURE}: {e}"));
    let file = SafeTensors::deserialize(&bytes).expect("parse safetensors");
    let cases = load_cases(&bytes);
    assert_eq!(
        cases.len(),
        EXPECTED_CASES,
        "number of cases in the fixture"
    );

    let mut failures = Vec::new();
    for (name, op, params) in cases {
        let case = Case {
            name,
            op,
            params,
            file: &file,
        };
        match run_case(&case).and_then(|(y, y_ref)| rel_err(&y, &y_ref.data)) {
            Ok(err) => {
                println!(
                    "{:<22} {:<20} max|Δ|/max|ref| = {err:.2e}",
                    case.name, case.op
                );
                if err >= TOL {
                    failures.push(format!(
                        "{}: relative error {err:.2e} >= {TOL:e}",
                        case.name
                    ));
                }
            }
            Err(msg) => failures.push(format!("{} ({}): {msg}", case.name, case.op)),
        }
    }
    assert!(
        failures.is_empty(),
        "failed cases:\n{}",
        failures.join("\n")
    );
}

/// `slice_channels` (the backward of the concat) recovers both inputs exactly.
#[test]
fn slice_channels_undoes_the_golden_concat() {
    let bytes = std::fs::read(FIXTURE).unwrap_or_else(|e| panic!("{FIXTURE}: {e}"));
    let file = SafeTensors::deserialize(&bytes).expect("parse safetensors");
    let case = Case {
        name: "concat_channels".into(),
        op: "concat_channels".into(),
        params: Value::Null,
        file: &file,
    };
    let (a, b, y) = (case.tensor("a"), case.tensor("b"), case.tensor("y"));
    let (n, ca, cb) = (a.shape[0], a.shape[1], b.shape[1]);
    let hw: usize = a.shape[2..].iter().product();
    let mut got_a = zeros_like(&a);
    let mut got_b = zeros_like(&b);
    cpu::slice_channels(n, ca + cb, hw, &y.data, 0, ca, &mut got_a).unwrap();
    cpu::slice_channels(n, ca + cb, hw, &y.data, ca, cb, &mut got_b).unwrap();
    assert_eq!(got_a, a.data);
    assert_eq!(got_b, b.data);
}

mod length_checks {
    use super::*;
    use cellmorph::Error;

    fn conv_geom() -> Conv2dGeom {
        Conv2dGeom::new(&[1, 2, 5, 5], &[3, 2, 3, 3], Conv2dParams::new(1, 1)).unwrap()
    }

    #[test]
    fn conv2d_forward_rejects_short_output() {
        let g = conv_geom();
        let (x, w) = (vec![0.0; 50], vec![0.0; 54]);
        let mut y = vec![0.0; 74];
        let err = cpu::conv2d_forward(&g, &x, &w, None, &mut y).unwrap_err();
        assert!(
            matches!(
                err,
                Error::Shape {
                    op: "conv2d_forward",
                    ..
                }
            ),
            "{err}"
        );
        assert!(
            err.to_string().contains("y has 74 elements, expected 75"),
            "{err}"
        );
    }

    #[test]
    fn conv2d_forward_rejects_wrong_bias() {
        let g = conv_geom();
        let (x, w, b) = (vec![0.0; 50], vec![0.0; 54], vec![0.0; 2]);
        let mut y = vec![0.0; 75];
        let err = cpu::conv2d_forward(&g, &x, &w, Some(&b), &mut y).unwrap_err();
        assert!(
            err.to_string().contains("b has 2 elements, expected 3"),
            "{err}"
        );
    }

    #[test]
    fn copy_channels_rejects_overflowing_offset() {
        let src = vec![1.0; 2 * 3 * 4];
        let mut dst = vec![0.0; 2 * 5 * 4];
        let err = cpu::copy_channels(2, 3, 4, &src, 5, 3, &mut dst).unwrap_err();
        assert!(
            matches!(
                err,
                Error::Shape {
                    op: "copy_channels",
                    ..
                }
            ),
            "{err}"
        );
        assert!(
            dst.iter().all(|&v| v == 0.0),
            "dst was written before the check"
        );
    }

    #[test]
    fn softmax_and_add_reject_mismatched_lengths() {
        let mut y = vec![0.0; 11];
        assert!(cpu::softmax_forward(4, 3, 1, &[0.0; 12], &mut y).is_err());
        assert!(cpu::add_forward(&[0.0; 3], &[0.0; 4], &mut [0.0; 3]).is_err());
        assert!(cpu::relu_forward(&[0.0; 3], &mut [0.0; 2]).is_err());
    }

    #[test]
    fn pools_reject_wrong_input() {
        let g = Pool2dGeom::new("max_pool2d", &[1, 1, 4, 4], Pool2dParams::new(2, 2, 0)).unwrap();
        let mut y = vec![0.0; 4];
        assert!(cpu::max_pool2d_forward(&g, &[0.0; 15], &mut y).is_err());
        assert!(cpu::avg_pool2d_forward(&g, &[0.0; 16], &mut [0.0; 5]).is_err());
    }
}
