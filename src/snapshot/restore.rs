//! Restore: rebuild a checkpoint's state in a fresh instance.
//!
//! Memory only grows in wasm, so restore starts from a fresh instance of the same module,
//! grows each memory to the checkpoint's size, writes every stored page, zeroes the pages
//! the module's data segments filled but the checkpoint records as zero, and sets the
//! globals. The rebuilt memory is then hashed and checked against the manifest's digest,
//! which both verifies the restore and gives the page table for the next checkpoint.

use std::collections::HashMap;

use anyhow::Result;

use super::pages::{self, PAGE_SIZE};
use super::table::{Chain, PageTable};
use crate::error::corrupt;
use crate::guest::GuestInstance;
use crate::store::manifest::PackRef;
use crate::store::pack;
use crate::store::recent::LoadedPack;
use crate::store::{CheckpointStore, Manifest};

/// A restored checkpoint: the table for the next checkpoint, the page hashes of the
/// restored memories, and a component's kv runs (for its host state, restored after).
pub struct Restored {
    pub table: PageTable,
    pub hashes: Vec<Vec<u64>>,
    pub kv_runs: Vec<Vec<u8>>,
}

/// Restore `manifest` into `instance` (fresh, not yet initialised) from `store`.
pub fn restore(
    instance: &mut GuestInstance,
    manifest: &Manifest,
    store: &CheckpointStore,
) -> Result<Restored> {
    if manifest.memories.len() != instance.memory_count() {
        return Err(corrupt!(
            "checkpoint {} has {} memories but the guest has {}",
            manifest.generation,
            manifest.memories.len(),
            instance.memory_count()
        ));
    }
    // Sizes first: nothing is allocated for a memory the guest could never have.
    for (index, memory) in manifest.memories.iter().enumerate() {
        let (declared, cap) = instance.memory_limit(index);
        if memory.byte_len > declared {
            return Err(corrupt!(
                "checkpoint {}: memory {index} claims {} bytes, more than the module allows ({declared})",
                manifest.generation,
                memory.byte_len
            ));
        }
        if let Some(cap) = cap
            && memory.byte_len > cap
        {
            return Err(crate::error::error(
                crate::ErrorKind::Guest,
                format!(
                    "checkpoint {}: memory {index} holds {} bytes, more than the guest's memory limit of {cap} bytes (--max-memory-mib)",
                    manifest.generation, memory.byte_len
                ),
            ));
        }
    }
    let packs = fetch_packs(manifest, store)?;
    crate::crash::point("restore-fetched");
    let mut table = PageTable::from_manifest(manifest);
    // Compaction judges packs by the bytes still in use, which only the packs tell.
    table.set_frame_lens(|pack, frame| u32::try_from(packs.get(pack)?.frame(frame)?.len()).ok());

    let mut hashes = Vec::with_capacity(manifest.memories.len());
    for (index, (memory, chains)) in manifest.memories.iter().zip(&table.memories).enumerate() {
        let initial_len = instance.memory(index).len();
        instance.grow_memory_to(index, memory.byte_len)?;
        let data = instance.memory_mut(index);
        let mut jobs = Vec::new();
        for (page, (slice, chain)) in data.chunks_mut(PAGE_SIZE).zip(&chains.chains).enumerate() {
            if !chain.is_empty() {
                jobs.push((slice, chain));
            } else if page * PAGE_SIZE < initial_len && slice.iter().any(|b| *b != 0) {
                // Pages not in the table are zero; grown pages already are, but data
                // segments may have written into the initial ones. Reading a page the guest
                // never touched costs no allocation, writing one would: clear only what
                // is not already zero.
                slice.fill(0);
            }
        }
        decode_parallel(jobs, &packs)?;

        let memory_hashes = pages::hash_pages(instance.memory(index));
        if pages::memory_digest(&memory_hashes) != memory.digest {
            return Err(corrupt!(
                "checkpoint {}: memory {index} does not match its digest after restore (store corrupt?)",
                manifest.generation
            ));
        }
        hashes.push(memory_hashes);
    }
    crate::crash::point("restore-pages-written");
    instance.set_globals(&manifest.globals)?;
    let kv_runs = table
        .kv_runs
        .iter()
        .map(|run| super::kv::read_run(run, &packs))
        .collect::<Result<Vec<_>>>()?;
    Ok(Restored {
        table,
        hashes,
        kv_runs,
    })
}

/// Read and check every pack the manifest refers to: each must be the pack the manifest
/// names (generation, writer, frame count, size), not just any pack.
fn fetch_packs(manifest: &Manifest, store: &CheckpointStore) -> Result<Packs> {
    let wanted: Vec<&PackRef> = manifest.packs.iter().collect();
    let fetched = store.read_all_packs(&wanted)?;
    manifest
        .packs
        .iter()
        .zip(fetched)
        .map(|(pack_ref, bytes)| Ok((pack_ref.clone(), LoadedPack::parse(pack_ref, bytes)?)))
        .collect()
}

type Packs = HashMap<PackRef, LoadedPack>;

/// Below this many pages, decoding on the calling thread beats starting threads.
const PARALLEL_DECODE_THRESHOLD: usize = 64;

fn decode_parallel(jobs: Vec<(&mut [u8], &Chain)>, packs: &Packs) -> Result<()> {
    if jobs.len() < PARALLEL_DECODE_THRESHOLD {
        return decode_batch(jobs, packs);
    }
    let helpers = super::parallel::Helpers::take();
    if helpers.threads() == 1 {
        return decode_batch(jobs, packs);
    }
    let per_thread = jobs.len().div_ceil(helpers.threads());
    let mut jobs = jobs;
    std::thread::scope(|scope| {
        let mut workers = Vec::new();
        while !jobs.is_empty() {
            let batch: Vec<_> = jobs.drain(..per_thread.min(jobs.len())).collect();
            workers.push(scope.spawn(move || decode_batch(batch, packs)));
        }
        workers
            .into_iter()
            .try_for_each(|w| w.join().expect("page decoder panicked"))
    })
}

/// Rebuild each page from its chain: the whole page, then every delta on top.
fn decode_batch(batch: Vec<(&mut [u8], &Chain)>, packs: &Packs) -> Result<()> {
    let mut decompressor = crate::delta::decompressor()?;
    let mut scratch = vec![0u8; PAGE_SIZE];
    for (dst, chain) in batch {
        for (layer, loc) in chain.iter().enumerate() {
            let what = format!("pack {}", loc.pack.name());
            let frame = packs[&*loc.pack]
                .frame(loc.frame)
                .ok_or_else(|| crate::error::corrupt!("{what} has no frame {}", loc.frame))?;
            pack::decode_frame(frame, layer, dst, &mut scratch, &mut decompressor, &what)?;
        }
    }
    Ok(())
}
