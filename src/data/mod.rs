//! Datasets for training: manifests, prepared and cached cases, splits, patch sampling and batches.

pub mod batcher;
pub mod dataset;
pub mod fingerprint;
pub mod plan;
pub mod sampler;

/// Manifests are part of the on-disk contract and live in `io`; re-exported where datasets use them.
pub use crate::io::manifest;
pub use dataset::{build, Dataset, PreparedCase, SpatialPlan};
