//! Realistic synthetic lesions inserted into real host scans (DATA.md's recipe), for benchmark
//! datasets and for augmenting scarce lesion data.
//!
//! Shapes in mm (lobulated, spiculated, necrotic core + enhancing rim) with 4× partial volume,
//! contrast and texture added through the PSF and re-quantised, organ masks and placement, host
//! deformation (affine + elastic) and MR bias fields, and `medseg synth` writing a Decathlon
//! dataset with `lesions.json`.

pub mod dataset;
pub mod deform;
pub mod lesion;
pub mod organ;
pub mod polarity;
pub mod randomise;
pub mod scanner;
pub mod tissue;

use ndarray::{Array3, Axis};
use rand::{Rng, RngExt};

use crate::volume::Volume;
use lesion::{add_to_host, gaussian_blur, rasterise, rasterise_box, Fraction, LesionShape};

/// What to insert: a shape, the contrast it adds, an optional necrotic core and its texture.
#[derive(Debug, Clone)]
pub struct LesionSpec {
    /// The lesion's shape in world mm.
    pub shape: LesionShape,
    /// Contrast added inside the lesion, host units (HU for CT).
    pub delta: f64,
    /// Necrotic core `(radius share, contrast added inside it instead of delta)`; the rest of
    /// the lesion is the (enhancing) rim.
    pub core: Option<(f64, f64)>,
    /// Low-frequency texture: σ as a share of `|delta|` (DATA.md: 5–15 %).
    pub texture: f64,
    /// Unlabelled oedema around the lesion `(radius multiple, contrast added)`.
    pub halo: Option<(f64, f64)>,
    /// Lesions whose contrast-to-noise ratio comes out below this are not inserted (invisible).
    pub min_cnr: f64,
}

/// Partial-volume fraction from which a voxel is labelled lesion (DATA.md: α ≥ 0.5).
pub const LABEL_FRACTION: f32 = 0.5;

/// Smoothing of the texture field, mm (low frequency: a few voxels).
const TEXTURE_SIGMA_MM: f64 = 2.0;

/// One inserted lesion's measurements, as recorded in `lesions.json`.
pub use crate::io::layout::InsertedLesion;

/// Host noise σ around a box: the median absolute deviation of the difference between
/// neighbouring voxels along i (so smooth anatomy cancels), scaled to a Gaussian σ.
pub fn local_noise(
    channel: &ndarray::ArrayView3<f32>,
    origin: [usize; 3],
    dims: [usize; 3],
) -> f64 {
    let (nk, nj, ni) = channel.dim();
    let mut diffs = Vec::new();
    for k in origin[0]..(origin[0] + dims[0]).min(nk) {
        for j in origin[1]..(origin[1] + dims[1]).min(nj) {
            for i in origin[2]..(origin[2] + dims[2]).min(ni).saturating_sub(1) {
                diffs.push((channel[[k, j, i + 1]] - channel[[k, j, i]]) as f64);
            }
        }
    }
    if diffs.is_empty() {
        return 0.0;
    }
    diffs.sort_by(f64::total_cmp);
    let med = diffs[diffs.len() / 2];
    let mut dev: Vec<f64> = diffs.iter().map(|d| (d - med).abs()).collect();
    dev.sort_by(f64::total_cmp);
    // MAD → σ for a Gaussian (1.4826), and the difference of two voxels has variance 2σ².
    1.4826 * dev[dev.len() / 2] / std::f64::consts::SQRT_2
}

/// Inserts `lesion` into channel 0 of `host`: `α · (Δ + texture)` (with the core's contrast
/// inside the core) is blurred by the scanner PSF (σ = FWHM / 2.355, FWHM = the voxel size
/// in-plane and the slice thickness through-plane) and added, then re-quantised and clipped to the
/// host's dtype range. Returns the label box (`α ≥ 0.5`) and the record, or `None` when the shape
/// misses the grid or would be invisible (contrast-to-noise below 1).
pub fn insert(
    host: &mut Volume,
    lesion: &LesionSpec,
    rng: &mut impl Rng,
) -> Option<(Fraction, InsertedLesion)> {
    let shape = &lesion.shape;
    let delta = lesion.delta;
    let (f, halo) = fractions_with_halo(lesion, &host.geometry)?;
    let mut intensity = f.alpha.mapv(|a| a * delta as f32);
    if let (Some(halo), Some((_, halo_delta))) = (&halo, lesion.halo) {
        intensity.zip_mut_with(halo, |v, h| *v += h * halo_delta as f32);
    }
    if let Some((share, core_delta)) = lesion.core {
        let core = rasterise_box(
            &shape.scaled(share),
            &host.geometry,
            f.origin,
            f.alpha.dim().into(),
        );
        intensity.zip_mut_with(&core, |v, c| *v += c * (core_delta - delta) as f32);
    }
    if lesion.texture > 0.0 {
        let noise = Array3::<f32>::from_shape_simple_fn(f.alpha.dim(), || {
            rng.sample::<f32, _>(rand_distr::StandardNormal)
        });
        let smooth = gaussian_blur(
            &noise,
            host.geometry
                .array_spacing()
                .map(|sp| TEXTURE_SIGMA_MM / sp),
        );
        let sd = (smooth.iter().map(|v| (v * v) as f64).sum::<f64>() / smooth.len() as f64)
            .sqrt()
            .max(1e-12);
        let scale = (lesion.texture * delta.abs() / sd) as f32;
        ndarray::Zip::from(&mut intensity)
            .and(&f.alpha)
            .and(&smooth)
            .for_each(|v, a, t| *v += a * t * scale);
    }
    // FWHM of one voxel along each axis (through-plane: the slice spacing, ≈ the thickness), so
    // σ is 1/2.355 voxel on every axis of the voxel grid.
    let sigma = [1.0 / 2.355; 3];
    let contribution = gaussian_blur(&intensity, sigma);
    let (k, j, i) = f.alpha.dim();
    let noise = local_noise(&host.voxels.index_axis(Axis(0), 0), f.origin, [k, j, i]);
    let label = f.alpha.mapv(|a| a >= LABEL_FRACTION);
    let voxels = label.iter().filter(|l| **l).count();
    if voxels == 0 {
        return None;
    }
    let mean_added = visible_contrast(&contribution, &label, halo.as_ref());
    let cnr = if noise > 0.0 {
        mean_added / noise
    } else {
        f64::INFINITY
    };
    if cnr < lesion.min_cnr {
        return None;
    }
    let dtype = host.info.dtype;
    let integral = !matches!(dtype, crate::DataType::Float32 | crate::DataType::Float64);
    // Values are after rescale (DICOM Rescale Slope/Intercept, NIfTI scl_*); when they do not fit
    // the storage type's range, the rescaled range is unknown here and the host's observed range
    // stands in for it.
    let (lo, hi) = host.value_range().unwrap_or((0.0, 0.0));
    let (dlo, dhi) = dtype.range();
    let range = if lo as f64 >= dlo && hi as f64 <= dhi {
        (dlo, dhi)
    } else {
        (lo as f64, hi as f64)
    };
    add_to_host(
        host.voxels.index_axis_mut(Axis(0), 0),
        f.origin,
        &contribution,
        integral,
        range,
    );
    let mut lo = [usize::MAX; 3];
    let mut hi = [0usize; 3];
    for ((kk, jj, ii), l) in label.indexed_iter() {
        if *l {
            for (a, x) in [ii + f.origin[2], jj + f.origin[1], kk + f.origin[0]]
                .into_iter()
                .enumerate()
            {
                lo[a] = lo[a].min(x);
                hi[a] = hi[a].max(x);
            }
        }
    }
    let s = host.geometry.spacing();
    let volume_mm3 = voxels as f64 * s[0] * s[1] * s[2];
    let record = InsertedLesion {
        volume_mm3,
        diameter_mm: 2.0 * (3.0 * volume_mm3 / (4.0 * std::f64::consts::PI)).cbrt(),
        delta,
        core_delta: lesion.core.map(|c| c.1),
        contrast_to_noise: cnr,
        centre_mm: shape.centre_mm,
        bbox_voxel: [lo, hi],
    };
    Some((f, record))
}

/// The lesion's partial-volume fractions and, with a halo, the oedema's (outside the lesion), both
/// on the halo's box; `None` when the shape misses the grid.
fn fractions_with_halo(
    lesion: &LesionSpec,
    grid: &crate::geometry::Geometry,
) -> Option<(Fraction, Option<Array3<f32>>)> {
    let Some((scale, _)) = lesion.halo else {
        return Some((rasterise(&lesion.shape, grid)?, None));
    };
    let outer = rasterise(&lesion.shape.scaled(scale), grid)?;
    let alpha = rasterise_box(&lesion.shape, grid, outer.origin, outer.alpha.dim().into());
    let halo = (&outer.alpha - &alpha).mapv(|h| h.max(0.0));
    let origin = outer.origin;
    Some((Fraction { origin, alpha }, Some(halo)))
}

/// Mean |added contrast| inside the label, or in the unlabelled oedema ring when that is larger
/// (an iso-intense lesion is seen by its oedema).
fn visible_contrast(
    contribution: &Array3<f32>,
    label: &Array3<bool>,
    halo: Option<&Array3<f32>>,
) -> f64 {
    let mean_abs = |inside: &dyn Fn(usize) -> bool| {
        let (sum, n) = contribution
            .iter()
            .enumerate()
            .filter(|(idx, _)| inside(*idx))
            .fold((0.0, 0usize), |(s, n), (_, c)| (s + c.abs() as f64, n + 1));
        if n == 0 {
            0.0
        } else {
            sum / n as f64
        }
    };
    let labelled: Vec<bool> = label.iter().copied().collect();
    let mut mean = mean_abs(&|idx| labelled[idx]);
    if let Some(halo) = halo {
        let ring: Vec<bool> = halo.iter().map(|h| *h >= LABEL_FRACTION).collect();
        mean = mean.max(mean_abs(&|idx| ring[idx] && !labelled[idx]));
    }
    mean
}

/// The label box of an insertion as a full-size mask.
pub fn label_volume(dims: [usize; 3], fractions: &[Fraction]) -> Array3<u8> {
    let [ni, nj, nk] = dims;
    let mut out = Array3::<u8>::zeros([nk, nj, ni]);
    for f in fractions {
        for ((k, j, i), a) in f.alpha.indexed_iter() {
            let (k, j, i) = (k + f.origin[0], j + f.origin[1], i + f.origin[2]);
            if *a >= LABEL_FRACTION && k < nk && j < nj && i < ni {
                out[[k, j, i]] = 1;
            }
        }
    }
    out
}
