//! Image input for the expression-from-morphology pipeline ([reference](crate::reference) §1):
//! reading grayscale PNG and TIFF images, scaling pixels to [−1, 1], and
//! cutting images into non-overlapping square patches streamed in batches.
//!
//! - [`read_gray`] decodes 8- and 16-bit PNG/TIFF into a [`GrayImage`]. Colour
//!   input becomes its HSV value channel, `V = max(R, G, B)`; alpha is ignored.
//!   Float and palette-only formats the decoder cannot expand are rejected.
//! - [`scale_pixel`]: `p / max · 2 − 1` with `max` = 255 or 65535 by bit depth.
//! - [`PatchGrid`]: the `rows × cols` patches of an image, row-major; the
//!   remainder strips at the right and bottom edges are dropped.
//! - [`PatchStream`] fills one reusable NCHW buffer `[b, 1, P, P]` with at most
//!   `batch` patches at a time, so a 5120×5120 image (1024 patches of 160) never
//!   needs all its patches in memory at once; [`fill_patches`] is the same
//!   operation for a caller-owned buffer.
//! - [`read_sample_list`] / [`read_sample_list_with`] / [`write_sample_list`]: the `sample,image` CSV that
//!   maps samples to their images.

use std::fs::File;
use std::io::{BufReader, Cursor};
use std::ops::Range;
use std::path::{Path, PathBuf};

use image::{DynamicImage, ImageError, ImageFormat, ImageReader, Limits};

use crate::csv::{CsvFile, CsvWriter};
use crate::io::write_atomic;
use crate::{Error, Result};

/// Patch side used by the paper's VQ-VAE-2 pipeline.
pub const DEFAULT_PATCH: usize = 160;

/// Largest decoder allocation allowed (4 GiB): a 16-bit RGB whole-slide image
/// of about 26000×26000 pixels. The `image` crate's default (512 MiB) would
/// refuse images this project is meant to read.
const MAX_DECODE_BYTES: u64 = 4 << 30;

/// Most pixels an image may have before it is decoded (2²⁷ ≈ 134 million,
/// e.g. 11585×11585): decoding takes up to 8 bytes a pixel (16-bit RGBA)
/// and the grayscale copy 2 more, so about 1.3 GB at the limit. The
/// command line's `--max-pixels` or the environment variable
/// `CELLMORPH_MAX_PIXELS` changes it.
pub const DEFAULT_MAX_PIXELS: u64 = 1 << 27;

/// The limit set by [`set_max_pixels`] (0: none set).
static MAX_PIXELS_SET: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Sets the pixel limit for the rest of the process (the CLI's
/// `--max-pixels`), ahead of `CELLMORPH_MAX_PIXELS`.
///
/// # Errors
/// [`Error::Invalid`] when `n` is 0.
pub fn set_max_pixels(n: u64) -> Result<()> {
    if n == 0 {
        return Err(Error::invalid("--max-pixels must be at least 1"));
    }
    MAX_PIXELS_SET.store(n, std::sync::atomic::Ordering::Relaxed);
    Ok(())
}

/// The pixel limit in force: the one [`set_max_pixels`] set, else
/// `CELLMORPH_MAX_PIXELS` if set (a positive integer), else
/// [`DEFAULT_MAX_PIXELS`].
pub fn max_pixels() -> Result<u64> {
    let set = MAX_PIXELS_SET.load(std::sync::atomic::Ordering::Relaxed);
    if set > 0 {
        return Ok(set);
    }
    match std::env::var("CELLMORPH_MAX_PIXELS") {
        Err(_) => Ok(DEFAULT_MAX_PIXELS),
        Ok(v) => v
            .trim()
            .parse::<u64>()
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "CELLMORPH_MAX_PIXELS={v:?} is not a positive integer"
                ))
            }),
    }
}

/// Bits per pixel of a grayscale image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BitDepth {
    /// 8-bit, values 0..=255.
    Eight,
    /// 16-bit, values 0..=65535.
    Sixteen,
}

impl BitDepth {
    /// The largest pixel value: 255 or 65535.
    pub fn max_value(self) -> u16 {
        match self {
            BitDepth::Eight => u8::MAX as u16,
            BitDepth::Sixteen => u16::MAX,
        }
    }

    /// The number of bits: 8 or 16.
    pub fn bits(self) -> u32 {
        match self {
            BitDepth::Eight => 8,
            BitDepth::Sixteen => 16,
        }
    }
}

/// Scales pixel `p` to [−1, 1] as [reference](crate::reference) §1 prescribes: `p / max · 2 − 1`
/// with `max` = 255 (8-bit) or 65535 (16-bit). 0 maps to exactly −1 and `max`
/// to exactly 1. In f32 this equals PyTorch's `ToTensor` followed by
/// `Normalize(0.5, 0.5)`, `(p / max − 0.5) / 0.5`, bit for bit: both are the
/// correctly rounded `2a − 1` of the same rounded `a = p / max`.
pub fn scale_pixel(p: u16, depth: BitDepth) -> f32 {
    f32::from(p) / f32::from(depth.max_value()) * 2.0 - 1.0
}

/// A single-channel image with integer pixels, row-major
/// (`data[y * width + x]`), and the file it came from, if any.
#[derive(Debug, Clone, PartialEq)]
pub struct GrayImage {
    width: usize,
    height: usize,
    depth: BitDepth,
    data: Vec<u16>,
    source: Option<PathBuf>,
}

impl GrayImage {
    /// Builds an image from row-major pixels, checking that it is not empty,
    /// that `data` holds `width × height` values and that 8-bit values are at
    /// most 255.
    pub fn new(width: usize, height: usize, depth: BitDepth, data: Vec<u16>) -> Result<GrayImage> {
        if width == 0 || height == 0 {
            return Err(Error::invalid(format!("image is empty ({width}×{height})")));
        }
        let expected = width.checked_mul(height).ok_or_else(|| {
            Error::invalid(format!("image size {width}×{height} overflows usize"))
        })?;
        if data.len() != expected {
            return Err(Error::shape(
                "GrayImage::new",
                format!("{} pixels for a {width}×{height} image", data.len()),
            ));
        }
        let max = depth.max_value();
        if let Some(i) = data.iter().position(|&p| p > max) {
            return Err(Error::invalid(format!(
                "pixel ({}, {}) is {} but an {}-bit image holds at most {max}",
                i % width,
                i / width,
                data[i],
                depth.bits()
            )));
        }
        Ok(GrayImage {
            width,
            height,
            depth,
            data,
            source: None,
        })
    }

    /// The same image, recorded as coming from `path` (used in error messages).
    pub fn with_source(mut self, path: impl AsRef<Path>) -> GrayImage {
        self.source = Some(path.as_ref().to_path_buf());
        self
    }

    /// Width in pixels.
    pub fn width(&self) -> usize {
        self.width
    }

    /// Height in pixels.
    pub fn height(&self) -> usize {
        self.height
    }

    /// Bit depth of the pixel values.
    pub fn depth(&self) -> BitDepth {
        self.depth
    }

    /// Row-major pixel values.
    pub fn data(&self) -> &[u16] {
        &self.data
    }

    /// The file the image was read from, if any.
    pub fn source(&self) -> Option<&Path> {
        self.source.as_deref()
    }

    /// The pixel at column `x`, row `y`, or `None` outside the image.
    pub fn pixel(&self, x: usize, y: usize) -> Option<u16> {
        if x >= self.width || y >= self.height {
            return None;
        }
        self.data.get(y * self.width + x).copied()
    }

    /// Every pixel scaled to [−1, 1] with [`scale_pixel`], row-major.
    pub fn scaled(&self) -> Vec<f32> {
        self.data
            .iter()
            .map(|&p| scale_pixel(p, self.depth))
            .collect()
    }

    /// The patch grid of this image for square patches of side `patch`.
    ///
    /// # Errors
    /// `patch` is 0, or the image is smaller than one patch; the message names
    /// the source file when the image has one.
    pub fn patch_grid(&self, patch: usize) -> Result<PatchGrid> {
        PatchGrid::new(self.width, self.height, patch).map_err(|e| match &self.source {
            Some(path) => Error::format(path, e.to_string()),
            None => e,
        })
    }

    /// Writes the image as PNG or TIFF, chosen by the extension of `path`
    /// (`.png`, `.tif`, `.tiff`, case-insensitive), keeping its bit depth.
    /// The file is written atomically (temporary file, then rename).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let format = match path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            Some("png") => ImageFormat::Png,
            Some("tif" | "tiff") => ImageFormat::Tiff,
            _ => {
                return Err(Error::invalid(format!(
                    "{}: cannot tell the image format; use a .png, .tif or .tiff extension",
                    path.display()
                )))
            }
        };
        let too_big = || {
            Error::invalid(format!(
                "{}: {}×{} is too large to encode",
                path.display(),
                self.width,
                self.height
            ))
        };
        let w = u32::try_from(self.width).map_err(|_| too_big())?;
        let h = u32::try_from(self.height).map_err(|_| too_big())?;
        let dynamic = match self.depth {
            BitDepth::Eight => {
                let bytes = self.data.iter().map(|&p| p as u8).collect();
                image::GrayImage::from_raw(w, h, bytes).map(DynamicImage::ImageLuma8)
            }
            BitDepth::Sixteen => {
                image::ImageBuffer::from_raw(w, h, self.data.clone()).map(DynamicImage::ImageLuma16)
            }
        }
        .ok_or_else(too_big)?;
        let mut bytes = Cursor::new(Vec::new());
        dynamic
            .write_to(&mut bytes, format)
            .map_err(|e| Error::format(path, format!("encoding image: {e}")))?;
        write_atomic(path, bytes.get_ref())
    }
}

/// Opens `path` as a PNG or TIFF, recognised by its signature.
fn open_reader(path: &Path) -> Result<ImageReader<BufReader<File>>> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    if len == 0 {
        return Err(Error::format(path, "file is empty"));
    }
    let mut reader = ImageReader::new(BufReader::new(file))
        .with_guessed_format()
        .map_err(|e| Error::io(path, e))?;
    match reader.format() {
        Some(ImageFormat::Png) => {}
        Some(ImageFormat::Tiff) => check_tiff_tags(path, len)?,
        Some(other) => {
            return Err(Error::format(
                path,
                format!("unsupported image format {other:?}; expected PNG or TIFF"),
            ))
        }
        None => {
            return Err(Error::format(
                path,
                "not a PNG or TIFF file (unrecognised signature)",
            ))
        }
    }
    let mut limits = Limits::default();
    limits.max_alloc = Some(MAX_DECODE_BYTES);
    reader.limits(limits);
    Ok(reader)
}

/// Checks that no tag of a TIFF's first directory claims more values than
/// the file holds. The decoder reads a tag's values into memory before it
/// finds the file too short (about 32 bytes per value: a 222-byte file
/// claiming two million values cost 64 MiB), so a corrupt count is refused
/// here. Classic and BigTIFF; what this does not look at (an unreadable
/// header, a directory past the end) is left to the decoder's own errors.
fn check_tiff_tags(path: &Path, len: u64) -> Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut head = [0u8; 16];
    let n = f.read(&mut head).map_err(|e| Error::io(path, e))?;
    let le = match &head[..2] {
        b"II" => true,
        b"MM" => false,
        _ => return Ok(()),
    };
    let u16_at = |b: &[u8]| -> u64 {
        let a = [b[0], b[1]];
        u64::from(if le {
            u16::from_le_bytes(a)
        } else {
            u16::from_be_bytes(a)
        })
    };
    let u32_at = |b: &[u8]| -> u64 {
        let a = [b[0], b[1], b[2], b[3]];
        u64::from(if le {
            u32::from_le_bytes(a)
        } else {
            u32::from_be_bytes(a)
        })
    };
    let u64_at = |b: &[u8]| -> u64 {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[..8]);
        if le {
            u64::from_le_bytes(a)
        } else {
            u64::from_be_bytes(a)
        }
    };
    // (directory offset, bytes of the entry count, entry size, inline bytes)
    let (ifd, count_len, entry_len, inline) = match (u16_at(&head[2..4]), n) {
        (42, 8..) => (u32_at(&head[4..8]), 2u64, 12u64, 4u64),
        (43, 16..) => (u64_at(&head[8..16]), 8, 20, 8),
        _ => return Ok(()),
    };
    if ifd.saturating_add(count_len) > len {
        return Ok(());
    }
    f.seek(SeekFrom::Start(ifd))
        .map_err(|e| Error::io(path, e))?;
    let mut buf = vec![0u8; count_len as usize];
    f.read_exact(&mut buf).map_err(|e| Error::io(path, e))?;
    let entries = if count_len == 2 {
        u16_at(&buf)
    } else {
        u64_at(&buf)
    };
    // Only the entries the file holds; a short directory is the decoder's error.
    let entries = entries.min((len - ifd - count_len) / entry_len);
    let mut dir = vec![0u8; (entries * entry_len) as usize];
    f.read_exact(&mut dir).map_err(|e| Error::io(path, e))?;
    for e in dir.chunks_exact(entry_len as usize) {
        let tag = u16_at(&e[0..2]);
        let size = match u16_at(&e[2..4]) {
            1 | 2 | 6 | 7 => 1u64,
            3 | 8 => 2,
            4 | 9 | 11 | 13 => 4,
            5 | 10 | 12 | 16..=18 => 8,
            _ => continue,
        };
        let count = if inline == 4 {
            u32_at(&e[4..8])
        } else {
            u64_at(&e[4..12])
        };
        let bytes = count.saturating_mul(size);
        if bytes > inline && bytes > len {
            return Err(Error::format(
                path,
                format!(
                    "corrupt TIFF: tag {tag} claims {count} values ({bytes} bytes) but the file has {len} bytes"
                ),
            ));
        }
    }
    Ok(())
}

/// Turns a decoder error into an error naming the file and the problem.
fn decode_error(path: &Path, e: ImageError) -> Error {
    let msg = match &e {
        ImageError::Unsupported(_) => format!("unsupported image: {e}"),
        ImageError::Limits(_) => format!("image too large to decode: {e}"),
        // The file opened, so a read error during decoding is a short file.
        ImageError::Decoding(_) | ImageError::IoError(_) => {
            format!("corrupt or truncated image: {e}")
        }
        _ => format!("cannot decode image: {e}"),
    };
    Error::format(path, msg)
}

/// Reads the width and height of a PNG or TIFF from its header, without
/// decoding the pixels (for checking a list of images before a long run).
pub fn read_dimensions(path: impl AsRef<Path>) -> Result<(usize, usize)> {
    let path = path.as_ref();
    let (w, h) = open_reader(path)?
        .into_dimensions()
        .map_err(|e| decode_error(path, e))?;
    Ok((w as usize, h as usize))
}

/// Reads an 8- or 16-bit grayscale PNG or TIFF.
///
/// Gray+alpha keeps the gray channel. RGB and RGBA become the HSV value
/// channel `V = max(R, G, B)` at the same bit depth ([reference](crate::reference) §2), with alpha
/// ignored. Low-bit-depth grayscale (1, 2, 4 bits) is expanded to 8 bits by
/// the decoder.
///
/// # Errors
/// Every error names `path`: unreadable file ([`Error::Io`]); not PNG/TIFF,
/// corrupt or truncated data, 32-bit float pixels, an empty image, or one
/// over the pixel limit ([`max_pixels`]), checked from the header before
/// anything is decoded ([`Error::Format`]).
pub fn read_gray(path: impl AsRef<Path>) -> Result<GrayImage> {
    let path = path.as_ref();
    let (w, h) = read_dimensions(path)?;
    let limit = max_pixels()?;
    if (w as u64).saturating_mul(h as u64) > limit {
        return Err(Error::format(
            path,
            format!(
                "image is {w}×{h} = {} pixels, over the limit of {limit} \
                 (about {} GB to decode); raise it with --max-pixels (or CELLMORPH_MAX_PIXELS), or tile the image",
                w as u128 * h as u128,
                (w as u128 * h as u128 * 10).div_ceil(1_000_000_000)
            ),
        ));
    }
    let decoded = open_reader(path)?
        .decode()
        .map_err(|e| decode_error(path, e))?;
    let (w, h) = (decoded.width() as usize, decoded.height() as usize);
    if w == 0 || h == 0 {
        return Err(Error::format(path, format!("image is empty ({w}×{h})")));
    }
    let (depth, data): (BitDepth, Vec<u16>) = match decoded {
        DynamicImage::ImageLuma8(b) => (BitDepth::Eight, to_u16(b.as_raw(), 1)),
        DynamicImage::ImageLumaA8(b) => (BitDepth::Eight, to_u16(b.as_raw(), 2)),
        DynamicImage::ImageRgb8(b) => (BitDepth::Eight, value_channel(b.as_raw(), 3)),
        DynamicImage::ImageRgba8(b) => (BitDepth::Eight, value_channel(b.as_raw(), 4)),
        DynamicImage::ImageLuma16(b) => (BitDepth::Sixteen, b.into_raw()),
        DynamicImage::ImageLumaA16(b) => (BitDepth::Sixteen, to_u16(b.as_raw(), 2)),
        DynamicImage::ImageRgb16(b) => (BitDepth::Sixteen, value_channel(b.as_raw(), 3)),
        DynamicImage::ImageRgba16(b) => (BitDepth::Sixteen, value_channel(b.as_raw(), 4)),
        other => {
            return Err(Error::format(
                path,
                format!(
                    "unsupported pixel type {:?}: only 8- and 16-bit integer images are read",
                    other.color()
                ),
            ))
        }
    };
    GrayImage::new(w, h, depth, data)
        .map(|img| img.with_source(path))
        .map_err(|e| Error::format(path, e.to_string()))
}

/// The first channel of each `stride`-channel pixel, widened to u16.
fn to_u16<T: Copy + Into<u16>>(raw: &[T], stride: usize) -> Vec<u16> {
    raw.chunks_exact(stride)
        .filter_map(|px| px.first().map(|&v| v.into()))
        .collect()
}

/// `max(R, G, B)` of each `stride`-channel pixel (HSV value).
fn value_channel<T: Copy + Into<u16>>(raw: &[T], stride: usize) -> Vec<u16> {
    raw.chunks_exact(stride)
        .map(|px| px.iter().take(3).map(|&v| v.into()).max().unwrap_or(0))
        .collect()
}

/// The non-overlapping square patches of an image: `rows × cols` patches of
/// side `patch`, numbered row-major (patch `i` sits at row `i / cols`,
/// column `i % cols`). Pixels right of `cols · patch` or below
/// `rows · patch` belong to no patch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PatchGrid {
    patch: usize,
    rows: usize,
    cols: usize,
}

impl PatchGrid {
    /// The grid of a `width × height` image.
    ///
    /// # Errors
    /// `patch` is 0, or the image is narrower or lower than one patch.
    pub fn new(width: usize, height: usize, patch: usize) -> Result<PatchGrid> {
        if patch == 0 {
            return Err(Error::invalid("patch size must be at least 1"));
        }
        if width < patch || height < patch {
            return Err(Error::invalid(format!(
                "image is {width}×{height}, smaller than one {patch}×{patch} patch"
            )));
        }
        Ok(PatchGrid {
            patch,
            rows: height / patch,
            cols: width / patch,
        })
    }

    /// Side of a patch in pixels.
    pub fn patch(&self) -> usize {
        self.patch
    }

    /// Number of patch rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Number of patch columns.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Number of patches, `rows × cols` (never 0).
    pub fn len(&self) -> usize {
        self.rows * self.cols
    }

    /// Always false: a grid holds at least one patch.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Values per patch in an NCHW buffer: `1 · patch · patch`.
    pub fn patch_len(&self) -> usize {
        self.patch * self.patch
    }

    /// Top-left pixel `(x, y)` of patch `index`, or `None` past the end.
    pub fn origin(&self, index: usize) -> Option<(usize, usize)> {
        (index < self.len()).then(|| {
            (
                (index % self.cols) * self.patch,
                (index / self.cols) * self.patch,
            )
        })
    }

    /// Consecutive index ranges of at most `batch` patches covering the
    /// grid once, in row-major order.
    ///
    /// # Errors
    /// `batch` is 0.
    pub fn batches(&self, batch: usize) -> Result<impl Iterator<Item = Range<usize>>> {
        if batch == 0 {
            return Err(Error::invalid("patch batch size must be at least 1"));
        }
        let n = self.len();
        Ok((0..n)
            .step_by(batch)
            .map(move |start| start..(start + batch).min(n)))
    }
}

/// Copies patches `range` of `img`, scaled with [`scale_pixel`], into `out`
/// as an NCHW buffer `[range.len(), 1, P, P]`.
///
/// # Errors
/// The grid does not fit the image, `range` runs past the grid, or `out` does
/// not hold exactly `range.len() · P · P` values.
pub fn fill_patches(
    img: &GrayImage,
    grid: &PatchGrid,
    range: Range<usize>,
    out: &mut [f32],
) -> Result<()> {
    const OP: &str = "fill_patches";
    let p = grid.patch;
    if grid.cols * p > img.width || grid.rows * p > img.height {
        return Err(Error::shape(
            OP,
            format!(
                "a {}×{} grid of {p}-pixel patches does not fit a {}×{} image",
                grid.rows, grid.cols, img.width, img.height
            ),
        ));
    }
    if range.start > range.end || range.end > grid.len() {
        return Err(Error::shape(
            OP,
            format!("patches {range:?} outside a grid of {}", grid.len()),
        ));
    }
    if out.len() != range.len() * grid.patch_len() {
        return Err(Error::shape(
            OP,
            format!(
                "output holds {} values, {} patches of {p}×{p} need {}",
                out.len(),
                range.len(),
                range.len() * grid.patch_len()
            ),
        ));
    }
    for (index, dst) in range.zip(out.chunks_exact_mut(grid.patch_len())) {
        let (x0, y0) = ((index % grid.cols) * p, (index / grid.cols) * p);
        for (dy, dst_row) in dst.chunks_exact_mut(p).enumerate() {
            let start = (y0 + dy) * img.width + x0;
            let src_row = img.data.get(start..start + p).ok_or_else(|| {
                Error::shape(
                    OP,
                    format!("row {} of patch {index} is out of range", y0 + dy),
                )
            })?;
            for (d, &s) in dst_row.iter_mut().zip(src_row) {
                *d = scale_pixel(s, img.depth);
            }
        }
    }
    Ok(())
}

/// One batch of patches from a [`PatchStream`].
#[derive(Debug)]
pub struct PatchBatch<'a> {
    /// Row-major indices of the patches in this batch.
    pub indices: Range<usize>,
    /// The scaled patches, NCHW `[indices.len(), 1, P, P]`.
    pub data: &'a [f32],
}

/// Streams the patches of one image in batches of at most `batch`, reusing
/// a single buffer of `batch · P · P` floats:
///
/// ```no_run
/// # fn main() -> cellmorph::Result<()> {
/// use cellmorph::imaging::{read_gray, PatchStream};
/// let img = read_gray("field.tif")?;
/// let mut stream = PatchStream::new(&img, 160, 64)?;
/// let (rows, cols) = (stream.grid().rows(), stream.grid().cols());
/// while let Some(batch) = stream.next_batch()? {
///     // batch.data is [batch.indices.len(), 1, 160, 160]
/// }
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct PatchStream<'a> {
    img: &'a GrayImage,
    grid: PatchGrid,
    batch: usize,
    next: usize,
    buf: Vec<f32>,
}

impl<'a> PatchStream<'a> {
    /// A stream over the `patch`-sized patches of `img`.
    ///
    /// # Errors
    /// `batch` or `patch` is 0, or the image is smaller than one patch (named
    /// by its source file when it has one).
    pub fn new(img: &'a GrayImage, patch: usize, batch: usize) -> Result<PatchStream<'a>> {
        if batch == 0 {
            return Err(Error::invalid("patch batch size must be at least 1"));
        }
        let grid = img.patch_grid(patch)?;
        Ok(PatchStream {
            img,
            grid,
            batch,
            next: 0,
            buf: Vec::new(),
        })
    }

    /// The grid being streamed.
    pub fn grid(&self) -> &PatchGrid {
        &self.grid
    }

    /// The next batch, or `None` once every patch has been returned.
    pub fn next_batch(&mut self) -> Result<Option<PatchBatch<'_>>> {
        let n = self.grid.len();
        if self.next >= n {
            return Ok(None);
        }
        let indices = self.next..(self.next + self.batch).min(n);
        let len = indices.len() * self.grid.patch_len();
        self.buf.resize(len, 0.0);
        fill_patches(self.img, &self.grid, indices.clone(), &mut self.buf)?;
        self.next = indices.end;
        Ok(Some(PatchBatch {
            indices,
            data: &self.buf,
        }))
    }
}

/// One row of a sample list: an image belonging to a sample.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SampleImage {
    /// Sample name (matches a row of the expression table).
    pub sample: String,
    /// Image path; relative paths in the file are resolved against the
    /// list's directory.
    pub path: PathBuf,
}

/// Which columns of a sample list hold the sample and the image path;
/// `None` picks the default (`sample`; `image`, else `path`; case-insensitive).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SampleColumns {
    /// Name of the sample column.
    pub sample: Option<String>,
    /// Name of the image-path column.
    pub image: Option<String>,
}

/// Reads a sample list with the default columns: see [`read_sample_list_with`].
///
/// # Errors
/// As [`read_sample_list_with`].
pub fn read_sample_list(path: impl AsRef<Path>) -> Result<Vec<SampleImage>> {
    read_sample_list_with(path, &SampleColumns::default())
}

/// Reads a sample list: a header naming at least the sample and image
/// columns (chosen by `columns`; by default `sample` and `image` or `path`,
/// case-insensitive, in any position), then one line per image. Other
/// columns (batch, group, …) are allowed and ignored here; the same file
/// can give `svr cv --groups` its groups. Read as [`crate::csv`] reads CSV
/// (quoted fields, `#` comment lines, blank lines skipped, a UTF-8 BOM
/// dropped, surrounding blanks trimmed). A path may be quoted to hold
/// commas; when the image column is the last one, an unquoted path that
/// holds commas is the rest of the line, as older lists wrote it. Relative
/// paths are resolved against the list's directory. A sample may have many
/// images.
///
/// # Errors
/// Unreadable file, a missing column (naming the header), a line without a
/// path, an empty sample or path, or no images at all; the message names the
/// file and line.
pub fn read_sample_list_with(
    path: impl AsRef<Path>,
    columns: &SampleColumns,
) -> Result<Vec<SampleImage>> {
    let path = path.as_ref();
    let csv = CsvFile::read(path)?;
    let base = path.parent().unwrap_or(Path::new(""));
    let find = |flag: &str, given: &Option<String>, defaults: &[&str]| -> Result<usize> {
        let names: Vec<&str> = match given {
            Some(name) => vec![name.as_str()],
            None => defaults.to_vec(),
        };
        names
            .iter()
            .find_map(|n| csv.column_ignore_case(n))
            .ok_or_else(|| {
                csv.line_error(
                    csv.header.line,
                    format!(
                        "no {} column in the header ({}); name it with {flag}",
                        names
                            .iter()
                            .map(|n| format!("`{n}`"))
                            .collect::<Vec<_>>()
                            .join(" or "),
                        csv.header.fields.join(",")
                    ),
                )
            })
    };
    let sample_col = find("--sample-column", &columns.sample, &["sample"])?;
    let image_col = find("--image-column", &columns.image, &["image", "path"])?;
    if sample_col == image_col {
        return Err(csv.line_error(csv.header.line, "the sample and image columns must differ"));
    }
    let image_is_last = image_col + 1 == csv.header.len();
    let mut out = Vec::with_capacity(csv.rows.len());
    for row in &csv.rows {
        let sample = row.get(sample_col);
        let image = if image_is_last {
            row.fields.get(image_col..).unwrap_or_default().join(",")
        } else {
            csv.check_width(row)?;
            row.get(image_col).to_string()
        };
        if sample.is_empty() || image.is_empty() {
            return Err(csv.line_error(
                row.line,
                format!(
                    "expected a sample ({}) and an image path ({})",
                    csv.column_label(sample_col),
                    csv.column_label(image_col)
                ),
            ));
        }
        out.push(SampleImage {
            sample: sample.to_string(),
            path: base.join(image),
        });
    }
    if out.is_empty() {
        return Err(csv.error("the sample list names no images"));
    }
    Ok(out)
}

/// Writes a sample list readable by [`read_sample_list`], atomically. Image
/// paths are written as given, quoted when they hold a comma, a quote or a
/// `#` (make them relative to the list's directory to keep the data set
/// relocatable).
///
/// # Errors
/// A sample name that is empty or contains a comma or line break, a path
/// with a line break or that is not valid UTF-8, or a write failure.
pub fn write_sample_list(path: impl AsRef<Path>, entries: &[SampleImage]) -> Result<()> {
    let path = path.as_ref();
    let mut w = CsvWriter::new();
    w.record(["sample", "image"]);
    for e in entries {
        if e.sample.is_empty() || e.sample.contains([',', '\n', '\r']) {
            return Err(Error::invalid(format!(
                "sample name {:?} cannot be written to a sample list",
                e.sample
            )));
        }
        let image = e
            .path
            .to_str()
            .filter(|p| !p.contains(['\n', '\r']))
            .ok_or_else(|| {
                Error::invalid(format!(
                    "image path {} cannot be written to a sample list",
                    e.path.display()
                ))
            })?;
        w.record([e.sample.as_str(), image]);
    }
    w.write(path)
}
