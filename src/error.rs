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
    /// SeriesDescription of the first slice (for a DICOM file: its path; empty for NIfTI).
    pub description: String,
    /// Modality (`CT`, `MR`, …), or `NIfTI` / `DICOM` for a file that is not a series.
    pub modality: String,
    /// Number of slices (frames) in the stack; 0 for a NIfTI file.
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
    /// An operating-system I/O error on a file or directory.
    #[error("{path}: {source}", path = path.display())]
    Io {
        /// The file or directory being read or written.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },

    /// A file that is not a NIfTI-1/NIfTI-2 image the reader can parse.
    #[error("{path}: not a valid NIfTI file: {reason}", path = path.display())]
    InvalidNifti {
        /// The offending file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// A file that is not a DICOM object, or lacks what is needed to read it as an image.
    #[error("{path}: not a readable DICOM file: {reason}", path = path.display())]
    InvalidDicom {
        /// The offending file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// DICOM pixel data that could not be decoded (unsupported codec, corrupt stream, …).
    #[error("{path}: cannot decode pixel data (transfer syntax {transfer_syntax}): {reason}", path = path.display())]
    PixelData {
        /// The DICOM file.
        path: PathBuf,
        /// Transfer syntax UID of the file.
        transfer_syntax: String,
        /// The decoder's message.
        reason: String,
    },

    /// Input that is well formed but uses something the library does not handle.
    #[error("{path}: unsupported input: {reason}", path = path.display())]
    Unsupported {
        /// The offending file or directory.
        path: PathBuf,
        /// What is not supported.
        reason: String,
    },

    /// DICOM slices that do not form one regular grid (gaps, mixed sizes, duplicated positions, …).
    #[error("{path}: inconsistent DICOM series: {reason}", path = path.display())]
    InconsistentSeries {
        /// The series directory (or a file of it).
        path: PathBuf,
        /// What does not fit.
        reason: String,
    },

    /// No image file or series where one was expected.
    #[error("{path}: no NIfTI file or DICOM image series found{detail}", path = path.display())]
    NothingFound {
        /// The directory searched (empty when no input was given at all).
        path: PathBuf,
        /// Extra context appended to the message verbatim, starting with its own separator.
        detail: String,
    },

    /// A directory holds several series and none was chosen.
    #[error("{path}: holds {n} series; choose one with --series UID:{list}", path = path.display(), n = series.len(), list = list(series))]
    AmbiguousSeries {
        /// The directory searched.
        path: PathBuf,
        /// The series found, to choose from.
        series: Vec<SeriesChoice>,
    },

    /// The requested series is not in the directory.
    #[error("{path}: no series {uid}; available:{list}", path = path.display(), list = list(available))]
    SeriesNotFound {
        /// The directory searched.
        path: PathBuf,
        /// The UID that was asked for.
        uid: String,
        /// The series that were found instead.
        available: Vec<SeriesChoice>,
    },

    /// An output file could not be written (or its content serialised).
    #[error("{path}: cannot write: {reason}", path = path.display())]
    Write {
        /// The output file.
        path: PathBuf,
        /// Why writing failed.
        reason: String,
    },

    /// A setting that cannot work, found before any work started.
    #[error("invalid configuration: {reason}")]
    Config {
        /// Which setting, and why it cannot work.
        reason: String,
    },

    /// The compute backend failed (device set-up, reading a tensor back).
    #[error("compute backend: {reason}")]
    Backend {
        /// The backend's message.
        reason: String,
    },

    /// Training cannot go on (the loss diverged, …).
    #[error("training failed: {reason}")]
    Training {
        /// Why training stopped.
        reason: String,
    },

    /// A model checkpoint (weights, config or optimizer state) that cannot be loaded.
    #[error("{path}: cannot load checkpoint: {reason}", path = path.display())]
    Checkpoint {
        /// The checkpoint file or directory.
        path: PathBuf,
        /// Why loading failed.
        reason: String,
    },

    /// Problems found while checking a dataset, one line per case.
    #[error("{path}: {n} case(s) cannot be used:{list}", path = path.display(), n = problems.len(), list = problems.iter().map(|p| format!("\n  {p}")).collect::<String>())]
    Dataset {
        /// The dataset root.
        path: PathBuf,
        /// One message per unusable case.
        problems: Vec<String>,
    },

    /// A dataset entry that cannot be trained on (missing channel, label off the image grid …).
    #[error("case {case}: {reason}")]
    Case {
        /// The case name.
        case: String,
        /// What is wrong with it.
        reason: String,
    },
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
