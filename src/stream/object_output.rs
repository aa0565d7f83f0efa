//! Exactly-once output to object storage (`s3://BUCKET/PREFIX`, `file:///DIR`, or a local
//! directory), readable without the engine. The layout is specified in `docs/FORMAT.md`:
//!
//! ```text
//! task                          "wasnap output 1\n" and the task's id in hex: whose output this is
//! parts/<first>-<end>-<generation>-<writer>   output bytes first..end, written before the manifest
//! index/<first>-<end>-<generation>-<writer>   empty, put after the manifest committed: the publish
//! ```
//!
//! The two-phase commit of Flink's FileSink, with Kafka Connect's offset-named files: a
//! checkpoint's output is put as a part under a name unique to its writer before the
//! manifest (`make_durable`); once the manifest committed, an empty index object of the
//! same name publishes it (`publish`). A reader lists `index/` and follows the chain from
//! byte 0: at each offset, the entry with the highest generation above the previous
//! entry's. Small parts are merged: once [`MERGE_PARTS`] parts or [`MERGE_BYTES`] are
//! published, the committer writes them again as one part, publishes it (a higher
//! generation at the same first byte wins), and unpublishes the small ones; parts nobody
//! publishes are deleted once they are old ([`GARBAGE_AGE_SECS`]), so a reader that
//! listed the index a moment before still finds every part it names.
//!
//! Only a writer that has committed changes what readers see. A fenced writer never
//! commits, so it never publishes. A start only reads: what it finds to put right (the
//! claim of a fresh task, the newest checkpoint's part if the crash came before its
//! publish, a merged part cut at an older checkpoint's marker, parts past it, leftovers)
//! is done at the publish of the writer's first commit.

use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, anyhow};
use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{
    GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload,
};

use super::sink::{OutputCommit, OutputFlush, Sink};
use crate::codec::{Put, Reader};
use crate::error::{StoreUnavailable, changed};
use crate::hex;

/// Merge published parts once this many have accumulated ...
pub const MERGE_PARTS: usize = 32;
/// ... or once they hold this many bytes.
pub const MERGE_BYTES: u64 = 8 << 20;

const TASK_OBJECT: &str = "task";
const TASK_MAGIC: &str = "wasnap output 1";
const PARTS: &str = "parts";
const INDEX: &str = "index";

/// One part's name: which output bytes it holds, and which checkpoint wrote it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartName {
    pub first: u64,
    pub end: u64,
    pub generation: u64,
    pub writer: [u8; 16],
}

impl PartName {
    pub fn file_name(&self) -> String {
        format!(
            "{:020}-{:020}-{:020}-{}",
            self.first,
            self.end,
            self.generation,
            hex::encode(&self.writer)
        )
    }

    pub fn parse(name: &str) -> Option<Self> {
        let mut fields = name.split('-');
        let mut number = || -> Option<u64> {
            let field = fields.next()?;
            (field.len() == 20).then(|| field.parse().ok())?
        };
        let (first, end, generation) = (number()?, number()?, number()?);
        let writer = hex::decode(fields.next()?)?;
        if fields.next().is_some() || end <= first {
            return None;
        }
        Some(Self {
            first,
            end,
            generation,
            writer,
        })
    }

    fn part_path(&self) -> Path {
        Path::from(format!("{PARTS}/{}", self.file_name()))
    }

    fn index_path(&self) -> Path {
        Path::from(format!("{INDEX}/{}", self.file_name()))
    }
}

/// What a checkpoint of an object output commits: whose output, how many bytes, and the
/// parts of it that may not be published yet (the crash can come between a manifest and
/// its publish, and a restored writer publishes only at its own first commit), oldest
/// first. Usually one part: the checkpoint's own.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Marker {
    task: [u8; 16],
    end: u64,
    pending: Vec<PartName>,
}

/// Marker bytes start with this, so a file output's bare varint is never taken for one.
const MARKER_TAG: u8 = 0xB5;

impl Marker {
    fn encode(&self) -> Vec<u8> {
        let mut out = vec![MARKER_TAG];
        out.extend_from_slice(&self.task);
        out.put_varint(self.end);
        out.put_varint(self.pending.len() as u64);
        for part in &self.pending {
            out.put_varint(part.first);
            out.put_varint(part.end);
            out.put_varint(part.generation);
            out.extend_from_slice(&part.writer);
        }
        out
    }

    fn decode(bytes: &[u8], url: &str) -> Result<Self> {
        let what = format!("the checkpoint's marker for output {url}");
        // A file's marker is one bare varint (at most 10 bytes): one that happens to start
        // with the tag byte is still told apart by its length.
        let bare_varint = {
            let mut r = Reader::new(bytes, &what);
            r.varint().is_ok() && r.remaining() == 0
        };
        let mut r = Reader::new(bytes, &what);
        if r.u8()? != MARKER_TAG || bare_varint {
            return Err(changed!(
                "output {url} is in object storage, but the checkpoint wrote its output elsewhere (a local file or Kafka); run the task with the same --output"
            ));
        }
        let task = r.array()?;
        let end = r.varint()?;
        let pending = (0..r.varint_count(3 + 16)?)
            .map(|_| {
                Ok(PartName {
                    first: r.varint()?,
                    end: r.varint()?,
                    generation: r.varint()?,
                    writer: r.array()?,
                })
            })
            .collect::<Result<_>>()?;
        r.finish()?;
        Ok(Self { task, end, pending })
    }
}

/// The object store, the runtime that drives it, and the URL for messages.
#[derive(Clone)]
struct Objects {
    store: Arc<dyn ObjectStore>,
    runtime: Arc<tokio::runtime::Runtime>,
    url: String,
}

impl Objects {
    fn open(url: &str) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .context("cannot start the output's I/O runtime")?;
        let store = {
            let _guard = runtime.enter();
            crate::store::open_object_store(url)?
        };
        Ok(Self {
            store,
            runtime: Arc::new(runtime),
            url: url.to_string(),
        })
    }

    /// A failed request: the output is unavailable if it is remote; a local directory's
    /// failure (a full disk) speaks for itself.
    fn unavailable(&self, err: object_store::Error, doing: String) -> anyhow::Error {
        let err = anyhow!(err).context(doing);
        if self.url.starts_with("s3://") {
            err.context(StoreUnavailable {
                what: "output",
                store: self.url.clone(),
            })
        } else {
            err
        }
    }

    fn put(&self, path: &Path, bytes: Bytes) -> Result<()> {
        self.runtime
            .block_on(self.store.put(path, PutPayload::from(bytes)))
            .map_err(|e| {
                self.unavailable(e, format!("cannot write {path} to output {}", self.url))
            })?;
        Ok(())
    }

    fn get(&self, path: &Path, range: Option<std::ops::Range<u64>>) -> Result<Option<Bytes>> {
        let options = GetOptions {
            range: range.map(GetRange::Bounded),
            ..Default::default()
        };
        let got = self.runtime.block_on(async {
            let result = self.store.get_opts(path, options).await?;
            result.bytes().await
        });
        match got {
            Ok(bytes) => Ok(Some(bytes)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => {
                Err(self.unavailable(e, format!("cannot read {path} of output {}", self.url)))
            }
        }
    }

    /// A whole small object, or `Err` naming its size if it is larger than `max`.
    fn get_small(&self, path: &Path, max: u64) -> Result<Option<Bytes>> {
        let got = self.runtime.block_on(async {
            let result = self.store.get(path).await?;
            if result.meta.size > max {
                return Ok(Err(result.meta.size));
            }
            result.bytes().await.map(Ok)
        });
        match got {
            Ok(Ok(bytes)) => Ok(Some(bytes)),
            Ok(Err(size)) => Err(changed!(
                "{path} of output {} is {size} bytes, more than the {max} a wasnap object of its kind has",
                self.url
            )),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => {
                Err(self.unavailable(e, format!("cannot read {path} of output {}", self.url)))
            }
        }
    }

    fn exists(&self, path: &Path) -> Result<bool> {
        match self.runtime.block_on(self.store.head(path)) {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => {
                Err(self.unavailable(e, format!("cannot stat {path} of output {}", self.url)))
            }
        }
    }

    fn delete(&self, path: &Path) -> Result<()> {
        match self.runtime.block_on(self.store.delete(path)) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => {
                Err(self.unavailable(e, format!("cannot delete {path} of output {}", self.url)))
            }
        }
    }

    /// Create `path` unless it exists: `false` if it did.
    fn create(&self, path: &Path, bytes: Bytes) -> Result<bool> {
        let options = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        match self
            .runtime
            .block_on(self.store.put_opts(path, PutPayload::from(bytes), options))
        {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. })
            | Err(object_store::Error::Precondition { .. }) => Ok(false),
            Err(e) => {
                Err(self.unavailable(e, format!("cannot write {path} to output {}", self.url)))
            }
        }
    }

    /// The parts named under `dir` (`parts` or `index`), with when each was written
    /// (seconds since the epoch, by the store's clock).
    fn listed(&self, dir: &str) -> Result<Vec<(PartName, i64)>> {
        let prefix = Path::from(dir);
        let listed: Vec<_> = self
            .runtime
            .block_on(self.store.list(Some(&prefix)).try_collect())
            .map_err(|e| self.unavailable(e, format!("cannot list output {}", self.url)))?;
        Ok(listed
            .iter()
            .filter_map(|meta| {
                let name = PartName::parse(meta.location.filename()?)?;
                Some((name, meta.last_modified.timestamp()))
            })
            .collect())
    }

    /// Every published part (whatever the chain will make of them).
    fn published(&self) -> Result<Vec<PartName>> {
        Ok(self
            .listed(INDEX)?
            .into_iter()
            .map(|(name, _)| name)
            .collect())
    }

    /// The task that owns this output: `None` if no task has claimed it yet.
    fn owner(&self) -> Result<Option<[u8; 16]>> {
        let Some(bytes) = self.get_small(&Path::from(TASK_OBJECT), 4096)? else {
            return Ok(None);
        };
        let text = std::str::from_utf8(&bytes).unwrap_or("");
        let mut lines = text.lines();
        let id = (lines.next() == Some(TASK_MAGIC))
            .then(|| lines.next())
            .flatten()
            .and_then(hex::decode::<16>);
        match id {
            Some(id) => Ok(Some(id)),
            None => Err(changed!(
                "output {} is not a wasnap output: its `{TASK_OBJECT}` object is not one wasnap wrote",
                self.url
            )),
        }
    }
}

/// The committed output, in order: from byte 0, at each offset the published part with
/// the highest generation above the previous one's. Stops where no such part starts.
pub fn chain(published: &[PartName]) -> Vec<PartName> {
    let mut by_first: std::collections::BTreeMap<u64, Vec<&PartName>> = Default::default();
    for part in published {
        by_first.entry(part.first).or_default().push(part);
    }
    let (mut offset, mut generation, mut out) = (0u64, 0u64, Vec::new());
    while let Some(next) = by_first.get(&offset).and_then(|parts| {
        parts
            .iter()
            .filter(|p| p.generation > generation)
            .max_by_key(|p| (p.generation, p.end))
    }) {
        out.push((*next).clone());
        offset = next.end;
        generation = next.generation;
    }
    out
}

/// Output to object storage.
pub struct ObjectSink {
    objects: Objects,
    task: [u8; 16],
    /// Output bytes handed to checkpoints so far.
    end: u64,
    buffer: Vec<u8>,
    /// What this writer's checkpoints and their commits share (held only briefly: the
    /// guest's thread takes it in the pause).
    shared: Arc<Mutex<Shared>>,
    /// Published parts not merged yet: the committer's alone.
    merger: Arc<Mutex<Merger>>,
}

/// Kept between the guest's thread (checkpoints) and the committer's (publishes).
#[derive(Default)]
struct Shared {
    /// Parts of checkpoints (or of the restored one) not yet known to be published,
    /// oldest first: every marker names them, and the next publish publishes them.
    unpublished: Vec<PartName>,
    /// What the start found to put right in the output, done at the publish of this
    /// writer's first commit: a writer that turns out to be fenced never changes what
    /// readers see.
    repairs: Vec<Repair>,
}

/// A change to the published output that a start owes, besides its pending parts.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Repair {
    /// Write the `task` object: a fresh task's claim, or one a crash lost.
    Claim,
    /// A merged part runs past the restored checkpoint's marker (a newer checkpoint was
    /// unusable): publish its head, up to `end`, in its place.
    Split { part: PartName, end: u64 },
    /// A published part past the restored checkpoint's marker: unpublish it.
    Unpublish(PartName),
    /// Delete parts that no checkpoint published: crashed or fenced writers' leftovers.
    CollectGarbage,
}

/// Unpublished parts younger than this are never collected: a writer may be about to
/// publish them (a new owner restoring while a fenced one still runs).
const GARBAGE_AGE_SECS: i64 = 600;

impl ObjectSink {
    /// An output of parts under `url` (`s3://BUCKET/PREFIX`, `file:///DIR` or a
    /// directory), positioned by [`Sink::resume_at`](crate::Sink::resume_at).
    pub fn open(url: &str) -> Result<Self> {
        Ok(Self {
            objects: Objects::open(url)?,
            task: [0; 16],
            end: 0,
            buffer: Vec::new(),
            shared: Default::default(),
            merger: Default::default(),
        })
    }

    /// A fresh task: refused if another task has committed output here.
    fn start_fresh(&mut self, task: &[u8; 16]) -> Result<Shared> {
        let url = &self.objects.url;
        let committed = chain(&self.objects.published()?);
        if let Some(last) = committed.last() {
            let owner = self
                .objects
                .owner()?
                .map(|id| hex::encode(&id))
                .unwrap_or_default();
            return Err(changed!(
                "output {url} already holds {} bytes of committed output of another task ({owner}); this task's store has no checkpoint, so it would write over it: use a new output prefix",
                last.end
            ));
        }
        if let Some(owner) = self.objects.owner()?.filter(|owner| owner != task) {
            return Err(changed!(
                "output {url} belongs to task {} (its first checkpoint committed), though it holds no output yet; this task's store has no checkpoint: use a new output prefix",
                hex::encode(&owner)
            ));
        }
        self.task = *task;
        self.end = 0;
        Ok(Shared {
            repairs: vec![Repair::Claim],
            ..Shared::default()
        })
    }

    /// Check the output holds what `marker` committed, and note what to put right once
    /// this writer commits: only reads here.
    fn recover(&mut self, marker: Marker) -> Result<Shared> {
        let url = self.objects.url.clone();
        let mut repairs = Vec::new();
        let mut published = self.objects.published()?;
        match self.objects.owner()? {
            Some(owner) if owner == marker.task => {}
            Some(owner) => {
                return Err(changed!(
                    "output {url} holds another task's output (task {}, not {}): the checkpoint's output is elsewhere",
                    hex::encode(&owner),
                    hex::encode(&marker.task)
                ));
            }
            // The claim follows the first commit: a crash between the two loses it.
            None if published.is_empty() => repairs.push(Repair::Claim),
            None => {
                return Err(changed!(
                    "output {url} holds no wasnap output, but the checkpoint committed {} bytes to it: the output was deleted, or --output names another prefix",
                    marker.end
                ));
            }
        }
        // Pending parts the published chain does not reach yet must be there to publish.
        // (An older checkpoint restored after a newer one was unusable may find its
        // pending parts merged into a bigger part, which reaches past them.)
        let reach = chain(&published).last().map_or(0, |part| part.end);
        let mut unpublished = Vec::new();
        for part in marker.pending.iter().filter(|part| part.end > reach) {
            if published.contains(part) {
                continue;
            }
            if !self.objects.exists(&part.part_path())? {
                return Err(changed!(
                    "output {url} lacks part {} that the checkpoint committed: the output was deleted",
                    part.file_name()
                ));
            }
            unpublished.push(part.clone());
            published.push(part.clone());
        }
        let mut reached = 0;
        for part in chain(&published) {
            if part.end <= marker.end {
                reached = part.end;
            } else if part.first < marker.end {
                repairs.push(Repair::Split {
                    part,
                    end: marker.end,
                });
                reached = marker.end;
            } else {
                repairs.push(Repair::Unpublish(part));
            }
        }
        if reached != marker.end {
            return Err(changed!(
                "output {url} holds {reached} bytes of committed output, but the checkpoint committed {}: parts were deleted",
                marker.end
            ));
        }
        repairs.push(Repair::CollectGarbage);
        self.task = marker.task;
        self.end = marker.end;
        Ok(Shared {
            unpublished,
            repairs,
        })
    }
}

impl Sink for ObjectSink {
    fn resume_at(&mut self, task: &[u8; 16], marker: Option<&[u8]>) -> crate::Result<()> {
        self.buffer.clear();
        let shared = match marker {
            None => self.start_fresh(task)?,
            Some(marker) => {
                let marker = Marker::decode(marker, &self.objects.url)?;
                self.recover(marker)?
            }
        };
        *self.shared.lock().expect("output lock") = shared;
        *self.merger.lock().expect("merger lock") = Merger::default();
        Ok(())
    }

    fn buffer(&mut self) -> &mut Vec<u8> {
        &mut self.buffer
    }

    fn maybe_write(&mut self) -> crate::Result<()> {
        Ok(()) // the output of one checkpoint is one part
    }

    fn checkpoint(&mut self, generation: u64, writer_id: &[u8; 16]) -> crate::Result<OutputFlush> {
        let mut shared = self.shared.lock().expect("output lock");
        let part = if self.buffer.is_empty() {
            None
        } else {
            let name = PartName {
                first: self.end,
                end: self.end + self.buffer.len() as u64,
                generation,
                writer: *writer_id,
            };
            let bytes = Bytes::from(std::mem::take(&mut self.buffer));
            self.end = name.end;
            shared.unpublished.push(name.clone());
            Some((name, bytes))
        };
        let marker = Marker {
            task: self.task,
            end: self.end,
            pending: shared.unpublished.clone(),
        };
        Ok(OutputFlush {
            marker: marker.encode(),
            bytes: self.end,
            commit: Box::new(PartCommit {
                objects: self.objects.clone(),
                task: self.task,
                generation,
                pending: marker.pending,
                part,
                shared: self.shared.clone(),
                merger: self.merger.clone(),
            }),
        })
    }

    fn needs_commit(&self) -> bool {
        let shared = self.shared.lock().expect("output lock");
        !shared.unpublished.is_empty()
            || shared.repairs.iter().any(|r| *r != Repair::CollectGarbage)
    }

    fn len(&self) -> u64 {
        self.end + self.buffer.len() as u64
    }
}

/// One checkpoint's part, and what its publish owes.
struct PartCommit {
    objects: Objects,
    task: [u8; 16],
    generation: u64,
    /// The parts its marker names as possibly unpublished; its own is the last.
    pending: Vec<PartName>,
    part: Option<(PartName, Bytes)>,
    shared: Arc<Mutex<Shared>>,
    merger: Arc<Mutex<Merger>>,
}

impl PartCommit {
    fn repair(&self, repair: &Repair) -> Result<()> {
        let objects = &self.objects;
        match repair {
            Repair::Claim => {
                let text = format!("{TASK_MAGIC}\n{}\n", hex::encode(&self.task));
                if !objects.create(&Path::from(TASK_OBJECT), Bytes::from(text))?
                    && objects.owner()? != Some(self.task)
                {
                    return Err(changed!(
                        "output {} was claimed by another task while this one started; its output stays unpublished: use a new output prefix",
                        objects.url
                    ));
                }
                Ok(())
            }
            Repair::Split { part, end } => {
                let bytes = objects
                    .get(&part.part_path(), Some(0..end - part.first))?
                    .with_context(|| {
                        format!(
                            "part {} of output {} is missing",
                            part.file_name(),
                            objects.url
                        )
                    })?;
                let head = PartName {
                    end: *end,
                    ..part.clone()
                };
                objects.put(&head.part_path(), bytes)?;
                // The head has the merged part's generation: it wins at its first byte
                // only once the merged part is unpublished.
                objects.delete(&part.index_path())?;
                objects.put(&head.index_path(), Bytes::new())
            }
            Repair::Unpublish(part) => objects.delete(&part.index_path()),
            Repair::CollectGarbage => collect_garbage(objects, self.generation, GARBAGE_AGE_SECS),
        }
    }
}

/// Delete unpublished parts of generations up to `committed` (this writer's newest
/// commit: any part of a later generation may be another writer's, in flight) written at
/// least `min_age_secs` ago, so that no writer is about to publish them.
fn collect_garbage(objects: &Objects, committed: u64, min_age_secs: i64) -> Result<()> {
    let published = objects.published()?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let mut deleted = 0;
    for (part, written) in objects.listed(PARTS)? {
        if part.generation <= committed
            && !published.contains(&part)
            && now - written >= min_age_secs
        {
            objects.delete(&part.part_path())?;
            deleted += 1;
        }
    }
    if deleted > 0 {
        tracing::debug!(deleted, output = objects.url, "unpublished parts collected");
    }
    Ok(())
}

impl OutputCommit for PartCommit {
    fn held_bytes(&self) -> u64 {
        self.part
            .as_ref()
            .map_or(0, |(_, bytes)| bytes.len() as u64)
    }

    fn make_durable(&mut self) -> crate::Result<()> {
        match &self.part {
            Some((name, bytes)) => {
                self.objects.put(&name.part_path(), bytes.clone())?;
                crate::crash::point("output-part-put");
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// Commits publish one at a time, in order: the first after a start does its repairs.
    fn publish(&mut self) -> crate::Result<()> {
        // The lock only to read and update the lists: no I/O under it.
        let (repairs, to_publish) = {
            let mut shared = self.shared.lock().expect("output lock");
            let to_publish: Vec<PartName> = (self.pending.iter())
                .filter(|part| shared.unpublished.contains(part))
                .cloned()
                .collect();
            (std::mem::take(&mut shared.repairs), to_publish)
        };
        let mut collect = false;
        for repair in &repairs {
            match repair {
                Repair::CollectGarbage => collect = true,
                repair => self.repair(repair)?,
            }
        }
        // Oldest first, so the published chain only ever grows by whole parts.
        for part in &to_publish {
            self.objects.put(&part.index_path(), Bytes::new())?;
            crate::crash::point("output-index-put");
        }
        let mut shared = self.shared.lock().expect("output lock");
        shared.unpublished.retain(|p| !to_publish.contains(p));
        drop(shared);
        if let Some((name, bytes)) = self.part.take() {
            let mut merger = self.merger.lock().expect("merger lock");
            merger.add(name, bytes);
            match merger.maybe_merge(&self.objects) {
                // Merging only tidies: the small parts stay published and correct.
                Err(err) => tracing::warn!("cannot merge output parts: {err:#}"),
                Ok(merged) => collect |= merged,
            }
        }
        // Garbage costs only storage: a failure is a warning.
        if collect && let Err(err) = self.repair(&Repair::CollectGarbage) {
            tracing::warn!("cannot collect unpublished output parts: {err:#}");
        }
        Ok(())
    }
}

/// Published parts not merged yet, with their bytes.
#[derive(Default)]
struct Merger {
    parts: Vec<(PartName, Bytes)>,
    bytes: u64,
}

impl Merger {
    fn add(&mut self, name: PartName, bytes: Bytes) {
        if self
            .parts
            .last()
            .is_some_and(|(last, _)| last.end != name.first)
        {
            self.parts.clear(); // not contiguous (cannot happen in one run): start over
            self.bytes = 0;
        }
        self.bytes += bytes.len() as u64;
        self.parts.push((name, bytes));
    }

    /// Merge the parts held if there are enough of them: whether it did.
    fn maybe_merge(&mut self, objects: &Objects) -> Result<bool> {
        if self.parts.len() < MERGE_PARTS && self.bytes < MERGE_BYTES {
            return Ok(false);
        }
        let parts = std::mem::take(&mut self.parts);
        self.bytes = 0;
        if parts.len() < 2 {
            return Ok(false);
        }
        let (first, last) = (&parts[0].0, &parts[parts.len() - 1].0);
        let merged = PartName {
            first: first.first,
            end: last.end,
            generation: last.generation,
            writer: last.writer,
        };
        let mut bytes = Vec::with_capacity((merged.end - merged.first) as usize);
        for (_, part) in &parts {
            bytes.extend_from_slice(part);
        }
        objects.put(&merged.part_path(), Bytes::from(bytes))?;
        objects.put(&merged.index_path(), Bytes::new())?;
        crate::crash::point("output-merge-put");
        // Published: the small parts are off the chain now (the merged one starts at the
        // first one's offset with a higher generation, and ends where the last one ends).
        // Their entries go; their bytes stay for a reader that listed them a moment ago,
        // until garbage collection finds them unpublished and old.
        for (name, _) in &parts {
            objects.delete(&name.index_path())?;
        }
        Ok(true)
    }
}

/// How much of a part `cat` reads at once.
const CAT_PIECE: u64 = 8 << 20;

/// Write the committed output of `url` to `out`, in order. With the marker of the store's
/// newest checkpoint, stop at what it committed and include its pending parts even if the
/// crash came before their publish; without, follow the published chain to its end.
pub fn cat(url: &str, newest_marker: Option<&[u8]>, out: &mut dyn std::io::Write) -> Result<u64> {
    let objects = Objects::open(url)?;
    let mut published = objects.published()?;
    let limit = match newest_marker {
        None => None,
        Some(marker) => {
            let marker = Marker::decode(marker, url)?;
            // No owner yet: the crash came between the task's first commit and its claim.
            if objects.owner()?.is_some_and(|owner| owner != marker.task) {
                return Err(changed!(
                    "output {url} is not the output of this store's task"
                ));
            }
            for part in marker.pending {
                if !published.contains(&part) {
                    published.push(part);
                }
            }
            Some(marker.end)
        }
    };
    let mut written = 0u64;
    for part in chain(&published) {
        let end = limit.map_or(part.end, |limit| part.end.min(limit));
        if end <= part.first {
            break;
        }
        // In pieces: a part is as large as its name says, which need not be small.
        let mut at = 0;
        while at < end - part.first {
            let piece = at..(at + CAT_PIECE).min(end - part.first);
            let bytes = objects
                .get(&part.part_path(), Some(piece.clone()))?
                .with_context(|| format!("part {} of output {url} is missing", part.file_name()))?;
            if bytes.len() as u64 != piece.end - piece.start {
                return Err(changed!(
                    "part {} of output {url} is shorter than its name says",
                    part.file_name()
                ));
            }
            out.write_all(&bytes).context("cannot write to stdout")?;
            at = piece.end;
        }
        written = end;
    }
    if let Some(limit) = limit
        && written != limit
    {
        return Err(changed!(
            "output {url} holds {written} bytes of committed output, but the store's newest checkpoint committed {limit}"
        ));
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TASK: [u8; 16] = [7; 16];

    /// A directory output and its URL.
    fn output() -> (tempfile::TempDir, String) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}", dir.path().display());
        (dir, url)
    }

    fn read(url: &str, marker: Option<&[u8]>) -> Vec<u8> {
        let mut out = Vec::new();
        cat(url, marker, &mut out).unwrap();
        out
    }

    /// Emit `text` and checkpoint `generation`: make it durable, and publish it if
    /// `commit` (else the writer crashed or was fenced before its manifest).
    fn step(sink: &mut ObjectSink, generation: u64, text: &str, commit: bool) -> Vec<u8> {
        sink.buffer().extend_from_slice(text.as_bytes());
        let mut flush = sink
            .checkpoint(generation, &[generation as u8; 16])
            .unwrap();
        flush.commit.make_durable().unwrap();
        if commit {
            flush.commit.publish().unwrap();
        }
        flush.marker
    }

    fn files(dir: &std::path::Path, sub: &str) -> usize {
        std::fs::read_dir(dir.join(sub)).map_or(0, |d| d.count())
    }

    #[test]
    fn a_fresh_start_writes_nothing_readers_see_until_its_first_commit() {
        let (dir, url) = output();
        let mut sink = ObjectSink::open(&url).unwrap();
        sink.resume_at(&TASK, None).unwrap();
        step(&mut sink, 1, "a\n", false);
        assert!(
            !dir.path().join(TASK_OBJECT).exists(),
            "claimed before a commit"
        );
        assert_eq!(read(&url, None), b"");
        let mut sink = ObjectSink::open(&url).unwrap();
        sink.resume_at(&TASK, None).unwrap();
        step(&mut sink, 1, "a\n", true);
        assert!(dir.path().join(TASK_OBJECT).exists());
        step(&mut sink, 2, "b\n", true);
        assert_eq!(read(&url, None), b"a\nb\n");
        // Another fresh task on this output is refused, and changes nothing.
        let err = ObjectSink::open(&url)
            .unwrap()
            .resume_at(&TASK, None)
            .unwrap_err();
        assert!(format!("{err:#}").contains("another task"), "{err:#}");
        assert_eq!(files(dir.path(), INDEX), 2);
    }

    #[test]
    fn a_restore_repairs_the_output_only_once_it_has_committed() {
        let (_dir, url) = output();
        let mut first = ObjectSink::open(&url).unwrap();
        first.resume_at(&TASK, None).unwrap();
        step(&mut first, 1, "a\n", true);
        // The crash comes between checkpoint 2's manifest and its publish.
        let marker = step(&mut first, 2, "b\n", false);
        assert_eq!(read(&url, None), b"a\n");
        assert_eq!(read(&url, Some(&marker)), b"a\nb\n");

        // A writer that restores checkpoint 2 but is fenced at 3 shows nothing.
        let mut fenced = ObjectSink::open(&url).unwrap();
        fenced.resume_at(&TASK, Some(&marker)).unwrap();
        step(&mut fenced, 3, "zombie\n", false);
        assert_eq!(read(&url, None), b"a\n");

        // The one that commits 3 crashes before its publish too: 3's marker names both
        // unpublished parts.
        let mut owner = ObjectSink::open(&url).unwrap();
        owner.resume_at(&TASK, Some(&marker)).unwrap();
        let marker = step(&mut owner, 3, "c\n", false);
        assert_eq!(read(&url, None), b"a\n");
        assert_eq!(read(&url, Some(&marker)), b"a\nb\nc\n");

        // The one that commits 4 publishes 2's and 3's parts first, then its own.
        let mut owner = ObjectSink::open(&url).unwrap();
        owner.resume_at(&TASK, Some(&marker)).unwrap();
        assert_eq!(read(&url, None), b"a\n");
        step(&mut owner, 4, "d\n", true);
        assert_eq!(read(&url, None), b"a\nb\nc\nd\n");
    }

    #[test]
    fn an_older_restore_cuts_a_merged_part_and_unpublishes_what_lies_past_it() {
        let (dir, url) = output();
        let mut sink = ObjectSink::open(&url).unwrap();
        sink.resume_at(&TASK, None).unwrap();
        let mut markers = Vec::new();
        let mut expected = Vec::new();
        for generation in 1..=(MERGE_PARTS as u64 + 5) {
            let line = format!("line {generation}\n");
            markers.push(step(&mut sink, generation, &line, true));
            expected.push(line);
        }
        let all: Vec<u8> = expected.concat().into_bytes();
        assert_eq!(read(&url, None), all);
        // Checkpoint 10 is restored (the newer ones were unusable): its marker lies inside
        // the merged part, and parts 33.. lie past it.
        let mut older = ObjectSink::open(&url).unwrap();
        older.resume_at(&TASK, Some(&markers[9])).unwrap();
        assert_eq!(read(&url, None), all, "changed before a commit");
        step(&mut older, 100, "after\n", true);
        let mut want = expected[..10].concat();
        want.push_str("after\n");
        assert_eq!(read(&url, None), want.as_bytes());
        // Published: the head of the merged part, and the new part; nothing past them.
        assert_eq!(files(dir.path(), INDEX), 2);
    }

    #[test]
    fn garbage_is_unpublished_parts_no_newer_than_the_commit() {
        let (dir, url) = output();
        let mut sink = ObjectSink::open(&url).unwrap();
        sink.resume_at(&TASK, None).unwrap();
        let marker = step(&mut sink, 1, "a\n", true);
        step(&mut sink, 2, "lost\n", false); // crashed before its manifest
        let mut next = ObjectSink::open(&url).unwrap();
        next.resume_at(&TASK, Some(&marker)).unwrap();
        step(&mut next, 3, "b\n", true);
        step(&mut next, 4, "in flight\n", false);
        assert_eq!(files(dir.path(), PARTS), 4);
        collect_garbage(&next.objects, 3, 0).unwrap();
        // Gen 2's part is gone; 1 and 3 are published, 4 may still commit.
        assert_eq!(files(dir.path(), PARTS), 3);
        assert_eq!(read(&url, None), b"a\nb\n");
        // Young garbage stays.
        step(&mut next, 5, "c\n", false);
        collect_garbage(&next.objects, 5, 600).unwrap();
        assert_eq!(files(dir.path(), PARTS), 4);
    }

    fn part(first: u64, end: u64, generation: u64) -> PartName {
        PartName {
            first,
            end,
            generation,
            writer: [generation as u8; 16],
        }
    }

    #[test]
    fn part_names_round_trip_and_reject_strangers() {
        let name = part(5, 90, 7);
        assert_eq!(PartName::parse(&name.file_name()), Some(name));
        for bad in [
            "",
            "x",
            "00000000000000000005-00000000000000000005-00000000000000000001-00000000000000000000000000000000",
        ] {
            assert_eq!(PartName::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_chain_follows_higher_generations_from_byte_zero() {
        // A merged part supersedes the small ones it covers; a stale part (a lower
        // generation at an offset the chain reaches) ends nothing; a gap ends the chain.
        let parts = vec![
            part(0, 10, 1),
            part(10, 20, 2),
            part(20, 30, 3),
            part(0, 20, 2),  // merged 1 and 2
            part(30, 40, 2), // stale: generation 2 after 3
            part(50, 60, 9), // after a gap
        ];
        assert_eq!(chain(&parts), vec![part(0, 20, 2), part(20, 30, 3)]);
        assert_eq!(chain(&[]), vec![]);
    }

    #[test]
    fn markers_round_trip_and_a_file_marker_is_refused() {
        for marker in [
            Marker {
                task: [3; 16],
                end: 77,
                pending: vec![part(70, 77, 4)],
            },
            Marker {
                task: [3; 16],
                end: 90,
                pending: vec![part(70, 77, 4), part(77, 90, 5)],
            },
            Marker {
                task: [4; 16],
                end: 0,
                pending: vec![],
            },
        ] {
            assert_eq!(Marker::decode(&marker.encode(), "u").unwrap(), marker);
        }
        // Any file marker, including those whose first byte is the tag.
        for len in [5, 0x35 + (1 << 7), 0x35 + (1 << 14) + (1 << 30)] {
            let file = crate::stream::sink::file_marker(len);
            let err = Marker::decode(&file, "u").unwrap_err();
            assert!(format!("{err:#}").contains("local file"), "{len}: {err:#}");
        }
        assert_eq!(
            crate::stream::sink::file_marker(0x35 + (1 << 7))[0],
            MARKER_TAG
        );
    }
}
