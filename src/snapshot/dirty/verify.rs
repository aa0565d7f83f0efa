//! A tracker that checks another: it hashes every 4 KiB part of every page at `arm` and
//! again at `collect`, and fails with [`MissedWrites`] if a part changed that the inner
//! tracker did not report (its page, or that part of its page). What it returns is the inner tracker's answer, so the rest of the pipeline
//! runs exactly as it would without the check. Twice the cost of hashing: for checking a
//! kernel or a container before trusting kernel tracking, and for the tests.

use anyhow::Result;

use super::{Dirty, DirtyTracker, PART_SIZE};
use crate::snapshot::pages::{self, PAGE_SIZE};

/// The inner tracker missed changed pages: trusting it would lose data.
#[derive(Debug, thiserror::Error)]
#[error(
    "dirty tracking missed writes: memory {memory} pages {pages:?} changed since the last \
     checkpoint but were not reported (this kernel's write tracking cannot be trusted here; \
     use --dirty-tracking hash)"
)]
pub struct MissedWrites {
    pub memory: usize,
    pub pages: Vec<usize>,
}

pub struct VerifyingTracker<T> {
    inner: T,
    /// Every part's hash at the last `arm`, per memory.
    armed: Vec<Option<Vec<u64>>>,
}

impl<T: DirtyTracker> VerifyingTracker<T> {
    pub fn new(inner: T) -> Self {
        Self {
            inner,
            armed: Vec::new(),
        }
    }
}

impl<T: DirtyTracker> DirtyTracker for VerifyingTracker<T> {
    fn collect(&mut self, index: usize, memory: &[u8]) -> Result<Dirty> {
        let dirty = self.inner.collect(index, memory)?;
        let before = self.armed.get_mut(index).and_then(Option::take);
        let (Dirty::Pages(reported), Some(before)) = (&dirty, before) else {
            return Ok(dirty);
        };
        let mut missed: Vec<usize> = Vec::new();
        for (part, bytes) in memory.chunks(PART_SIZE).enumerate() {
            if before.get(part) == Some(&pages::hash_page(bytes)) {
                continue;
            }
            let (page, bit) = (part * PART_SIZE / PAGE_SIZE, part % (PAGE_SIZE / PART_SIZE));
            let reported = reported
                .binary_search_by_key(&page, |p| p.page)
                .is_ok_and(|i| reported[i].parts & (1 << bit) != 0);
            if !reported && missed.last() != Some(&page) {
                missed.push(page);
            }
        }
        if missed.is_empty() {
            Ok(dirty)
        } else {
            Err(MissedWrites {
                memory: index,
                pages: missed,
            }
            .into())
        }
    }

    fn arm(&mut self, index: usize, memory: &[u8]) -> Result<()> {
        self.inner.arm(index, memory)?;
        if self.armed.len() <= index {
            self.armed.resize(index + 1, None);
        }
        self.armed[index] = Some(memory.chunks(PART_SIZE).map(pages::hash_page).collect());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::dirty::DirtyPage;

    /// A tracker that reports a fixed answer: part 0 of page 1, and nothing else.
    struct Forgetful;
    impl DirtyTracker for Forgetful {
        fn collect(&mut self, _: usize, _: &[u8]) -> Result<Dirty> {
            Ok(Dirty::Pages(vec![DirtyPage { page: 1, parts: 1 }]))
        }
        fn arm(&mut self, _: usize, _: &[u8]) -> Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_change_the_inner_tracker_did_not_report_fails_the_collect() {
        let mut memory = vec![0u8; 4 * PAGE_SIZE];
        let mut tracker = VerifyingTracker::new(Forgetful);
        tracker.arm(0, &memory).unwrap();
        memory[PAGE_SIZE] = 1;
        assert_eq!(
            tracker.collect(0, &memory).unwrap().page_numbers(),
            Some(vec![1])
        );
        // A page not reported, and a part of a reported page that was not.
        for (at, page) in [(2 * PAGE_SIZE, 2), (PAGE_SIZE + 3 * PART_SIZE, 1)] {
            tracker.arm(0, &memory).unwrap();
            memory[PAGE_SIZE + 1] += 1;
            memory[at] += 1;
            let err = tracker.collect(0, &memory).unwrap_err();
            let missed = err.downcast_ref::<MissedWrites>().expect("MissedWrites");
            assert_eq!((missed.memory, missed.pages.clone()), (0, vec![page]));
        }
    }
}
