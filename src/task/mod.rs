//! A task: one guest, one input, one output, one store.
//!
//! - `config`: the mode and knobs ([`TaskConfig`]), and a task named by paths and URLs
//!   ([`RunConfig`]);
//! - `recovery`: where a task starts: fresh, or the newest usable checkpoint;
//! - `records`, `program`: one driver per [`Mode`], feeding the guest its input;
//! - `checkpoints`: the pause and the hand-over to the committer, shared by both drivers;
//! - `committer`: everything after the pause, on its own thread;
//! - `observer`: what the caller hears of each checkpoint.
//!
//! Checkpoint protocol (fail-closed; the guest is paused between two calls):
//!
//! 1. on the guest's thread (the stall): hand the output emitted so far to the sink (the
//!    new flush marker), capture globals, hash the pages that may have changed, copy dirty
//!    pages out of the guest (`snapshot::capture`);
//! 2. on the committer thread, while the guest goes on: take each dirty page's previous
//!    version out of the page cache and put the new one in, encode deltas or whole pages, put
//!    one pack (under a name unique to this writer), make the output durable, then put
//!    the manifest `manifests/<generation>` with `PutMode::Create`: the commit point,
//!    binding input position, output marker and page table in one atomic put; then
//!    publish the output and prune.
//!
//! Captures the committer has not started on merge into one commit (`coalesce`), and a
//! capture waits only while those in flight hold their budget of copies (at least
//! `max_uncommitted_bytes`) or 64 are queued;
//! without coalescing, at most `max_in_flight` checkpoints are captured and not yet
//! committed before the guest waits (back-pressure). Any error stops the run after the
//! checkpoints before it are settled; the store still holds the newest committed one, and
//! the next run restores it and cuts the output back to its marker.

mod checkpoints;
mod coalesce;
mod committer;
mod config;
mod observer;
mod program;
mod records;
mod recovery;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;

pub use config::{
    DEFAULT_CHECKPOINT_EVERY_BYTES, DEFAULT_CHECKPOINT_INTERVAL, DEFAULT_MAX_IN_FLIGHT,
    DEFAULT_RETAIN, Mode, NEVER, RunConfig, TaskConfig, run,
};
pub use observer::{CheckpointObserver, CheckpointStats, NoObserver};

use crate::Error;
use crate::error::{ErrorKind, Fenced, error};
use crate::guest::{Guest, GuestInstance};
#[cfg(feature = "internals")]
use crate::snapshot::DirtyTracker;
use crate::snapshot::{self, PageBuffers, PageCache};
use crate::store::CheckpointStore;
use crate::store::manifest::RunState;
use crate::store::recent::RecentPacks;
use crate::stream::{Sink, Source};
use checkpoints::{Checkpoints, InputAt};
use committer::{CommitContext, Committer};
use observer::RecordStats;

/// How a run ended.
#[derive(Clone, Debug)]
pub struct RunSummary {
    /// The generation the run resumed from, if it did.
    pub resumed_from: Option<u64>,
    /// Records processed by this run (not counting those before the resumed checkpoint);
    /// 0 in stdio mode.
    pub records: u64,
    /// Input bytes consumed by this run.
    pub input_bytes: u64,
    /// Checkpoints this run took (committed, possibly merged into fewer commits).
    pub checkpoints: u64,
    /// Newest committed generation at the end.
    pub generation: u64,
    /// Wall time of the run, from opening the task.
    pub elapsed: Duration,
    /// Records passed by to the dead letters (`--on-trap skip`), counted in `records`
    /// too; records and input bytes count the records a skip replays once.
    pub skipped: u64,
}

/// What a driver got through in one run.
#[derive(Default)]
struct Worked {
    records: u64,
    checkpoints: u64,
}

/// Feeds the guest its input, in one [`Mode`], taking checkpoints as they fall due.
trait Driver: Send {
    /// Pass by the records at these input offsets, writing each with its error to sink
    /// target `dead_letters` (`--on-trap skip`); a guest error on any other record then
    /// ends the run with a `PoisonRecord`. Only record mode skips.
    fn skip_poison(&mut self, _poison: records::Poison) -> Result<()> {
        anyhow::bail!("--on-trap skip is for record guests, not stdio programs")
    }
    /// Run to the end of the input (or the program's exit).
    fn run(
        &mut self,
        checkpoints: &mut Checkpoints,
        observer: &mut dyn CheckpointObserver,
        worked: &mut Worked,
    ) -> Result<()>;
    /// Where the input stands now.
    fn input_at(&self, instance: &GuestInstance) -> InputAt;
}

/// Asks a running [`Task`] to stop: it finishes the record in hand, takes a last
/// checkpoint, waits until it is committed, and `run` returns. Clones share one flag.
#[derive(Clone, Debug, Default)]
pub struct StopHandle(Arc<AtomicBool>);

impl StopHandle {
    /// A handle not yet stopped.
    pub fn new() -> Self {
        Self::default()
    }

    /// Ask the task to stop at its next record boundary (after a last checkpoint).
    pub fn stop(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    /// Whether a stop was asked for.
    pub fn is_stopped(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// A guest made durable: open it, run it, and it resumes exactly once wherever it stopped.
pub struct Task {
    /// The store's id for this task, which the output's writers are named by.
    task_id: [u8; 16],
    checkpoints: Checkpoints,
    driver: Box<dyn Driver>,
    resumed_from: Option<u64>,
}

impl Task {
    /// Open a task: restore the newest checkpoint in `store` (or start `guest` fresh if
    /// there is none), position `source` at the checkpoint's input position and `sink` at
    /// its output marker. Nothing is written before the input is known to be the one the
    /// checkpoint read.
    pub fn open(
        config: &TaskConfig,
        guest: &Guest,
        store: CheckpointStore,
        source: Box<dyn Source>,
        sink: Box<dyn Sink>,
    ) -> Result<Self, Error> {
        Ok(Self::open_inner(config, guest, store, source, sink)?)
    }

    fn open_inner(
        config: &TaskConfig,
        guest: &Guest,
        store: CheckpointStore,
        mut source: Box<dyn Source>,
        mut sink: Box<dyn Sink>,
    ) -> Result<Self> {
        match (config.mode, guest.is_program()) {
            (Mode::Records { .. }, false) | (Mode::Stdio { .. }, true) => {}
            (Mode::Records { .. }, true) => {
                return Err(error(
                    ErrorKind::InvalidGuest,
                    "the guest is a stdio program; run it in stdio mode (--stdio)",
                ));
            }
            (Mode::Stdio { .. }, false) => {
                return Err(error(
                    ErrorKind::InvalidGuest,
                    "the guest is a record guest; stdio mode runs WASI commands",
                ));
            }
        }
        let writer_id = new_writer_id()?;
        // Before anything is touched: a tracker that cannot be had stops the task here.
        let mut tracker = config.dirty_tracking.tracker()?;
        let task_id = store.task_id()?;
        let newest = |store: &CheckpointStore| store.generations().ok()?.last().copied();
        let listed = newest(&store);
        let mut start = match recovery::start(guest, &store, config.random_seed) {
            Ok(start) => start,
            // Checkpoints that vanish under a restore (pruned) mean another writer is live.
            Err(err) if newest(&store) > listed => {
                return Err(err.context(Fenced {
                    generation: listed.unwrap_or(0) + 1,
                }));
            }
            Err(err) => return Err(err),
        };
        if (start.run_state == RunState::Records) != matches!(config.mode, Mode::Records { .. }) {
            return Err(error(
                ErrorKind::StreamChanged,
                format!(
                    "the store's checkpoints were taken in {} mode; run this task {}",
                    if guest.is_program() {
                        "record"
                    } else {
                        "stdio"
                    },
                    if guest.is_program() {
                        "without --stdio"
                    } else {
                        "with --stdio"
                    },
                ),
            ));
        }
        // A checkpoint of several outputs (or of one and its dead letters) resumed with one
        // output: that output's own marker, for the output's cut now and any later one.
        if sink.output_count() == 1
            && let Some(marker) = start.output_marker.take()
        {
            start.output_marker = Some(crate::stream::multi::Markers::read(&marker)?.single()?);
        }
        // The input first: a replaced input stops the task before its output is cut back.
        let positioned = source
            .resume_at(start.input_position.as_deref())
            .and_then(|()| sink.resume_at(&task_id, start.output_marker.as_deref()))
            .map_err(crate::Error::into_anyhow);
        if let Err(err) = positioned {
            // Streams that moved on under this restore mean another writer is live.
            if newest(&store) > Some(start.generation) {
                return Err(err.context(Fenced {
                    generation: start.generation + 1,
                }));
            }
            return Err(err);
        }
        // What `_initialize` and `init` emitted on a fresh start.
        start.instance.take_emitted(&mut *sink)?;

        // The cache must hold exactly the restored pages; whatever differs is rewritten.
        let mut cache =
            PageCache::open(&config.cache_dir_for(&store), start.instance.memory_count())?;
        tracing::debug!("dirty tracking: {}", config.dirty_tracking.describe());
        for (index, hashes) in start.hashes.iter().enumerate() {
            if !hashes.is_empty() {
                let memory = start.instance.memory(index);
                let rewritten = cache.sync_with(index, memory, hashes)?;
                tracing::debug!(memory = index, rewritten, "page cache synced");
                // A restore wrote every page: only writes from here on are news.
                if let Err(err) = tracker.arm(index, memory) {
                    tracing::warn!("{err:#}");
                }
            }
        }
        let buffers = PageBuffers::shared();
        let committer = Committer::start(CommitContext {
            buffers: buffers.clone(),
            store,
            table: start.table,
            cache,
            writer_id,
            module_sha256: guest.module_sha256(),
            random_seed: start.random_seed,
            retain: config.retain,
            max_deltas: config.max_deltas.min(snapshot::table::MAX_DELTAS_LIMIT),
            known_packs: Default::default(),
            since_full_prune: 0,
            recent: RecentPacks::shared(committer::RECENT_PACKS_BYTES),
            coalesce: config.coalesce && config.max_in_flight > 0,
            known_generation: start.generation,
            guest_waits: Default::default(),
        })?;
        let driver: Box<dyn Driver> = match config.mode {
            Mode::Records { checkpoint_every } => Box::new(records::Records {
                source,
                poison: None,
                checkpoint_every: checkpoint_every.max(1),
                interval: records::IntervalClock::new(config.checkpoint_interval),
                since_checkpoint: 0,
            }),
            Mode::Stdio {
                checkpoint_every_bytes,
            } => {
                let unwind_data = match start.run_state {
                    RunState::ProgramSuspended { unwind_data } => Some(unwind_data),
                    _ => None,
                };
                start
                    .instance
                    .attach_stdin(source, checkpoint_every_bytes, unwind_data)?;
                Box::new(program::Program::at(&start.run_state))
            }
        };
        Ok(Task {
            task_id,
            checkpoints: Checkpoints {
                instance: start.instance,
                sink,
                committer,
                writer_id,
                hashes: start.hashes,
                tracker,
                buffers,
                captured_generation: start.generation,
                committed_generation: start.generation,
                committed_marker: start.output_marker,
                max_in_flight: config.max_in_flight,
                coalesce: config.coalesce && config.max_in_flight > 0,
                max_uncommitted_bytes: config.max_uncommitted_bytes,
                failure: None,
                committer_failed: false,
                capture_failed: false,
                stop: StopHandle::new(),
            },
            driver,
            resumed_from: start.resumed_from,
        })
    }

    /// Feed the guest the rest of its input, checkpointing as the mode says and once more
    /// at the end. Every checkpoint started is settled (committed or failed, and the
    /// observer told) before this returns.
    pub fn run(&mut self, observer: &mut dyn CheckpointObserver) -> Result<RunSummary, Error> {
        let started = Instant::now();
        let offset_before = self.input_offset();
        let mut worked = Worked::default();
        let outcome = self
            .driver
            .run(&mut self.checkpoints, observer, &mut worked);
        let checkpoints = &mut self.checkpoints;
        checkpoints.settle_all(observer);
        let failure = checkpoints.failure.take();
        let checkpoint_failed = failure.is_some() || checkpoints.committer_failed;
        let outcome = match (outcome, failure) {
            (Ok(()), Some(failure)) => Err(failure.into_anyhow()),
            // A failed commit (a fenced writer, say) must not be hidden behind a record
            // to skip: the caller would reopen the task instead of stopping.
            (Err(err), Some(failure)) if err.is::<crate::error::PoisonRecord>() => {
                Err(failure.into_anyhow())
            }
            (Err(err), None) if checkpoint_failed && err.is::<crate::error::PoisonRecord>() => Err(
                anyhow::anyhow!("{err:#} (not skipped: a checkpoint had failed before it)"),
            ),
            (outcome, _) => outcome,
        };
        if let Err(err) = outcome {
            // Only committed output may stay: the next run replays from the checkpoint. But
            // a failed commit may have landed all the same (a lost reply): then the newest
            // committed marker is unknown, and the output stays for the next run to cut.
            if !checkpoint_failed
                && let Err(cut) = checkpoints
                    .sink
                    .resume_at(&self.task_id, checkpoints.committed_marker.as_deref())
            {
                let err = err.context(format!("and the output could not be cut back: {cut:#}"));
                return Err(err.into());
            }
            return Err(err.into());
        }
        Ok(RunSummary {
            resumed_from: self.resumed_from,
            records: worked.records,
            input_bytes: self.input_offset() - offset_before,
            checkpoints: worked.checkpoints,
            generation: self.checkpoints.committed_generation,
            elapsed: started.elapsed(),
            skipped: 0,
        })
    }

    /// Pass by the records at these input offsets (`--on-trap skip`, see `RunConfig::run`).
    pub(crate) fn skip_poison(&mut self, poison: records::Poison) -> Result<(), Error> {
        Ok(self.driver.skip_poison(poison)?)
    }

    /// Take one checkpoint now and wait until it (and every one before it) is committed.
    pub fn checkpoint(
        &mut self,
        observer: &mut dyn CheckpointObserver,
    ) -> Result<CheckpointStats, Error> {
        let checkpoints = &mut self.checkpoints;
        let generation = checkpoints.captured_generation + 1;
        let mut stats = None;
        let mut record = RecordStats {
            inner: observer,
            generation,
            stats: &mut stats,
        };
        let input = self.driver.input_at(&checkpoints.instance);
        let started = checkpoints.start(input, &mut record);
        checkpoints.settle_all(&mut record);
        if let Some(failure) = checkpoints.failure.take() {
            return Err(failure);
        }
        started?;
        stats.ok_or_else(|| anyhow::anyhow!("checkpoint {generation} did not finish").into())
    }

    /// A handle that stops [`Task::run`] from another thread (record mode; a stdio
    /// program runs to its exit).
    pub fn stop_handle(&self) -> StopHandle {
        self.checkpoints.stop.clone()
    }

    /// The same task, stopped by `handle` (made before the task was opened: a stop asked
    /// for while it restored is heard at its first record).
    pub fn with_stop_handle(mut self, handle: StopHandle) -> Self {
        self.checkpoints.stop = handle;
        self
    }

    /// The newest committed generation (0 before the first checkpoint).
    pub fn generation(&self) -> u64 {
        self.checkpoints.committed_generation
    }

    /// The checkpoint the task resumed from, if it did.
    pub fn resumed_from(&self) -> Option<u64> {
        self.resumed_from
    }

    /// Where the input stands: bytes of a byte input, the next offset of a Kafka partition.
    pub fn input_offset(&self) -> u64 {
        self.driver.input_at(&self.checkpoints.instance).offset
    }

    /// The live guest (tests tamper with it to show what a restore must bring back).
    #[cfg(feature = "internals")]
    pub fn instance(&mut self) -> &mut GuestInstance {
        &mut self.checkpoints.instance
    }

    /// Replace the dirty tracker. The next capture hashes every page, since the new
    /// tracker has seen none of the writes so far.
    #[cfg(feature = "internals")]
    pub fn set_dirty_tracker(&mut self, tracker: Box<dyn DirtyTracker>) {
        self.checkpoints.tracker = tracker;
    }
}

fn new_writer_id() -> Result<[u8; 16]> {
    let mut id = [0u8; 16];
    getrandom::fill(&mut id).map_err(|e| anyhow::anyhow!("cannot draw a writer id: {e}"))?;
    Ok(id)
}
