//! Capture: what changed in a paused guest since the last capture. The only work done
//! while the guest is paused.
//!
//! Called only between two guest calls, when no guest frame is live, so the memories and
//! mutable globals are the guest's whole state. It asks the dirty tracker which pages may
//! have changed and hashes those (every page, when the tracker cannot tell), and for each
//! page whose hash changed copies the new bytes and the previous version (from the page
//! cache, verified by hash) out of the way, then records the new version in the cache and
//! arms the tracker again. Encoding and storing happen later, on other threads, from
//! these copies.

use anyhow::Result;

use super::cache::PageCache;
use super::dirty::{Dirty, DirtyTracker, MissedWrites};
use super::pages::{self, PageChange};
use crate::guest::{GlobalValue, GuestInstance};

/// A dirty page, copied out of the guest.
pub struct CapturedPage {
    pub memory: usize,
    pub page: u32,
    pub bytes: Vec<u8>,
    /// The version last captured, when the cache could vouch for it: the delta base.
    pub base: Option<Vec<u8>>,
}

pub struct CapturedMemory {
    pub byte_len: u64,
    pub digest: u64,
}

/// Everything a checkpoint needs from the paused guest.
pub struct Capture {
    pub globals: Vec<GlobalValue>,
    pub memories: Vec<CapturedMemory>,
    pub dirty: Vec<CapturedPage>,
    /// Pages that changed to all-zero: recorded as zero, nothing written.
    pub zeroed: Vec<(usize, u32)>,
    /// Pages hashed: every page, or only those the dirty tracker reported.
    pub hashed_pages: usize,
    /// Memories whose dirty pages the kernel reported (the others were hashed whole).
    pub kernel_tracked_memories: usize,
}

impl Capture {
    pub fn dirty_bytes(&self) -> usize {
        self.dirty.iter().map(|p| p.bytes.len()).sum()
    }
}

/// Capture `instance`. `hashes` holds the page hashes of the last capture (empty before
/// the first) and is advanced to this one; `cache` holds that capture's pages and is
/// advanced too; `tracker` was armed at the last capture (or restore) and is armed again.
pub fn capture(
    instance: &mut GuestInstance,
    hashes: &mut [Vec<u64>],
    cache: &mut PageCache,
    tracker: &mut dyn DirtyTracker,
) -> Result<Capture> {
    let globals = instance.globals()?;
    let mut memories = Vec::with_capacity(instance.memory_count());
    let mut dirty = Vec::new();
    let mut zeroed = Vec::new();
    let (mut hashed_pages, mut kernel_tracked_memories) = (0, 0);
    for (index, previous) in hashes.iter_mut().enumerate() {
        let memory = instance.memory(index);
        let tracked = match tracker.collect(index, memory) {
            Ok(Dirty::Pages(listed)) => {
                pages::rehash_listed(memory, previous, &listed).map(|hashes| (hashes, listed.len()))
            }
            Ok(Dirty::All) => None,
            Err(err) if err.is::<MissedWrites>() => return Err(err),
            Err(err) => {
                tracing::warn!("{err:#}; hashing every page of memory {index} this time");
                None
            }
        };
        let new_hashes = match tracked {
            Some((hashes, listed)) => {
                kernel_tracked_memories += 1;
                hashed_pages += listed;
                hashes
            }
            None => {
                hashed_pages += pages::page_count(memory.len() as u64);
                pages::hash_pages(memory)
            }
        };
        let changes = pages::diff(memory, &new_hashes, previous);
        cache.resize(index, memory.len() as u64)?;
        for (page, change) in changes {
            let bytes = pages::page(memory, page);
            match change {
                PageChange::Dirty => {
                    let base = previous
                        .get(page)
                        .filter(|hash| **hash != *pages::ZERO_PAGE_HASH)
                        .and_then(|hash| cache.verified_page(index, page, *hash))
                        .map(<[u8]>::to_vec);
                    dirty.push(CapturedPage {
                        memory: index,
                        page: page as u32,
                        bytes: bytes.to_vec(),
                        base,
                    });
                }
                PageChange::Zeroed => {
                    zeroed.push((index, page as u32));
                    // A grown page is zero in the cache already; writing it would only
                    // allocate file pages for nothing.
                    if previous.get(page).is_none() {
                        continue;
                    }
                }
            }
            cache.store_page(index, page, bytes);
        }
        memories.push(CapturedMemory {
            byte_len: memory.len() as u64,
            digest: pages::memory_digest(&new_hashes),
        });
        *previous = new_hashes;
        if let Err(err) = tracker.arm(index, memory) {
            tracing::warn!("{err:#}");
        }
    }
    Ok(Capture {
        globals,
        memories,
        dirty,
        zeroed,
        hashed_pages,
        kernel_tracked_memories,
    })
}
