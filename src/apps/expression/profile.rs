//! Images to sample profiles: every image of a sample is cut into
//! non-overlapping patches, the patches go through the VQ-VAE-2 encoder in
//! device batches (never written to disk), the top and bottom codes are
//! counted per sample, and the counts become the log2 profile of [reference](crate::reference) §1.
//! Memory stays bounded by one image plus one batch of patches.
//! [`profile_files`] is `cellmorph profile`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::imaging::{read_gray, read_sample_list_with, PatchStream, SampleColumns, SampleImage};
use crate::io::TensorFile;
use crate::models::vqvae2::{check_patch, mse_8bit, profile, sum_histograms, VqVae2, VqVae2Config};
use crate::table::Table;
use crate::tensor::Tensor;

/// Options of [`profile_samples`].
#[derive(Clone, Copy, Debug)]
pub struct ProfileOptions {
    /// Patch side in pixels (160 in the paper).
    pub patch: usize,
    /// Patches per device batch.
    pub batch: usize,
    /// Also decode every patch and report the reconstruction MSE in 8-bit
    /// units (the paper's Figure 3 check); costs the decoder's time.
    pub mse: bool,
    /// Show a progress bar on stderr.
    pub progress: bool,
}

impl Default for ProfileOptions {
    fn default() -> Self {
        ProfileOptions {
            patch: 160,
            batch: 32,
            mse: false,
            progress: true,
        }
    }
}

/// Code counts and profile of one sample.
#[derive(Clone, Debug)]
pub struct SampleProfile {
    /// Sample name.
    pub sample: String,
    /// Images that contributed.
    pub images: usize,
    /// Patches that contributed.
    pub patches: usize,
    /// Top-code counts `c_t[k]`.
    pub counts_t: Vec<u64>,
    /// Bottom-code counts `c_b[k]`.
    pub counts_b: Vec<u64>,
    /// `2·n_embed` profile values, top block first.
    pub profile: Vec<f32>,
}

/// An image that was left out, and why.
#[derive(Clone, Debug)]
pub struct SkippedImage {
    /// The sample it belonged to.
    pub sample: String,
    /// The image file.
    pub path: PathBuf,
    /// Why it was skipped.
    pub reason: String,
}

/// What [`profile_samples`] produced.
#[derive(Clone, Debug)]
pub struct ProfileReport {
    /// One profile per sample with at least one usable image, in order of
    /// first appearance in the list.
    pub samples: Vec<SampleProfile>,
    /// Images that could not be used.
    pub skipped: Vec<SkippedImage>,
    /// Mean reconstruction MSE in 8-bit units over all patches, when asked.
    pub mse_8bit: Option<f64>,
    /// Codebook size.
    pub n_embed: usize,
}

impl ProfileReport {
    /// The profiles as a table: rows = samples, columns `top0..`, `bottom0..`.
    pub fn to_table(&self) -> Result<Table> {
        let k = self.n_embed;
        let cols: Vec<String> = (0..k)
            .map(|i| format!("top{i}"))
            .chain((0..k).map(|i| format!("bottom{i}")))
            .collect();
        let rows = self.samples.iter().map(|s| s.sample.clone()).collect();
        let data = self
            .samples
            .iter()
            .flat_map(|s| s.profile.iter().map(|&v| f64::from(v)))
            .collect();
        Table::new(rows, cols, data)
    }

    /// Writes the raw counts behind the profiles as CSV: `sample, images,
    /// patches, top0..top{K-1}, bottom0..bottom{K-1}`, integers, one row per
    /// sample in the profile's order (the profile is `log2((c + 1) / Σ(c +
    /// 1))` of each level's counts).
    pub fn write_counts(&self, path: &Path) -> Result<()> {
        let k = self.n_embed;
        let mut w = crate::csv::CsvWriter::new();
        let header: Vec<String> = ["sample".to_string(), "images".into(), "patches".into()]
            .into_iter()
            .chain((0..k).map(|i| format!("top{i}")))
            .chain((0..k).map(|i| format!("bottom{i}")))
            .collect();
        w.record(&header);
        for s in &self.samples {
            let row: Vec<String> = [
                s.sample.clone(),
                s.images.to_string(),
                s.patches.to_string(),
            ]
            .into_iter()
            .chain(s.counts_t.iter().chain(&s.counts_b).map(u64::to_string))
            .collect();
            w.record(&row);
        }
        w.write(path)
    }
}

/// Runs every image of `list` through `model` and returns per-sample
/// profiles. Unreadable images and images smaller than one patch are skipped
/// and reported; a sample left without images is reported too. Fails when no
/// sample has a usable image.
pub fn profile_samples(
    be: &Backend,
    model: &VqVae2,
    list: &[SampleImage],
    opts: ProfileOptions,
) -> Result<ProfileReport> {
    if opts.batch == 0 {
        return Err(Error::invalid("--batch-size must be at least 1"));
    }
    check_patch(opts.patch)?;
    if opts.mse && !model.has_decoder() {
        return Err(Error::invalid(
            "the reconstruction MSE needs the decoder (upsample_t.*, dec.*), which these weights do not have",
        ));
    }
    let k = model.config().n_embed;
    let bar = crate::apps::progress_bar(list.len() as u64, "images");
    if !opts.progress {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let mut samples: Vec<SampleProfile> = Vec::new();
    let mut skipped = Vec::new();
    let mut mse_sum = 0.0f64;
    let mut mse_patches = 0usize;
    for item in list {
        bar.inc(1);
        let skip = |reason: String| SkippedImage {
            sample: item.sample.clone(),
            path: item.path.clone(),
            reason,
        };
        let img = match read_gray(&item.path) {
            Ok(img) => img,
            Err(e) => {
                skipped.push(skip(e.to_string()));
                continue;
            }
        };
        let mut stream = match PatchStream::new(&img, opts.patch, opts.batch) {
            Ok(s) => s,
            Err(e) => {
                skipped.push(skip(e.to_string()));
                continue;
            }
        };
        let mut hist_t = Tensor::<i32>::zeros(be, &[1, k])?;
        let mut hist_b = Tensor::<i32>::zeros(be, &[1, k])?;
        let mut patches = 0usize;
        while let Some(batch) = stream.next_batch()? {
            let n = batch.indices.len();
            let x = Tensor::from_slice(be, &[n, 1, opts.patch, opts.patch], batch.data)?;
            // Every patch of the batch counts into the image's one segment.
            model.encode_histograms(be, &x, Some(&[0, n]), &mut hist_t, &mut hist_b)?;
            if opts.mse {
                let enc = model.encode(be, &x)?;
                let dec = model.decode(be, &enc.quant_t, &enc.quant_b)?;
                mse_sum += f64::from(mse_8bit(&dec, &x)?) * n as f64;
                mse_patches += n;
            }
            patches += n;
        }
        let (ct, cb) = (sum_histograms(&hist_t)?, sum_histograms(&hist_b)?);
        let entry = match samples.iter().position(|s| s.sample == item.sample) {
            Some(i) => &mut samples[i],
            None => {
                samples.push(SampleProfile {
                    sample: item.sample.clone(),
                    images: 0,
                    patches: 0,
                    counts_t: vec![0; k],
                    counts_b: vec![0; k],
                    profile: Vec::new(),
                });
                let last = samples.len() - 1;
                &mut samples[last]
            }
        };
        entry.images += 1;
        entry.patches += patches;
        entry
            .counts_t
            .iter_mut()
            .zip(&ct)
            .for_each(|(a, b)| *a += b);
        entry
            .counts_b
            .iter_mut()
            .zip(&cb)
            .for_each(|(a, b)| *a += b);
    }
    bar.finish_and_clear();
    for s in &mut samples {
        s.profile = profile(&s.counts_t, &s.counts_b)?;
    }
    for item in list {
        if !samples.iter().any(|s| s.sample == item.sample)
            && !skipped
                .iter()
                .any(|s| s.sample == item.sample && s.reason.starts_with("no usable image"))
        {
            skipped.push(SkippedImage {
                sample: item.sample.clone(),
                path: PathBuf::new(),
                reason: "no usable image: the sample has no profile".into(),
            });
        }
    }
    if samples.is_empty() {
        return Err(Error::invalid(format!(
            "none of the {} images could be used (first problem: {})",
            list.len(),
            skipped.first().map_or("none", |s| s.reason.as_str())
        )));
    }
    Ok(ProfileReport {
        samples,
        skipped,
        mse_8bit: (mse_patches > 0).then(|| mse_sum / mse_patches as f64),
        n_embed: k,
    })
}

/// Per-patch profiles of one image: the patch grid and one profile per patch.
#[derive(Clone, Debug)]
pub struct PatchProfiles {
    /// Patch rows.
    pub rows: usize,
    /// Patch columns.
    pub cols: usize,
    /// One `2·n_embed` profile per patch, row-major.
    pub profiles: Vec<Vec<f32>>,
}

/// Per-patch profiles of one image, for patch-wise maps (each patch's own
/// histogram, no averaging over the sample).
pub fn patch_profiles(
    be: &Backend,
    model: &VqVae2,
    image: &Path,
    patch: usize,
    batch: usize,
) -> Result<PatchProfiles> {
    check_patch(patch)?;
    let img = read_gray(image)?;
    let mut stream =
        PatchStream::new(&img, patch, batch).map_err(|e| Error::format(image, e.to_string()))?;
    let (rows, cols) = (stream.grid().rows(), stream.grid().cols());
    let k = model.config().n_embed;
    let mut out = Vec::with_capacity(stream.grid().len());
    while let Some(b) = stream.next_batch()? {
        let n = b.indices.len();
        let x = Tensor::from_slice(be, &[n, 1, patch, patch], b.data)?;
        let mut ht = Tensor::<i32>::zeros(be, &[n, k])?;
        let mut hb = Tensor::<i32>::zeros(be, &[n, k])?;
        // No offsets: one histogram per patch.
        model.encode_histograms(be, &x, None, &mut ht, &mut hb)?;
        let (ht, hb) = (ht.to_vec()?, hb.to_vec()?);
        for p in 0..n {
            let to_u64 = |row: &[i32]| row.iter().map(|&c| c.max(0) as u64).collect::<Vec<_>>();
            out.push(profile(
                &to_u64(&ht[p * k..(p + 1) * k]),
                &to_u64(&hb[p * k..(p + 1) * k]),
            )?);
        }
    }
    Ok(PatchProfiles {
        rows,
        cols,
        profiles: out,
    })
}

/// What [`profile_files`] reads and writes.
#[derive(Clone, Debug)]
pub struct ProfileFilesOptions {
    /// Sample list CSV (one line per image; see
    /// [`crate::imaging::read_sample_list_with`]).
    pub samples: PathBuf,
    /// Which columns of the sample list hold the sample and the image path.
    pub columns: SampleColumns,
    /// VQ-VAE-2 weights (safetensors, vq-vae-2-pytorch names).
    pub weights: PathBuf,
    /// Output profile CSV: sample, top0..top{K-1}, bottom0..bottom{K-1}.
    pub output: PathBuf,
    /// Also the raw code counts ([`ProfileReport::write_counts`]).
    pub counts: Option<PathBuf>,
    /// Patch and batch size, reconstruction MSE, progress bar.
    pub profile: ProfileOptions,
}

/// What [`profile_files`] did.
#[derive(Clone, Debug)]
pub struct ProfileFilesSummary {
    /// The VQ-VAE-2 that ran.
    pub model: VqVae2Config,
    /// The weights' `cellmorph` metadata note, present on untrained
    /// (seeded random) weights.
    pub untrained: Option<String>,
    /// The profiles, skipped images and MSE.
    pub report: ProfileReport,
    /// Seconds the profiling took.
    pub seconds: f64,
}

/// `cellmorph profile`: every image of a sample list through the VQ-VAE-2
/// on `be` ([`profile_samples`]); writes the profile CSV.
pub fn profile_files(be: &Backend, o: &ProfileFilesOptions) -> Result<ProfileFilesSummary> {
    let list = read_sample_list_with(&o.samples, &o.columns)?;
    let model = VqVae2::load(be, &o.weights)?;
    if o.profile.mse && !model.has_decoder() {
        return Err(Error::invalid(format!(
            "--mse needs the decoder (upsample_t.*, dec.*), which {} does not have; without --mse these weights profile fine",
            o.weights.display()
        )));
    }
    // `vqvae2 init` and the demo write a note starting "untrained"; trained
    // weights carry a note too, saying how they were trained.
    let untrained = TensorFile::open(&o.weights)?
        .metadata()
        .and_then(|m| m.get("cellmorph").cloned())
        .filter(|note| note.starts_with("untrained"));
    let t0 = Instant::now();
    let report = profile_samples(be, &model, &list, o.profile)?;
    let seconds = t0.elapsed().as_secs_f64();
    report.to_table()?.write_csv(&o.output)?;
    if let Some(path) = &o.counts {
        report.write_counts(path)?;
    }
    Ok(ProfileFilesSummary {
        model: *model.config(),
        untrained,
        report,
        seconds,
    })
}
