//! RT Structure Sets (SOP Class 1.2.840.10008.5.1.4.1.1.481.3, PS3.3 A.19): closed planar
//! contours traced from a label map on each source plane, in patient coordinates (LPS, mm), each
//! referencing its image.
//!
//! Outlines follow the pixel edges of a region (4-connected foreground, so regions touching only at
//! a corner get separate contours) with every edge moved a quarter pixel toward the foreground.
//! Pixel centres are then never on a contour: readers that test centres against the polygon (and
//! those that round vertices to the nearest pixel and fill, as rt-utils does) rasterise the mask
//! back exactly. Holes are written as further contours on the same plane; readers combine the
//! contours of a plane by even-odd filling.

use std::collections::BTreeSet;
use std::path::Path;

use dicom_core::value::PrimitiveValue;
use dicom_core::{DataElement, VR};
use dicom_dictionary_std::{tags, uids};
use dicom_object::InMemDicomObject;
use ndarray::{ArrayView2, ArrayView3, Axis};
use rayon::prelude::*;

use crate::error::Result;
use crate::io::derived::{
    derived_object, ds_rounded_element, now_date_time, sequence, text, write_object, SourceSeries,
};

/// RT Structure Set Storage.
pub const RTSTRUCT_SOP_CLASS: &str = "1.2.840.10008.5.1.4.1.1.481.3";

/// The (retired) Detached Study Management SOP Class that RT Referenced Study items conventionally
/// name alongside the Study Instance UID (PS3.3 C.8.8.5).
const STUDY_COMPONENT_SOP_CLASS: &str = "1.2.840.10008.3.1.2.3.1";

/// One closed outline in continuous pixel coordinates `[x, y]` = (column, row), pixel centres at
/// integers.
#[derive(Debug, Clone, PartialEq)]
pub struct Outline {
    /// The corners, in order; the last joins the first.
    pub points: Vec<[f64; 2]>,
    /// The outline bounds a hole in the region.
    pub hole: bool,
}

/// Direction steps on the pixel-corner lattice: east, south, west, north (`y` grows downwards).
const STEP: [(i64, i64); 4] = [(1, 0), (0, 1), (-1, 0), (0, -1)];

/// Traces the outlines of the `true` pixels of `mask` (`[rows, columns]`): outer boundaries and
/// holes, each edge a quarter pixel outside the foreground pixel centres.
pub fn trace_outlines(mask: ArrayView2<bool>) -> Vec<Outline> {
    let (mut j0, mut j1, mut i0, mut i1) = (usize::MAX, 0, usize::MAX, 0);
    for ((j, i), &on) in mask.indexed_iter() {
        if on {
            (j0, j1, i0, i1) = (j0.min(j), j1.max(j), i0.min(i), i1.max(i));
        }
    }
    if j0 == usize::MAX {
        return Vec::new();
    }
    let (w, h) = (i1 - i0 + 1, j1 - j0 + 1);
    let fg = |i: i64, j: i64| {
        i >= 0
            && j >= 0
            && (i as usize) < w
            && (j as usize) < h
            && mask[[j as usize + j0, i as usize + i0]]
    };
    // Corner (x, y) is the top-left corner of local pixel (x, y); each boundary edge leaves a corner
    // in one direction, with the foreground on the side of direction (d + 1) % 4.
    let vw = w + 1;
    let vertex = |x: i64, y: i64| y as usize * vw + x as usize;
    let mut out = vec![0u8; vw * (h + 1)];
    for j in 0..h as i64 {
        for i in 0..w as i64 {
            if !fg(i, j) {
                continue;
            }
            if !fg(i, j - 1) {
                out[vertex(i, j)] |= 1 << 0;
            }
            if !fg(i + 1, j) {
                out[vertex(i + 1, j)] |= 1 << 1;
            }
            if !fg(i, j + 1) {
                out[vertex(i + 1, j + 1)] |= 1 << 2;
            }
            if !fg(i - 1, j) {
                out[vertex(i, j + 1)] |= 1 << 3;
            }
        }
    }
    // Turning toward the foreground first keeps diagonal neighbours apart (a bijection of edges).
    let next = |edges: u8, d: usize| {
        [(d + 1) % 4, d, (d + 3) % 4]
            .into_iter()
            .find(|&c| edges & (1 << c) != 0)
            .unwrap_or(d)
    };
    let normal = |d: usize| {
        let (x, y) = STEP[(d + 1) % 4];
        [x as f64, y as f64]
    };
    let mut seen = vec![0u8; out.len()];
    let mut outlines = Vec::new();
    for y in 0..=h as i64 {
        for x in 0..=w as i64 {
            let v = vertex(x, y);
            for d0 in 0..4 {
                if out[v] & (1 << d0) == 0 || seen[v] & (1 << d0) != 0 {
                    continue;
                }
                // Walk the cycle, keeping corners with their incoming and outgoing directions.
                let mut steps: Vec<(i64, i64, usize)> = Vec::new();
                let (mut cx, mut cy, mut d) = (x, y, d0);
                loop {
                    seen[vertex(cx, cy)] |= 1 << d;
                    steps.push((cx, cy, d));
                    cx += STEP[d].0;
                    cy += STEP[d].1;
                    d = next(out[vertex(cx, cy)], d);
                    if (cx, cy, d) == (x, y, d0) {
                        break;
                    }
                }
                let n = steps.len();
                let points: Vec<[f64; 2]> = (0..n)
                    .filter_map(|t| {
                        let (px, py, d_out) = steps[t];
                        let d_in = steps[(t + n - 1) % n].2;
                        (d_in != d_out).then(|| {
                            let (a, b) = (normal(d_in), normal(d_out));
                            [
                                (px + i0 as i64) as f64 - 0.5 + 0.25 * (a[0] + b[0]),
                                (py + j0 as i64) as f64 - 0.5 + 0.25 * (a[1] + b[1]),
                            ]
                        })
                    })
                    .collect();
                let area2: f64 = (0..points.len())
                    .map(|t| {
                        let (p, q) = (points[t], points[(t + 1) % points.len()]);
                        p[0] * q[1] - q[0] * p[1]
                    })
                    .sum();
                outlines.push(Outline {
                    points,
                    hole: area2 < 0.0,
                });
            }
        }
    }
    outlines
}

/// One ROI: the voxels of the map equal to `value`.
#[derive(Debug, Clone)]
pub struct RtRoi {
    /// The map value that makes the ROI.
    pub value: u32,
    /// ROI Name.
    pub name: String,
    /// ROI Display Color, sRGB.
    pub color: [u8; 3],
    /// RT ROI Interpreted Type (`ORGAN`, …; empty when unknown).
    pub interpreted_type: String,
}

/// Contours of every ROI on every plane: `(roi index, plane, outlines)`.
fn contours_of<T>(map: ArrayView3<T>, rois: &[RtRoi]) -> Vec<(usize, usize, Vec<Outline>)>
where
    T: Copy + Into<u32> + Sync,
{
    let planes: Vec<(usize, ArrayView2<T>)> = map.axis_iter(Axis(0)).enumerate().collect();
    planes
        .par_iter()
        .flat_map_iter(|(k, plane)| {
            let values: BTreeSet<u32> = plane.iter().map(|v| (*v).into()).collect();
            rois.iter()
                .enumerate()
                .filter(|(_, r)| values.contains(&r.value))
                .map(|(n, r)| {
                    let mask = plane.mapv(|v| v.into() == r.value);
                    (n, *k, trace_outlines(mask.view()))
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Contour Sequence items of every ROI.
fn contour_items<T>(
    source: &SourceSeries,
    map: ArrayView3<T>,
    rois: &[RtRoi],
) -> Vec<Vec<InMemDicomObject>>
where
    T: Copy + Into<u32> + Sync,
{
    let traced = contours_of(map, rois);
    let mut per_roi: Vec<Vec<InMemDicomObject>> = vec![Vec::new(); rois.len()];
    for (n, k, outlines) in &traced {
        for outline in outlines {
            let data: Vec<f64> = outline
                .points
                .iter()
                .flat_map(|p| source.to_patient(*k, p[0], p[1]))
                .collect();
            let number = per_roi[*n].len() + 1;
            per_roi[*n].push(InMemDicomObject::from_element_iter([
                text(tags::CONTOUR_NUMBER, VR::IS, &number.to_string()),
                sequence(
                    tags::CONTOUR_IMAGE_SEQUENCE,
                    vec![source.slices[*k].reference()],
                ),
                text(tags::CONTOUR_GEOMETRIC_TYPE, VR::CS, "CLOSED_PLANAR"),
                text(
                    tags::NUMBER_OF_CONTOUR_POINTS,
                    VR::IS,
                    &outline.points.len().to_string(),
                ),
                ds_rounded_element(tags::CONTOUR_DATA, &data, 4),
            ]));
        }
    }
    per_roi
}

/// Writes the ROIs of `map` (`[k, j, i]` on `source`'s planes) as an RTSTRUCT at `path`, atomically.
/// Every ROI is listed; one absent from the map has no contours.
pub fn write_rtstruct<T>(
    path: &Path,
    source: &SourceSeries,
    map: ArrayView3<T>,
    rois: &[RtRoi],
    description: &str,
) -> Result<()>
where
    T: Copy + Into<u32> + Sync,
{
    source.check_grid(map.dim().into())?;
    let per_roi = contour_items(source, map, rois);
    let (date, time) = now_date_time();
    let mut obj = derived_object(source, RTSTRUCT_SOP_CLASS, "RTSTRUCT", description);
    let contour_images: Vec<InMemDicomObject> =
        source.slices.iter().map(|s| s.reference()).collect();
    for e in [
        DataElement::new(tags::OPERATORS_NAME, VR::PN, PrimitiveValue::Empty),
        text(tags::STRUCTURE_SET_LABEL, VR::SH, "MEDSEG"),
        text(tags::STRUCTURE_SET_NAME, VR::LO, description),
        text(tags::STRUCTURE_SET_DATE, VR::DA, &date),
        text(tags::STRUCTURE_SET_TIME, VR::TM, &time),
        sequence(
            tags::REFERENCED_FRAME_OF_REFERENCE_SEQUENCE,
            vec![InMemDicomObject::from_element_iter([
                text(
                    tags::FRAME_OF_REFERENCE_UID,
                    VR::UI,
                    &source.frame_of_reference_uid,
                ),
                sequence(
                    tags::RT_REFERENCED_STUDY_SEQUENCE,
                    vec![InMemDicomObject::from_element_iter([
                        text(
                            tags::REFERENCED_SOP_CLASS_UID,
                            VR::UI,
                            STUDY_COMPONENT_SOP_CLASS,
                        ),
                        text(tags::REFERENCED_SOP_INSTANCE_UID, VR::UI, &source.study_uid),
                        sequence(
                            tags::RT_REFERENCED_SERIES_SEQUENCE,
                            vec![InMemDicomObject::from_element_iter([
                                text(tags::SERIES_INSTANCE_UID, VR::UI, &source.series_uid),
                                sequence(tags::CONTOUR_IMAGE_SEQUENCE, contour_images),
                            ])],
                        ),
                    ])],
                ),
            ])],
        ),
    ]
    .into_iter()
    .chain(roi_sequences(source, rois, per_roi))
    {
        obj.put(e);
    }
    write_object(path, obj, uids::IMPLICIT_VR_LITTLE_ENDIAN)
}

/// Structure Set ROI, ROI Contour and RT ROI Observations sequences.
fn roi_sequences(
    source: &SourceSeries,
    rois: &[RtRoi],
    per_roi: Vec<Vec<InMemDicomObject>>,
) -> [DataElement<InMemDicomObject>; 3] {
    let number = |n: usize| (n + 1).to_string();
    [
        sequence(
            tags::STRUCTURE_SET_ROI_SEQUENCE,
            rois.iter()
                .enumerate()
                .map(|(n, r)| {
                    InMemDicomObject::from_element_iter([
                        text(tags::ROI_NUMBER, VR::IS, &number(n)),
                        text(
                            tags::REFERENCED_FRAME_OF_REFERENCE_UID,
                            VR::UI,
                            &source.frame_of_reference_uid,
                        ),
                        text(tags::ROI_NAME, VR::LO, &r.name),
                        text(tags::ROI_GENERATION_ALGORITHM, VR::CS, "AUTOMATIC"),
                    ])
                })
                .collect(),
        ),
        sequence(
            tags::ROI_CONTOUR_SEQUENCE,
            rois.iter()
                .zip(per_roi)
                .enumerate()
                .map(|(n, (r, contours))| {
                    let mut item = InMemDicomObject::from_element_iter([
                        text(tags::REFERENCED_ROI_NUMBER, VR::IS, &number(n)),
                        DataElement::new(
                            tags::ROI_DISPLAY_COLOR,
                            VR::IS,
                            PrimitiveValue::Strs(r.color.iter().map(|c| c.to_string()).collect()),
                        ),
                    ]);
                    if !contours.is_empty() {
                        item.put(sequence(tags::CONTOUR_SEQUENCE, contours));
                    }
                    item
                })
                .collect(),
        ),
        sequence(
            tags::RTROI_OBSERVATIONS_SEQUENCE,
            rois.iter()
                .enumerate()
                .map(|(n, r)| {
                    InMemDicomObject::from_element_iter([
                        text(tags::OBSERVATION_NUMBER, VR::IS, &number(n)),
                        text(tags::REFERENCED_ROI_NUMBER, VR::IS, &number(n)),
                        text(tags::RTROI_INTERPRETED_TYPE, VR::CS, &r.interpreted_type),
                        DataElement::new(tags::ROI_INTERPRETER, VR::PN, PrimitiveValue::Empty),
                    ])
                })
                .collect(),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array2;

    /// Even-odd point-in-polygon over all outlines: the reader's rule.
    fn inside(outlines: &[Outline], x: f64, y: f64) -> bool {
        let mut odd = false;
        for o in outlines {
            let p = &o.points;
            for t in 0..p.len() {
                let (a, b) = (p[t], p[(t + 1) % p.len()]);
                if (a[1] > y) != (b[1] > y) && x < a[0] + (y - a[1]) / (b[1] - a[1]) * (b[0] - a[0])
                {
                    odd = !odd;
                }
            }
        }
        odd
    }

    #[test]
    fn outlines_rasterise_back_exactly() {
        // A ring with a hole, a diagonal pair (separate regions), a one-pixel line, an edge pixel.
        let text = [
            "#.........",
            ".####.....",
            ".#..#..#..",
            ".####...#.",
            "......###.",
            "..........",
            "#######..#",
        ];
        let mask = Array2::from_shape_fn((text.len(), 10), |(j, i)| text[j].as_bytes()[i] == b'#');
        let outlines = trace_outlines(mask.view());
        for ((j, i), &on) in mask.indexed_iter() {
            assert_eq!(
                inside(&outlines, i as f64, j as f64),
                on,
                "pixel ({i}, {j})"
            );
        }
        assert_eq!(outlines.iter().filter(|o| o.hole).count(), 1);
        // Ring, its hole, the corner pixel, the diagonal pixel (4-connected: apart from the
        // L below it), the L, the bottom line and its end pixel.
        assert_eq!(outlines.len(), 7, "{outlines:?}");
        // Rounded to the nearest pixel, every vertex lands on a foreground pixel centre.
        for o in outlines.iter().filter(|o| !o.hole) {
            for p in &o.points {
                let (i, j) = (p[0].round() as usize, p[1].round() as usize);
                assert!(mask[[j, i]], "{p:?}");
            }
        }
    }

    #[test]
    fn empty_mask_has_no_outline() {
        assert!(trace_outlines(Array2::from_elem((4, 4), false).view()).is_empty());
    }
}
