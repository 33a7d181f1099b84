//! Screen a folder of images with a DenseNet: the pre-processing of Kim et
//! al. (value channel, bright fields skipped, mean V scaled to 130, resized
//! to 226×306), one probability of the positive class per image.
//!
//! ```sh
//! cargo run --release --example screen_folder -- [WEIGHTS [FOLDER]]
//! ```
//! Without arguments it runs the small test DenseNet (seeded weights, five
//! classes) over the real images in `tests/data`.

use std::path::PathBuf;

use cellmorph::apps::screening::images::list_images;
use cellmorph::apps::screening::predict::{predict, PredictOptions};
use cellmorph::apps::screening::preprocess::Preprocess;
use cellmorph::models::DenseNet;
use cellmorph::Backend;

fn main() -> cellmorph::Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut args = std::env::args().skip(1);
    let weights = args.next().map_or_else(
        || root.join("tests/fixtures/densenet_small.weights.safetensors"),
        PathBuf::from,
    );
    let folder = args
        .next()
        .map_or_else(|| root.join("tests/data/bbbc007/A9"), PathBuf::from);

    let be = Backend::cpu();
    let model = DenseNet::load(&be, &weights)?;
    let list = list_images(&folder)?;
    let options = PredictOptions {
        batch_size: 4,
        preprocess: Preprocess {
            channels: model.config().in_channels,
            ..Preprocess::default()
        },
        threshold: 0.5,
        positive_class: 1,
        keep_features: false,
        cam_dir: None,
        saliency: None,
    };
    let run = predict(&be, &model, &list.entries, &options, |_| {})?;
    for p in &run.predictions {
        match &p.outcome {
            Ok(v) => println!(
                "{}: p = {:.3} ({}), mean V {:.1}",
                p.id,
                v.probability,
                if v.positive { "positive" } else { "negative" },
                v.mean_v
            ),
            Err(why) => println!("{}: skipped ({why})", p.id),
        }
    }
    println!("{:.1} images/s", run.timing.images_per_second());
    Ok(())
}
