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

use super::buffers::PageBuffers;
use super::cache::{self, PageCache};
use super::dirty::{ALL_PARTS, Dirty, DirtyTracker, MissedWrites, PART_SIZE};
use super::pages::{self, PAGE_SIZE, PageChange};
use super::parallel;
use crate::guest::GuestInstance;
use crate::state::GlobalValue;

/// A dirty page, copied out of the guest.
pub struct CapturedPage {
    pub memory: usize,
    pub page: u32,
    pub bytes: Vec<u8>,
    /// The version last captured, when the cache could vouch for it: the delta base.
    pub base: Option<Vec<u8>>,
    /// Instead of `base`, when the kernel said only some 4 KiB parts were written: the
    /// previous version of those parts. [`CapturedPage::resolve_base`] (off the guest's
    /// thread) rebuilds the base from them and `bytes`, and checks it.
    pub base_parts: Option<BaseParts>,
}

/// The previous version of a page's written parts, and the hash the whole previous
/// version must have.
pub struct BaseParts {
    /// Bit `i`: part `i` (bytes `i * PART_SIZE ..`) is in `bytes`, in order.
    pub parts: u16,
    pub bytes: Vec<u8>,
    pub hash: u64,
}

impl CapturedPage {
    /// Turn `base_parts` into `base`: this version with its written parts put back to what
    /// they were, if that is the version last captured (its hash says so). A cache that
    /// did not hold that version (damaged) leaves no base: the page goes whole.
    pub fn resolve_base(&mut self, buffers: &PageBuffers) {
        let Some(previous) = self.base_parts.take() else {
            return;
        };
        let mut base = buffers.copy_of(&self.bytes);
        let mut taken = previous.bytes.chunks(PART_SIZE);
        for (part, slot) in base.chunks_mut(PART_SIZE).enumerate() {
            if previous.parts & (1 << part) != 0
                && let Some(old) = taken.next()
            {
                slot.copy_from_slice(old);
            }
        }
        if cache::vouches_for(&base, previous.hash) {
            self.base = Some(base);
        } else {
            buffers.give_back([base]);
        }
        buffers.give_back([previous.bytes]);
    }
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

/// Capture `instance`. `hashes` holds the page hashes of the last capture (empty before
/// the first) and is advanced to this one; `cache` holds that capture's pages and is
/// advanced too; `tracker` was armed at the last capture (or restore) and is armed again.
/// The copies go into `buffers` the committer gave back, where it has.
pub fn capture(
    instance: &mut GuestInstance,
    hashes: &mut [Vec<u64>],
    cache: &mut PageCache,
    tracker: &mut dyn DirtyTracker,
    buffers: &PageBuffers,
) -> Result<Capture> {
    let globals = instance.globals()?;
    let mut memories = Vec::with_capacity(instance.memory_count());
    let mut dirty = Vec::new();
    let mut zeroed = Vec::new();
    let (mut hashed_pages, mut kernel_tracked_memories) = (0, 0);
    for (index, previous) in hashes.iter_mut().enumerate() {
        let memory = instance.memory(index);
        let reported = match tracker.collect(index, memory) {
            Ok(Dirty::Pages(reported)) => Some(reported),
            Ok(Dirty::All) => None,
            Err(err) if err.is::<MissedWrites>() => return Err(err),
            Err(err) => {
                tracing::warn!("{err:#}; hashing every page of memory {index} this time");
                None
            }
        };
        let rehashed = reported.and_then(|listed| {
            let numbers: Vec<usize> = listed.iter().map(|p| p.page).collect();
            pages::rehash_listed(memory, previous, &numbers).map(|hashes| (hashes, listed))
        });
        // `listed`: the pages the kernel named, with their written parts; empty when
        // every part of every page may have changed.
        let (new_hashes, listed) = match rehashed {
            Some((hashes, listed)) => {
                kernel_tracked_memories += 1;
                hashed_pages += listed.len();
                (hashes, listed)
            }
            None => {
                hashed_pages += pages::page_count(memory.len() as u64);
                (pages::hash_pages(memory), Vec::new())
            }
        };
        let changes = pages::diff(memory, &new_hashes, previous);
        cache.resize(index, memory.len() as u64)?;
        let parts = |page: usize| match listed.binary_search_by_key(&page, |p| p.page) {
            Ok(at) => listed[at].parts,
            Err(_) => ALL_PARTS,
        };
        let (pages_dirty, pages_zeroed) = copy_out(
            index,
            memory,
            previous,
            &changes,
            &parts,
            cache.bytes_mut(index),
            buffers,
        );
        dirty.extend(pages_dirty);
        zeroed.extend(pages_zeroed);
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

/// Below this many changed pages, copying on the guest's thread beats starting threads.
const PARALLEL_COPY_THRESHOLD: usize = 32;

/// Pages with more written parts than this are copied whole: copying parts one by one
/// no longer saves much.
const MOST_PARTS_COPIED_ALONE: u32 = 8;

/// For each changed page of memory `index`: copy it, and its previous version from the
/// cache when the cache can vouch for it (by hash), out of the guest; then put the new
/// version in the cache. Where the kernel said only some 4 KiB parts of a page were
/// written (`parts`), only those parts of the previous version are copied and only those
/// parts of the cache rewritten: the rest is the same in both versions, and the base is
/// rebuilt and checked off the guest's thread (`resolve_base`). Pages changed to zero
/// are only listed (and zeroed in the cache). On several threads when many pages
/// changed: once hashing is left to the kernel's record, these copies are most of the
/// pause.
fn copy_out(
    index: usize,
    memory: &[u8],
    previous: &[u64],
    changes: &[(usize, PageChange)],
    parts: &(dyn Fn(usize) -> u16 + Sync),
    cached: &mut [u8],
    buffers: &PageBuffers,
) -> (Vec<CapturedPage>, Vec<(usize, u32)>) {
    // Each change with its page of the cache (changes are in ascending page order).
    let mut work = Vec::with_capacity(changes.len());
    let mut changes_left = changes.iter().peekable();
    for (page, slot) in cached.chunks_mut(PAGE_SIZE).enumerate() {
        let Some(&&(changed, change)) = changes_left.peek() else {
            break;
        };
        if changed == page {
            work.push((page, change, slot));
            changes_left.next();
        }
    }
    let one_page = |(page, change, slot): (usize, PageChange, &mut [u8])| {
        let bytes = pages::page(memory, page);
        let previous = previous.get(page);
        match change {
            PageChange::Dirty => {
                let written = parts(page);
                let previous = previous.filter(|hash| **hash != *pages::ZERO_PAGE_HASH);
                let (mut base, mut base_parts) = (None, None);
                if written.count_ones() <= MOST_PARTS_COPIED_ALONE {
                    base_parts = previous.map(|hash| {
                        let mut old = buffers.copy_of(&[]);
                        let written_parts = slot.chunks(PART_SIZE).enumerate();
                        written_parts
                            .filter(|(part, _)| written & (1 << part) != 0)
                            .for_each(|(_, bytes)| old.extend_from_slice(bytes));
                        BaseParts {
                            parts: written,
                            bytes: old,
                            hash: *hash,
                        }
                    });
                    let parts_of_both = slot.chunks_mut(PART_SIZE).zip(bytes.chunks(PART_SIZE));
                    for (part, (cached, new)) in parts_of_both.enumerate() {
                        if written & (1 << part) != 0 {
                            cached.copy_from_slice(new);
                        }
                    }
                } else {
                    base = previous
                        .filter(|hash| cache::vouches_for(slot, **hash))
                        .map(|_| buffers.copy_of(slot));
                    slot.copy_from_slice(bytes);
                }
                Copied::Page(CapturedPage {
                    memory: index,
                    page: page as u32,
                    bytes: buffers.copy_of(bytes),
                    base,
                    base_parts,
                })
            }
            PageChange::Zeroed => {
                // A grown page is zero in the cache already; writing it would only
                // allocate file pages for nothing.
                if previous.is_some() {
                    slot.fill(0);
                }
                Copied::Zeroed((index, page as u32))
            }
        }
    };
    let copied = parallel::map_in_order(work, PARALLEL_COPY_THRESHOLD, one_page);
    let (mut dirty, mut zeroed) = (Vec::new(), Vec::new());
    for copy in copied {
        match copy {
            Copied::Page(page) => dirty.push(page),
            Copied::Zeroed(page) => zeroed.push(page),
        }
    }
    (dirty, zeroed)
}

/// What `copy_out` made of one changed page.
enum Copied {
    Page(CapturedPage),
    Zeroed((usize, u32)),
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Many changed pages (the threaded path): each dirty page is copied with its cached
    /// base where the cache vouches for it, the cache ends up holding the new versions,
    /// and zeroed pages are listed, not copied.
    #[test]
    fn copying_out_many_pages_keeps_order_bases_and_the_cache_right() {
        let pages_n = PARALLEL_COPY_THRESHOLD * 3;
        let old: Vec<u8> = (0..pages_n * PAGE_SIZE)
            .map(|i| (i / PAGE_SIZE) as u8 + 1)
            .collect();
        let previous: Vec<u64> = old.chunks(PAGE_SIZE).map(pages::hash_page).collect();
        let mut cached = old.clone();
        cached[5 * PAGE_SIZE + 9] ^= 1; // a damaged cache page: no base for page 5
        let mut memory: Vec<u8> = old.iter().map(|b| b.wrapping_mul(3)).collect();
        memory[7 * PAGE_SIZE..8 * PAGE_SIZE].fill(0); // page 7 becomes zero
        memory.extend(vec![0u8; 2 * PAGE_SIZE]); // grown by two zero pages
        cached.extend(vec![0u8; 2 * PAGE_SIZE]);
        let hashes = pages::hash_pages(&memory);
        let changes = pages::diff(&memory, &hashes, &previous);
        assert_eq!(changes.len(), pages_n + 2);
        let buffers = PageBuffers::default();
        let all = |_| ALL_PARTS;
        let (dirty, zeroed) =
            copy_out(0, &memory, &previous, &changes, &all, &mut cached, &buffers);
        assert_eq!(
            zeroed,
            vec![(0, 7), (0, pages_n as u32), (0, pages_n as u32 + 1)]
        );
        let order: Vec<u32> = dirty.iter().map(|p| p.page).collect();
        let expected: Vec<u32> = (0..pages_n as u32).filter(|p| *p != 7).collect();
        assert_eq!(order, expected);
        for page in &dirty {
            let at = page.page as usize * PAGE_SIZE;
            assert_eq!(page.bytes, memory[at..at + PAGE_SIZE]);
            match page.page {
                5 => assert!(page.base.is_none(), "a damaged cache page became a base"),
                _ => assert_eq!(page.base.as_deref(), Some(&old[at..at + PAGE_SIZE])),
            }
        }
        assert_eq!(cached, memory, "the cache does not hold the new versions");
    }

    /// Pages whose written parts the kernel named: only those parts of the previous
    /// version are copied, the base is rebuilt from them off the guest's thread and
    /// checked: a cache whose copied part was damaged gives no base; damage in a part
    /// that was not written does not matter to the base (that part comes from this
    /// version, which is the same there).
    #[test]
    fn copying_out_written_parts_rebuilds_the_base_and_refuses_a_damaged_cache() {
        let pages_n = PARALLEL_COPY_THRESHOLD * 2;
        let old: Vec<u8> = (0..pages_n * PAGE_SIZE)
            .map(|i| (i % 251) as u8 + 1)
            .collect();
        let previous: Vec<u64> = old.chunks(PAGE_SIZE).map(pages::hash_page).collect();
        let mut memory = old.clone();
        let mut written = vec![0u16; pages_n];
        for (page, parts) in written.iter_mut().enumerate() {
            // Parts 1 and (page % 16) written; page 9 has most parts written (copied whole).
            *parts = if page == 9 {
                0xFFF0
            } else {
                1 << 1 | 1 << (page % 16)
            };
            for part in 0..16 {
                if *parts & (1 << part) != 0 {
                    memory[page * PAGE_SIZE + part * PART_SIZE + 7] ^= 0x5A;
                }
            }
        }
        let mut cached = old.clone();
        cached[3 * PAGE_SIZE + PART_SIZE + 100] ^= 1; // in a written part of page 3
        cached[4 * PAGE_SIZE + 12 * PART_SIZE] ^= 1; // in a part page 4 did not write
        let hashes = pages::hash_pages(&memory);
        let changes = pages::diff(&memory, &hashes, &previous);
        assert_eq!(changes.len(), pages_n);
        let buffers = PageBuffers::default();
        let parts = |page: usize| written[page];
        let (mut dirty, zeroed) = copy_out(
            0,
            &memory,
            &previous,
            &changes,
            &parts,
            &mut cached,
            &buffers,
        );
        assert!(zeroed.is_empty());
        for page in &mut dirty {
            let n = page.page as usize;
            assert_eq!(
                page.base.is_some(),
                n == 9,
                "page {n}: only page 9 is copied whole"
            );
            if n != 9 {
                let copied = page.base_parts.as_ref().unwrap().bytes.len();
                assert_eq!(copied, written[n].count_ones() as usize * PART_SIZE);
            }
            page.resolve_base(&buffers);
            let at = n * PAGE_SIZE;
            assert_eq!(page.bytes, memory[at..at + PAGE_SIZE]);
            match n {
                3 => assert!(page.base.is_none(), "a damaged cache gave a base"),
                _ => assert_eq!(
                    page.base.as_deref(),
                    Some(&old[at..at + PAGE_SIZE]),
                    "page {n}"
                ),
            }
        }
        // The cache holds the new versions, but for the damage no write covered.
        let mut expected = memory.clone();
        expected[4 * PAGE_SIZE + 12 * PART_SIZE] ^= 1;
        assert_eq!(cached, expected);
    }
}
