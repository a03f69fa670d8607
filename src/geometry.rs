//! Where voxels sit in the patient: the voxel→world affine and what derives from it.
//!
//! World coordinates are **RAS+ millimetres** (x grows toward the patient's Right, y Anterior,
//! z Superior), exactly what nibabel, 3D Slicer and NIfTI's sform/qform use.
//! DICOM's LPS coordinates are converted on read by negating x and y.
//!
//! Voxel indices are `(i, j, k)`. For NIfTI they are the file's first three axes. For DICOM, `i` is
//! the column, `j` the row and `k` the slice, ordered along the slice normal (row direction × column
//! direction), so `k` grows with the normal and the affine's third column is the slice step.
//!
//! # Axis order
//!
//! One convention, everywhere:
//! - **voxel order `[i, j, k]`** for everything tied to the affine: [`Geometry::dims`],
//!   [`Geometry::spacing`], world transforms, and every index or box written to disk
//!   (`bbox_voxel`, lesion centres);
//! - **array order `[k, j, i]`** for every in-memory array (`Volume::voxels` is `[c, k, j, i]`,
//!   `k` slowest, which is NIfTI's on-disk order) and for patch and window sizes (`[D, H, W]`).
//!
//! Convert only with [`to_array_order`] and [`to_voxel_order`], or [`Geometry::shape`] /
//! [`Geometry::array_spacing`], never by indexing `[2], [1], [0]` by hand.

use serde::{Deserialize, Serialize};

/// `[i, j, k]` → `[k, j, i]` (voxel order to array order).
pub fn to_array_order<T>(ijk: [T; 3]) -> [T; 3] {
    let [i, j, k] = ijk;
    [k, j, i]
}

/// `[k, j, i]` → `[i, j, k]` (array order to voxel order).
pub fn to_voxel_order<T>(kji: [T; 3]) -> [T; 3] {
    let [k, j, i] = kji;
    [i, j, k]
}

/// A training patch or inference window in array order: `[H, W]` for 2D models (one slice, or a
/// 2.5D stack), `[D, H, W]` for 3D. Serialised as a plain list; any other length or a zero size
/// fails when the config or checkpoint is parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "Vec<usize>", into = "Vec<usize>")]
pub struct PatchSize {
    /// `[D, H, W]`; `D = 1` for 2D.
    window: [usize; 3],
    three_d: bool,
}

impl PatchSize {
    /// A 2D (`[H, W]`) or 3D (`[D, H, W]`) size; `None` for any other length or a zero size.
    pub fn new(sizes: &[usize]) -> Option<Self> {
        if sizes.contains(&0) {
            return None;
        }
        match *sizes {
            [h, w] => Some(PatchSize {
                window: [1, h, w],
                three_d: false,
            }),
            [d, h, w] => Some(PatchSize {
                window: [d, h, w],
                three_d: true,
            }),
            _ => None,
        }
    }

    /// 2 or 3.
    pub fn spatial_dims(&self) -> usize {
        if self.three_d {
            3
        } else {
            2
        }
    }

    /// True for a 3D patch `[D, H, W]`.
    pub fn is_3d(&self) -> bool {
        self.three_d
    }

    /// The sizes, `[H, W]` or `[D, H, W]`.
    pub fn as_slice(&self) -> &[usize] {
        if self.three_d {
            &self.window
        } else {
            &self.window[1..]
        }
    }

    /// As a 3D window `[D, H, W]`: a 2D size is one slice deep (`[1, H, W]`).
    pub fn window(&self) -> [usize; 3] {
        self.window
    }
}

impl TryFrom<Vec<usize>> for PatchSize {
    type Error = String;
    fn try_from(sizes: Vec<usize>) -> Result<Self, String> {
        PatchSize::new(&sizes).ok_or_else(|| {
            format!("patch_size must be 2 (2D) or 3 (3D) positive sizes, not {sizes:?}")
        })
    }
}

impl From<PatchSize> for Vec<usize> {
    fn from(p: PatchSize) -> Vec<usize> {
        p.as_slice().to_vec()
    }
}

impl std::fmt::Display for PatchSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = self.as_slice().iter().map(usize::to_string).collect();
        f.write_str(&parts.join("×"))
    }
}

/// A 4×4 row-major affine mapping homogeneous voxel indices `(i, j, k, 1)` to RAS+ mm.
pub type Affine = [[f64; 4]; 4];

/// The sampling grid of a volume: its spatial size and its voxel→world affine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Geometry {
    /// Spatial size `[ni, nj, nk]`.
    pub dims: [usize; 3],
    /// Voxel → RAS+ mm, row-major.
    pub affine: Affine,
}

/// Matrix that flips x and y: LPS ↔ RAS (it is its own inverse).
pub const LPS_TO_RAS: Affine = [
    [-1.0, 0.0, 0.0, 0.0],
    [0.0, -1.0, 0.0, 0.0],
    [0.0, 0.0, 1.0, 0.0],
    [0.0, 0.0, 0.0, 1.0],
];

/// Product `a · b` of two affines.
pub fn matmul(a: &Affine, b: &Affine) -> Affine {
    let mut out = [[0.0; 4]; 4];
    for (r, row) in out.iter_mut().enumerate() {
        for (c, v) in row.iter_mut().enumerate() {
            *v = (0..4).map(|k| a[r][k] * b[k][c]).sum();
        }
    }
    out
}

/// Identity affine.
pub const IDENTITY: Affine = [
    [1.0, 0.0, 0.0, 0.0],
    [0.0, 1.0, 0.0, 0.0],
    [0.0, 0.0, 1.0, 0.0],
    [0.0, 0.0, 0.0, 1.0],
];

impl Geometry {
    /// A grid of `dims` voxels in voxel order `[ni, nj, nk]`, placed by `affine` (voxel → RAS+ mm).
    pub fn new(dims: [usize; 3], affine: Affine) -> Self {
        Geometry { dims, affine }
    }

    /// Column `axis` of the 3×3 linear part: the world step of one voxel along that axis.
    pub fn axis_step(&self, axis: usize) -> [f64; 3] {
        [
            self.affine[0][axis],
            self.affine[1][axis],
            self.affine[2][axis],
        ]
    }

    /// Array shape `[nk, nj, ni]` of a volume on this grid (see the module's axis order).
    pub fn shape(&self) -> [usize; 3] {
        to_array_order(self.dims)
    }

    /// Spacing in array order `[k, j, i]`, for filters and kernels sized on arrays.
    pub fn array_spacing(&self) -> [f64; 3] {
        to_array_order(self.spacing())
    }

    /// Voxel spacing in mm along `(i, j, k)`: the lengths of the affine's columns.
    pub fn spacing(&self) -> [f64; 3] {
        std::array::from_fn(|a| norm(self.axis_step(a)))
    }

    /// World position of voxel `(0, 0, 0)`'s centre.
    pub fn origin(&self) -> [f64; 3] {
        [self.affine[0][3], self.affine[1][3], self.affine[2][3]]
    }

    /// Unit direction of each voxel axis in RAS+ (`direction()[axis]`).
    pub fn direction(&self) -> [[f64; 3]; 3] {
        std::array::from_fn(|a| {
            let s = self.axis_step(a);
            let n = norm(s);
            if n == 0.0 {
                [0.0; 3]
            } else {
                [s[0] / n, s[1] / n, s[2] / n]
            }
        })
    }

    /// World (RAS+ mm) position of a voxel index (fractional indices allowed).
    pub fn voxel_to_world(&self, ijk: [f64; 3]) -> [f64; 3] {
        let a = &self.affine;
        std::array::from_fn(|r| a[r][0] * ijk[0] + a[r][1] * ijk[1] + a[r][2] * ijk[2] + a[r][3])
    }

    /// Continuous voxel index of a world position, or `None` when the affine is singular.
    pub fn world_to_voxel(&self, xyz: [f64; 3]) -> Option<[f64; 3]> {
        let inv = invert(&self.affine)?;
        let g = Geometry::new(self.dims, inv);
        Some(g.voxel_to_world(xyz))
    }

    /// Orientation code in nibabel's `aff2axcodes` convention: for each voxel axis the world
    /// direction it points to (`R`/`L`, `A`/`P`, `S`/`I`), e.g. `"RAS"` or `"LPS"`.
    pub fn axis_codes(&self) -> String {
        let dir = self.direction();
        dir.iter()
            .map(|d| {
                let (w, v) = d
                    .iter()
                    .enumerate()
                    .max_by(|a, b| a.1.abs().total_cmp(&b.1.abs()))
                    .map(|(w, v)| (w, *v))
                    .unwrap_or((0, 0.0));
                match (w, v >= 0.0) {
                    (0, true) => 'R',
                    (0, false) => 'L',
                    (1, true) => 'A',
                    (1, false) => 'P',
                    (2, true) => 'S',
                    _ => 'I',
                }
            })
            .collect()
    }

    /// True when some voxel axis is not parallel to a world axis (beyond 1e-4 in direction cosine).
    pub fn is_oblique(&self) -> bool {
        self.direction().iter().any(|d| {
            let mut a = d.map(f64::abs);
            a.sort_by(f64::total_cmp);
            a[0] > 1e-4 || a[1] > 1e-4
        })
    }

    /// `axis_codes()`, or `"oblique"` when the grid is tilted against the world axes.
    pub fn orientation(&self) -> String {
        if self.is_oblique() {
            "oblique".to_string()
        } else {
            self.axis_codes()
        }
    }

    /// Largest absolute difference between the two affines' entries, or `None` if the grid sizes
    /// differ. Entries are in mm (translations) or mm per voxel (linear part).
    pub fn max_affine_difference(&self, other: &Geometry) -> Option<f64> {
        if self.dims != other.dims {
            return None;
        }
        Some(
            (0..3)
                .flat_map(|r| (0..4).map(move |c| (r, c)))
                .map(|(r, c)| (self.affine[r][c] - other.affine[r][c]).abs())
                .fold(0.0, f64::max),
        )
    }

    /// What makes this grid unusable, if anything: a zero-length axis, a non-finite affine entry,
    /// or a singular linear part (e.g. an all-zero sform), which has no world position to give.
    pub fn problem(&self) -> Option<String> {
        if self.dims.contains(&0) {
            return Some(format!(
                "a zero-length axis: dims (i, j, k) = {:?}",
                self.dims
            ));
        }
        if self.affine.iter().flatten().any(|v| !v.is_finite()) {
            return Some(format!("a non-finite affine {:?}", self.affine));
        }
        let spacing = self.spacing();
        let det = determinant(&self.affine);
        // Relative to the voxel volume, so tiny but valid voxels are not refused.
        let volume = spacing.iter().product::<f64>();
        if volume <= 0.0 || det.abs() < 1e-6 * volume {
            return Some(format!(
                "a singular affine (voxel sizes {spacing:?} mm, determinant {det:e}): {:?}",
                self.affine
            ));
        }
        None
    }

    /// Number of voxels in the grid, saturating: an absurd grid must fail its size check, not
    /// overflow into a small count.
    pub fn voxel_count(&self) -> usize {
        self.dims.iter().fold(1, |n, &d| n.saturating_mul(d))
    }
}

/// A point or vector in DICOM's LPS as RAS+ (and back: the flip is its own inverse).
pub(crate) fn lps_to_ras(v: [f64; 3]) -> [f64; 3] {
    [-v[0], -v[1], v[2]]
}

pub(crate) fn norm(v: [f64; 3]) -> f64 {
    (v[0] * v[0] + v[1] * v[1] + v[2] * v[2]).sqrt()
}

pub(crate) fn cross(a: [f64; 3], b: [f64; 3]) -> [f64; 3] {
    [
        a[1] * b[2] - a[2] * b[1],
        a[2] * b[0] - a[0] * b[2],
        a[0] * b[1] - a[1] * b[0],
    ]
}

pub(crate) fn dot(a: [f64; 3], b: [f64; 3]) -> f64 {
    a[0] * b[0] + a[1] * b[1] + a[2] * b[2]
}

/// Determinant of an affine's 3×3 linear part: the signed volume of one voxel, mm³.
pub fn determinant(a: &Affine) -> f64 {
    let m = |r: usize, c: usize| a[r][c];
    m(0, 0) * (m(1, 1) * m(2, 2) - m(1, 2) * m(2, 1))
        - m(0, 1) * (m(1, 0) * m(2, 2) - m(1, 2) * m(2, 0))
        + m(0, 2) * (m(1, 0) * m(2, 1) - m(1, 1) * m(2, 0))
}

/// Inverse of an affine (linear part by cofactors), or `None` when it is singular.
pub fn invert(a: &Affine) -> Option<Affine> {
    let m = |r: usize, c: usize| a[r][c];
    let det = determinant(a);
    if det.abs() < 1e-12 {
        return None;
    }
    let mut inv = IDENTITY;
    inv[0][0] = (m(1, 1) * m(2, 2) - m(1, 2) * m(2, 1)) / det;
    inv[0][1] = (m(0, 2) * m(2, 1) - m(0, 1) * m(2, 2)) / det;
    inv[0][2] = (m(0, 1) * m(1, 2) - m(0, 2) * m(1, 1)) / det;
    inv[1][0] = (m(1, 2) * m(2, 0) - m(1, 0) * m(2, 2)) / det;
    inv[1][1] = (m(0, 0) * m(2, 2) - m(0, 2) * m(2, 0)) / det;
    inv[1][2] = (m(0, 2) * m(1, 0) - m(0, 0) * m(1, 2)) / det;
    inv[2][0] = (m(1, 0) * m(2, 1) - m(1, 1) * m(2, 0)) / det;
    inv[2][1] = (m(0, 1) * m(2, 0) - m(0, 0) * m(2, 1)) / det;
    inv[2][2] = (m(0, 0) * m(1, 1) - m(0, 1) * m(1, 0)) / det;
    for row in inv.iter_mut().take(3) {
        row[3] = -(0..3).map(|c| row[c] * a[c][3]).sum::<f64>();
    }
    Some(inv)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patch_sizes_parse_lift_and_reject() {
        let p2: PatchSize = serde_json::from_str("[64, 32]").unwrap();
        assert_eq!((p2.spatial_dims(), p2.window()), (2, [1, 64, 32]));
        assert_eq!(serde_json::to_string(&p2).unwrap(), "[64,32]");
        let p3 = PatchSize::new(&[8, 16, 24]).unwrap();
        assert_eq!(
            (p3.as_slice(), p3.to_string()),
            (&[8, 16, 24][..], "8×16×24".into())
        );
        for bad in ["[64]", "[1,2,3,4]", "[0, 64]"] {
            let e = serde_json::from_str::<PatchSize>(bad)
                .unwrap_err()
                .to_string();
            assert!(e.contains("patch_size"), "{bad}: {e}");
        }
    }

    #[test]
    fn degenerate_grids_are_named() {
        let good = Geometry::new([4, 4, 4], IDENTITY);
        assert!(good.problem().is_none());
        let tiny = Geometry::new(
            [4, 4, 4],
            [
                [0.01, 0.0, 0.0, 0.0],
                [0.0, 0.01, 0.0, 0.0],
                [0.0, 0.0, 0.01, 0.0],
                IDENTITY[3],
            ],
        );
        assert!(tiny.problem().is_none());
        let zero = Geometry::new([4, 4, 4], [[0.0; 4], [0.0; 4], [0.0; 4], IDENTITY[3]]);
        assert!(zero.problem().unwrap().contains("singular"));
        let mut nan = IDENTITY;
        nan[1][3] = f64::NAN;
        assert!(Geometry::new([4, 4, 4], nan)
            .problem()
            .unwrap()
            .contains("non-finite"));
        assert!(Geometry::new([4, 0, 4], IDENTITY)
            .problem()
            .unwrap()
            .contains("zero-length"));
        // Two parallel axes: non-zero spacing, but no volume.
        let flat = [
            [1.0, 1.0, 0.0, 0.0],
            [0.0, 0.0, 0.0, 0.0],
            [0.0, 0.0, 1.0, 0.0],
            IDENTITY[3],
        ];
        assert!(Geometry::new([4, 4, 4], flat)
            .problem()
            .unwrap()
            .contains("singular"));
    }

    #[test]
    fn array_order_is_voxel_order_reversed() {
        let g = Geometry::new(
            [4, 5, 6],
            [
                [1.0, 0.0, 0.0, 0.0],
                [0.0, 2.0, 0.0, 0.0],
                [0.0, 0.0, 3.0, 0.0],
                IDENTITY[3],
            ],
        );
        assert_eq!(g.shape(), [6, 5, 4]);
        assert_eq!(g.array_spacing(), [3.0, 2.0, 1.0]);
        assert_eq!(to_voxel_order(g.shape()), g.dims);
    }

    #[test]
    fn lps_series_reports_lps_and_inverts() {
        // An axial DICOM series: columns go to patient left, rows posterior, slices superior.
        let lps: Affine = [
            [0.7, 0.0, 0.0, -170.0],
            [0.0, 0.7, 0.0, -150.0],
            [0.0, 0.0, 2.5, 30.0],
            [0.0, 0.0, 0.0, 1.0],
        ];
        let g = Geometry::new([512, 512, 20], matmul(&LPS_TO_RAS, &lps));
        assert_eq!(g.orientation(), "LPS");
        assert_eq!(g.spacing(), [0.7, 0.7, 2.5]);
        let w = g.voxel_to_world([10.0, 20.0, 3.0]);
        assert_eq!(w, [170.0 - 7.0, 150.0 - 14.0, 37.5]);
        let back = g.world_to_voxel(w).unwrap();
        for (b, e) in back.iter().zip([10.0, 20.0, 3.0]) {
            assert!((b - e).abs() < 1e-9);
        }
    }

    #[test]
    fn tilted_grid_is_oblique() {
        let (s, c) = (0.1f64.sin(), 0.1f64.cos());
        let a: Affine = [
            [c, -s, 0.0, 0.0],
            [s, c, 0.0, 0.0],
            [0.0, 0.0, 1.0, 0.0],
            [0.0, 0.0, 0.0, 1.0],
        ];
        let g = Geometry::new([4, 4, 4], a);
        assert_eq!(g.orientation(), "oblique");
        assert_eq!(g.axis_codes(), "RAS");
        assert!(invert(&[[0.0; 4]; 4]).is_none());
    }
}
