//! Dirty tracking: which 64 KiB pages of a memory may have changed since the last capture,
//! so that a capture hashes only those.
//!
//! Two trackers behind one trait:
//! - `hash` ([`HashTracker`]): knows nothing, so every page is hashed. Always available;
//!   about 34 ms per GiB of memory at every checkpoint, however little changed.
//! - `kernel` ([`KernelTracker`]): the kernel's own record of which 4 KiB pages were
//!   written (Linux 6.7+: userfaultfd asynchronous write-protection and `PAGEMAP_SCAN`).
//!   A scan costs about a millisecond per GiB; the guest pays instead, about 2 µs at the
//!   first write to each protected page after a checkpoint.
//! - `verify` ([`VerifyingTracker`]) wraps another and checks its every answer by hashing.
//!
//! The contract, for both: after [`DirtyTracker::arm`] with memory `m` exactly as the
//! capture's hashes describe it, [`DirtyTracker::collect`] returns a superset of the pages
//! that differ from `m`. `collect` disarms: until the next `arm` it answers
//! [`Dirty::All`], so a capture that fails half-way (its hashes not kept) is followed by
//! one that hashes everything. A tracker error is never fatal: the capture hashes
//! everything that time (see `capture`).

mod hash;
mod kernel;
mod sys;
mod verify;

use std::fmt;
use std::str::FromStr;

use anyhow::{Result, bail};

pub use hash::HashTracker;
pub use kernel::{KernelTracker, kernel_tracking_available};
pub use verify::{MissedWrites, VerifyingTracker};

/// Which pages of one memory may have changed since the tracker was armed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Dirty {
    /// Any page may have: hash them all.
    All,
    /// Only these pages (ascending, no repeats), which include every page past the
    /// memory's size when armed (grown since).
    Pages(Vec<DirtyPage>),
}

/// Bytes per part of a page: the granularity at which the kernel reports writes (its
/// page size on x86-64; a larger kernel page sets several parts).
pub const PART_SIZE: usize = 4096;
/// Every part of a 64 KiB page.
pub const ALL_PARTS: u16 = u16::MAX;

/// A page that may have changed, and which of its 4 KiB parts were written (bit `i`:
/// bytes `i * PART_SIZE ..`): a part not written is the same as at the last `arm`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DirtyPage {
    pub page: usize,
    pub parts: u16,
}

impl Dirty {
    /// The page numbers, or `None` for `All`.
    pub fn page_numbers(&self) -> Option<Vec<usize>> {
        match self {
            Dirty::All => None,
            Dirty::Pages(pages) => Some(pages.iter().map(|p| p.page).collect()),
        }
    }
}

/// The seam between a capture and whatever knows what the guest wrote.
pub trait DirtyTracker: Send {
    /// Pages of memory `index` (now `memory`) that may differ from what it was at the last
    /// `arm`. Disarms memory `index`.
    fn collect(&mut self, index: usize, memory: &[u8]) -> Result<Dirty>;

    /// Memory `index` is now exactly what the capture's (or the restore's) hashes say:
    /// report writes to it from here on.
    fn arm(&mut self, index: usize, memory: &[u8]) -> Result<()>;
}

/// `--dirty-tracking`: what the user asked for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DirtyTracking {
    /// Kernel tracking where it works here and pays: memories of at least
    /// 4 MiB (`AUTO_KERNEL_MIN_BYTES`), except while the guest rewrites so much of one between
    /// checkpoints that the first-write faults cost more than hashing (it is then hashed
    /// for a while, and tried again). Hashing otherwise.
    #[default]
    Auto,
    /// Kernel tracking for every memory; an error where the kernel does not offer it.
    Kernel,
    /// Hash every page at every checkpoint.
    Hash,
    /// Kernel tracking, and every checkpoint also hashes every 4 KiB part and fails if
    /// the kernel missed a changed one: to check a kernel or container before trusting it.
    Verify,
}

/// Below this size auto mode hashes a memory: hashing 4 MiB takes about 0.15 ms, what
/// about 70 first-write faults cost, so a small memory gains little from the kernel and
/// loses where its guest rewrites much of its heap between checkpoints (allocators,
/// garbage collectors). Above it, such guests are rested to hashing for a while
/// (`KernelTracker::adaptive`). It was 32 MiB: 4 MiB takes the window guest's 5.3 MiB
/// (85 pages hashed a checkpoint, 9 written) to the kernel, 0.50x -> 0.59x of its
/// records/s with checkpoints off at a checkpoint every 1 000 records, while the
/// AssemblyScript word count at 16 MiB (a collector) stayed at 0.59x.
pub const AUTO_KERNEL_MIN_BYTES: usize = 4 << 20;

impl DirtyTracking {
    /// The names `FromStr` and `Display` use, as `--dirty-tracking` takes them.
    pub const NAMES: [&str; 4] = ["auto", "kernel", "hash", "verify"];

    /// The tracker this mode gives on this machine, or why it cannot be had.
    pub fn tracker(self) -> Result<Box<dyn DirtyTracker>> {
        match self {
            DirtyTracking::Hash => Ok(Box::new(HashTracker)),
            DirtyTracking::Auto => match kernel_tracking_available() {
                Ok(()) => Ok(Box::new(KernelTracker::adaptive(AUTO_KERNEL_MIN_BYTES)?)),
                Err(why) => {
                    tracing::debug!("kernel dirty tracking unavailable ({why}); hashing");
                    Ok(Box::new(HashTracker))
                }
            },
            DirtyTracking::Kernel | DirtyTracking::Verify => match kernel_tracking_available() {
                Ok(()) if self == DirtyTracking::Verify => {
                    Ok(Box::new(VerifyingTracker::new(KernelTracker::new(0)?)))
                }
                Ok(()) => Ok(Box::new(KernelTracker::new(0)?)),
                Err(why) => bail!(
                    "kernel dirty tracking is not available here: {why} (it needs Linux 6.7+ \
                     and the userfaultfd system call, which Docker's default seccomp profile \
                     blocks; use --dirty-tracking auto or hash)"
                ),
            },
        }
    }

    /// What this mode resolves to on this machine, in words (for `inspect` and `bench`).
    pub fn describe(self) -> String {
        let available = kernel_tracking_available();
        match (self, available) {
            (DirtyTracking::Hash, _) => "hash".into(),
            (DirtyTracking::Auto, Ok(())) => format!(
                "auto: kernel for memories of {} MiB or more, hash below",
                AUTO_KERNEL_MIN_BYTES >> 20
            ),
            (DirtyTracking::Auto, Err(why)) => format!("auto: hash (kernel unavailable: {why})"),
            (mode, Ok(())) => mode.to_string(),
            (mode, Err(why)) => format!("{mode}: unavailable here ({why})"),
        }
    }
}

impl fmt::Display for DirtyTracking {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DirtyTracking::Auto => "auto",
            DirtyTracking::Kernel => "kernel",
            DirtyTracking::Hash => "hash",
            DirtyTracking::Verify => "verify",
        })
    }
}

impl FromStr for DirtyTracking {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "auto" => DirtyTracking::Auto,
            "kernel" => DirtyTracking::Kernel,
            "hash" => DirtyTracking::Hash,
            "verify" => DirtyTracking::Verify,
            other => bail!("unknown dirty tracking {other:?}: use auto, kernel, hash or verify"),
        })
    }
}
