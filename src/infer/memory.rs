//! `medseg segment --max-memory`: a host-memory budget for the whole process. It is met by
//! choosing how many windows each forward pass takes, case by case, and by refusing, before any
//! work, a case that cannot fit even one window. What a forward pass costs is measured on the
//! loaded model ([`super::sliding_window::SlidingWindow::forward_bytes`]), not assumed; what a case
//! holds besides is counted from the arrays the pipeline allocates for it.

use crate::io::layout::CaseMemory;

/// What forward passes cost on the host, measured on the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowCost {
    /// Bytes a pass needs whatever its batch (buffers that do not grow with it).
    pub fixed: u64,
    /// Bytes each window adds to a pass: its input, activations and probabilities.
    pub per_window: u64,
}

impl WindowCost {
    /// From the peak bytes of a pass of one window and of two.
    pub fn from_peaks(one: u64, two: u64) -> Self {
        let per_window = two.saturating_sub(one).max(1);
        WindowCost {
            fixed: one.saturating_sub(per_window),
            per_window,
        }
    }

    /// The larger of each part of two measurements.
    pub fn max(self, other: WindowCost) -> Self {
        WindowCost {
            fixed: self.fixed.max(other.fixed),
            per_window: self.per_window.max(other.per_window),
        }
    }
}

/// The arrays one case holds besides the forward passes, in elements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CaseArrays {
    /// Voxels of the scan's own grid (per channel).
    pub source_voxels: u64,
    /// Voxels of the preprocessed grid.
    pub grid_voxels: u64,
    /// Voxels of the preprocessed grid padded to at least one window per axis.
    pub padded_voxels: u64,
    /// Image channels.
    pub channels: u64,
    /// Classes, background included.
    pub classes: u64,
    /// Non-finite voxels are being filled: a second copy of the scan.
    pub filled_copy: bool,
    /// Ensemble members kept for `--uncertainty` (0 without).
    pub members: u64,
    /// `--attention`: its map and weights on the padded grid, the map on the scan's.
    pub attention: bool,
    /// A fold ensemble without `--uncertainty`: the running mean beside each member's map.
    pub fold_mean: bool,
    /// A fold ensemble matching its threshold (`segment.ensemble_threshold = "matched"`).
    pub matched: bool,
}

impl CaseArrays {
    /// Bytes, counted from what the pipeline allocates:
    /// - on the scan's grid: the scan (f32 per channel, twice when filled), the label map (u8),
    ///   the component labels of lesion extraction (u32) and the probability map (f32);
    /// - on the preprocessed grid: the resampled and the reoriented image (f32 per channel
    ///   each) and the class map (u8);
    /// - on that grid padded to a window: the copy the windows are cut from (f32 per channel),
    ///   the accumulated probabilities (f32 per class, kept as the result) and the blending
    ///   weights (f32);
    /// - with ensemble members: on the preprocessed grid the running mean (f32 per class) and M2
    ///   (f32), one class map per member (u8); on the scan's grid the two uncertainty maps (f32);
    /// - with attention: on the padded grid its sum, weights (f32) and finding mask (u8); on the
    ///   scan's grid the map (f32);
    /// - a fold ensemble's running mean on the padded grid (f32 per class);
    /// - a matched threshold's class map (u8) and component labels (u32) on the preprocessed
    ///   grid, and with ensemble members each fold's own mean there (f32 per class).
    pub fn bytes(&self) -> u64 {
        let scan = self.channels * 4 * if self.filled_copy { 2 } else { 1 };
        let attention = self.attention as u64;
        let maps = if self.members > 0 { 8 } else { 0 } + 4 * attention;
        let source = self.source_voxels * (scan + 1 + 4 + 4 + maps);
        let members = if self.members > 0 {
            self.classes * 4 + 4 + self.members
        } else {
            0
        };
        let matched = match (self.matched, self.members > 0) {
            (false, _) => 0,
            (true, false) => 1 + 4,
            (true, true) => 1 + 4 + self.classes * 4,
        };
        let grid = self.grid_voxels * (self.channels * 8 + 1 + members + matched);
        let fold_mean = if self.fold_mean && self.members == 0 {
            self.classes * 4
        } else {
            0
        };
        let padded = self.padded_voxels
            * (self.channels * 4 + self.classes * 4 + 4 + 9 * attention + fold_mean);
        source + grid + padded
    }
}

/// 1/10 of a budget is left free: resident memory exceeded the prediction by up to 7 % in
/// measurements (allocator fragmentation between a case's arrays and its passes, which the
/// passes measured alone do not show).
pub const HEADROOM: u64 = 10;

/// A process's host-memory budget and what it has to spend it on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryBudget {
    /// The budget, bytes of resident memory.
    pub limit: u64,
    /// Resident bytes once the model was loaded (code, weights, runtime), before any case.
    pub baseline: u64,
    /// Forward passes, measured.
    pub cost: WindowCost,
}

impl MemoryBudget {
    /// The windows per pass for a case holding `arrays`, at most `wanted`, with up to
    /// `concurrent` passes in flight at once, and the peak it predicts; or why the case cannot be
    /// done within the budget. Fewer passes run at once before a pass gets fewer windows: running
    /// them at once is what keeps the cores busy, more windows in a pass gain little.
    pub fn plan(
        &self,
        arrays: &CaseArrays,
        wanted: usize,
        concurrent: usize,
    ) -> Result<CaseMemory, String> {
        let case = arrays.bytes();
        let fits = |passes: u64| {
            let before_windows = self.baseline + case + passes * self.cost.fixed;
            let room = self.usable().saturating_sub(before_windows);
            let windows = ((room / passes / self.cost.per_window) as usize).min(wanted.max(1));
            (windows > 0).then_some((passes, before_windows, windows))
        };
        let Some((passes, before_windows, windows)) =
            (1..=concurrent.max(1) as u64).rev().find_map(fits)
        else {
            let before_windows = self.baseline + case + self.cost.fixed;
            return Err(format!(
                "needs about {} within --max-memory {} ({} of it usable): {} resident with the model, {} \
                 for the scan and its resampled grid, and {} for a forward pass of one window",
                human(before_windows + self.cost.per_window),
                human(self.limit),
                human(self.usable()),
                human(self.baseline),
                human(case),
                human(self.cost.fixed + self.cost.per_window),
            ));
        };
        Ok(CaseMemory {
            limit_bytes: self.limit,
            predicted_peak_bytes: before_windows + passes * windows as u64 * self.cost.per_window,
            passes_in_flight: passes as usize,
            bytes_per_pass: self.cost.fixed,
            windows_per_pass: windows,
            bytes_per_window: self.cost.per_window,
            case_bytes: case,
            measured_peak_bytes: None,
        })
    }

    /// What the budget leaves beside the model for reading a scan.
    pub fn read_room(&self) -> u64 {
        self.usable().saturating_sub(self.baseline)
    }

    /// The budget less its [`HEADROOM`] share.
    pub fn usable(&self) -> u64 {
        self.limit - self.limit / HEADROOM
    }

    /// Whether the model alone, with one window of one case-free pass, fits the budget (before
    /// the pass is measured, `per_window` 0: whether what is resident already fits).
    pub fn check_model(&self) -> Result<(), String> {
        let needed = self.baseline + self.cost.fixed + self.cost.per_window;
        if self.cost.per_window == 0 && needed >= self.usable() {
            return Err(format!(
                "--max-memory {} ({} usable) is below what is resident once the model is loaded: {}",
                human(self.limit),
                human(self.usable()),
                human(self.baseline)
            ));
        }
        if needed > self.usable() {
            return Err(format!(
                "--max-memory {} is below what the model alone needs: {} ({} resident once loaded, {} \
                 for a forward pass of one window)",
                human(self.limit),
                human(needed),
                human(self.baseline),
                human(self.cost.fixed + self.cost.per_window),
            ));
        }
        Ok(())
    }
}

/// Bytes as MiB or GiB for messages.
pub fn human(bytes: u64) -> String {
    bytesize::ByteSize(bytes).display().iec().to_string()
}

/// Returns the free pages of every thread's heap to the system (glibc's `malloc_trim`), so that
/// what the last case or measurement freed is not still resident when the next one starts; the
/// binary keeps freed memory otherwise (see `src/main.rs`).
pub fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only hands free pages back; it takes the allocator's own locks.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// This process's resident memory (Linux: `VmRSS` of `/proc/self/status`); `None` elsewhere.
pub fn resident_bytes() -> Option<u64> {
    status_bytes("VmRSS:")
}

/// The most resident memory since [`reset_resident_peak`] (Linux: `VmHWM`); `None` elsewhere.
pub fn resident_peak() -> Option<u64> {
    status_bytes("VmHWM:")
}

/// Starts a new resident peak at the current resident memory (Linux resets `VmHWM` when `5` is
/// written to `/proc/self/clear_refs`); where that fails the peak stays the process's.
pub fn reset_resident_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn status_bytes(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(limit: u64) -> MemoryBudget {
        MemoryBudget {
            limit,
            baseline: 100 << 20,
            cost: WindowCost::from_peaks(30 << 20, 50 << 20),
        }
    }

    fn arrays(grid: u64) -> CaseArrays {
        CaseArrays {
            source_voxels: grid,
            grid_voxels: grid,
            padded_voxels: grid,
            channels: 1,
            classes: 2,
            filled_copy: false,
            members: 0,
            attention: false,
            fold_mean: false,
            matched: false,
        }
    }

    #[test]
    fn windows_shrink_with_the_budget_and_a_case_that_cannot_fit_is_refused() {
        assert_eq!(
            WindowCost::from_peaks(30, 50),
            WindowCost {
                fixed: 10,
                per_window: 20
            }
        );
        let case = arrays(1 << 20);
        let bytes = case.bytes();
        assert_eq!(bytes, (1 << 20) * ((4 + 1 + 4 + 4) + (8 + 1) + (4 + 8 + 4)));
        let base = (100 << 20) + bytes + (10 << 20);
        // The smallest budget that leaves `need` usable after the headroom (then exactly `need`).
        let budget = |need: u64| {
            let mut limit = need;
            while limit - limit / HEADROOM < need {
                limit += 1;
            }
            let b = budget(limit);
            assert_eq!(b.usable(), need);
            b
        };
        let plan = budget(base + 4 * (20 << 20)).plan(&case, 8, 1).unwrap();
        assert_eq!(plan.windows_per_pass, 4);
        assert_eq!(plan.predicted_peak_bytes, base + 4 * (20 << 20));
        assert_eq!(
            budget(base + 4 * (20 << 20))
                .plan(&case, 2, 1)
                .unwrap()
                .windows_per_pass,
            2
        );
        assert_eq!(
            budget(base + (20 << 20))
                .plan(&case, 8, 1)
                .unwrap()
                .windows_per_pass,
            1
        );
        // Two passes at once each pay the fixed cost; when both do not fit, one pass runs.
        let two = budget(base + 4 * (20 << 20)).plan(&case, 8, 2).unwrap();
        assert_eq!((two.passes_in_flight, two.windows_per_pass), (2, 1));
        assert_eq!(two.predicted_peak_bytes, base + (10 << 20) + 2 * (20 << 20));
        let one = budget(base + (20 << 20)).plan(&case, 8, 2).unwrap();
        assert_eq!((one.passes_in_flight, one.windows_per_pass), (1, 1));
        let refused = budget(base + (20 << 20) - 1).plan(&case, 8, 2).unwrap_err();
        assert!(
            refused.contains("--max-memory") && refused.contains("one window"),
            "{refused}"
        );
        let unmeasured = MemoryBudget {
            limit: 100 << 20,
            baseline: 95 << 20,
            cost: WindowCost {
                fixed: 0,
                per_window: 0,
            },
        };
        let refused = unmeasured.check_model().unwrap_err();
        assert!(
            refused.contains("resident once the model is loaded"),
            "{refused}"
        );
        assert!(budget(130 << 20).check_model().is_ok());
        assert!(budget((130 << 20) - 1).check_model().is_err());
    }

    /// Resident memory and its peak are read on Linux (the per-case reset of the peak is
    /// checked in a process of its own, by `segment --max-memory` in tests/it/segment.rs).
    #[test]
    fn resident_memory_and_its_peak_are_read_on_linux() {
        if !cfg!(target_os = "linux") {
            return;
        }
        let rss = resident_bytes().expect("VmRSS");
        assert!(rss > 1 << 20 && rss < 1 << 40, "{rss}");
        assert!(resident_peak().expect("VmHWM") >= rss);
    }
}
