//! Kernel dirty tracking: the kernel records which 4 KiB pages of a memory were written
//! since they were last write-protected, and a capture asks it (see `sys` for the
//! mechanism).
//!
//! Per memory, what is registered is exactly the bytes the guest can reach
//! (`[base, base + len)`, never the reserved `PROT_NONE` tail behind it: a scan there
//! would fail). Memory grown by `memory.grow` since the last `arm` is reported dirty
//! whole, then registered and protected by the next `arm`, before the guest runs again.
//! A memory that moved (wasmtime re-mapped it to grow it) lost its registration with the
//! old mapping: everything is dirty once, and the new mapping is registered.
//!
//! Why it is correct with wasmtime: every writer of guest memory (the guest, the host
//! copying a record in, a restore, WASI reading into a buffer) goes through the page
//! tables, which is all the kernel looks at. What would defeat it is a range being reset
//! behind the tracker's back (`madvise(MADV_DONTNEED)` on a copy-on-write image reverts
//! pages without a write): wasmtime's pooling allocator does that when it recycles a
//! slot, the on-demand allocator wasnap configures never does to a live memory.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::sync::OnceLock;

use anyhow::{Context, Result};

use super::sys::{self, page_region};
use super::{ALL_PARTS, Dirty, DirtyPage, DirtyTracker, PART_SIZE};
use crate::snapshot::pages::{PAGE_SIZE, page_count};

/// One memory under watch.
struct Watched {
    /// Address of the memory's first byte when it was registered.
    base: usize,
    /// Bytes from `base` that are registered (and were write-protected when registered).
    registered: usize,
    /// Armed since the last `collect`: the kernel's record is the whole story.
    armed: bool,
    /// Watched again after a failed scan: one more failure gives the memory up.
    after_failure: bool,
    /// Adaptive trackers: scans in a row that found the guest writing so much that its
    /// first-write faults cost more than hashing would have.
    heavy_scans: u32,
    /// Adaptive trackers: checkpoints to leave the memory to hashing when it next rests.
    next_rest: u32,
}

enum Slot {
    /// Not watched (yet): too small for this tracker, or never armed. Hashed.
    Unwatched,
    Watched(Watched),
    /// A scan failed (the registration is in doubt): the next `arm` watches it anew.
    Failed,
    /// Adaptive trackers: left to hashing for `left` more checkpoints, since the guest
    /// wrote too much of it for tracking to pay; then watched again, to see.
    Resting {
        left: u32,
        next_rest: u32,
    },
    /// Given up after an error registering or protecting it: hashed from now on.
    GivenUp,
}

pub struct KernelTracker {
    uffd: OwnedFd,
    pagemap: File,
    /// Memories smaller than this are left to hashing (until they grow past it).
    min_bytes: usize,
    /// Rest a memory whose guest writes too much of it (auto mode).
    adaptive: bool,
    memories: Vec<Slot>,
    regions: Vec<page_region>,
}

/// Regions one `PAGEMAP_SCAN` call may return (a region is a run of written pages).
const SCAN_REGIONS: usize = 512;

/// Bytes hashing gets through in the time one first-write fault takes: about 2 µs
/// against 34 ms per GiB, measured here (docs/BENCHMARKS.md, "Dirty tracking").
const FAULT_COST_IN_HASHED_BYTES: usize = 64 << 10;
/// A memory rests after this many heavy scans in a row...
const HEAVY_SCANS_TO_REST: u32 = 3;
/// ...for this many checkpoints the first time, twice as many each time after.
const FIRST_REST: u32 = 16;
const LONGEST_REST: u32 = 1024;

impl KernelTracker {
    /// A tracker for memories of at least `min_bytes`. Fails where the kernel does not
    /// offer asynchronous write-protection (check [`kernel_tracking_available`] first for
    /// a reason worth showing a user).
    pub fn new(min_bytes: usize) -> Result<Self> {
        Self::with_policy(min_bytes, false)
    }

    /// [`KernelTracker::new`], that leaves a memory to hashing for a while whenever the
    /// guest writes so much of it between checkpoints that the first-write faults cost
    /// more than hashing it would (auto mode).
    pub fn adaptive(min_bytes: usize) -> Result<Self> {
        Self::with_policy(min_bytes, true)
    }

    fn with_policy(min_bytes: usize, adaptive: bool) -> Result<Self> {
        let uffd = sys::open_async_wp_userfaultfd().context("cannot open a userfaultfd")?;
        let pagemap = File::open("/proc/self/pagemap").context("cannot open /proc/self/pagemap")?;
        Ok(Self {
            uffd,
            pagemap,
            min_bytes,
            adaptive,
            memories: Vec::new(),
            regions: vec![page_region::default(); SCAN_REGIONS],
        })
    }

    fn slot(&mut self, index: usize) -> &mut Slot {
        if self.memories.len() <= index {
            self.memories.resize_with(index + 1, || Slot::Unwatched);
        }
        &mut self.memories[index]
    }

    /// Register `[start, start + len)` and write-protect it: from now on the kernel
    /// records the first write to each of its pages.
    fn watch(&self, start: usize, len: usize) -> std::io::Result<()> {
        sys::register_wp(&self.uffd, start, len)?;
        sys::write_protect(&self.uffd, start, len).inspect_err(|_| {
            let _ = sys::unregister(&self.uffd, start, len);
        })
    }

    /// Close the userfaultfd behind the tracker's back, as a kernel or a sandbox taking it
    /// away would: every later scan fails (tests of the fallback).
    #[cfg(test)]
    fn lose_registrations(&mut self) {
        let replacement = sys::open_async_wp_userfaultfd().unwrap();
        self.uffd = replacement;
    }
}

impl DirtyTracker for KernelTracker {
    fn collect(&mut self, index: usize, memory: &[u8]) -> Result<Dirty> {
        let Slot::Watched(watched) = self.slot(index) else {
            return Ok(Dirty::All);
        };
        let base = memory.as_ptr() as usize;
        if !std::mem::replace(&mut watched.armed, false)
            || watched.base != base
            || memory.len() < watched.registered
        {
            return Ok(Dirty::All);
        }
        let (registered, after_failure) = (watched.registered, watched.after_failure);
        let mut written = 0usize;
        let mut dirty: Vec<DirtyPage> = Vec::new();
        let mut add = |page: usize, parts: u16| match dirty.last_mut() {
            Some(last) if last.page == page => last.parts |= parts,
            _ => dirty.push(DirtyPage { page, parts }),
        };
        let scanned = sys::scan_written_and_protect(
            &self.pagemap,
            base,
            base + registered,
            &mut self.regions,
            |start, end| {
                let (start, end) = (start as usize - base, end as usize - base);
                written += end - start;
                for page in start / PAGE_SIZE..=(end - 1) / PAGE_SIZE {
                    let page_start = page * PAGE_SIZE;
                    let first = (start.max(page_start) - page_start) / PART_SIZE;
                    let last = (end.min(page_start + PAGE_SIZE) - 1 - page_start) / PART_SIZE;
                    add(page, parts_mask(first, last));
                }
            },
        );
        if let Err(err) = scanned {
            // Pages the scan reported before it failed are protected again and lost:
            // the caller hashes everything this time.
            self.memories[index] = if after_failure {
                Slot::GivenUp
            } else {
                Slot::Failed
            };
            return Err(
                anyhow::Error::from(err).context(format!("PAGEMAP_SCAN of memory {index} failed"))
            );
        }
        if let Slot::Watched(w) = &mut self.memories[index] {
            w.after_failure = false;
            let heavy = written.saturating_mul(FAULT_COST_IN_HASHED_BYTES / 4096) > registered;
            w.heavy_scans = if heavy { w.heavy_scans + 1 } else { 0 };
            if self.adaptive && w.heavy_scans >= HEAVY_SCANS_TO_REST {
                tracing::debug!(
                    memory = index,
                    written,
                    checkpoints = w.next_rest,
                    "the guest writes too much of this memory for kernel tracking to pay: hashing it"
                );
                // Stop the faults; the pages just reported are still this capture's.
                let _ = sys::unregister(&self.uffd, base, registered);
                let next_rest = (w.next_rest * 2).min(LONGEST_REST);
                self.memories[index] = Slot::Resting {
                    left: w.next_rest,
                    next_rest,
                };
            }
        }
        // Grown since the last arm: not watched yet, so dirty (from the page that held
        // the old end, in case the memory's size is not a whole number of pages).
        for page in registered / PAGE_SIZE..page_count(memory.len() as u64) {
            add(page, ALL_PARTS);
        }
        Ok(Dirty::Pages(dirty))
    }

    fn arm(&mut self, index: usize, memory: &[u8]) -> Result<()> {
        let (base, len) = (memory.as_ptr() as usize, memory.len());
        let min_bytes = self.min_bytes;
        let mut after_failure = false;
        let mut next_rest = FIRST_REST;
        // What is to be newly watched.
        let new_range = match self.slot(index) {
            Slot::GivenUp => return Ok(()),
            Slot::Resting { left, .. } if *left > 0 => {
                *left -= 1;
                return Ok(());
            }
            Slot::Resting {
                next_rest: next, ..
            } => {
                next_rest = *next;
                (base, len)
            }
            Slot::Unwatched if len == 0 || len < min_bytes => return Ok(()),
            Slot::Unwatched => (base, len),
            Slot::Failed => {
                after_failure = true;
                (base, len)
            }
            // Moved: the old mapping, and its registration, are gone.
            Slot::Watched(w) if w.base != base => {
                next_rest = w.next_rest;
                (base, len)
            }
            Slot::Watched(w) => {
                after_failure = w.after_failure;
                next_rest = w.next_rest;
                let grown = (base + w.registered, len.saturating_sub(w.registered));
                if grown.1 == 0 {
                    w.armed = true;
                    return Ok(());
                }
                grown
            }
        };
        let watched = self.watch(new_range.0, new_range.1);
        let slot = self.slot(index);
        match watched {
            Ok(()) => {
                *slot = Slot::Watched(Watched {
                    base,
                    registered: len,
                    armed: true,
                    after_failure,
                    heavy_scans: 0,
                    next_rest,
                });
                Ok(())
            }
            Err(err) => {
                *slot = Slot::GivenUp;
                Err(anyhow::Error::from(err).context(format!(
                    "cannot write-protect memory {index} ({len} bytes); hashing it from now on"
                )))
            }
        }
    }
}

/// Bits `first..=last` set.
fn parts_mask(first: usize, last: usize) -> u16 {
    let through_last = if last >= 15 {
        u16::MAX
    } else {
        (1u16 << (last + 1)) - 1
    };
    through_last & !((1u16 << first) - 1)
}

/// Whether kernel dirty tracking works in this process, checked once: a small mapping is
/// registered, protected, written and scanned, and the scan must report exactly the pages
/// written. `Err` says why not.
pub fn kernel_tracking_available() -> Result<(), String> {
    static PROBE: OnceLock<Result<(), String>> = OnceLock::new();
    PROBE
        .get_or_init(|| {
            let outcome = probe();
            match &outcome {
                Ok(()) => tracing::debug!("kernel dirty tracking is available"),
                Err(why) => tracing::debug!("kernel dirty tracking is unavailable: {why}"),
            }
            outcome
        })
        .clone()
}

fn probe() -> Result<(), String> {
    const PAGES: usize = 8;
    let mut tracker = KernelTracker::new(0).map_err(|e| format!("{e:#}"))?;
    let mut mapping = memmap2::MmapMut::map_anon(PAGES * PAGE_SIZE)
        .map_err(|e| format!("cannot map memory for the probe: {e}"))?;
    mapping[..].fill(1);
    tracker.arm(0, &mapping).map_err(|e| format!("{e:#}"))?;
    let expect = |tracker: &mut KernelTracker, mapping: &mut [u8], writes: &[usize]| {
        for &page in writes {
            mapping[page * PAGE_SIZE + 4096 + 7] ^= 0xff;
        }
        let got = tracker.collect(0, mapping).map_err(|e| format!("{e:#}"))?;
        tracker.arm(0, mapping).map_err(|e| format!("{e:#}"))?;
        // Each write is to the second part of its page.
        let expected: Vec<DirtyPage> = writes
            .iter()
            .map(|&page| DirtyPage { page, parts: 0b10 })
            .collect();
        if got == Dirty::Pages(expected) {
            Ok(())
        } else {
            Err(format!(
                "the kernel reported {got:?} after writes to pages {writes:?}"
            ))
        }
    };
    expect(&mut tracker, &mut mapping, &[2, 5])?;
    expect(&mut tracker, &mut mapping, &[])?;
    expect(&mut tracker, &mut mapping, &[5])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn available() -> bool {
        match kernel_tracking_available() {
            Ok(()) => true,
            // Not silently: a machine without it must say so, and CI's machines have it.
            Err(why) if std::env::var_os("WASNAP_ALLOW_NO_KERNEL_TRACKING").is_some() => {
                eprintln!("kernel dirty tracking unavailable: {why}");
                false
            }
            Err(why) => panic!(
                "kernel dirty tracking is unavailable ({why}); set \
                 WASNAP_ALLOW_NO_KERNEL_TRACKING=1 to skip these tests on such a machine"
            ),
        }
    }

    /// A fresh anonymous memory of `pages` 64 KiB pages, armed in `tracker` as memory 0.
    fn armed(tracker: &mut KernelTracker, pages: usize) -> memmap2::MmapMut {
        let memory = memmap2::MmapMut::map_anon(pages * PAGE_SIZE).unwrap();
        tracker.arm(0, &memory).unwrap();
        memory
    }

    fn pages(dirty: Dirty) -> Vec<usize> {
        dirty
            .page_numbers()
            .expect("expected tracked pages, got All")
    }

    #[test]
    fn parts_are_the_4_kib_pieces_written() {
        if !available() {
            return;
        }
        let mut tracker = KernelTracker::new(0).unwrap();
        let mut memory = armed(&mut tracker, 4);
        memory[PAGE_SIZE + 5] = 1; // part 0 of page 1
        memory[PAGE_SIZE + 15 * PART_SIZE] = 1; // part 15 of page 1
        memory[3 * PAGE_SIZE + 2 * PART_SIZE..3 * PAGE_SIZE + 5 * PART_SIZE].fill(1); // 2..=4
        let Dirty::Pages(got) = tracker.collect(0, &memory).unwrap() else {
            panic!("All");
        };
        assert_eq!(
            got,
            vec![
                DirtyPage {
                    page: 1,
                    parts: 1 | 1 << 15
                },
                DirtyPage {
                    page: 3,
                    parts: 0b1_1100
                },
            ]
        );
        assert_eq!(parts_mask(0, 15), ALL_PARTS);
        assert_eq!(parts_mask(3, 3), 1 << 3);
    }

    #[test]
    fn reports_exactly_the_pages_written_since_the_last_arm() {
        if !available() {
            return;
        }
        let mut tracker = KernelTracker::new(0).unwrap();
        let mut memory = memmap2::MmapMut::map_anon(64 * PAGE_SIZE).unwrap();
        // Never armed: everything is dirty.
        assert_eq!(tracker.collect(0, &memory).unwrap(), Dirty::All);
        tracker.arm(0, &memory).unwrap();
        // Unpopulated pages (never touched) are protected too.
        memory[3 * PAGE_SIZE] = 1;
        memory[40 * PAGE_SIZE + 65535] = 1;
        memory[40 * PAGE_SIZE + 100] = 1; // the same 64 KiB page twice
        memory[63 * PAGE_SIZE + 4096 * 3] = 1;
        assert_eq!(pages(tracker.collect(0, &memory).unwrap()), vec![3, 40, 63]);
        // Disarmed by the collect: a capture that failed is followed by a full one.
        assert_eq!(tracker.collect(0, &memory).unwrap(), Dirty::All);
        tracker.arm(0, &memory).unwrap();
        assert_eq!(
            pages(tracker.collect(0, &memory).unwrap()),
            Vec::<usize>::new()
        );
        tracker.arm(0, &memory).unwrap();
        // Written again after a scan: reported again.
        memory[3 * PAGE_SIZE + 9] = 2;
        assert_eq!(pages(tracker.collect(0, &memory).unwrap()), vec![3]);
    }

    #[test]
    fn a_grown_memory_reports_its_new_pages_and_watches_them_after_the_next_arm() {
        if !available() {
            return;
        }
        // A reservation, of which a first part is accessible: how wasmtime lays out a
        // memory and grows it (mprotect of the next part).
        let reserved = 256 * PAGE_SIZE;
        // SAFETY: a fresh anonymous mapping, unmapped at the end of the test.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                reserved,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(base, libc::MAP_FAILED);
        let grow = |bytes: usize| {
            // SAFETY: within the reservation above.
            assert_eq!(
                unsafe { libc::mprotect(base, bytes, libc::PROT_READ | libc::PROT_WRITE) },
                0
            );
            // SAFETY: the first `bytes` are mapped read-write and only this test uses them.
            unsafe { std::slice::from_raw_parts_mut(base as *mut u8, bytes) }
        };
        let mut tracker = KernelTracker::new(0).unwrap();
        let memory = grow(4 * PAGE_SIZE);
        tracker.arm(0, memory).unwrap();
        memory[PAGE_SIZE] = 1;
        let memory = grow(10 * PAGE_SIZE);
        assert_eq!(
            pages(tracker.collect(0, memory).unwrap()),
            vec![1, 4, 5, 6, 7, 8, 9]
        );
        tracker.arm(0, memory).unwrap();
        memory[8 * PAGE_SIZE] = 1;
        assert_eq!(pages(tracker.collect(0, memory).unwrap()), vec![8]);
        // SAFETY: the mapping made above.
        unsafe { libc::munmap(base, reserved) };
    }

    #[test]
    fn a_small_memory_is_left_to_hashing_until_it_grows_past_the_minimum() {
        if !available() {
            return;
        }
        let mut tracker = KernelTracker::new(16 * PAGE_SIZE).unwrap();
        let small = memmap2::MmapMut::map_anon(8 * PAGE_SIZE).unwrap();
        tracker.arm(0, &small).unwrap();
        assert_eq!(tracker.collect(0, &small).unwrap(), Dirty::All);
        let big = memmap2::MmapMut::map_anon(16 * PAGE_SIZE).unwrap();
        tracker.arm(1, &big).unwrap();
        assert_eq!(
            pages(tracker.collect(1, &big).unwrap()),
            Vec::<usize>::new()
        );
    }

    #[test]
    fn an_adaptive_tracker_rests_a_memory_the_guest_rewrites_and_watches_it_again_later() {
        if !available() {
            return;
        }
        let mut tracker = KernelTracker::adaptive(0).unwrap();
        let mut memory = armed(&mut tracker, 16);
        let mut checkpoint = |memory: &mut [u8], rewrite: bool| {
            if rewrite {
                memory.iter_mut().step_by(4096).for_each(|b| *b += 1);
            } else {
                memory[0] += 1;
            }
            let dirty = tracker.collect(0, memory).unwrap();
            tracker.arm(0, memory).unwrap();
            dirty.page_numbers()
        };
        let all_pages: Vec<usize> = (0..16).collect();
        // A light writer is tracked however long it runs.
        for _ in 0..10 {
            assert_eq!(checkpoint(&mut memory, false), Some(vec![0]));
        }
        // A heavy one is tracked for three checkpoints (their answers still hold)...
        for _ in 0..HEAVY_SCANS_TO_REST {
            assert_eq!(checkpoint(&mut memory, true), Some(all_pages.clone()));
        }
        // ...then hashed for FIRST_REST checkpoints, then watched again.
        for _ in 0..FIRST_REST {
            assert_eq!(checkpoint(&mut memory, true), None);
        }
        assert_eq!(checkpoint(&mut memory, false), Some(vec![0]));
        // Heavy again: the rest is twice as long.
        for _ in 0..HEAVY_SCANS_TO_REST {
            checkpoint(&mut memory, true);
        }
        for _ in 0..FIRST_REST * 2 {
            assert_eq!(checkpoint(&mut memory, false), None);
        }
        assert_eq!(checkpoint(&mut memory, false), Some(vec![0]));
        // A tracker that is not adaptive never rests.
        let mut steady = KernelTracker::new(0).unwrap();
        let mut other = armed(&mut steady, 4);
        for _ in 0..HEAVY_SCANS_TO_REST * 2 {
            other.iter_mut().step_by(4096).for_each(|b| *b += 1);
            assert_eq!(
                steady.collect(0, &other).unwrap().page_numbers(),
                Some(vec![0, 1, 2, 3])
            );
            steady.arm(0, &other).unwrap();
        }
    }

    #[test]
    fn a_moved_memory_is_dirty_once_then_watched_where_it_is_now() {
        if !available() {
            return;
        }
        let mut tracker = KernelTracker::new(0).unwrap();
        let old = memmap2::MmapMut::map_anon(4 * PAGE_SIZE).unwrap();
        tracker.arm(0, &old).unwrap();
        // As wasmtime moves a memory: map the new place, copy, unmap the old.
        let mut new = memmap2::MmapMut::map_anon(6 * PAGE_SIZE).unwrap();
        drop(old);
        assert_eq!(tracker.collect(0, &new).unwrap(), Dirty::All);
        tracker.arm(0, &new).unwrap();
        new[5 * PAGE_SIZE] = 1;
        assert_eq!(pages(tracker.collect(0, &new).unwrap()), vec![5]);
    }

    #[test]
    fn a_scan_of_ranges_the_kernel_no_longer_watches_fails_instead_of_reporting_nothing() {
        if !available() {
            return;
        }
        let mut tracker = KernelTracker::new(0).unwrap();
        let mut memory = armed(&mut tracker, 4);
        memory[0] = 1;
        tracker.lose_registrations();
        let err = tracker.collect(0, &memory).unwrap_err();
        assert!(format!("{err:#}").contains("PAGEMAP_SCAN"), "{err:#}");
        // Disarmed: the next capture hashes everything, and the arm after it watches
        // the memory anew.
        assert_eq!(tracker.collect(0, &memory).unwrap(), Dirty::All);
        tracker.arm(0, &memory).unwrap();
        memory[PAGE_SIZE] = 1;
        assert_eq!(pages(tracker.collect(0, &memory).unwrap()), vec![1]);
        tracker.arm(0, &memory).unwrap();
        // Failing again right after being watched anew gives the memory up for good.
        tracker.lose_registrations();
        tracker.collect(0, &memory).unwrap_err();
        tracker.arm(0, &memory).unwrap();
        tracker.lose_registrations();
        tracker.collect(0, &memory).unwrap_err();
        tracker.arm(0, &memory).unwrap();
        assert_eq!(tracker.collect(0, &memory).unwrap(), Dirty::All);
        tracker.arm(0, &memory).unwrap();
        assert_eq!(tracker.collect(0, &memory).unwrap(), Dirty::All);
    }
}
