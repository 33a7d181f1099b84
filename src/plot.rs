//! Minimal PNG plots with no plotting dependency: a scatter plot of
//! predicted against measured values, a scatter plot coloured by category
//! or value (t-SNE), a ROC curve, line charts (training curves), a heat map
//! of patch-wise values over an image, a matrix heat map (a confusion
//! matrix), and a dendrogram beside a heat map (Ward clustering). Text uses
//! a built-in 5×7 bitmap font
//! (digits, upper- and lower-case letters and common symbols; anything
//! else is drawn as `?`).
//!
//! Each plot has a `*_image` function that renders into an [`RgbImage`] and a
//! function that also writes it as PNG, atomically (temporary file, then
//! rename).

use std::io::Cursor;
use std::path::Path;

use image::{ImageFormat, Rgb, RgbImage};

use crate::imaging::{GrayImage, PatchGrid};
use crate::io::write_atomic;
use crate::{Error, Result};

/// Title, axis labels and pixel size of a scatter or ROC plot.
#[derive(Debug, Clone, PartialEq)]
pub struct PlotOptions {
    /// Drawn centred above the plot.
    pub title: String,
    /// Drawn below the x axis.
    pub x_label: String,
    /// Drawn left of the y axis, reading upwards.
    pub y_label: String,
    /// Image width in pixels (at least [`MIN_PLOT_WIDTH`]).
    pub width: u32,
    /// Image height in pixels (at least [`MIN_PLOT_HEIGHT`]).
    pub height: u32,
}

impl Default for PlotOptions {
    fn default() -> PlotOptions {
        PlotOptions {
            title: String::new(),
            x_label: String::new(),
            y_label: String::new(),
            width: 480,
            height: 480,
        }
    }
}

/// Smallest accepted plot width: the margins plus a usable plot area.
pub const MIN_PLOT_WIDTH: u32 = 160;
/// Smallest accepted plot height.
pub const MIN_PLOT_HEIGHT: u32 = 140;

/// How a heat map is drawn over its image.
#[derive(Debug, Clone, PartialEq)]
pub struct HeatmapOptions {
    /// Drawn in a band above the image.
    pub title: String,
    /// Opacity of the colours over the image, in [0, 1].
    pub alpha: f64,
    /// Values mapped to the two ends of the colormap; `None` uses the
    /// smallest and largest finite value.
    pub range: Option<(f64, f64)>,
    /// The image is shrunk by the smallest integer factor (area averaging)
    /// that brings its longer side to at most this many pixels.
    pub max_side: usize,
}

impl Default for HeatmapOptions {
    fn default() -> HeatmapOptions {
        HeatmapOptions {
            title: String::new(),
            alpha: 0.5,
            range: None,
            max_side: 1024,
        }
    }
}

const WHITE: [u8; 3] = [255, 255, 255];
const BLACK: [u8; 3] = [0, 0, 0];
const GREY: [u8; 3] = [140, 140, 140];
const BLUE: [u8; 3] = [31, 119, 180];
const RED: [u8; 3] = [214, 39, 40];
/// Colours of the series of a line chart, in order (matplotlib's tab10).
const SERIES: [[u8; 3]; 6] = [
    BLUE,
    [255, 127, 14],
    [44, 160, 44],
    RED,
    [148, 103, 189],
    [140, 86, 75],
];

// Scatter/ROC layout: margins around the plot area, in pixels.
const MARGIN_LEFT: u32 = 62;
const MARGIN_RIGHT: u32 = 16;
const MARGIN_TOP: u32 = 30;
const MARGIN_BOTTOM: u32 = 46;
const TICK: i64 = 4;

// Heat-map layout: a title band above, a colorbar panel to the right.
const HEAT_TITLE_BAND: u32 = 24;
const HEAT_BAR_PANEL: u32 = 90;
const HEAT_MIN_HEIGHT: u32 = 120;

/// Glyph rows of the 5×7 font, top to bottom; bit 4 is the leftmost column.
pub(crate) fn glyph(c: char) -> [u8; 7] {
    match c {
        '0' => [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E],
        '1' => [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E],
        '2' => [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F],
        '3' => [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E],
        '4' => [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02],
        '5' => [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E],
        '6' => [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E],
        '7' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08],
        '8' => [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E],
        '9' => [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C],
        'A' => [0x0E, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11],
        'B' => [0x1E, 0x11, 0x11, 0x1E, 0x11, 0x11, 0x1E],
        'C' => [0x0E, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0E],
        'D' => [0x1C, 0x12, 0x11, 0x11, 0x11, 0x12, 0x1C],
        'E' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F],
        'F' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x10],
        'G' => [0x0E, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0F],
        'H' => [0x11, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11],
        'I' => [0x0E, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E],
        'J' => [0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0C],
        'K' => [0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11],
        'L' => [0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1F],
        'M' => [0x11, 0x1B, 0x15, 0x15, 0x11, 0x11, 0x11],
        'N' => [0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11],
        'O' => [0x0E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        'P' => [0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10, 0x10],
        'Q' => [0x0E, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0D],
        'R' => [0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11],
        'S' => [0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E],
        'T' => [0x1F, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04],
        'U' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        'V' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x0A, 0x04],
        'W' => [0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0A],
        'X' => [0x11, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x11],
        'Y' => [0x11, 0x11, 0x11, 0x0A, 0x04, 0x04, 0x04],
        'Z' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1F],
        'a' => [0, 0, 0x0E, 0x01, 0x0F, 0x11, 0x0F],
        'b' => [0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x1E],
        'c' => [0, 0, 0x0E, 0x10, 0x10, 0x11, 0x0E],
        'd' => [0x01, 0x01, 0x0D, 0x13, 0x11, 0x11, 0x0F],
        'e' => [0, 0, 0x0E, 0x11, 0x1F, 0x10, 0x0E],
        'f' => [0x06, 0x09, 0x08, 0x1C, 0x08, 0x08, 0x08],
        'g' => [0, 0x0F, 0x11, 0x11, 0x0F, 0x01, 0x0E],
        'h' => [0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x11],
        'i' => [0x04, 0, 0x0C, 0x04, 0x04, 0x04, 0x0E],
        'j' => [0x02, 0, 0x06, 0x02, 0x02, 0x12, 0x0C],
        'k' => [0x10, 0x10, 0x12, 0x14, 0x18, 0x14, 0x12],
        'l' => [0x0C, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E],
        'm' => [0, 0, 0x1A, 0x15, 0x15, 0x11, 0x11],
        'n' => [0, 0, 0x16, 0x19, 0x11, 0x11, 0x11],
        'o' => [0, 0, 0x0E, 0x11, 0x11, 0x11, 0x0E],
        'p' => [0, 0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10],
        'q' => [0, 0x0F, 0x11, 0x11, 0x0F, 0x01, 0x01],
        'r' => [0, 0, 0x16, 0x19, 0x10, 0x10, 0x10],
        's' => [0, 0, 0x0F, 0x10, 0x0E, 0x01, 0x1E],
        't' => [0x08, 0x08, 0x1C, 0x08, 0x08, 0x09, 0x06],
        'u' => [0, 0, 0x11, 0x11, 0x11, 0x13, 0x0D],
        'v' => [0, 0, 0x11, 0x11, 0x11, 0x0A, 0x04],
        'w' => [0, 0, 0x11, 0x11, 0x15, 0x15, 0x0A],
        'x' => [0, 0, 0x11, 0x0A, 0x04, 0x0A, 0x11],
        'y' => [0, 0x11, 0x11, 0x11, 0x0F, 0x01, 0x0E],
        'z' => [0, 0, 0x1F, 0x02, 0x04, 0x08, 0x1F],
        ' ' => [0; 7],
        '.' => [0, 0, 0, 0, 0, 0x0C, 0x0C],
        ',' => [0, 0, 0, 0, 0x0C, 0x04, 0x08],
        '-' => [0, 0, 0, 0x1F, 0, 0, 0],
        '+' => [0, 0x04, 0x04, 0x1F, 0x04, 0x04, 0],
        '=' => [0, 0, 0x1F, 0, 0x1F, 0, 0],
        '(' => [0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02],
        ')' => [0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08],
        '[' => [0x0E, 0x08, 0x08, 0x08, 0x08, 0x08, 0x0E],
        ']' => [0x0E, 0x02, 0x02, 0x02, 0x02, 0x02, 0x0E],
        ':' => [0, 0x0C, 0x0C, 0, 0x0C, 0x0C, 0],
        ';' => [0, 0x0C, 0x0C, 0, 0x0C, 0x04, 0x08],
        '/' => [0, 0x01, 0x02, 0x04, 0x08, 0x10, 0],
        '%' => [0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03],
        '_' => [0, 0, 0, 0, 0, 0, 0x1F],
        '\'' => [0x04, 0x04, 0x08, 0, 0, 0, 0],
        '<' => [0x02, 0x04, 0x08, 0x10, 0x08, 0x04, 0x02],
        '>' => [0x08, 0x04, 0x02, 0x01, 0x02, 0x04, 0x08],
        '*' => [0, 0x04, 0x15, 0x0E, 0x15, 0x04, 0],
        '^' => [0x04, 0x0A, 0x11, 0, 0, 0, 0],
        '|' => [0x04; 7],
        '!' => [0x04, 0x04, 0x04, 0x04, 0x04, 0, 0x04],
        '#' => [0x0A, 0x0A, 0x1F, 0x0A, 0x1F, 0x0A, 0x0A],
        '²' => [0x0C, 0x12, 0x04, 0x08, 0x1E, 0, 0],
        '×' => [0, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0],
        _ => [0x0E, 0x11, 0x01, 0x02, 0x04, 0, 0x04],
    }
}

/// Width in pixels of `text` drawn at `scale` (6 pixels per character, no
/// trailing gap).
pub fn text_width(text: &str, scale: u32) -> u32 {
    let n = text.chars().count() as u32;
    (n * 6).saturating_sub(1) * scale
}

/// The viridis colormap at `t` in [0, 1] (clamped; NaN gives the low end),
/// interpolated linearly between nine samples of matplotlib's table.
pub fn viridis(t: f64) -> [u8; 3] {
    const STOPS: [[f64; 3]; 9] = [
        [68.0, 1.0, 84.0],
        [72.0, 36.0, 117.0],
        [59.0, 82.0, 139.0],
        [44.0, 114.0, 142.0],
        [33.0, 145.0, 140.0],
        [34.0, 168.0, 132.0],
        [94.0, 201.0, 98.0],
        [170.0, 220.0, 50.0],
        [253.0, 231.0, 37.0],
    ];
    let t = if t.is_nan() { 0.0 } else { t.clamp(0.0, 1.0) };
    let pos = t * (STOPS.len() - 1) as f64;
    let i = (pos.floor() as usize).min(STOPS.len() - 2);
    let f = pos - i as f64;
    let (a, b) = (STOPS[i], STOPS[i + 1]);
    [0, 1, 2].map(|c| (a[c] + (b[c] - a[c]) * f).round() as u8)
}

/// An RGB image with clipped drawing primitives.
struct Canvas {
    img: RgbImage,
}

impl Canvas {
    fn new(width: u32, height: u32) -> Canvas {
        Canvas {
            img: RgbImage::from_pixel(width, height, Rgb(WHITE)),
        }
    }

    /// Mixes `color` into pixel (x, y) with opacity `alpha`; off-canvas is ignored.
    fn blend(&mut self, x: i64, y: i64, color: [u8; 3], alpha: f64) {
        let (Ok(x), Ok(y)) = (u32::try_from(x), u32::try_from(y)) else {
            return;
        };
        if let Some(px) = self.img.get_pixel_mut_checked(x, y) {
            for (dst, src) in px.0.iter_mut().zip(color) {
                *dst = (f64::from(*dst) * (1.0 - alpha) + f64::from(src) * alpha).round() as u8;
            }
        }
    }

    fn set(&mut self, x: i64, y: i64, color: [u8; 3]) {
        self.blend(x, y, color, 1.0);
    }

    /// A line of `width` pixels (1 or more) by Bresenham's algorithm; with
    /// `dash`, on and off runs of `dash` pixels.
    fn line(&mut self, from: (i64, i64), to: (i64, i64), color: [u8; 3], width: i64, dash: i64) {
        let (mut x, mut y) = from;
        let (dx, dy) = ((to.0 - x).abs(), -(to.1 - y).abs());
        let (sx, sy) = (if x < to.0 { 1 } else { -1 }, if y < to.1 { 1 } else { -1 });
        let mut err = dx + dy;
        let mut step = 0;
        loop {
            if dash == 0 || (step / dash) % 2 == 0 {
                for oy in 0..width {
                    for ox in 0..width {
                        self.set(x + ox - width / 2, y + oy - width / 2, color);
                    }
                }
            }
            if (x, y) == to {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
            step += 1;
        }
    }

    fn fill_rect(&mut self, x0: i64, y0: i64, x1: i64, y1: i64, color: [u8; 3]) {
        for y in y0..y1 {
            for x in x0..x1 {
                self.set(x, y, color);
            }
        }
    }

    fn disc(&mut self, cx: i64, cy: i64, r: i64, color: [u8; 3], alpha: f64) {
        for y in -r..=r {
            for x in -r..=r {
                if x * x + y * y <= r * r + r {
                    self.blend(cx + x, cy + y, color, alpha);
                }
            }
        }
    }

    /// Text with its top-left corner at (x, y).
    fn text(&mut self, x: i64, y: i64, text: &str, scale: u32, color: [u8; 3]) {
        let s = i64::from(scale);
        for (i, c) in text.chars().enumerate() {
            let gx = x + i as i64 * 6 * s;
            for (row, bits) in glyph(c).iter().enumerate() {
                for col in 0..5 {
                    if bits & (0x10 >> col) != 0 {
                        let (px, py) = (gx + col * s, y + row as i64 * s);
                        self.fill_rect(px, py, px + s, py + s, color);
                    }
                }
            }
        }
    }

    /// Text turned 90° anticlockwise (reading upwards), its first character's
    /// bottom-left corner at (x, y).
    fn text_up(&mut self, x: i64, y: i64, text: &str, scale: u32, color: [u8; 3]) {
        let s = i64::from(scale);
        for (i, c) in text.chars().enumerate() {
            let gy = y - i as i64 * 6 * s;
            for (row, bits) in glyph(c).iter().enumerate() {
                for col in 0..5 {
                    if bits & (0x10 >> col) != 0 {
                        let (px, py) = (x + row as i64 * s, gy - (col + 1) * s);
                        self.fill_rect(px, py, px + s, py + s, color);
                    }
                }
            }
        }
    }

    /// Text centred horizontally on `cx`, at scale 2 if it fits in `room`
    /// pixels, else at scale 1.
    fn title(&mut self, cx: i64, y: i64, text: &str, room: u32) {
        let scale = if text_width(text, 2) <= room { 2 } else { 1 };
        let w = i64::from(text_width(text, scale));
        self.text(cx - w / 2, y, text, scale, BLACK);
    }
}

/// Tick positions in [lo, hi] at the finest 1-2-5 step that gives at most
/// `target + 1` intervals, and the number of decimals that step needs.
fn nice_ticks(lo: f64, hi: f64, target: usize) -> (Vec<f64>, usize) {
    let span = hi - lo;
    let raw = span / target.max(1) as f64;
    if !(raw > 0.0 && raw.is_finite()) {
        return (vec![lo], 0);
    }
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| span / s <= (target + 1) as f64 * (1.0 + 1e-9))
        .unwrap_or(10.0 * mag);
    let decimals = (-step.log10().floor()).max(0.0) as usize;
    let first = (lo / step).ceil() as i64;
    let last = (hi / step).floor() as i64;
    let ticks = (first..=last).map(|k| k as f64 * step).collect();
    (ticks, decimals)
}

/// `v` with `decimals` decimals, without a minus sign on zero.
fn format_tick(v: f64, decimals: usize) -> String {
    let s = format!("{v:.decimals$}");
    if s.trim_start_matches('-')
        .chars()
        .all(|c| c == '0' || c == '.')
    {
        s.trim_start_matches('-').to_string()
    } else {
        s
    }
}

/// The plot area and data-to-pixel mapping shared by scatter and ROC plots.
struct Axes {
    left: i64,
    right: i64,
    top: i64,
    bottom: i64,
    x_range: (f64, f64),
    y_range: (f64, f64),
}

impl Axes {
    fn px(&self, x: f64, y: f64) -> (i64, i64) {
        let fx = (x - self.x_range.0) / (self.x_range.1 - self.x_range.0);
        let fy = (y - self.y_range.0) / (self.y_range.1 - self.y_range.0);
        (
            self.left + (fx * (self.right - self.left) as f64).round() as i64,
            self.bottom - (fy * (self.bottom - self.top) as f64).round() as i64,
        )
    }

    /// Box, ticks, tick labels, axis labels and title.
    fn draw_frame(&self, c: &mut Canvas, opts: &PlotOptions) {
        let (l, r, t, b) = (self.left, self.right, self.top, self.bottom);
        c.line((l, t), (r, t), BLACK, 1, 0);
        c.line((r, t), (r, b), BLACK, 1, 0);
        c.line((r, b), (l, b), BLACK, 1, 0);
        c.line((l, b), (l, t), BLACK, 1, 0);
        let (xt, xd) = nice_ticks(self.x_range.0, self.x_range.1, 5);
        for v in xt {
            let (x, _) = self.px(v, self.y_range.0);
            c.line((x, b), (x, b + TICK), BLACK, 1, 0);
            let label = format_tick(v, xd);
            let w = i64::from(text_width(&label, 1));
            c.text(x - w / 2, b + TICK + 3, &label, 1, BLACK);
        }
        let (yt, yd) = nice_ticks(self.y_range.0, self.y_range.1, 5);
        for v in yt {
            let (_, y) = self.px(self.x_range.0, v);
            c.line((l - TICK, y), (l, y), BLACK, 1, 0);
            let label = format_tick(v, yd);
            let w = i64::from(text_width(&label, 1));
            c.text(l - TICK - 3 - w, y - 3, &label, 1, BLACK);
        }
        let width = i64::from(c.img.width());
        let height = i64::from(c.img.height());
        let xw = i64::from(text_width(&opts.x_label, 1));
        c.text((l + r) / 2 - xw / 2, height - 16, &opts.x_label, 1, BLACK);
        let yw = i64::from(text_width(&opts.y_label, 1));
        c.text_up(6, (t + b) / 2 + yw / 2, &opts.y_label, 1, BLACK);
        c.title(width / 2, 8, &opts.title, c.img.width().saturating_sub(8));
    }
}

/// Checks the plot size and returns the axes for data ranges `x_range`, `y_range`.
fn axes(opts: &PlotOptions, x_range: (f64, f64), y_range: (f64, f64)) -> Result<Axes> {
    if opts.width < MIN_PLOT_WIDTH || opts.height < MIN_PLOT_HEIGHT {
        return Err(Error::invalid(format!(
            "plot size {}×{} is below the minimum {MIN_PLOT_WIDTH}×{MIN_PLOT_HEIGHT}",
            opts.width, opts.height
        )));
    }
    Ok(Axes {
        left: i64::from(MARGIN_LEFT),
        right: i64::from(opts.width - MARGIN_RIGHT) - 1,
        top: i64::from(MARGIN_TOP),
        bottom: i64::from(opts.height - MARGIN_BOTTOM) - 1,
        x_range,
        y_range,
    })
}

/// Checks that `x` and `y` are non-empty, of equal length and finite.
fn check_points(op: &'static str, x: &[f64], y: &[f64]) -> Result<()> {
    if x.len() != y.len() {
        return Err(Error::shape(
            op,
            format!("x has {} values, y has {}", x.len(), y.len()),
        ));
    }
    if x.is_empty() {
        return Err(Error::invalid(format!("{op}: no points to plot")));
    }
    if let Some(i) = x
        .iter()
        .zip(y)
        .position(|(a, b)| !(a.is_finite() && b.is_finite()))
    {
        return Err(Error::invalid(format!("{op}: point {i} is not finite")));
    }
    Ok(())
}

/// Renders a scatter plot of `y` (predicted) against `x` (measured), with a
/// dashed `y = x` line. Both axes share one range, the data's extent padded
/// by 5 %, so the line is the diagonal.
///
/// # Errors
/// Lengths differ, no points, a non-finite value, or a size below the minimum.
pub fn scatter_image(x: &[f64], y: &[f64], opts: &PlotOptions) -> Result<RgbImage> {
    check_points("scatter_plot", x, y)?;
    let (lo, hi) = x
        .iter()
        .chain(y)
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        });
    let pad = if hi > lo {
        0.05 * (hi - lo)
    } else {
        0.5f64.max(lo.abs() * 0.1)
    };
    let range = (lo - pad, hi + pad);
    let ax = axes(opts, range, range)?;
    let mut c = Canvas::new(opts.width, opts.height);
    c.line(ax.px(range.0, range.0), ax.px(range.1, range.1), RED, 1, 6);
    for (&xv, &yv) in x.iter().zip(y) {
        let (px, py) = ax.px(xv, yv);
        c.disc(px, py, 3, BLUE, 0.7);
    }
    ax.draw_frame(&mut c, opts);
    Ok(c.img)
}

/// [`scatter_image`] written to `path` as PNG.
pub fn scatter_plot(
    path: impl AsRef<Path>,
    x: &[f64],
    y: &[f64],
    opts: &PlotOptions,
) -> Result<()> {
    save_png(path, &scatter_image(x, y, opts)?)
}

/// Renders a ROC curve through the points (`fpr[i]`, `tpr[i]`) in the given
/// order, on [0, 1]², with the dashed chance diagonal.
///
/// # Errors
/// Lengths differ, no points, or a rate outside [0, 1] (NaN included), or a
/// size below the minimum.
pub fn roc_image(fpr: &[f64], tpr: &[f64], opts: &PlotOptions) -> Result<RgbImage> {
    check_points("roc_plot", fpr, tpr)?;
    if let Some(i) = fpr
        .iter()
        .zip(tpr)
        .position(|(f, t)| !((0.0..=1.0).contains(f) && (0.0..=1.0).contains(t)))
    {
        return Err(Error::invalid(format!(
            "roc_plot: point {i} is outside [0, 1]²"
        )));
    }
    let ax = axes(opts, (0.0, 1.0), (0.0, 1.0))?;
    let mut c = Canvas::new(opts.width, opts.height);
    c.line(ax.px(0.0, 0.0), ax.px(1.0, 1.0), GREY, 1, 6);
    let points: Vec<(i64, i64)> = fpr.iter().zip(tpr).map(|(&f, &t)| ax.px(f, t)).collect();
    for pair in points.windows(2) {
        if let [a, b] = pair {
            c.line(*a, *b, BLUE, 2, 0);
        }
    }
    if let [only] = points.as_slice() {
        c.disc(only.0, only.1, 2, BLUE, 1.0);
    }
    ax.draw_frame(&mut c, opts);
    Ok(c.img)
}

/// [`roc_image`] written to `path` as PNG.
pub fn roc_plot(
    path: impl AsRef<Path>,
    fpr: &[f64],
    tpr: &[f64],
    opts: &PlotOptions,
) -> Result<()> {
    save_png(path, &roc_image(fpr, tpr, opts)?)
}

/// One named series of a line chart: points (`x[i]`, `y[i]`) joined in order.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Shown in the legend.
    pub label: String,
    /// Abscissae.
    pub x: Vec<f64>,
    /// Ordinates.
    pub y: Vec<f64>,
}

/// Renders line charts of `series` on shared axes (the data's extent, the
/// y range padded by 5 %), each series in its own colour (up to six, then
/// repeating) with a dot per point and a legend on white in the top-right
/// corner.
///
/// # Errors
/// No series, a series with no points, lengths that differ or a non-finite
/// value, or a size below the minimum.
pub fn lines_image(series: &[Series], opts: &PlotOptions) -> Result<RgbImage> {
    if series.is_empty() {
        return Err(Error::invalid("line_plot: no series to plot"));
    }
    let mut x_range = (f64::INFINITY, f64::NEG_INFINITY);
    let mut y_range = (f64::INFINITY, f64::NEG_INFINITY);
    for s in series {
        check_points("line_plot", &s.x, &s.y)?;
        for (&x, &y) in s.x.iter().zip(&s.y) {
            x_range = (x_range.0.min(x), x_range.1.max(x));
            y_range = (y_range.0.min(y), y_range.1.max(y));
        }
    }
    if x_range.1 <= x_range.0 {
        x_range = (x_range.0 - 0.5, x_range.1 + 0.5);
    }
    let pad = if y_range.1 > y_range.0 {
        0.05 * (y_range.1 - y_range.0)
    } else {
        0.5f64.max(y_range.0.abs() * 0.1)
    };
    y_range = (y_range.0 - pad, y_range.1 + pad);
    let ax = axes(opts, x_range, y_range)?;
    let mut c = Canvas::new(opts.width, opts.height);
    for (k, s) in series.iter().enumerate() {
        let color = SERIES[k % SERIES.len()];
        let points: Vec<(i64, i64)> = s.x.iter().zip(&s.y).map(|(&x, &y)| ax.px(x, y)).collect();
        for pair in points.windows(2) {
            if let [a, b] = pair {
                c.line(*a, *b, color, 2, 0);
            }
        }
        for &(px, py) in &points {
            c.disc(px, py, 2, color, 1.0);
        }
    }
    let widest = series
        .iter()
        .map(|s| i64::from(text_width(&s.label, 1)))
        .max()
        .unwrap_or(0);
    let x0 = ax.right - widest - 26;
    let rows = series.len() as i64;
    c.fill_rect(
        x0 - 4,
        ax.top + 4,
        ax.right - 2,
        ax.top + 12 + 12 * rows,
        WHITE,
    );
    for (k, s) in series.iter().enumerate() {
        let y = ax.top + 8 + 12 * k as i64;
        let color = SERIES[k % SERIES.len()];
        c.line((x0, y + 3), (x0 + 14, y + 3), color, 2, 0);
        c.text(x0 + 18, y, &s.label, 1, BLACK);
    }
    ax.draw_frame(&mut c, opts);
    Ok(c.img)
}

/// [`lines_image`] written to `path` as PNG.
pub fn line_plot(path: impl AsRef<Path>, series: &[Series], opts: &PlotOptions) -> Result<()> {
    save_png(path, &lines_image(series, opts)?)
}

/// The shrink factor for an image of `width × height` (see
/// [`HeatmapOptions::max_side`]).
fn shrink_factor(width: usize, height: usize, max_side: usize) -> usize {
    width.max(height).div_ceil(max_side.max(1)).max(1)
}

/// Width and height of the PNG [`heatmap_image`] draws for a `width × height`
/// image: the shrunk image (each side divided by the shrink factor, rounded
/// up) plus a 90-pixel colorbar panel to the right and a 24-pixel title band
/// above; at least 120 pixels below the band, so the colorbar fits.
pub fn heatmap_size(width: usize, height: usize, opts: &HeatmapOptions) -> (u32, u32) {
    let s = shrink_factor(width, height, opts.max_side);
    let iw = u32::try_from(width.div_ceil(s)).unwrap_or(u32::MAX);
    let ih = u32::try_from(height.div_ceil(s)).unwrap_or(u32::MAX);
    (
        iw.saturating_add(HEAT_BAR_PANEL),
        ih.max(HEAT_MIN_HEIGHT).saturating_add(HEAT_TITLE_BAND),
    )
}

/// Renders `values` (one per patch of `grid`, row-major) in viridis over
/// `image`, shown in grey stretched from its darkest to its brightest
/// pixel. Patch `i` tints the pixels it covers; pixels in no patch and
/// non-finite values stay grey. A colorbar with the range's ends and middle
/// sits to the right. Size: [`heatmap_size`].
///
/// # Errors
/// `values.len()` differs from the grid's, the grid does not fit the image,
/// `alpha` is outside [0, 1], the range is not finite and increasing, or no
/// value is finite when the range is taken from the data.
pub fn heatmap_image(
    image: &GrayImage,
    grid: &PatchGrid,
    values: &[f64],
    opts: &HeatmapOptions,
) -> Result<RgbImage> {
    const OP: &str = "heatmap_overlay";
    if values.len() != grid.len() {
        return Err(Error::shape(
            OP,
            format!(
                "{} values for a {}×{} patch grid",
                values.len(),
                grid.rows(),
                grid.cols()
            ),
        ));
    }
    let (w, h, p) = (image.width(), image.height(), grid.patch());
    if grid.cols() * p > w || grid.rows() * p > h {
        return Err(Error::shape(
            OP,
            format!(
                "a {}×{} grid of {p}-pixel patches does not fit a {w}×{h} image",
                grid.rows(),
                grid.cols()
            ),
        ));
    }
    if !(0.0..=1.0).contains(&opts.alpha) {
        return Err(Error::invalid(format!(
            "{OP}: alpha must be in [0, 1] (got {})",
            opts.alpha
        )));
    }
    let (lo, hi) = color_range(OP, opts.range, values)?;
    let tone = |v: f64| if hi > lo { (v - lo) / (hi - lo) } else { 0.5 };

    let s = shrink_factor(w, h, opts.max_side);
    let (iw, ih) = (w.div_ceil(s), h.div_ceil(s));
    let (out_w, out_h) = heatmap_size(w, h, opts);
    let mut c = Canvas::new(out_w, out_h);
    let top = i64::from(HEAT_TITLE_BAND);

    let data = image.data();
    let (pmin, pmax) = data
        .iter()
        .fold((u16::MAX, 0u16), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    let stretch = |mean: f64| {
        if pmax > pmin {
            (mean - f64::from(pmin)) / f64::from(pmax - pmin) * 255.0
        } else {
            128.0
        }
    };
    for oy in 0..ih {
        let (y0, y1) = (oy * s, ((oy + 1) * s).min(h));
        for ox in 0..iw {
            let (x0, x1) = (ox * s, ((ox + 1) * s).min(w));
            let mut sum = 0u64;
            for y in y0..y1 {
                if let Some(row) = data.get(y * w + x0..y * w + x1) {
                    sum += row.iter().map(|&v| u64::from(v)).sum::<u64>();
                }
            }
            let n = ((y1 - y0) * (x1 - x0)).max(1) as f64;
            let g = stretch(sum as f64 / n).round().clamp(0.0, 255.0) as u8;
            let (px, py) = (ox as i64, top + oy as i64);
            c.set(px, py, [g, g, g]);
            // The patch under the block's centre pixel decides the tint.
            let (cx, cy) = ((x0 + x1) / 2, (y0 + y1) / 2);
            let (col, row) = (cx / p, cy / p);
            if col < grid.cols() && row < grid.rows() {
                if let Some(&v) = values.get(row * grid.cols() + col) {
                    if v.is_finite() {
                        c.blend(px, py, viridis(tone(v)), opts.alpha);
                    }
                }
            }
        }
    }

    // Colorbar: high values at the top.
    let bar_x = iw as i64 + 12;
    let (bar_top, bar_bottom) = (top + 8, top + i64::from(out_h - HEAT_TITLE_BAND) - 9);
    for y in bar_top..=bar_bottom {
        let t = (bar_bottom - y) as f64 / (bar_bottom - bar_top).max(1) as f64;
        c.fill_rect(bar_x, y, bar_x + 14, y + 1, viridis(t));
    }
    let (_, decimals) = nice_ticks(lo, hi, 4);
    let label_x = bar_x + 14 + 9;
    for (t, y) in [
        (1.0, bar_top),
        (0.5, (bar_top + bar_bottom) / 2),
        (0.0, bar_bottom),
    ] {
        c.line((bar_x + 14, y), (bar_x + 17, y), BLACK, 1, 0);
        let label = format_tick(lo + t * (hi - lo), decimals + 1);
        c.text(label_x, y - 3, &label, 1, BLACK);
    }
    c.title(iw as i64 / 2, 5, &opts.title, out_w.saturating_sub(4));
    Ok(c.img)
}

/// [`heatmap_image`] written to `path` as PNG.
pub fn heatmap_overlay(
    path: impl AsRef<Path>,
    image: &GrayImage,
    grid: &PatchGrid,
    values: &[f64],
    opts: &HeatmapOptions,
) -> Result<()> {
    save_png(path, &heatmap_image(image, grid, values, opts)?)
}

/// Title, axis labels and colour range of a [`matrix_heatmap`].
#[derive(Debug, Clone, PartialEq, Default)]
pub struct MatrixHeatmapOptions {
    /// Drawn in a band above the matrix.
    pub title: String,
    /// Drawn below the column labels.
    pub x_label: String,
    /// Drawn left of the row labels, reading upwards.
    pub y_label: String,
    /// Values mapped to the two ends of the colormap; `None` uses the
    /// smallest and largest finite value.
    pub range: Option<(f64, f64)>,
}

// Matrix heat-map layout: square cells, labels around them.
const CELL: u32 = 44;

/// A matrix as coloured cells (viridis, non-finite values grey) with a text
/// in each cell (e.g. a count), row labels on the left, column labels below
/// (reading upwards) and a colorbar on the right: a confusion matrix.
/// `values` and `cells` are row-major, `row_labels.len() ×
/// col_labels.len()`.
///
/// # Errors
/// Lengths that do not match, an empty matrix, a range that is not finite
/// and increasing, or no finite value when the range comes from the data.
pub fn matrix_heatmap_image(
    values: &[f64],
    cells: &[String],
    row_labels: &[String],
    col_labels: &[String],
    opts: &MatrixHeatmapOptions,
) -> Result<RgbImage> {
    const OP: &str = "matrix_heatmap";
    let (nr, nc) = (row_labels.len(), col_labels.len());
    if nr == 0 || nc == 0 || values.len() != nr * nc || cells.len() != nr * nc {
        return Err(Error::shape(
            OP,
            format!(
                "{} values and {} cell texts for a {nr}×{nc} matrix",
                values.len(),
                cells.len()
            ),
        ));
    }
    let (lo, hi) = color_range(OP, opts.range, values)?;
    let tone = |v: f64| if hi > lo { (v - lo) / (hi - lo) } else { 0.5 };
    let widest = |labels: &[String]| labels.iter().map(|l| text_width(l, 1)).max().unwrap_or(0);
    let left = 24 + widest(row_labels) + 8;
    let below = 8 + widest(col_labels) + 24;
    let (mw, mh) = (CELL * nc as u32, CELL * nr as u32);
    let width = (left + mw + HEAT_BAR_PANEL).max(text_width(&opts.title, 1) + 8);
    let height = HEAT_TITLE_BAND + mh.max(HEAT_MIN_HEIGHT) + below;
    let mut c = Canvas::new(width, height);
    let (x0, y0) = (i64::from(left), i64::from(HEAT_TITLE_BAND));
    let cell = i64::from(CELL);
    for r in 0..nr {
        for col in 0..nc {
            let v = values[r * nc + col];
            let color = if v.is_finite() {
                viridis(tone(v))
            } else {
                GREY
            };
            let (cx, cy) = (x0 + col as i64 * cell, y0 + r as i64 * cell);
            c.fill_rect(cx, cy, cx + cell - 1, cy + cell - 1, color);
            // Dark text on the light (yellow) end, white elsewhere.
            let ink = if v.is_finite() && tone(v) > 0.6 {
                BLACK
            } else {
                WHITE
            };
            let text = &cells[r * nc + col];
            let w = i64::from(text_width(text, 1));
            c.text(cx + (cell - w) / 2, cy + cell / 2 - 3, text, 1, ink);
        }
        let w = i64::from(text_width(&row_labels[r], 1));
        let y = y0 + r as i64 * cell + cell / 2 - 3;
        c.text(x0 - 8 - w, y, &row_labels[r], 1, BLACK);
    }
    for (col, label) in col_labels.iter().enumerate() {
        let x = x0 + col as i64 * cell + cell / 2 - 3;
        let bottom = y0 + i64::from(mh) + 8 + i64::from(text_width(label, 1));
        c.text_up(x, bottom, label, 1, BLACK);
    }
    let xl = i64::from(text_width(&opts.x_label, 1));
    c.text(
        x0 + i64::from(mw) / 2 - xl / 2,
        i64::from(height) - 14,
        &opts.x_label,
        1,
        BLACK,
    );
    let yl = i64::from(text_width(&opts.y_label, 1));
    c.text_up(6, y0 + i64::from(mh) / 2 + yl / 2, &opts.y_label, 1, BLACK);

    let bar_x = x0 + i64::from(mw) + 12;
    let (bar_top, bar_bottom) = (y0 + 4, y0 + i64::from(mh.max(HEAT_MIN_HEIGHT)) - 5);
    for y in bar_top..=bar_bottom {
        let t = (bar_bottom - y) as f64 / (bar_bottom - bar_top).max(1) as f64;
        c.fill_rect(bar_x, y, bar_x + 14, y + 1, viridis(t));
    }
    let (_, decimals) = nice_ticks(lo, hi, 4);
    for (t, y) in [
        (1.0, bar_top),
        (0.5, (bar_top + bar_bottom) / 2),
        (0.0, bar_bottom),
    ] {
        c.line((bar_x + 14, y), (bar_x + 17, y), BLACK, 1, 0);
        let label = format_tick(lo + t * (hi - lo), decimals + 1);
        c.text(bar_x + 23, y - 3, &label, 1, BLACK);
    }
    c.title(
        i64::from(width) / 2,
        5,
        &opts.title,
        width.saturating_sub(4),
    );
    Ok(c.img)
}

/// [`matrix_heatmap_image`] written to `path` as PNG.
pub fn matrix_heatmap(
    path: impl AsRef<Path>,
    values: &[f64],
    cells: &[String],
    row_labels: &[String],
    col_labels: &[String],
    opts: &MatrixHeatmapOptions,
) -> Result<()> {
    save_png(
        path,
        &matrix_heatmap_image(values, cells, row_labels, col_labels, opts)?,
    )
}

/// Writes `img` to `path` as PNG, atomically.
pub fn save_png(path: impl AsRef<Path>, img: &RgbImage) -> Result<()> {
    let path = path.as_ref();
    let mut bytes = Cursor::new(Vec::new());
    img.write_to(&mut bytes, ImageFormat::Png)
        .map_err(|e| Error::format(path, format!("encoding PNG: {e}")))?;
    write_atomic(path, bytes.get_ref())
}

/// Colours of categories (matplotlib's tab10), repeating after ten.
const CATEGORY: [[u8; 3]; 10] = [
    BLUE,
    [255, 127, 14],
    [44, 160, 44],
    RED,
    [148, 103, 189],
    [140, 86, 75],
    [227, 119, 194],
    [127, 127, 127],
    [188, 189, 34],
    [23, 190, 207],
];

/// Width of the legend or colour-bar panel right of a coloured scatter plot.
const SIDE_PANEL: u32 = 120;

/// How [`colored_scatter_image`] colours its points.
#[derive(Debug, Clone, PartialEq)]
pub enum PointColors {
    /// Every point in one colour, no legend.
    Single,
    /// A category per point (`index[i]` into `names`), tab10 colours
    /// (repeating after ten) with a legend.
    Categories {
        /// Category of each point.
        index: Vec<usize>,
        /// Category names, in legend order.
        names: Vec<String>,
    },
    /// A number per point in viridis, with a colour bar.
    Values {
        /// Value of each point.
        values: Vec<f64>,
        /// Drawn above the colour bar.
        label: String,
    },
}

/// Renders points (`x[i]`, `y[i]`) on axes fitted to each coordinate's
/// extent (padded 5 %), coloured by `colors`, with a legend or colour bar
/// in a 120-pixel panel on the right (none for [`PointColors::Single`]).
///
/// # Errors
/// Lengths differ, no points, a non-finite coordinate or value, a category
/// index out of range, or a size below the minimum (plus the panel).
pub fn colored_scatter_image(
    x: &[f64],
    y: &[f64],
    colors: &PointColors,
    opts: &PlotOptions,
) -> Result<RgbImage> {
    const OP: &str = "scatter_plot";
    check_points(OP, x, y)?;
    let panel = match colors {
        PointColors::Single => 0,
        PointColors::Categories { index, names } => {
            if index.len() != x.len() {
                return Err(Error::shape(
                    OP,
                    format!("{} categories for {} points", index.len(), x.len()),
                ));
            }
            if let Some(i) = index.iter().position(|&c| c >= names.len()) {
                return Err(Error::invalid(format!(
                    "{OP}: point {i} has category {} of {}",
                    index[i],
                    names.len()
                )));
            }
            SIDE_PANEL
        }
        PointColors::Values { values, .. } => {
            check_points(OP, x, values)?;
            SIDE_PANEL
        }
    };
    let extent = |v: &[f64]| {
        let (lo, hi) = v
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &a| {
                (lo.min(a), hi.max(a))
            });
        let pad = if hi > lo {
            0.05 * (hi - lo)
        } else {
            0.5f64.max(lo.abs() * 0.1)
        };
        (lo - pad, hi + pad)
    };
    let narrowed = PlotOptions {
        width: opts.width.saturating_sub(panel),
        ..opts.clone()
    };
    let ax = axes(&narrowed, extent(x), extent(y))?;
    let mut c = Canvas::new(opts.width, opts.height);
    let value_range = match colors {
        PointColors::Values { values, .. } => {
            let (lo, hi) = values
                .iter()
                .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &a| {
                    (lo.min(a), hi.max(a))
                });
            Some((lo, hi))
        }
        _ => None,
    };
    for i in 0..x.len() {
        let color = match colors {
            PointColors::Single => BLUE,
            PointColors::Categories { index, .. } => CATEGORY[index[i] % CATEGORY.len()],
            PointColors::Values { values, .. } => {
                let (lo, hi) = value_range.unwrap_or((0.0, 1.0));
                viridis(if hi > lo {
                    (values[i] - lo) / (hi - lo)
                } else {
                    0.5
                })
            }
        };
        let (px, py) = ax.px(x[i], y[i]);
        c.disc(px, py, 3, color, 0.8);
    }
    let panel_x = i64::from(opts.width - panel) + 6;
    match colors {
        PointColors::Single => {}
        PointColors::Categories { names, .. } => {
            let rows = ((ax.bottom - ax.top - 8) / 12).max(1) as usize;
            for (k, name) in names.iter().enumerate() {
                let yk = ax.top + 4 + 12 * k as i64;
                if k + 1 == rows && names.len() > rows {
                    c.text(panel_x, yk, &format!("+{} more", names.len() - k), 1, BLACK);
                    break;
                }
                c.disc(panel_x + 3, yk + 3, 3, CATEGORY[k % CATEGORY.len()], 1.0);
                let shown: String = name.chars().take(17).collect();
                c.text(panel_x + 10, yk, &shown, 1, BLACK);
            }
        }
        PointColors::Values { label, .. } => {
            let (lo, hi) = value_range.unwrap_or((0.0, 1.0));
            let shown: String = label.chars().take(18).collect();
            c.text(panel_x, ax.top, &shown, 1, BLACK);
            let (top, bottom) = (ax.top + 14, ax.bottom);
            for yy in top..=bottom {
                let t = (bottom - yy) as f64 / (bottom - top).max(1) as f64;
                c.fill_rect(panel_x, yy, panel_x + 14, yy + 1, viridis(t));
            }
            let (_, decimals) = nice_ticks(lo, hi, 4);
            for (t, yy) in [(1.0, top), (0.5, (top + bottom) / 2), (0.0, bottom)] {
                c.line((panel_x + 14, yy), (panel_x + 17, yy), BLACK, 1, 0);
                let v = lo + t * (hi - lo);
                c.text(
                    panel_x + 21,
                    yy - 3,
                    &format_tick(v, decimals + 1),
                    1,
                    BLACK,
                );
            }
        }
    }
    ax.draw_frame(&mut c, &narrowed);
    Ok(c.img)
}

/// How [`dendrogram_heatmap_image`] draws its heat map.
#[derive(Debug, Clone, PartialEq)]
pub struct DendrogramHeatmapOptions {
    /// Drawn centred above the image.
    pub title: String,
    /// Values mapped to the two ends of viridis (values outside are clamped).
    pub range: (f64, f64),
    /// Drawn above the colour bar.
    pub value_label: String,
    /// A flat cluster (1..) per row, shown as a strip of tab10 colours
    /// between the dendrogram and the heat map.
    pub groups: Option<Vec<usize>>,
}

/// Renders a dendrogram of `linkage` beside a heat map of `values` (one row
/// per leaf of the linkage, `cols` columns, row-major in the items' order),
/// the rows drawn in dendrogram leaf order, with a colour bar. Row and
/// column names are written when the cells are at least 8 pixels.
///
/// # Errors
/// Shapes that do not fit the linkage, the names or the groups, a
/// non-finite value, or a range that is not finite and increasing.
pub fn dendrogram_heatmap_image(
    linkage: &crate::stats::cluster::Linkage,
    values: &[f64],
    cols: usize,
    row_names: &[String],
    col_names: &[String],
    opts: &DendrogramHeatmapOptions,
) -> Result<RgbImage> {
    const OP: &str = "dendrogram_heatmap";
    let rows = linkage.n;
    if cols == 0
        || values.len() != rows * cols
        || row_names.len() != rows
        || col_names.len() != cols
    {
        return Err(Error::shape(
            OP,
            format!(
                "{} values, {} row names and {} column names for {rows} rows × {cols} columns",
                values.len(),
                row_names.len(),
                col_names.len()
            ),
        ));
    }
    if values.iter().any(|v| !v.is_finite()) {
        return Err(Error::invalid(format!("{OP}: a value is not finite")));
    }
    if opts.groups.as_ref().is_some_and(|g| g.len() != rows) {
        return Err(Error::shape(
            OP,
            format!("groups for other than {rows} rows"),
        ));
    }
    let (lo, hi) = opts.range;
    if !(lo.is_finite() && hi.is_finite() && lo < hi) {
        return Err(Error::invalid(format!(
            "{OP}: range ({lo}, {hi}) must be finite and increasing"
        )));
    }
    const DENDRO: i64 = 160;
    let cell_w = (600 / cols).clamp(1, 24) as i64;
    let cell_h = (600 / rows).clamp(1, 16) as i64;
    let label_chars = 20;
    let row_label_w = if cell_h >= 8 {
        row_names
            .iter()
            .map(|s| {
                i64::from(text_width(
                    &s.chars().take(label_chars).collect::<String>(),
                    1,
                ))
            })
            .max()
            .unwrap_or(0)
            + 6
    } else {
        0
    };
    let col_label_h = if cell_w >= 8 {
        col_names
            .iter()
            .map(|s| {
                i64::from(text_width(
                    &s.chars().take(label_chars).collect::<String>(),
                    1,
                ))
            })
            .max()
            .unwrap_or(0)
            + 6
    } else {
        0
    };
    let top = i64::from(HEAT_TITLE_BAND) + 4;
    let strip = if opts.groups.is_some() { 10 } else { 0 };
    let heat_x = DENDRO + 8 + strip;
    let heat_w = cell_w * cols as i64;
    let heat_h = cell_h * rows as i64;
    let bar_x = heat_x + heat_w + row_label_w + 12;
    let width = bar_x + 90;
    let height = (top + heat_h + col_label_h + 8).max(top + 130);
    let (Ok(w), Ok(h)) = (u32::try_from(width), u32::try_from(height)) else {
        return Err(Error::invalid(format!("{OP}: image too large")));
    };
    let mut c = Canvas::new(w, h);
    let leaves = linkage.leaves();
    let tone = |v: f64| ((v - lo) / (hi - lo)).clamp(0.0, 1.0);
    for (pos, &item) in leaves.iter().enumerate() {
        let y0 = top + pos as i64 * cell_h;
        for col in 0..cols {
            let x0 = heat_x + col as i64 * cell_w;
            let color = viridis(tone(values[item * cols + col]));
            c.fill_rect(x0, y0, x0 + cell_w, y0 + cell_h, color);
        }
        if let Some(groups) = &opts.groups {
            let color = CATEGORY[groups[item].saturating_sub(1) % CATEGORY.len()];
            c.fill_rect(heat_x - strip, y0, heat_x - 2, y0 + cell_h, color);
        }
        if row_label_w > 0 {
            let name: String = row_names[item].chars().take(label_chars).collect();
            c.text(heat_x + heat_w + 4, y0 + (cell_h - 7) / 2, &name, 1, BLACK);
        }
    }
    if col_label_h > 0 {
        for (col, name) in col_names.iter().enumerate() {
            let name: String = name.chars().take(label_chars).collect();
            let x0 = heat_x + col as i64 * cell_w + (cell_w - 7) / 2;
            let len = i64::from(text_width(&name, 1));
            c.text_up(x0, top + heat_h + 4 + len, &name, 1, BLACK);
        }
    }
    // Dendrogram: leaves at the heat map's edge, height growing leftwards.
    let n = rows;
    let hmax = linkage
        .merges
        .iter()
        .map(|m| m.height)
        .fold(0.0f64, f64::max);
    let hmax = if hmax > 0.0 { hmax } else { 1.0 };
    let right = heat_x - strip - 3;
    let x_of = |hgt: f64| right - ((hgt / hmax) * (DENDRO - 12) as f64).round() as i64;
    let mut ypos = vec![0f64; 2 * n - 1];
    let mut hpos = vec![0f64; 2 * n - 1];
    for (pos, &item) in leaves.iter().enumerate() {
        ypos[item] = (top + pos as i64 * cell_h) as f64 + cell_h as f64 / 2.0;
    }
    for (i, m) in linkage.merges.iter().enumerate() {
        let node = n + i;
        ypos[node] = (ypos[m.a] + ypos[m.b]) / 2.0;
        hpos[node] = m.height;
        let xn = x_of(m.height);
        for child in [m.a, m.b] {
            let yc = ypos[child].round() as i64;
            c.line((x_of(hpos[child]), yc), (xn, yc), BLACK, 1, 0);
        }
        c.line(
            (xn, ypos[m.a].round() as i64),
            (xn, ypos[m.b].round() as i64),
            BLACK,
            1,
            0,
        );
    }
    // Colour bar.
    let (bar_top, bar_bottom) = (top + 14, top + 120);
    c.text(bar_x, top, &opts.value_label, 1, BLACK);
    for yy in bar_top..=bar_bottom {
        let t = (bar_bottom - yy) as f64 / (bar_bottom - bar_top) as f64;
        c.fill_rect(bar_x, yy, bar_x + 14, yy + 1, viridis(t));
    }
    let (_, decimals) = nice_ticks(lo, hi, 4);
    for (t, yy) in [
        (1.0, bar_top),
        (0.5, (bar_top + bar_bottom) / 2),
        (0.0, bar_bottom),
    ] {
        c.line((bar_x + 14, yy), (bar_x + 17, yy), BLACK, 1, 0);
        c.text(
            bar_x + 21,
            yy - 3,
            &format_tick(lo + t * (hi - lo), decimals),
            1,
            BLACK,
        );
    }
    c.title(width / 2, 6, &opts.title, w.saturating_sub(4));
    Ok(c.img)
}

/// The value range a colour scale spans: `range` when given (finite and
/// increasing), else the finite values' minimum and maximum.
fn color_range(op: &str, range: Option<(f64, f64)>, values: &[f64]) -> Result<(f64, f64)> {
    match range {
        Some((lo, hi)) if lo.is_finite() && hi.is_finite() && lo < hi => Ok((lo, hi)),
        Some((lo, hi)) => Err(Error::invalid(format!(
            "{op}: range ({lo}, {hi}) must be finite and increasing"
        ))),
        None => values
            .iter()
            .filter(|v| v.is_finite())
            .fold(None, |acc: Option<(f64, f64)>, &v| {
                Some(acc.map_or((v, v), |(lo, hi)| (lo.min(v), hi.max(v))))
            })
            .ok_or_else(|| Error::invalid(format!("{op}: no finite value to draw"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glyphs_cover_digits_and_letters_distinctly() {
        let unknown = glyph('\u{1F600}');
        let mut seen = std::collections::HashSet::new();
        for c in ('0'..='9').chain('A'..='Z').chain('a'..='z') {
            let g = glyph(c);
            assert_ne!(g, unknown, "{c} has no glyph");
            assert!(g.iter().all(|row| row & !0x1F == 0), "{c} is wider than 5");
            assert!(seen.insert(g), "{c} looks like another character");
        }
    }

    #[test]
    fn ticks_use_a_round_step_inside_the_range() {
        let (t, d) = nice_ticks(-0.07, 1.03, 5);
        assert_eq!(d, 1);
        assert_eq!(t.len(), 6);
        for (i, v) in t.iter().enumerate() {
            assert!((v - 0.2 * i as f64).abs() < 1e-12, "{t:?}");
        }
        assert_eq!(format_tick(-0.0, 1), "0.0");
        assert_eq!(format_tick(-1e-17, 2), "0.00");
        let (t, d) = nice_ticks(0.0, 2.0e6, 5);
        assert_eq!((t.len(), d), (5, 0));
    }

    #[test]
    fn viridis_hits_its_ends_and_is_monotone_in_lightness() {
        assert_eq!(viridis(0.0), [68, 1, 84]);
        assert_eq!(viridis(1.0), [253, 231, 37]);
        assert_eq!(viridis(f64::NAN), viridis(0.0));
        // Viridis is designed to rise steadily in lightness; the green
        // channel plus red tracks that closely enough to check order.
        let light = |t: f64| {
            let [r, g, _] = viridis(t);
            u32::from(r) + 2 * u32::from(g)
        };
        for i in 0..20 {
            assert!(light(i as f64 / 20.0) < light((i + 1) as f64 / 20.0));
        }
    }

    #[test]
    fn text_draws_inside_its_box() {
        let mut c = Canvas::new(40, 20);
        c.text(2, 3, "R2", 1, BLACK);
        let dark: Vec<(u32, u32)> = c
            .img
            .enumerate_pixels()
            .filter(|(_, _, p)| p.0 == BLACK)
            .map(|(x, y, _)| (x, y))
            .collect();
        let ones = |c| {
            glyph(c)
                .iter()
                .map(|r| r.count_ones() as usize)
                .sum::<usize>()
        };
        assert_eq!(dark.len(), ones('R') + ones('2'));
        let w = text_width("R2", 1);
        assert!(dark
            .iter()
            .all(|&(x, y)| (2..2 + w).contains(&x) && (3..10).contains(&y)));
    }

    /// A scratch file path for one test, removed (with its directory) on drop.
    struct Scratch(std::path::PathBuf);

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn scratch(name: &str) -> Scratch {
        let dir =
            std::env::temp_dir().join(format!("cellmorph-plot-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    fn decoded_size(path: &Path) -> (u32, u32) {
        let img = image::open(path).unwrap();
        (img.width(), img.height())
    }

    #[test]
    fn scatter_and_roc_write_pngs_of_the_requested_size() {
        let dir = scratch("xy");
        let opts = PlotOptions {
            title: "Gene_007: R2 = 0.81".into(),
            x_label: "measured log2(CPM+1)".into(),
            y_label: "predicted".into(),
            width: 400,
            height: 300,
        };
        let x: Vec<f64> = (0..30).map(|i| 4.0 + 0.2 * f64::from(i)).collect();
        let y: Vec<f64> = x.iter().map(|v| v + 0.3 * (v * 7.0).sin()).collect();
        let path = dir.0.join("scatter.png");
        scatter_plot(&path, &x, &y, &opts).unwrap();
        assert_eq!(decoded_size(&path), (400, 300));
        let img = scatter_image(&x, &y, &opts).unwrap();
        assert!(img.pixels().any(|p| p.0 == BLUE || p.0 == RED));

        let path = dir.0.join("roc.png");
        roc_plot(&path, &[0.0, 0.1, 0.4, 1.0], &[0.0, 0.6, 0.9, 1.0], &opts).unwrap();
        assert_eq!(decoded_size(&path), (400, 300));
        assert_eq!(
            std::fs::read_dir(&dir.0).unwrap().count(),
            2,
            "no temp files left"
        );

        assert!(scatter_plot(&path, &x, &y[1..], &opts).is_err());
        assert!(scatter_plot(&path, &[f64::NAN], &[1.0], &opts).is_err());
        assert!(roc_plot(&path, &[0.0, 1.5], &[0.0, 1.0], &opts).is_err());
        let tiny = PlotOptions { width: 50, ..opts };
        assert!(scatter_plot(&path, &x, &y, &tiny).is_err());
        // A constant series still gets a usable range.
        scatter_plot(&path, &[2.0; 3], &[2.0; 3], &PlotOptions::default()).unwrap();
        assert_eq!(decoded_size(&path), (480, 480));
    }

    #[test]
    fn heatmaps_tint_only_patches_and_shrink_big_images() {
        let dir = scratch("heat");
        let data = (0..500 * 330).map(|i| (i % 500) as u16 % 256).collect();
        let img = GrayImage::new(500, 330, crate::imaging::BitDepth::Eight, data).unwrap();
        let grid = img.patch_grid(160).unwrap();
        let values = [0.0, 1.0, 2.0, 3.0, f64::NAN, 5.0];
        let opts = HeatmapOptions {
            title: "patch map".into(),
            alpha: 1.0,
            ..HeatmapOptions::default()
        };
        let out = heatmap_image(&img, &grid, &values, &opts).unwrap();
        assert_eq!(out.dimensions(), heatmap_size(500, 330, &opts));
        assert_eq!(out.dimensions(), (590, 354));
        let top = HEAT_TITLE_BAND;
        // Fully opaque: patch 0 shows the low end, patch 5 the high end, the
        // NaN patch and the dropped right strip stay grey.
        assert_eq!(out.get_pixel(80, top + 80).0, viridis(0.0));
        assert_eq!(out.get_pixel(400, top + 240).0, viridis(1.0));
        let [r, g, b] = out.get_pixel(240, top + 240).0;
        assert!(r == g && g == b, "NaN patch is tinted");
        let [r, g, b] = out.get_pixel(490, top + 80).0;
        assert!(r == g && g == b, "remainder strip is tinted");

        let shrunk = HeatmapOptions {
            max_side: 100,
            ..opts.clone()
        };
        let path = dir.0.join("heat.png");
        heatmap_overlay(&path, &img, &grid, &values, &shrunk).unwrap();
        // Factor ceil(500 / 100) = 5: 100 × 66 image, padded to 120 rows.
        assert_eq!(decoded_size(&path), (190, 144));

        assert!(heatmap_image(&img, &grid, &values[1..], &opts).is_err());
        let bad_alpha = HeatmapOptions {
            alpha: 1.5,
            ..opts.clone()
        };
        assert!(heatmap_image(&img, &grid, &values, &bad_alpha).is_err());
        let bad_range = HeatmapOptions {
            range: Some((1.0, 1.0)),
            ..opts.clone()
        };
        assert!(heatmap_image(&img, &grid, &values, &bad_range).is_err());
        assert!(heatmap_image(&img, &grid, &[f64::NAN; 6], &opts).is_err());
        let wide = PatchGrid::new(640, 330, 160).unwrap();
        assert!(heatmap_image(&img, &wide, &[0.0; 8], &opts).is_err());
    }

    #[test]
    fn line_chart_draws_each_series_in_its_colour() {
        let series = [
            Series {
                label: "loss".into(),
                x: vec![1.0, 2.0, 3.0],
                y: vec![0.9, 0.5, 0.2],
            },
            Series {
                label: "AUC".into(),
                x: vec![1.0, 2.0, 3.0],
                y: vec![0.6, 0.8, 1.0],
            },
        ];
        let img = lines_image(&series, &PlotOptions::default()).unwrap();
        let count = |c: [u8; 3]| img.pixels().filter(|p| p.0 == c).count();
        assert!(count(SERIES[0]) > 50 && count(SERIES[1]) > 50);
        assert!(lines_image(&[], &PlotOptions::default()).is_err());
        let bad = [Series {
            label: "x".into(),
            x: vec![1.0],
            y: vec![f64::NAN],
        }];
        assert!(lines_image(&bad, &PlotOptions::default()).is_err());
    }

    #[test]
    fn matrix_heatmap_colours_cells_and_rejects_bad_shapes() {
        let labels: Vec<String> = vec!["good".into(), "poor".into()];
        let cells: Vec<String> = ["9", "1", "2", "8"].map(String::from).to_vec();
        let opts = MatrixHeatmapOptions {
            title: "confusion".into(),
            x_label: "predicted".into(),
            y_label: "true".into(),
            range: Some((0.0, 1.0)),
        };
        let img =
            matrix_heatmap_image(&[0.9, 0.1, 0.2, 0.8], &cells, &labels, &labels, &opts).unwrap();
        // The top-left cell's corner is 0.9 of viridis.
        let left = 24 + text_width("good", 1) + 8;
        let px = img.get_pixel(left + 2, HEAT_TITLE_BAND + 2).0;
        assert_eq!(px, viridis(0.9));
        let px = img.get_pixel(left + CELL + 2, HEAT_TITLE_BAND + 2).0;
        assert_eq!(px, viridis(0.1));
        assert!(matrix_heatmap_image(&[0.9], &cells, &labels, &labels, &opts).is_err());
        let bad = MatrixHeatmapOptions {
            range: Some((1.0, 0.0)),
            ..opts
        };
        assert!(
            matrix_heatmap_image(&[0.9, 0.1, 0.2, 0.8], &cells, &labels, &labels, &bad).is_err()
        );
    }
    #[test]
    fn coloured_scatter_shows_categories_and_values() {
        let x = [0.0, 1.0, 2.0, 3.0];
        let y = [1.0, 0.0, 3.0, 2.0];
        let cats = PointColors::Categories {
            index: vec![0, 1, 1, 2],
            names: vec!["a".into(), "b".into(), "c".into()],
        };
        let img = colored_scatter_image(&x, &y, &cats, &PlotOptions::default()).unwrap();
        for color in &CATEGORY[..3] {
            assert!(img.pixels().any(|p| p.0 == *color), "{color:?} missing");
        }
        let bad = PointColors::Categories {
            index: vec![0, 1, 1, 3],
            names: vec!["a".into(), "b".into(), "c".into()],
        };
        assert!(colored_scatter_image(&x, &y, &bad, &PlotOptions::default()).is_err());
        let values = PointColors::Values {
            values: vec![0.0, 1.0, 2.0, 3.0],
            label: "score".into(),
        };
        let img = colored_scatter_image(&x, &y, &values, &PlotOptions::default()).unwrap();
        assert!(img.pixels().any(|p| p.0 == viridis(1.0)));
        let nan = PointColors::Values {
            values: vec![0.0, f64::NAN, 2.0, 3.0],
            label: "score".into(),
        };
        assert!(colored_scatter_image(&x, &y, &nan, &PlotOptions::default()).is_err());
    }
}
