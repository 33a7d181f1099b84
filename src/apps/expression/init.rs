//! An untrained VQ-VAE-2 for running the pipeline before a trained model
//! exists: convolution weights drawn as PyTorch's default initialization
//! (uniform in ±1/√fan_in, seeded), codebooks seeded from encoder outputs on
//! the user's patches by k-means++ so that many codes are in use. Its codes
//! describe local texture, not learned morphology; say so wherever it is used.

use std::path::Path;

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::io::{TensorFile, TensorWriter};
use crate::models::vqvae2::{VqVae2, VqVae2Config};
use crate::rng::SplitMix64;
use crate::tensor::Tensor;

/// Every tensor of a vq-vae-2-pytorch `VQVAE` with `cfg`: (name, shape),
/// following [reference](crate::reference) §1.
pub fn vqvae2_tensor_shapes(cfg: &VqVae2Config) -> Vec<(String, Vec<usize>)> {
    let (c, r, d, k) = (cfg.channel, cfg.n_res_channel, cfg.embed_dim, cfg.n_embed);
    let mut v: Vec<(String, Vec<usize>)> = Vec::new();
    let mut conv = |name: String, o: usize, i: usize, kh: usize| {
        v.push((format!("{name}.weight"), vec![o, i, kh, kh]));
        v.push((format!("{name}.bias"), vec![o]));
    };
    let res = |conv: &mut dyn FnMut(String, usize, usize, usize), p: String| {
        conv(format!("{p}.conv.1"), r, c, 3);
        conv(format!("{p}.conv.3"), c, r, 1);
    };
    // enc_b (stride 4)
    conv("enc_b.blocks.0".into(), c / 2, cfg.in_channel, 4);
    conv("enc_b.blocks.2".into(), c, c / 2, 4);
    conv("enc_b.blocks.4".into(), c, c, 3);
    for i in 0..cfg.n_res_block {
        res(&mut conv, format!("enc_b.blocks.{}", 5 + i));
    }
    // enc_t (stride 2)
    conv("enc_t.blocks.0".into(), c / 2, c, 4);
    conv("enc_t.blocks.2".into(), c, c / 2, 3);
    for i in 0..cfg.n_res_block {
        res(&mut conv, format!("enc_t.blocks.{}", 3 + i));
    }
    conv("quantize_conv_t".into(), d, c, 1);
    // dec_t (stride 2): conv, res blocks, ReLU, transposed conv [in, out, 4, 4]
    conv("dec_t.blocks.0".into(), c, d, 3);
    for i in 0..cfg.n_res_block {
        res(&mut conv, format!("dec_t.blocks.{}", 1 + i));
    }
    let up_t = 2 + cfg.n_res_block;
    conv("quantize_conv_b".into(), d, d + c, 1);
    // dec (stride 4)
    conv("dec.blocks.0".into(), c, 2 * d, 3);
    for i in 0..cfg.n_res_block {
        res(&mut conv, format!("dec.blocks.{}", 1 + i));
    }
    let up = 2 + cfg.n_res_block;
    // Transposed convolutions keep PyTorch's [in, out, kh, kw] layout.
    let mut tconv = |name: String, i: usize, o: usize| {
        v.push((format!("{name}.weight"), vec![i, o, 4, 4]));
        v.push((format!("{name}.bias"), vec![o]));
    };
    tconv(format!("dec_t.blocks.{up_t}"), c, d);
    tconv("upsample_t".into(), d, d);
    tconv(format!("dec.blocks.{up}"), c, c / 2);
    tconv(format!("dec.blocks.{}", up + 2), c / 2, cfg.in_channel);
    for q in ["quantize_t", "quantize_b"] {
        v.push((format!("{q}.embed"), vec![d, k]));
        v.push((format!("{q}.embed_avg"), vec![d, k]));
        v.push((format!("{q}.cluster_size"), vec![k]));
    }
    v
}

/// Checks that the tensors of `file` (a trainable VQ-VAE-2 `state_dict` or
/// checkpoint, whose configuration `cfg` was read off it) are exactly those
/// of [`vqvae2_tensor_shapes`], each with its shape; a checkpoint's
/// optimizer state (`optimizer.*`) is left to the checkpoint loader. An
/// error names the file and the first tensor that is missing, extra or of
/// another shape.
pub fn check_vqvae2_tensors(file: &TensorFile, cfg: &VqVae2Config) -> Result<()> {
    let expected = vqvae2_tensor_shapes(cfg);
    for (name, shape) in &expected {
        match file.shape(name) {
            None => {
                return Err(Error::format(
                    file.path(),
                    format!("missing tensor {name:?} (a VQ-VAE-2 of {cfg} has it)"),
                ))
            }
            Some(s) if s != shape.as_slice() => {
                return Err(Error::format(
                    file.path(),
                    format!("tensor {name:?} has shape {s:?}; a VQ-VAE-2 of {cfg} needs {shape:?}"),
                ))
            }
            Some(_) => {}
        }
    }
    let known: std::collections::HashSet<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
    if let Some(extra) = file.names().into_iter().find(|n| {
        !known.contains(n.as_str()) && !n.starts_with(crate::train::checkpoint::OPTIMIZER_PREFIX)
    }) {
        return Err(Error::format(
            file.path(),
            format!("unexpected tensor {extra:?}: not part of a VQ-VAE-2 of {cfg}"),
        ));
    }
    Ok(())
}

/// Seeded weights for `cfg` with random codebooks (to be replaced by
/// [`seed_codebooks`]).
pub fn random_vqvae2(cfg: &VqVae2Config, seed: u64) -> Result<TensorWriter> {
    if cfg.channel < 2 || !cfg.channel.is_multiple_of(2) {
        return Err(Error::invalid(format!(
            "channel must be even, got {}",
            cfg.channel
        )));
    }
    let mut rng = SplitMix64::new(seed);
    let mut w = TensorWriter::new();
    for (name, shape) in vqvae2_tensor_shapes(cfg) {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = if name.ends_with("cluster_size") {
            vec![1.0; n]
        } else if name.contains("embed") {
            (0..n).map(|_| rng.normal() as f32).collect()
        } else {
            // PyTorch's default for Conv2d/ConvTranspose2d: U(±1/√fan_in), with
            // fan_in = shape[1]·kh·kw (for transposed convs that is out·kh·kw,
            // as PyTorch computes it from the stored tensor).
            let fan_in = if shape.len() == 4 {
                shape[1] * shape[2] * shape[3]
            } else {
                // a bias: the fan-in of its weight, found by name
                weight_fan_in(cfg, &name)
            };
            let bound = 1.0 / (fan_in.max(1) as f64).sqrt();
            (0..n).map(|_| rng.uniform(-bound, bound) as f32).collect()
        };
        w.add_slice(&name, &shape, &data)?;
    }
    w.set_metadata("cellmorph", "untrained VQ-VAE-2: seeded random weights");
    Ok(w)
}

fn weight_fan_in(cfg: &VqVae2Config, bias: &str) -> usize {
    let weight = bias.replace(".bias", ".weight");
    vqvae2_tensor_shapes(cfg)
        .into_iter()
        .find(|(n, _)| *n == weight)
        .map_or(1, |(_, s)| s.iter().skip(1).product())
}

/// k-means++ seeding: `k` rows of `points` (`n × d`, row-major), the first
/// uniformly at random, each next one with probability proportional to its
/// squared distance to the nearest chosen row. Returns the chosen rows
/// (`k × d`). Fewer than `k` distinct points: duplicates are allowed.
pub fn kmeans_pp(points: &[f32], d: usize, k: usize, rng: &mut SplitMix64) -> Result<Vec<f32>> {
    let n = points.len() / d.max(1);
    if n == 0 || d == 0 || points.len() != n * d || k == 0 {
        return Err(Error::invalid(format!(
            "k-means++: {} values are not rows of {d} with {k} centres",
            points.len()
        )));
    }
    let row = |i: usize| &points[i * d..(i + 1) * d];
    let dist = |a: &[f32], b: &[f32]| -> f64 {
        a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)).sum()
    };
    let mut centres: Vec<f32> = row(rng.below(n)).to_vec();
    let mut nearest: Vec<f64> = (0..n).map(|i| dist(row(i), &centres[..d])).collect();
    while centres.len() < k * d {
        let total: f64 = nearest.iter().sum();
        let pick = if total > 0.0 {
            let mut t = rng.next_f64() * total;
            let mut pick = n - 1;
            for (i, &w) in nearest.iter().enumerate() {
                if t < w {
                    pick = i;
                    break;
                }
                t -= w;
            }
            pick
        } else {
            rng.below(n)
        };
        let c = row(pick).to_vec();
        for (i, m) in nearest.iter_mut().enumerate() {
            *m = m.min(dist(row(i), &c));
        }
        centres.extend(c);
    }
    Ok(centres)
}

/// `[N, D, h, w]` → `N·h·w` rows of `D` (channels last), as the quantizer sees them.
fn positions(t: &Tensor) -> Result<(usize, Vec<f32>)> {
    let s = t.shape().to_vec();
    let [n, d, h, w] = s[..] else {
        return Err(Error::invalid(format!("expected a 4-D tensor, got {s:?}")));
    };
    let data = t.to_vec()?;
    let mut out = Vec::with_capacity(data.len());
    for b in 0..n {
        for p in 0..h * w {
            out.extend((0..d).map(|c| data[(b * d + c) * h * w + p]));
        }
    }
    Ok((d, out))
}

fn codebook_columns(centres: &[f32], d: usize, k: usize) -> Vec<f32> {
    // `embed` is [D, K]: column k is code k.
    let mut e = vec![0.0; d * k];
    for j in 0..k {
        for c in 0..d {
            e[c * k + j] = centres[j * d + c];
        }
    }
    e
}

/// Replaces both codebooks of `weights` by k-means++ seeds drawn from the
/// encoder's outputs on `patches` (`[N, in_channel, P, P]`, scaled to
/// [−1, 1]): the top one from `pre_t`, then the bottom one from `pre_b`
/// computed with the new top codebook. Writes the result to `out`.
pub fn seed_codebooks(
    be: &Backend,
    weights: &TensorFile,
    patches: &Tensor,
    seed: u64,
    out: &Path,
) -> Result<()> {
    seeded_codebooks(be, weights, patches, seed)?.write(out)
}

/// [`seed_codebooks`], returning the weights instead of writing them (the
/// caller may add metadata). `embed_avg` equals `embed` and the cluster
/// sizes are kept (1 from [`random_vqvae2`]), so the EMA buffers agree
/// with the codebooks.
pub fn seeded_codebooks(
    be: &Backend,
    weights: &TensorFile,
    patches: &Tensor,
    seed: u64,
) -> Result<TensorWriter> {
    let cfg = VqVae2Config::from_weights(weights)?;
    let k = cfg.n_embed;
    let mut rng = SplitMix64::new(seed ^ 0x5EED_C0DE);
    let copy_with = |file: &TensorFile, replace: &[(&str, Vec<f32>)]| -> Result<TensorWriter> {
        let mut w = TensorWriter::new();
        for name in file.names() {
            let (shape, data) = file.f32(&name)?;
            let data = replace
                .iter()
                .find(|(n, _)| *n == name)
                .map_or(data, |(_, v)| v.clone());
            w.add_slice(&name, &shape, &data)?;
        }
        w.set_metadata(
            "cellmorph",
            "untrained VQ-VAE-2: seeded random weights, codebooks seeded by k-means++ on data",
        );
        Ok(w)
    };

    let model = VqVae2::from_file(be, weights)?;
    let (pre_t, _) = model.pre_quantize_top(be, patches)?;
    let (d, pts) = positions(&pre_t)?;
    let top = codebook_columns(&kmeans_pp(&pts, d, k, &mut rng)?, d, k);
    let with_top = copy_with(
        weights,
        &[
            ("quantize_t.embed", top.clone()),
            ("quantize_t.embed_avg", top),
        ],
    )?;
    let with_top = TensorFile::from_bytes(weights.path(), with_top.to_bytes()?)?;

    let model = VqVae2::from_file(be, &with_top)?;
    let (pre_t, enc_b) = model.pre_quantize_top(be, patches)?;
    let (_, quant_t) = model.quantize_top(be, &pre_t)?;
    let pre_b = model.pre_quantize_bottom(be, &quant_t, &enc_b)?;
    let (d, pts) = positions(&pre_b)?;
    let bottom = codebook_columns(&kmeans_pp(&pts, d, k, &mut rng)?, d, k);
    copy_with(
        &with_top,
        &[
            ("quantize_b.embed", bottom.clone()),
            ("quantize_b.embed_avg", bottom),
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_match_the_paper_fixture_exactly() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let paper = dir.join("vqvae2_paper.weights.seeded.safetensors");
        let paper = TensorFile::from_bytes(&paper, crate::io::expand_seeded(&paper).unwrap());
        let small = TensorFile::open(dir.join("vqvae2_small.weights.safetensors"));
        for f in [paper, small] {
            let f = f.unwrap();
            let p = f.path().to_path_buf();
            let cfg = VqVae2Config::from_weights(&f).unwrap();
            let mut ours = vqvae2_tensor_shapes(&cfg);
            ours.sort();
            let theirs: Vec<(String, Vec<usize>)> = f
                .names()
                .into_iter()
                .map(|n| {
                    let s = f.shape(&n).unwrap().to_vec();
                    (n, s)
                })
                .collect();
            assert_eq!(ours, theirs, "{}", p.display());
        }
    }

    #[test]
    fn kmeans_pp_picks_distinct_far_points() {
        // Three tight clusters: three centres must land in three clusters.
        let mut pts = Vec::new();
        for c in [0.0f32, 10.0, 20.0] {
            for i in 0..20 {
                pts.extend([c + i as f32 * 1e-3, -c]);
            }
        }
        let mut rng = SplitMix64::new(7);
        let centres = kmeans_pp(&pts, 2, 3, &mut rng).unwrap();
        let mut xs: Vec<i32> = centres
            .chunks(2)
            .map(|c| (c[0] / 10.0).round() as i32)
            .collect();
        xs.sort();
        assert_eq!(xs, vec![0, 1, 2]);
        assert!(kmeans_pp(&pts, 7, 3, &mut rng).is_err());
    }
}
