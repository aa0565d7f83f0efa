//! Taking checkpoints, shared by both drivers: the pause (capture) on the guest's thread,
//! the hand-over to the committer, back-pressure, and settling what the committer
//! finished. Fail-closed: the first error stops the run once everything in flight has
//! settled; the store still holds the newest committed checkpoint.

use std::time::Instant;

use anyhow::Result;

use super::StopHandle;
use super::committer::{Committer, Done, Job};
use super::observer::CheckpointObserver;
use crate::Error;
use crate::guest::GuestInstance;
use crate::snapshot::{self, DirtyTracker, PageBuffers};
use crate::store::manifest::RunState;
use crate::stream::Sink;

/// With coalescing: a capture waits while this many are in flight, however small.
const MAX_QUEUED_CAPTURES: usize = 64;

/// With coalescing, whether a capture must wait for the committer: two or more captures
/// in flight hold their budget of copies (`max_uncommitted_bytes`, or one copy of the
/// guest's memory if that is more), or very many are in flight.
///
/// Asked before a capture rather than after it: the copies a capture makes exist either
/// way, and a wait after it would stop the guest for that capture's own commit. One
/// capture alone never holds the next back, and the budget is at least the guest's
/// memory, because a guest's first capture is all of it (every non-zero page): otherwise
/// every capture would wait behind that first commit, however small it is. The capture
/// after that still waits if the first commit is not done by then (two intervals
/// later). Page copies handed over, at most: the larger of the budget and one capture,
/// plus one capture.
fn no_room_to_capture(
    in_flight: usize,
    in_flight_bytes: u64,
    max_uncommitted_bytes: u64,
    memory_bytes: u64,
) -> bool {
    let budget = max_uncommitted_bytes.max(memory_bytes);
    in_flight >= MAX_QUEUED_CAPTURES || (in_flight >= 2 && in_flight_bytes >= budget)
}

/// Where the input stands at a checkpoint, as the driver reports it.
pub(super) struct InputAt {
    /// Bytes consumed (statistics).
    pub offset: u64,
    /// Opaque: the source's position, handed back to it on restore.
    pub position: Vec<u8>,
    pub run_state: RunState,
}

/// The guest, its output, and everything a checkpoint needs from one to the next.
pub(super) struct Checkpoints {
    pub instance: GuestInstance,
    pub sink: Box<dyn Sink>,
    pub committer: Committer,
    /// This process's id in the names of what it writes (packs, output parts).
    pub writer_id: [u8; 16],
    /// Page hashes of the newest capture: what the next one is compared with.
    pub hashes: Vec<Vec<u64>>,
    /// Armed whenever `hashes` describe the memories exactly: which pages the next
    /// capture must hash.
    pub tracker: Box<dyn DirtyTracker>,
    /// Where captures copy pages; the committer gives the copies back.
    pub buffers: PageBuffers,
    /// The newest generation captured (0 before the first).
    pub captured_generation: u64,
    /// The newest committed checkpoint's generation and output marker (`None` before the
    /// first checkpoint of a fresh start).
    pub committed_generation: u64,
    pub committed_marker: Option<Vec<u8>>,
    pub max_in_flight: usize,
    /// Captures merge while they wait for the committer (`task::coalesce`).
    pub coalesce: bool,
    /// With coalescing: the least budget of page copies the captures in flight may hold
    /// before the next capture waits (`no_room_to_capture`).
    pub max_uncommitted_bytes: u64,
    /// The first checkpoint error, reported once everything in flight has settled.
    pub failure: Option<Error>,
    /// A checkpoint failed: whether its manifest landed is unknown.
    pub committer_failed: bool,
    /// A capture failed (or was never handed over) after it had moved the page hashes,
    /// the dirty tracker and a component's kv log on: later captures would describe
    /// changes against a state no checkpoint recorded, so there are none.
    pub capture_failed: bool,
    /// Set from outside to end the run at the next record, with a last checkpoint.
    pub stop: StopHandle,
}

impl Checkpoints {
    /// Capture a checkpoint of the guest with its input at `input`, and hand it to the
    /// committer, settling what has finished. Back-pressure: with coalescing, the capture
    /// first waits for room (`must_wait_to_capture`); without, the guest waits after it
    /// while more than `max_in_flight` are in flight.
    pub fn start(&mut self, input: InputAt, observer: &mut dyn CheckpointObserver) -> Result<()> {
        self.settle(observer, false);
        self.take_failure()?;
        while self.coalesce && self.must_wait_to_capture() && self.failure.is_none() {
            self.settle(observer, true);
        }
        self.take_failure()?;
        let generation = self.captured_generation + 1;
        if self.capture_failed {
            anyhow::bail!(
                "checkpoint {generation} cannot be taken: an earlier capture failed; run the task again to resume from its newest checkpoint"
            );
        }
        observer.started(generation);
        let job = match self.capture(generation, input) {
            Ok(job) => job,
            Err(err) => {
                self.capture_failed = true;
                let err = Error::from(err);
                observer.finished(generation, Err(&err));
                return Err(err.into_anyhow());
            }
        };
        let memories: Vec<&[u8]> = (0..self.instance.memory_count())
            .map(|i| self.instance.memory(i))
            .collect();
        observer.captured(generation, &memories);
        self.captured_generation = generation;
        if let Err(err) = self.committer.submit(job) {
            self.capture_failed = true;
            let err = Error::from(err);
            observer.finished(generation, Err(&err));
            return Err(err.into_anyhow());
        }
        while !self.coalesce
            && self.committer.in_flight() > self.max_in_flight
            && self.failure.is_none()
        {
            self.settle(observer, true);
        }
        self.take_failure()
    }

    /// With coalescing, whether the next capture must wait for the committer
    /// (`no_room_to_capture`).
    fn must_wait_to_capture(&self) -> bool {
        let memory_bytes = (0..self.instance.memory_count())
            .map(|index| self.instance.memory(index).len() as u64)
            .sum();
        no_room_to_capture(
            self.committer.in_flight(),
            self.committer.in_flight_bytes(),
            self.max_uncommitted_bytes,
            memory_bytes,
        )
    }

    /// Settle what the committer has finished, without waiting; the first failure stops
    /// the run.
    pub fn settle_finished(&mut self, observer: &mut dyn CheckpointObserver) -> Result<()> {
        self.settle(observer, false);
        self.take_failure()
    }

    fn take_failure(&mut self) -> Result<()> {
        match self.failure.take() {
            Some(failure) => Err(failure.into_anyhow()),
            None => Ok(()),
        }
    }

    /// The pause: everything the committer needs, copied out of the guest.
    fn capture(&mut self, generation: u64, input: InputAt) -> Result<Job> {
        let paused_at = Instant::now();
        let output = self
            .sink
            .checkpoint(generation, &self.writer_id)
            .map_err(crate::Error::into_anyhow)?;
        let capturing = Instant::now();
        let capture = snapshot::capture(
            &mut self.instance,
            &mut self.hashes,
            self.tracker.as_mut(),
            &self.buffers,
        )?;
        let hash = capturing.elapsed();
        let stall = paused_at.elapsed();
        Ok(Job {
            generation,
            capture,
            run_state: input.run_state,
            input_offset: input.offset,
            input_position: input.position,
            output,
            random_position: self.instance.random_position(),
            paused_at,
            stall,
            hash,
            captures: 1,
        })
    }

    /// Take finished checkpoints from the committer (waiting for one if `block`).
    pub fn settle(&mut self, observer: &mut dyn CheckpointObserver, block: bool) {
        while let Some(Done {
            generation,
            output_marker,
            outcome,
        }) = self.committer.next_done(block)
        {
            match outcome {
                Ok(stats) => {
                    observer.finished(generation, Ok(&stats));
                    // A capture merged into a later commit was never committed itself; the
                    // later one's answer follows at once.
                    if stats.generation == generation {
                        self.committed_generation = generation;
                        self.committed_marker = Some(output_marker);
                    }
                }
                Err(err) => {
                    let err = Error::from(err);
                    observer.finished(generation, Err(&err));
                    self.committer_failed = true;
                    self.failure.get_or_insert(err);
                }
            }
            if block {
                return;
            }
        }
    }

    /// Wait for every checkpoint in flight.
    pub fn settle_all(&mut self, observer: &mut dyn CheckpointObserver) {
        while self.committer.in_flight() > 0 {
            self.settle(observer, true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{MAX_QUEUED_CAPTURES, no_room_to_capture};

    const MIB: u64 = 1 << 20;

    #[test]
    fn a_capture_waits_only_for_copies_already_over_the_budget() {
        // Nothing in flight: never wait, whatever the budget (even none).
        assert!(!no_room_to_capture(0, 0, 0, 0));
        // A small guest: the budget is max_uncommitted_bytes.
        assert!(!no_room_to_capture(3, 255 * MIB, 256 * MIB, 16 * MIB));
        assert!(no_room_to_capture(3, 256 * MIB, 256 * MIB, 16 * MIB));
        // A 1 GiB guest's first capture (all of it, and output besides) does not hold the
        // next one back...
        assert!(!no_room_to_capture(1, 1100 * MIB, 256 * MIB, 1024 * MIB));
        // ...nor, with a first capture of most of it, a small one...
        assert!(!no_room_to_capture(2, 1000 * MIB, 256 * MIB, 1024 * MIB));
        // ...but with a second copy of it in flight, the next capture waits; and so does
        // the one after a first capture of all of it and a small one.
        assert!(no_room_to_capture(2, 1024 * MIB, 256 * MIB, 1024 * MIB));
        assert!(no_room_to_capture(2, 1025 * MIB, 256 * MIB, 1024 * MIB));
        // A small guest's one capture, however large, holds nothing back either.
        assert!(!no_room_to_capture(1, 300 * MIB, 256 * MIB, 16 * MIB));
        // However small, at most MAX_QUEUED_CAPTURES are in flight.
        assert!(!no_room_to_capture(
            MAX_QUEUED_CAPTURES - 1,
            0,
            256 * MIB,
            0
        ));
        assert!(no_room_to_capture(MAX_QUEUED_CAPTURES, 0, 256 * MIB, 0));
    }
}
