//! Restore: rebuild a checkpoint's state in a fresh instance.
//!
//! Memory only grows in wasm, so restore starts from a fresh instance of the same module,
//! grows each memory to the checkpoint's size, writes every stored page, zeroes the pages
//! the module's data segments filled but the checkpoint records as zero, and sets the
//! globals. The rebuilt memory is then hashed and checked against the manifest's digest,
//! which both verifies the restore and gives the page table for the next checkpoint.

use anyhow::{Context, Result, bail};
use bytes::Bytes;

use super::pages::{self, PAGE_SIZE};
use super::table::PageTable;
use crate::guest::GuestInstance;
use crate::store::manifest::PageRef;
use crate::store::{CheckpointStore, Manifest, pack};

/// Restore `manifest` into `instance` (fresh, not yet initialised) from `store`.
pub fn restore(
    instance: &mut GuestInstance,
    manifest: &Manifest,
    store: &CheckpointStore,
) -> Result<PageTable> {
    if manifest.memories.len() != instance.memory_count() {
        bail!(
            "checkpoint {} has {} memories but the guest has {}",
            manifest.generation,
            manifest.memories.len(),
            instance.memory_count()
        );
    }
    let packs = fetch_packs(manifest, store)?;

    let mut hashes = Vec::with_capacity(manifest.memories.len());
    for (index, memory) in manifest.memories.iter().enumerate() {
        let initial_len = instance.memory(index).len();
        instance.grow_memory_to(index, memory.byte_len)?;
        let data = instance.memory_mut(index);
        let mut page_slices: Vec<Option<&mut [u8]>> =
            data.chunks_mut(PAGE_SIZE).map(Some).collect();
        let mut jobs = Vec::with_capacity(memory.pages.len());
        for page_ref in &memory.pages {
            let slice = page_slices
                .get_mut(page_ref.page as usize)
                .and_then(Option::take)
                .with_context(|| {
                    format!(
                        "checkpoint {} names page {} twice or out of range",
                        manifest.generation, page_ref.page
                    )
                })?;
            jobs.push((slice, page_ref));
        }
        // Pages not in the table are zero; grown pages already are, but data segments
        // may have written into the initial ones. Reading a page the guest never touched
        // costs no allocation, writing one would: only clear what is not already zero.
        for slice in page_slices
            .iter_mut()
            .take(initial_len.div_ceil(PAGE_SIZE))
            .flatten()
        {
            if slice.iter().any(|b| *b != 0) {
                slice.fill(0);
            }
        }
        decode_parallel(jobs, manifest, &packs)?;

        let memory_hashes = pages::hash_pages(instance.memory(index));
        if pages::memory_digest(&memory_hashes) != memory.digest {
            bail!(
                "checkpoint {}: memory {index} does not match its digest after restore (store corrupt?)",
                manifest.generation
            );
        }
        hashes.push(memory_hashes);
    }
    instance.set_globals(&manifest.globals)?;
    Ok(PageTable::from_manifest(manifest, hashes))
}

/// Read and check every pack the manifest refers to.
fn fetch_packs(manifest: &Manifest, store: &CheckpointStore) -> Result<Vec<Bytes>> {
    let fetched = store.read_packs(&manifest.packs);
    manifest
        .packs
        .iter()
        .zip(fetched)
        .map(|(name, bytes)| {
            let bytes = bytes
                .with_context(|| format!("checkpoint {} needs pack {name}", manifest.generation))?;
            pack::check_header(&bytes, &format!("pack {name}"))?;
            Ok(bytes)
        })
        .collect()
}

/// Below this many pages, decoding on the calling thread beats starting threads.
const PARALLEL_DECODE_THRESHOLD: usize = 64;

fn decode_parallel(
    jobs: Vec<(&mut [u8], &PageRef)>,
    manifest: &Manifest,
    packs: &[Bytes],
) -> Result<()> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    if jobs.len() < PARALLEL_DECODE_THRESHOLD || threads == 1 {
        return decode_batch(jobs, manifest, packs);
    }
    let per_thread = jobs.len().div_ceil(threads);
    let mut jobs = jobs;
    std::thread::scope(|scope| {
        let mut workers = Vec::new();
        while !jobs.is_empty() {
            let batch: Vec<_> = jobs.drain(..per_thread.min(jobs.len())).collect();
            workers.push(scope.spawn(move || decode_batch(batch, manifest, packs)));
        }
        workers
            .into_iter()
            .try_for_each(|w| w.join().expect("page decoder panicked"))
    })
}

fn decode_batch(
    batch: Vec<(&mut [u8], &PageRef)>,
    manifest: &Manifest,
    packs: &[Bytes],
) -> Result<()> {
    let mut decompressor = zstd::bulk::Decompressor::new()?;
    for (dst, page_ref) in batch {
        let name = &manifest.packs[page_ref.pack as usize];
        pack::decode_page(
            &packs[page_ref.pack as usize],
            page_ref.frame,
            page_ref.encoding,
            dst,
            &mut decompressor,
            &format!("pack {name}"),
        )?;
    }
    Ok(())
}
