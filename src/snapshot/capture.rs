//! Capture: what changed in a paused guest since the last capture. The only work done
//! while the guest is paused.
//!
//! Called only between two guest calls, when no guest frame is live, so the memories and
//! mutable globals are the guest's whole state. It asks the dirty tracker which pages may
//! have changed and hashes those (every page, when the tracker cannot tell), copies each
//! page whose hash changed out of the way, and arms the tracker again. Nothing else: the
//! previous versions (delta bases) come out of the page cache later, on the committer,
//! which also moves the cache on ([`PageCache::advance`](super::PageCache::advance)).
//! The cache is a file, and a write to it can fault through the file system; kept off
//! the pause, that costs the guest nothing.

use anyhow::Result;

use super::buffers::PageBuffers;
use super::dirty::{ALL_PARTS, Dirty, DirtyPage, DirtyTracker, MissedWrites};
use super::pages::{self, PageChange};
use super::parallel;
use crate::guest::GuestInstance;
use crate::state::GlobalValue;

/// A dirty page, copied out of the guest.
pub struct CapturedPage {
    pub memory: usize,
    pub page: u32,
    pub bytes: Vec<u8>,
    /// The hash of the version last captured, if that version was not all zero: the
    /// version a delta base must have.
    pub previous_hash: Option<u64>,
    /// Bit `i`: 4 KiB part `i` may have been written since the last capture (all bits when
    /// the tracker could not say). The other parts are the same as in the last version.
    pub written_parts: u16,
    /// The version last captured, once the committer found it in the page cache (and the
    /// cache vouched for it by `previous_hash`): the delta base.
    pub base: Option<Vec<u8>>,
}

pub struct CapturedMemory {
    pub byte_len: u64,
    pub digest: u64,
}

/// Everything a checkpoint needs from the paused guest.
pub struct Capture {
    pub globals: Vec<GlobalValue>,
    /// What the host keeps for a component (empty for a core module): whole, not a delta.
    pub host_state: Vec<u8>,
    /// A component's kv runs to write (`None`: its kv state did not change).
    pub kv: Option<crate::component::kv_runs::KvUpdate>,
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
/// the first) and is advanced to this one; `tracker` was armed at the last capture (or
/// restore) and is armed again. The copies go into `buffers` the committer gave back,
/// where it has.
pub fn capture(
    instance: &mut GuestInstance,
    hashes: &mut [Vec<u64>],
    tracker: &mut dyn DirtyTracker,
    buffers: &PageBuffers,
) -> Result<Capture> {
    let globals = instance.globals()?;
    let (host_state, kv) = instance.host_state()?;
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
        let complete = |listed: &Vec<DirtyPage>| {
            let numbers: Vec<usize> = listed.iter().map(|p| p.page).collect();
            pages::listing_is_complete(memory, previous, &numbers)
        };
        let (new_hashes, pages_dirty, pages_zeroed) = match reported.filter(complete) {
            Some(listed) => {
                kernel_tracked_memories += 1;
                hashed_pages += listed.len();
                copy_listed(index, memory, previous, &listed, buffers)
            }
            None => {
                hashed_pages += pages::page_count(memory.len() as u64);
                let new_hashes = pages::hash_pages(memory);
                let changes = pages::diff(memory, &new_hashes, previous);
                let (dirty, zeroed) = copy_out(index, memory, previous, &changes, buffers);
                (new_hashes, dirty, zeroed)
            }
        };
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
        host_state,
        kv,
        memories,
        dirty,
        zeroed,
        hashed_pages,
        kernel_tracked_memories,
    })
}

/// Below this many changed pages, copying on the guest's thread beats starting threads.
const PARALLEL_COPY_THRESHOLD: usize = 32;

/// Copy each page of memory `index` that hashing found changed out of the guest, with
/// its previous version's hash (from `previous`): what the committer needs to find that
/// version in the page cache. Pages changed to zero are only listed. On several threads
/// when many pages changed.
fn copy_out(
    index: usize,
    memory: &[u8],
    previous: &[u64],
    changes: &[(usize, PageChange)],
    buffers: &PageBuffers,
) -> (Vec<CapturedPage>, Vec<(usize, u32)>) {
    let one_page = |(page, change): (usize, PageChange)| match change {
        PageChange::Dirty => Copied::Page(CapturedPage {
            memory: index,
            page: page as u32,
            bytes: buffers.copy_of(pages::page(memory, page)),
            previous_hash: previous_base_hash(previous, page),
            written_parts: ALL_PARTS,
            base: None,
        }),
        PageChange::Zeroed => Copied::Zeroed((index, page as u32)),
    };
    let copied = parallel::map_in_order(changes.to_vec(), PARALLEL_COPY_THRESHOLD, one_page);
    let (mut dirty, mut zeroed) = (Vec::new(), Vec::new());
    for copy in copied {
        match copy {
            Copied::Page(page) => dirty.push(page),
            Copied::Zeroed(page) => zeroed.push(page),
        }
    }
    (dirty, zeroed)
}

/// The pages the kernel reported written in memory `index`: each copied out of the guest
/// and hashed from its copy, in one pass on several threads (the page is read from memory
/// once and hashed while the copy is still in the core's cache: the two were most of the
/// pause as separate passes), then compared with its previous hash. A page written back
/// to what it was is dropped, a page now zero listed. Returns the memory's page hashes
/// (`previous` with the reported pages' new hashes), the dirty pages and the zeroed ones.
fn copy_listed(
    index: usize,
    memory: &[u8],
    previous: &[u64],
    listed: &[DirtyPage],
    buffers: &PageBuffers,
) -> (Vec<u64>, Vec<CapturedPage>, Vec<(usize, u32)>) {
    let copied = parallel::map_in_order(listed.to_vec(), PARALLEL_COPY_THRESHOLD, |written| {
        let bytes = buffers.copy_of(pages::page(memory, written.page));
        let hash = pages::hash_page(&bytes);
        (written, bytes, hash)
    });
    let mut hashes = previous.to_vec();
    hashes.resize(pages::page_count(memory.len() as u64), 0);
    let (mut dirty, mut zeroed, mut unused) = (Vec::new(), Vec::new(), Vec::new());
    for (written, bytes, hash) in copied {
        hashes[written.page] = hash;
        if previous.get(written.page) == Some(&hash) {
            unused.push(bytes);
        } else if pages::is_zero_page(&bytes, hash) {
            zeroed.push((index, written.page as u32));
            unused.push(bytes);
        } else {
            dirty.push(CapturedPage {
                memory: index,
                page: written.page as u32,
                bytes,
                previous_hash: previous_base_hash(previous, written.page),
                written_parts: written.parts,
                base: None,
            });
        }
    }
    buffers.give_back(unused);
    (hashes, dirty, zeroed)
}

/// The hash a delta base for `page` must have: its previous version's, unless that was
/// new or all zero (nothing to stand on).
fn previous_base_hash(previous: &[u64], page: usize) -> Option<u64> {
    previous
        .get(page)
        .filter(|hash| **hash != *pages::ZERO_PAGE_HASH)
        .copied()
}

/// What `copy_out` made of one changed page.
enum Copied {
    Page(CapturedPage),
    Zeroed((usize, u32)),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::PageCache;
    use crate::snapshot::dirty::PART_SIZE;
    use crate::snapshot::pages::PAGE_SIZE;

    /// A page cache holding `memory`'s pages, as after a restore.
    fn cache_holding(dir: &std::path::Path, memory: &[u8]) -> PageCache {
        let mut cache = PageCache::open(dir, 1).unwrap();
        cache
            .sync_with(0, memory, &pages::hash_pages(memory))
            .unwrap();
        cache
    }

    /// What a capture of `memory` makes after a capture whose page hashes were
    /// `previous`: by hashing every page, or from the kernel's `reported` pages. And this
    /// capture's hashes, which must be those of every page either way.
    fn capture_of(
        memory: &[u8],
        previous: &[u64],
        reported: Option<&[DirtyPage]>,
        buffers: &PageBuffers,
    ) -> (Capture, Vec<u64>) {
        let (hashes, dirty, zeroed) = match reported {
            Some(listed) => copy_listed(0, memory, previous, listed, buffers),
            None => {
                let hashes = pages::hash_pages(memory);
                let changes = pages::diff(memory, &hashes, previous);
                let (dirty, zeroed) = copy_out(0, memory, previous, &changes, buffers);
                (hashes, dirty, zeroed)
            }
        };
        assert_eq!(hashes, pages::hash_pages(memory));
        let capture = Capture {
            globals: Vec::new(),
            host_state: Vec::new(),
            kv: None,
            memories: vec![CapturedMemory {
                byte_len: memory.len() as u64,
                digest: pages::memory_digest(&hashes),
            }],
            dirty,
            zeroed,
            hashed_pages: 0,
            kernel_tracked_memories: 0,
        };
        (capture, hashes)
    }

    fn assert_cache_holds(cache: &PageCache, memory: &[u8], except: &[usize]) {
        for (page, hash) in pages::hash_pages(memory).into_iter().enumerate() {
            assert_eq!(
                cache.verified_page(0, page, hash).is_some(),
                !except.contains(&page),
                "page {page} of the cache"
            );
        }
    }

    /// Many changed pages (the threaded copy), found by hashing or reported by the kernel:
    /// each dirty page is copied in order with its previous version's hash; the committer's
    /// pass over the cache gives each the base the cache vouches for, and leaves the cache
    /// holding the new versions (a damaged page healed, a page that became zero zeroed,
    /// grown pages zero).
    #[test]
    fn many_pages_are_copied_in_order_and_get_the_bases_the_cache_vouches_for() {
        let pages_n = PARALLEL_COPY_THRESHOLD * 3;
        // The kernel reports every page, and one page (3) written back to what it was.
        let reported: Vec<DirtyPage> = (0..pages_n + 2)
            .map(|page| DirtyPage {
                page,
                parts: ALL_PARTS,
            })
            .collect();
        for reported in [None, Some(&reported[..])] {
            pages_copied_in_order_with_their_bases(pages_n, reported);
        }
    }

    fn pages_copied_in_order_with_their_bases(pages_n: usize, reported: Option<&[DirtyPage]>) {
        let dir = tempfile::tempdir().unwrap();
        let old: Vec<u8> = (0..pages_n * PAGE_SIZE)
            .map(|i| (i / PAGE_SIZE) as u8 + 1)
            .collect();
        let previous = pages::hash_pages(&old);
        let mut cache = cache_holding(dir.path(), &old);
        let mut damaged = old[5 * PAGE_SIZE..6 * PAGE_SIZE].to_vec();
        damaged[9] ^= 1;
        cache.store_page(0, 5, &damaged).unwrap(); // no base for page 5
        let mut memory: Vec<u8> = old.iter().map(|b| b.wrapping_mul(3)).collect();
        memory[3 * PAGE_SIZE..4 * PAGE_SIZE].copy_from_slice(&old[3 * PAGE_SIZE..4 * PAGE_SIZE]);
        memory[7 * PAGE_SIZE..8 * PAGE_SIZE].fill(0); // page 7 becomes zero
        memory.extend(vec![0u8; 2 * PAGE_SIZE]); // grown by two zero pages
        memory[(pages_n + 1) * PAGE_SIZE] = 4; // the second of them written
        let buffers = PageBuffers::default();
        let (mut capture, _) = capture_of(&memory, &previous, reported, &buffers);

        assert_eq!(capture.zeroed, vec![(0, 7), (0, pages_n as u32)]);
        let order: Vec<u32> = capture.dirty.iter().map(|p| p.page).collect();
        let mut expected: Vec<u32> = (0..pages_n as u32)
            .filter(|p| ![3, 7].contains(p))
            .collect();
        expected.push(pages_n as u32 + 1);
        assert_eq!(order, expected);
        for page in &capture.dirty {
            let at = page.page as usize * PAGE_SIZE;
            assert_eq!(page.bytes, memory[at..at + PAGE_SIZE]);
            assert_eq!(
                page.previous_hash,
                previous.get(page.page as usize).copied()
            );
            assert!(page.base.is_none(), "bases come from the committer");
        }

        cache.advance(&mut capture, &buffers).unwrap();
        for page in &capture.dirty {
            let at = page.page as usize * PAGE_SIZE;
            match page.page as usize {
                5 => assert!(page.base.is_none(), "a damaged cache page became a base"),
                n if n >= pages_n => assert!(page.base.is_none(), "a new page has no base"),
                _ => assert_eq!(page.base.as_deref(), Some(&old[at..at + PAGE_SIZE])),
            }
        }
        assert_cache_holds(&cache, &memory, &[]);
    }

    /// Pages whose written parts the kernel named: the cache takes only those parts where
    /// its page vouched for the previous version, and the whole page where it did not
    /// (which heals it). A part the tracker failed to name leaves that cache page wrong;
    /// the next capture of the page then finds no base and writes it whole, healing it.
    #[test]
    fn written_parts_move_the_cache_on_and_a_wrong_cache_costs_only_the_base() {
        let dir = tempfile::tempdir().unwrap();
        let pages_n = PARALLEL_COPY_THRESHOLD * 2;
        let old: Vec<u8> = (0..pages_n * PAGE_SIZE)
            .map(|i| (i % 251) as u8 + 1)
            .collect();
        let previous = pages::hash_pages(&old);
        let mut cache = cache_holding(dir.path(), &old);
        let damage = |cache: &mut PageCache, page: usize, at: usize| {
            let mut bytes = old[page * PAGE_SIZE..(page + 1) * PAGE_SIZE].to_vec();
            bytes[at] ^= 1;
            cache.store_page(0, page, &bytes).unwrap();
        };
        damage(&mut cache, 3, PART_SIZE + 100); // in a part page 3 writes
        damage(&mut cache, 4, 12 * PART_SIZE); // in a part page 4 does not write
        let mut memory = old.clone();
        let written: Vec<u16> = (0..pages_n).map(|p| 1 << 1 | 1 << (p % 16)).collect();
        for (page, parts) in written.iter().enumerate() {
            for part in (0..16).filter(|part| parts & (1 << part) != 0) {
                memory[page * PAGE_SIZE + part * PART_SIZE + 7] ^= 0x5A;
            }
        }
        memory[6 * PAGE_SIZE + 15 * PART_SIZE] ^= 1; // page 6 writes a part it does not name
        let reported: Vec<DirtyPage> = (0..pages_n)
            .map(|page| DirtyPage {
                page,
                parts: written[page],
            })
            .collect();
        let buffers = PageBuffers::default();
        let (mut capture, hashes) = capture_of(&memory, &previous, Some(&reported), &buffers);
        assert_eq!(capture.dirty.len(), pages_n);
        cache.advance(&mut capture, &buffers).unwrap();
        for page in &capture.dirty {
            let (n, at) = (page.page as usize, page.page as usize * PAGE_SIZE);
            assert_eq!(page.written_parts, written[n]);
            match n {
                3 | 4 => assert!(page.base.is_none(), "page {n}: a damaged cache gave a base"),
                _ => assert_eq!(page.base.as_deref(), Some(&old[at..at + PAGE_SIZE])),
            }
        }
        assert_cache_holds(&cache, &memory, &[6]);

        // The next capture: page 6 finds no base, and the cache is right again.
        let mut next = memory.clone();
        next[6 * PAGE_SIZE + 7] ^= 0x33;
        let reported = [DirtyPage { page: 6, parts: 1 }];
        let (mut capture, _) = capture_of(&next, &hashes, Some(&reported), &buffers);
        assert_eq!(capture.dirty.len(), 1);
        cache.advance(&mut capture, &buffers).unwrap();
        assert!(capture.dirty[0].base.is_none());
        assert_cache_holds(&cache, &next, &[]);
    }
}
