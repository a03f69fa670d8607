//! Dataset manifests: the Medical Segmentation Decathlon / nnU-Net layout (`dataset.json`,
//! `imagesTr/CASE_0000.nii.gz`, `labelsTr/CASE.nii.gz`) and plain CSV files.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::io::layout::{
    case_name_with, file_stem, sanitize_name, DatasetJson, IMAGES_TRAIN, LABELS_TRAIN,
};

/// One case: its image file(s) (each a NIfTI file, DICOM file or DICOM series directory; a file may
/// hold several channels) and its label map.
#[derive(Debug, Clone, PartialEq)]
pub struct CaseEntry {
    /// Case name, made safe for file names: from the label file's name or the CSV `case` column.
    pub id: String,
    /// Image sources in channel order (nnU-Net: `CASE_0000`, `CASE_0001`, …).
    pub images: Vec<PathBuf>,
    /// Label map; `None` for a CSV without a `label` column.
    pub label: Option<PathBuf>,
    /// The case's group (patient, host, site): `dataset.json`'s `group` or the CSV's `group`
    /// column. Cross-validation keeps a group in one fold.
    pub group: Option<String>,
}

/// What a manifest declares.
#[derive(Debug, Clone, Default)]
pub struct Manifest {
    /// Labelled cases.
    pub cases: Vec<CaseEntry>,
    /// Channel (modality) names, when the manifest declares them.
    pub channels: Vec<String>,
    /// Class names by label value, when the manifest declares them.
    pub labels: Vec<String>,
}

fn invalid(path: &Path, reason: impl Into<String>) -> Error {
    Error::Unsupported {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Reads `root/dataset.json`. Both dialects are understood:
/// - Decathlon (v1): `modality` and `labels` as `{"0": name}`, cases in `training` (an image may be
///   one 4D multi-channel file);
/// - nnU-Net v2: `channel_names`, `labels` as `{name: value}`, `file_ending`, cases found as
///   `imagesTr/CASE_XXXX{file_ending}`.
pub fn read_decathlon(root: &Path) -> Result<Manifest> {
    let path = DatasetJson::path(root);
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let json: DatasetJson = serde_json::from_str(&text)
        .map_err(|e| invalid(&path, format!("not a dataset.json: {e}")))?;
    let channels = json.channel_names();
    let labels = json.label_names(&path)?;
    let ending = json
        .file_ending
        .clone()
        .unwrap_or_else(|| ".nii.gz".to_string());
    let n_channels = channels.len().max(1);
    let mut cases = Vec::new();
    if let Some(list) = &json.training {
        for item in list {
            let image = root.join(&item.image);
            let label = root.join(&item.label);
            let id = case_name_with(&label, &ending);
            let images = if image.exists() {
                vec![image]
            } else {
                // nnU-Net names one file per channel: CASE_0000, CASE_0001, …
                let stem = file_stem(&label, &ending);
                channel_files(&root.join(IMAGES_TRAIN), &stem, n_channels, &ending)
            };
            cases.push(CaseEntry {
                id,
                images,
                label: Some(label),
                group: item.group.clone(),
            });
        }
    } else {
        let dir = root.join(IMAGES_TRAIN);
        let suffix = format!("_0000{ending}");
        let mut ids: Vec<String> = std::fs::read_dir(&dir)
            .map_err(|e| Error::io(&dir, e))?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().to_string();
                name.strip_suffix(&suffix).map(str::to_string)
            })
            .collect();
        ids.sort();
        for stem in ids {
            cases.push(CaseEntry {
                images: channel_files(&dir, &stem, n_channels, &ending),
                label: Some(root.join(LABELS_TRAIN).join(format!("{stem}{ending}"))),
                id: sanitize_name(&stem),
                group: None,
            });
        }
    }
    if cases.is_empty() {
        return Err(invalid(
            &path,
            "no training cases listed or found in imagesTr/",
        ));
    }
    Ok(Manifest {
        cases,
        channels,
        labels,
    })
}

fn channel_files(dir: &Path, id: &str, channels: usize, ending: &str) -> Vec<PathBuf> {
    (0..channels)
        .map(|c| dir.join(format!("{id}_{c:04}{ending}")))
        .collect()
}

/// Reads a CSV manifest: a header `case,image[,image2...],label` (the label column may be left
/// out for unlabelled data), one case per line; `#` starts a comment line. Relative paths are
/// resolved against `root`. A column named `group` (anywhere after `case`) is the case's group,
/// not an image.
pub fn read_csv(path: &Path, root: &Path) -> Result<Manifest> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut lines = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty() && !l.trim_start().starts_with('#'));
    let (_, header) = lines
        .next()
        .ok_or_else(|| invalid(path, "empty manifest"))?;
    let mut columns: Vec<&str> = header.split(',').map(str::trim).collect();
    let group_column = columns
        .iter()
        .position(|c| *c == "group")
        .filter(|&i| i > 0);
    let width = columns.len();
    if let Some(i) = group_column {
        columns.remove(i);
    }
    if columns.first() != Some(&"case") || columns.len() < 2 {
        return Err(invalid(
            path,
            format!("the header must be case,image[,image2...][,label], not {header:?}"),
        ));
    }
    let has_label = columns.last() == Some(&"label");
    let image_columns = columns.len() - 1 - has_label as usize;
    if image_columns == 0 {
        return Err(invalid(path, "the header names no image column"));
    }
    let mut cases = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (n, line) in lines {
        let mut fields: Vec<&str> = line.split(',').map(str::trim).collect();
        if fields.len() != width {
            return Err(invalid(
                path,
                format!(
                    "line {}: {} fields, the header has {}",
                    n + 1,
                    fields.len(),
                    width
                ),
            ));
        }
        let group = group_column
            .map(|i| fields.remove(i).to_string())
            .filter(|g| !g.is_empty());
        // Ids name output files: the one naming rule, so `case 1` is `case_1` everywhere.
        let id = sanitize_name(fields[0]);
        if id.is_empty() || !seen.insert(id.clone()) {
            return Err(invalid(
                path,
                format!("line {}: case id {id:?} is empty or repeated", n + 1),
            ));
        }
        cases.push(CaseEntry {
            images: fields[1..=image_columns]
                .iter()
                .map(|f| root.join(f))
                .collect(),
            label: has_label.then(|| root.join(fields[columns.len() - 1])),
            id,
            group,
        });
    }
    if cases.is_empty() {
        return Err(invalid(path, "the manifest lists no case"));
    }
    Ok(Manifest {
        cases,
        channels: Vec::new(),
        labels: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_both_decathlon_dialects() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("imagesTr")).unwrap();
        std::fs::write(
            root.join("dataset.json"),
            r#"{"modality": {"0": "CT"}, "labels": {"0": "background", "1": "liver"},
                "training": [{"image": "./imagesTr/liver_1.nii.gz", "label": "./labelsTr/liver_1.nii.gz"}]}"#,
        )
        .unwrap();
        let m = read_decathlon(root).unwrap();
        assert_eq!(m.channels, vec!["CT"]);
        assert_eq!(m.labels, vec!["background", "liver"]);
        assert_eq!(m.cases[0].id, "liver_1");
        // The listed 4D file does not exist, so nnU-Net's per-channel name is used.
        assert_eq!(
            m.cases[0].images,
            vec![root.join("imagesTr/liver_1_0000.nii.gz")]
        );

        std::fs::write(
            root.join("dataset.json"),
            r#"{"channel_names": {"0": "T1", "1": "FLAIR"}, "labels": {"background": 0, "lesion": 1},
                "file_ending": ".nii.gz", "numTraining": 1}"#,
        )
        .unwrap();
        std::fs::write(root.join("imagesTr/b_7_0000.nii.gz"), b"").unwrap();
        std::fs::write(root.join("imagesTr/b_7_0001.nii.gz"), b"").unwrap();
        let m = read_decathlon(root).unwrap();
        assert_eq!(m.labels, vec!["background", "lesion"]);
        assert_eq!(m.cases.len(), 1);
        assert_eq!(m.cases[0].images.len(), 2);
        assert_eq!(m.cases[0].label, Some(root.join("labelsTr/b_7.nii.gz")));
    }

    #[test]
    fn csv_errors_name_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.csv");
        std::fs::write(
            &path,
            "case,image,label\na,a.nii.gz,a_seg.nii.gz\nb,b.nii.gz\n",
        )
        .unwrap();
        let e = read_csv(&path, dir.path()).unwrap_err().to_string();
        assert!(e.contains("m.csv") && e.contains("line 3"), "{e}");
        std::fs::write(
            &path,
            "# comment\ncase,t1,flair,label\na,x/t1.nii,x/fl.nii,x/l.nii\n",
        )
        .unwrap();
        let m = read_csv(&path, Path::new("/data")).unwrap();
        assert_eq!(
            m.cases[0].images,
            vec![
                PathBuf::from("/data/x/t1.nii"),
                PathBuf::from("/data/x/fl.nii")
            ]
        );
    }

    #[test]
    fn a_group_column_is_the_case_group_not_an_image() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.csv");
        std::fs::write(
            &path,
            "case,group,image,label\na,p1,a.nii,a_l.nii\nb,,b.nii,b_l.nii\n",
        )
        .unwrap();
        let m = read_csv(&path, Path::new("/d")).unwrap();
        assert_eq!(m.cases[0].images, vec![PathBuf::from("/d/a.nii")]);
        assert_eq!(m.cases[0].label, Some(PathBuf::from("/d/a_l.nii")));
        assert_eq!(m.cases[0].group.as_deref(), Some("p1"));
        assert_eq!(m.cases[1].group, None);
    }
}
