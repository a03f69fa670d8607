//! Transforms between a scan as read and what the network sees: spatial steps that keep (and can
//! undo) the geometry, intensity normalisation, and seeded random augmentation.

pub mod augment;
pub mod intensity;
pub mod spatial;
