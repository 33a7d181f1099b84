//! Per-op benchmarks on the CPU reference and, when a GPU is present, CUDA.
//!
//! Throughput is reported by criterion as "elements/s" where an element is
//! one floating-point operation (convolutions, linear) or one byte moved
//! (memory-bound ops: read inputs once + write outputs once). Shapes are the
//! ones the three models use. The emulated device is not benchmarked: it
//! exists to check kernel logic, not speed.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

use cellmorph::backend::cuda_device_count;
use cellmorph::geometry::{Conv2dGeom, Conv2dParams, ConvTranspose2dParams, Pool2dParams};
use cellmorph::ops::{self, Codebook, VqOut};
use cellmorph::{Backend, Device, Precision, Tensor};

/// Deterministic pseudo-random values in [-1, 1) (never zeros: zeros can hide
/// wrong indexing and run unrealistically fast).
fn data(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn tensor(be: &Backend, shape: &[usize], seed: u64) -> Tensor {
    let n = shape.iter().product();
    Tensor::from_vec(be, shape, data(n, seed)).expect("bench tensor")
}

fn backends() -> Vec<Backend> {
    let mut v = vec![Backend::cpu()];
    if cuda_device_count() > 0 {
        match Backend::new(Device::Cuda(0)) {
            Ok(be) => v.push(be),
            Err(e) => eprintln!("CUDA present but not usable: {e}"),
        }
    } else {
        eprintln!("skipped: no CUDA device (CPU benches only)");
    }
    v
}

/// [`backends`] plus, on CUDA, the tensor-core precisions (bf16, f16).
fn conv_backends() -> Vec<Backend> {
    let mut v = backends();
    if cuda_device_count() > 0 {
        for p in [Precision::Bf16, Precision::F16] {
            if let Ok(be) = Backend::new(Device::Cuda(0)) {
                v.push(be.with_precision(p));
            }
        }
    }
    v
}

/// The benchmark id of `label` on `be`: device, and precision when reduced.
fn conv_id(label: &str, be: &Backend) -> BenchmarkId {
    if be.precision().is_reduced() {
        BenchmarkId::new(label, format!("{}-{}", be.device(), be.precision()))
    } else {
        BenchmarkId::new(label, be.device())
    }
}

/// (label, x shape, weight shape, stride, padding)
type ConvCase = (&'static str, [usize; 4], [usize; 4], usize, usize);

const CONVS: &[ConvCase] = &[
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
];

fn conv(c: &mut Criterion) {
    let mut g = c.benchmark_group("conv2d");
    g.sample_size(10);
    for be in conv_backends() {
        for &(label, xs, ws, s, p) in CONVS {
            let params = Conv2dParams::new(s, p);
            let geom = Conv2dGeom::new(&xs, &ws, params).expect("bench shape");
            let x = tensor(&be, &xs, 1);
            let w = tensor(&be, &ws, 2);
            let b = tensor(&be, &[ws[0]], 3);
            let mut y = Tensor::zeros(&be, &geom.out_shape()).expect("output");
            g.throughput(Throughput::Elements(geom.flops() as u64));
            g.bench_function(conv_id(label, &be), |bench| {
                bench.iter(|| {
                    ops::conv2d_into(&be, &x, &w, Some(&b), params, &mut y).expect("conv2d");
                    be.synchronize().expect("sync");
                })
            });
        }
        if be.precision().is_reduced() {
            continue; // transposed convs and linear layers always run in f32
        }
        // The VQ-VAE-2 decoder's upsampling: 64 → 64 channels, 20×20 → 40×40.
        let x = tensor(&be, &[8, 64, 20, 20], 4);
        let w = tensor(&be, &[64, 64, 4, 4], 5);
        let p = ConvTranspose2dParams::new(2, 1);
        let flops = 2.0 * (8 * 64 * 20 * 20) as f64 * (64 * 16) as f64;
        let mut y = Tensor::zeros(&be, &[8, 64, 40, 40]).expect("output");
        g.throughput(Throughput::Elements(flops as u64));
        g.bench_function(
            BenchmarkId::new("conv_transpose_4x4s2_64", be.device()),
            |bench| {
                bench.iter(|| {
                    ops::conv_transpose2d_into(&be, &x, &w, None, p, &mut y)
                        .expect("conv_transpose2d");
                    be.synchronize().expect("sync");
                })
            },
        );
        // DenseNet121 head: 1024 → 64 over a batch of 256.
        let x = tensor(&be, &[256, 1024], 6);
        let w = tensor(&be, &[64, 1024], 7);
        let mut y = Tensor::zeros(&be, &[256, 64]).expect("output");
        g.throughput(Throughput::Elements(2 * 256 * 1024 * 64));
        g.bench_function(
            BenchmarkId::new("linear_256x1024x64", be.device()),
            |bench| {
                bench.iter(|| {
                    ops::linear_into(&be, &x, &w, None, &mut y).expect("linear");
                    be.synchronize().expect("sync");
                })
            },
        );
        // Its backward (input, weight and bias gradients): twice the FLOPs.
        let dy = tensor(&be, &[256, 64], 8);
        let mut dx = Tensor::zeros(&be, &[256, 1024]).expect("dx");
        let mut dw = Tensor::zeros(&be, &[64, 1024]).expect("dw");
        let mut db = Tensor::zeros(&be, &[64]).expect("db");
        g.throughput(Throughput::Elements(4 * 256 * 1024 * 64));
        g.bench_function(
            BenchmarkId::new("linear_backward_256x1024x64", be.device()),
            |bench| {
                bench.iter(|| {
                    ops::linear_backward_into(&be, &x, &w, &dy, &mut dx, &mut dw, Some(&mut db))
                        .expect("linear_backward");
                    be.synchronize().expect("sync");
                })
            },
        );
    }
    g.finish();
}

/// Convolution backward (input, weight and bias gradients together) on the
/// models' conv shapes, f32: the training step's dominant cost.
fn conv_backward(c: &mut Criterion) {
    let mut g = c.benchmark_group("conv2d_backward");
    g.sample_size(10);
    for be in backends() {
        for &(label, xs, ws, s, p) in CONVS {
            let params = Conv2dParams::new(s, p);
            let geom = Conv2dGeom::new(&xs, &ws, params).expect("bench shape");
            let x = tensor(&be, &xs, 1);
            let w = tensor(&be, &ws, 2);
            let dy = tensor(&be, &geom.out_shape(), 3);
            let mut dx = Tensor::zeros(&be, &xs).expect("dx");
            let mut dw = Tensor::zeros(&be, &ws).expect("dw");
            let mut db = Tensor::zeros(&be, &[ws[0]]).expect("db");
            // dgrad and wgrad each cost the forward's FLOPs.
            g.throughput(Throughput::Elements(2 * geom.flops() as u64));
            g.bench_function(BenchmarkId::new(label, be.device()), |bench| {
                bench.iter(|| {
                    ops::conv2d_backward_into(
                        &be,
                        &x,
                        &w,
                        &dy,
                        params,
                        &mut dx,
                        &mut dw,
                        Some(&mut db),
                    )
                    .expect("conv2d_backward");
                    be.synchronize().expect("sync");
                })
            });
        }
    }
    g.finish();
}

fn memory_bound(c: &mut Criterion) {
    let mut g = c.benchmark_group("memory_bound");
    g.sample_size(10);
    let shape = [16, 128, 56, 56];
    let n: usize = shape.iter().product();
    let bytes = (n * 4) as u64;
    for be in backends() {
        let x = tensor(&be, &shape, 11);
        let x2 = tensor(&be, &shape, 12);
        let ch = [shape[1]];
        let gamma = tensor(&be, &ch, 13);
        let beta = tensor(&be, &ch, 14);
        let mean = tensor(&be, &ch, 15);
        let var = Tensor::from_vec(
            &be,
            &ch,
            data(ch[0], 16).iter().map(|v| v.abs() + 0.5).collect(),
        )
        .expect("var");
        let mut y = Tensor::zeros(&be, &shape).expect("output");
        let dev = be.device();

        g.throughput(Throughput::Bytes(2 * bytes));
        g.bench_function(BenchmarkId::new("relu", dev), |b| {
            b.iter(|| {
                ops::relu_into(&be, &x, &mut y).expect("relu");
                be.synchronize().expect("sync");
            })
        });
        g.bench_function(BenchmarkId::new("batchnorm_relu", dev), |b| {
            b.iter(|| {
                ops::batchnorm_relu_into(&be, &x, &gamma, &beta, &mean, &var, 1e-5, &mut y)
                    .expect("bn");
                be.synchronize().expect("sync");
            })
        });
        g.bench_function(BenchmarkId::new("dropout_p0.5", dev), |b| {
            b.iter(|| {
                ops::dropout_into(&be, &x, 1, 2, 0.5, &mut y).expect("dropout");
                be.synchronize().expect("sync");
            })
        });
        // Training-mode BatchNorm, forward (statistics and output) and backward.
        let (mut rm, mut rv) = (
            mean.to_device(&be).expect("rm"),
            var.to_device(&be).expect("rv"),
        );
        let (mut sm, mut si) = (
            Tensor::zeros(&be, &ch).expect("save_mean"),
            Tensor::zeros(&be, &ch).expect("save_inv_std"),
        );
        g.bench_function(BenchmarkId::new("batchnorm_train", dev), |b| {
            b.iter(|| {
                ops::batchnorm_train_into(
                    &be, &x, &gamma, &beta, 1e-5, 0.1, &mut rm, &mut rv, &mut sm, &mut si, &mut y,
                )
                .expect("bn train");
                be.synchronize().expect("sync");
            })
        });
        let (mut dg, mut db) = (
            Tensor::zeros(&be, &ch).expect("dgamma"),
            Tensor::zeros(&be, &ch).expect("dbeta"),
        );
        g.throughput(Throughput::Bytes(3 * bytes));
        g.bench_function(BenchmarkId::new("batchnorm_train_backward", dev), |b| {
            b.iter(|| {
                ops::batchnorm_train_backward_into(
                    &be, &x, &gamma, &sm, &si, &x2, &mut y, &mut dg, &mut db,
                )
                .expect("bn train backward");
                be.synchronize().expect("sync");
            })
        });
        g.bench_function(BenchmarkId::new("add", dev), |b| {
            b.iter(|| {
                ops::add_into(&be, &x, &x2, &mut y).expect("add");
                be.synchronize().expect("sync");
            })
        });

        let pool = Pool2dParams::new(3, 2, 1);
        let mut yp = Tensor::zeros(&be, &[16, 128, 28, 28]).expect("output");
        g.throughput(Throughput::Bytes(bytes + bytes / 4));
        g.bench_function(BenchmarkId::new("max_pool_3x3s2", dev), |b| {
            b.iter(|| {
                ops::max_pool2d_into(&be, &x, pool, &mut yp).expect("max_pool");
                be.synchronize().expect("sync");
            })
        });
        let pool2 = Pool2dParams::new(2, 2, 0);
        g.bench_function(BenchmarkId::new("avg_pool_2x2", dev), |b| {
            b.iter(|| {
                ops::avg_pool2d_into(&be, &x, pool2, &mut yp).expect("avg_pool");
                be.synchronize().expect("sync");
            })
        });
        let mut yg = Tensor::zeros(&be, &[16, 128]).expect("output");
        g.throughput(Throughput::Bytes(bytes));
        g.bench_function(BenchmarkId::new("global_avg_pool", dev), |b| {
            b.iter(|| {
                ops::global_avg_pool_into(&be, &x, &mut yg).expect("gap");
                be.synchronize().expect("sync");
            })
        });
        let small = tensor(&be, &[16, 64, 28, 28], 17);
        let mut yu = Tensor::zeros(&be, &[16, 64, 56, 56]).expect("output");
        g.throughput(Throughput::Bytes((16 * 64 * 28 * 28 * 4 * 5) as u64));
        g.bench_function(BenchmarkId::new("upsample_nearest2x", dev), |b| {
            b.iter(|| {
                ops::upsample_nearest2x_into(&be, &small, &mut yu).expect("upsample");
                be.synchronize().expect("sync");
            })
        });
        let mut cat = Tensor::zeros(&be, &[16, 192, 28, 28]).expect("output");
        g.throughput(Throughput::Bytes((16 * 64 * 28 * 28 * 4 * 2) as u64));
        g.bench_function(BenchmarkId::new("copy_channels", dev), |b| {
            b.iter(|| {
                ops::copy_channels_into(&be, &small, &mut cat, 128).expect("copy");
                be.synchronize().expect("sync");
            })
        });
        let logits = tensor(&be, &[4096, 1000], 18);
        let mut ys = Tensor::zeros(&be, &[4096, 1000]).expect("output");
        g.throughput(Throughput::Bytes(2 * 4096 * 1000 * 4));
        g.bench_function(BenchmarkId::new("softmax_4096x1000", dev), |b| {
            b.iter(|| {
                ops::softmax_into(&be, &logits, 1, &mut ys).expect("softmax");
                be.synchronize().expect("sync");
            })
        });
    }
    g.finish();
}

/// VQ lookup and code histograms at the paper's sizes: 256 patches of 160×160
/// give a 40×40 bottom map; D = 64 and K = 64, 512. Bytes = the input read
/// once + the codes written once (the codebook is negligible), so GB/s here
/// compares directly with the device's memory bandwidth.
fn vq(c: &mut Criterion) {
    let mut g = c.benchmark_group("vq");
    g.sample_size(10);
    for be in backends() {
        let dev = be.device();
        let (n, d, h, w) = (256usize, 64usize, 40usize, 40usize);
        let x = tensor(&be, &[n, d, h, w], 21);
        for k in [64usize, 512] {
            let cb = Codebook::new(&be, tensor(&be, &[d, k], 22 + k as u64)).expect("codebook");
            let mut ids = Tensor::<i32>::zeros(&be, &[n, h, w]).expect("ids");
            g.throughput(Throughput::Bytes((n * h * w * (d * 4 + 4)) as u64));
            g.bench_function(BenchmarkId::new(format!("lookup_d64_k{k}"), dev), |b| {
                b.iter(|| {
                    let out = VqOut {
                        ids: &mut ids,
                        quant: None,
                        err: None,
                    };
                    ops::vq_lookup_into(&be, &x, &cb, out).expect("vq");
                    be.synchronize().expect("sync");
                })
            });
        }
        let codes: Vec<i32> = data(n * h * w, 31)
            .iter()
            .map(|v| ((v + 1.0) * 31.9) as i32)
            .collect();
        let ids = Tensor::from_vec(&be, &[n, h, w], codes).expect("ids");
        let mut hist = Tensor::<i32>::zeros(&be, &[n, 64]).expect("hist");
        g.throughput(Throughput::Bytes((n * h * w * 4) as u64));
        g.bench_function(BenchmarkId::new("histogram_k64", dev), |b| {
            b.iter(|| {
                ops::code_histogram_accumulate(&be, &ids, None, &mut hist).expect("hist");
                be.synchronize().expect("sync");
            })
        });
    }
    g.finish();
}

criterion_group!(benches, conv, conv_backward, memory_bound, vq);
criterion_main!(benches);
