//! `cellmorph cp2image`: single-cell images from CellProfiler features —
//! generate, manipulate one feature, interpolate between cells or group
//! means, and the helpers that make the inputs (standardization file,
//! seeded random generator weights).

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};

use cellmorph::apps::cp2image::features::{FeatureColumns, FeatureTable, Standardizer};
use cellmorph::apps::cp2image::generator::generate;
use cellmorph::apps::cp2image::sheets::{CropSet, DisplayScale, Sheet, Tile};
use cellmorph::apps::cp2image::vectors::{
    cosine_similarity, linear_path, linspace, manipulation, nearest_row, replacement_path,
    resolve_feature,
};
use cellmorph::io::TensorFile;
use cellmorph::models::cp2image::{
    is_untrained, random_generator_weights, Generator, GeneratorConfig,
};
use cellmorph::plot::save_png;
use cellmorph::{Backend, Device, Error, Precision, Result};

use super::open_device;

#[derive(Subcommand, Debug)]
pub enum Cp2ImageCommand {
    /// Generate one image per feature row: a PNG per row in a directory, or
    /// one contact sheet (an --output ending in .png).
    Generate(GenerateArgs),
    /// Vary one feature over a range with the others fixed and draw the row
    /// of images (the paper's Figure 4c).
    Manipulate(ManipulateArgs),
    /// Interpolate from one cell's features to another's, replacing the most
    /// different features first (Figure 5a), or along the straight line
    /// between two group means (--group-means, Figure 5c).
    Interpolate(InterpolateArgs),
    /// Write the per-feature mean/std file the generator's inputs are
    /// standardized with.
    Standardize(StandardizeArgs),
    /// Write a generator with seeded random (untrained) weights, for
    /// examples and benchmarks where no trained generator exists.
    InitWeights(InitWeightsArgs),
}

/// The generator and how to run it.
#[derive(Args, Debug)]
pub struct ModelArgs {
    /// Generator weights (safetensors, PyTorch state_dict names).
    #[arg(long)]
    weights: PathBuf,
    /// Standardization file [default: <weights stem>.standardize.json beside the weights].
    #[arg(long)]
    standardize: Option<PathBuf>,
    /// cpu, cuda, cuda:N or emulated.
    #[arg(long, default_value = "cpu")]
    device: Device,
    /// Convolution precision: f32 (reference), or bf16/f16 on tensor cores
    /// (operands rounded, f32 accumulation).
    #[arg(long, default_value = "f32")]
    precision: Precision,
    /// Images per device batch.
    #[arg(long, default_value_t = 256)]
    batch_size: usize,
}

/// Real crops to show beside the generated images, and the display size.
#[derive(Args, Debug)]
pub struct DisplayArgs {
    /// Real crops (safetensors with tensor `crops` u8 [N, C, S, S]; the
    /// feature table's first column is the crop index), e.g.
    /// ../shared/data/single_cells/cells.safetensors.
    #[arg(long)]
    crops: Option<PathBuf>,
    /// Magnification of the tiles in contact sheets.
    #[arg(long, default_value_t = 2)]
    zoom: usize,
}

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Feature table (CSV, one row per cell; first column the row id).
    #[arg(long)]
    features: PathBuf,
    /// A directory (one <row id>.png per row) or a contact sheet (*.png).
    #[arg(long)]
    output: PathBuf,
    /// Only these rows (ids from the first column, comma-separated).
    #[arg(long, value_delimiter = ',')]
    rows: Vec<String>,
    /// At most this many rows (the first ones, after --rows).
    #[arg(long)]
    limit: Option<usize>,
    /// Cells per sheet row.
    #[arg(long, default_value_t = 8)]
    columns: usize,
    #[command(flatten)]
    display: DisplayArgs,
}

#[derive(Args, Debug)]
pub struct ManipulateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Feature table (CSV, one row per cell; first column the row id);
    /// needed with --row.
    #[arg(long)]
    features: Option<PathBuf>,
    /// The feature to vary, by name or 0-based index.
    #[arg(long)]
    feature: String,
    /// The cell whose other features stay fixed [default: the mean cell,
    /// all features 0 SD].
    #[arg(long, requires = "features")]
    row: Option<String>,
    /// First value, in standard deviations from the feature's mean.
    #[arg(long, default_value_t = -3.0, allow_negative_numbers = true)]
    from: f64,
    /// Last value, in standard deviations from the feature's mean.
    #[arg(long, default_value_t = 3.0, allow_negative_numbers = true)]
    to: f64,
    /// Number of images.
    #[arg(long, default_value_t = 7)]
    steps: usize,
    /// Contact sheet to write (*.png).
    #[arg(long)]
    output: PathBuf,
    #[command(flatten)]
    display: DisplayArgs,
}

#[derive(Args, Debug)]
pub struct InterpolateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Feature table (CSV, one row per cell; first column the row id).
    #[arg(long)]
    features: PathBuf,
    /// Start cell (row id).
    #[arg(long, required_unless_present = "group_means")]
    from_row: Option<String>,
    /// Target cell (row id).
    #[arg(long, required_unless_present = "group_means")]
    to_row: Option<String>,
    /// Features replaced per step, most different first (the paper used 50).
    #[arg(long, default_value_t = 50)]
    per_step: usize,
    /// Interpolate on the straight line between two group means instead.
    #[arg(long, conflicts_with_all = ["from_row", "to_row"], requires_all = ["from_group", "to_group"])]
    group_means: bool,
    /// The non-feature column that defines the groups.
    #[arg(long, default_value = "field")]
    group_column: String,
    /// Start group (a value of --group-column).
    #[arg(long)]
    from_group: Option<String>,
    /// Target group (a value of --group-column).
    #[arg(long)]
    to_group: Option<String>,
    /// Images on the line between group means, ends included.
    #[arg(long, default_value_t = 8)]
    steps: usize,
    /// Contact sheet to write (*.png).
    #[arg(long)]
    output: PathBuf,
    #[command(flatten)]
    display: DisplayArgs,
}

#[derive(Args, Debug)]
pub struct StandardizeArgs {
    /// Feature table (CSV, one row per cell; first column the row id).
    #[arg(long)]
    features: PathBuf,
    /// Only these features (a file with one name per line, e.g.
    /// feature_names.txt) [default: every column but the first and field,
    /// centroid_y, centroid_x].
    #[arg(long)]
    feature_names: Option<PathBuf>,
    /// Where to write the JSON.
    #[arg(long, required_unless_present = "weights")]
    output: Option<PathBuf>,
    /// Write <weights stem>.standardize.json beside these weights instead.
    #[arg(long, conflicts_with = "output")]
    weights: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct InitWeightsArgs {
    /// Number of input features p (405 for ../shared/data/single_cells).
    #[arg(long)]
    features: usize,
    /// Output weights (safetensors).
    #[arg(long)]
    output: PathBuf,
    /// Random seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Channels c0,…,cB (the paper's by default).
    #[arg(long, value_delimiter = ',', default_values_t = [256usize, 128, 64, 32, 16])]
    channels: Vec<usize>,
}

pub fn run(cmd: Cp2ImageCommand) -> Result<()> {
    match cmd {
        Cp2ImageCommand::Generate(a) => run_generate(a),
        Cp2ImageCommand::Manipulate(a) => run_manipulate(a),
        Cp2ImageCommand::Interpolate(a) => run_interpolate(a),
        Cp2ImageCommand::Standardize(a) => run_standardize(a),
        Cp2ImageCommand::InitWeights(a) => run_init_weights(a),
    }
}

/// Display stretch of contact sheets: each channel to this percentile.
const PERCENTILE: f64 = 99.5;

/// The title line that says how the sheet shows the images.
const DISPLAY_TITLE: &str = "DISPLAY: CHANNELS 0/1/2 AS BLUE/GREEN/RED, EACH TO ITS 99.5TH PERCENTILE (REAL AND GENERATED SEPARATELY)";

/// The title line that says the weights are not a trained model.
const UNTRAINED_TITLE: &str =
    "UNTRAINED GENERATOR (SEEDED RANDOM WEIGHTS): THE IMAGES SHOW THE PIPELINE, NOT CELLS";

/// A loaded generator with its standardization.
struct Loaded {
    be: Backend,
    generator: Generator,
    standardizer: Standardizer,
    untrained: bool,
    batch_size: usize,
}

impl Loaded {
    fn open(m: &ModelArgs) -> Result<Self> {
        if m.batch_size == 0 {
            return Err(Error::invalid("--batch-size must be at least 1"));
        }
        let file = TensorFile::open(&m.weights)?;
        let untrained = is_untrained(&file).map(str::to_string);
        let be = open_device(m.device, m.precision)?;
        let generator = Generator::from_file(&be, &file)?;
        let std_path = m
            .standardize
            .clone()
            .unwrap_or_else(|| Standardizer::default_path(&m.weights));
        if !std_path.is_file() {
            return Err(Error::invalid(format!(
                "no standardization file {}: create it with `cellmorph cp2image standardize --features TRAINING.csv --weights {}` or pass --standardize",
                std_path.display(),
                m.weights.display()
            )));
        }
        let standardizer = Standardizer::read(&std_path)?;
        standardizer
            .check_generator(generator.config().n_features)
            .map_err(|e| Error::format(&std_path, e.to_string()))?;
        eprintln!("generator: {}", generator.config());
        if let Some(note) = &untrained {
            eprintln!(
                "note: {} is an UNTRAINED generator ({note}); its images show what the pipeline does, not what cells with these features look like",
                m.weights.display()
            );
        }
        Ok(Loaded {
            be,
            generator,
            standardizer,
            untrained: untrained.is_some(),
            batch_size: m.batch_size,
        })
    }

    fn table(&self, path: &Path) -> Result<FeatureTable> {
        FeatureTable::read_csv(path, FeatureColumns::Named(&self.standardizer.features))
    }

    fn generate(&self, z: &[f32]) -> Result<Vec<f32>> {
        generate(&self.be, &self.generator, z, self.batch_size)
    }

    fn image_len(&self) -> usize {
        let c = self.generator.config();
        c.out_channels * c.image_size() * c.image_size()
    }

    fn title(&self, lines: Vec<String>) -> Vec<String> {
        let mut t = lines;
        t.push(DISPLAY_TITLE.to_string());
        if self.untrained {
            t.push(UNTRAINED_TITLE.to_string());
        }
        t
    }
}

/// Real crops for the sheet and the tiles' magnification.
struct Display {
    crops: Option<CropSet>,
    zoom: usize,
}

impl Display {
    fn open(a: &DisplayArgs) -> Result<Self> {
        if a.zoom == 0 || a.zoom > 16 {
            return Err(Error::invalid("--zoom must be 1 … 16"));
        }
        Ok(Display {
            crops: a.crops.as_ref().map(CropSet::read).transpose()?,
            zoom: a.zoom,
        })
    }

    /// The crop indices of these row ids (empty without --crops).
    fn crop_indices(&self, ids: &[&str]) -> Result<Vec<usize>> {
        match &self.crops {
            None => Ok(Vec::new()),
            Some(c) => ids.iter().map(|id| c.index_of(id)).collect(),
        }
    }

    /// The shown crops' display scale (each channel to its 99.5th
    /// percentile); full range without crops.
    fn real_scale(&self, shown: &[usize], channels: usize) -> Result<DisplayScale> {
        match &self.crops {
            Some(c) if !shown.is_empty() => {
                if c.channels != channels {
                    return Err(Error::invalid(format!(
                        "the crops have {} channels but the generator makes {channels}",
                        c.channels
                    )));
                }
                DisplayScale::from_crops(c, shown, PERCENTILE)
            }
            _ => Ok(DisplayScale::unit(channels)),
        }
    }

    fn real_tile(
        &self,
        scale: &DisplayScale,
        index: usize,
        caption: String,
    ) -> Result<Option<Tile>> {
        let Some(c) = &self.crops else {
            return Ok(None);
        };
        Ok(Some(Tile {
            image: scale.render(&c.crop(index)?, c.size, self.zoom)?,
            caption,
        }))
    }
}

/// The display scale of generated images `[N, C, S, S]`: each channel to
/// its 99.5th percentile over all of them.
fn generated_scale(l: &Loaded, images: &[f32]) -> Result<DisplayScale> {
    let cfg = l.generator.config();
    let plane = cfg.image_size() * cfg.image_size();
    DisplayScale::from_images(images, cfg.out_channels, plane, PERCENTILE)
}

/// Tiles of generated images `[N, C, S, S]`.
fn generated_tiles(
    l: &Loaded,
    scale: &DisplayScale,
    zoom: usize,
    images: &[f32],
    captions: impl IntoIterator<Item = String>,
) -> Result<Vec<Tile>> {
    let size = l.generator.config().image_size();
    images
        .chunks_exact(l.image_len())
        .zip(captions)
        .map(|(img, caption)| {
            Ok(Tile {
                image: scale.render(img, size, zoom)?,
                caption,
            })
        })
        .collect()
}

fn is_png(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("png"))
}

fn require_png(path: &Path) -> Result<()> {
    if is_png(path) {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "{}: the contact sheet is a PNG; use a .png file name",
            path.display()
        )))
    }
}

/// A file name made of the row id's safe characters.
fn file_stem(id: &str) -> String {
    id.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn run_generate(a: GenerateArgs) -> Result<()> {
    if a.columns == 0 {
        return Err(Error::invalid("--columns must be at least 1"));
    }
    let l = Loaded::open(&a.model)?;
    let table = l.table(&a.features)?;
    let mut rows: Vec<usize> = if a.rows.is_empty() {
        (0..table.n_rows()).collect()
    } else {
        a.rows
            .iter()
            .map(|id| table.row_index(id.trim()))
            .collect::<Result<_>>()?
    };
    if let Some(limit) = a.limit {
        rows.truncate(limit);
    }
    if rows.is_empty() {
        return Err(Error::invalid("no rows selected"));
    }
    let mut z = Vec::with_capacity(rows.len() * table.n_features());
    for &r in &rows {
        z.extend(l.standardizer.apply(table.row(r)?)?);
    }
    let images = l.generate(&z)?;
    let ids: Vec<&str> = rows.iter().map(|&r| table.ids[r].as_str()).collect();
    let cfg = l.generator.config();

    if !is_png(&a.output) {
        std::fs::create_dir_all(&a.output).map_err(|e| Error::io(&a.output, e))?;
        let unit = DisplayScale::unit(cfg.out_channels);
        for (img, id) in images.chunks_exact(l.image_len()).zip(&ids) {
            let path = a.output.join(format!("{}.png", file_stem(id)));
            save_png(&path, &unit.render(img, cfg.image_size(), 1)?)?;
        }
        println!(
            "wrote {} images to {} (8-bit RGB: channel 0 blue, 1 green, 2 red, value × 255)",
            ids.len(),
            a.output.display()
        );
        return Ok(());
    }

    let display = Display::open(&a.display)?;
    let crops = display.crop_indices(&ids)?;
    let scale = display.real_scale(&crops, cfg.out_channels)?;
    let mut sheet = Sheet {
        title: l.title(vec![format!(
            "CP2IMAGE: {} CELLS FROM {}",
            ids.len(),
            a.features
                .file_name()
                .map(|f| f.to_string_lossy())
                .unwrap_or_default()
        )]),
        rows: Vec::new(),
    };
    let per_image = l.image_len();
    let gen_scale = generated_scale(&l, &images)?;
    for (k, chunk) in ids.chunks(a.columns).enumerate() {
        let start = k * a.columns;
        if !crops.is_empty() {
            let tiles = chunk
                .iter()
                .enumerate()
                .map(|(j, id)| display.real_tile(&scale, crops[start + j], format!("#{id}")))
                .collect::<Result<Vec<_>>>()?;
            sheet
                .rows
                .push(("REAL".into(), tiles.into_iter().flatten().collect()));
        }
        let imgs = &images[start * per_image..(start + chunk.len()) * per_image];
        let tiles = generated_tiles(
            &l,
            &gen_scale,
            display.zoom,
            imgs,
            chunk.iter().map(|id| format!("#{id}")),
        )?;
        sheet.rows.push(("GENERATED".into(), tiles));
    }
    sheet.save(&a.output)?;
    println!("wrote {} ({} cells)", a.output.display(), ids.len());
    Ok(())
}

fn run_manipulate(a: ManipulateArgs) -> Result<()> {
    require_png(&a.output)?;
    let l = Loaded::open(&a.model)?;
    let names = &l.standardizer.features;
    let feature = resolve_feature(names, &a.feature)?;
    let values = linspace(a.from, a.to, a.steps)?;
    let display = Display::open(&a.display)?;
    let (base, base_label, real) = match (&a.row, &a.features) {
        (Some(id), Some(path)) => {
            let t = l.table(path)?;
            let crop = display.crop_indices(&[id])?;
            (
                l.standardizer.apply(t.row(t.row_index(id)?)?)?,
                format!("CELL #{id}"),
                crop.first().map(|&c| (c, format!("REAL #{id}"))),
            )
        }
        (Some(_), None) => return Err(Error::invalid("--row needs --features")),
        (None, _) => (vec![0.0; names.len()], "THE MEAN CELL".to_string(), None),
    };
    let z = manipulation(&base, feature, &values)?;
    let images = l.generate(&z)?;
    let shown: Vec<usize> = real.iter().map(|(c, _)| *c).collect();
    let scale = display.real_scale(&shown, l.generator.config().out_channels)?;
    let (mean, sd) = (l.standardizer.mean[feature], l.standardizer.std[feature]);
    println!("step\tz (sd)\t{}", names[feature]);
    for (k, v) in values.iter().enumerate() {
        println!("{k}\t{v:+.3}\t{}", mean + v * sd);
    }
    let mut tiles = Vec::new();
    if let Some((c, caption)) = real {
        tiles.extend(display.real_tile(&scale, c, caption)?);
    }
    tiles.extend(generated_tiles(
        &l,
        &generated_scale(&l, &images)?,
        display.zoom,
        &images,
        values.iter().map(|v| format!("{v:+.1} SD")),
    )?);
    let sheet = Sheet {
        title: l.title(vec![
            format!("FEATURE {feature}: {}", names[feature]),
            format!(
                "VARIED FROM {:+.1} TO {:+.1} SD (RAW {:.4} TO {:.4}); OTHER FEATURES FIXED AT {base_label}",
                a.from,
                a.to,
                mean + a.from * sd,
                mean + a.to * sd
            ),
        ]),
        rows: vec![(String::new(), tiles)],
    };
    sheet.save(&a.output)?;
    println!("wrote {}", a.output.display());
    Ok(())
}

fn run_interpolate(a: InterpolateArgs) -> Result<()> {
    require_png(&a.output)?;
    let l = Loaded::open(&a.model)?;
    let table = l.table(&a.features)?;
    let display = Display::open(&a.display)?;
    let p = table.n_features();

    let (z_to, path, title, ends) = if a.group_means {
        let (from_g, to_g) = match (&a.from_group, &a.to_group) {
            (Some(f), Some(t)) => (f, t),
            _ => {
                return Err(Error::invalid(
                    "--group-means needs --from-group and --to-group",
                ))
            }
        };
        let from_rows = table.group_rows(&a.group_column, from_g)?;
        let to_rows = table.group_rows(&a.group_column, to_g)?;
        let z_from = l.standardizer.apply(&table.mean_of(&from_rows)?)?;
        let z_to = l.standardizer.apply(&table.mean_of(&to_rows)?)?;
        let path = linear_path(&z_from, &z_to, a.steps)?;
        // The real cells nearest to each group mean stand at the ends.
        let z_all = l.standardizer.apply_table(&table)?;
        let end = |target: &[f32]| {
            nearest_row(&z_all, p, target).map(|r| (r, format!("NEAREST #{}", table.ids[r])))
        };
        let ends = [end(&z_from), end(&z_to)];
        let title = vec![
            format!(
                "MEAN OF {col} = {from_g} ({} CELLS) TO MEAN OF {col} = {to_g} ({} CELLS), {} STEPS ON THE STRAIGHT LINE",
                from_rows.len(),
                to_rows.len(),
                a.steps,
                col = a.group_column,
            ),
            "CAPTIONS: COSINE SIMILARITY TO THE TARGET MEAN (STANDARDIZED FEATURES); ENDS: THE NEAREST REAL CELLS".into(),
        ];
        (z_to, path, title, ends)
    } else {
        let (from_id, to_id) = match (&a.from_row, &a.to_row) {
            (Some(f), Some(t)) => (f, t),
            _ => {
                return Err(Error::invalid(
                    "give --from-row and --to-row, or --group-means",
                ))
            }
        };
        let (from_r, to_r) = (table.row_index(from_id)?, table.row_index(to_id)?);
        let z_from = l.standardizer.apply(table.row(from_r)?)?;
        let z_to = l.standardizer.apply(table.row(to_r)?)?;
        let path = replacement_path(&z_from, &z_to, a.per_step)?;
        let title = vec![
            format!(
                "CELL #{from_id} TO CELL #{to_id}: THE {} MOST DIFFERENT OF {p} FEATURES REPLACED PER STEP",
                a.per_step
            ),
            "CAPTIONS: COSINE SIMILARITY TO THE TARGET (STANDARDIZED FEATURES)".into(),
        ];
        let ends = [
            Some((from_r, format!("REAL #{from_id}"))),
            Some((to_r, format!("REAL #{to_id}"))),
        ];
        (z_to, path, title, ends)
    };
    let cos: Vec<f64> = path
        .chunks_exact(p)
        .map(|v| cosine_similarity(v, &z_to))
        .collect();
    println!("step\tcosine similarity to target");
    for (k, c) in cos.iter().enumerate() {
        println!("{k}\t{c:.4}");
    }
    let images = l.generate(&path)?;

    // The ends' crops (table row → crop index by the row id).
    let end_crops = ends
        .iter()
        .map(|e| match (e, &display.crops) {
            (Some((r, caption)), Some(c)) => {
                Ok(Some((c.index_of(&table.ids[*r])?, caption.clone())))
            }
            _ => Ok(None),
        })
        .collect::<Result<Vec<_>>>()?;
    let shown: Vec<usize> = end_crops.iter().flatten().map(|(c, _)| *c).collect();
    let scale = display.real_scale(&shown, l.generator.config().out_channels)?;
    let end_tile = |e: &Option<(usize, String)>| match e {
        Some((c, caption)) => display.real_tile(&scale, *c, caption.clone()),
        None => Ok(None),
    };
    let mut tiles: Vec<Tile> = end_tile(&end_crops[0])?.into_iter().collect();
    tiles.extend(generated_tiles(
        &l,
        &generated_scale(&l, &images)?,
        display.zoom,
        &images,
        cos.iter().map(|c| format!("COS {c:.3}")),
    )?);
    tiles.extend(end_tile(&end_crops[1])?);
    let sheet = Sheet {
        title: l.title(title),
        rows: vec![(String::new(), tiles)],
    };
    sheet.save(&a.output)?;
    println!("wrote {}", a.output.display());
    Ok(())
}

fn run_standardize(a: StandardizeArgs) -> Result<()> {
    let names: Option<Vec<String>> = a
        .feature_names
        .as_ref()
        .map(|p| {
            let text = std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?;
            Ok::<_, Error>(
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(str::to_string)
                    .collect(),
            )
        })
        .transpose()?;
    let columns = match &names {
        Some(n) => FeatureColumns::Named(n),
        None => FeatureColumns::AllButMetadata,
    };
    let table = FeatureTable::read_csv(&a.features, columns)?;
    let s = Standardizer::fit(&table)?;
    let out = match (a.output, a.weights) {
        (Some(o), _) => o,
        (None, Some(w)) => Standardizer::default_path(&w),
        (None, None) => return Err(Error::invalid("give --output or --weights")),
    };
    s.write(&out)?;
    let n = table.n_rows();
    let constant = (0..s.len())
        .filter(|&i| (1..n).all(|r| table.values[r * s.len() + i] == table.values[i]))
        .count();
    println!(
        "wrote {}: {} features from {} cells{}",
        out.display(),
        s.len(),
        table.n_rows(),
        if constant > 0 {
            format!(" ({constant} constant, given deviation 1)")
        } else {
            String::new()
        }
    );
    Ok(())
}

fn run_init_weights(a: InitWeightsArgs) -> Result<()> {
    let config = GeneratorConfig {
        n_features: a.features,
        channels: a.channels,
        out_channels: 3,
    };
    random_generator_weights(&config, a.seed)?.write(&a.output)?;
    println!(
        "wrote {}: an UNTRAINED generator with seeded random weights (seed {}), {config}",
        a.output.display(),
        a.seed
    );
    Ok(())
}
