//! Load VQ-VAE-2 weights and turn images into code-frequency profiles, the
//! features of the expression-from-morphology study: every image is cut
//! into 160×160 patches, each patch encoded to top and bottom codes, and the
//! codes counted into `log2((c + 1) / Σ(c + 1))` per code.
//!
//! ```sh
//! cargo run --release --example profile_images -- [WEIGHTS [IMAGE…]]
//! ```
//! Without arguments it uses the small test weights and the real images in
//! `tests/data` (seeded random weights: the profiles show the mechanics,
//! not biology). Add `cuda` as the `CELLMORPH_DEVICE` environment variable
//! to run on a GPU.

use std::path::PathBuf;

use cellmorph::apps::expression::profile::{profile_samples, ProfileOptions};
use cellmorph::imaging::SampleImage;
use cellmorph::models::VqVae2;
use cellmorph::{Backend, Device};

fn main() -> cellmorph::Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut args = std::env::args().skip(1);
    let weights = args
        .next()
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("tests/fixtures/vqvae2_small.weights.safetensors"));
    let mut images: Vec<PathBuf> = args.map(PathBuf::from).collect();
    if images.is_empty() {
        images = ["bbbc007/A9/A9_p5d.png", "examplefly/01_POS002_D.png"]
            .iter()
            .map(|p| root.join("tests/data").join(p))
            .collect();
    }

    let device: Device = std::env::var("CELLMORPH_DEVICE")
        .unwrap_or_else(|_| "cpu".into())
        .parse()?;
    let be = Backend::new(device)?;
    let model = VqVae2::load(&be, &weights)?;
    println!("{}: {}", weights.display(), model.config());

    // One sample per image here; a sample with several images pools them.
    let list: Vec<SampleImage> = images
        .iter()
        .map(|p| SampleImage {
            sample: p
                .file_stem()
                .map_or("image".into(), |s| s.to_string_lossy().into()),
            path: p.clone(),
        })
        .collect();
    let opts = ProfileOptions {
        progress: false,
        ..ProfileOptions::default()
    };
    let report = profile_samples(&be, &model, &list, opts)?;
    for s in &report.samples {
        let k = s.counts_t.len();
        let live_t = s.counts_t.iter().filter(|&&c| c > 0).count();
        let live_b = s.counts_b.iter().filter(|&&c| c > 0).count();
        println!(
            "{}: {} patches, {live_t}/{k} top and {live_b}/{k} bottom codes used, profile[..4] = {:.3?}",
            s.sample,
            s.patches,
            &s.profile[..4]
        );
    }
    for s in &report.skipped {
        println!("skipped {}: {}", s.path.display(), s.reason);
    }
    Ok(())
}
