//! The committer: a thread that takes captured checkpoints, in order, and does everything
//! after the pause: encode, compact, put the pack, make the output durable, commit the
//! manifest, prune. The guest goes on meanwhile.
//!
//! Fail-closed as before: a manifest is put only after every frame it names is stored and
//! the output it marks is fsynced; manifests commit strictly in generation order (one
//! thread, one queue); after a failure every later checkpoint is dropped unwritten, since
//! its deltas may stand on frames that were never stored.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};

use super::observer::CheckpointStats;
use crate::error::Fenced;
use crate::snapshot::encode::{assemble, encode_pages};
use crate::snapshot::rebase;
use crate::snapshot::rebase::ChainPacks;
use crate::snapshot::{Capture, PageCache, PageTable};
use crate::store::recent::{LoadedPack, RecentPacks};
use crate::store::{CheckpointStore, Manifest};

/// A captured checkpoint, handed from the guest's thread to the committer.
pub struct Job {
    pub generation: u64,
    pub capture: Capture,
    pub run_state: crate::store::manifest::RunState,
    pub input_offset: u64,
    pub input_position: Vec<u8>,
    /// The sink's marker, and the work that commits its output.
    pub output: crate::stream::OutputFlush,
    pub random_position: u64,
    /// When the guest was paused, and for how long (capture included).
    pub paused_at: Instant,
    pub stall: Duration,
    pub hash: Duration,
    /// How many captures this job holds: more than one once others merged into it
    /// (`coalesce`).
    pub captures: usize,
}

impl Job {
    /// Bytes this job holds in memory until it is committed: copies of guest state
    /// (pages, a component's kv runs) and output not yet written (an object output's part,
    /// a file output's bytes).
    pub fn held_bytes(&self) -> u64 {
        let kv_runs = self.capture.kv.iter().flat_map(|kv| &kv.runs);
        self.capture
            .dirty
            .iter()
            .map(|p| p.bytes.len() as u64)
            .chain(kv_runs.map(|run| run.len() as u64))
            .sum::<u64>()
            + self.output.commit.held_bytes()
    }
}

/// How a checkpoint ended.
pub struct Done {
    pub generation: u64,
    pub output_marker: Vec<u8>,
    pub outcome: Result<CheckpointStats>,
}

/// What the committer needs to write checkpoints of one task.
pub struct CommitContext {
    pub store: CheckpointStore,
    /// Where the capture's page copies go once encoded, for the next capture to reuse.
    pub buffers: crate::snapshot::PageBuffers,
    /// The table of the newest capture handed over (committed or, later, in flight).
    pub table: PageTable,
    /// The versions of the pages the last capture handed over: the deltas' bases. Moved
    /// on by each checkpoint here, in order, off the guest's pause.
    pub cache: PageCache,
    pub writer_id: [u8; 16],
    pub module_sha256: [u8; 32],
    pub random_seed: u64,
    pub retain: usize,
    /// Deltas a page's chain may have before its next version is written whole.
    pub max_deltas: usize,
    /// The packs of the manifests this writer committed that retention may still meet
    /// (the newest `retain`): a prune then need not list packs or read back manifests.
    pub known_packs: crate::store::prune::KnownPacks,
    /// Commits since the last full prune (one that lists the packs: see `prune`).
    pub since_full_prune: u32,
    /// Packs this writer put or read lately, for rebasing and compaction.
    pub recent: RecentPacks,
    /// Merge captures waiting for the committer into one commit (`coalesce`).
    pub coalesce: bool,
    /// The newest generation this writer knows of: its last commit, or the store's newest
    /// when it opened. Any other manifest past it is a rival's (`commit_manifest`).
    pub known_generation: u64,
    /// Set while the guest's thread waits for a commit (the end of the input,
    /// back-pressure): encoding may then take the guest's core too.
    pub guest_waits: Arc<std::sync::atomic::AtomicBool>,
}

/// A prune lists the store's packs once every this many commits (see `prune`).
const FULL_PRUNE_EVERY: u32 = 32;

/// Bytes of recent packs the committer keeps in memory.
pub const RECENT_PACKS_BYTES: u64 = 64 << 20;

/// Packs larger than this are not read back to rebase chains on (a first checkpoint's
/// pack can hold a whole large memory); their pages are written whole instead.
const REBASE_READ_LIMIT: u64 = 16 << 20;

pub struct Committer {
    jobs: Option<Sender<Job>>,
    /// `CommitContext::guest_waits`, set around a blocking wait.
    guest_waits: Arc<std::sync::atomic::AtomicBool>,
    done: Receiver<Done>,
    thread: Option<JoinHandle<()>>,
    /// Generation and flush marker of every checkpoint handed over and not yet answered,
    /// oldest first (the thread answers in order).
    in_flight: VecDeque<(u64, Vec<u8>, u64)>,
    /// Bytes of guest memory the jobs in flight hold copies of.
    in_flight_bytes: u64,
}

impl Committer {
    pub fn start(context: CommitContext) -> Result<Self> {
        let (jobs, job_queue) = std::sync::mpsc::channel::<Job>();
        let (done_tx, done) = std::sync::mpsc::channel();
        let guest_waits = Arc::clone(&context.guest_waits);
        let thread = std::thread::Builder::new()
            .name("wasnap-committer".into())
            .spawn(move || {
                let mut context = context;
                let mut failed = false;
                while let Ok(mut job) = job_queue.recv() {
                    // Every capture merged into this commit, oldest first.
                    let mut covered = vec![(job.generation, job.output.marker.clone())];
                    if context.coalesce {
                        while let Ok(later) = job_queue.try_recv() {
                            covered.push((later.generation, later.output.marker.clone()));
                            job.absorb(later, &context.buffers);
                        }
                    }
                    let generation = job.generation;
                    let outcome = if failed {
                        Err(anyhow!(
                            "checkpoint {generation} was dropped: an earlier checkpoint failed"
                        ))
                    } else {
                        context.commit(job)
                    };
                    failed |= outcome.is_err();
                    // One answer per capture: those merged into the commit share its outcome.
                    let mut answers: Vec<Done> = Vec::with_capacity(covered.len());
                    for (generation, output_marker) in covered {
                        let outcome = match &outcome {
                            Ok(stats) => Ok(stats.clone()),
                            Err(err) => Err(anyhow!("{err:#}")),
                        };
                        answers.push(Done {
                            generation,
                            output_marker,
                            outcome,
                        });
                    }
                    // The first answer, which the run reports, keeps the error's chain (its
                    // kind: fencing, say).
                    if let (Some(first), Err(err)) = (answers.first_mut(), outcome) {
                        first.outcome = Err(err);
                    }
                    if answers.into_iter().any(|done| done_tx.send(done).is_err()) {
                        break;
                    }
                }
            })
            .map_err(|e| anyhow!("cannot start the checkpoint committer: {e}"))?;
        Ok(Self {
            jobs: Some(jobs),
            done,
            thread: Some(thread),
            in_flight: VecDeque::new(),
            in_flight_bytes: 0,
            guest_waits,
        })
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Bytes held by checkpoints captured and not yet answered (`Job::held_bytes`).
    pub fn in_flight_bytes(&self) -> u64 {
        self.in_flight_bytes
    }

    pub fn submit(&mut self, job: Job) -> Result<()> {
        let handed = (job.generation, job.output.marker.clone(), job.held_bytes());
        self.jobs
            .as_ref()
            .and_then(|jobs| jobs.send(job).ok())
            .ok_or_else(|| anyhow!("the checkpoint committer has stopped"))?;
        self.in_flight_bytes += handed.2;
        self.in_flight.push_back(handed);
        Ok(())
    }

    /// The next finished checkpoint, waiting for it if `block`; `None` if none is in flight
    /// (or, not blocking, none has finished yet). If the thread died (a panic), every
    /// checkpoint it held ends with an error: none of them is known to be committed.
    pub fn next_done(&mut self, block: bool) -> Option<Done> {
        let (generation, output_marker, _) = self.in_flight.front()?.clone();
        let received = if block {
            use std::sync::atomic::Ordering;
            self.guest_waits.store(true, Ordering::Relaxed);
            let received = self.done.recv().map_err(|_| TryRecvError::Disconnected);
            self.guest_waits.store(false, Ordering::Relaxed);
            received
        } else {
            self.done.try_recv()
        };
        let done = match received {
            Ok(done) => done,
            Err(TryRecvError::Empty) => return None,
            Err(TryRecvError::Disconnected) => Done {
                generation,
                output_marker,
                outcome: Err(anyhow!(
                    "checkpoint {generation} was lost: the checkpoint committer stopped \
                     unexpectedly (see the panic message above)"
                )),
            },
        };
        if let Some((_, _, bytes)) = self.in_flight.pop_front() {
            self.in_flight_bytes -= bytes;
        }
        Some(done)
    }
}

impl Drop for Committer {
    /// Finish what was handed over (it was captured consistently), then stop.
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl CommitContext {
    /// The packs the full chains among `job`'s pages stand on, from memory or the store.
    /// Best effort: a pack that cannot be read is left out, and its pages are written
    /// whole rather than rebased.
    fn chain_packs(&mut self, job: &Job) -> ChainPacks {
        let wanted: Vec<_> =
            rebase::packs_to_read(&job.capture.dirty, &self.table, self.max_deltas)
                .into_iter()
                .filter(|p| p.bytes <= REBASE_READ_LIMIT)
                .collect();
        let got = self.recent.get_many(&self.store, &wanted);
        let mut packs = ChainPacks::new();
        for (pack_ref, pack) in wanted.into_iter().zip(got) {
            match pack {
                Ok(pack) => {
                    packs.insert(pack_ref, pack);
                }
                Err(err) => tracing::warn!("cannot rebase chains on {}: {err:#}", pack_ref.name()),
            }
        }
        packs
    }

    /// One checkpoint, step by step (each step named by its crash point, `crate::crash`):
    ///
    /// 1. encode: move the page cache on, encode the dirty pages against their bases,
    ///    assemble the pack and the next page table;
    /// 2. put the pack and make the output durable, at once (`commit-pack-put`,
    ///    `commit-output-durable`);
    /// 3. create the manifest: the commit point (`commit-manifest-created`);
    /// 4. publish the output (`commit-published`);
    /// 5. prune what no retained checkpoint needs.
    ///
    /// A failure at any step leaves the store's newest committed checkpoint as it was:
    /// before step 3 nothing names what was written; after it, the checkpoint stands.
    fn commit(&mut self, mut job: Job) -> Result<CheckpointStats> {
        let generation = job.generation;
        let encoding = Instant::now();
        let assembled = self.encode(&mut job)?;
        let encode = encoding.elapsed();
        let dirty_pages = job.capture.dirty.len();
        self.buffers.give_back(
            std::mem::take(&mut job.capture.dirty)
                .into_iter()
                .flat_map(|page| [Some(page.bytes), page.base])
                .flatten(),
        );

        let putting = Instant::now();
        let pack_bytes = self.put_pack_and_make_output_durable(&mut job, assembled.pack)?;
        crate::crash::point("commit-output-durable");
        let manifest = self.manifest(&mut job, &assembled.table);
        let committed = self
            .store
            .commit_manifest(&manifest, self.known_generation)?;
        self.known_generation = generation;
        let manifest_bytes = committed.bytes;
        crate::crash::point("commit-manifest-created");
        let put = putting.elapsed();
        let committed_after = job.paused_at.elapsed();
        tracing::debug!(
            generation,
            input_offset = manifest.input_offset,
            output_marker = manifest.output_marker,
            pack_bytes,
            manifest_bytes,
            "checkpoint committed"
        );
        // Committed: the table this checkpoint described is now the base of the next.
        self.table = assembled.table;
        // And its output may be shown: before the next manifest, so every manifest but the
        // newest has its output published (a restore publishes the newest's).
        let publishing = Instant::now();
        job.output
            .commit
            .publish()
            .map_err(crate::Error::into_anyhow)
            .with_context(|| format!("checkpoint {generation} committed, but its output could not be published; the next run publishes it"))?;
        crate::crash::point("commit-published");
        let publish = publishing.elapsed();

        let pruning = Instant::now();
        self.prune(&manifest, &committed.manifests);
        let prune = pruning.elapsed();
        let contents = assembled.contents;
        Ok(CheckpointStats {
            generation,
            captures: job.captures,
            input_offset: manifest.input_offset,
            output_marker: manifest.output_marker,
            memory_bytes: manifest.memory_bytes(),
            dirty_pages,
            zero_pages: job.capture.zeroed.len(),
            hashed_pages: job.capture.hashed_pages,
            kernel_tracked_memories: job.capture.kernel_tracked_memories,
            delta_pages: contents.delta_pages,
            rebased_pages: contents.rebased_pages,
            whole_pages: contents.whole_pages,
            compacted_frames: contents.compacted_frames,
            compacted_bytes: contents.compacted_bytes,
            encoded_bytes: contents.encoded_bytes,
            pack_bytes,
            manifest_bytes,
            stall: job.stall,
            hash: job.hash,
            encode,
            put,
            publish,
            prune,
            committed_after,
        })
    }

    /// Step 1: the cache moved on to this capture, its dirty pages encoded, the pack and
    /// the next table assembled (nothing written to the store yet).
    fn encode(&mut self, job: &mut Job) -> Result<crate::snapshot::encode::Assembled> {
        self.cache
            .advance(&mut job.capture, &self.buffers)
            .context("cannot update the page cache")?;
        let packs = self.chain_packs(job);
        let beside_guest = !self.guest_waits.load(std::sync::atomic::Ordering::Relaxed);
        let encoded = encode_pages(
            &job.capture.dirty,
            &self.table,
            self.max_deltas,
            &packs,
            beside_guest,
        )?;
        let kv = job
            .capture
            .kv
            .take()
            .map(|update| crate::snapshot::kv::encode_runs(&update))
            .transpose()?;
        let (store, recent) = (&self.store, &mut self.recent);
        assemble(
            job.generation,
            &self.writer_id,
            &self.table,
            &job.capture,
            encoded,
            kv,
            &mut |pack| recent.get(store, pack),
        )
    }

    /// Step 2: the pack stored and the output the manifest binds made durable. Neither
    /// needs the other, so they go at once (two round trips to a remote store become
    /// one). Returns the pack's size.
    fn put_pack_and_make_output_durable(
        &mut self,
        job: &mut Job,
        pack: Option<(Arc<crate::store::manifest::PackRef>, Vec<u8>)>,
    ) -> Result<usize> {
        let generation = job.generation;
        let output = &mut job.output.commit;
        let (pack_put, output_durable) = std::thread::scope(|scope| {
            let output = scope.spawn(|| output.make_durable());
            let pack = pack.map(|(pack, bytes)| {
                let bytes = bytes::Bytes::from(bytes);
                let put = self.store.put_pack(&pack.name(), bytes.clone());
                crate::crash::point("commit-pack-put");
                (pack, bytes, put)
            });
            let durable = output
                .join()
                .unwrap_or_else(|_| Err(anyhow!("making the output durable panicked").into()))
                .map_err(crate::Error::into_anyhow);
            (pack, durable)
        });
        let mut pack_bytes = 0;
        if let Some((pack, bytes, put)) = pack_put {
            put?;
            pack_bytes = bytes.len();
            // Kept for the rebases and compactions of the next checkpoints.
            if let Ok(loaded) = LoadedPack::parse(&pack, bytes) {
                self.recent.insert((*pack).clone(), Arc::new(loaded));
            }
        }
        if let Err(err) = output_durable {
            // An output that refuses this writer (a Kafka producer fenced, or timed out
            // after its transaction was aborted) while the store holds a generation this
            // writer did not commit: another writer owns the task.
            let newest = self
                .store
                .generations()
                .ok()
                .and_then(|g| g.last().copied());
            if newest > Some(self.known_generation) {
                return Err(err.context(Fenced { generation }));
            }
            return Err(err);
        }
        Ok(pack_bytes)
    }

    /// Step 3's object: the manifest binding this capture's state to its input position
    /// and output marker.
    fn manifest(&self, job: &mut Job, table: &PageTable) -> Manifest {
        let digests: Vec<u64> = job.capture.memories.iter().map(|m| m.digest).collect();
        let crate::snapshot::table::ManifestParts {
            packs,
            memories,
            kv_runs,
        } = table.to_manifest_parts(&digests);
        Manifest {
            generation: job.generation,
            writer_id: self.writer_id,
            module_sha256: self.module_sha256,
            input_offset: job.input_offset,
            output_marker: job.output.bytes,
            input_position: std::mem::take(&mut job.input_position),
            output_position: job.output.marker.clone(),
            random_seed: self.random_seed,
            random_position: job.random_position,
            created_unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            run_state: job.run_state,
            packs,
            globals: std::mem::take(&mut job.capture.globals),
            memories,
            host_state: std::mem::take(&mut job.capture.host_state),
            kv_runs,
        }
    }

    /// Step 5: retention, strictly after the commit, from the listing the commit's fencing
    /// check made and the packs of this writer's own manifests; every `FULL_PRUNE_EVERY`
    /// commits (and first) a full one that lists the packs, which also collects what
    /// failed checkpoints and other writers left. A failed prune loses nothing (the next
    /// one retries), so it warns rather than stopping the run.
    fn prune(&mut self, manifest: &Manifest, listed: &[(u64, u64)]) {
        if self.retain == usize::MAX {
            return;
        }
        let packs = manifest.packs.iter().map(|p| (p.name(), p.bytes)).collect();
        self.known_packs.insert(manifest.generation, packs);
        let full = self.since_full_prune.is_multiple_of(FULL_PRUNE_EVERY);
        self.since_full_prune += 1;
        let pruned = self.store.prune_after_commit(
            manifest.generation,
            self.retain,
            listed,
            &self.known_packs,
            full,
        );
        if let Err(err) = pruned {
            tracing::warn!("{err:#}");
        }
        while self.known_packs.len() > self.retain.max(1) {
            self.known_packs.pop_first();
        }
    }
}
