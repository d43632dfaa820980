//! Loss curves from metrics.jsonl: training loss (blue line) and validation loss (red line
//! with points) against the step, as `loss.png` and `loss.svg`. No text is drawn (the build has
//! no font backend, offline and without system fonts); axis ranges are in `loss.json`.

use std::path::Path;

use plotters::prelude::*;

use crate::error::{Result, TrainError};

/// Reads `metrics` and writes `out/loss.png`, `out/loss.svg` and `out/loss.json` (the ranges).
pub fn loss_curves(metrics: &Path, out: &Path) -> Result<()> {
    let text = std::fs::read_to_string(metrics).map_err(TrainError::io("reading", metrics))?;
    let mut train = Vec::new();
    let mut val = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let v: serde_json::Value = serde_json::from_str(line).map_err(|source| TrainError::Json {
            path: metrics.to_path_buf(),
            line: i + 1,
            source,
        })?;
        let step = v["step"].as_f64().unwrap_or(0.0);
        if let Some(l) = v["loss"].as_f64() {
            train.push((step, l));
        }
        if let Some(l) = v["val_loss"].as_f64() {
            val.push((step, l));
        }
    }
    if train.is_empty() {
        return Ok(());
    }
    let x_max = train.iter().map(|p| p.0).fold(1.0, f64::max);
    let finite = train.iter().chain(&val).map(|p| p.1).filter(|y| y.is_finite());
    let y_max = finite.clone().fold(0.0, f64::max) * 1.05 + 1e-6;
    let y_min = finite.fold(f64::INFINITY, f64::min).min(0.0);
    {
        let path = out.join("loss.png");
        let root = BitMapBackend::new(&path, (800, 500)).into_drawing_area();
        draw(&root, &train, &val, x_max, y_min, y_max).map_err(plot_error(&path))?;
        root.present().map_err(|e| e.to_string()).map_err(plot_error(&path))?;
    }
    {
        let path = out.join("loss.svg");
        let root = SVGBackend::new(&path, (800, 500)).into_drawing_area();
        draw(&root, &train, &val, x_max, y_min, y_max).map_err(plot_error(&path))?;
        root.present().map_err(|e| e.to_string()).map_err(plot_error(&path))?;
    }
    let ranges = serde_json::json!({
        "x": "step", "x_range": [0.0, x_max], "y": "loss", "y_range": [y_min, y_max],
        "series": {"train_loss": "blue line", "val_loss": "red line with points"}
    });
    let path = out.join("loss.json");
    let text =
        serde_json::to_string_pretty(&ranges).map_err(|source| TrainError::Encode { path: path.clone(), source })?;
    std::fs::write(&path, text).map_err(TrainError::io("writing", path))?;
    Ok(())
}

/// For `map_err`: a drawing failure, named by the image it was drawing.
fn plot_error(path: &Path) -> impl FnOnce(String) -> TrainError + '_ {
    move |message| TrainError::Plot(format!("drawing {}: {message}", path.display()))
}

fn draw<DB: DrawingBackend>(
    root: &DrawingArea<DB, plotters::coord::Shift>,
    train: &[(f64, f64)],
    val: &[(f64, f64)],
    x_max: f64,
    y_min: f64,
    y_max: f64,
) -> Result<(), String> {
    root.fill(&WHITE).map_err(|e| format!("{e:?}"))?;
    let area = root.margin(20, 20, 20, 20);
    let mut chart =
        ChartBuilder::on(&area).build_cartesian_2d(0.0..x_max, y_min..y_max).map_err(|e| format!("{e:?}"))?;
    let (w, h) = area.dim_in_pixel();
    area.draw(&Rectangle::new([(0, 0), (w as i32 - 1, h as i32 - 1)], BLACK.stroke_width(1)))
        .map_err(|e| format!("{e:?}"))?;
    chart.draw_series(LineSeries::new(train.iter().copied(), BLUE.stroke_width(2))).map_err(|e| format!("{e:?}"))?;
    if !val.is_empty() {
        chart.draw_series(LineSeries::new(val.iter().copied(), RED.stroke_width(2))).map_err(|e| format!("{e:?}"))?;
        chart.draw_series(val.iter().map(|&p| Circle::new(p, 4, RED.filled()))).map_err(|e| format!("{e:?}"))?;
    }
    Ok(())
}
