//! What a run reports per epoch: `metrics.csv` and the training-curve PNG, both rewritten whole from
//! the checkpointed history (atomically), so a resumed run's files match an uninterrupted one's.

use std::path::Path;

use plotters::prelude::*;

use super::checkpoint::EpochRecord;
use crate::error::{Error, Result};
use crate::io::plot::{plot_err, register_font};

/// `metrics.csv`: one row per epoch; Dice columns are empty for epochs without validation.
pub fn write_metrics_csv(path: &Path, history: &[EpochRecord], classes: &[String]) -> Result<()> {
    let mut out = String::from(
        "epoch,train_loss,learning_rate,seconds,data_wait_seconds,patches_per_second,mean_dice",
    );
    for c in classes {
        out.push_str(&format!(",dice_{c}"));
    }
    out.push('\n');
    for r in history {
        out.push_str(&format!(
            "{},{:.6},{:.6e},{:.2},{:.2},{:.3},{}",
            r.epoch,
            r.train_loss,
            r.learning_rate,
            r.seconds,
            r.data_wait_seconds,
            r.patches_per_second,
            r.mean_dice().map(|d| format!("{d:.5}")).unwrap_or_default()
        ));
        for c in 0..classes.len() {
            out.push(',');
            if let Some(d) = r.validation_dice.get(c) {
                out.push_str(&format!("{d:.5}"));
            }
        }
        out.push('\n');
    }
    crate::io::write_atomically(path, out.as_bytes())
}

/// Training loss (left axis) and validation Dice per class (right axis, 0–1) against epochs.
pub fn plot_training_curve(path: &Path, history: &[EpochRecord], classes: &[String]) -> Result<()> {
    register_font();
    let tmp = path.with_extension("tmp.png");
    {
        let root = BitMapBackend::new(&tmp, (720, 420)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| plot_err(path, e))?;
        let epochs = history.last().map_or(1, |r| r.epoch).max(2) as f64;
        let max_loss = history
            .iter()
            .map(|r| r.train_loss)
            .filter(|v| v.is_finite())
            .fold(0.0f64, f64::max)
            .max(1e-3)
            * 1.05;
        let mut chart = ChartBuilder::on(&root)
            .caption("Training", ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(55)
            .right_y_label_area_size(55)
            .build_cartesian_2d(1f64..epochs, 0f64..max_loss)
            .map_err(|e| plot_err(path, e))?
            .set_secondary_coord(1f64..epochs, 0f64..1f64);
        chart
            .configure_mesh()
            .x_desc("epoch")
            .y_desc("training loss")
            .draw()
            .map_err(|e| plot_err(path, e))?;
        chart
            .configure_secondary_axes()
            .y_desc("validation Dice")
            .draw()
            .map_err(|e| plot_err(path, e))?;
        let loss: Vec<(f64, f64)> = history
            .iter()
            .map(|r| (r.epoch as f64, r.train_loss))
            .collect();
        chart
            .draw_series(LineSeries::new(loss, BLACK.stroke_width(2)))
            .map_err(|e| plot_err(path, e))?
            .label("training loss")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], BLACK));
        let palette = [RED, BLUE, GREEN, MAGENTA, CYAN];
        for (c, name) in classes.iter().enumerate().take(8) {
            let color = palette[c % palette.len()];
            let points: Vec<(f64, f64)> = history
                .iter()
                .filter_map(|r| Some((r.epoch as f64, *r.validation_dice.get(c)?)))
                .collect();
            chart
                .draw_secondary_series(LineSeries::new(points.clone(), color.stroke_width(2)))
                .map_err(|e| plot_err(path, e))?
                .label(format!("Dice {name}"))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
            chart
                .draw_secondary_series(
                    points
                        .into_iter()
                        .map(|p| Circle::new(p, 3, color.filled())),
                )
                .map_err(|e| plot_err(path, e))?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| plot_err(path, e))?;
        root.present().map_err(|e| plot_err(path, e))?;
    }
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}
