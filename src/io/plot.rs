//! Pictures medseg writes beside its results (training curves, evaluation plots, overlay
//! montages): the embedded font, plotting errors, overlay tiles and montages, written atomically.

use std::path::Path;

use plotters::style::FontStyle;

use super::write_atomically;
use crate::error::{Error, Result};

/// Registers the embedded font plotters draws text with (no system fontconfig needed on servers).
pub fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            epaint_default_fonts::UBUNTU_LIGHT,
        );
    });
}

/// A plotting failure as a write error naming the image.
pub fn plot_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Write {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

/// A tile: the slice `k` of a `[nk, nj, ni]` scan (grey, between the two values of its window,
/// e.g. `transforms::intensity::display_window` of the slice) with truth (green) and
/// prediction (red) contours, rows flipped so anterior is up for RAS-like grids.
pub fn overlay_tile(
    scan: Option<(&[f32], [f64; 2])>,
    truth: &[bool],
    pred: &[bool],
    dims: [usize; 3],
    k: usize,
) -> image::RgbImage {
    let [_, nj, ni] = dims;
    let plane = nj * ni;
    let at = |m: &[bool], j: usize, i: usize| m[k * plane + j * ni + i];
    let [lo, hi] = scan.map_or([0.0, 1.0], |(_, w)| w);
    let edge = |m: &[bool], j: usize, i: usize| {
        at(m, j, i)
            && (j == 0
                || i == 0
                || j + 1 == nj
                || i + 1 == ni
                || !at(m, j - 1, i)
                || !at(m, j + 1, i)
                || !at(m, j, i - 1)
                || !at(m, j, i + 1))
    };
    image::RgbImage::from_fn(ni as u32, nj as u32, |x, y| {
        let (i, j) = (x as usize, nj - 1 - y as usize);
        if edge(truth, j, i) {
            return image::Rgb([0, 220, 0]);
        }
        if edge(pred, j, i) {
            return image::Rgb([230, 0, 0]);
        }
        let g = match scan {
            Some((s, _)) => {
                (((s[k * plane + j * ni + i] as f64 - lo) / (hi - lo)).clamp(0.0, 1.0) * 255.0)
                    as u8
            }
            None => 0,
        };
        image::Rgb([g, g, g])
    })
}

/// Tiles side by side (scaled to a common height), written as PNG.
pub fn save_montage(tiles: &[(String, image::RgbImage)], path: &Path) -> Result<()> {
    let height = 256u32;
    let scaled: Vec<image::RgbImage> = tiles
        .iter()
        .map(|(_, t)| {
            let w = (t.width() as f64 * height as f64 / t.height().max(1) as f64)
                .round()
                .max(1.0) as u32;
            image::imageops::resize(t, w, height, image::imageops::FilterType::Nearest)
        })
        .collect();
    let width = scaled.iter().map(|t| t.width() + 4).sum::<u32>().max(1);
    let mut out = image::RgbImage::from_pixel(width, height, image::Rgb([255, 255, 255]));
    let mut x = 0;
    for t in &scaled {
        image::imageops::overlay(&mut out, t, x as i64, 0);
        x += t.width() + 4;
    }
    let mut bytes = Vec::new();
    out.write_to(
        &mut std::io::Cursor::new(&mut bytes),
        image::ImageFormat::Png,
    )
    .map_err(|e| plot_err(path, e))?;
    write_atomically(path, &bytes)
}
