//! Where voxels sit in the patient: the voxel→world affine and what derives from it.
//!
//! World coordinates are **RAS+ millimetres** (x grows toward the patient's Right, y Anterior,
//! z Superior), exactly what nibabel, 3D Slicer and NIfTI's sform/qform use.
//! DICOM's LPS coordinates are converted on read by negating x and y.
//!
//! Voxel indices are `(i, j, k)`. For NIfTI they are the file's first three axes. For DICOM, `i` is
//! the column, `j` the row and `k` the slice, ordered along the slice normal (row direction × column
//! direction), so `k` grows with the normal and the affine's third column is the slice step.

use serde::{Deserialize, Serialize};

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

    /// Number of voxels in the grid.
    pub fn voxel_count(&self) -> usize {
        self.dims.iter().product()
    }
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

/// Inverse of an affine (linear part by cofactors), or `None` when it is singular.
pub fn invert(a: &Affine) -> Option<Affine> {
    let m = |r: usize, c: usize| a[r][c];
    let det = m(0, 0) * (m(1, 1) * m(2, 2) - m(1, 2) * m(2, 1))
        - m(0, 1) * (m(1, 0) * m(2, 2) - m(1, 2) * m(2, 0))
        + m(0, 2) * (m(1, 0) * m(2, 1) - m(1, 1) * m(2, 0));
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
