//! A task: one guest, one input, one output, one store. The run loop lives here; what
//! happens after a checkpoint's pause lives in `committer`.
//!
//! Checkpoint protocol (fail-closed; the guest is paused between two `process` calls):
//!
//! 1. on the guest's thread (the stall): write the output buffer (its length is the new
//!    flush marker), capture globals, hash every page, copy dirty pages and their previous
//!    versions out of the guest (`snapshot::capture`);
//! 2. on the committer thread, while the guest goes on: encode deltas or whole pages, put
//!    one pack (under a name unique to this writer), fsync the output, then put the
//!    manifest `manifests/<generation>` with `PutMode::Create`: the commit point, binding
//!    input offset, flush marker and page table in one atomic put; then prune.
//!
//! At most `max_in_flight` checkpoints are captured and not yet committed; the guest waits
//! when the store is slower than that (back-pressure). Any error stops the run after the
//! checkpoints before it are settled; the store still holds the newest committed one, and
//! the next run restores it and cuts the output back to its marker.

mod committer;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::error::{ModuleChanged, StoreUnavailable};
use crate::guest::{Guest, GuestInstance, Limits, ProgramOutcome, random};
use crate::snapshot::{self, DirtyTracker, DirtyTracking, PageBuffers, PageCache, PageTable};
use crate::store::manifest::RunState;
use crate::store::recent::RecentPacks;
use crate::store::{self, CheckpointStore, Manifest};
use crate::stream::{self as streams, Sink, Source};
use committer::{CommitContext, Committer, Done, Job};

/// How many checkpoints a task keeps by default.
pub const DEFAULT_RETAIN: usize = 3;

/// How many checkpoints may be captured and not yet committed, by default.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 2;

/// In stdio mode, checkpoint at the first stdin read after this many bytes, by default.
pub const DEFAULT_CHECKPOINT_EVERY_BYTES: u64 = 1 << 20;

/// What `wasnap run` is asked to do.
#[derive(Clone, Debug)]
pub struct RunConfig {
    pub guest: PathBuf,
    pub input: PathBuf,
    pub output: PathBuf,
    /// Take a checkpoint after this many records (and always at the end of input).
    pub checkpoint_every: u64,
    /// Seed of the guest's WASI random stream on a fresh start (a restore uses the checkpoint's).
    pub random_seed: u64,
    /// Print progress to stderr every few seconds.
    pub progress: bool,
    /// Keep this many newest checkpoints; older ones, and packs none of the kept ones
    /// need, are deleted after each commit. `usize::MAX` keeps everything.
    pub retain: usize,
    /// Memory cap and per-call time limit for the guest.
    pub limits: Limits,
    /// Checkpoints captured but not yet committed before the guest waits; 0 commits each
    /// checkpoint before the guest goes on.
    pub max_in_flight: usize,
    /// Where the page cache lives; `<output>.wasnap-cache` beside the output if `None`.
    pub cache_dir: Option<PathBuf>,
    /// Deltas a page's chain may have (what a restore applies at most on top of a whole
    /// page); 0 writes every dirty page whole. At most `snapshot::table::MAX_DELTAS_LIMIT`.
    pub max_deltas: usize,
    /// Stdio mode: `guest` is an unmodified WASI command reading `input` as stdin and
    /// writing `output` as stdout (see `guest::stdio`).
    pub stdio: bool,
    /// Stdio mode: checkpoint at the first stdin read after this many bytes.
    pub checkpoint_every_bytes: u64,
    /// How a capture finds the pages that changed (`snapshot::dirty`).
    pub dirty_tracking: DirtyTracking,
}

impl RunConfig {
    pub fn new(
        guest: impl Into<PathBuf>,
        input: impl Into<PathBuf>,
        output: impl Into<PathBuf>,
    ) -> Self {
        Self {
            guest: guest.into(),
            input: input.into(),
            output: output.into(),
            checkpoint_every: 1000,
            random_seed: random::DEFAULT_SEED,
            progress: false,
            retain: DEFAULT_RETAIN,
            limits: Limits::default(),
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            cache_dir: None,
            max_deltas: snapshot::table::DEFAULT_MAX_DELTAS,
            stdio: false,
            checkpoint_every_bytes: DEFAULT_CHECKPOINT_EVERY_BYTES,
            dirty_tracking: DirtyTracking::default(),
        }
    }

    /// The page cache directory this configuration uses.
    /// Beside a file output; for an object-storage output, under the user's cache
    /// directory (`$XDG_CACHE_HOME` or `~/.cache`), named by a hash of the output URL.
    pub fn cache_dir(&self) -> PathBuf {
        if self.cache_dir.is_none() && streams::is_object_url(&self.output) {
            let base = std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
                .unwrap_or_else(std::env::temp_dir);
            let key = twox_hash::XxHash3_64::oneshot(self.output.as_os_str().as_encoded_bytes());
            return base.join("wasnap").join(format!("{key:016x}"));
        }
        self.cache_dir.clone().unwrap_or_else(|| {
            let mut name = self.output.file_name().unwrap_or_default().to_os_string();
            name.push(".wasnap-cache");
            self.output.with_file_name(name)
        })
    }
}

/// What one checkpoint did and cost.
#[derive(Clone, Debug, Default)]
pub struct CheckpointStats {
    pub generation: u64,
    pub input_offset: u64,
    pub output_marker: u64,
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
    /// Dirty pages written as deltas (XOR or zstd-prefix) against their previous version.
    pub delta_pages: usize,
    /// Of the deltas, those of full chains, against the chain's whole page (the deltas
    /// in between dropped).
    pub rebased_pages: usize,
    /// Dirty pages written whole (new pages, big changes, full chains).
    pub whole_pages: usize,
    /// Frames copied from sparse older packs (compaction), and their bytes.
    pub compacted_frames: usize,
    pub compacted_bytes: usize,
    /// Bytes of the dirty pages' frames in the pack (the pack less header and compaction).
    pub encoded_bytes: usize,
    pub pack_bytes: usize,
    pub manifest_bytes: usize,
    /// Time the guest was paused: output write, hashing, copying dirty pages.
    pub stall: Duration,
    /// Of the stall, the capture: hashing, diffing, copying dirty pages and their bases.
    pub hash: Duration,
    /// Off the guest's thread: compressing, compacting.
    pub encode: Duration,
    /// Off the guest's thread: putting the pack, fsyncing the output, committing.
    pub put: Duration,
    /// Off the guest's thread: deleting what retention no longer keeps.
    pub prune: Duration,
    /// From the pause to the commit.
    pub committed_after: Duration,
}

/// Told about every checkpoint: when it starts, and how it ended, on every path (a run
/// settles every checkpoint it started before it returns, with success or an error).
pub trait CheckpointObserver {
    fn started(&mut self, _generation: u64) {}
    /// Right after the capture, with the guest still paused exactly as captured; not
    /// counted in the stall (the benchmark computes its baseline here).
    fn captured(&mut self, _generation: u64, _instance: &GuestInstance) {}
    fn finished(&mut self, _generation: u64, _outcome: Result<&CheckpointStats, &anyhow::Error>) {}
}

/// An observer that ignores everything.
pub struct NoObserver;
impl CheckpointObserver for NoObserver {}

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
    pub checkpoints: u64,
    /// Newest committed generation at the end.
    pub generation: u64,
    pub elapsed: Duration,
}

/// Where the guest's input comes from.
enum Input {
    /// Records, one `process` call each.
    Records(Box<dyn Source>),
    /// A stdio program reads its stdin itself; this is where the program is.
    Program(ProgramState),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ProgramState {
    NotStarted,
    Suspended,
    Exited(i32),
}

pub struct Task {
    instance: GuestInstance,
    input: Input,
    sink: Box<dyn Sink>,
    committer: Committer,
    /// This process's id in the names of what it writes (packs, output parts).
    writer_id: [u8; 16],
    /// Page hashes of the newest capture, and its pages in the cache: the base of the next.
    hashes: Vec<Vec<u64>>,
    cache: PageCache,
    /// Armed whenever `hashes` describe the memories exactly: which pages the next
    /// capture must hash.
    tracker: Box<dyn DirtyTracker>,
    /// Where captures copy pages; the committer gives the copies back.
    buffers: PageBuffers,
    /// The newest generation captured (0 before the first).
    captured_generation: u64,
    /// The newest committed checkpoint's generation and output marker (`None` before the
    /// first checkpoint of a fresh start).
    committed_generation: u64,
    committed_marker: Option<Vec<u8>>,
    records_since_checkpoint: u64,
    resumed_from: Option<u64>,
    max_in_flight: usize,
    /// The first checkpoint error, reported once everything in flight has settled.
    failure: Option<anyhow::Error>,
    /// A checkpoint failed: whether its manifest landed is unknown.
    committer_failed: bool,
}

impl Task {
    /// Open a task: restore the newest checkpoint in `store`, or start the guest fresh.
    pub fn open(config: &RunConfig, store: CheckpointStore) -> Result<Self> {
        let guest = if config.stdio {
            Guest::load_program(&config.guest, config.limits)?
        } else {
            Guest::load_with_limits(&config.guest, config.limits)?
        };
        Self::open_with_guest(config, &guest, store)
    }

    /// [`Task::open`] with a guest already compiled (`config.guest` and `config.limits`
    /// are not read): opening many tasks of one guest compiles it once.
    pub fn open_with_guest(
        config: &RunConfig,
        guest: &Guest,
        store: CheckpointStore,
    ) -> Result<Self> {
        let module_sha256 = guest.module_sha256();
        let writer_id = new_writer_id()?;
        // Before anything is touched: a tracker that cannot be had stops the task here.
        let mut tracker = config.dirty_tracking.tracker()?;
        // Lock the output before reading the store: a second writer must stop here, before
        // it could cut back output that the live one commits meanwhile.
        let mut sink = streams::open_sink(&config.output)?;
        let generations = store.generations()?;

        // Where the task starts: from nothing, or from the newest usable checkpoint.
        let (mut instance, table, hashes, start) = match generations.last() {
            None => {
                let mut instance = guest.instantiate(config.random_seed, 0)?;
                sink.resume_at(None)?;
                instance.start_fresh()?;
                instance.take_emitted(sink.buffer());
                let memories = instance.memory_count();
                let start = Start {
                    input_position: None,
                    output_marker: None,
                    random_seed: config.random_seed,
                    generation: 0,
                    resumed_from: None,
                    run_state: if guest.is_program() {
                        RunState::ProgramStart
                    } else {
                        RunState::Records
                    },
                };
                (
                    instance,
                    PageTable::empty(memories),
                    vec![Vec::new(); memories],
                    start,
                )
            }
            Some(&newest) => {
                let (manifest, instance, restored) =
                    restore_newest_usable(guest, &store, &generations)?;
                sink.resume_at(Some(&manifest.output_position))?;
                let start = Start {
                    input_position: Some(manifest.input_position.clone()),
                    output_marker: Some(manifest.output_position.clone()),
                    random_seed: manifest.random_seed,
                    // The next commit follows the newest generation in the store, even when
                    // that one was unusable and an older one was restored: generations only go up.
                    generation: newest,
                    resumed_from: Some(manifest.generation),
                    run_state: manifest.run_state,
                };
                (instance, restored.table, restored.hashes, start)
            }
        };

        // The cache must hold exactly the restored pages; whatever differs is rewritten.
        let mut cache = PageCache::open(&config.cache_dir(), instance.memory_count())?;
        tracing::debug!("dirty tracking: {}", config.dirty_tracking.describe());
        for (index, hashes) in hashes.iter().enumerate() {
            if !hashes.is_empty() {
                let rewritten = cache.sync_with(index, instance.memory(index), hashes)?;
                tracing::debug!(memory = index, rewritten, "page cache synced");
                // A restore wrote every page: only writes from here on are news.
                if let Err(err) = tracker.arm(index, instance.memory(index)) {
                    tracing::warn!("{err:#}");
                }
            }
        }
        let buffers = PageBuffers::default();
        let committer = Committer::start(CommitContext {
            buffers: buffers.clone(),
            store,
            table,
            writer_id,
            module_sha256,
            random_seed: start.random_seed,
            retain: config.retain,
            max_deltas: config.max_deltas.min(snapshot::table::MAX_DELTAS_LIMIT),
            known_packs: Default::default(),
            recent: RecentPacks::new(committer::RECENT_PACKS_BYTES),
        })?;
        let input = match (guest.is_program(), start.run_state) {
            (false, RunState::Records) => Input::Records(streams::open_source(
                &config.input,
                start.input_position.as_deref(),
            )?),
            (true, RunState::Records) | (false, _) => bail!(
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
            (true, state) => {
                let stdin = streams::open_source(&config.input, start.input_position.as_deref())?;
                let unwind_data = match state {
                    RunState::ProgramSuspended { unwind_data } => Some(unwind_data),
                    _ => None,
                };
                instance.attach_stdin(stdin, config.checkpoint_every_bytes, unwind_data)?;
                Input::Program(match state {
                    RunState::ProgramSuspended { .. } => ProgramState::Suspended,
                    RunState::ProgramExited(status) => ProgramState::Exited(status),
                    _ => ProgramState::NotStarted,
                })
            }
        };
        Ok(Task {
            input,
            instance,
            sink,
            committer,
            writer_id,
            hashes,
            cache,
            tracker,
            buffers,
            captured_generation: start.generation,
            committed_generation: start.generation,
            committed_marker: start.output_marker,
            records_since_checkpoint: 0,
            resumed_from: start.resumed_from,
            max_in_flight: config.max_in_flight,
            failure: None,
            committer_failed: false,
        })
    }

    /// Feed every remaining record to the guest, checkpointing every `checkpoint_every`
    /// records and once more at the end of input. Every checkpoint started is settled
    /// (committed or failed, and the observer told) before this returns.
    pub fn run(
        &mut self,
        config: &RunConfig,
        observer: &mut dyn CheckpointObserver,
    ) -> Result<RunSummary> {
        let started = Instant::now();
        let mut counts = (0u64, 0u64);
        let offset_before = self.input_offset();
        let outcome = match self.input {
            Input::Records(_) => self.run_records(config, observer, &mut counts),
            Input::Program(_) => self.run_program(observer, &mut counts.1),
        };
        self.settle_all(observer);
        let failure = self.failure.take();
        let checkpoint_failed = failure.is_some() || self.committer_failed;
        let outcome = match (outcome, failure) {
            (Ok(()), Some(failure)) => Err(failure),
            (outcome, _) => outcome,
        };
        if let Err(err) = outcome {
            // Only committed output may stay: the next run replays from the checkpoint. But
            // a failed commit may have landed all the same (a lost reply): then the newest
            // committed marker is unknown, and the output stays for the next run to cut.
            if !checkpoint_failed
                && let Err(cut) = self.sink.resume_at(self.committed_marker.as_deref())
            {
                return Err(err.context(format!("and the output could not be cut back: {cut:#}")));
            }
            return Err(err);
        }
        Ok(RunSummary {
            resumed_from: self.resumed_from,
            records: counts.0,
            input_bytes: self.input_offset() - offset_before,
            checkpoints: counts.1,
            generation: self.committed_generation,
            elapsed: started.elapsed(),
        })
    }

    fn run_records(
        &mut self,
        config: &RunConfig,
        observer: &mut dyn CheckpointObserver,
        (records, checkpoints): &mut (u64, u64),
    ) -> Result<()> {
        let mut progress = Progress::new(config.progress);
        let mut record = Vec::new();
        loop {
            let Input::Records(source) = &mut self.input else {
                unreachable!("run_records runs record guests")
            };
            let offset_before = source.offset();
            if !source.next_record(&mut record)? {
                break;
            }
            self.instance.process(&record).map_err(|err| {
                err.context(format!("record at input byte offset {offset_before}"))
            })?;
            self.instance.take_emitted(self.sink.buffer());
            self.sink.maybe_write()?;
            *records += 1;
            self.records_since_checkpoint += 1;
            if self.records_since_checkpoint >= config.checkpoint_every {
                self.start_checkpoint(observer)?;
                *checkpoints += 1;
            }
            if records.is_multiple_of(1024) {
                progress.tick(*records, *checkpoints, self.input_offset());
            }
        }
        if self.records_since_checkpoint > 0 || self.captured_generation == 0 {
            self.start_checkpoint(observer)?;
            *checkpoints += 1;
        }
        Ok(())
    }

    /// Run a stdio program until it ends: it unwinds at a stdin read whenever a checkpoint
    /// is due, is checkpointed, and is rewound; once it ends, a last checkpoint records
    /// its exit status (and a restart finds nothing left to do).
    fn run_program(
        &mut self,
        observer: &mut dyn CheckpointObserver,
        checkpoints: &mut u64,
    ) -> Result<()> {
        loop {
            let Input::Program(state) = self.input else {
                unreachable!("run_program runs stdio programs")
            };
            let rewind = match state {
                ProgramState::Exited(0) => return Ok(()),
                ProgramState::Exited(status) => {
                    bail!("the program exited with status {status}")
                }
                ProgramState::Suspended => true,
                ProgramState::NotStarted => false,
            };
            let outcome = self.instance.run_program(rewind);
            // What the program wrote is output whatever happened next; it is committed
            // only by a checkpoint.
            self.instance.take_emitted(self.sink.buffer());
            self.sink.maybe_write()?;
            self.input = Input::Program(match outcome? {
                ProgramOutcome::Unwound => ProgramState::Suspended,
                ProgramOutcome::Exited(status) => ProgramState::Exited(status),
            });
            self.start_checkpoint(observer)?;
            *checkpoints += 1;
        }
    }

    /// The input's position, as a checkpoint stores it.
    fn input_position(&self) -> Vec<u8> {
        match &self.input {
            Input::Records(source) => source.position(),
            Input::Program(_) => self.instance.stdin_position(),
        }
    }

    /// Input bytes consumed so far: records read, or stdin handed to the program.
    fn input_offset(&self) -> u64 {
        match &self.input {
            Input::Records(source) => source.offset(),
            Input::Program(_) => self.instance.stdin_offset(),
        }
    }

    fn run_state(&self) -> RunState {
        match self.input {
            Input::Records(_) => RunState::Records,
            Input::Program(ProgramState::NotStarted) => RunState::ProgramStart,
            Input::Program(ProgramState::Suspended) => RunState::ProgramSuspended {
                unwind_data: self
                    .instance
                    .unwind_data()
                    .expect("a suspended program has unwound its stack"),
            },
            Input::Program(ProgramState::Exited(status)) => RunState::ProgramExited(status),
        }
    }

    /// Take one checkpoint now and wait until it (and every one before it) is committed.
    pub fn checkpoint(&mut self, observer: &mut dyn CheckpointObserver) -> Result<CheckpointStats> {
        let generation = self.captured_generation + 1;
        let mut stats = None;
        let mut record = RecordStats {
            inner: observer,
            generation,
            stats: &mut stats,
        };
        let started = self.start_checkpoint(&mut record);
        self.settle_all(&mut record);
        if let Some(failure) = self.failure.take() {
            return Err(failure);
        }
        started?;
        stats.ok_or_else(|| anyhow::anyhow!("checkpoint {generation} did not finish"))
    }

    /// Capture a checkpoint and hand it to the committer; then settle what has finished,
    /// and wait while more than `max_in_flight` are in flight.
    fn start_checkpoint(&mut self, observer: &mut dyn CheckpointObserver) -> Result<()> {
        self.settle(observer, false);
        if let Some(failure) = self.failure.take() {
            return Err(failure);
        }
        let generation = self.captured_generation + 1;
        observer.started(generation);
        let job = match self.capture(generation) {
            Ok(job) => job,
            Err(err) => {
                observer.finished(generation, Err(&err));
                return Err(err);
            }
        };
        observer.captured(generation, &self.instance);
        self.captured_generation = generation;
        self.records_since_checkpoint = 0;
        if let Err(err) = self.committer.submit(job) {
            observer.finished(generation, Err(&err));
            return Err(err);
        }
        while self.committer.in_flight() > self.max_in_flight && self.failure.is_none() {
            self.settle(observer, true);
        }
        match self.failure.take() {
            Some(failure) => Err(failure),
            None => Ok(()),
        }
    }

    /// The pause: everything the committer needs, copied out of the guest.
    fn capture(&mut self, generation: u64) -> Result<Job> {
        let paused_at = Instant::now();
        let output = self.sink.checkpoint(generation, &self.writer_id)?;
        let capturing = Instant::now();
        let capture = snapshot::capture(
            &mut self.instance,
            &mut self.hashes,
            &mut self.cache,
            self.tracker.as_mut(),
            &self.buffers,
        )?;
        let hash = capturing.elapsed();
        let stall = paused_at.elapsed();
        Ok(Job {
            generation,
            capture,
            run_state: self.run_state(),
            input_offset: self.input_offset(),
            input_position: self.input_position(),
            output,
            random_position: self.instance.random_position(),
            paused_at,
            stall,
            hash,
        })
    }

    /// Take finished checkpoints from the committer (waiting for one if `block`).
    fn settle(&mut self, observer: &mut dyn CheckpointObserver, block: bool) {
        while let Some(Done {
            generation,
            output_marker,
            outcome,
        }) = self.committer.next_done(block)
        {
            observer.finished(generation, outcome.as_ref());
            match outcome {
                Ok(_) => {
                    self.committed_generation = generation;
                    self.committed_marker = Some(output_marker);
                }
                Err(err) => {
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
    fn settle_all(&mut self, observer: &mut dyn CheckpointObserver) {
        while self.committer.in_flight() > 0 {
            self.settle(observer, true);
        }
    }

    /// The newest committed generation (0 before the first checkpoint).
    pub fn generation(&self) -> u64 {
        self.committed_generation
    }

    pub fn instance(&mut self) -> &mut GuestInstance {
        &mut self.instance
    }

    /// Replace the dirty tracker (an embedder's own, say). The next capture hashes every
    /// page, since the new tracker has seen none of the writes so far.
    pub fn set_dirty_tracker(&mut self, tracker: Box<dyn DirtyTracker>) {
        self.tracker = tracker;
    }
}

/// Passes everything on, and keeps the stats of one generation.
struct RecordStats<'a> {
    inner: &'a mut dyn CheckpointObserver,
    generation: u64,
    stats: &'a mut Option<CheckpointStats>,
}

impl CheckpointObserver for RecordStats<'_> {
    fn started(&mut self, generation: u64) {
        self.inner.started(generation)
    }
    fn captured(&mut self, generation: u64, instance: &GuestInstance) {
        self.inner.captured(generation, instance)
    }
    fn finished(&mut self, generation: u64, outcome: Result<&CheckpointStats, &anyhow::Error>) {
        if generation == self.generation
            && let Ok(stats) = outcome
        {
            *self.stats = Some(stats.clone());
        }
        self.inner.finished(generation, outcome)
    }
}

/// Open the store, open the task and run it to the end of its input.
pub fn run(
    config: &RunConfig,
    store_url: &str,
    observer: &mut dyn CheckpointObserver,
) -> Result<RunSummary> {
    let store = CheckpointStore::open(store_url)?;
    let mut task = Task::open(config, store)?;
    task.run(config, observer)
}

/// Where a task's streams and numbering start.
struct Start {
    input_position: Option<Vec<u8>>,
    output_marker: Option<Vec<u8>>,
    random_seed: u64,
    generation: u64,
    resumed_from: Option<u64>,
    run_state: RunState,
}

/// Restore the newest checkpoint that is usable. A corrupt or missing manifest or pack makes
/// a checkpoint unusable: say so and fall back to the one before (still exactly-once: the
/// output is cut back to that checkpoint's marker). A store that cannot be reached, or a
/// guest that is not the checkpoints' module, stops the run instead.
fn restore_newest_usable(
    guest: &Guest,
    store: &CheckpointStore,
    generations: &[u64],
) -> Result<(Manifest, GuestInstance, snapshot::Restored)> {
    let mut newest_error = None;
    for &generation in generations.iter().rev() {
        let attempt = (|| -> Result<(Manifest, GuestInstance, snapshot::Restored)> {
            let manifest = store.read_manifest(generation)?;
            if manifest.module_sha256 != guest.module_sha256() {
                return Err(ModuleChanged {
                    generation,
                    expected: store::hex(&manifest.module_sha256),
                    actual: store::hex(&guest.module_sha256()),
                }
                .into());
            }
            let mut instance = guest.instantiate(manifest.random_seed, manifest.random_position)?;
            let restored = snapshot::restore(&mut instance, &manifest, store)
                .with_context(|| format!("cannot restore checkpoint {generation}"))?;
            Ok((manifest, instance, restored))
        })();
        match attempt {
            Ok((manifest, instance, committed)) => {
                tracing::debug!(
                    generation,
                    input_offset = manifest.input_offset,
                    output_marker = manifest.output_marker,
                    pages = manifest.stored_pages(),
                    "restored"
                );
                if newest_error.is_some() {
                    eprintln!("wasnap: warning: resuming from older checkpoint {generation}");
                }
                return Ok((manifest, instance, committed));
            }
            Err(err) if err.is::<StoreUnavailable>() || err.is::<ModuleChanged>() => {
                return Err(err);
            }
            Err(err) => {
                eprintln!("wasnap: warning: checkpoint {generation} is unusable: {err:#}");
                newest_error.get_or_insert(err);
            }
        }
    }
    let err = newest_error.expect("there was at least one generation");
    Err(err.context(format!(
        "none of the {} checkpoints in store {} is usable",
        generations.len(),
        store.label()
    )))
}

fn new_writer_id() -> Result<[u8; 16]> {
    let mut id = [0u8; 16];
    getrandom::fill(&mut id).map_err(|e| anyhow::anyhow!("cannot draw a writer id: {e}"))?;
    Ok(id)
}

/// Progress lines on stderr, at most one every few seconds.
struct Progress {
    enabled: bool,
    started: Instant,
    last: Instant,
}

impl Progress {
    const EVERY: Duration = Duration::from_secs(2);

    fn new(enabled: bool) -> Self {
        let now = Instant::now();
        Self {
            enabled,
            started: now,
            last: now,
        }
    }

    fn tick(&mut self, records: u64, checkpoints: u64, offset: u64) {
        if !self.enabled || self.last.elapsed() < Self::EVERY {
            return;
        }
        self.last = Instant::now();
        let rate = records as f64 / self.started.elapsed().as_secs_f64();
        eprintln!(
            "wasnap: {records} records ({rate:.0}/s), {checkpoints} checkpoints, input offset {offset}"
        );
    }
}
