//! Subcommands. Exit codes: 0 success, 1 a failure (the message names the file), 2 bad usage.

mod convert;
mod evaluate;
mod inspect;
mod model;
mod plan;
mod progress;
mod segment;
mod synth;
mod train;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use medseg::eval::review::{write_review, ReviewCase, VIEWER_FILE};

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "medseg",
    version,
    about = "Lesion detection and segmentation in CT and MR scans"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Describe the volumes in a NIfTI file, a DICOM file or a directory of DICOM series.
    Inspect(inspect::Args),
    /// Write one volume (NIfTI, DICOM file or series) as NIfTI with its geometry.
    Convert(convert::Args),
    /// Print a model's layers, parameter count and multiply-adds.
    Model(model::Args),
    /// Score predicted label maps against truth: overlap, surface distances in mm, lesion-wise
    /// detection and FROC, with a report and plots.
    Evaluate(evaluate::Args),
    /// Plan a training config from a dataset's fingerprint, fitted to a time budget measured on
    /// this device (spacing, 2.5D/3D, patch, model, batch, epochs, normalisation, sampling,
    /// postprocessing), each choice with its reason.
    Plan(plan::Args),
    /// Train a model from a run config: data, preprocessing, sampling, augmentation, model,
    /// optimisation, validation and checkpoints; resumable.
    Train(train::Args),
    /// Segment scans with a trained model: masks on each scan's exact grid, lesion tables,
    /// probability maps; batches go on past bad cases, resume and split into shards.
    Segment(segment::Args),
    /// Build a lesion dataset by inserting realistic synthetic lesions into real host scans.
    Synth(synth::Args),
}

/// A usage error found after parsing (a missing or malformed argument): exit status 2, like the
/// parser's own.
#[derive(Debug)]
pub struct Usage(pub String);

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Usage {}

/// Returns a [`Usage`] error from the enclosing function.
macro_rules! usage {
    ($($arg:tt)*) => {
        return Err($crate::cli::Usage(format!($($arg)*)).into())
    };
}
pub(crate) use usage;

/// Exit statuses (documented in the README): all done; some cases failed; usage or config error;
/// nothing could be done (an unreadable input, a missing model, a run that cannot start).
pub const EXIT_SOME_FAILED: u8 = 1;
/// See [`EXIT_SOME_FAILED`].
pub const EXIT_USAGE: u8 = 2;
/// See [`EXIT_SOME_FAILED`].
pub const EXIT_NOTHING_DONE: u8 = 3;

/// A failure already reported item by item; only the exit status is left to set.
#[derive(Debug)]
pub struct Reported;

impl std::fmt::Display for Reported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("failures reported above")
    }
}

impl std::error::Error for Reported {}

pub fn run() -> ExitCode {
    // Decoder panics on malformed files are caught and reported per file by the library; one line
    // here instead of a backtrace keeps batch logs readable.
    std::panic::set_hook(Box::new(|info| {
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        eprintln!("note: internal panic{at}: {message}");
    }));
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Inspect(args) => inspect::run(args),
        Command::Convert(args) => convert::run(args),
        Command::Model(args) => model::run(args),
        Command::Evaluate(args) => evaluate::run(args),
        Command::Plan(args) => plan::run(args),
        Command::Train(args) => train::run(args),
        Command::Segment(args) => segment::run(args),
        Command::Synth(args) => synth::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is::<Reported>() => ExitCode::from(EXIT_SOME_FAILED),
        Err(e) => {
            eprintln!("error: {e:#}");
            let config = matches!(
                e.downcast_ref::<medseg::Error>(),
                Some(medseg::Error::Config { .. })
            );
            if e.is::<Usage>() || config {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::from(EXIT_NOTHING_DONE)
            }
        }
    }
}

/// The classic-script NiiVue that review pages carry: `$MEDSEG_NIIVUE` (set but empty: none), else
/// `datasets/cache/niivue/` (where `scripts/fetch-viewer.sh` puts it) under the current directory or
/// under the checkout this binary was built from; `None` when no review is `wanted`. Looked up
/// before any work, so a wrong setting stops the command at once.
fn find_viewer(wanted: bool) -> anyhow::Result<Option<PathBuf>> {
    if !wanted {
        return Ok(None);
    }
    if let Some(v) = std::env::var_os("MEDSEG_NIIVUE") {
        if v.is_empty() {
            return Ok(None);
        }
        let path = PathBuf::from(v);
        if !path.is_file() {
            usage!(
                "MEDSEG_NIIVUE={}: no such file (scripts/fetch-viewer.sh writes datasets/cache/niivue/{VIEWER_FILE})",
                path.display()
            );
        }
        return Ok(Some(path));
    }
    let under = |root: &Path| root.join("datasets/cache/niivue").join(VIEWER_FILE);
    Ok([
        under(Path::new(".")),
        under(Path::new(env!("CARGO_MANIFEST_DIR"))),
    ]
    .into_iter()
    .find(|p| p.is_file()))
}

/// `--review`: writes the review page of `cases` into `dir`, with `viewer` (from [`find_viewer`])
/// when there is one, and says where it is.
fn write_review_page(
    dir: &Path,
    cases: &[ReviewCase],
    viewer: Option<PathBuf>,
    title: &str,
    quiet: bool,
) -> anyhow::Result<()> {
    let bar = progress::bar(
        cases.len() as u64,
        "review {bar:30} {pos}/{len} {msg}",
        quiet,
    );
    let written = write_review(dir, cases, viewer.as_deref(), title, &mut |case| {
        bar.set_message(case.to_string());
        bar.inc(1);
    })
    .with_context(|| format!("review page in {}", dir.display()))?;
    bar.finish_and_clear();
    for (case, reason) in written.failed.iter().chain(&written.warnings) {
        eprintln!("warning: review of {case}: {reason}");
    }
    if !written.viewer {
        eprintln!(
            "warning: the review page has no 3D viewer (NiiVue not found): run scripts/fetch-viewer.sh, or set MEDSEG_NIIVUE to {VIEWER_FILE}; it shows the static pictures"
        );
    }
    println!("review page: {}", written.index.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// clap's own consistency checks (conflicting names, bad defaults) over every subcommand.
    #[test]
    fn cli_definition_is_consistent() {
        super::Cli::command().debug_assert();
    }
}
