//! Inference: (as they land) sliding-window prediction and test-time augmentation; post-processing
//! of label maps into lesion instances.

pub mod postprocess;
pub mod sliding_window;
