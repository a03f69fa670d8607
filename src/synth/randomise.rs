//! Domain randomisation of a synthetic case (`[synth.randomise]`): after the host is deformed, its
//! tissue contrast is redrawn, the skull is sometimes removed, a bias field is applied, lesions are
//! inserted at a contrast-to-noise ratio of every polarity, and the scan is "re-acquired" at a
//! random resolution (thick slices along the axial axis, coarser in-plane) with Gaussian or Rician
//! noise. Geometry (deformation, lesion shapes and places) and appearance draw from two separate
//! random streams, so turning any appearance effect on or off never moves a label.

use ndarray::{Array3, Axis};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde::{Deserialize, Serialize};

use super::deform::{apply_bias_field, deform_host, DeformSettings};
use super::lesion::{gaussian_blur, Fraction};
use super::local_noise;
use super::scanner::{add_noise, draw, simulate_thick_slices, NoiseKind};
use super::tissue::{apply_contrast, Contrast, TissueModel};
use crate::geometry::to_array_order;
use crate::io::layout::SynthLesion;
use crate::volume::{DataType, Volume};

/// Scanner and contrast randomisation (`[synth.randomise]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RandomiseConfig {
    /// Share of cases whose tissue contrast is redrawn; the rest keep the host's contrast.
    pub contrast_prob: f64,
    /// Tissue classes found by k-means inside the region of interest (e.g. CSF, grey and white
    /// matter) and outside it (e.g. air, soft tissue, fat and marrow).
    pub tissue_classes: [usize; 2],
    /// Share of cases with everything outside the region of interest removed (skull-stripped).
    pub skull_strip_prob: f64,
    /// Share of cases acquired in thick slices along the axial axis.
    pub thick_slice_prob: f64,
    /// Slice thickness of those cases, mm, drawn uniformly.
    pub slice_thickness_mm: [f64; 2],
    /// In-plane acquired voxel size, mm, drawn uniformly (no effect at or below the host's).
    pub in_plane_mm: [f64; 2],
    /// Noise σ added, as a share of the region of interest's 1st-99th percentile span, drawn
    /// uniformly.
    pub noise: [f64; 2],
    /// `gaussian` or `rician`.
    pub noise_kind: NoiseKind,
    /// Lesions whose contrast-to-noise ratio, measured on the final scan, comes out below this
    /// are taken out of the label and `lesions.json` (a thin lesion lost in thick slices is not
    /// visible, and a label on nothing teaches nothing); their faint trace stays in the image.
    pub min_visible_cnr: f64,
    /// Share of cases whose field of view is widened in-plane: air around a body that a training
    /// host's scan is cropped to (a test scan of another scanner shows it, and a model that never
    /// saw it may take it for lung).
    pub field_of_view_prob: f64,
    /// Margin added on each in-plane side of those cases, mm, drawn uniformly per side; filled
    /// with the scan's air (its 0.5th percentile) before noise is added.
    pub field_of_view_mm: [f64; 2],
}

impl Default for RandomiseConfig {
    fn default() -> Self {
        RandomiseConfig {
            contrast_prob: 0.8,
            tissue_classes: [3, 3],
            skull_strip_prob: 0.25,
            thick_slice_prob: 0.5,
            slice_thickness_mm: [3.0, 7.0],
            in_plane_mm: [0.8, 1.6],
            noise: [0.0, 0.05],
            noise_kind: NoiseKind::Rician,
            min_visible_cnr: 1.0,
            field_of_view_prob: 0.0,
            field_of_view_mm: [0.0, 0.0],
        }
    }
}

impl RandomiseConfig {
    /// What is wrong with these settings, if anything.
    pub fn problem(&self) -> Option<String> {
        let share = |p: f64| (0.0..=1.0).contains(&p);
        let range = |r: [f64; 2]| r[0] >= 0.0 && r[0] <= r[1] && r[1].is_finite();
        if !(share(self.contrast_prob)
            && share(self.skull_strip_prob)
            && share(self.thick_slice_prob)
            && share(self.field_of_view_prob))
        {
            return Some(
                "contrast_prob, skull_strip_prob, thick_slice_prob and field_of_view_prob must be in [0, 1]"
                    .into(),
            );
        }
        if self.tissue_classes[0] == 0 || self.tissue_classes[0] > 8 || self.tissue_classes[1] > 8 {
            return Some(format!(
                "tissue_classes must be [1-8, 0-8] (inside, outside), not {:?}",
                self.tissue_classes
            ));
        }
        if !(self.min_visible_cnr >= 0.0 && self.min_visible_cnr.is_finite()) {
            return Some("min_visible_cnr must be >= 0".into());
        }
        if !(range(self.slice_thickness_mm)
            && range(self.in_plane_mm)
            && range(self.noise)
            && range(self.field_of_view_mm))
        {
            return Some(
                "slice_thickness_mm, in_plane_mm, noise and field_of_view_mm must be [low, high] with 0 <= low <= high"
                    .into(),
            );
        }
        if self.field_of_view_mm[1] > MAX_FIELD_OF_VIEW_MM {
            return Some(format!(
                "field_of_view_mm: at most {MAX_FIELD_OF_VIEW_MM} mm a side, not {}",
                self.field_of_view_mm[1]
            ));
        }
        None
    }
}

/// The appearance stream's seed from the case seed (any fixed odd constant: a separate stream).
const APPEARANCE_STREAM: u64 = 0x9e37_79b9_7f4a_7c15;

/// The field-of-view stream's: its own, so widening the field of view moves no lesion and
/// changes no other draw.
const FIELD_OF_VIEW_STREAM: u64 = 0xc2b2_ae3d_27d4_eb4f;

/// An absurd margin (a metre a side) is a typo, not a field of view.
const MAX_FIELD_OF_VIEW_MM: f64 = 500.0;

/// What the scanner did to one case.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Acquisition {
    /// Tissue contrast redrawn.
    pub contrast: bool,
    /// Outside the region of interest removed.
    pub skull_stripped: bool,
    /// Slice thickness (mm) along the axial array axis, when simulated.
    pub slice_thickness_mm: Option<f64>,
    /// Added noise σ, image units.
    pub noise_sigma: f64,
}

/// A generated case before it is written.
pub struct MadeCase {
    /// The scan (float32).
    pub scan: Volume,
    /// Lesion partial-volume fractions, for the label map.
    pub fractions: Vec<Fraction>,
    /// The inserted lesions, contrast-to-noise measured on the final scan.
    pub lesions: Vec<SynthLesion>,
    /// The deformed region of interest.
    pub roi: Array3<bool>,
    /// The effects applied (`None` for an unrandomised case).
    pub acquisition: Option<Acquisition>,
}

/// Everything a randomised case needs from its host.
pub struct HostInputs<'a> {
    /// The host scan.
    pub host: &'a Volume,
    /// Where lesions may go.
    pub organ: &'a Array3<bool>,
    /// The region of interest (the brain): tissue model inside, skull stripping, ROI label.
    pub roi: &'a Array3<bool>,
    /// The host's case name, for the records.
    pub name: &'a str,
}

/// One randomised case from `seed`. `insert_lesions(scan, organ, geometry_rng, appearance_rng,
/// extra_noise)` places and inserts the lesions (shared with unrandomised synthesis).
pub fn randomised_case(
    settings: &RandomiseConfig,
    deform: &DeformSettings,
    bias_field: f64,
    host: &HostInputs,
    seed: u64,
    insert_lesions: impl FnOnce(
        &mut Volume,
        &Array3<bool>,
        &mut StdRng,
        &mut StdRng,
        f64,
    ) -> (Vec<Fraction>, Vec<SynthLesion>),
) -> MadeCase {
    let mut geometry_rng = StdRng::seed_from_u64(seed);
    let mut look = StdRng::seed_from_u64(seed ^ APPEARANCE_STREAM);
    let no_bias = DeformSettings {
        bias_field: 0.0,
        ..*deform
    };
    let (deformed, masks) = deform_host(
        host.host,
        &[host.organ, host.roi],
        &no_bias,
        &mut geometry_rng,
    );
    let mut image = deformed.voxels.index_axis(Axis(0), 0).to_owned();
    let mut g = deformed.geometry.clone();
    let mut masks = masks;
    let mut fov = StdRng::seed_from_u64(seed ^ FIELD_OF_VIEW_STREAM);
    if settings.field_of_view_prob > 0.0 && fov.random::<f64>() < settings.field_of_view_prob {
        let axial = axial_array_axis(&g);
        let spacing = g.array_spacing();
        let pads: [[usize; 2]; 3] = std::array::from_fn(|axis| {
            if axis == axial {
                return [0, 0];
            }
            std::array::from_fn(|_| {
                (draw(settings.field_of_view_mm, &mut fov) / spacing[axis]).round() as usize
            })
        });
        let air = percentile(&image, 0.005);
        let widened = widen_field_of_view(&image, &masks, &g, pads, air);
        (image, masks, g) = widened;
    }
    let (organ, roi) = (&masks[0], &masks[1]);

    let contrast = look.random::<f64>() < settings.contrast_prob;
    if contrast {
        redraw_contrast(&mut image, roi, settings.tissue_classes, &mut look);
    }
    let skull_stripped = look.random::<f64>() < settings.skull_strip_prob;
    if skull_stripped {
        // A soft edge of about one voxel, as a skull-stripping tool's mask leaves.
        let keep = gaussian_blur(&roi.mapv(|r| r as u8 as f32), [0.7; 3]);
        image.zip_mut_with(&keep, |v, k| *v *= k);
    }
    if bias_field > 0.0 {
        apply_bias_field(
            &mut image,
            &g,
            bias_field,
            false,
            (0.0, f32::MAX as f64),
            &mut look,
        );
    }
    // The region's intensity span, so the share means the same in MR units and in HU.
    let span = span_inside(&image, roi).max(1e-6);
    let noise_sigma = draw(settings.noise, &mut look) * span;
    let thickness = (look.random::<f64>() < settings.thick_slice_prob)
        .then(|| draw(settings.slice_thickness_mm, &mut look));
    let in_plane = draw(settings.in_plane_mm, &mut look);
    let phase: [f64; 3] = [look.random(), look.random(), look.random()];

    let mut info = deformed.info.clone();
    info.dtype = DataType::Float32;
    let mut scan =
        Volume::new(image.clone().insert_axis(Axis(0)), g.clone(), info).expect("same grid");
    let (fractions, mut lesions) =
        insert_lesions(&mut scan, organ, &mut geometry_rng, &mut look, noise_sigma);
    if settings.noise_kind == NoiseKind::Rician {
        // A magnitude image has no negative signal: a hypo-intense lesion stronger than its
        // tissue is black, not folded back to bright by the noise's magnitude (and its recorded
        // contrast is the one that remains).
        scan.voxels.mapv_inplace(|v| v.max(0.0));
    }

    // Re-acquire: the lesion contribution goes through the same (linear) resolution loss, so its
    // final contrast can be measured.
    let mut lesion_only = &scan.voxels.index_axis(Axis(0), 0) - &image;
    let mut image = scan.voxels.index_axis(Axis(0), 0).to_owned();
    let axial = axial_array_axis(&g);
    let spacing = g.array_spacing();
    for axis in 0..3 {
        let acquired = if axis == axial {
            thickness.unwrap_or(0.0)
        } else {
            in_plane
        };
        for target in [&mut image, &mut lesion_only] {
            simulate_thick_slices(target, axis, spacing[axis], acquired, phase[axis]);
        }
    }
    add_noise(&mut image, noise_sigma, settings.noise_kind, &mut look);
    // The noise the reader sees: the final scan without the lesions.
    let clean = &image - &lesion_only;
    for l in &mut lesions {
        l.lesion.contrast_to_noise = final_cnr(&clean, &lesion_only, &fractions[l.id - 1], l);
        l.slice_thickness_mm = thickness;
    }
    let (fractions, lesions) = keep_visible(fractions, lesions, settings.min_visible_cnr);
    scan.voxels = image.insert_axis(Axis(0));
    MadeCase {
        scan,
        fractions,
        lesions,
        roi: roi.clone(),
        acquisition: Some(Acquisition {
            contrast,
            skull_stripped,
            slice_thickness_mm: thickness,
            noise_sigma,
        }),
    }
}

/// The lesions (and their fractions) whose final contrast-to-noise ratio reaches `min_cnr`,
/// renumbered from 1.
fn keep_visible(
    fractions: Vec<Fraction>,
    lesions: Vec<SynthLesion>,
    min_cnr: f64,
) -> (Vec<Fraction>, Vec<SynthLesion>) {
    let (fractions, mut lesions): (Vec<Fraction>, Vec<SynthLesion>) = fractions
        .into_iter()
        .zip(lesions)
        .filter(|(_, l)| l.lesion.contrast_to_noise >= min_cnr)
        .unzip();
    for (i, l) in lesions.iter_mut().enumerate() {
        l.id = i + 1;
    }
    (fractions, lesions)
}

/// Fits the tissue classes inside and outside `roi` and moves each to a random new mean.
fn redraw_contrast(
    image: &mut Array3<f32>,
    roi: &Array3<bool>,
    classes: [usize; 2],
    rng: &mut StdRng,
) {
    let pick = |want: bool| {
        image
            .iter()
            .zip(roi.iter())
            .filter(move |(_, r)| **r == want)
            .map(|(v, _)| *v)
    };
    let Some(inside) = TissueModel::fit(pick(true), classes[0]) else {
        return;
    };
    let outside = (classes[1] > 0)
        .then(|| TissueModel::fit(pick(false), classes[1]))
        .flatten();
    let contrast = Contrast::random(inside, outside, rng);
    apply_contrast(image, roi, &contrast);
}

/// `image` and `masks` with `pads[axis] = [before, after]` voxels added along each array axis
/// (`air` in the image, `false` in the masks), and the grid that keeps every original voxel at
/// its world position.
pub fn widen_field_of_view(
    image: &Array3<f32>,
    masks: &[Array3<bool>],
    g: &crate::geometry::Geometry,
    pads: [[usize; 2]; 3],
    air: f32,
) -> (Array3<f32>, Vec<Array3<bool>>, crate::geometry::Geometry) {
    let shape = g.shape();
    let new_shape: [usize; 3] = std::array::from_fn(|a| shape[a] + pads[a][0] + pads[a][1]);
    let inner = ndarray::s![
        pads[0][0]..pads[0][0] + shape[0],
        pads[1][0]..pads[1][0] + shape[1],
        pads[2][0]..pads[2][0] + shape[2]
    ];
    let mut out = Array3::from_elem(new_shape, air);
    out.slice_mut(inner).assign(image);
    let masks = masks
        .iter()
        .map(|m| {
            let mut o = Array3::from_elem(new_shape, false);
            o.slice_mut(inner).assign(m);
            o
        })
        .collect();
    // The new voxel (0, 0, 0) is the old voxel (-before) along every axis.
    let before = crate::geometry::to_voxel_order([pads[0][0], pads[1][0], pads[2][0]]);
    let origin = g.voxel_to_world(before.map(|p| -(p as f64)));
    let mut affine = g.affine;
    for (r, o) in origin.iter().enumerate() {
        affine[r][3] = *o;
    }
    let grid = crate::geometry::Geometry::new(crate::geometry::to_voxel_order(new_shape), affine);
    (out, masks, grid)
}

/// The `q` quantile (nearest rank) of the finite voxels; 0 when there are none.
fn percentile(image: &Array3<f32>, q: f64) -> f32 {
    let mut v: Vec<f32> = image.iter().copied().filter(|x| x.is_finite()).collect();
    nearest_rank(&mut v, q)
}

/// The 1st-99th percentile span (nearest rank) of `image` inside `mask`; 0 when it is empty.
fn span_inside(image: &Array3<f32>, mask: &Array3<bool>) -> f64 {
    let mut v: Vec<f32> = image
        .iter()
        .zip(mask.iter())
        .filter(|(x, m)| **m && x.is_finite())
        .map(|(x, _)| *x)
        .collect();
    nearest_rank(&mut v, 0.99) as f64 - nearest_rank(&mut v, 0.01) as f64
}

/// The `q` quantile (nearest rank) of `v`, partly reordered; 0 when it is empty.
fn nearest_rank(v: &mut [f32], q: f64) -> f32 {
    if v.is_empty() {
        return 0.0;
    }
    let rank = ((v.len() - 1) as f64 * q).round() as usize;
    *v.select_nth_unstable_by(rank, f32::total_cmp).1
}

/// The array axis (0 = k, 1 = j, 2 = i) whose voxel direction is closest to superior-inferior:
/// the axis clinical axial scans are thick along.
pub fn axial_array_axis(g: &crate::geometry::Geometry) -> usize {
    let d = g.direction();
    let voxel_axis = (0..3)
        .max_by(|&a, &b| d[a][2].abs().total_cmp(&d[b][2].abs()))
        .unwrap_or(2);
    // Voxel axis i, j, k is array axis 2, 1, 0.
    2 - voxel_axis
}

/// Voxels added around a lesion's box where its noise is measured.
const NOISE_MARGIN: usize = 4;

/// Mean |lesion contrast| over the lesion's label voxels, over the noise σ of the final scan
/// without lesions around the lesion's box.
fn final_cnr(
    clean: &Array3<f32>,
    lesion_only: &Array3<f32>,
    fraction: &Fraction,
    record: &SynthLesion,
) -> f64 {
    let (mut sum, mut n) = (0.0, 0usize);
    for ((k, j, i), a) in fraction.alpha.indexed_iter() {
        if *a >= super::LABEL_FRACTION {
            let at = [
                k + fraction.origin[0],
                j + fraction.origin[1],
                i + fraction.origin[2],
            ];
            sum += lesion_only[at].abs() as f64;
            n += 1;
        }
    }
    // The label box grown by a few voxels: a lesion one voxel wide leaves no neighbour pairs.
    let [lo, hi] = record.lesion.bbox_voxel;
    let (nk, nj, ni) = clean.dim();
    let upper = [ni, nj, nk];
    let lo = [0, 1, 2].map(|a| lo[a].saturating_sub(NOISE_MARGIN));
    let hi = [0, 1, 2].map(|a| (hi[a] + NOISE_MARGIN).min(upper[a] - 1));
    let origin = to_array_order(lo);
    let dims = to_array_order([0, 1, 2].map(|a| hi[a] - lo[a] + 1));
    let noise = local_noise(&clean.view(), origin, dims);
    // Capped: a noise-free synthetic region would give infinity, which JSON cannot hold.
    (sum / n.max(1) as f64 / noise.max(1e-9)).min(1e4)
}
