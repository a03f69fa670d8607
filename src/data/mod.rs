//! Datasets for training: manifests, prepared and cached cases, splits, patch sampling and batches.

pub mod batcher;
pub mod dataset;
pub mod manifest;
pub mod sampler;

pub use dataset::{build, Dataset, PreparedCase, SpatialPlan};
