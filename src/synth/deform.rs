//! More hosts from few scans: a random smooth deformation (affine + elastic) of a host and its
//! organ mask in physical space, plus an MR bias field, applied before lesions are inserted.

use ndarray::{Array3, ArrayView3, Axis};
use rand::{Rng, RngExt};

use crate::geometry::{invert, to_array_order, Affine, Geometry, IDENTITY};
use crate::transforms::spatial::{apply_affine, fill_grid, nearest_voxel, sample_linear_within};
use crate::volume::Volume;

/// How strongly hosts are deformed (from `[synth]`).
#[derive(Debug, Clone, Copy)]
pub struct DeformSettings {
    /// Rotation about one random axis, up to this many degrees.
    pub rotation_degrees: f64,
    /// Isotropic scale up to ±this share.
    pub scale: f64,
    /// Peak elastic displacement, mm.
    pub elastic_mm: f64,
    /// Wavelengths of the elastic field, mm: long, so the field is smooth and invertible.
    pub elastic_wavelength_mm: [f64; 2],
    /// Multiplicative bias field, up to ±this share across the field of view (MR).
    pub bias_field: f64,
}

/// One sinusoidal component of the elastic displacement field.
#[derive(Debug, Clone, Copy)]
struct Wave {
    /// Wave vector, rad/mm.
    k: [f64; 3],
    phase: f64,
    /// Displacement amplitude per world axis, mm.
    amplitude: [f64; 3],
}

/// A world → world map `x ↦ A·x + d(x)`: where the deformed scan's point `x` is sampled in the host.
#[derive(Debug, Clone)]
pub struct Deformation {
    /// `A`: a rotation about one world axis and an isotropic scaling, both about the grid's centre (mm).
    pub affine: Affine,
    waves: Vec<Wave>,
}

/// Sinusoids summed into the elastic field.
const WAVES: usize = 4;

impl Deformation {
    /// A random deformation about the centre of `grid`.
    pub fn random(grid: &Geometry, s: &DeformSettings, rng: &mut impl Rng) -> Self {
        let centre = grid.voxel_to_world(grid.dims.map(|n| (n as f64 - 1.0) / 2.0));
        let angle = rng.random_range(-1.0..=1.0) * s.rotation_degrees.to_radians();
        let scale = 1.0 + rng.random_range(-1.0..=1.0) * s.scale;
        let axis = rng.random_range(0..3usize);
        let (sin, cos) = angle.sin_cos();
        let (p, q) = match axis {
            0 => (1, 2),
            1 => (0, 2),
            _ => (0, 1),
        };
        let mut a = IDENTITY;
        a[p][p] = cos * scale;
        a[p][q] = -sin * scale;
        a[q][p] = sin * scale;
        a[q][q] = cos * scale;
        let r = 3 - p - q;
        a[r][r] = scale;
        for row in 0..3 {
            a[row][3] = centre[row] - (0..3).map(|k| a[row][k] * centre[k]).sum::<f64>();
        }
        let [wlo, whi] = s.elastic_wavelength_mm;
        let waves = if s.elastic_mm > 0.0 {
            (0..WAVES)
                .map(|_| {
                    let dir = super::lesion::unit(rng);
                    let length = rng.random_range(wlo..=whi.max(wlo));
                    let amp = super::lesion::unit(rng);
                    // Amplitudes split over the waves so the peak stays within elastic_mm.
                    let size = s.elastic_mm / WAVES as f64 * rng.random_range(0.5..=1.0);
                    Wave {
                        k: dir.map(|d| d * std::f64::consts::TAU / length),
                        phase: rng.random_range(0.0..std::f64::consts::TAU),
                        amplitude: amp.map(|v| v * size),
                    }
                })
                .collect()
        } else {
            Vec::new()
        };
        Deformation { affine: a, waves }
    }

    /// The host point sampled for the deformed scan's world point `x`.
    pub fn map(&self, x: [f64; 3]) -> [f64; 3] {
        let mut y = apply_affine(&self.affine, x);
        for w in &self.waves {
            let s = (w.k[0] * x[0] + w.k[1] * x[1] + w.k[2] * x[2] + w.phase).sin();
            for (a, yy) in y.iter_mut().enumerate() {
                *yy += w.amplitude[a] * s;
            }
        }
        y
    }
}

/// Fills the grid `[k, j, i]` with `sample(p)`, `p` the host's continuous voxel index `(i, j, k)`
/// for that voxel under `deformation`.
fn warp<T: Copy + Default + Send + Sync>(
    grid: &Geometry,
    deformation: &Deformation,
    sample: impl Fn([f64; 3]) -> T + Sync,
) -> Array3<T> {
    // The host and the output share the grid; only the world map differs.
    let to_voxel = invert(&grid.affine).unwrap_or(IDENTITY);
    fill_grid(grid.dims, |ijk| {
        sample(apply_affine(
            &to_voxel,
            deformation.map(grid.voxel_to_world(ijk)),
        ))
    })
}

/// The host scan (channel 0) and its masks (organ, region of interest), all deformed onto the
/// host's own grid by one field: linear for the scan (re-quantised for integer hosts; points
/// outside take the host's minimum, i.e. air), nearest for the masks. Then the bias field, if any.
/// The copy carries no identifiers.
pub fn deform_host(
    host: &Volume,
    masks: &[&Array3<bool>],
    settings: &DeformSettings,
    rng: &mut impl Rng,
) -> (Volume, Vec<Array3<bool>>) {
    let g = &host.geometry;
    let deformation = Deformation::random(g, settings, rng);
    let integral = !matches!(
        host.info.dtype,
        crate::DataType::Float32 | crate::DataType::Float64
    );
    let source: ArrayView3<f32> = host.voxels.index_axis(Axis(0), 0);
    let (lowest, _) = host.value_range().unwrap_or((0.0, 0.0));
    let mut channel = warp(g, &deformation, |p| {
        match sample_linear_within(source, to_array_order(p)) {
            Some(v) if integral => v.round(),
            Some(v) => v,
            None => lowest,
        }
    });
    if settings.bias_field > 0.0 {
        apply_bias_field(
            &mut channel,
            g,
            settings.bias_field,
            integral,
            host.info.dtype.range(),
            rng,
        );
    }
    let masks = masks
        .iter()
        .map(|mask| {
            warp(g, &deformation, |p| {
                nearest_voxel(p, mask.dim().into()).is_some_and(|at| mask[at])
            })
        })
        .collect();
    let mut info = host.info.clone();
    info.identifiers = Default::default();
    let volume = Volume::new(channel.insert_axis(Axis(0)), g.clone(), info).expect("same grid");
    (volume, masks)
}

/// A smooth multiplicative field `exp(linear + quadratic)` over the field of view, peak change
/// about ±`strength` (MR receive-coil inhomogeneity), clipped to the storage type's `range`.
pub fn apply_bias_field(
    channel: &mut Array3<f32>,
    g: &Geometry,
    strength: f64,
    integral: bool,
    range: (f64, f64),
    rng: &mut impl Rng,
) {
    let linear = [0, 1, 2].map(|_| rng.random_range(-1.0..=1.0) * strength);
    let quadratic = [0, 1, 2].map(|_| rng.random_range(-1.0..=1.0) * strength);
    let [ni, nj, nk] = g.dims;
    for ((k, j, i), v) in channel.indexed_iter_mut() {
        let u = [
            i as f64 / ni as f64 - 0.5,
            j as f64 / nj as f64 - 0.5,
            k as f64 / nk as f64 - 0.5,
        ];
        let e: f64 = (0..3)
            .map(|a| linear[a] * u[a] + 2.0 * quadratic[a] * (u[a] * u[a] - 1.0 / 12.0))
            .sum();
        *v = (*v * e.exp() as f32).clamp(range.0 as f32, range.1 as f32);
        if integral {
            *v = v.round();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn the_elastic_field_is_smooth_bounded_and_reproducible() {
        let g = Geometry::new([40, 40, 40], IDENTITY);
        let s = DeformSettings {
            rotation_degrees: 0.0,
            scale: 0.0,
            elastic_mm: 3.0,
            elastic_wavelength_mm: [60.0, 120.0],
            bias_field: 0.0,
        };
        let mk = || Deformation::random(&g, &s, &mut rand::rngs::StdRng::seed_from_u64(5));
        let (a, b) = (mk(), mk());
        let mut peak = 0.0f64;
        for x in (0..40).step_by(3) {
            for y in (0..40).step_by(3) {
                let p = [x as f64, y as f64, 20.0];
                let (ya, yb) = (a.map(p), b.map(p));
                assert_eq!(ya, yb);
                let d = (0..3).map(|i| (ya[i] - p[i]).powi(2)).sum::<f64>().sqrt();
                peak = peak.max(d);
                // Neighbouring points 1 mm apart move by well under 1 mm relative to each other
                // (the map stays invertible).
                let q = a.map([p[0] + 1.0, p[1], p[2]]);
                let stretch = (0..3)
                    .map(|i| (q[i] - ya[i] - [1.0, 0.0, 0.0][i]).powi(2))
                    .sum::<f64>()
                    .sqrt();
                assert!(stretch < 0.5, "{stretch}");
            }
        }
        assert!(peak > 0.1 && peak <= 3.0 + 1e-9, "{peak}");
    }
}
