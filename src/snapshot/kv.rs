//! A component's kv runs (`component::kv_runs`) in packs: each run is cut into chunks of
//! `KV_CHUNK_BYTES`, each compressed on its own into a frame of encoding `KvChunk`, after
//! the checkpoint's page frames. A run's frames are consecutive, so the manifest names a
//! run by pack, first frame, frame count and size (docs/FORMAT.md, "Kv runs").

use std::collections::HashMap;

use anyhow::{Context, Result};

use crate::component::kv_runs::KvUpdate;
use crate::error::corrupt;
use crate::store::manifest::PackRef;
use crate::store::pack;
use crate::store::recent::LoadedPack;

use super::table::KvRunLoc;

/// Bytes of a run per frame (the last frame of a run may hold fewer).
pub const KV_CHUNK_BYTES: usize = 64 << 10;

/// zstd's level for kv chunks: keys and values compress well and are written once.
const KV_ZSTD_LEVEL: i32 = 3;

/// A capture's kv update, compressed: keep the first `keep` runs of the chain, then add
/// `runs`.
pub struct EncodedKv {
    pub keep: usize,
    pub runs: Vec<EncodedRun>,
}

pub struct EncodedRun {
    /// The compressed chunks, in order: one frame each.
    pub chunks: Vec<Vec<u8>>,
    /// The run's size before compression.
    pub bytes: u64,
}

/// Compress `update`'s runs, chunk by chunk.
pub fn encode_runs(update: &KvUpdate) -> Result<EncodedKv> {
    let runs = update
        .runs
        .iter()
        .map(|run| {
            let chunks = run
                .chunks(KV_CHUNK_BYTES)
                .map(|chunk| {
                    zstd::bulk::compress(chunk, KV_ZSTD_LEVEL).context("cannot compress a kv run")
                })
                .collect::<Result<Vec<_>>>()?;
            Ok(EncodedRun {
                chunks,
                bytes: run.len() as u64,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(EncodedKv {
        keep: update.keep,
        runs,
    })
}

/// Read run `loc` back out of `packs` (every pack the manifest names, parsed): each
/// frame's CRC and encoding checked, each chunk decompressed with its size bounded, and
/// the whole exactly the size the manifest gives.
pub fn read_run(loc: &KvRunLoc, packs: &HashMap<PackRef, LoadedPack>) -> Result<Vec<u8>> {
    let what = format!("pack {}", loc.pack.name());
    let pack = packs
        .get(&*loc.pack)
        .ok_or_else(|| corrupt!("{what} is missing for a kv run"))?;
    let total = usize::try_from(loc.bytes).map_err(|_| corrupt!("{what}: kv run too large"))?;
    let mut run = Vec::with_capacity(total);
    for frame in loc.first_frame..loc.first_frame.saturating_add(loc.frames) {
        let bytes = pack
            .frame(frame)
            .ok_or_else(|| corrupt!("{what} has no frame {frame}"))?;
        let (encoding, payload) = pack::frame_payload(bytes, &what)?;
        if encoding != crate::delta::Encoding::KvChunk {
            return Err(corrupt!(
                "{what} is corrupt: frame {frame} is a page where a kv run belongs"
            ));
        }
        let expected = (total - run.len()).min(KV_CHUNK_BYTES);
        let chunk = zstd::bulk::decompress(payload, expected).map_err(|e| {
            corrupt!("{what} is corrupt: kv frame {frame} does not decompress ({e})")
        })?;
        if chunk.len() != expected {
            return Err(corrupt!(
                "{what} is corrupt: kv frame {frame} holds {} bytes, expected {expected}",
                chunk.len()
            ));
        }
        run.extend_from_slice(&chunk);
    }
    if run.len() != total {
        return Err(corrupt!(
            "{what} is corrupt: a kv run holds {} bytes, expected {total}",
            run.len()
        ));
    }
    Ok(run)
}
