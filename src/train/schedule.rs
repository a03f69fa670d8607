//! Learning-rate schedules as pure functions of the global step, so resuming needs only the step.

use crate::config::Schedule;

/// The learning rate at `step` (0-based) of `total` steps: linear warm-up from 0 over `warmup`
/// steps, then `cosine` annealing to 0, nnU-Net's `poly` decay `(1 - t)^exponent`, or `constant`.
pub fn learning_rate(
    schedule: Schedule,
    peak: f64,
    step: usize,
    total: usize,
    warmup: usize,
    poly_exponent: f64,
) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let t = ((step - warmup) as f64 / span).clamp(0.0, 1.0);
    match schedule {
        Schedule::Cosine => peak * 0.5 * (1.0 + (std::f64::consts::PI * t).cos()),
        Schedule::Poly => peak * (1.0 - t).powf(poly_exponent),
        Schedule::Constant => peak,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warm_up_then_decay() {
        let lr = |s| learning_rate(Schedule::Cosine, 1.0, s, 110, 10, 0.9);
        assert_eq!(lr(0), 0.1);
        assert_eq!(lr(9), 1.0);
        assert_eq!(lr(10), 1.0);
        assert!((lr(60) - 0.5).abs() < 1e-12);
        assert!(lr(109) < 0.01);
        assert!(
            (learning_rate(Schedule::Poly, 1.0, 50, 100, 0, 0.9) - 0.5f64.powf(0.9)).abs() < 1e-12
        );
        assert_eq!(learning_rate(Schedule::Constant, 0.3, 99, 100, 0, 0.9), 0.3);
    }
}
