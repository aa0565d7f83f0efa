//! Object storage for checkpoints: pack and manifest formats, and the commit.
//!
//! Layout of a store (one store per task):
//!
//! ```text
//! manifests/<generation, 20 digits>          one per committed checkpoint
//! packs/<generation, 20 digits>-<writer>.pack  the pages that checkpoint wrote
//! ```
//!
//! The commit point is the manifest put with `PutMode::Create`, which is atomic on local
//! disk (hard link), on S3 (`If-None-Match: *`) and in memory. A writer that loses the
//! race for a generation gets `AlreadyExists`: that is fencing.

mod local;
pub mod manifest;
pub mod pack;
pub mod prune;
pub mod recent;
pub(crate) mod url;

use std::sync::Arc;

use anyhow::{Context, Result, anyhow};
use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};

pub use local::NotRegular;
pub use manifest::Manifest;
pub use url::{local_dir, open_object_store, open_object_store_with};

use crate::error::{ErrorKind, Fenced, StoreUnavailable, corrupt, error};

/// Objects read at once when a restore or a compaction needs several packs.
const CONCURRENT_READS: usize = 8;

pub const MANIFESTS: &str = "manifests";
pub const PACKS: &str = "packs";
/// The task's id: `wasnap task 1`, a newline, 32 hex digits, a newline.
pub const TASK: &str = "task";
const TASK_MAGIC: &str = "wasnap task 1";

pub fn manifest_path(generation: u64) -> Path {
    Path::from(format!("{MANIFESTS}/{generation:020}"))
}

/// The highest generation a store may hold: far beyond any real task (a checkpoint a
/// millisecond for 10^8 years), and low enough that the next one never overflows.
pub const MAX_GENERATION: u64 = 1 << 62;

/// The generation a `manifests/` object name stands for: exactly 20 digits and at most
/// [`MAX_GENERATION`], else none (the object is not a checkpoint of this store).
pub fn parse_generation(name: &str) -> Option<u64> {
    if name.len() != 20 || !name.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    name.parse().ok().filter(|g| *g <= MAX_GENERATION)
}

/// The most bytes a manifest object may have (a 4 GiB memory's full table of 64 layers
/// needs well under a tenth of it).
pub const MAX_MANIFEST_BYTES: u64 = 256 << 20;
/// The most bytes the `task` object may have.
const MAX_TASK_BYTES: u64 = 4096;

pub fn pack_path(name: &str) -> Path {
    Path::from(format!("{PACKS}/{name}"))
}

/// The pack a writer writes for a generation: unique per writer, so two writers racing
/// for a generation never overwrite each other's pages.
pub fn pack_name(generation: u64, writer_id: &[u8; 16]) -> String {
    format!("{generation:020}-{}.pack", crate::hex::encode(writer_id))
}

/// A manifest committed: its size, and the store's manifests as listed right after it (the
/// fencing check's listing, which retention reuses).
#[derive(Debug)]
pub struct Committed {
    pub bytes: usize,
    /// Generation and size of every manifest, ascending.
    pub manifests: Vec<(u64, u64)>,
}

/// A task's checkpoint store: synchronous calls over an `ObjectStore`, for the run loop.
/// Clones share the objects (a `memory://` store included).
#[derive(Clone)]
pub struct CheckpointStore {
    objects: Arc<dyn ObjectStore>,
    /// Shared by the stores of one worker's tasks (`CheckpointStore::within`).
    runtime: Arc<tokio::runtime::Runtime>,
    /// The URL the user gave, for messages (never holds credentials).
    label: String,
    /// The directory of a local store: where interrupted writes leave staging files.
    local_root: Option<std::path::PathBuf>,
}

impl CheckpointStore {
    /// Open the store at `url`: a directory (created if missing), `file:///dir`,
    /// `s3://BUCKET/PREFIX`, `memory://`.
    pub fn open(url: &str) -> Result<Self, crate::Error> {
        Self::open_with(url, true)
    }

    /// Open the store at `url`, which must exist if it is a directory (`inspect`, `gc`
    /// and `cat` read a store; they never create one).
    pub fn open_existing(url: &str) -> Result<Self, crate::Error> {
        Self::open_with(url, false)
    }

    fn open_with(url: &str, create: bool) -> Result<Self, crate::Error> {
        let runtime = new_runtime()?;
        let objects = {
            let _guard = runtime.enter();
            open_object_store_with(url, create)?
        };
        Ok(Self {
            objects,
            runtime: Arc::new(runtime),
            label: url.to_string(),
            local_root: url::local_dir(url).map(std::path::PathBuf::from),
        })
    }

    #[doc(hidden)] // the engine's, public for the `internals` feature
    /// The store under `prefix` in this one (a worker's task: `PREFIX/<topic>/<partition>`),
    /// sharing its client (connections, credentials) and I/O runtime: many tasks in one
    /// process do not each start their own.
    pub fn within(&self, prefix: &str) -> Self {
        let prefix = prefix.trim_matches('/');
        Self {
            objects: Arc::new(object_store::prefix::PrefixStore::new(
                Arc::clone(&self.objects),
                prefix,
            )),
            runtime: Arc::clone(&self.runtime),
            label: format!("{}/{prefix}", self.label.trim_end_matches('/')),
            local_root: self.local_root.as_ref().map(|root| root.join(prefix)),
        }
    }

    /// Wrap an existing object store (a test double, a fault-injecting wrapper, …).
    pub fn from_object_store(
        objects: Arc<dyn ObjectStore>,
        label: impl Into<String>,
    ) -> crate::Result<Self> {
        Ok(Self {
            objects,
            runtime: Arc::new(new_runtime()?),
            label: label.into(),
            local_root: None,
        })
    }

    /// The store's URL as it was opened (for messages).
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The object store underneath (with its prefix applied).
    pub fn object_store(&self) -> &Arc<dyn ObjectStore> {
        &self.objects
    }

    /// Committed generations, ascending. Objects under `manifests/` whose name is not a
    /// generation number are ignored.
    pub fn generations(&self) -> crate::Result<Vec<u64>> {
        let mut generations: Vec<u64> = self
            .list(MANIFESTS)?
            .iter()
            .filter_map(|(name, _)| parse_generation(name))
            .collect();
        generations.sort_unstable();
        Ok(generations)
    }

    /// The names of the "directories" right under `prefix` (`None`: the store's top).
    pub(crate) fn subdirectories(&self, prefix: Option<&str>) -> Result<Vec<String>> {
        let prefix = prefix.map(Path::from);
        let listed = self
            .runtime
            .block_on(self.objects.list_with_delimiter(prefix.as_ref()))
            .with_context(|| format!("cannot list {}", self.label))
            .context(crate::error::StoreUnavailable {
                what: "store",
                store: self.label.clone(),
            })?;
        Ok(listed
            .common_prefixes
            .iter()
            .filter_map(|p| Some(p.filename()?.to_string()))
            .collect())
    }

    /// File names and sizes of the objects under `prefix`.
    pub(crate) fn list(&self, prefix: &str) -> Result<Vec<(String, u64)>> {
        let listed: Vec<_> = self
            .runtime
            .block_on(self.objects.list(Some(&Path::from(prefix))).try_collect())
            .with_context(|| format!("cannot list {prefix}"))
            .context(crate::error::StoreUnavailable {
                what: "store",
                store: self.label.clone(),
            })?;
        Ok(listed
            .into_iter()
            .filter_map(|meta| Some((meta.location.filename()?.to_string(), meta.size)))
            .collect())
    }

    #[doc(hidden)] // the engine's, public for the `internals` feature
    /// Read and check the manifest of checkpoint `generation` (size-capped, checksummed).
    pub fn read_manifest(&self, generation: u64) -> Result<Manifest> {
        let path = manifest_path(generation);
        let bytes = self.get(&path, MAX_MANIFEST_BYTES)?;
        let manifest = Manifest::decode(&bytes, &format!("manifest {path}"))?;
        if manifest.generation != generation {
            return Err(corrupt!(
                "manifest {path} is corrupt: it says it is generation {}",
                manifest.generation
            ));
        }
        Ok(manifest)
    }

    #[doc(hidden)] // the engine's, public for the `internals` feature
    /// Read several packs, a few at a time; one result per pack, in order. Each must be
    /// exactly the size its manifest gives, which is checked before it is read.
    pub fn read_packs(&self, packs: &[&manifest::PackRef]) -> Vec<Result<Bytes>> {
        use futures::StreamExt;
        self.runtime.block_on(
            futures::stream::iter(packs)
                .map(|pack| async move { self.fetch_pack(pack).await })
                .buffered(CONCURRENT_READS)
                .collect(),
        )
    }

    #[doc(hidden)] // the engine's, public for the `internals` feature
    /// [`Self::read_packs`], stopping at the first pack that cannot be read.
    pub fn read_all_packs(&self, packs: &[&manifest::PackRef]) -> Result<Vec<Bytes>> {
        use futures::StreamExt;
        self.runtime.block_on(
            futures::stream::iter(packs)
                .map(|pack| async move { self.fetch_pack(pack).await })
                .buffered(CONCURRENT_READS)
                .try_collect(),
        )
    }

    async fn fetch_pack(&self, pack: &manifest::PackRef) -> Result<Bytes> {
        let path = pack_path(&pack.name());
        let bytes = self.fetch(&path, pack.bytes).await?;
        if bytes.len() as u64 != pack.bytes {
            return Err(corrupt!(
                "{path} is {} bytes, but its manifest says {}",
                bytes.len(),
                pack.bytes
            ));
        }
        Ok(bytes)
    }

    #[doc(hidden)] // the engine's, public for the `internals` feature
    /// Size of an object, or `None` if it does not exist.
    pub fn object_size(&self, path: &Path) -> Result<Option<u64>> {
        match self.runtime.block_on(self.objects.head(path)) {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => {
                Err(anyhow!(e).context(format!("cannot stat {path} in store {}", self.label)))
            }
        }
    }

    fn get(&self, path: &Path, max_bytes: u64) -> Result<Bytes> {
        self.runtime.block_on(self.fetch(path, max_bytes))
    }

    /// Read a whole object of at most `max_bytes` (checked before its body is read);
    /// errors classified (see [`Self::classify`]).
    async fn fetch(&self, path: &Path, max_bytes: u64) -> Result<Bytes> {
        let result = async {
            let got = self.objects.get(path).await?;
            let size = got.meta.size;
            if size > max_bytes {
                return Ok(Err(size));
            }
            got.bytes().await.map(Ok)
        }
        .await;
        match self.classify(result, path)? {
            Ok(bytes) => Ok(bytes),
            Err(size) => Err(corrupt!(
                "{path} in store {} is {size} bytes, more than the {max_bytes} it may have",
                self.label
            )),
        }
    }

    /// A missing object, or one that is not a regular file, is plain damage to the store;
    /// any other failure means the store is unavailable (see [`StoreUnavailable`]).
    fn classify<T>(&self, result: object_store::Result<T>, path: &Path) -> Result<T> {
        match result {
            Ok(value) => Ok(value),
            Err(e @ object_store::Error::NotFound { .. }) => Err(anyhow!(e).context(error(
                ErrorKind::Corrupt,
                format!("{path} is missing from store {}", self.label),
            ))),
            Err(object_store::Error::Generic { source, .. }) if source.is::<NotRegular>() => {
                Err(error(
                    ErrorKind::Corrupt,
                    format!("store {}: {source}", self.label),
                ))
            }
            Err(e) => {
                Err(anyhow!(e)
                    .context(format!("cannot read {path}"))
                    .context(StoreUnavailable {
                        what: "store",
                        store: self.label.clone(),
                    }))
            }
        }
    }

    #[doc(hidden)] // the engine's, public for the `internals` feature
    /// The task's id, the same for every writer on every machine: read from the store, or
    /// drawn and created there (create-if-absent) by the first writer. The streams name
    /// the task by it (a Kafka output's transactional id, an object output's owner).
    pub fn task_id(&self) -> Result<[u8; 16]> {
        let path = Path::from(TASK);
        for _ in 0..3 {
            let got = self.runtime.block_on(async {
                let got = self.objects.get(&path).await?;
                if got.meta.size > MAX_TASK_BYTES {
                    return Ok(None);
                }
                got.bytes().await.map(Some)
            });
            match got {
                Ok(Some(bytes)) => {
                    let text = std::str::from_utf8(&bytes).unwrap_or("");
                    let mut lines = text.lines();
                    return (lines.next() == Some(TASK_MAGIC))
                        .then(|| lines.next().and_then(crate::hex::decode::<16>))
                        .flatten()
                        .ok_or_else(|| {
                            corrupt!("{path} in store {} is not a wasnap task id", self.label)
                        });
                }
                Ok(None) => {
                    return Err(corrupt!(
                        "{path} in store {} is not a wasnap task id (too large)",
                        self.label
                    ));
                }
                Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return self.classify(Err(e), &path),
            }
            let mut id = [0u8; 16];
            getrandom::fill(&mut id).map_err(|e| anyhow!("cannot draw a task id: {e}"))?;
            let text = format!("{TASK_MAGIC}\n{}\n", crate::hex::encode(&id));
            let opts = PutOptions {
                mode: PutMode::Create,
                ..Default::default()
            };
            match self
                .runtime
                .block_on(self.objects.put_opts(&path, PutPayload::from(text), opts))
            {
                Ok(_) => return Ok(id),
                // Another writer created it first: read theirs.
                Err(object_store::Error::AlreadyExists { .. })
                | Err(object_store::Error::Precondition { .. }) => {}
                Err(e) => return Err(self.write_failed(e, format!("cannot create {path}"))),
            }
        }
        anyhow::bail!("{path} in store {} cannot be read or created", self.label)
    }

    #[doc(hidden)] // the engine's, public for the `internals` feature
    /// Write a pack. Its name is unique to this writer and generation, so a plain put is safe.
    pub fn put_pack(&self, name: &str, bytes: Bytes) -> Result<()> {
        let path = pack_path(name);
        self.runtime
            .block_on(self.objects.put(&path, PutPayload::from(bytes)))
            .map_err(|e| self.write_failed(e, format!("cannot write pack {path}")))?;
        Ok(())
    }

    /// A failed write: the store is unavailable if it is remote; a local directory's
    /// failure (a full disk) speaks for itself.
    fn write_failed(&self, err: object_store::Error, doing: String) -> anyhow::Error {
        let err = anyhow!(err).context(format!("{doing} to store {}", self.label));
        if self.label.starts_with("s3://") {
            err.context(StoreUnavailable {
                what: "store",
                store: self.label.clone(),
            })
        } else {
            err
        }
    }

    #[doc(hidden)] // the engine's, public for the `internals` feature
    /// The commit point: create `manifests/<generation>`, failing if it exists, then make
    /// sure no rival went past it.
    pub fn commit_manifest(&self, manifest: &Manifest, after: u64) -> Result<Committed> {
        let bytes = self.create_manifest(manifest)?;
        // Create-if-absent alone does not fence a writer that fell behind: a rival's prune
        // deletes the manifests it no longer keeps, so a late writer can create one of
        // those generations anew; and a writer whose captures coalesced skips generations,
        // so two writers need not race for the same one. `after` is the newest generation
        // this writer knew of before this commit (its last commit, or the newest listed
        // when it opened): any other manifest past it is a rival's, and this writer must
        // stop before it publishes output or prunes (which would delete the rival's packs).
        // The rival's newest manifest is never deleted, so a listing shows it.
        let manifests = self.manifests()?;
        if manifests
            .iter()
            .any(|(listed, _)| *listed > after && *listed != manifest.generation)
        {
            return Err(Fenced {
                generation: manifest.generation,
            }
            .into());
        }
        Ok(Committed { bytes, manifests })
    }

    #[doc(hidden)] // the engine's, public for the `internals` feature
    /// Committed generations with their manifests' sizes, ascending.
    pub fn manifests(&self) -> Result<Vec<(u64, u64)>> {
        let mut manifests: Vec<(u64, u64)> = self
            .list(MANIFESTS)?
            .into_iter()
            .filter_map(|(name, size)| Some((parse_generation(&name)?, size)))
            .collect();
        manifests.sort_unstable();
        Ok(manifests)
    }

    fn create_manifest(&self, manifest: &Manifest) -> Result<usize> {
        let path = manifest_path(manifest.generation);
        let bytes = Bytes::from(manifest.encode()?);
        let len = bytes.len();
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        match self.runtime.block_on(self.objects.put_opts(
            &path,
            PutPayload::from(bytes.clone()),
            opts,
        )) {
            Ok(_) => Ok(len),
            Err(object_store::Error::AlreadyExists { .. })
            | Err(object_store::Error::Precondition { .. }) => {
                // A retried put whose first attempt did land finds its own manifest: that is
                // a commit, not a lost race. Manifest bytes are unique per writer.
                match self.get(&path, MAX_MANIFEST_BYTES) {
                    Ok(existing) if existing == bytes => Ok(len),
                    _ => Err(Fenced {
                        generation: manifest.generation,
                    }
                    .into()),
                }
            }
            Err(e) => Err(self.write_failed(e, format!("cannot commit manifest {path}"))),
        }
    }
}

fn new_runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the I/O runtime")
}
