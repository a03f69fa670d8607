//! Transforms between a scan as read and what the network sees: spatial steps that keep (and can
//! undo) the geometry, intensity normalisation, the [`preprocessing::Preprocessing`] plan both
//! training and inference apply, seeded random augmentation, and label-map post-processing
//! (connected components, boxes, class decisions) shared by inference, evaluation and synthesis.

pub mod augment;
pub mod intensity;
pub mod post;
pub mod preprocessing;
pub mod spatial;
