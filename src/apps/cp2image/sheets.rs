//! Contact sheets: [`CropSet`] reads the real crops, [`DisplayScale`] maps
//! channels to display colours, [`Sheet`] lays out rows of captioned
//! [`Tile`]s with a title and writes a PNG.

use std::path::Path;

use image::RgbImage;

use crate::io::TensorFile;
use crate::plot::save_png;
use crate::{Error, Result};

/// Real single-cell crops: u8 `[N, C, S, S]`.
#[derive(Clone, Debug)]
pub struct CropSet {
    /// Number of crops.
    pub n: usize,
    /// Channels.
    pub channels: usize,
    /// Side in pixels.
    pub size: usize,
    /// Pixels, `[n, channels, size, size]` row-major.
    pub pixels: Vec<u8>,
}

impl CropSet {
    /// Reads tensor `crops` (an integer tensor with values 0 … 255, shape
    /// `[N, C, S, S]`) from a safetensors file such as
    /// `single_cells/cells.safetensors`.
    pub fn read(path: impl AsRef<Path>) -> Result<Self> {
        let file = TensorFile::open(path)?;
        let (shape, values) = file.i64("crops")?;
        let [n, channels, h, w] = match shape.as_slice() {
            &[n, c, h, w] => [n, c, h, w],
            s => {
                return Err(Error::format(
                    file.path(),
                    format!("tensor \"crops\" has shape {s:?}, expected [N, C, S, S]"),
                ))
            }
        };
        if h != w {
            return Err(Error::format(
                file.path(),
                format!("crops are {h}×{w}, not square"),
            ));
        }
        let pixels = values
            .iter()
            .map(|&v| u8::try_from(v))
            .collect::<std::result::Result<Vec<u8>, _>>()
            .map_err(|_| {
                Error::format(file.path(), "tensor \"crops\" holds values outside 0 … 255")
            })?;
        Ok(CropSet {
            n,
            channels,
            size: h,
            pixels,
        })
    }

    /// Crop `i` scaled to [0, 1] (`p / 255`), `[C, S, S]`.
    pub fn crop(&self, i: usize) -> Result<Vec<f32>> {
        let len = self.channels * self.size * self.size;
        self.pixels
            .get(i * len..(i + 1) * len)
            .map(|px| px.iter().map(|&p| f32::from(p) / 255.0).collect())
            .ok_or_else(|| Error::invalid(format!("crop {i} is out of range ({} crops)", self.n)))
    }

    /// The crop index of a feature-table row id (`cell_id` is the row index
    /// of the crops in the single-cell sets).
    pub fn index_of(&self, id: &str) -> Result<usize> {
        match id.trim().parse::<usize>() {
            Ok(i) if i < self.n => Ok(i),
            Ok(i) => Err(Error::invalid(format!(
                "row id {i} has no crop: the crop file holds {} crops",
                self.n
            ))),
            Err(_) => Err(Error::invalid(format!(
                "row id {id:?} is not a crop index: with --crops, the table's first column must be the cell's index in the crop file (cell_id)"
            ))),
        }
    }
}

/// How image channels become display colours: channel 0 → blue, 1 →
/// green, 2 → red (a single channel is grey), each divided by `max[c]`
/// (in [0, 1] units) and clipped.
#[derive(Clone, Debug, PartialEq)]
pub struct DisplayScale {
    /// Per-channel value shown at full brightness.
    pub max: Vec<f32>,
}

impl DisplayScale {
    /// Full range: a value of 1 is full brightness.
    pub fn unit(channels: usize) -> Self {
        DisplayScale {
            max: vec![1.0; channels],
        }
    }

    /// Each channel stretched to its `percentile` (e.g. 99.5) over the
    /// given crops, as the data set's preview; at least one grey level.
    pub fn from_crops(crops: &CropSet, indices: &[usize], percentile: f64) -> Result<Self> {
        let len = crops.size * crops.size;
        let mut max = Vec::with_capacity(crops.channels);
        for c in 0..crops.channels {
            let mut hist = [0u64; 256];
            for &i in indices {
                let start = (i * crops.channels + c) * len;
                let plane = crops.pixels.get(start..start + len).ok_or_else(|| {
                    Error::invalid(format!("crop {i} is out of range ({} crops)", crops.n))
                })?;
                for &p in plane {
                    hist[usize::from(p)] += 1;
                }
            }
            let total: u64 = hist.iter().sum();
            let want = (total as f64 * percentile / 100.0).ceil() as u64;
            let mut seen = 0;
            let level = hist
                .iter()
                .position(|&h| {
                    seen += h;
                    seen >= want
                })
                .unwrap_or(255);
            max.push(level.max(1) as f32 / 255.0);
        }
        Ok(DisplayScale { max })
    }

    /// Each channel stretched to its `percentile` over images
    /// `[N, channels, plane]` (row-major) in [0, 1] units; at least 1/255.
    pub fn from_images(
        images: &[f32],
        channels: usize,
        plane: usize,
        percentile: f64,
    ) -> Result<Self> {
        let per_image = channels * plane;
        if per_image == 0 || images.is_empty() || !images.len().is_multiple_of(per_image) {
            return Err(Error::invalid(format!(
                "{} values are not whole images of {channels} × {plane}",
                images.len()
            )));
        }
        let max = (0..channels)
            .map(|c| {
                let mut v: Vec<f32> = images
                    .chunks_exact(per_image)
                    .flat_map(|img| &img[c * plane..(c + 1) * plane])
                    .copied()
                    .collect();
                let k =
                    ((v.len() as f64 * percentile / 100.0).ceil() as usize).clamp(1, v.len()) - 1;
                let (_, q, _) = v.select_nth_unstable_by(k, f32::total_cmp);
                q.max(1.0 / 255.0)
            })
            .collect();
        Ok(DisplayScale { max })
    }

    /// An RGB tile from an image `[C, S, S]` in [0, 1] units, magnified
    /// `zoom` times (nearest neighbour).
    pub fn render(&self, image: &[f32], size: usize, zoom: usize) -> Result<RgbImage> {
        let plane = size * size;
        let channels = image.len().checked_div(plane).unwrap_or(0);
        if channels == 0 || channels * plane != image.len() || channels > self.max.len() {
            return Err(Error::invalid(format!(
                "an image of {} values is not [C, {size}, {size}] with C ≤ {}",
                image.len(),
                self.max.len()
            )));
        }
        let zoom = zoom.max(1);
        let side = u32::try_from(size * zoom).map_err(|_| Error::invalid("tile too large"))?;
        let level = |c: usize, i: usize| -> u8 {
            (image[c * plane + i] / self.max[c] * 255.0)
                .round()
                .clamp(0.0, 255.0) as u8
        };
        Ok(RgbImage::from_fn(side, side, |x, y| {
            let i = (y as usize / zoom) * size + x as usize / zoom;
            let rgb = match channels {
                1 => [level(0, i); 3],
                2 => [0, level(1, i), level(0, i)],
                _ => [level(2, i), level(1, i), level(0, i)],
            };
            image::Rgb(rgb)
        }))
    }
}

/// One captioned image in a [`Sheet`].
#[derive(Clone, Debug)]
pub struct Tile {
    /// The image (any size; rows are laid out by the largest tile).
    pub image: RgbImage,
    /// Text under the image.
    pub caption: String,
}

/// A contact sheet: title lines, then rows of captioned tiles with a label
/// in the left margin.
#[derive(Clone, Debug, Default)]
pub struct Sheet {
    /// Lines of text above the rows.
    pub title: Vec<String>,
    /// (row label, tiles).
    pub rows: Vec<(String, Vec<Tile>)>,
}

/// Gap between tiles and around the sheet, in pixels.
const GAP: u32 = 6;
/// Most pixels a sheet may have (a guard against accidental huge sheets).
const MAX_SHEET_PIXELS: u64 = 200_000_000;
const BACKGROUND: [u8; 3] = [20, 20, 24];
const INK: [u8; 3] = [235, 235, 235];

impl Sheet {
    /// Renders the sheet.
    pub fn render(&self) -> Result<RgbImage> {
        let tile_w = self
            .rows
            .iter()
            .flat_map(|(_, t)| t.iter().map(|t| t.image.width()))
            .max()
            .unwrap_or(0);
        let tile_h = self
            .rows
            .iter()
            .flat_map(|(_, t)| t.iter().map(|t| t.image.height()))
            .max()
            .unwrap_or(0);
        let cols = self.rows.iter().map(|(_, t)| t.len()).max().unwrap_or(0) as u32;
        let margin = self
            .rows
            .iter()
            .map(|(l, _)| text_width(l))
            .max()
            .unwrap_or(0);
        let margin = if margin > 0 { margin + GAP } else { 0 };
        let line = font::LINE_HEIGHT;
        let title_h = self.title.len() as u32 * line;
        let row_h = tile_h + line + GAP;
        let width = (GAP + margin + cols * (tile_w + GAP))
            .max(self.title.iter().map(|t| text_width(t)).max().unwrap_or(0) + 2 * GAP);
        let height =
            GAP + title_h + if title_h > 0 { GAP } else { 0 } + self.rows.len() as u32 * row_h;
        if u64::from(width) * u64::from(height) > MAX_SHEET_PIXELS {
            return Err(Error::invalid(format!(
                "a {width}×{height} sheet is too large; show fewer images (or a smaller zoom)"
            )));
        }
        let mut img = RgbImage::from_pixel(width, height, image::Rgb(BACKGROUND));
        let mut y = GAP;
        for t in &self.title {
            draw_text(&mut img, GAP, y, t, width - GAP);
            y += line;
        }
        if title_h > 0 {
            y += GAP;
        }
        for (label, tiles) in &self.rows {
            draw_text(&mut img, GAP, y + tile_h / 2, label, GAP + margin);
            for (k, tile) in tiles.iter().enumerate() {
                let x = GAP + margin + k as u32 * (tile_w + GAP);
                image::imageops::replace(&mut img, &tile.image, i64::from(x), i64::from(y));
                draw_text(
                    &mut img,
                    x,
                    y + tile.image.height() + 2,
                    &tile.caption,
                    x + tile_w + GAP / 2,
                );
            }
            y += row_h;
        }
        Ok(img)
    }

    /// Renders and writes the sheet as PNG.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        save_png(path, &self.render()?)
    }
}

/// Width in pixels of `text` in the sheet font.
fn text_width(text: &str) -> u32 {
    text.chars().count() as u32 * font::ADVANCE
}

/// Draws `text` with its top-left at (x, y), clipped at `x_end`.
fn draw_text(img: &mut RgbImage, x: u32, y: u32, text: &str, x_end: u32) {
    let x_end = x_end.min(img.width());
    for (k, ch) in text.chars().enumerate() {
        let x0 = x + k as u32 * font::ADVANCE;
        if x0 + font::WIDTH > x_end {
            break;
        }
        let rows = font::glyph(ch);
        for (dy, bits) in rows.iter().enumerate() {
            for dx in 0..font::WIDTH {
                if bits & (1 << (font::WIDTH - 1 - dx)) != 0 {
                    let (px, py) = (x0 + dx, y + dy as u32);
                    if py < img.height() {
                        img.put_pixel(px, py, image::Rgb(INK));
                    }
                }
            }
        }
    }
}

/// The plots' 5×7 bitmap font, with the sheet's spacing.
mod font {
    pub(super) use crate::plot::glyph;
    /// Glyph width in pixels.
    pub const WIDTH: u32 = 5;
    /// Horizontal advance per character.
    pub const ADVANCE: u32 = 6;
    /// Vertical advance per line.
    pub const LINE_HEIGHT: u32 = 10;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn font_covers_caption_characters() {
        let unknown = font::glyph('\u{1}');
        for c in "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcxyz .,-+=:_/()%<>#!".chars() {
            assert_ne!(font::glyph(c), unknown, "{c:?} has no glyph");
        }
    }
}
