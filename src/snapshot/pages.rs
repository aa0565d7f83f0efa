//! Change detection: hash every 64 KiB chunk of a memory with XXH3-64 and compare with
//! the page table of the last committed checkpoint.
//!
//! The chunk size is a host-side constant, independent of the wasm page size, so 64-bit
//! memories and custom page sizes are handled the same way. All-zero pages are recorded as
//! zero and never written: most of a fresh guest's memory is zero.

use std::sync::LazyLock;

use twox_hash::XxHash3_64;

pub use crate::state::{PAGE_SIZE, page_count};

/// Memories larger than this are hashed on several threads.
const PARALLEL_HASH_THRESHOLD: usize = 32 << 20;

/// XXH3-64 of a page of zeros: a page with this hash is checked byte by byte for zero.
pub static ZERO_PAGE_HASH: LazyLock<u64> = LazyLock::new(|| hash_page(&[0u8; PAGE_SIZE]));

pub fn hash_page(page: &[u8]) -> u64 {
    XxHash3_64::oneshot(page)
}

/// The bytes of page `index` of `memory`.
pub fn page(memory: &[u8], index: usize) -> &[u8] {
    let start = index * PAGE_SIZE;
    &memory[start..(start + PAGE_SIZE).min(memory.len())]
}

pub fn is_zero_page(page: &[u8], hash: u64) -> bool {
    // The hash rules out almost every non-zero page for free; confirm the rest.
    hash == *ZERO_PAGE_HASH && page.iter().all(|b| *b == 0)
}

/// XXH3-64 of every page of `memory`, in order.
pub fn hash_pages(memory: &[u8]) -> Vec<u64> {
    let mut hashes = vec![0u64; page_count(memory.len() as u64)];
    let helpers = if memory.len() < PARALLEL_HASH_THRESHOLD {
        None
    } else {
        Some(super::parallel::Helpers::take())
    };
    let threads = helpers.as_ref().map_or(1, |h| h.threads());
    if threads == 1 {
        for (hash, chunk) in hashes.iter_mut().zip(memory.chunks(PAGE_SIZE)) {
            *hash = hash_page(chunk);
        }
        return hashes;
    }
    let pages_per_thread = hashes.len().div_ceil(threads);
    std::thread::scope(|scope| {
        for (hash_slice, mem_slice) in hashes
            .chunks_mut(pages_per_thread)
            .zip(memory.chunks(pages_per_thread * PAGE_SIZE))
        {
            scope.spawn(move || {
                for (hash, chunk) in hash_slice.iter_mut().zip(mem_slice.chunks(PAGE_SIZE)) {
                    *hash = hash_page(chunk);
                }
            });
        }
    });
    hashes
}

/// Whether the `listed` pages (ascending) can be all that differ between `memory` and
/// the memory `previous` describes: every page `previous` lacks (grown since) is listed,
/// and none lies past the end. If not, the memory must be hashed whole.
pub fn listing_is_complete(memory: &[u8], previous: &[u64], listed: &[usize]) -> bool {
    let count = page_count(memory.len() as u64);
    let new_pages = count.saturating_sub(previous.len());
    let listed_new = listed.len() - listed.partition_point(|p| *p < previous.len());
    previous.len() <= count && listed_new == new_pages && listed.last() < Some(&count)
}

/// Digest of a whole memory, from its page hashes: written into the manifest so a restore
/// can check that the memory it rebuilt is the memory that was captured.
pub fn memory_digest(hashes: &[u64]) -> u64 {
    let mut bytes = Vec::with_capacity(hashes.len() * 8);
    for h in hashes {
        bytes.extend_from_slice(&h.to_le_bytes());
    }
    XxHash3_64::oneshot(&bytes)
}

/// What happened to one page since the last committed checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageChange {
    /// New or changed, and not all zero: its bytes must be written.
    Dirty,
    /// New or changed, and now all zero: recorded as zero, nothing written.
    Zeroed,
}

/// Pages of `memory` (with `hashes`) that differ from `committed` (the page hashes of the
/// last committed checkpoint; shorter when the memory has grown since).
pub fn diff(memory: &[u8], hashes: &[u64], committed: &[u64]) -> Vec<(usize, PageChange)> {
    let mut changes = Vec::new();
    for (index, hash) in hashes.iter().enumerate() {
        if committed.get(index) == Some(hash) {
            continue;
        }
        // The hashes differ, so a page that is zero now was not zero before (or is new).
        let change = if is_zero_page(page(memory, index), *hash) {
            PageChange::Zeroed
        } else {
            PageChange::Dirty
        };
        changes.push((index, change));
    }
    changes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memory(pages: usize) -> Vec<u8> {
        vec![0u8; pages * PAGE_SIZE]
    }

    #[test]
    fn a_fresh_memory_reports_non_zero_pages_dirty_and_zero_pages_zeroed() {
        let mut mem = memory(4);
        mem[PAGE_SIZE + 10] = 1;
        let hashes = hash_pages(&mem);
        let changes = diff(&mem, &hashes, &[]);
        assert_eq!(
            changes,
            vec![
                (0, PageChange::Zeroed),
                (1, PageChange::Dirty),
                (2, PageChange::Zeroed),
                (3, PageChange::Zeroed)
            ]
        );
    }

    #[test]
    fn only_changed_pages_are_reported() {
        let mut mem = memory(8);
        for i in 0..8 {
            mem[i * PAGE_SIZE] = i as u8 + 1;
        }
        let committed = hash_pages(&mem);
        mem[3 * PAGE_SIZE + 100] ^= 0xff; // a change in the middle of page 3
        mem[7 * PAGE_SIZE..].fill(0); // page 7 becomes zero
        let hashes = hash_pages(&mem);
        assert_eq!(
            diff(&mem, &hashes, &committed),
            vec![(3, PageChange::Dirty), (7, PageChange::Zeroed)]
        );
        assert!(diff(&mem, &hashes, &hashes).is_empty());
    }

    #[test]
    fn grown_pages_are_new_and_zero_pages_stay_quiet() {
        let mut mem = memory(2);
        mem[0] = 1;
        let committed = hash_pages(&mem);
        mem.extend(memory(3)); // memory.grow by 3 pages
        mem[3 * PAGE_SIZE] = 9;
        let hashes = hash_pages(&mem);
        assert_eq!(
            diff(&mem, &hashes, &committed),
            vec![
                (2, PageChange::Zeroed),
                (3, PageChange::Dirty),
                (4, PageChange::Zeroed)
            ]
        );
    }

    #[test]
    fn parallel_hashing_matches_sequential() {
        let mut mem = vec![0u8; PARALLEL_HASH_THRESHOLD + 5 * PAGE_SIZE];
        for (i, b) in mem.iter_mut().enumerate().step_by(4093) {
            *b = (i % 251) as u8;
        }
        let sequential: Vec<u64> = mem.chunks(PAGE_SIZE).map(hash_page).collect();
        assert_eq!(hash_pages(&mem), sequential);
    }

    #[test]
    fn a_listing_must_name_every_grown_page_and_none_past_the_end() {
        let mut mem = memory(6);
        let previous = hash_pages(&mem);
        assert!(listing_is_complete(&mem, &previous, &[2, 4]));
        assert!(listing_is_complete(&mem, &previous, &[]));
        mem.extend(memory(2)); // grown by pages 6 and 7
        assert!(listing_is_complete(&mem, &previous, &[2, 4, 6, 7]));
        assert!(listing_is_complete(&mem, &previous, &[6, 7]));
        assert!(!listing_is_complete(&mem, &previous, &[2, 4, 7]));
        assert!(!listing_is_complete(&mem, &previous, &[2, 4, 6, 7, 8]));
        // `previous` describing a larger memory than this one: hash it whole.
        assert!(!listing_is_complete(&memory(4), &previous, &[1]));
    }

    #[test]
    fn a_short_last_page_is_hashed_on_its_own_bytes() {
        let mem = vec![1u8; PAGE_SIZE + 100];
        let hashes = hash_pages(&mem);
        assert_eq!(hashes.len(), 2);
        assert_eq!(hashes[1], hash_page(&[1u8; 100]));
    }
}
