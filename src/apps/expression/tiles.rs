//! `cellmorph expression tiles`: cuts labelled images into square tiles, one
//! sample per tile, with targets measured from the label masks, so that the
//! profile → SVR study can be run on real images whose "expression" is known
//! from segmentation: the fractional nucleus count and the foreground
//! fraction of each tile.
//!
//! Targets per tile (a label is an instance mask: 0 background, each other
//! value one object):
//! - `nuclei`: Σ over objects of (object pixels inside the tile / object
//!   pixels in the whole image), a count that splits objects cut by the
//!   tile's edge in proportion to their area;
//! - `foreground_fraction`: labelled pixels / tile pixels;
//! - `mean_intensity`: mean pixel value of the tile scaled to [0, 1].
//!
//! Inputs: a CSV with an `image` column, and optionally `labels` (the mask
//! of the same size) and `batch` (any other column is ignored). Outputs in
//! a new or empty folder: the tiles as PNG (the source bit depth), a
//! sample list (`samples.csv`: sample, image, batch, source, x, y) that
//! `profile` and `svr cv --groups/--batches` read, and `targets.csv`
//! (sample, nuclei, foreground_fraction, mean_intensity) that `svr cv
//! --expression` reads. Tiles are cut on a grid from the top-left corner;
//! the remainder at the right and bottom edges is left out.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use crate::csv::{CsvFile, CsvWriter};
use crate::imaging::{read_gray, GrayImage};
use crate::{Error, Result};

/// What [`cut_tiles`] reads and writes.
#[derive(Clone, Debug, PartialEq)]
pub struct TileOptions {
    /// CSV with `image`, optional `labels` and `batch` columns; relative
    /// paths are resolved against its folder.
    pub list: PathBuf,
    /// Tile side in pixels.
    pub size: usize,
    /// Step between tile origins (`size` for non-overlapping tiles).
    pub stride: usize,
    /// Output folder (created; must be empty if it exists).
    pub output: PathBuf,
}

/// One source image of the list.
#[derive(Clone, Debug, PartialEq)]
pub struct TileSource {
    /// The image.
    pub image: PathBuf,
    /// Its instance mask, if given.
    pub labels: Option<PathBuf>,
    /// Its batch ("" when the list has no batch column).
    pub batch: String,
}

/// What [`cut_tiles`] wrote.
#[derive(Clone, Debug, PartialEq)]
pub struct TileSummary {
    /// Tiles (samples) written.
    pub tiles: usize,
    /// Source images.
    pub images: usize,
    /// Tiles per batch.
    pub per_batch: BTreeMap<String, usize>,
    /// Whether targets were measured (every image had labels).
    pub targets: bool,
}

/// The targets of one tile, see the [module](self) header.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TileTargets {
    /// Fractional object count.
    pub nuclei: f64,
    /// Labelled pixels / tile pixels.
    pub foreground_fraction: f64,
    /// Mean scaled intensity.
    pub mean_intensity: f64,
}

/// Reads the tile list: `image` (or `path`) column required, `labels` and
/// `batch` optional; errors name the file and line.
pub fn read_tile_list(path: &Path) -> Result<Vec<TileSource>> {
    let csv = CsvFile::read(path)?;
    let base = path.parent().unwrap_or(Path::new(""));
    let image_col = csv
        .column_ignore_case("image")
        .or_else(|| csv.column_ignore_case("path"))
        .ok_or_else(|| {
            csv.line_error(
                csv.header.line,
                format!(
                    "no `image` column in the header ({})",
                    csv.header.fields.join(",")
                ),
            )
        })?;
    let labels_col = csv.column_ignore_case("labels");
    let batch_col = csv.column_ignore_case("batch");
    let mut out = Vec::with_capacity(csv.rows.len());
    for row in &csv.rows {
        csv.check_width(row)?;
        let image = row.get(image_col);
        if image.is_empty() {
            return Err(csv.cell_error(row.line, image_col, "empty image path"));
        }
        let labels = labels_col
            .map(|c| row.get(c))
            .filter(|s| !s.is_empty())
            .map(|s| base.join(s));
        out.push(TileSource {
            image: base.join(image),
            labels,
            batch: batch_col
                .map(|c| row.get(c).to_string())
                .unwrap_or_default(),
        });
    }
    if out.is_empty() {
        return Err(csv.error("the tile list names no images"));
    }
    Ok(out)
}

/// Targets of the tile at (`x0`, `y0`) of side `size`: the loop nest of the
/// [module](self) header. `areas[l]` is the pixel count of label `l` in the
/// whole mask.
pub fn tile_targets(
    image: &GrayImage,
    labels: &GrayImage,
    areas: &[u64],
    x0: usize,
    y0: usize,
    size: usize,
) -> TileTargets {
    let mut inside: BTreeMap<u16, u64> = BTreeMap::new();
    let mut intensity = 0.0f64;
    let max = f64::from(image.depth().max_value());
    for y in y0..y0 + size {
        for x in x0..x0 + size {
            let l = labels.data()[y * labels.width() + x];
            if l != 0 {
                *inside.entry(l).or_default() += 1;
            }
            intensity += f64::from(image.data()[y * image.width() + x]) / max;
        }
    }
    let pixels = (size * size) as f64;
    let foreground: u64 = inside.values().sum();
    let nuclei = inside
        .iter()
        .map(|(&l, &n)| n as f64 / areas[usize::from(l)] as f64)
        .sum();
    TileTargets {
        nuclei,
        foreground_fraction: foreground as f64 / pixels,
        mean_intensity: intensity / pixels,
    }
}

/// `cellmorph expression tiles`: see the [module](self) header. Every image
/// is read before anything is written (sizes, masks and tile counts checked
/// first), so a bad input leaves no partial folder behind.
pub fn cut_tiles(o: &TileOptions) -> Result<TileSummary> {
    if o.size == 0 || o.stride == 0 {
        return Err(Error::invalid(format!(
            "--size {} and --stride {} must be positive",
            o.size, o.stride
        )));
    }
    let sources = read_tile_list(&o.list)?;
    let with_labels = sources.iter().filter(|s| s.labels.is_some()).count();
    if with_labels != 0 && with_labels != sources.len() {
        return Err(Error::format(
            &o.list,
            format!(
                "{with_labels} of {} images have labels: give a mask for every image or none",
                sources.len()
            ),
        ));
    }
    if o.output.exists() {
        let mut entries = std::fs::read_dir(&o.output).map_err(|e| Error::io(&o.output, e))?;
        if entries.next().is_some() {
            return Err(Error::invalid(format!(
                "--output-dir {} is not empty; give a new or empty folder",
                o.output.display()
            )));
        }
    }
    // Unique tile names from the image stems (parent folder added on a clash).
    let mut used = HashSet::new();
    let mut stems = Vec::with_capacity(sources.len());
    for s in &sources {
        let stem = file_stem(&s.image);
        let name = if used.contains(&stem) {
            let parent = s
                .image
                .parent()
                .map(file_stem)
                .unwrap_or_else(|| "image".into());
            format!("{parent}_{stem}")
        } else {
            stem
        };
        if !used.insert(name.clone()) {
            return Err(Error::format(
                &o.list,
                format!("two images would give tiles named '{name}'"),
            ));
        }
        stems.push(name);
    }

    struct Tile {
        sample: String,
        source: usize,
        x: usize,
        y: usize,
        targets: Option<TileTargets>,
    }
    let mut images = Vec::with_capacity(sources.len());
    let mut tiles = Vec::new();
    for (i, s) in sources.iter().enumerate() {
        let img = read_gray(&s.image)?;
        if img.width() < o.size || img.height() < o.size {
            return Err(Error::format(
                &s.image,
                format!(
                    "the image is {}×{}, smaller than one {}×{} tile",
                    img.width(),
                    img.height(),
                    o.size,
                    o.size
                ),
            ));
        }
        let mask = match &s.labels {
            Some(path) => {
                let m = read_gray(path)?;
                if (m.width(), m.height()) != (img.width(), img.height()) {
                    return Err(Error::format(
                        path,
                        format!(
                            "the mask is {}×{} but its image {} is {}×{}",
                            m.width(),
                            m.height(),
                            s.image.display(),
                            img.width(),
                            img.height()
                        ),
                    ));
                }
                let mut areas = vec![0u64; usize::from(m.depth().max_value()) + 1];
                for &l in m.data() {
                    areas[usize::from(l)] += 1;
                }
                Some((m, areas))
            }
            None => None,
        };
        for y in (0..=img.height() - o.size).step_by(o.stride) {
            for x in (0..=img.width() - o.size).step_by(o.stride) {
                let targets = mask
                    .as_ref()
                    .map(|(m, areas)| tile_targets(&img, m, areas, x, y, o.size));
                tiles.push(Tile {
                    sample: format!("{}_y{y}_x{x}", stems[i]),
                    source: i,
                    x,
                    y,
                    targets,
                });
            }
        }
        images.push(img);
    }

    std::fs::create_dir_all(o.output.join("tiles")).map_err(|e| Error::io(&o.output, e))?;
    let mut list = CsvWriter::new();
    list.record(["sample", "image", "batch", "source", "x", "y"]);
    let mut targets = CsvWriter::new();
    targets.record(["sample", "nuclei", "foreground_fraction", "mean_intensity"]);
    let mut per_batch: BTreeMap<String, usize> = BTreeMap::new();
    for t in &tiles {
        let img = &images[t.source];
        let mut data = Vec::with_capacity(o.size * o.size);
        for y in t.y..t.y + o.size {
            let row = y * img.width();
            data.extend_from_slice(&img.data()[row + t.x..row + t.x + o.size]);
        }
        let file = format!("tiles/{}.png", t.sample);
        GrayImage::new(o.size, o.size, img.depth(), data)?.save(o.output.join(&file))?;
        let src = &sources[t.source];
        list.record([
            t.sample.clone(),
            file,
            src.batch.clone(),
            src.image.display().to_string(),
            t.x.to_string(),
            t.y.to_string(),
        ]);
        *per_batch.entry(src.batch.clone()).or_default() += 1;
        if let Some(v) = t.targets {
            targets.record([
                t.sample.clone(),
                v.nuclei.to_string(),
                v.foreground_fraction.to_string(),
                v.mean_intensity.to_string(),
            ]);
        }
    }
    list.write(&o.output.join("samples.csv"))?;
    let has_targets = with_labels == sources.len();
    if has_targets {
        targets.write(&o.output.join("targets.csv"))?;
    }
    Ok(TileSummary {
        tiles: tiles.len(),
        images: sources.len(),
        per_batch,
        targets: has_targets,
    })
}

fn file_stem(p: &Path) -> String {
    p.file_stem()
        .map(|s| s.to_string_lossy().replace([',', ' '], "_"))
        .unwrap_or_else(|| "image".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::imaging::BitDepth;

    #[test]
    fn targets_split_objects_by_area_and_count_foreground() {
        // 4×4 image; object 1 spans both 2×2 tiles of the top row (2 px in
        // each), object 2 sits in the top-left tile only (1 px).
        let labels = GrayImage::new(
            4,
            4,
            BitDepth::Eight,
            vec![2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        )
        .unwrap();
        let labels = {
            let mut d = labels.data().to_vec();
            d[4] = 1; // (0,1)
            d[6] = 1; // (2,1)
            GrayImage::new(4, 4, BitDepth::Eight, d).unwrap()
        };
        let image = GrayImage::new(4, 4, BitDepth::Eight, vec![255; 16]).unwrap();
        let mut areas = vec![0u64; 256];
        for &l in labels.data() {
            areas[usize::from(l)] += 1;
        }
        let left = tile_targets(&image, &labels, &areas, 0, 0, 2);
        let right = tile_targets(&image, &labels, &areas, 2, 0, 2);
        assert_eq!(left.nuclei, 1.0 + 0.5);
        assert_eq!(right.nuclei, 0.5);
        assert_eq!(left.foreground_fraction, 0.75);
        assert_eq!(right.foreground_fraction, 0.5);
        assert_eq!(left.mean_intensity, 1.0);
        let bottom = tile_targets(&image, &labels, &areas, 0, 2, 2);
        assert_eq!((bottom.nuclei, bottom.foreground_fraction), (0.0, 0.0));
    }
}
