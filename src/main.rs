//! The `medseg` command line. Thin: parse arguments, call the library, map errors to exit codes.

mod cli;

use std::alloc::System;

use peakmem_alloc::{PeakMemAlloc, INSTRUMENTED_SYSTEM};

/// The system allocator, counting live and peak bytes, so that `segment --max-memory` measures
/// what a forward pass costs on this model instead of assuming it (two atomic updates per
/// allocation: no measurable change in a model step, see issue 17's note).
#[global_allocator]
static ALLOCATOR: &PeakMemAlloc<System> = &INSTRUMENTED_SYSTEM;

fn main() -> std::process::ExitCode {
    keep_freed_memory();
    cli::run()
}

/// With glibc's defaults every tensor buffer over 32 MiB is a fresh mmap whose pages fault in
/// again after each free: 8 % of a 3D training step (perf, tiny 96³). Serving them from the heap
/// and not trimming it reuses the pages; peak RSS is unchanged (it is the peak either way).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_freed_memory() {
    const MIB: i32 = 1 << 20;
    // SAFETY: mallopt only sets allocator parameters; it is called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1024 * MIB);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_freed_memory() {}
