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
/// prediction (red) contours, rows flipped so anterior is up for RAS-like grids. A `heat` map in
/// `[0, 1]` (an attention map) tints the scan yellow where it is above 0.2.
pub fn overlay_tile(
    scan: Option<(&[f32], [f64; 2])>,
    truth: &[bool],
    pred: &[bool],
    heat: Option<&[f32]>,
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
        let h = heat.map_or(0.0, |h| h[k * plane + j * ni + i].clamp(0.0, 1.0));
        if h > 0.2 {
            // Blend towards yellow, up to 70 % at the map's maximum.
            let a = 0.7 * (h - 0.2) / 0.8;
            let mix = |c: f32, to: f32| (c * (1.0 - a) + to * a) as u8;
            let g = g as f32;
            return image::Rgb([mix(g, 255.0), mix(g, 220.0), mix(g, 0.0)]);
        }
        image::Rgb([g, g, g])
    })
}

/// A white strip `width` pixels wide with one line of black text per entry of `lines`.
pub fn legend_strip(width: u32, lines: &[String]) -> Result<image::RgbImage> {
    use plotters::prelude::*;
    register_font();
    let line_height = 18u32;
    let height = line_height * lines.len() as u32 + 8;
    let mut buf = vec![255u8; (width * height * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (width, height)).into_drawing_area();
        for (n, line) in lines.iter().enumerate() {
            root.draw(&Text::new(
                line.as_str(),
                (6, 4 + n as i32 * line_height as i32),
                ("sans-serif", 15).into_font().color(&BLACK),
            ))
            .map_err(|e| plot_err(Path::new("legend"), e))?;
        }
        root.present()
            .map_err(|e| plot_err(Path::new("legend"), e))?;
    }
    image::RgbImage::from_raw(width, height, buf).ok_or_else(|| Error::Write {
        path: Path::new("legend").to_path_buf(),
        reason: "legend buffer size".into(),
    })
}

/// Tiles side by side (scaled to a common height), written as PNG.
pub fn save_montage(tiles: &[(String, image::RgbImage)], path: &Path) -> Result<()> {
    save_montage_with_legend(tiles, &[], path)
}

/// [`save_montage`] with `legend` lines of text below the tiles.
pub fn save_montage_with_legend(
    tiles: &[(String, image::RgbImage)],
    legend: &[String],
    path: &Path,
) -> Result<()> {
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
    let strip = if legend.is_empty() {
        None
    } else {
        Some(legend_strip(width.max(360), legend)?)
    };
    let total_width = strip.as_ref().map_or(width, |s| s.width());
    let total_height = height + strip.as_ref().map_or(0, |s| s.height());
    let mut out =
        image::RgbImage::from_pixel(total_width, total_height, image::Rgb([255, 255, 255]));
    let mut x = 0;
    for t in &scaled {
        image::imageops::overlay(&mut out, t, x as i64, 0);
        x += t.width() + 4;
    }
    if let Some(strip) = &strip {
        image::imageops::overlay(&mut out, strip, 0, height as i64);
    }
    let mut bytes = Vec::new();
    out.write_to(
        &mut std::io::Cursor::new(&mut bytes),
        image::ImageFormat::Png,
    )
    .map_err(|e| plot_err(path, e))?;
    write_atomically(path, &bytes)
}
