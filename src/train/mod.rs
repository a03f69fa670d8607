//! Training: losses (and, as they land, the loop, schedules and checkpoints).

pub mod loss;
