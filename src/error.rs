//! The library's error type. Every variant names the file (or directory) it concerns, so a batch log
//! line is enough to find the culprit.

use std::path::PathBuf;

/// Result alias used throughout the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// One series found while scanning a directory, as listed when a choice is needed.
#[derive(Debug, Clone, PartialEq)]
pub struct SeriesChoice {
    /// SeriesInstanceUID, possibly with a `#N` suffix when one UID was split into several stacks.
    pub uid: String,
    pub description: String,
    pub modality: String,
    pub slices: usize,
}

impl std::fmt::Display for SeriesChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({} {} slices, \"{}\")",
            self.uid, self.modality, self.slices, self.description
        )
    }
}

fn list(series: &[SeriesChoice]) -> String {
    series
        .iter()
        .map(|s| format!("\n  {s}"))
        .collect::<String>()
}

/// Everything the library can fail with; each variant names the file, case or setting.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("{path}: {source}", path = path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{path}: not a valid NIfTI file: {reason}", path = path.display())]
    InvalidNifti { path: PathBuf, reason: String },

    #[error("{path}: not a readable DICOM file: {reason}", path = path.display())]
    InvalidDicom { path: PathBuf, reason: String },

    #[error("{path}: cannot decode pixel data (transfer syntax {transfer_syntax}): {reason}", path = path.display())]
    PixelData {
        path: PathBuf,
        transfer_syntax: String,
        reason: String,
    },

    #[error("{path}: unsupported input: {reason}", path = path.display())]
    Unsupported { path: PathBuf, reason: String },

    #[error("{path}: inconsistent DICOM series: {reason}", path = path.display())]
    InconsistentSeries { path: PathBuf, reason: String },

    #[error("{path}: no NIfTI file or DICOM image series found{detail}", path = path.display())]
    NothingFound { path: PathBuf, detail: String },

    #[error("{path}: holds {n} series; choose one with --series UID:{list}", path = path.display(), n = series.len(), list = list(series))]
    AmbiguousSeries {
        path: PathBuf,
        series: Vec<SeriesChoice>,
    },

    #[error("{path}: no series {uid}; available:{list}", path = path.display(), list = list(available))]
    SeriesNotFound {
        path: PathBuf,
        uid: String,
        available: Vec<SeriesChoice>,
    },

    #[error("{path}: cannot write: {reason}", path = path.display())]
    Write { path: PathBuf, reason: String },

    /// A setting that cannot work, found before any work started.
    #[error("invalid configuration: {reason}")]
    Config { reason: String },

    /// The compute backend failed (device set-up, reading a tensor back).
    #[error("compute backend: {reason}")]
    Backend { reason: String },

    /// Training cannot go on (the loss diverged, …).
    #[error("training failed: {reason}")]
    Training { reason: String },

    #[error("{path}: cannot load checkpoint: {reason}", path = path.display())]
    Checkpoint { path: PathBuf, reason: String },

    /// Problems found while checking a dataset, one line per case.
    #[error("{path}: {n} case(s) cannot be used:{list}", path = path.display(), n = problems.len(), list = problems.iter().map(|p| format!("\n  {p}")).collect::<String>())]
    Dataset {
        path: PathBuf,
        problems: Vec<String>,
    },

    /// A dataset entry that cannot be trained on (missing channel, label off the image grid …).
    #[error("case {case}: {reason}")]
    Case { case: String, reason: String },
}

impl Error {
    /// Wraps an `std::io::Error` with the path it happened on.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// The file or directory the error concerns, when it concerns one.
    pub fn path(&self) -> Option<&std::path::Path> {
        Some(match self {
            Error::Io { path, .. }
            | Error::InvalidNifti { path, .. }
            | Error::InvalidDicom { path, .. }
            | Error::PixelData { path, .. }
            | Error::Unsupported { path, .. }
            | Error::InconsistentSeries { path, .. }
            | Error::NothingFound { path, .. }
            | Error::AmbiguousSeries { path, .. }
            | Error::SeriesNotFound { path, .. }
            | Error::Write { path, .. }
            | Error::Checkpoint { path, .. }
            | Error::Dataset { path, .. } => path,
            Error::Config { .. }
            | Error::Backend { .. }
            | Error::Training { .. }
            | Error::Case { .. } => return None,
        })
    }
}
