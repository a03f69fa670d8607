//! Training: losses, learning-rate schedules, checkpoints, the loop and its reports, and the
//! temperature fitted at its end ([`calibrate`]).

pub mod calibrate;
pub mod checkpoint;
pub mod curves;
pub mod ema;
pub mod loss;
pub mod schedule;
pub mod trainer;

pub use trainer::{model_config, train, TrainOptions, TrainOutcome};
