//! A task: one guest, one input, one output, one store. The run loop and the checkpoint
//! protocol live here.
//!
//! Checkpoint protocol (fail-closed; the guest is paused between two `process` calls):
//!
//! 1. flush the output and fsync it: its length is the new flush marker;
//! 2. capture globals and hash every page; diff against the committed page table;
//! 3. put one pack with the dirty pages (under a name unique to this writer);
//! 4. put the manifest `manifests/<generation>` with `PutMode::Create`: the commit point,
//!    binding input offset, flush marker and page table in one atomic put;
//! 5. only now advance the in-memory committed table and generation.
//!
//! Any error aborts the checkpoint and the run; the store still holds the previous
//! checkpoint, and the next run restores it and cuts the output back to its marker.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::error::{ModuleChanged, StoreUnavailable};
use crate::guest::{Guest, GuestInstance, Limits, random};
use crate::snapshot::{self, PageTable};
use crate::store::{self, CheckpointStore, Manifest, pack};
use crate::stream::{FileSink, LineSource};

/// How many checkpoints a task keeps by default.
pub const DEFAULT_RETAIN: usize = 3;

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
        }
    }
}

/// What one checkpoint did and cost.
#[derive(Clone, Debug, Default)]
pub struct CheckpointStats {
    pub generation: u64,
    pub input_offset: u64,
    pub output_marker: u64,
    pub memory_bytes: u64,
    /// Pages written to this checkpoint's pack.
    pub dirty_pages: usize,
    /// Pages that changed to all-zero (recorded, not written).
    pub zero_pages: usize,
    pub pack_bytes: usize,
    pub manifest_bytes: usize,
    /// Time the guest was paused, from output flush to commit.
    pub stall: Duration,
    /// Time spent hashing and diffing pages.
    pub hash: Duration,
    /// Time spent compressing and putting the pack and the manifest.
    pub put: Duration,
    /// Time spent deleting what retention no longer keeps (included in the stall).
    pub prune: Duration,
}

/// Told about every checkpoint: when it starts, and how it ended, on every path.
pub trait CheckpointObserver {
    fn started(&mut self, _generation: u64) {}
    fn finished(&mut self, _generation: u64, _outcome: Result<&CheckpointStats, &anyhow::Error>) {}
    /// After a successful commit, with the guest still paused exactly as captured; not
    /// counted in the stall (the benchmark computes its baseline here).
    fn after_commit(&mut self, _generation: u64, _instance: &GuestInstance) {}
}

/// An observer that ignores everything.
pub struct NoObserver;
impl CheckpointObserver for NoObserver {}

/// How a run ended.
#[derive(Clone, Debug)]
pub struct RunSummary {
    /// The generation the run resumed from, if it did.
    pub resumed_from: Option<u64>,
    /// Records processed by this run (not counting those before the resumed checkpoint).
    pub records: u64,
    pub checkpoints: u64,
    /// Newest committed generation at the end.
    pub generation: u64,
    pub elapsed: Duration,
}

pub struct Task {
    store: CheckpointStore,
    instance: GuestInstance,
    source: LineSource,
    sink: FileSink,
    module_sha256: [u8; 32],
    writer_id: [u8; 16],
    random_seed: u64,
    /// The newest committed checkpoint: its generation (0 before the first), page table
    /// and flush marker. Advanced only after a manifest commit succeeded.
    generation: u64,
    committed: PageTable,
    committed_marker: u64,
    records_since_checkpoint: u64,
    resumed_from: Option<u64>,
    retain: usize,
}

impl Task {
    /// Open a task: restore the newest checkpoint in `store`, or start the guest fresh.
    pub fn open(config: &RunConfig, store: CheckpointStore) -> Result<Self> {
        let guest = Guest::load_with_limits(&config.guest, config.limits)?;
        let module_sha256 = guest.module_sha256();
        let writer_id = new_writer_id()?;
        // Lock the output before reading the store: a second writer must stop here, before
        // it could cut back output that the live one commits meanwhile.
        let mut sink = FileSink::open(&config.output)?;
        let generations = store.generations()?;

        // Where the task starts: from nothing, or from the newest usable checkpoint.
        let (instance, committed, start) = match generations.last() {
            None => {
                let mut instance = guest.instantiate(config.random_seed, 0)?;
                sink.resume_at(0)?;
                instance.start_fresh()?;
                instance.take_emitted(sink.buffer());
                let committed = PageTable::empty(instance.memory_count());
                let start = Start {
                    input_offset: 0,
                    output_marker: 0,
                    random_seed: config.random_seed,
                    generation: 0,
                    resumed_from: None,
                };
                (instance, committed, start)
            }
            Some(&newest) => {
                let (manifest, instance, committed) =
                    restore_newest_usable(&guest, &store, &generations)?;
                sink.resume_at(manifest.output_marker)?;
                let start = Start {
                    input_offset: manifest.input_offset,
                    output_marker: manifest.output_marker,
                    random_seed: manifest.random_seed,
                    // The next commit follows the newest generation in the store, even when
                    // that one was unusable and an older one was restored: generations only go up.
                    generation: newest,
                    resumed_from: Some(manifest.generation),
                };
                (instance, committed, start)
            }
        };
        Ok(Task {
            source: LineSource::open(&config.input, start.input_offset)?,
            store,
            instance,
            sink,
            module_sha256,
            writer_id,
            random_seed: start.random_seed,
            generation: start.generation,
            committed,
            committed_marker: start.output_marker,
            records_since_checkpoint: 0,
            resumed_from: start.resumed_from,
            retain: config.retain,
        })
    }

    /// Feed every remaining record to the guest, checkpointing every `checkpoint_every`
    /// records and once more at the end of input.
    pub fn run(
        &mut self,
        config: &RunConfig,
        observer: &mut dyn CheckpointObserver,
    ) -> Result<RunSummary> {
        let started = Instant::now();
        let mut progress = Progress::new(config.progress);
        let mut records = 0u64;
        let mut checkpoints = 0u64;
        let mut record = Vec::new();
        loop {
            let offset_before = self.source.offset();
            if !self.source.next_record(&mut record)? {
                break;
            }
            if let Err(err) = self.instance.process(&record) {
                // Only committed output may stay: the next run replays from the checkpoint.
                self.sink.resume_at(self.committed_marker)?;
                return Err(err.context(format!("record at input byte offset {offset_before}")));
            }
            self.instance.take_emitted(self.sink.buffer());
            self.sink.maybe_write()?;
            records += 1;
            self.records_since_checkpoint += 1;
            if self.records_since_checkpoint >= config.checkpoint_every {
                self.checkpoint(observer)?;
                checkpoints += 1;
            }
            if records.is_multiple_of(1024) {
                progress.tick(records, checkpoints, self.source.offset());
            }
        }
        if self.records_since_checkpoint > 0 || self.generation == 0 {
            self.checkpoint(observer)?;
            checkpoints += 1;
        }
        Ok(RunSummary {
            resumed_from: self.resumed_from,
            records,
            checkpoints,
            generation: self.generation,
            elapsed: started.elapsed(),
        })
    }

    /// Take and commit one checkpoint now. The observer hears of it on every path.
    pub fn checkpoint(&mut self, observer: &mut dyn CheckpointObserver) -> Result<CheckpointStats> {
        let generation = self.generation + 1;
        observer.started(generation);
        let outcome = self.try_checkpoint(generation);
        observer.finished(generation, outcome.as_ref());
        if outcome.is_ok() {
            observer.after_commit(generation, &self.instance);
        }
        outcome
    }

    fn try_checkpoint(&mut self, generation: u64) -> Result<CheckpointStats> {
        let paused = Instant::now();
        let marker = self.sink.flush_durable()?;

        let hashing = Instant::now();
        let delta = snapshot::capture(&mut self.instance, &self.committed)?;
        let hash = hashing.elapsed();

        let putting = Instant::now();
        let pages = delta.dirty_pages(&self.instance);
        let pack_name: Arc<str> = store::pack_name(generation, &self.writer_id).into();
        let mut pack_bytes = 0;
        let frames = if pages.is_empty() {
            Vec::new() // nothing dirty: the manifest alone is the checkpoint
        } else {
            let (pack, frames) = pack::encode_pack(generation, &self.writer_id, &pages)?;
            pack_bytes = pack.len();
            self.store.put_pack(&pack_name, pack)?;
            frames
        };
        let next = delta.next_table(&self.committed, &pack_name, &frames);
        let (packs, memories) = next.to_manifest_parts();
        let manifest = Manifest {
            generation,
            writer_id: self.writer_id,
            module_sha256: self.module_sha256,
            input_offset: self.source.offset(),
            output_marker: marker,
            random_seed: self.random_seed,
            random_position: self.instance.random_position(),
            created_unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            packs,
            globals: delta.globals.clone(),
            memories,
        };
        let manifest_bytes = self.store.commit_manifest(&manifest)?;
        let put = putting.elapsed();

        tracing::debug!(
            generation,
            input_offset = manifest.input_offset,
            output_marker = marker,
            dirty_pages = delta.dirty_count(),
            pack_bytes,
            manifest_bytes,
            "checkpoint committed"
        );
        // Committed: only now does the engine's idea of "last checkpoint" move.
        self.committed = next;
        self.generation = generation;
        self.committed_marker = marker;
        self.records_since_checkpoint = 0;

        // Retention, strictly after the commit. A failed prune loses nothing (the next one
        // retries), so it warns rather than stopping the run.
        let pruning = Instant::now();
        if self.retain != usize::MAX
            && let Err(err) = self.store.prune(generation, self.retain)
        {
            eprintln!("wasnap: warning: {err:#}");
        }
        let prune = pruning.elapsed();
        Ok(CheckpointStats {
            generation,
            input_offset: manifest.input_offset,
            output_marker: marker,
            memory_bytes: manifest.memory_bytes(),
            dirty_pages: delta.dirty_count(),
            zero_pages: delta.zeroed_count(),
            pack_bytes,
            manifest_bytes,
            stall: paused.elapsed(),
            hash,
            put,
            prune,
        })
    }

    /// The newest committed generation (0 before the first checkpoint).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn instance(&mut self) -> &mut GuestInstance {
        &mut self.instance
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
    input_offset: u64,
    output_marker: u64,
    random_seed: u64,
    generation: u64,
    resumed_from: Option<u64>,
}

/// Restore the newest checkpoint that is usable. A corrupt or missing manifest or pack makes
/// a checkpoint unusable: say so and fall back to the one before (still exactly-once: the
/// output is cut back to that checkpoint's marker). A store that cannot be reached, or a
/// guest that is not the checkpoints' module, stops the run instead.
fn restore_newest_usable(
    guest: &Guest,
    store: &CheckpointStore,
    generations: &[u64],
) -> Result<(Manifest, GuestInstance, PageTable)> {
    let mut newest_error = None;
    for &generation in generations.iter().rev() {
        let attempt = (|| -> Result<(Manifest, GuestInstance, PageTable)> {
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
            let committed = snapshot::restore(&mut instance, &manifest, store)
                .with_context(|| format!("cannot restore checkpoint {generation}"))?;
            Ok((manifest, instance, committed))
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
