//! Inference: a checkpoint rebuilt with its preprocessing ([`predictor`]), sliding-window prediction
//! with optional mirror test-time augmentation, and post-processing of label maps into lesion
//! instances, batch segmentation ([`batch`]) and its memory budget ([`memory`]); uncertainty over
//! ensemble members ([`uncertainty`]), temperature calibration ([`calibration`]) and attention
//! maps ([`attention`]), and the findings' operating point chosen on validation
//! ([`operating_point`]).

pub mod attention;
pub mod batch;
pub mod calibration;
pub mod memory;
pub mod operating_point;
pub mod postprocess;
pub mod predictor;
pub mod sliding_window;
pub mod uncertainty;
