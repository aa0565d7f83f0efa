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
//! same name publishes it (`publish`), and a restore publishes the newest checkpoint's part
//! again if the crash came between the two. A fenced writer never commits a manifest, so it
//! never publishes. A reader lists `index/` and follows the chain from byte 0: at each
//! offset, the entry with the highest generation above the previous entry's. Small parts
//! are merged: once [`MERGE_PARTS`] parts or [`MERGE_BYTES`] are published, the committer
//! writes them again as one part, publishes it (a higher generation at the same first
//! byte wins), and deletes the small ones.

use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutPayload};

use super::sink::{OutputCommit, OutputFlush, Sink};
use crate::error::StoreUnavailable;
use crate::store::codec::{Put, Reader};
use crate::store::hex;

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
            hex(&self.writer)
        )
    }

    pub fn parse(name: &str) -> Option<Self> {
        let mut fields = name.split('-');
        let mut number = || -> Option<u64> {
            let field = fields.next()?;
            (field.len() == 20).then(|| field.parse().ok())?
        };
        let (first, end, generation) = (number()?, number()?, number()?);
        let writer_hex = fields.next()?;
        if fields.next().is_some() || writer_hex.len() != 32 || end <= first {
            return None;
        }
        let mut writer = [0u8; 16];
        for (i, byte) in writer.iter_mut().enumerate() {
            *byte = u8::from_str_radix(writer_hex.get(2 * i..2 * i + 2)?, 16).ok()?;
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
/// part holding its last bytes (which a restore publishes again if need be).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Marker {
    task: [u8; 16],
    end: u64,
    last: Option<PartName>,
}

/// Marker bytes start with this, so a file output's bare varint is never taken for one.
const MARKER_TAG: u8 = 0xB5;

impl Marker {
    fn encode(&self) -> Vec<u8> {
        let mut out = vec![MARKER_TAG];
        out.extend_from_slice(&self.task);
        out.put_varint(self.end);
        match &self.last {
            None => out.put_u8(0),
            Some(part) => {
                out.put_u8(1);
                out.put_varint(part.first);
                out.put_varint(part.end);
                out.put_varint(part.generation);
                out.extend_from_slice(&part.writer);
            }
        }
        out
    }

    fn decode(bytes: &[u8], url: &str) -> Result<Self> {
        let what = format!("the checkpoint's marker for output {url}");
        let mut r = Reader::new(bytes, &what);
        if r.u8()? != MARKER_TAG {
            bail!(
                "output {url} is in object storage, but the checkpoint wrote its output to a local file; run the task with the same --output"
            );
        }
        let task = r.array()?;
        let end = r.varint()?;
        let last = match r.u8()? {
            0 => None,
            _ => Some(PartName {
                first: r.varint()?,
                end: r.varint()?,
                generation: r.varint()?,
                writer: r.array()?,
            }),
        };
        Ok(Self { task, end, last })
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

    fn unavailable(&self, err: object_store::Error, doing: String) -> anyhow::Error {
        anyhow!(err).context(doing).context(StoreUnavailable {
            store: self.url.clone(),
        })
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

    /// Every published part (whatever the chain will make of them).
    fn published(&self) -> Result<Vec<PartName>> {
        let prefix = Path::from(INDEX);
        let listed: Vec<_> = self
            .runtime
            .block_on(self.store.list(Some(&prefix)).try_collect())
            .map_err(|e| self.unavailable(e, format!("cannot list output {}", self.url)))?;
        Ok(listed
            .iter()
            .filter_map(|meta| PartName::parse(meta.location.filename()?))
            .collect())
    }

    /// The task that owns this output: `None` if no task has claimed it yet.
    fn owner(&self) -> Result<Option<[u8; 16]>> {
        let Some(bytes) = self.get(&Path::from(TASK_OBJECT), None)? else {
            return Ok(None);
        };
        let text = std::str::from_utf8(&bytes).unwrap_or("");
        let mut lines = text.lines();
        let id = (lines.next() == Some(TASK_MAGIC))
            .then(|| lines.next())
            .flatten()
            .and_then(parse_hex16);
        match id {
            Some(id) => Ok(Some(id)),
            None => bail!(
                "output {} is not a wasnap output: its `{TASK_OBJECT}` object is not one wasnap wrote",
                self.url
            ),
        }
    }
}

fn parse_hex16(text: &str) -> Option<[u8; 16]> {
    let mut id = [0u8; 16];
    if text.len() != 32 {
        return None;
    }
    for (i, byte) in id.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(id)
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
    last: Option<PartName>,
    buffer: Vec<u8>,
    merger: Arc<Mutex<Merger>>,
}

impl ObjectSink {
    pub fn open(url: &str) -> Result<Self> {
        Ok(Self {
            objects: Objects::open(url)?,
            task: [0; 16],
            end: 0,
            last: None,
            buffer: Vec::new(),
            merger: Default::default(),
        })
    }

    /// Claim the output for a fresh task: refused if another task committed output here.
    fn claim(&mut self) -> Result<()> {
        let url = &self.objects.url;
        let committed = chain(&self.objects.published()?);
        if let Some(last) = committed.last() {
            let owner = self.objects.owner()?.map(|id| hex(&id)).unwrap_or_default();
            bail!(
                "output {url} already holds {} bytes of committed output of another task ({owner}); this task's store has no checkpoint, so it would write over it: use a new output prefix",
                last.end
            );
        }
        getrandom::fill(&mut self.task).map_err(|e| anyhow!("cannot draw a task id: {e}"))?;
        let text = format!("{TASK_MAGIC}\n{}\n", hex(&self.task));
        self.objects
            .put(&Path::from(TASK_OBJECT), Bytes::from(text))?;
        self.end = 0;
        self.last = None;
        Ok(())
    }

    /// Check the output holds what `marker` committed, publishing its last part if the
    /// crash came between the manifest and the publish.
    fn recover(&mut self, marker: Marker) -> Result<()> {
        let url = self.objects.url.clone();
        match self.objects.owner()? {
            Some(owner) if owner == marker.task => {}
            Some(owner) => bail!(
                "output {url} holds another task's output (task {}, not {}): the checkpoint's output is elsewhere",
                hex(&owner),
                hex(&marker.task)
            ),
            None => bail!(
                "output {url} holds no wasnap output, but the checkpoint committed {} bytes to it: the output was deleted, or --output names another prefix",
                marker.end
            ),
        }
        let mut published = self.objects.published()?;
        if let Some(last) = &marker.last
            && !published.contains(last)
        {
            if !self.objects.exists(&last.part_path())? {
                bail!(
                    "output {url} lacks part {} that the checkpoint committed: the output was deleted",
                    last.file_name()
                );
            }
            self.objects.put(&last.index_path(), Bytes::new())?;
            published.push(last.clone());
        }
        let mut reached = 0;
        for part in chain(&published) {
            if part.end <= marker.end {
                reached = part.end;
                continue;
            }
            if part.first < marker.end {
                // An older checkpoint is restored (the newer ones were unusable) whose
                // marker lies inside a merged part: publish its head in its place.
                self.split(&part, marker.end)?;
                reached = marker.end;
            }
            break;
        }
        if reached != marker.end {
            bail!(
                "output {url} holds {reached} bytes of committed output, but the checkpoint committed {}: parts were deleted",
                marker.end
            );
        }
        self.task = marker.task;
        self.end = marker.end;
        self.last = marker.last;
        Ok(())
    }

    fn split(&self, part: &PartName, end: u64) -> Result<()> {
        let bytes = self
            .objects
            .get(&part.part_path(), Some(0..end - part.first))?
            .with_context(|| {
                format!(
                    "part {} of output {} is missing",
                    part.file_name(),
                    self.objects.url
                )
            })?;
        let head = PartName {
            end,
            ..part.clone()
        };
        self.objects.put(&head.part_path(), bytes)?;
        self.objects.delete(&part.index_path())?;
        self.objects.put(&head.index_path(), Bytes::new())
    }
}

impl Sink for ObjectSink {
    fn resume_at(&mut self, marker: Option<&[u8]>) -> Result<()> {
        self.buffer.clear();
        *self.merger.lock().expect("merger lock") = Merger::default();
        match marker {
            None => self.claim(),
            Some(marker) => {
                let marker = Marker::decode(marker, &self.objects.url)?;
                self.recover(marker)
            }
        }
    }

    fn buffer(&mut self) -> &mut Vec<u8> {
        &mut self.buffer
    }

    fn maybe_write(&mut self) -> Result<()> {
        Ok(()) // the output of one checkpoint is one part
    }

    fn checkpoint(&mut self, generation: u64, writer_id: &[u8; 16]) -> Result<OutputFlush> {
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
            self.last = Some(name.clone());
            Some((name, bytes))
        };
        let marker = Marker {
            task: self.task,
            end: self.end,
            last: self.last.clone(),
        };
        Ok(OutputFlush {
            marker: marker.encode(),
            bytes: self.end,
            commit: Box::new(PartCommit {
                objects: self.objects.clone(),
                part,
                merger: self.merger.clone(),
            }),
        })
    }

    fn len(&self) -> u64 {
        self.end + self.buffer.len() as u64
    }
}

/// One checkpoint's part.
struct PartCommit {
    objects: Objects,
    part: Option<(PartName, Bytes)>,
    merger: Arc<Mutex<Merger>>,
}

impl OutputCommit for PartCommit {
    fn make_durable(&mut self) -> Result<()> {
        match &self.part {
            Some((name, bytes)) => self.objects.put(&name.part_path(), bytes.clone()),
            None => Ok(()),
        }
    }

    fn publish(&mut self) -> Result<()> {
        let Some((name, bytes)) = self.part.take() else {
            return Ok(());
        };
        self.objects.put(&name.index_path(), Bytes::new())?;
        let mut merger = self.merger.lock().expect("merger lock");
        merger.add(name, bytes);
        if let Err(err) = merger.maybe_merge(&self.objects) {
            // Merging only tidies: the small parts stay published and correct.
            tracing::warn!("cannot merge output parts: {err:#}");
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

    fn maybe_merge(&mut self, objects: &Objects) -> Result<()> {
        if self.parts.len() < MERGE_PARTS && self.bytes < MERGE_BYTES {
            return Ok(());
        }
        let parts = std::mem::take(&mut self.parts);
        self.bytes = 0;
        if parts.len() < 2 {
            return Ok(());
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
        // Published: the small parts are off the chain now (the merged one starts at the
        // first one's offset with a higher generation, and ends where the last one ends).
        for (name, _) in &parts {
            objects.delete(&name.index_path())?;
            objects.delete(&name.part_path())?;
        }
        Ok(())
    }
}

/// Write the committed output of `url` to `out`, in order. With the marker of the store's
/// newest checkpoint, stop at what it committed and include its last part even if the
/// crash came before its publish; without, follow the published chain to its end.
pub fn cat(url: &str, newest_marker: Option<&[u8]>, out: &mut dyn std::io::Write) -> Result<u64> {
    let objects = Objects::open(url)?;
    let mut published = objects.published()?;
    let limit = match newest_marker {
        None => None,
        Some(marker) => {
            let marker = Marker::decode(marker, url)?;
            if objects.owner()? != Some(marker.task) {
                bail!("output {url} is not the output of this store's task");
            }
            if let Some(last) = marker.last
                && !published.contains(&last)
            {
                published.push(last);
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
        let bytes = objects
            .get(&part.part_path(), Some(0..end - part.first))?
            .with_context(|| format!("part {} of output {url} is missing", part.file_name()))?;
        out.write_all(&bytes).context("cannot write to stdout")?;
        written = end;
    }
    if let Some(limit) = limit
        && written != limit
    {
        bail!(
            "output {url} holds {written} bytes of committed output, but the store's newest checkpoint committed {limit}"
        );
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

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
                last: Some(part(70, 77, 4)),
            },
            Marker {
                task: [4; 16],
                end: 0,
                last: None,
            },
        ] {
            assert_eq!(Marker::decode(&marker.encode(), "u").unwrap(), marker);
        }
        let err = Marker::decode(&crate::stream::sink::file_marker(5), "u").unwrap_err();
        assert!(format!("{err:#}").contains("local file"), "{err:#}");
    }
}
