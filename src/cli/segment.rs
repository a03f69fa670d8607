//! `medseg segment --model RUN_OR_CHECKPOINT INPUT... --output DIR [--tta] [--save-probabilities]
//! [--overlay] [--skip-existing] [--shard I/N] [--device NAME] [--set segment.key=value] [--list]`

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::mpsc::sync_channel;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::json;
use sha2::{Digest, Sha256};

use medseg::data::manifest;
use medseg::export::{dicom_case_name, nifti_case_name, sanitize_name, write_case, CaseOutputs};
use medseg::infer::predictor::Predictor;
use medseg::io::{discover, ScanSource};
use medseg::Volume;

use super::Reported;

#[derive(clap::Args)]
pub struct Args {
    /// A run directory (its best, else last, checkpoint) or a checkpoint directory.
    #[arg(long)]
    model: PathBuf,
    /// NIfTI files, DICOM files, DICOM series directories, directories searched recursively, or
    /// CSV manifests (`case,image[,image2...]`, paths relative to the manifest).
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
    /// Where masks, lesion tables and the batch summary go.
    #[arg(long)]
    output: PathBuf,
    /// Mirror test-time augmentation over the spatial axes (4 passes in 2D, 8 in 3D).
    #[arg(long)]
    tta: bool,
    /// Also write the foreground probability map (float32) on each scan's grid.
    #[arg(long)]
    save_probabilities: bool,
    /// Also write a PNG montage of the mask on the scan.
    #[arg(long)]
    overlay: bool,
    /// Skip cases whose outputs all exist (resume an interrupted batch).
    #[arg(long)]
    skip_existing: bool,
    /// Do only shard I of N (0-based, I < N): every case belongs to exactly one shard, by a hash of
    /// its output name, so N machines given the same inputs split them with no coordinator.
    #[arg(long, value_name = "I/N")]
    shard: Option<String>,
    /// cpu, wgpu or cuda; default: the device the model was trained on.
    #[arg(long)]
    device: Option<String>,
    /// Change an inference setting saved with the model, e.g. `--set segment.min_lesion_mm3=30`.
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    set: Vec<String>,
    /// Print the cases this invocation (and shard) would segment, then exit.
    #[arg(long)]
    list: bool,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

enum Input {
    Source(ScanSource),
    Channels(Vec<PathBuf>),
    /// The input could not even be listed; the reason is reported as this case's failure.
    Unreadable(String),
}

struct Case {
    name: String,
    origin: String,
    input: Input,
}

fn source_name(source: &ScanSource) -> String {
    match source {
        ScanSource::Nifti(p) => nifti_case_name(p),
        ScanSource::DicomSeries(_) => {
            let c = source.choice();
            dicom_case_name(&c.description, &c.uid)
        }
        ScanSource::DicomFile { label, .. } => dicom_case_name("", label),
    }
}

/// Expands the inputs into named cases, in input order; names are made unique with `-2`, `-3`.
fn expand(inputs: &[PathBuf]) -> Vec<Case> {
    let mut cases = Vec::new();
    for path in inputs {
        let origin = path.display().to_string();
        if path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("csv"))
        {
            let root = path.parent().unwrap_or(Path::new("."));
            match manifest::read_csv(path, root) {
                Ok(m) => cases.extend(m.cases.into_iter().map(|c| Case {
                    name: sanitize_name(&c.id),
                    origin: format!("{origin}: {}", c.id),
                    input: Input::Channels(c.images),
                })),
                Err(e) => cases.push(Case {
                    name: nifti_case_name(path),
                    origin,
                    input: Input::Unreadable(e.to_string()),
                }),
            }
            continue;
        }
        match discover(path) {
            Ok(d) => {
                for source in d.sources {
                    cases.push(Case {
                        name: source_name(&source),
                        origin: source.path().display().to_string(),
                        input: Input::Source(source),
                    });
                }
            }
            Err(e) => cases.push(Case {
                name: nifti_case_name(path),
                origin,
                input: Input::Unreadable(e.to_string()),
            }),
        }
    }
    let mut seen = HashSet::new();
    for case in &mut cases {
        let base = case.name.clone();
        let mut n = 1;
        while !seen.insert(case.name.clone()) {
            n += 1;
            case.name = format!("{base}-{n}");
        }
    }
    cases
}

/// `I/N` → (I, N).
fn parse_shard(text: &str) -> anyhow::Result<(u64, u64)> {
    let (i, n) = text
        .split_once('/')
        .ok_or_else(|| anyhow::anyhow!("--shard {text:?}: expected I/N, e.g. 0/4"))?;
    let (i, n): (u64, u64) = (i.trim().parse()?, n.trim().parse()?);
    if n == 0 || i >= n {
        anyhow::bail!("--shard {text:?}: need 0 <= I < N");
    }
    Ok((i, n))
}

/// The shard a case belongs to: a hash of its name, so every machine agrees.
fn shard_of(name: &str, shards: u64) -> u64 {
    let h = Sha256::digest(name.as_bytes());
    u64::from_le_bytes(h[..8].try_into().expect("8 bytes")) % shards
}

fn load(case: &Case) -> medseg::Result<Volume> {
    match &case.input {
        Input::Source(s) => s.load(),
        Input::Channels(paths) => medseg::io::read_channels(paths, 1e-3),
        Input::Unreadable(reason) => Err(medseg::Error::Unsupported {
            path: PathBuf::from(&case.origin),
            reason: reason.clone(),
        }),
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let mut cases = expand(&args.inputs);
    let total = cases.len();
    if let Some(shard) = &args.shard {
        let (i, n) = parse_shard(shard)?;
        cases.retain(|c| shard_of(&c.name, n) == i);
    }
    if args.list {
        for c in &cases {
            println!("{}\t{}", c.name, c.origin);
        }
        return Ok(());
    }
    let mut overrides = args.set.clone();
    if args.tta {
        overrides.push("segment.tta=true".into());
    }
    let predictor = Predictor::load(&args.model, args.device.as_deref(), &overrides)?;
    let filter = predictor.lesion_filter()?;
    std::fs::create_dir_all(&args.output).map_err(|e| medseg::Error::io(&args.output, e))?;

    let outputs =
        |name: &str| CaseOutputs::new(&args.output, name, args.save_probabilities, args.overlay);
    let mut records = Vec::new();
    let (todo, done): (Vec<Case>, Vec<Case>) = cases
        .into_iter()
        .partition(|c| !(args.skip_existing && outputs(&c.name).complete()));
    for c in &done {
        records.push(json!({"case": c.name, "input": c.origin, "status": "skipped"}));
    }

    let bar = ProgressBar::with_draw_target(
        Some(todo.len() as u64),
        if args.quiet {
            ProgressDrawTarget::hidden()
        } else {
            ProgressDrawTarget::stderr()
        },
    );
    bar.set_style(
        ProgressStyle::with_template("segment [{bar:30}] {pos}/{len} {msg} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let say = |line: String| {
        // A hidden bar (--quiet, or stderr not a terminal) would swallow println.
        if args.quiet || bar.is_hidden() {
            eprintln!("{line}");
        } else {
            bar.println(line);
        }
    };

    // Reading the next scan overlaps segmenting the current one.
    let (tx, rx) = sync_channel::<(usize, medseg::Result<Volume>)>(1);
    let names: Vec<(String, String)> = todo
        .iter()
        .map(|c| (c.name.clone(), c.origin.clone()))
        .collect();
    let reader = std::thread::spawn(move || {
        for (n, case) in todo.iter().enumerate() {
            if tx.send((n, load(case))).is_err() {
                break;
            }
        }
    });
    let mut failed = Vec::new();
    let mut segmented = 0;
    loop {
        let waited = Instant::now();
        let Ok((n, scan)) = rx.recv() else {
            break;
        };
        let (name, origin) = &names[n];
        bar.set_message(name.clone());
        let started = waited;
        let mut stages = serde_json::Map::new();
        let mut lap = waited;
        let mut stage = |name: &str| {
            stages.insert(
                name.into(),
                json!((lap.elapsed().as_secs_f64() * 100.0).round() / 100.0),
            );
            lap = Instant::now();
        };
        let result = scan.and_then(|scan| {
            stage("wait_for_read");
            let mut prediction = predictor.predict(&scan)?;
            stage("predict");
            let lesions = prediction.lesions(&predictor.labels, &filter);
            stage("lesions");
            let probabilities = args
                .save_probabilities
                .then(|| prediction.foreground_probability());
            write_case(
                &outputs(name),
                name,
                &scan,
                &prediction.labels,
                probabilities.as_ref(),
                &lesions,
                &predictor.labels,
            )?;
            stage("write");
            Ok(lesions.len())
        });
        let seconds = started.elapsed().as_secs_f64();
        match result {
            Ok(lesions) => {
                segmented += 1;
                say(format!("{name}: {lesions} lesion(s), {seconds:.1} s"));
                records.push(json!({"case": name, "input": origin, "status": "segmented", "lesions": lesions, "seconds": seconds, "stages": stages}));
            }
            Err(e) => {
                say(format!("{name}: FAILED: {e}"));
                records.push(json!({"case": name, "input": origin, "status": "failed", "reason": e.to_string()}));
                failed.push((name.clone(), e.to_string()));
            }
        }
        bar.inc(1);
    }
    let _ = reader.join();
    bar.finish_and_clear();

    let summary_name = match &args.shard {
        Some(s) => {
            let (i, n) = parse_shard(s)?;
            format!("batch_summary_shard-{i}-of-{n}.json")
        }
        None => "batch_summary.json".into(),
    };
    let summary = json!({
        "inputs": total,
        "segmented": segmented,
        "skipped": done.len(),
        "failed": failed.len(),
        "cases": records,
    });
    medseg::io::nifti::write_atomically(
        &args.output.join(&summary_name),
        &serde_json::to_vec_pretty(&summary)?,
    )?;
    println!(
        "segmented {segmented}, skipped {} (already done), failed {} — outputs in {}",
        done.len(),
        failed.len(),
        args.output.display()
    );
    if failed.is_empty() {
        Ok(())
    } else {
        for (name, reason) in &failed {
            eprintln!("failed: {name}: {reason}");
        }
        Err(Reported.into())
    }
}
