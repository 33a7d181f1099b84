//! Golden tests of the CPU backward ops against PyTorch.
//!
//! `tests/fixtures/ops_backward.safetensors` holds, per case, the inputs,
//! the output `y`, an upstream gradient `dy` and PyTorch's gradient of every
//! input (`dx`, `dweight`, `dbias`), plus the running statistics after one
//! training-mode batch-norm step (see `tests/fixtures/README.md`). Every
//! case of a layer op is run through the matching `cellmorph::cpu` backward;
//! a layer op this file does not know fails the test, so none is skipped.
//! (The losses and Adam cases of the same file are checked in
//! `tests/train.rs`.)

use cellmorph::cpu;
use cellmorph::geometry::{
    Conv2dGeom, Conv2dParams, ConvTranspose2dGeom, ConvTranspose2dParams, Pool2dGeom, Pool2dParams,
};
use cellmorph::io::TensorFile;
use serde_json::Value;

/// Max |Δ| / max |ref| per gradient: the fixture README's 1e-4 for op
/// gradients. The longest sums here (a weight gradient over n·oh·ow
/// products, a batch-norm channel over n·hw values) are f32 in another
/// order than PyTorch's, a few ulps apart; an indexing mistake is O(1).
const TOL: f32 = 1e-4;

const LOSS_AND_OPTIMIZER_OPS: [&str; 4] = ["mse_loss", "bce_loss", "cross_entropy", "adam"];

fn check(case: &str, what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{case}.{what}: length");
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-30);
    let err = got
        .iter()
        .zip(want)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        err <= TOL * scale,
        "{case}.{what}: max |Δ| {err:e} > {TOL:e} × {scale:e}"
    );
}

#[test]
fn every_backward_op_matches_pytorch() {
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
    let mut checked = 0;
    for c in &cases {
        let name = c["name"].as_str().expect("case name");
        let op = c["op"].as_str().expect("case op");
        if LOSS_AND_OPTIMIZER_OPS.contains(&op) {
            continue;
        }
        let t = |what: &str| -> (Vec<usize>, Vec<f32>) {
            f.f32(&format!("{name}.{what}"))
                .unwrap_or_else(|e| panic!("{name}.{what}: {e}"))
        };
        let p = |key: &str| -> usize {
            c["params"][key]
                .as_u64()
                .unwrap_or_else(|| panic!("{name}: param {key}")) as usize
        };
        let (xs, x) = t("x");
        let (_, dy) = t("dy");
        let mut dx = vec![f32::NAN; x.len()];
        match op {
            "conv2d" => {
                let (ws, w) = t("weight");
                let g = Conv2dGeom::new(&xs, &ws, Conv2dParams::new(p("stride"), p("padding")))
                    .unwrap();
                let mut dw = vec![f32::NAN; w.len()];
                let mut db = vec![f32::NAN; ws[0]];
                cpu::conv::conv2d_backward(&g, &x, &w, &dy, &mut dx, &mut dw, Some(&mut db))
                    .unwrap();
                check(name, "dweight", &dw, &t("dweight").1);
                check(name, "dbias", &db, &t("dbias").1);
            }
            "conv_transpose2d" => {
                let (ws, w) = t("weight");
                let g = ConvTranspose2dGeom::new(
                    &xs,
                    &ws,
                    ConvTranspose2dParams::new(p("stride"), p("padding")),
                )
                .unwrap();
                let mut dw = vec![f32::NAN; w.len()];
                let mut db = vec![f32::NAN; ws[1]];
                cpu::conv::conv_transpose2d_backward(
                    &g,
                    &x,
                    &w,
                    &dy,
                    &mut dx,
                    &mut dw,
                    Some(&mut db),
                )
                .unwrap();
                check(name, "dweight", &dw, &t("dweight").1);
                check(name, "dbias", &db, &t("dbias").1);
            }
            "batchnorm_train" => {
                let (n, ch, hw) = (xs[0], xs[1], xs[2] * xs[3]);
                let eps = c["params"]["eps"].as_f64().unwrap() as f32;
                let momentum = c["params"]["momentum"].as_f64().unwrap() as f32;
                let (gamma, beta) = (t("weight").1, t("bias").1);
                let (mut rm, mut rv) = (vec![0f32; ch], vec![1f32; ch]);
                let (mut mean, mut inv_std) = (vec![0f32; ch], vec![0f32; ch]);
                let mut y = vec![f32::NAN; x.len()];
                cpu::norm::batchnorm_train_forward(
                    n,
                    ch,
                    hw,
                    &x,
                    &gamma,
                    &beta,
                    eps,
                    momentum,
                    &mut rm,
                    &mut rv,
                    &mut mean,
                    &mut inv_std,
                    &mut y,
                )
                .unwrap();
                check(name, "y", &y, &t("y").1);
                check(name, "running_mean_after", &rm, &t("running_mean_after").1);
                check(name, "running_var_after", &rv, &t("running_var_after").1);
                let (mut dg, mut db) = (vec![f32::NAN; ch], vec![f32::NAN; ch]);
                cpu::norm::batchnorm_train_backward(
                    n, ch, hw, &x, &gamma, &mean, &inv_std, &dy, &mut dx, &mut dg, &mut db,
                )
                .unwrap();
                check(name, "dweight", &dg, &t("dweight").1);
                check(name, "dbias", &db, &t("dbias").1);
            }
            "relu" => cpu::activation::relu_backward(&x, &dy, &mut dx).unwrap(),
            "leaky_relu" => {
                let slope = c["params"]["slope"].as_f64().unwrap() as f32;
                cpu::activation::leaky_relu_backward(slope, &x, &dy, &mut dx).unwrap()
            }
            "sigmoid" => cpu::activation::sigmoid_backward(&t("y").1, &dy, &mut dx).unwrap(),
            "max_pool2d" | "avg_pool2d" => {
                let params = Pool2dParams::new(p("kernel"), p("stride"), p("padding"));
                let g = Pool2dGeom::new("golden", &xs, params).unwrap();
                if op == "max_pool2d" {
                    cpu::pool::max_pool2d_backward(&g, &x, &dy, &mut dx).unwrap()
                } else {
                    cpu::pool::avg_pool2d_backward(&g, &dy, &mut dx).unwrap()
                }
            }
            "global_avg_pool" => {
                cpu::pool::global_avg_pool_backward(xs[0], xs[1], xs[2] * xs[3], &dy, &mut dx)
                    .unwrap()
            }
            "upsample_nearest2x" => {
                cpu::layout::upsample_nearest2x_backward(xs[0], xs[1], xs[2], xs[3], &dy, &mut dx)
                    .unwrap()
            }
            "linear" => {
                let (ws, w) = t("weight");
                let mut dw = vec![f32::NAN; w.len()];
                let mut db = vec![f32::NAN; ws[0]];
                cpu::linear::linear_backward(
                    xs[0],
                    ws[1],
                    ws[0],
                    &x,
                    &w,
                    &dy,
                    &mut dx,
                    &mut dw,
                    Some(&mut db),
                )
                .unwrap();
                check(name, "dweight", &dw, &t("dweight").1);
                check(name, "dbias", &db, &t("dbias").1);
            }
            other => panic!("{name}: op {other} has no backward check here"),
        }
        check(name, "dx", &dx, &t("dx").1);
        checked += 1;
    }
    assert_eq!(checked, 18, "every layer case of the fixture was checked");
}
