//! Batches of patches, prepared by worker threads ahead of the training step.
//!
//! Every batch is a pure function of `(seed, epoch, step)`: which cases it draws from and every
//! random choice inside it. Threads only change when a batch is ready, never what it holds, so a
//! run is reproducible and resumes exactly.

use crate::transforms::augment::derive_seed;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::dataset::PreparedCase;
use super::sampler::PatchSampler;
use crate::transforms::augment::Patch;

/// Patches stacked for the network.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// `[B, C, D, H, W]`, C order.
    pub image: Vec<f32>,
    /// `[B, C, D, H, W]` of `image`.
    pub image_shape: [usize; 5],
    /// `[B, D, H, W]` class indices.
    pub label: Vec<u8>,
    /// `[B, D, H, W]` of `label`.
    pub label_shape: [usize; 4],
}

/// Stacks patches of equal shape.
pub fn collate(patches: &[Patch]) -> Batch {
    let (c, d, h, w) = patches[0].image.dim();
    let mut image = Vec::with_capacity(patches.len() * c * d * h * w);
    let mut label = Vec::with_capacity(patches.len() * d * h * w);
    for p in patches {
        image.extend(p.image.iter());
        label.extend(p.label.iter());
    }
    Batch {
        image,
        image_shape: [patches.len(), c, d, h, w],
        label,
        label_shape: [patches.len(), d, h, w],
    }
}

/// Which case each patch of an epoch comes from: every case `patches_per_volume` times, shuffled.
#[derive(Debug, Clone)]
pub struct EpochPlan {
    /// Case index of each patch, in epoch order.
    pub slots: Vec<usize>,
    /// Patches per batch.
    pub batch_size: usize,
    /// Batches in the epoch; the slots are cycled when they run out.
    pub steps: usize,
}

impl EpochPlan {
    /// `steps = 0` derives the epoch length from the slots.
    pub fn new(
        cases: usize,
        patches_per_volume: usize,
        batch_size: usize,
        steps: usize,
        seed: u64,
        epoch: usize,
    ) -> Self {
        let mut slots: Vec<usize> = (0..cases)
            .flat_map(|c| std::iter::repeat_n(c, patches_per_volume))
            .collect();
        slots.shuffle(&mut rand::rngs::StdRng::seed_from_u64(derive_seed(
            seed,
            epoch,
            usize::MAX,
        )));
        let steps = if steps > 0 {
            steps
        } else {
            slots.len().div_ceil(batch_size).max(1)
        };
        EpochPlan {
            slots,
            batch_size,
            steps,
        }
    }

    /// Case indices of batch `step` (cycling through the slots).
    pub fn cases_of(&self, step: usize) -> Vec<usize> {
        (0..self.batch_size)
            .map(|b| self.slots[(step * self.batch_size + b) % self.slots.len()])
            .collect()
    }
}

/// Builds batch `step` of `epoch`.
pub fn make_batch(
    cases: &[Arc<PreparedCase>],
    sampler: &PatchSampler,
    plan: &EpochPlan,
    seed: u64,
    epoch: usize,
    step: usize,
) -> Batch {
    let mut rng = rand::rngs::StdRng::seed_from_u64(derive_seed(seed, epoch, step));
    let patches: Vec<Patch> = plan
        .cases_of(step)
        .into_iter()
        .map(|c| sampler.sample(&cases[c], &mut rng))
        .collect();
    collate(&patches)
}

/// Batches of one epoch, in step order, from `workers` threads that stay at most `prefetch`
/// batches ahead.
pub struct Loader {
    rx: Option<Receiver<(usize, Batch)>>,
    pending: BTreeMap<usize, Batch>,
    next: usize,
    steps: usize,
    stop: Arc<AtomicBool>,
    handles: Vec<JoinHandle<()>>,
    /// Seconds the consumer spent waiting for a batch.
    pub wait_seconds: f64,
}

impl Loader {
    /// Starts `workers` threads building the batches of `plan` for `epoch`; each batch is seeded
    /// by `(seed, epoch, step)`, so the result does not depend on the thread count.
    pub fn spawn(
        cases: Arc<Vec<Arc<PreparedCase>>>,
        sampler: PatchSampler,
        plan: EpochPlan,
        seed: u64,
        epoch: usize,
        workers: usize,
        prefetch: usize,
    ) -> Self {
        let steps = plan.steps;
        let (tx, rx) = sync_channel(prefetch.max(1));
        let counter = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let plan = Arc::new(plan);
        let handles = (0..workers.max(1))
            .map(|_| {
                let (tx, counter, stop) = (tx.clone(), counter.clone(), stop.clone());
                let (cases, sampler, plan) = (cases.clone(), sampler.clone(), plan.clone());
                std::thread::spawn(move || loop {
                    let step = counter.fetch_add(1, Ordering::SeqCst);
                    if step >= plan.steps || stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let batch = make_batch(&cases, &sampler, &plan, seed, epoch, step);
                    if tx.send((step, batch)).is_err() {
                        break;
                    }
                })
            })
            .collect();
        Loader {
            rx: Some(rx),
            pending: BTreeMap::new(),
            next: 0,
            steps,
            stop,
            handles,
            wait_seconds: 0.0,
        }
    }
}

impl Iterator for Loader {
    type Item = Batch;

    fn next(&mut self) -> Option<Batch> {
        if self.next >= self.steps {
            return None;
        }
        let start = std::time::Instant::now();
        let batch = loop {
            if let Some(b) = self.pending.remove(&self.next) {
                break b;
            }
            match self.rx.as_ref()?.recv() {
                Ok((step, b)) => {
                    self.pending.insert(step, b);
                }
                Err(_) => return None,
            }
        };
        self.wait_seconds += start.elapsed().as_secs_f64();
        self.next += 1;
        Some(batch)
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Dropping the receiver unblocks workers waiting to send.
        self.rx.take();
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{AugmentConfig, SamplingConfig};
    use crate::data::dataset::{prepare, SpatialResult};
    use crate::geometry::{Geometry, IDENTITY};
    use ndarray::{Array3, Array4};

    #[test]
    fn threads_do_not_change_the_batches() {
        let image = Array4::from_shape_fn([1, 4, 32, 32], |(_, k, j, i)| {
            (k * 1000 + j * 32 + i) as f32
        });
        let mut label = Array3::<u8>::zeros([4, 32, 32]);
        label[[2, 10, 10]] = 1;
        let case = Arc::new(prepare(
            "c".into(),
            SpatialResult {
                image,
                label: Some(label),
                geometry: Geometry::new([32, 32, 4], IDENTITY),
            },
            &[crate::transforms::intensity::Normalization::None],
            2,
        ));
        let cases = Arc::new(vec![case.clone(), case]);
        let sampling = SamplingConfig {
            patch_size: crate::geometry::PatchSize::new(&[16, 16]).unwrap(),
            ..SamplingConfig::default()
        };
        let sampler = PatchSampler::new(&sampling, &AugmentConfig::default(), 1);
        let run = |workers| {
            let plan = EpochPlan::new(2, 5, 3, 0, 9, 4);
            Loader::spawn(cases.clone(), sampler.clone(), plan, 9, 4, workers, 2)
                .collect::<Vec<_>>()
        };
        let one = run(1);
        assert_eq!(one.len(), 4); // ceil(2 cases × 5 / 3)
        assert_eq!(one[0].image_shape, [3, 3, 1, 16, 16]); // 2.5D: 3 slices as channels
        assert_eq!(run(3), one);
        // Another epoch draws other patches.
        let other: Vec<_> = Loader::spawn(
            cases.clone(),
            sampler.clone(),
            EpochPlan::new(2, 5, 3, 0, 9, 5),
            9,
            5,
            2,
            2,
        )
        .collect();
        assert_ne!(other, one);
    }
}
