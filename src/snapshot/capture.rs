//! Capture: what changed in a paused guest since the last capture. The only work done
//! while the guest is paused.
//!
//! Called only between two guest calls, when no guest frame is live, so the memories and
//! mutable globals are the guest's whole state. It hashes every page, and for each dirty
//! page copies the new bytes and the previous version (from the page cache, verified by
//! hash) out of the way, then records the new version in the cache. Encoding and storing
//! happen later, on other threads, from these copies.

use anyhow::Result;

use super::cache::PageCache;
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
}

impl Capture {
    pub fn dirty_bytes(&self) -> usize {
        self.dirty.iter().map(|p| p.bytes.len()).sum()
    }
}

/// Capture `instance`. `hashes` holds the page hashes of the last capture (empty before
/// the first) and is advanced to this one; `cache` holds that capture's pages and is
/// advanced too.
pub fn capture(
    instance: &mut GuestInstance,
    hashes: &mut [Vec<u64>],
    cache: &mut PageCache,
) -> Result<Capture> {
    let globals = instance.globals()?;
    let mut memories = Vec::with_capacity(instance.memory_count());
    let mut dirty = Vec::new();
    let mut zeroed = Vec::new();
    for (index, previous) in hashes.iter_mut().enumerate() {
        let memory = instance.memory(index);
        let new_hashes = pages::hash_pages(memory);
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
    }
    Ok(Capture {
        globals,
        memories,
        dirty,
        zeroed,
    })
}
