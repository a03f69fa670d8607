//! Batch segmentation: inputs expanded into named cases, deduplicated, split into shards, resumed
//! past finished cases, read one case ahead of the model, and summarised. Progress is reported
//! through events; drawing it is the caller's business.
//!
//! What is done to each case (predict, measure, write) is the caller's `segment` function, so the
//! batch logic sits below the writers that use it.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::mpsc::sync_channel;
use std::time::Instant;

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::io::layout::{
    case_name, case_name_with, dicom_case_name, sanitize_name, BatchCase, BatchSummary, CaseMemory,
    CaseStatus,
};
use crate::io::{discover, manifest, ScanSource};
use crate::volume::Volume;

/// Where a case's voxels come from.
#[derive(Debug, Clone)]
pub enum CaseInput {
    /// A volume found in a file or directory.
    Source(ScanSource),
    /// One file per channel (a CSV manifest row).
    Channels(Vec<PathBuf>),
    /// The input could not even be listed; the reason is reported as this case's failure.
    Unreadable(String),
}

/// One case of a batch.
#[derive(Debug, Clone)]
pub struct BatchInput {
    /// The unique output name.
    pub name: String,
    /// Where it came from, for messages and the summary.
    pub origin: String,
    /// How to read it.
    pub input: CaseInput,
}

impl BatchInput {
    /// The case's scan when it is one source (not channels from several files).
    pub fn source(&self) -> Option<&ScanSource> {
        match &self.input {
            CaseInput::Source(s) => Some(s),
            _ => None,
        }
    }

    /// Whether the case is read from DICOM (so DICOM objects can reference it).
    pub fn is_dicom(&self) -> bool {
        self.source()
            .is_some_and(|s| !matches!(s, ScanSource::Nifti(_)))
    }

    /// What reading the case holds at its peak, from its headers (see
    /// [`ScanSource::read_bytes`]); `None` when a header cannot be read.
    pub fn read_bytes(&self) -> Option<u64> {
        match &self.input {
            CaseInput::Source(s) => s.read_bytes(),
            // Each channel is read as a scan, then all are copied into one volume.
            CaseInput::Channels(paths) => paths.iter().try_fold(0u64, |sum, p| {
                let (voxels, read) = crate::io::nifti_read_bytes(p)?;
                sum.checked_add(read.checked_add(voxels.checked_mul(4)?)?)
            }),
            CaseInput::Unreadable(_) => None,
        }
    }

    /// Decodes the case's volume, refusing first, from its headers, one whose reading would
    /// hold more than `limit` bytes.
    pub fn load_within(&self, limit: Option<u64>) -> Result<Volume> {
        if let (Some(limit), Some(needed)) = (limit, self.read_bytes()) {
            if needed > limit {
                return Err(Error::Unsupported {
                    path: PathBuf::from(&self.origin),
                    reason: format!(
                        "reading it needs about {} (its stored values and their float32 copy), more than the {} that --max-memory leaves beside the model",
                        crate::infer::memory::human(needed),
                        crate::infer::memory::human(limit)
                    ),
                });
            }
        }
        self.load()
    }

    /// Decodes the case's volume.
    pub fn load(&self) -> Result<Volume> {
        match &self.input {
            CaseInput::Source(s) => s.load(),
            CaseInput::Channels(paths) => crate::io::read_channels(paths, 1e-3),
            CaseInput::Unreadable(reason) => Err(Error::Unsupported {
                path: PathBuf::from(&self.origin),
                reason: reason.clone(),
            }),
        }
    }
}

/// Shard `index` of `count`: every case belongs to exactly one, by a hash of its output name, so
/// machines given the same inputs split them with no coordinator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// 0-based, below `count`.
    pub index: u64,
    /// How many shards.
    pub count: u64,
}

impl std::str::FromStr for Shard {
    type Err = Error;

    /// `I/N`, `0 <= I < N`; or `auto` / `auto/N`: from the batch scheduler's environment (see
    /// [`Shard::from_env`]).
    fn from_str(text: &str) -> Result<Self> {
        if let Some(rest) = text.strip_prefix("auto") {
            let count = match rest.strip_prefix('/') {
                Some(n) => Some(n.trim().parse::<u64>().map_err(|_| Error::Config {
                    reason: format!("--shard {text:?}: expected auto or auto/N"),
                })?),
                None if rest.is_empty() => None,
                None => {
                    return Err(Error::Config {
                        reason: format!("--shard {text:?}: expected auto or auto/N"),
                    })
                }
            };
            return Shard::from_env(count, &|key| std::env::var(key).ok());
        }
        let bad = || Error::Config {
            reason: format!("--shard {text:?}: expected I/N with 0 <= I < N, e.g. 0/4"),
        };
        let (i, n) = text.split_once('/').ok_or_else(bad)?;
        let (index, count): (u64, u64) = (
            i.trim().parse().map_err(|_| bad())?,
            n.trim().parse().map_err(|_| bad())?,
        );
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(Shard { index, count })
    }
}

impl Shard {
    /// The shard of an array job, from its scheduler's environment (`env(name)`):
    /// - Slurm arrays: `SLURM_ARRAY_TASK_ID` less `SLURM_ARRAY_TASK_MIN` (arrays may start at
    ///   1), of `SLURM_ARRAY_TASK_COUNT` (or `count`);
    /// - Kubernetes indexed Jobs: `JOB_COMPLETION_INDEX`, of `count` (the Job's `completions`);
    /// - AWS Batch array jobs: `AWS_BATCH_JOB_ARRAY_INDEX`, of `count` (the array size).
    ///
    /// An error names the variables looked for when none is set, or what is missing or wrong.
    pub fn from_env(count: Option<u64>, env: &dyn Fn(&str) -> Option<String>) -> Result<Shard> {
        let number = |key: &str| -> Result<Option<u64>> {
            env(key)
                .map(|v| {
                    v.trim().parse::<u64>().map_err(|_| Error::Config {
                        reason: format!("--shard auto: {key}={v:?} is not a whole number"),
                    })
                })
                .transpose()
        };
        let (source, index, found_count) = if let Some(id) = number("SLURM_ARRAY_TASK_ID")? {
            let min = number("SLURM_ARRAY_TASK_MIN")?.unwrap_or(0);
            let index = id.checked_sub(min).ok_or_else(|| Error::Config {
                reason: format!(
                    "--shard auto: SLURM_ARRAY_TASK_ID {id} is below SLURM_ARRAY_TASK_MIN {min}"
                ),
            })?;
            (
                "SLURM_ARRAY_TASK_ID",
                index,
                number("SLURM_ARRAY_TASK_COUNT")?,
            )
        } else if let Some(index) = number("JOB_COMPLETION_INDEX")? {
            ("JOB_COMPLETION_INDEX", index, None)
        } else if let Some(index) = number("AWS_BATCH_JOB_ARRAY_INDEX")? {
            ("AWS_BATCH_JOB_ARRAY_INDEX", index, None)
        } else {
            return Err(Error::Config {
                reason: "--shard auto: none of SLURM_ARRAY_TASK_ID (Slurm arrays), JOB_COMPLETION_INDEX (Kubernetes indexed Jobs) or AWS_BATCH_JOB_ARRAY_INDEX (AWS Batch arrays) is set; give --shard I/N".into(),
            });
        };
        let count = count.or(found_count).ok_or_else(|| Error::Config {
            reason: format!(
                "--shard auto: {source} gives the index but not the shard count; use --shard auto/N"
            ),
        })?;
        if count == 0 || index >= count {
            return Err(Error::Config {
                reason: format!(
                    "--shard auto: index {index} (from {source}) is not below the count {count}"
                ),
            });
        }
        Ok(Shard { index, count })
    }

    /// Whether case `name` belongs to this shard.
    pub fn holds(&self, name: &str) -> bool {
        let h = Sha256::digest(name.as_bytes());
        let mut first = [0u8; 8];
        first.copy_from_slice(&h[..8]);
        u64::from_le_bytes(first) % self.count == self.index
    }
}

fn source_name(source: &ScanSource) -> String {
    match source {
        ScanSource::Nifti(p) => case_name(p),
        ScanSource::DicomSeries(_) => {
            let c = source.choice();
            dicom_case_name(&c.description, &c.uid)
        }
        ScanSource::DicomFile { label, .. } => dicom_case_name("", label),
    }
}

/// Expands NIfTI files, DICOM files, series directories, directories searched recursively and
/// CSV manifests (`case,image[,image2...]`) into named cases, in input order; repeated names are
/// made unique with `-2`, `-3`. An input that cannot be listed becomes a failing case.
pub fn expand(inputs: &[PathBuf]) -> Vec<BatchInput> {
    let mut cases = Vec::new();
    for path in inputs {
        let origin = path.display().to_string();
        let unreadable = |e: Error| BatchInput {
            name: case_name(path),
            origin: origin.clone(),
            input: CaseInput::Unreadable(e.to_string()),
        };
        if path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("csv"))
        {
            let root = path.parent().unwrap_or(Path::new("."));
            match manifest::read_csv(path, root) {
                Ok(m) => cases.extend(m.cases.into_iter().map(|c| BatchInput {
                    name: sanitize_name(&c.id),
                    origin: format!("{origin}: {}", c.id),
                    input: CaseInput::Channels(c.images),
                })),
                Err(e) => cases.push(unreadable(e)),
            }
            continue;
        }
        match discover(path) {
            Ok(d) => {
                cases.extend(d.sources.into_iter().map(|source| BatchInput {
                    name: source_name(&source),
                    origin: source.path().display().to_string(),
                    input: CaseInput::Source(source),
                }));
                // Corrupt DICOM files are failed cases, reported with their reason.
                cases.extend(d.unreadable.into_iter().map(|(file, reason)| BatchInput {
                    name: case_name_with(&file, ".dcm"),
                    origin: file.display().to_string(),
                    input: CaseInput::Unreadable(format!("not a readable DICOM file: {reason}")),
                }));
            }
            Err(e) => cases.push(unreadable(e)),
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

/// The cases of `shard` (all without one).
pub fn select_shard(cases: Vec<BatchInput>, shard: Option<Shard>) -> Vec<BatchInput> {
    match shard {
        Some(s) => cases.into_iter().filter(|c| s.holds(&c.name)).collect(),
        None => cases,
    }
}

/// Seconds per named stage of one case.
#[derive(Debug, Clone)]
pub struct Stages {
    lap: Instant,
    /// Seconds by stage name, rounded to 10 ms.
    pub seconds: BTreeMap<String, f64>,
}

impl Stages {
    fn starting_at(lap: Instant) -> Self {
        Stages {
            lap,
            seconds: BTreeMap::new(),
        }
    }

    /// Ends stage `name` now and starts the next.
    pub fn lap(&mut self, name: &str) {
        let s = (self.lap.elapsed().as_secs_f64() * 100.0).round() / 100.0;
        self.seconds.insert(name.into(), s);
        self.lap = Instant::now();
    }
}

/// What a batch reports as it goes.
#[derive(Debug, Clone)]
pub enum BatchEvent<'a> {
    /// `todo` cases will be segmented.
    Started {
        /// Cases to segment.
        todo: usize,
    },
    /// A case is being segmented.
    CaseStarted {
        /// Its output name.
        name: &'a str,
    },
    /// A case is done, or failed.
    CaseFinished(&'a BatchCase),
}

/// A segmented case: its lesion count and anything the user should know about it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CaseDone {
    /// Lesions found.
    pub lesions: usize,
    /// Warnings (e.g. non-finite voxels filled), recorded in `batch_summary.json`.
    pub warnings: Vec<String>,
    /// How the case met the memory budget, when there is one.
    pub memory: Option<CaseMemory>,
    /// A fold ensemble's matched finding threshold.
    pub threshold: Option<f64>,
}

/// What the batch should do besides segmenting.
#[derive(Debug, Clone, Default)]
pub struct BatchOptions {
    /// Skip a case when `is_done(case)` says its outputs all exist.
    pub skip_existing: bool,
    /// Stop at the first failed case (the summary then lists the cases up to it).
    pub fail_fast: bool,
    /// The shard the summary is named for.
    pub shard: Option<Shard>,
    /// Under a memory budget, what it leaves beside the model for reading a scan: each scan is
    /// then read only when its turn comes (no second scan in memory), and one whose reading
    /// would hold more is refused from its headers. Without one, the next scan is read while the
    /// current one is segmented.
    pub max_read_bytes: Option<u64>,
}

/// Segments `cases` in order, reading the next one while the current one is segmented.
/// `is_done(case)` tells whether a case's outputs already exist; `segment(case, scan, stages)`
/// does the work and returns its lesion count and warnings. A failing case is recorded and the batch goes on.
/// The summary is written atomically to `output` (see [`BatchSummary::path`]) and returned.
pub fn run_batch(
    cases: Vec<BatchInput>,
    total_inputs: usize,
    output: &Path,
    options: &BatchOptions,
    is_done: &dyn Fn(&BatchInput) -> bool,
    segment: &mut dyn FnMut(&BatchInput, Volume, &mut Stages) -> Result<CaseDone>,
    on_event: &mut dyn FnMut(BatchEvent),
) -> Result<BatchSummary> {
    std::fs::create_dir_all(output).map_err(|e| Error::io(output, e))?;
    let mut summary = BatchSummary {
        inputs: total_inputs,
        ..BatchSummary::default()
    };
    let (todo, done): (Vec<BatchInput>, Vec<BatchInput>) = cases
        .into_iter()
        .partition(|c| !(options.skip_existing && is_done(c)));
    for c in &done {
        summary.skipped += 1;
        summary.cases.push(BatchCase {
            case: c.name.clone(),
            input: c.origin.clone(),
            status: CaseStatus::Skipped,
            lesions: None,
            seconds: None,
            stages: BTreeMap::new(),
            reason: None,
            warnings: Vec::new(),
            memory: None,
            threshold: None,
        });
    }
    on_event(BatchEvent::Started { todo: todo.len() });

    // Reading the next scan overlaps segmenting the current one, unless told not to.
    let (tx, rx) = sync_channel::<(usize, Result<Volume>)>(1);
    let reader_cases = todo.clone();
    let reader = options.max_read_bytes.is_none().then(|| {
        std::thread::spawn(move || {
            for (n, case) in reader_cases.iter().enumerate() {
                if tx.send((n, case.load())).is_err() {
                    break;
                }
            }
        })
    });
    let mut in_turn = 0..todo.len();
    loop {
        let waited = Instant::now();
        let next = match reader {
            Some(_) => rx.recv().ok(),
            None => in_turn.next().map(|n| {
                // What the last case freed goes back before the next is read.
                crate::infer::memory::release_freed_memory();
                (n, todo[n].load_within(options.max_read_bytes))
            }),
        };
        let Some((n, scan)) = next else {
            break;
        };
        let case = &todo[n];
        on_event(BatchEvent::CaseStarted { name: &case.name });
        let mut stages = Stages::starting_at(waited);
        let result = scan.and_then(|scan| {
            stages.lap("wait_for_read");
            segment(case, scan, &mut stages)
        });
        let seconds = waited.elapsed().as_secs_f64();
        let record = match result {
            Ok(done) => {
                summary.segmented += 1;
                BatchCase {
                    case: case.name.clone(),
                    input: case.origin.clone(),
                    status: CaseStatus::Segmented,
                    lesions: Some(done.lesions),
                    seconds: Some(seconds),
                    stages: stages.seconds,
                    reason: None,
                    warnings: done.warnings,
                    memory: done.memory,
                    threshold: done.threshold,
                }
            }
            Err(e) => {
                summary.failed += 1;
                BatchCase {
                    case: case.name.clone(),
                    input: case.origin.clone(),
                    status: CaseStatus::Failed,
                    lesions: None,
                    seconds: None,
                    stages: BTreeMap::new(),
                    reason: Some(e.to_string()),
                    warnings: Vec::new(),
                    memory: None,
                    threshold: None,
                }
            }
        };
        on_event(BatchEvent::CaseFinished(&record));
        let stop = options.fail_fast && record.status == CaseStatus::Failed;
        summary.cases.push(record);
        if stop {
            break;
        }
        crate::io::abort_point("segment-case-written");
    }
    // Closing the receiver ends a reader still waiting to send (after --fail-fast); it only
    // sends, so a panic there would already have closed the channel.
    drop(rx);
    if let Some(reader) = reader {
        let _ = reader.join();
    }
    let path = BatchSummary::path(output, options.shard.map(|s| (s.index, s.count)));
    crate::io::write_json_atomically(&path, &summary)?;
    Ok(summary)
}

/// Merges the shard summaries in `dir` (`batch_summary_shard-I-of-N.json`, one N) into
/// `batch_summary.json`: every case once, counts summed, and the shards not found listed. The
/// merged summary is written (atomically) and returned.
pub fn merge_summaries(dir: &Path) -> Result<BatchSummary> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut shards: BTreeMap<(u64, u64), PathBuf> = BTreeMap::new();
    for entry in entries {
        let path = entry.map_err(|e| Error::io(dir, e))?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if let Some(shard) = BatchSummary::shard_of(name) {
            shards.insert(shard, path);
        }
    }
    let counts: HashSet<u64> = shards.keys().map(|(_, n)| *n).collect();
    let count = match counts.len() {
        1 => *counts.iter().next().unwrap_or(&1),
        0 => {
            return Err(Error::NothingFound {
                path: dir.to_path_buf(),
                detail: " (no batch_summary_shard-I-of-N.json to merge)".into(),
            })
        }
        _ => {
            return Err(Error::Unsupported {
                path: dir.to_path_buf(),
                reason: format!(
                    "shard summaries of different splits ({:?} shards): remove the stale ones",
                    counts
                ),
            })
        }
    };
    let mut merged = BatchSummary {
        shards: Some(count),
        ..BatchSummary::default()
    };
    for ((index, _), path) in &shards {
        let part: BatchSummary = crate::io::read_json(path)?;
        if merged.inputs != 0 && part.inputs != merged.inputs {
            return Err(Error::Unsupported {
                path: path.clone(),
                reason: format!(
                    "shard {index} saw {} inputs, the others {}: were the shards given the same inputs?",
                    part.inputs, merged.inputs
                ),
            });
        }
        merged.inputs = part.inputs;
        merged.segmented += part.segmented;
        merged.skipped += part.skipped;
        merged.failed += part.failed;
        merged.cases.extend(part.cases);
    }
    merged.missing_shards = (0..count)
        .filter(|i| !shards.contains_key(&(*i, count)))
        .collect();
    merged.cases.sort_by(|a, b| a.case.cmp(&b.case));
    crate::io::write_json_atomically(&BatchSummary::path(dir, None), &merged)?;
    Ok(merged)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_come_from_each_schedulers_environment_and_partition_the_cases() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |key: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == key)
                    .map(|(_, v)| v.to_string())
            }
        };
        // Slurm array 1-4: task 3 is shard 2 of 4, count from the environment.
        let slurm = env(&[
            ("SLURM_ARRAY_TASK_ID", "3"),
            ("SLURM_ARRAY_TASK_MIN", "1"),
            ("SLURM_ARRAY_TASK_COUNT", "4"),
        ]);
        assert_eq!(
            Shard::from_env(None, &slurm).unwrap(),
            Shard { index: 2, count: 4 }
        );
        // Kubernetes and AWS give the index only: the count comes from auto/N.
        let k8s = env(&[("JOB_COMPLETION_INDEX", "0")]);
        assert_eq!(
            Shard::from_env(Some(3), &k8s).unwrap(),
            Shard { index: 0, count: 3 }
        );
        let e = Shard::from_env(None, &k8s).unwrap_err().to_string();
        assert!(e.contains("auto/N"), "{e}");
        let aws = env(&[("AWS_BATCH_JOB_ARRAY_INDEX", "5")]);
        assert_eq!(
            Shard::from_env(Some(6), &aws).unwrap(),
            Shard { index: 5, count: 6 }
        );
        assert!(Shard::from_env(Some(5), &aws).is_err());
        // Nothing set, or garbage: errors naming the variables.
        let e = Shard::from_env(Some(2), &env(&[])).unwrap_err().to_string();
        assert!(
            e.contains("SLURM_ARRAY_TASK_ID") && e.contains("JOB_COMPLETION_INDEX"),
            "{e}"
        );
        let e = Shard::from_env(None, &env(&[("SLURM_ARRAY_TASK_ID", "x")])).unwrap_err();
        assert!(e.to_string().contains("not a whole number"));
        assert!("auto/x".parse::<Shard>().is_err() && "autox".parse::<Shard>().is_err());
        // The shards an array job's tasks build, whichever scheduler, partition the cases.
        let names: Vec<String> = (0..200).map(|i| format!("case_{i:03}")).collect();
        for count in [1u64, 3, 4] {
            let shards: Vec<Shard> = (0..count)
                .map(|task| {
                    let id = (task + 1).to_string();
                    let n = count.to_string();
                    let vars = [
                        ("SLURM_ARRAY_TASK_ID".to_string(), id),
                        ("SLURM_ARRAY_TASK_MIN".to_string(), "1".to_string()),
                        ("SLURM_ARRAY_TASK_COUNT".to_string(), n),
                    ];
                    Shard::from_env(None, &|key: &str| {
                        vars.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone())
                    })
                    .unwrap()
                })
                .collect();
            for name in &names {
                assert_eq!(shards.iter().filter(|s| s.holds(name)).count(), 1, "{name}");
            }
        }
    }

    #[test]
    fn shards_parse_and_partition() {
        assert!("1/0".parse::<Shard>().is_err());
        assert!("2/2".parse::<Shard>().is_err());
        assert!("x".parse::<Shard>().is_err());
        let shards: Vec<Shard> = (0..3).map(|i| format!("{i}/3").parse().unwrap()).collect();
        for name in ["a", "b", "case_7", "series-0a1b2c3d"] {
            assert_eq!(shards.iter().filter(|s| s.holds(name)).count(), 1);
        }
    }

    #[test]
    fn repeated_names_become_unique_and_bad_inputs_fail_alone() {
        let missing = PathBuf::from("/nonexistent/a.nii.gz");
        let cases = expand(&[missing.clone(), missing]);
        let names: Vec<&str> = cases.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["a", "a-2"]);
        assert!(matches!(cases[0].input, CaseInput::Unreadable(_)));
        assert!(cases[0].load().is_err());
    }
}
