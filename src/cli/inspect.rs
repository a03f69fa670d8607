//! `medseg inspect PATH [--json] [--show-phi]`

use std::path::PathBuf;

use serde_json::{json, Value};

use medseg::io::{discover, ScanSource};
use medseg::Volume;

#[derive(clap::Args)]
pub struct Args {
    /// A .nii/.nii.gz file, a DICOM file, or a directory searched recursively.
    path: PathBuf,
    /// One JSON object `{"volumes": [...]}` on stdout instead of text.
    #[arg(long)]
    json: bool,
    /// Also print patient name, ID, birth date and accession number (hidden by default).
    #[arg(long)]
    show_phi: bool,
}

fn describe(v: &Volume, show_phi: bool) -> Value {
    let (min, max) = v
        .value_range()
        .map_or((None, None), |(a, b)| (Some(a), Some(b)));
    let mut out = json!({
        "path": v.info.path,
        "kind": v.info.kind.as_str(),
        "modality": v.info.modality,
        "series_uid": v.info.series_uid,
        "series_description": v.info.series_description,
        "shape": v.shape(),
        "channels": v.channels(),
        "dtype": v.info.dtype.as_str(),
        "spacing": v.geometry.spacing(),
        "orientation": v.geometry.orientation(),
        "axis_codes": v.geometry.axis_codes(),
        "affine": v.geometry.affine,
        "min": min,
        "max": max,
        "slices": v.info.slices,
        "warnings": v.info.warnings,
    });
    if show_phi {
        out["patient"] = serde_json::to_value(&v.info.identifiers).unwrap_or(Value::Null);
    }
    out
}

fn print_text(d: &Value) {
    let s = |k: &str| match &d[k] {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    };
    let nums = |k: &str, sep: &str, prec: usize| {
        d[k].as_array()
            .map(|a| {
                a.iter()
                    .map(|x| match x.as_f64() {
                        Some(f) if x.is_f64() => format!("{f:.prec$}"),
                        _ => x.to_string(),
                    })
                    .collect::<Vec<_>>()
                    .join(sep)
            })
            .unwrap_or_default()
    };
    println!("{}", s("path"));
    println!("  kind         {}", s("kind"));
    println!("  modality     {}", s("modality"));
    if !d["series_uid"].is_null() {
        println!(
            "  series       {}  \"{}\"",
            s("series_uid"),
            s("series_description")
        );
    }
    println!("  shape        {}", nums("shape", " x ", 0));
    println!("  dtype        {}", s("dtype"));
    println!("  spacing      {} mm", nums("spacing", " x ", 4));
    if s("orientation") == "oblique" {
        println!("  orientation  oblique (closest {})", s("axis_codes"));
    } else {
        println!("  orientation  {}", s("orientation"));
    }
    if let Some(rows) = d["affine"].as_array() {
        for (r, row) in rows.iter().enumerate() {
            let vals: Vec<String> = row
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|v| format!("{:>11.4}", v.as_f64().unwrap_or(f64::NAN)))
                        .collect()
                })
                .unwrap_or_default();
            println!(
                "  {}  [{} ]",
                if r == 0 { "affine     " } else { "           " },
                vals.join("")
            );
        }
    }
    println!("  range        {} .. {}", s("min"), s("max"));
    println!("  slices       {}", s("slices"));
    let warnings = d["warnings"].as_array().cloned().unwrap_or_default();
    if warnings.is_empty() {
        println!("  warnings     none");
    }
    for w in warnings {
        println!("  warning      {}", w.as_str().unwrap_or_default());
    }
    if let Some(p) = d.get("patient") {
        println!("  patient      {p}");
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let found = discover(&args.path)?;
    let mut volumes = Vec::new();
    let mut errors = Vec::new();
    for source in &found.sources {
        match source.load() {
            Ok(v) => {
                let d = describe(&v, args.show_phi);
                if !args.json {
                    print_text(&d);
                }
                volumes.push(d);
            }
            Err(e) => {
                if !args.json {
                    eprintln!("error: {e}");
                }
                errors.push(json!({ "path": source_label(source), "error": e.to_string() }));
            }
        }
    }
    for (path, reason) in &found.unreadable {
        if !args.json {
            eprintln!(
                "error: {}: not a readable DICOM file: {reason}",
                path.display()
            );
        }
        errors.push(json!({ "path": path, "error": reason }));
    }
    let skipped: Vec<Value> = found
        .skipped
        .iter()
        .map(|(p, r)| json!({ "path": p, "reason": r }))
        .collect();
    if args.json {
        let out = json!({ "volumes": volumes, "errors": errors, "skipped": skipped });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else if !skipped.is_empty() {
        println!("{} files passed over (not DICOM images):", skipped.len());
        for s in skipped.iter().take(10) {
            println!(
                "  {}: {}",
                s["path"].as_str().unwrap_or_default(),
                s["reason"].as_str().unwrap_or_default()
            );
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        eprintln!(
            "{} of {} volumes could not be read",
            errors.len(),
            found.sources.len()
        );
        Err(super::Reported.into())
    }
}

fn source_label(s: &ScanSource) -> String {
    match s {
        ScanSource::DicomSeries(stack) => {
            format!("{} (series {})", stack.root.display(), stack.uid)
        }
        other => other.path().display().to_string(),
    }
}
