//! One synthetic lesion: a shape in millimetres, rasterised with partial volume, and its contrast
//! added to a host scan through the scanner's point-spread function (see DATA.md's recipe).

use ndarray::{s, Array3, ArrayViewMut3};
use rand::{Rng, RngExt};

use crate::geometry::{to_array_order, Geometry};

/// A lobulated (optionally spiculated) ellipsoid in world millimetres.
#[derive(Debug, Clone)]
pub struct LesionShape {
    /// Centre in world RAS+ mm.
    pub centre_mm: [f64; 3],
    /// Semi-axes, mm.
    pub radii_mm: [f64; 3],
    /// Rows are the ellipsoid's axes as unit vectors in world coordinates.
    pub axes: [[f64; 3]; 3],
    /// Radius modulation `1 + Σ a · sin(k·θ + p) · cos(l·φ + q)`; amplitudes sum to ε.
    pub lobes: Vec<Lobe>,
    /// Thin spikes `(unit direction, length as a share of the radius, half-angle in radians)`.
    pub spicules: Vec<([f64; 3], f64, f64)>,
}

/// One term `a · sin(k·θ + p) · cos(l·φ + q)` of the radius modulation, with θ the polar angle
/// from the ellipsoid's third axis and φ the azimuth.
#[derive(Debug, Clone, Copy)]
pub struct Lobe {
    /// `a`: relative change of the radius.
    pub amplitude: f64,
    /// Polar frequency `k`.
    pub k: f64,
    /// Azimuthal frequency `l`.
    pub l: f64,
    /// Polar phase `p`, radians.
    pub phase_theta: f64,
    /// Azimuthal phase `q`, radians.
    pub phase_phi: f64,
}

impl LesionShape {
    /// A random shape of equivalent diameter `diameter_mm` around `centre_mm`: axis ratios up to
    /// 1.3, lobulation ε in `[0.15, 0.35]` (DATA.md), `spicules` thin spikes.
    pub fn random(
        centre_mm: [f64; 3],
        diameter_mm: f64,
        spicules: usize,
        rng: &mut impl Rng,
    ) -> Self {
        let r = diameter_mm / 2.0;
        let stretch = [1.0, rng.random_range(0.8..1.0), rng.random_range(0.77..1.0)];
        let axes = random_rotation(rng);
        let epsilon = rng.random_range(0.15..0.35);
        let n = 4;
        let lobes = (0..n)
            .map(|_| Lobe {
                amplitude: epsilon / n as f64,
                k: rng.random_range(1..5) as f64,
                l: rng.random_range(1..5) as f64,
                phase_theta: rng.random_range(0.0..std::f64::consts::TAU),
                phase_phi: rng.random_range(0.0..std::f64::consts::TAU),
            })
            .collect();
        let spicules = (0..spicules)
            .map(|_| {
                let d = unit(rng);
                (d, rng.random_range(0.5..1.2), rng.random_range(0.06..0.12))
            })
            .collect();
        LesionShape {
            centre_mm,
            radii_mm: stretch.map(|s| r * s),
            axes,
            lobes,
            spicules,
        }
    }

    /// The same shape shrunk about its centre by `factor`, without spicules: a necrotic core.
    pub fn scaled(&self, factor: f64) -> Self {
        LesionShape {
            radii_mm: self.radii_mm.map(|r| r * factor),
            spicules: Vec::new(),
            ..self.clone()
        }
    }

    /// Largest distance from the centre that can be inside, mm (for bounding boxes).
    pub fn reach_mm(&self) -> f64 {
        let rmax = self.radii_mm.iter().copied().fold(0.0, f64::max);
        let eps: f64 = self.lobes.iter().map(|l| l.amplitude.abs()).sum();
        let spike = self.spicules.iter().map(|s| s.1).fold(0.0, f64::max);
        rmax * (1.0 + eps) * (1.0 + spike)
    }

    /// Whether the world point `p` is inside.
    pub fn contains(&self, p: [f64; 3]) -> bool {
        let d = [0, 1, 2].map(|a| p[a] - self.centre_mm[a]);
        // Coordinates along the ellipsoid's axes, scaled to the unit sphere.
        let local = [0, 1, 2].map(|r| (0..3).map(|c| self.axes[r][c] * d[c]).sum::<f64>());
        let u = [0, 1, 2].map(|a| local[a] / self.radii_mm[a]);
        let rho = (u[0] * u[0] + u[1] * u[1] + u[2] * u[2]).sqrt();
        if rho < 1e-12 {
            return true;
        }
        let theta = (u[2] / rho).clamp(-1.0, 1.0).acos();
        let phi = u[1].atan2(u[0]);
        let modulation: f64 = 1.0
            + self
                .lobes
                .iter()
                .map(|l| {
                    l.amplitude
                        * (l.k * theta + l.phase_theta).sin()
                        * (l.l * phi + l.phase_phi).cos()
                })
                .sum::<f64>();
        if rho <= modulation {
            return true;
        }
        // Spicules: narrow cones from the centre, tapering to a point.
        let dir = [u[0] / rho, u[1] / rho, u[2] / rho];
        self.spicules.iter().any(|(axis, length, half_angle)| {
            let cos = dir[0] * axis[0] + dir[1] * axis[1] + dir[2] * axis[2];
            let angle = cos.clamp(-1.0, 1.0).acos();
            let tip = modulation * (1.0 + length);
            angle < *half_angle && rho <= tip - (tip - modulation) * angle / half_angle
        })
    }
}

/// A uniformly random unit vector.
pub(super) fn unit(rng: &mut impl Rng) -> [f64; 3] {
    loop {
        let v = [0, 1, 2].map(|_| rng.random_range(-1.0f64..1.0));
        let n = (v[0] * v[0] + v[1] * v[1] + v[2] * v[2]).sqrt();
        if n > 1e-3 && n <= 1.0 {
            return v.map(|x| x / n);
        }
    }
}

/// A uniformly random rotation (rows orthonormal) by Gram–Schmidt on random vectors.
fn random_rotation(rng: &mut impl Rng) -> [[f64; 3]; 3] {
    let a = unit(rng);
    let mut b = unit(rng);
    let dot = a[0] * b[0] + a[1] * b[1] + a[2] * b[2];
    b = [0, 1, 2].map(|i| b[i] - dot * a[i]);
    let n = (b[0] * b[0] + b[1] * b[1] + b[2] * b[2]).sqrt().max(1e-9);
    b = b.map(|x| x / n);
    let c = crate::geometry::cross(a, b);
    [a, b, c]
}

/// Partial-volume fractions of a shape on a grid, inside a voxel box.
#[derive(Debug, Clone)]
pub struct Fraction {
    /// Box start `[k, j, i]` on the host grid.
    pub origin: [usize; 3],
    /// `α ∈ [0, 1]` per voxel of the box, `[k, j, i]`.
    pub alpha: Array3<f32>,
}

/// Sub-samples per voxel edge for partial volume (DATA.md: 4×).
pub const SUPERSAMPLE: usize = 4;

/// Rasterises `shape` on `grid` by 4×4×4 sub-voxel sampling in world space. `None` when the shape
/// misses the grid.
pub fn rasterise(shape: &LesionShape, grid: &Geometry) -> Option<Fraction> {
    let reach = shape.reach_mm();
    let centre = grid.world_to_voxel(shape.centre_mm)?;
    let spacing = grid.spacing();
    // Voxel box (i, j, k) around the centre.
    let mut lo = [0usize; 3];
    let mut hi = [0usize; 3];
    for a in 0..3 {
        let half = (reach / spacing[a]).ceil() + 1.0;
        let l = (centre[a] - half).floor().max(0.0);
        let h = (centre[a] + half).ceil().min(grid.dims[a] as f64 - 1.0);
        if h < l {
            return None;
        }
        lo[a] = l as usize;
        hi[a] = h as usize;
    }
    let origin = to_array_order(lo);
    let dims = to_array_order([0, 1, 2].map(|a| hi[a] - lo[a] + 1));
    Some(Fraction {
        origin,
        alpha: rasterise_box(shape, grid, origin, dims),
    })
}

/// Partial-volume fractions of `shape` in the voxel box at `origin` `[k, j, i]` of size `dims`
/// `[k, j, i]` on `grid`, by 4×4×4 sub-voxel sampling.
pub fn rasterise_box(
    shape: &LesionShape,
    grid: &Geometry,
    origin: [usize; 3],
    dims: [usize; 3],
) -> Array3<f32> {
    let n = SUPERSAMPLE as f64;
    let mut alpha = Array3::<f32>::zeros(dims);
    for ((k, j, i), a) in alpha.indexed_iter_mut() {
        let mut inside = 0usize;
        for sk in 0..SUPERSAMPLE {
            for sj in 0..SUPERSAMPLE {
                for si in 0..SUPERSAMPLE {
                    let off = |s: usize| (s as f64 + 0.5) / n - 0.5;
                    let p = grid.voxel_to_world([
                        (origin[2] + i) as f64 + off(si),
                        (origin[1] + j) as f64 + off(sj),
                        (origin[0] + k) as f64 + off(sk),
                    ]);
                    inside += shape.contains(p) as usize;
                }
            }
        }
        *a = inside as f32 / (SUPERSAMPLE * SUPERSAMPLE * SUPERSAMPLE) as f32;
    }
    alpha
}

/// Separable Gaussian blur of a small array with σ per axis `[k, j, i]` in voxels (0: none),
/// zero outside.
pub fn gaussian_blur(values: &Array3<f32>, sigma: [f64; 3]) -> Array3<f32> {
    let mut out = values.clone();
    for (axis, s) in sigma.into_iter().enumerate() {
        if s <= 0.0 {
            continue;
        }
        let radius = (3.0 * s).ceil() as isize;
        let kernel: Vec<f64> = (-radius..=radius)
            .map(|x| (-(x * x) as f64 / (2.0 * s * s)).exp())
            .collect();
        let sum: f64 = kernel.iter().sum();
        let kernel: Vec<f32> = kernel.iter().map(|k| (k / sum) as f32).collect();
        let src = out.clone();
        let dims = src.dim();
        let n = [dims.0, dims.1, dims.2][axis] as isize;
        // Each voxel's sum is the same whatever the thread that computes it.
        ndarray::Zip::indexed(&mut out).par_for_each(|(k, j, i), v| {
            let at = [k as isize, j as isize, i as isize];
            let mut acc = 0.0f32;
            for (t, w) in kernel.iter().enumerate() {
                let x = at[axis] + t as isize - radius;
                if x < 0 || x >= n {
                    continue;
                }
                let mut idx = at;
                idx[axis] = x;
                acc += w * src[[idx[0] as usize, idx[1] as usize, idx[2] as usize]];
            }
            *v = acc;
        });
    }
    out
}

/// Adds `contribution` (a box at `origin` `[k, j, i]`) to `host`, re-quantised to integers when
/// `integral` and clipped to `range`, so the host's own noise stays under the lesion.
pub fn add_to_host(
    mut host: ArrayViewMut3<f32>,
    origin: [usize; 3],
    contribution: &Array3<f32>,
    integral: bool,
    range: (f64, f64),
) {
    let (dk, dj, di) = contribution.dim();
    let (nk, nj, ni) = host.dim();
    let k1 = (origin[0] + dk).min(nk);
    let j1 = (origin[1] + dj).min(nj);
    let i1 = (origin[2] + di).min(ni);
    let mut region = host.slice_mut(s![origin[0]..k1, origin[1]..j1, origin[2]..i1]);
    for ((k, j, i), v) in region.indexed_iter_mut() {
        let mut x = *v + contribution[[k, j, i]];
        if integral {
            x = x.round();
        }
        *v = x.clamp(range.0 as f32, range.1 as f32);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn grid(spacing: [f64; 3], dims: [usize; 3]) -> Geometry {
        let mut a = crate::geometry::IDENTITY;
        for i in 0..3 {
            a[i][i] = spacing[i];
        }
        Geometry::new(dims, a)
    }

    #[test]
    fn partial_volume_matches_a_sphere_in_mm_on_an_anisotropic_grid() {
        // A 10 mm sphere on 0.8 × 0.8 × 3 mm voxels: the fractions sum to its volume.
        let g = grid([0.8, 0.8, 3.0], [60, 60, 20]);
        let shape = LesionShape {
            centre_mm: [24.0, 24.0, 30.0],
            radii_mm: [5.0; 3],
            axes: [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]],
            lobes: Vec::new(),
            spicules: Vec::new(),
        };
        let f = rasterise(&shape, &g).unwrap();
        let volume: f64 = f.alpha.iter().map(|a| *a as f64).sum::<f64>() * 0.8 * 0.8 * 3.0;
        let exact = 4.0 / 3.0 * std::f64::consts::PI * 125.0;
        assert!((volume / exact - 1.0).abs() < 0.03, "{volume} vs {exact}");
        // Edges carry partial values, the core is full.
        let partial = f.alpha.iter().filter(|a| **a > 0.0 && **a < 1.0).count();
        assert!(partial > 50, "{partial}");
        assert!(f.alpha.iter().any(|a| *a == 1.0));
    }

    #[test]
    fn random_shapes_are_reproducible_and_lobulated() {
        let mk = |seed| {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            LesionShape::random([0.0; 3], 8.0, 3, &mut rng)
        };
        let (a, b) = (mk(1), mk(1));
        assert_eq!(a.radii_mm, b.radii_mm);
        let g = grid([0.5; 3], [48, 48, 48]);
        let mut shape = a.clone();
        shape.centre_mm = [12.0; 3];
        let f = rasterise(&shape, &g).unwrap();
        let fg = f.alpha.iter().filter(|v| **v >= 0.5).count() as f64 * 0.125;
        // Within a factor of the 8 mm sphere's 268 mm³ (lobes and spicules change it).
        assert!((100.0..800.0).contains(&fg), "{fg}");
    }

    #[test]
    fn blur_keeps_the_total_and_insertion_respects_the_range() {
        let mut v = Array3::<f32>::zeros([9, 9, 9]);
        v[[4, 4, 4]] = 1.0;
        let b = gaussian_blur(&v, [1.0, 0.5, 0.0]);
        assert!((b.sum() - 1.0).abs() < 1e-4);
        assert!(b[[3, 4, 4]] > 0.0 && b[[4, 4, 3]] == 0.0);
        let mut host = Array3::<f32>::from_elem([4, 4, 4], 30000.0);
        let add = Array3::<f32>::from_elem([2, 2, 2], 5000.7);
        add_to_host(host.view_mut(), [1, 1, 1], &add, true, (-32768.0, 32767.0));
        assert_eq!(host[[1, 1, 1]], 32767.0);
        assert_eq!(host[[0, 0, 0]], 30000.0);
    }
}
