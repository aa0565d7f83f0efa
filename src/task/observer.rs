//! What a task tells its caller about checkpoints: [`CheckpointObserver`] hears of every
//! one, on every path, with its [`CheckpointStats`] or its error.

use std::time::Duration;

use crate::Error;

/// What one checkpoint did and cost.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct CheckpointStats {
    /// The checkpoint's generation (a merged commit's: its newest capture's).
    pub generation: u64,
    /// Captures this commit covered: 1, or more where captures that waited for the
    /// committer merged (their generations are told the same stats).
    pub captures: usize,
    /// Input bytes (or a Kafka offset) consumed before the checkpoint.
    pub input_offset: u64,
    /// Output bytes the checkpoint commits in all.
    pub output_marker: u64,
    /// Bytes of the guest's memories at the checkpoint.
    pub memory_bytes: u64,
    /// Pages that changed and were written (as deltas or whole).
    pub dirty_pages: usize,
    /// Pages that changed to all-zero (recorded, not written).
    pub zero_pages: usize,
    /// Pages hashed during the stall: all of them, or those the dirty tracker reported.
    pub hashed_pages: usize,
    /// Memories whose changed pages the kernel reported (`snapshot::dirty`); the others
    /// were hashed whole.
    pub kernel_tracked_memories: usize,
    /// Dirty pages written as deltas (XOR, sparse or zstd-prefix) against their previous
    /// version.
    pub delta_pages: usize,
    /// Of the deltas, those of full chains, against an earlier layer of the chain (the
    /// deltas above it dropped).
    pub rebased_pages: usize,
    /// Dirty pages written whole (new pages, big changes, full chains).
    pub whole_pages: usize,
    /// Frames copied from sparse older packs (compaction), and their bytes.
    pub compacted_frames: usize,
    /// Bytes of the compacted frames.
    pub compacted_bytes: usize,
    /// Bytes of the dirty pages' frames in the pack (the pack less header and compaction).
    pub encoded_bytes: usize,
    /// Bytes of the pack written (0 when nothing changed and no pack was needed).
    pub pack_bytes: usize,
    /// Bytes of the manifest committed.
    pub manifest_bytes: usize,
    /// Time the guest was paused: output hand-over, hashing, copying dirty pages.
    pub stall: Duration,
    /// Of the stall, the capture: hashing, diffing, copying dirty pages and their bases.
    pub hash: Duration,
    /// Off the guest's thread: compressing, compacting.
    pub encode: Duration,
    /// Off the guest's thread: putting the pack, making the output durable, committing.
    pub put: Duration,
    /// Off the guest's thread, after the commit: making the output visible (an object
    /// output's index entries, and merging its parts).
    pub publish: Duration,
    /// Off the guest's thread: deleting what retention no longer keeps.
    pub prune: Duration,
    /// From the pause to the commit.
    pub committed_after: Duration,
}

/// Told about every checkpoint: when it starts, and how it ended, on every path (a run
/// settles every checkpoint it started before it returns, with success or an error).
pub trait CheckpointObserver {
    /// Checkpoint `generation` is about to be captured (the guest is paused next).
    fn started(&mut self, _generation: u64) {}
    /// Right after the capture, with the guest still paused exactly as captured: the bytes
    /// of each of its memories. Not counted in the stall (the benchmark computes its
    /// baseline here).
    fn captured(&mut self, _generation: u64, _memories: &[&[u8]]) {}
    /// A capture merged into a later one's commit (coalescing) finishes with that commit's
    /// stats: `stats.generation` is then the later generation, and `generation` itself is
    /// never committed. Observers that count commits count those where the two are equal.
    fn finished(&mut self, _generation: u64, _outcome: Result<&CheckpointStats, &Error>) {}
}

/// An observer that ignores everything.
pub struct NoObserver;
impl CheckpointObserver for NoObserver {}

/// Passes everything on, and keeps the stats of one generation.
pub(super) struct RecordStats<'a> {
    pub inner: &'a mut dyn CheckpointObserver,
    pub generation: u64,
    pub stats: &'a mut Option<CheckpointStats>,
}

impl CheckpointObserver for RecordStats<'_> {
    fn started(&mut self, generation: u64) {
        self.inner.started(generation)
    }
    fn captured(&mut self, generation: u64, memories: &[&[u8]]) {
        self.inner.captured(generation, memories)
    }
    fn finished(&mut self, generation: u64, outcome: Result<&CheckpointStats, &Error>) {
        if generation == self.generation
            && let Ok(stats) = outcome
        {
            *self.stats = Some(stats.clone());
        }
        self.inner.finished(generation, outcome)
    }
}
