//! Inference: a checkpoint rebuilt with its preprocessing ([`predictor`]), sliding-window prediction
//! with optional mirror test-time augmentation, and post-processing of label maps into lesion
//! instances, and batch segmentation ([`batch`]).

pub mod batch;
pub mod postprocess;
pub mod predictor;
pub mod sliding_window;
