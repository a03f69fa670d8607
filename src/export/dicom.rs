//! A case's DICOM outputs: the label map as a Segmentation and as an RT Structure Set, both
//! referencing the scan's own DICOM series (or, for a NIfTI scan, a reference series on the same
//! grid).

use std::collections::BTreeMap;

use ndarray::{s, Array3};

use crate::config::{LabelCode, RoiGrouping};
use crate::error::{Error, Result};
use crate::io::derived::SourceSeries;
use crate::io::layout::{CaseOutputs, LesionTable};
use crate::io::rtstruct::{write_rtstruct, RtRoi};
use crate::io::seg::{write_seg, Algorithm, Segment};
use crate::io::ScanSource;
use crate::transforms::post::connected_components;
use crate::volume::Volume;

/// Largest affine difference (mm) between a scan and a reference series taken as the same grid.
const SAME_GRID_MM: f64 = 1e-3;

/// How the DICOM objects of every case of a batch are described.
#[derive(Debug, Clone)]
pub struct DicomExport {
    /// One per class (background left out), with its code and colour.
    pub segments: Vec<Segment>,
    /// The model that produced the masks.
    pub algorithm: Algorithm,
    /// RTSTRUCT ROIs per class or per lesion.
    pub grouping: RoiGrouping,
    /// A series for scans that are not DICOM themselves (`--reference-series`).
    pub reference: Option<SourceSeries>,
}

impl DicomExport {
    /// Describes classes `names` (background first) with `codes` where given, else
    /// [`LabelCode::default_for`]; `run` names the model's run.
    pub fn new(
        names: &[String],
        codes: &BTreeMap<String, LabelCode>,
        grouping: RoiGrouping,
        run: &str,
        reference: Option<SourceSeries>,
    ) -> Self {
        let segments = names
            .iter()
            .enumerate()
            .skip(1)
            .map(|(value, name)| {
                let label = if name.is_empty() {
                    format!("class {value}")
                } else {
                    name.clone()
                };
                Segment {
                    value: value as u8,
                    code: codes
                        .get(name)
                        .cloned()
                        .unwrap_or_else(|| LabelCode::default_for(&label, value)),
                    label,
                }
            })
            .collect();
        DicomExport {
            segments,
            algorithm: Algorithm {
                name: "medseg".into(),
                version: env!("CARGO_PKG_VERSION").into(),
                run: run.into(),
            },
            grouping,
            reference,
        }
    }

    /// The series the case's DICOM objects reference: its own when it is DICOM, else the reference
    /// series when its grid is the scan's. `Ok(None)`: there is none (the objects are skipped).
    pub fn source_for(
        &self,
        source: Option<&ScanSource>,
        scan: &Volume,
    ) -> Result<Option<SourceSeries>> {
        let series = match (source, &self.reference) {
            (Some(s @ (ScanSource::DicomSeries(_) | ScanSource::DicomFile { .. })), _) => {
                SourceSeries::read(s)?
            }
            (_, Some(reference)) => reference.clone(),
            _ => return Ok(None),
        };
        if let Some(reason) = series.misfit(&scan.geometry, SAME_GRID_MM) {
            return Err(Error::Unsupported {
                path: series.path.clone(),
                reason: format!("DICOM objects must lie on the scan's planes, but {reason}"),
            });
        }
        Ok(Some(series))
    }

    /// Writes the asked-for objects of one case; returns what the user should know.
    pub fn write(
        &self,
        outputs: &CaseOutputs,
        source: &SourceSeries,
        labels: &Array3<u8>,
        table: &LesionTable,
    ) -> Result<Vec<String>> {
        let mut notes = source.warnings.clone();
        let description = format!("medseg {}", self.algorithm.run);
        if let Some(path) = &outputs.seg {
            let summary = write_seg(
                path,
                source,
                labels.view(),
                &self.segments,
                &self.algorithm,
                &description,
            )?;
            if summary.placeholder {
                notes.push(format!(
                    "nothing segmented: the SEG holds one empty frame of segment {:?}",
                    self.segments[0].label
                ));
            }
        }
        if let Some(path) = &outputs.rtstruct {
            match self.grouping {
                RoiGrouping::Class => {
                    let rois = self.class_rois(labels);
                    write_rtstruct(path, source, labels.view(), &rois, &description)?;
                }
                RoiGrouping::Lesion => {
                    let (map, rois) = self.lesion_rois(labels, table);
                    write_rtstruct(path, source, map.view(), &rois, &description)?;
                }
            }
        }
        Ok(notes)
    }

    fn roi(&self, segment: &Segment, value: u32, name: String) -> RtRoi {
        RtRoi {
            value,
            name,
            color: segment.code.color.unwrap_or([255, 0, 0]),
            interpreted_type: if segment.code.is_anatomy() {
                "ORGAN".into()
            } else {
                String::new()
            },
        }
    }

    /// One ROI per class present; the first class when none is, so the object is never empty.
    fn class_rois(&self, labels: &Array3<u8>) -> Vec<RtRoi> {
        let mut present = [false; 256];
        labels.iter().for_each(|v| present[*v as usize] = true);
        let rois: Vec<RtRoi> = self
            .segments
            .iter()
            .filter(|s| present[s.value as usize])
            .map(|s| self.roi(s, s.value as u32, s.label.clone()))
            .collect();
        if rois.is_empty() {
            let first = &self.segments[0];
            return vec![self.roi(first, first.value as u32, first.label.clone())];
        }
        rois
    }

    /// One ROI per lesion of the table (`CLASS ID`): a map of lesion ids, each connected component
    /// matched to its table row by class, bounding box and size.
    fn lesion_rois(&self, labels: &Array3<u8>, table: &LesionTable) -> (Array3<u16>, Vec<RtRoi>) {
        let mut map = Array3::<u16>::zeros(labels.dim());
        let mut rois = Vec::new();
        for lesion in &table.lesions {
            let Some(segment) = self
                .segments
                .iter()
                .find(|s| s.value as u32 == lesion.class)
            else {
                continue;
            };
            let [lo, hi] = lesion.bbox_voxel;
            let view = labels.slice(s![lo[2]..=hi[2], lo[1]..=hi[1], lo[0]..=hi[0]]);
            let dims = [view.dim().0, view.dim().1, view.dim().2];
            let mask: Vec<bool> = view.iter().map(|v| *v as u32 == lesion.class).collect();
            let cc = connected_components(&mask, dims);
            // The component that fills the lesion's box with the lesion's voxel count.
            let boxes = cc.boxes(dims);
            let Some(id) = (0..cc.count()).find(|&c| {
                cc.sizes[c] == lesion.voxels
                    && boxes[c] == [[0, 0, 0], [dims[2] - 1, dims[1] - 1, dims[0] - 1]]
            }) else {
                continue;
            };
            let Ok(roi_value) = u16::try_from(rois.len() + 1) else {
                break;
            };
            let mut dst = map.slice_mut(s![lo[2]..=hi[2], lo[1]..=hi[1], lo[0]..=hi[0]]);
            for (d, c) in dst.iter_mut().zip(&cc.labels) {
                if *c == id as u32 + 1 {
                    *d = roi_value;
                }
            }
            rois.push(self.roi(
                segment,
                roi_value as u32,
                format!("{} {}", segment.label, lesion.id),
            ));
        }
        if rois.is_empty() {
            let first = &self.segments[0];
            rois.push(self.roi(first, u32::MAX, first.label.clone()));
        }
        (map, rois)
    }
}
