//! Coalescing: captures the committer has not started on yet merge into one, so the store
//! is written as often as it can take and the guest never queues behind it.
//!
//! A capture holds the pages that changed since the capture before it. Two consecutive
//! captures `a` then `b` merge into one that holds, for every page either changed, its
//! newest version (`b`'s if it has one) with its delta base as `a` saw it (the version
//! before both, which is what the committer's page cache holds), the parts written in
//! either, and everything else as `b` left it: globals, memory sizes, input position and
//! output marker. The output of both is committed in order. What is committed is still
//! one state bound to one input position and one flush marker: `b`'s, exactly as if `a`
//! had never been captured. The merged commit takes `b`'s generation; `a`'s is never
//! created (generations only go up, with gaps).
//!
//! ```text
//! a: pages {1, 4}, zeroed {7}        b: pages {4, 9}, zeroed {1}
//! a + b: pages {4 (b's bytes, a's base), 9}, zeroed {1, 7}
//! ```

use std::collections::BTreeMap;

use super::committer::Job;
use crate::snapshot::PageBuffers;
use crate::snapshot::capture::CapturedPage;
use crate::stream::{OutputCommit, OutputFlush};

impl Job {
    /// Merge `later`, captured right after this job, into it (see the module doc). Page
    /// copies that `later` superseded go back to `buffers`.
    pub fn absorb(&mut self, later: Job, buffers: &PageBuffers) {
        let Job {
            generation,
            capture,
            run_state,
            input_offset,
            input_position,
            output,
            random_position,
            paused_at: _,
            stall,
            hash,
            captures,
        } = later;

        // Pages: `later`'s versions over this job's; the base (`previous_hash`) stays the
        // one this job saw, since the page cache has not moved on between the two.
        let mut pages: BTreeMap<(usize, u32), CapturedPage> =
            std::mem::take(&mut self.capture.dirty)
                .into_iter()
                .map(|page| ((page.memory, page.page), page))
                .collect();
        let mut superseded = Vec::new();
        let zeroed_here: std::collections::HashSet<(usize, u32)> =
            self.capture.zeroed.iter().copied().collect();
        for page in capture.dirty {
            let key = (page.memory, page.page);
            match pages.remove(&key) {
                Some(earlier) => {
                    let merged = CapturedPage {
                        previous_hash: earlier.previous_hash,
                        written_parts: earlier.written_parts | page.written_parts,
                        ..page
                    };
                    superseded.push(earlier.bytes);
                    pages.insert(key, merged);
                }
                // Zeroed by this job and written again by `later`: the version before both
                // is unknown here, so no base (a whole page, never a wrong delta).
                None if zeroed_here.contains(&key) => {
                    pages.insert(
                        key,
                        CapturedPage {
                            previous_hash: None,
                            ..page
                        },
                    );
                }
                None => {
                    pages.insert(key, page);
                }
            }
        }
        // Zeroed by `later`: no longer dirty; written again by `later`: no longer zero.
        for key in &capture.zeroed {
            if let Some(earlier) = pages.remove(key) {
                superseded.push(earlier.bytes);
            }
        }
        let mut zeroed: Vec<(usize, u32)> = self
            .capture
            .zeroed
            .iter()
            .chain(&capture.zeroed)
            .filter(|key| !pages.contains_key(key))
            .copied()
            .collect();
        zeroed.sort_unstable();
        zeroed.dedup();
        buffers.give_back(superseded);

        self.capture.dirty = pages.into_values().collect();
        self.capture.zeroed = zeroed;
        self.capture.globals = capture.globals;
        self.capture.host_state = capture.host_state;
        self.capture.kv = match (self.capture.kv.take(), capture.kv) {
            (Some(earlier), Some(later)) => Some(earlier.then(later)),
            (earlier, later) => later.or(earlier),
        };
        self.capture.memories = capture.memories;
        self.capture.hashed_pages += capture.hashed_pages;
        self.capture.kernel_tracked_memories = capture.kernel_tracked_memories;

        self.generation = generation;
        self.run_state = run_state;
        self.input_offset = input_offset;
        self.input_position = input_position;
        self.random_position = random_position;
        // The lag counts from the oldest pause; the stall is what the guest paid in all.
        self.stall += stall;
        self.hash += hash;
        self.captures += captures;

        let earlier = std::mem::replace(&mut self.output.commit, Box::new(InOrder(Vec::new())));
        // An earlier commit that the later one does in full (a file's) is dropped: one
        // fsync for both.
        let commit = match earlier.done_by_the_next() {
            true => output.commit,
            false => Box::new(InOrder(vec![earlier, output.commit])),
        };
        self.output = OutputFlush {
            marker: output.marker,
            bytes: output.bytes,
            commit,
        };
    }
}

/// The output commits of merged captures, carried out in capture order.
struct InOrder(Vec<Box<dyn OutputCommit>>);

impl OutputCommit for InOrder {
    fn make_durable(&mut self) -> crate::Result<()> {
        self.0.iter_mut().try_for_each(|c| c.make_durable())
    }

    fn publish(&mut self) -> crate::Result<()> {
        self.0.iter_mut().try_for_each(|c| c.publish())
    }

    fn held_bytes(&self) -> u64 {
        self.0.iter().map(|c| c.held_bytes()).sum()
    }

    fn done_by_the_next(&self) -> bool {
        self.0.iter().all(|c| c.done_by_the_next())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::Capture;
    use crate::snapshot::capture::CapturedMemory;
    use crate::state::GlobalValue;
    use crate::store::manifest::RunState;
    use std::sync::{Arc, Mutex};

    /// An output commit that records its calls, and holds 100 bytes of output until then.
    struct Noted(&'static str, Arc<Mutex<Vec<String>>>);

    impl OutputCommit for Noted {
        fn held_bytes(&self) -> u64 {
            100
        }
        fn make_durable(&mut self) -> crate::Result<()> {
            self.1.lock().unwrap().push(format!("durable {}", self.0));
            Ok(())
        }
        fn publish(&mut self) -> crate::Result<()> {
            self.1.lock().unwrap().push(format!("publish {}", self.0));
            Ok(())
        }
    }

    /// A `Noted` that the next commit of its output does in full (as a file's is).
    struct DoneByTheNext(Noted);

    impl OutputCommit for DoneByTheNext {
        fn make_durable(&mut self) -> crate::Result<()> {
            self.0.make_durable()
        }
        fn publish(&mut self) -> crate::Result<()> {
            self.0.publish()
        }
        fn done_by_the_next(&self) -> bool {
            true
        }
    }

    #[test]
    fn an_output_commit_the_next_one_does_in_full_is_dropped_from_a_merge() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let buffers = PageBuffers::shared();
        let file =
            |name| -> Box<dyn OutputCommit> { Box::new(DoneByTheNext(Noted(name, log.clone()))) };
        // One sink makes every commit of a task: all three are of the same kind.
        let [mut a, b, c] = ["a", "b", "c"].map(|name| {
            let mut job = job(5, Vec::new(), Vec::new(), &log, name);
            job.output.commit = file(name);
            job
        });
        a.absorb(b, &buffers);
        a.absorb(c, &buffers);
        a.output.commit.make_durable().unwrap();
        a.output.commit.publish().unwrap();
        assert_eq!(*log.lock().unwrap(), vec!["durable c", "publish c"]);
    }

    fn page(page: u32, byte: u8, previous: Option<u64>, parts: u16) -> CapturedPage {
        CapturedPage {
            memory: 0,
            page,
            bytes: vec![byte; 16],
            previous_hash: previous,
            written_parts: parts,
            base: None,
        }
    }

    fn job(
        generation: u64,
        dirty: Vec<CapturedPage>,
        zeroed: Vec<(usize, u32)>,
        log: &Arc<Mutex<Vec<String>>>,
        name: &'static str,
    ) -> Job {
        Job {
            generation,
            capture: Capture {
                globals: vec![GlobalValue::I32(generation as i32)],
                host_state: Vec::new(),
                kv: None,
                memories: vec![CapturedMemory {
                    byte_len: generation << 16,
                    digest: generation,
                }],
                dirty,
                zeroed,
                hashed_pages: 10,
                kernel_tracked_memories: 0,
            },
            run_state: RunState::Records,
            input_offset: generation * 100,
            input_position: vec![generation as u8],
            output: OutputFlush {
                marker: vec![generation as u8],
                bytes: generation * 10,
                commit: Box::new(Noted(name, log.clone())),
            },
            random_position: generation,
            paused_at: std::time::Instant::now(),
            stall: std::time::Duration::from_millis(1),
            hash: std::time::Duration::from_millis(1),
            captures: 1,
        }
    }

    #[test]
    fn the_newest_version_of_each_page_with_the_oldest_base_and_both_outputs_in_order() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let buffers = PageBuffers::shared();
        let mut a = job(
            5,
            vec![page(1, 1, Some(11), 0b01), page(4, 1, Some(14), 0b01)],
            vec![(0, 7), (0, 8)],
            &log,
            "a",
        );
        let b = job(
            6,
            vec![
                page(4, 2, Some(99), 0b10),
                page(8, 2, Some(98), 0b10),
                page(9, 2, Some(19), 0b10),
            ],
            vec![(0, 1)],
            &log,
            "b",
        );
        // Page copies (16 bytes each) and output not yet written count against the
        // memory budget of waiting captures, before and after a merge.
        assert_eq!(
            (a.held_bytes(), b.held_bytes()),
            (2 * 16 + 100, 3 * 16 + 100)
        );
        a.absorb(b, &buffers);
        assert_eq!(a.held_bytes(), 3 * 16 + 2 * 100);
        let pages: Vec<_> = a
            .capture
            .dirty
            .iter()
            .map(|p| (p.page, p.bytes[0], p.previous_hash, p.written_parts))
            .collect();
        assert_eq!(
            pages,
            vec![
                (4, 2, Some(14), 0b11), // b's bytes on a's base, parts of both
                (8, 2, None, 0b10),     // zeroed by a, written by b: no base
                (9, 2, Some(19), 0b10),
            ]
        );
        assert_eq!(a.capture.zeroed, vec![(0, 1), (0, 7)]);
        assert_eq!(
            (
                a.generation,
                a.input_offset,
                a.input_position.clone(),
                a.random_position
            ),
            (6, 600, vec![6], 6)
        );
        assert_eq!(a.capture.globals, vec![GlobalValue::I32(6)]);
        assert_eq!(a.capture.memories[0].byte_len, 6 << 16);
        assert_eq!(
            (a.output.marker.clone(), a.output.bytes, a.captures),
            (vec![6], 60, 2)
        );
        assert_eq!(a.capture.hashed_pages, 20);
        a.output.commit.make_durable().unwrap();
        a.output.commit.publish().unwrap();
        assert_eq!(
            *log.lock().unwrap(),
            vec!["durable a", "durable b", "publish a", "publish b"]
        );
    }
}
