//! Recent packs, kept in memory by the writer that put them: chain rebasing and compaction
//! read old frames back, and most of what they read is what this writer wrote a few
//! checkpoints ago. A pack not kept here is read from the store once and then kept.
//! Bounded by bytes, oldest inserted dropped first. Packs are immutable under their
//! names, so a kept copy never goes stale.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::Result;
use bytes::Bytes;

use super::CheckpointStore;
use super::manifest::PackRef;
use super::pack::PackIndex;
use crate::error::corrupt;

/// A pack's bytes and its frame index, checked against the reference that names it.
pub struct LoadedPack {
    pub bytes: Bytes,
    pub index: PackIndex,
}

impl LoadedPack {
    /// Parse `bytes` as the pack `pack_ref` names (generation, writer, frames, size).
    pub fn parse(pack_ref: &PackRef, bytes: Bytes) -> Result<Self> {
        let what = format!("pack {}", pack_ref.name());
        let index = PackIndex::parse(&bytes, &what)?;
        if index.generation != pack_ref.generation
            || index.writer_id != pack_ref.writer_id
            || index.frames.len() != pack_ref.frames as usize
            || bytes.len() as u64 != pack_ref.bytes
        {
            return Err(corrupt!("{what} is not the pack its checkpoint wrote"));
        }
        Ok(Self { bytes, index })
    }

    /// The bytes of frame `frame` (header included), if the pack has it.
    pub fn frame(&self, frame: u32) -> Option<&[u8]> {
        self.index.frame(&self.bytes, frame)
    }
}

pub struct RecentPacks {
    packs: HashMap<PackRef, Arc<LoadedPack>>,
    order: VecDeque<PackRef>,
    bytes: u64,
    limit: u64,
    /// Counted among the process's shared caches: each keeps `limit / their number`.
    shared: bool,
}

/// How many shared caches are alive in this process (one per task's committer).
static SHARED_CACHES: AtomicUsize = AtomicUsize::new(0);

impl RecentPacks {
    /// Keep at most `limit` bytes of packs.
    pub fn new(limit: u64) -> Self {
        Self {
            packs: HashMap::new(),
            order: VecDeque::new(),
            bytes: 0,
            limit,
            shared: false,
        }
    }

    /// One of the process's caches that share `limit` bytes between them, in equal parts
    /// (a worker of many tasks keeps as much as one run does, in all).
    pub fn shared(limit: u64) -> Self {
        SHARED_CACHES.fetch_add(1, Ordering::Relaxed);
        let mut cache = Self::new(limit);
        cache.shared = true;
        cache
    }

    /// This cache's share of its limit now.
    fn budget(&self) -> u64 {
        if self.shared {
            self.limit / SHARED_CACHES.load(Ordering::Relaxed).max(1) as u64
        } else {
            self.limit
        }
    }

    /// Remember a pack (one this writer just put, or one just read).
    pub fn insert(&mut self, pack_ref: PackRef, pack: Arc<LoadedPack>) {
        let size = pack.bytes.len() as u64;
        let budget = self.budget();
        if size > budget || self.packs.contains_key(&pack_ref) {
            return;
        }
        while self.bytes + size > budget {
            let Some(oldest) = self.order.pop_front() else {
                break;
            };
            if let Some(dropped) = self.packs.remove(&oldest) {
                self.bytes -= dropped.bytes.len() as u64;
            }
        }
        self.bytes += size;
        self.order.push_back(pack_ref.clone());
        self.packs.insert(pack_ref, pack);
    }

    /// The packs `wanted`, from memory or else read from `store` (several at a time);
    /// one result per pack, in order. What is in memory is taken first, so packs read
    /// now cannot push out a wanted one before it is handed over.
    pub fn get_many(
        &mut self,
        store: &CheckpointStore,
        wanted: &[PackRef],
    ) -> Vec<Result<Arc<LoadedPack>>> {
        let kept: Vec<Option<Arc<LoadedPack>>> =
            wanted.iter().map(|p| self.packs.get(p).cloned()).collect();
        let missing: Vec<&PackRef> = wanted
            .iter()
            .zip(&kept)
            .filter(|(_, kept)| kept.is_none())
            .map(|(p, _)| p)
            .collect();
        let mut read = store.read_packs(&missing).into_iter();
        wanted
            .iter()
            .zip(kept)
            .map(|(pack_ref, kept)| {
                if let Some(pack) = kept {
                    return Ok(pack);
                }
                let bytes = read.next().expect("one read per pack not kept");
                let pack = Arc::new(LoadedPack::parse(pack_ref, bytes?)?);
                self.insert(pack_ref.clone(), pack.clone());
                Ok(pack)
            })
            .collect()
    }

    /// One pack, from memory or the store.
    pub fn get(&mut self, store: &CheckpointStore, pack_ref: &PackRef) -> Result<Arc<LoadedPack>> {
        self.get_many(store, std::slice::from_ref(pack_ref))
            .pop()
            .expect("one result per pack")
    }
}

impl Drop for RecentPacks {
    fn drop(&mut self) {
        if self.shared {
            SHARED_CACHES.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delta::Encoding;
    use crate::store::pack::PackBuilder;

    fn pack(generation: u64, payload_len: usize) -> (PackRef, Arc<LoadedPack>) {
        let mut builder = PackBuilder::new(generation, &[1; 16], payload_len);
        builder
            .push_payload(Encoding::Full, &vec![0; payload_len])
            .unwrap();
        let bytes = Bytes::from(builder.finish());
        let pack_ref = PackRef {
            generation,
            writer_id: [1; 16],
            frames: 1,
            bytes: bytes.len() as u64,
        };
        let loaded = Arc::new(LoadedPack::parse(&pack_ref, bytes).unwrap());
        (pack_ref, loaded)
    }

    #[test]
    fn packs_read_once_are_kept_the_oldest_go_first_and_the_bound_holds() {
        let store = CheckpointStore::open("memory://").unwrap();
        let (a, pa) = pack(1, 400);
        let (b, pb) = pack(2, 400);
        let (c, pc) = pack(3, 400);
        store.put_pack(&a.name(), pa.bytes.clone()).unwrap();
        let limit = 2 * pa.bytes.len() as u64;
        let mut recent = RecentPacks::new(limit);
        recent.insert(b.clone(), pb);
        recent.insert(c.clone(), pc);
        // Pack 1 comes from the store, is kept, and pushes out pack 2, the oldest.
        assert_eq!(recent.get(&store, &a).unwrap().bytes, pa.bytes);
        assert_eq!(recent.bytes, limit);
        assert!(recent.packs.contains_key(&a) && recent.packs.contains_key(&c));
        let got = recent.get_many(&store, &[a, b, c]);
        assert!(
            got[1].is_err(),
            "pack 2 was dropped, and the store never had it"
        );
        assert!(got[0].is_ok() && got[2].is_ok());
    }

    #[test]
    fn shared_caches_split_one_limit() {
        let (a, pa) = pack(1, 400);
        let limit = 3 * pa.bytes.len() as u64 / 2;
        let mut first = RecentPacks::shared(limit);
        first.insert(a.clone(), pa.clone());
        let second = RecentPacks::shared(limit);
        // Caches of other tests may be alive too: they only make the shares smaller.
        assert!(second.budget() <= limit / 2);
        let mut fresh = RecentPacks::shared(limit);
        fresh.insert(a.clone(), pa.clone());
        assert!(
            fresh.packs.is_empty(),
            "a pack larger than a third of the limit is not kept"
        );
        drop((second, fresh));
        assert_eq!(first.packs.len(), 1);
        // An unshared cache keeps its whole limit.
        let mut alone = RecentPacks::new(limit);
        alone.insert(a, pa);
        assert_eq!(alone.packs.len(), 1);
    }

    #[test]
    fn a_pack_that_is_not_the_one_named_is_refused() {
        let (mut pack_ref, loaded) = pack(5, 100);
        pack_ref.generation = 6;
        assert!(LoadedPack::parse(&pack_ref, loaded.bytes.clone()).is_err());
    }
}
