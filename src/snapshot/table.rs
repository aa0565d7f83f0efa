//! The page table: for every page of every memory, the chain of frames that rebuilds its
//! newest captured version: a whole page first, then a bounded number of deltas. An
//! empty chain is an all-zero page, which is never stored. Beside the pages, a
//! component's kv runs (`snapshot::kv`): the other thing a checkpoint keeps in packs.

use std::collections::HashMap;
use std::sync::Arc;

use crate::store::manifest::{KvRun, MemoryManifest, PackRef, Run};

/// By default, at most this many deltas on top of a whole page: a restore applies at most
/// 8 frames after the first for any page.
pub const DEFAULT_MAX_DELTAS: usize = 8;

/// The most deltas a chain may have (a manifest holds at most 64 layers).
pub const MAX_DELTAS_LIMIT: usize = crate::store::manifest::MAX_LAYERS - 1;

/// One frame of one pack. Packs are shared by every entry that names them.
#[derive(Clone, Debug)]
pub struct FrameLoc {
    pub pack: Arc<PackRef>,
    pub frame: u32,
    /// The frame's bytes in its pack, header included (what compaction would copy); not
    /// in manifests, so 0 until a restore has read the pack.
    pub len: u32,
}

impl PartialEq for FrameLoc {
    fn eq(&self, other: &Self) -> bool {
        self.frame == other.frame && *self.pack == *other.pack
    }
}

/// What a manifest says of a [`PageTable`].
pub struct ManifestParts {
    pub packs: Vec<PackRef>,
    pub memories: Vec<MemoryManifest>,
    pub kv_runs: Vec<KvRun>,
}

/// A page's frames, whole page first; empty for a zero page.
pub type Chain = Vec<FrameLoc>;

#[derive(Clone, Debug, Default, PartialEq)]
pub struct MemoryTable {
    pub byte_len: u64,
    pub chains: Vec<Chain>,
}

/// One kv run of a component: `frames` consecutive frames of one pack, which
/// decompressed and concatenated are the run's `bytes` bytes.
#[derive(Clone, Debug, PartialEq)]
pub struct KvRunLoc {
    pub pack: Arc<PackRef>,
    pub first_frame: u32,
    pub frames: u32,
    pub bytes: u64,
    /// Its frames' bytes in the pack, headers included (what compaction would copy); not
    /// in manifests, so 0 until a restore has read the pack.
    pub stored: u64,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct PageTable {
    pub memories: Vec<MemoryTable>,
    /// A component's kv chain, oldest run first (empty for a core module).
    pub kv_runs: Vec<KvRunLoc>,
}

impl PageTable {
    /// The table before any checkpoint.
    pub fn empty(memory_count: usize) -> Self {
        Self {
            memories: vec![MemoryTable::default(); memory_count],
            kv_runs: Vec::new(),
        }
    }

    /// The table a (decoded, so validated) manifest describes.
    pub fn from_manifest(manifest: &crate::store::Manifest) -> Self {
        let packs: Vec<Arc<PackRef>> = manifest.packs.iter().cloned().map(Arc::new).collect();
        let memories = manifest
            .memories
            .iter()
            .map(|m| {
                let mut chains = vec![Chain::new(); crate::state::page_count(m.byte_len)];
                for layer in &m.layers {
                    for run in layer {
                        for i in 0..run.pages {
                            chains[(run.first_page + i) as usize].push(FrameLoc {
                                pack: packs[run.pack as usize].clone(),
                                frame: run.first_frame + i,
                                len: 0,
                            });
                        }
                    }
                }
                MemoryTable {
                    byte_len: m.byte_len,
                    chains,
                }
            })
            .collect();
        let kv_runs = manifest
            .kv_runs
            .iter()
            .map(|run| KvRunLoc {
                pack: packs[run.pack as usize].clone(),
                first_frame: run.first_frame,
                frames: run.frames,
                bytes: run.bytes,
                stored: 0,
            })
            .collect();
        Self { memories, kv_runs }
    }

    /// The pack list, per-memory layers and kv runs of a manifest for this table;
    /// `digests` are the memories' digests. Runs join consecutive pages stored as
    /// consecutive frames.
    pub fn to_manifest_parts(&self, digests: &[u64]) -> ManifestParts {
        let mut packs: Vec<PackRef> = Vec::new();
        let mut pack_index: HashMap<PackRef, u32> = HashMap::new();
        let memories = self
            .memories
            .iter()
            .zip(digests)
            .map(|(m, &digest)| {
                let depth = m.chains.iter().map(Vec::len).max().unwrap_or(0);
                let layers = (0..depth)
                    .map(|layer| {
                        let mut runs: Vec<Run> = Vec::new();
                        for (page, chain) in m.chains.iter().enumerate() {
                            let Some(loc) = chain.get(layer) else {
                                continue;
                            };
                            let pack =
                                *pack_index.entry((*loc.pack).clone()).or_insert_with(|| {
                                    packs.push((*loc.pack).clone());
                                    packs.len() as u32 - 1
                                });
                            let page = page as u32;
                            match runs.last_mut() {
                                Some(run)
                                    if run.pack == pack
                                        && run.first_page + run.pages == page
                                        && run.first_frame + run.pages == loc.frame =>
                                {
                                    run.pages += 1
                                }
                                _ => runs.push(Run {
                                    first_page: page,
                                    pages: 1,
                                    pack,
                                    first_frame: loc.frame,
                                }),
                            }
                        }
                        runs
                    })
                    .collect();
                MemoryManifest {
                    byte_len: m.byte_len,
                    digest,
                    layers,
                }
            })
            .collect();
        let kv_runs = self
            .kv_runs
            .iter()
            .map(|run| KvRun {
                pack: *pack_index.entry((*run.pack).clone()).or_insert_with(|| {
                    packs.push((*run.pack).clone());
                    packs.len() as u32 - 1
                }),
                first_frame: run.first_frame,
                frames: run.frames,
                bytes: run.bytes,
            })
            .collect();
        ManifestParts {
            packs,
            memories,
            kv_runs,
        }
    }

    /// How many frames of each pack the table refers to (pages' and kv runs'), and their
    /// bytes.
    pub fn live_frames(&self) -> HashMap<PackRef, (u32, u64)> {
        let mut live = HashMap::new();
        for loc in self.memories.iter().flat_map(|m| m.chains.iter().flatten()) {
            let (frames, bytes) = live.entry((*loc.pack).clone()).or_insert((0, 0));
            *frames += 1;
            *bytes += u64::from(loc.len);
        }
        for run in &self.kv_runs {
            let (frames, bytes) = live.entry((*run.pack).clone()).or_insert((0, 0));
            *frames += run.frames;
            *bytes += run.stored;
        }
        live
    }

    /// Fill in every frame's length with `len_of(pack, frame)`.
    pub fn set_frame_lens(&mut self, len_of: impl Fn(&PackRef, u32) -> Option<u32>) {
        for loc in self
            .memories
            .iter_mut()
            .flat_map(|m| m.chains.iter_mut().flatten())
        {
            loc.len = len_of(&loc.pack, loc.frame).unwrap_or(0);
        }
        for run in &mut self.kv_runs {
            run.stored = (run.first_frame..run.first_frame.saturating_add(run.frames))
                .map(|frame| u64::from(len_of(&run.pack, frame).unwrap_or(0)))
                .sum();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Manifest;

    fn pack(generation: u64, frames: u32) -> Arc<PackRef> {
        Arc::new(PackRef {
            generation,
            writer_id: [1; 16],
            frames,
            bytes: 100,
        })
    }

    #[test]
    fn runs_join_consecutive_frames_and_round_trip_through_a_manifest() {
        let (a, b) = (pack(1, 4), pack(2, 3));
        let at = |p: &Arc<PackRef>, frame| FrameLoc {
            pack: p.clone(),
            frame,
            len: 10,
        };
        let table = PageTable {
            memories: vec![MemoryTable {
                byte_len: 6 << 16,
                chains: vec![
                    vec![at(&a, 0)],
                    vec![at(&a, 1), at(&b, 0)],
                    vec![at(&a, 2), at(&b, 1), at(&b, 2)],
                    vec![],
                    vec![at(&a, 3)],
                    vec![],
                ],
            }],
            kv_runs: vec![KvRunLoc {
                pack: pack(3, 2),
                first_frame: 0,
                frames: 2,
                bytes: 70_000,
                stored: 0,
            }],
        };
        let ManifestParts {
            packs,
            memories,
            kv_runs,
        } = table.to_manifest_parts(&[7]);
        assert_eq!(kv_runs.len(), 1);
        assert_eq!(
            kv_runs[0].pack, 2,
            "the kv run's pack is listed after the pages'"
        );
        assert_eq!(packs.len(), 3);
        let layers = &memories[0].layers;
        assert_eq!(layers.len(), 3);
        assert_eq!(layers[0].len(), 2, "pages 0-2 are one run, page 4 another");
        assert_eq!(layers[1].len(), 1);
        assert_eq!(layers[2].len(), 1);

        let manifest = Manifest {
            generation: 2,
            writer_id: [1; 16],
            module_sha256: [0; 32],
            input_offset: 0,
            output_marker: 0,
            input_position: vec![],
            output_position: vec![],
            random_seed: 0,
            random_position: 0,
            created_unix_ms: 0,
            run_state: crate::store::manifest::RunState::Records,
            packs,
            globals: vec![],
            memories,
            host_state: vec![],
            kv_runs,
        };
        let decoded = Manifest::decode(&manifest.encode().unwrap(), "m").unwrap();
        assert_eq!(PageTable::from_manifest(&decoded), table);
        assert_eq!(table.live_frames()[&*a], (4, 40));
        assert_eq!(table.live_frames()[&*b], (3, 30));
    }
}
