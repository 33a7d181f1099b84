//! The CP2Image commands that draw: [`generate_images`] (one image per
//! feature row, as PNG files or a contact sheet), [`manipulate_feature`]
//! (one feature varied, Figure 4c) and [`interpolate`] (cell to cell,
//! Figure 5a, or group mean to group mean, Figure 5c). Each loads the
//! generator ([`LoadedGenerator`]), makes the feature vectors
//! ([`super::vectors`]), generates, and writes its output; the returned
//! summary says what was drawn.

use std::path::{Path, PathBuf};

use super::generator::{GeneratorInfo, GeneratorOptions, LoadedGenerator};
use super::sheets::{CropSet, DisplayScale, Sheet, Tile};
use super::vectors::{
    cosine_similarity, linear_path, linspace, manipulation, nearest_row, replacement_path,
    resolve_feature,
};
use crate::backend::Backend;
use crate::plot::save_png;
use crate::{Error, Result};

/// Display stretch of contact sheets: each channel to this percentile.
const PERCENTILE: f64 = 99.5;

/// The title line that says how the sheet shows the images.
const DISPLAY_TITLE: &str = "DISPLAY: CHANNELS 0/1/2 AS BLUE/GREEN/RED, EACH TO ITS 99.5TH PERCENTILE (REAL AND GENERATED SEPARATELY)";

/// The title line that says the weights are not a trained model.
const UNTRAINED_TITLE: &str =
    "UNTRAINED GENERATOR (SEEDED RANDOM WEIGHTS): THE IMAGES SHOW THE PIPELINE, NOT CELLS";

/// Real crops to show beside the generated images, and the display size.
#[derive(Clone, Debug, PartialEq)]
pub struct DisplayOptions {
    /// Real crops (safetensors with tensor `crops` u8 `[N, C, S, S]`; the
    /// feature table's first column is the crop index).
    pub crops: Option<PathBuf>,
    /// Magnification of the tiles in contact sheets (1 … 16).
    pub zoom: usize,
}

impl Default for DisplayOptions {
    fn default() -> Self {
        DisplayOptions {
            crops: None,
            zoom: 2,
        }
    }
}

/// What [`generate_images`] draws.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerateOptions {
    /// The generator.
    pub generator: GeneratorOptions,
    /// Feature table (CSV, one row per cell; first column the row id).
    pub features: PathBuf,
    /// A directory (one `<row id>.png` per row) or a contact sheet (`*.png`).
    pub output: PathBuf,
    /// Only these rows (ids from the first column); empty: every row.
    pub rows: Vec<String>,
    /// At most this many rows (the first ones, after `rows`).
    pub limit: Option<usize>,
    /// Cells per sheet row.
    pub columns: usize,
    /// Real crops and magnification (contact sheets only).
    pub display: DisplayOptions,
}

/// Where [`generate_images`] wrote its images.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GeneratedOutput {
    /// One 8-bit RGB PNG per row in the output directory (channel 0 blue,
    /// 1 green, 2 red, value × 255).
    Directory,
    /// One contact sheet.
    Sheet,
}

/// What [`generate_images`] did.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerateSummary {
    /// The generator it ran.
    pub generator: GeneratorInfo,
    /// Images generated.
    pub images: usize,
    /// PNG files in a directory, or one sheet.
    pub output: GeneratedOutput,
}

/// `cellmorph cp2image generate`: one image per selected feature row,
/// written as PNG files into a directory or as one contact sheet (an
/// `output` ending in `.png`) with the real crops above the generated
/// images when `display.crops` is given.
pub fn generate_images(be: &Backend, o: &GenerateOptions) -> Result<GenerateSummary> {
    if o.columns == 0 {
        return Err(Error::invalid("--columns must be at least 1"));
    }
    let l = LoadedGenerator::open(be, &o.generator)?;
    let table = l.read_table(&o.features)?;
    let mut rows: Vec<usize> = if o.rows.is_empty() {
        (0..table.n_rows()).collect()
    } else {
        o.rows
            .iter()
            .map(|id| table.row_index(id.trim()))
            .collect::<Result<_>>()?
    };
    if let Some(limit) = o.limit {
        rows.truncate(limit);
    }
    if rows.is_empty() {
        return Err(Error::invalid("no rows selected"));
    }
    let mut z = Vec::with_capacity(rows.len() * table.n_features());
    for &r in &rows {
        z.extend(l.standardizer.apply(table.row(r)?)?);
    }
    let images = l.generate(be, &z)?;
    let ids: Vec<&str> = rows.iter().map(|&r| table.ids[r].as_str()).collect();
    let cfg = l.generator.config();
    let summary = |output| GenerateSummary {
        generator: l.info(),
        images: ids.len(),
        output,
    };

    if !is_png(&o.output) {
        std::fs::create_dir_all(&o.output).map_err(|e| Error::io(&o.output, e))?;
        let unit = DisplayScale::unit(cfg.out_channels);
        let mut stems: std::collections::HashMap<String, &str> = std::collections::HashMap::new();
        for id in &ids {
            if let Some(other) = stems.insert(file_stem(id), id) {
                return Err(Error::invalid(format!(
                    "rows {other:?} and {id:?} would both be written as {}.png in {}; select distinct rows",
                    file_stem(id),
                    o.output.display()
                )));
            }
        }
        for (img, id) in images.chunks_exact(l.image_len()).zip(&ids) {
            let path = o.output.join(format!("{}.png", file_stem(id)));
            save_png(&path, &unit.render(img, cfg.image_size(), 1)?)?;
        }
        return Ok(summary(GeneratedOutput::Directory));
    }

    let display = Display::open(&o.display)?;
    let crops = display.crop_indices(&ids)?;
    let scale = display.real_scale(&crops, cfg.out_channels)?;
    let mut sheet = Sheet {
        title: title(
            &l,
            vec![format!(
                "CP2IMAGE: {} CELLS FROM {}",
                ids.len(),
                o.features
                    .file_name()
                    .map(|f| f.to_string_lossy())
                    .unwrap_or_default()
            )],
        ),
        rows: Vec::new(),
    };
    let per_image = l.image_len();
    let gen_scale = generated_scale(&l, &images)?;
    for (k, chunk) in ids.chunks(o.columns).enumerate() {
        let start = k * o.columns;
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
    sheet.save(&o.output)?;
    Ok(summary(GeneratedOutput::Sheet))
}

/// The cell whose other features stay fixed while one is varied.
#[derive(Clone, Debug, PartialEq)]
pub enum ManipulateBase {
    /// The mean cell: every feature at 0 SD.
    MeanCell,
    /// A row of a feature table.
    Row {
        /// Feature table (CSV, one row per cell; first column the row id).
        features: PathBuf,
        /// The row id.
        id: String,
    },
}

/// What [`manipulate_feature`] draws.
#[derive(Clone, Debug, PartialEq)]
pub struct ManipulateOptions {
    /// The generator.
    pub generator: GeneratorOptions,
    /// The feature to vary, by name or 0-based index.
    pub feature: String,
    /// The other features' values.
    pub base: ManipulateBase,
    /// First value, in standard deviations from the feature's mean.
    pub from: f64,
    /// Last value, in standard deviations from the feature's mean.
    pub to: f64,
    /// Number of images.
    pub steps: usize,
    /// Contact sheet to write (`*.png`).
    pub output: PathBuf,
    /// Real crop (with a `Row` base) and magnification.
    pub display: DisplayOptions,
}

/// What [`manipulate_feature`] did.
#[derive(Clone, Debug, PartialEq)]
pub struct ManipulateSummary {
    /// The generator it ran.
    pub generator: GeneratorInfo,
    /// The varied feature's index.
    pub feature: usize,
    /// Its name.
    pub feature_name: String,
    /// The values it took, in standard deviations from its mean, one per image.
    pub z: Vec<f64>,
    /// The same values in the feature's raw units (`mean + z · std`).
    pub raw: Vec<f64>,
}

/// `cellmorph cp2image manipulate`: vary one feature over a range with the
/// others fixed and draw the row of images as a contact sheet (the
/// paper's Figure 4c).
pub fn manipulate_feature(be: &Backend, o: &ManipulateOptions) -> Result<ManipulateSummary> {
    require_png(&o.output)?;
    let l = LoadedGenerator::open(be, &o.generator)?;
    let names = &l.standardizer.features;
    let feature = resolve_feature(names, &o.feature)?;
    let values = linspace(o.from, o.to, o.steps)?;
    let display = Display::open(&o.display)?;
    let (base, base_label, real) = match &o.base {
        ManipulateBase::Row { features, id } => {
            let t = l.read_table(features)?;
            let crop = display.crop_indices(&[id])?;
            (
                l.standardizer.apply(t.row(t.row_index(id)?)?)?,
                format!("CELL #{id}"),
                crop.first().map(|&c| (c, format!("REAL #{id}"))),
            )
        }
        ManipulateBase::MeanCell => (vec![0.0; names.len()], "THE MEAN CELL".to_string(), None),
    };
    let z = manipulation(&base, feature, &values)?;
    let images = l.generate(be, &z)?;
    let shown: Vec<usize> = real.iter().map(|(c, _)| *c).collect();
    let scale = display.real_scale(&shown, l.generator.config().out_channels)?;
    let (mean, sd) = (l.standardizer.mean[feature], l.standardizer.std[feature]);
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
        title: title(
            &l,
            vec![
                format!("FEATURE {feature}: {}", names[feature]),
                format!(
                    "VARIED FROM {:+.1} TO {:+.1} SD (RAW {:.4} TO {:.4}); OTHER FEATURES FIXED AT {base_label}",
                    o.from,
                    o.to,
                    mean + o.from * sd,
                    mean + o.to * sd
                ),
            ],
        ),
        rows: vec![(String::new(), tiles)],
    };
    sheet.save(&o.output)?;
    Ok(ManipulateSummary {
        generator: l.info(),
        feature,
        feature_name: names[feature].clone(),
        raw: values.iter().map(|v| mean + v * sd).collect(),
        z: values,
    })
}

/// The ends of an interpolation.
#[derive(Clone, Debug, PartialEq)]
pub enum InterpolateEnds {
    /// From one cell's features to another's, replacing the most different
    /// features first (Figure 5a).
    Rows {
        /// Start cell (row id).
        from: String,
        /// Target cell (row id).
        to: String,
        /// Features replaced per step (the paper used 50).
        per_step: usize,
    },
    /// Along the straight line between two group means (Figure 5c).
    GroupMeans {
        /// The non-feature column that defines the groups.
        column: String,
        /// Start group (a value of `column`).
        from: String,
        /// Target group.
        to: String,
        /// Images on the line, ends included.
        steps: usize,
    },
}

/// What [`interpolate`] draws.
#[derive(Clone, Debug, PartialEq)]
pub struct InterpolateOptions {
    /// The generator.
    pub generator: GeneratorOptions,
    /// Feature table (CSV, one row per cell; first column the row id).
    pub features: PathBuf,
    /// The ends and the path between them.
    pub ends: InterpolateEnds,
    /// Contact sheet to write (`*.png`).
    pub output: PathBuf,
    /// Real crops of the ends and magnification.
    pub display: DisplayOptions,
}

/// What [`interpolate`] did.
#[derive(Clone, Debug, PartialEq)]
pub struct InterpolateSummary {
    /// The generator it ran.
    pub generator: GeneratorInfo,
    /// Each step's cosine similarity to the target (standardized features).
    pub cosine: Vec<f64>,
}

/// `cellmorph cp2image interpolate`: the images along a path from one cell
/// to another (the most different features replaced first) or between two
/// group means, as a contact sheet with the real cells at the ends.
pub fn interpolate(be: &Backend, o: &InterpolateOptions) -> Result<InterpolateSummary> {
    require_png(&o.output)?;
    let l = LoadedGenerator::open(be, &o.generator)?;
    let table = l.read_table(&o.features)?;
    let display = Display::open(&o.display)?;
    let p = table.n_features();

    let (z_to, path, title_lines, ends) = match &o.ends {
        InterpolateEnds::GroupMeans {
            column,
            from: from_g,
            to: to_g,
            steps,
        } => {
            let from_rows = table.group_rows(column, from_g)?;
            let to_rows = table.group_rows(column, to_g)?;
            let z_from = l.standardizer.apply(&table.mean_of(&from_rows)?)?;
            let z_to = l.standardizer.apply(&table.mean_of(&to_rows)?)?;
            let path = linear_path(&z_from, &z_to, *steps)?;
            // The real cells nearest to each group mean stand at the ends.
            let z_all = l.standardizer.apply_table(&table)?;
            let end = |target: &[f32]| {
                nearest_row(&z_all, p, target).map(|r| (r, format!("NEAREST #{}", table.ids[r])))
            };
            let ends = [end(&z_from), end(&z_to)];
            let title = vec![
                format!(
                    "MEAN OF {column} = {from_g} ({} CELLS) TO MEAN OF {column} = {to_g} ({} CELLS), {steps} STEPS ON THE STRAIGHT LINE",
                    from_rows.len(),
                    to_rows.len(),
                ),
                "CAPTIONS: COSINE SIMILARITY TO THE TARGET MEAN (STANDARDIZED FEATURES); ENDS: THE NEAREST REAL CELLS".into(),
            ];
            (z_to, path, title, ends)
        }
        InterpolateEnds::Rows {
            from: from_id,
            to: to_id,
            per_step,
        } => {
            let (from_r, to_r) = (table.row_index(from_id)?, table.row_index(to_id)?);
            let z_from = l.standardizer.apply(table.row(from_r)?)?;
            let z_to = l.standardizer.apply(table.row(to_r)?)?;
            let path = replacement_path(&z_from, &z_to, *per_step)?;
            let title = vec![
                format!(
                    "CELL #{from_id} TO CELL #{to_id}: THE {per_step} MOST DIFFERENT OF {p} FEATURES REPLACED PER STEP"
                ),
                "CAPTIONS: COSINE SIMILARITY TO THE TARGET (STANDARDIZED FEATURES)".into(),
            ];
            let ends = [
                Some((from_r, format!("REAL #{from_id}"))),
                Some((to_r, format!("REAL #{to_id}"))),
            ];
            (z_to, path, title, ends)
        }
    };
    let cosine: Vec<f64> = path
        .chunks_exact(p)
        .map(|v| cosine_similarity(v, &z_to))
        .collect();
    let images = l.generate(be, &path)?;

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
        cosine.iter().map(|c| format!("COS {c:.3}")),
    )?);
    tiles.extend(end_tile(&end_crops[1])?);
    let sheet = Sheet {
        title: title(&l, title_lines),
        rows: vec![(String::new(), tiles)],
    };
    sheet.save(&o.output)?;
    Ok(InterpolateSummary {
        generator: l.info(),
        cosine,
    })
}

/// The sheet's title: `lines`, how the sheet shows the images, and a
/// warning when the generator is untrained.
fn title(l: &LoadedGenerator, lines: Vec<String>) -> Vec<String> {
    let mut t = lines;
    t.push(DISPLAY_TITLE.to_string());
    if l.untrained.is_some() {
        t.push(UNTRAINED_TITLE.to_string());
    }
    t
}

/// Real crops for the sheet and the tiles' magnification.
struct Display {
    crops: Option<CropSet>,
    zoom: usize,
}

impl Display {
    fn open(o: &DisplayOptions) -> Result<Self> {
        if o.zoom == 0 || o.zoom > 16 {
            return Err(Error::invalid("--zoom must be 1 … 16"));
        }
        Ok(Display {
            crops: o.crops.as_ref().map(CropSet::read).transpose()?,
            zoom: o.zoom,
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
fn generated_scale(l: &LoadedGenerator, images: &[f32]) -> Result<DisplayScale> {
    let cfg = l.generator.config();
    let plane = cfg.image_size() * cfg.image_size();
    DisplayScale::from_images(images, cfg.out_channels, plane, PERCENTILE)
}

/// Tiles of generated images `[N, C, S, S]`.
fn generated_tiles(
    l: &LoadedGenerator,
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
