//! The page table of the last committed checkpoint: for every page of every memory, its
//! hash (to detect change) and where its committed bytes are stored (to write the next
//! manifest without rereading anything).

use std::collections::HashMap;
use std::sync::Arc;

use crate::store::manifest::{MemoryManifest, PageRef};
use crate::store::pack::{Encoding, FrameRef};

use super::pages::memory_digest;

/// Where a page's committed bytes live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredPage {
    pub pack: Arc<str>,
    pub encoding: Encoding,
    pub frame: FrameRef,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemoryTable {
    pub byte_len: u64,
    pub hashes: Vec<u64>,
    /// `None` for an all-zero page, which is never stored.
    pub stored: Vec<Option<StoredPage>>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PageTable {
    pub memories: Vec<MemoryTable>,
}

impl PageTable {
    /// The table before any checkpoint: every memory empty, so every page counts as new.
    pub fn empty(memory_count: usize) -> Self {
        Self {
            memories: vec![MemoryTable::default(); memory_count],
        }
    }

    /// The table a manifest describes, given the hashes of the memories it restored to.
    pub fn from_manifest(manifest: &crate::store::Manifest, hashes: Vec<Vec<u64>>) -> Self {
        let packs: Vec<Arc<str>> = manifest
            .packs
            .iter()
            .map(|p| Arc::from(p.as_str()))
            .collect();
        let memories = manifest
            .memories
            .iter()
            .zip(hashes)
            .map(|(m, hashes)| {
                let mut stored = vec![None; hashes.len()];
                for p in &m.pages {
                    stored[p.page as usize] = Some(StoredPage {
                        pack: packs[p.pack as usize].clone(),
                        encoding: p.encoding,
                        frame: p.frame,
                    });
                }
                MemoryTable {
                    byte_len: m.byte_len,
                    hashes,
                    stored,
                }
            })
            .collect();
        Self { memories }
    }

    /// The pack list and per-memory page lists of a manifest for this table.
    pub fn to_manifest_parts(&self) -> (Vec<String>, Vec<MemoryManifest>) {
        let mut packs: Vec<String> = Vec::new();
        let mut pack_index: HashMap<Arc<str>, u32> = HashMap::new();
        let memories = self
            .memories
            .iter()
            .map(|m| {
                let pages = m
                    .stored
                    .iter()
                    .enumerate()
                    .filter_map(|(page, stored)| stored.as_ref().map(|s| (page, s)))
                    .map(|(page, s)| {
                        let pack = *pack_index.entry(s.pack.clone()).or_insert_with(|| {
                            packs.push(s.pack.to_string());
                            packs.len() as u32 - 1
                        });
                        PageRef {
                            page: page as u32,
                            encoding: s.encoding,
                            pack,
                            frame: s.frame,
                        }
                    })
                    .collect();
                MemoryManifest {
                    byte_len: m.byte_len,
                    digest: memory_digest(&m.hashes),
                    pages,
                }
            })
            .collect();
        (packs, memories)
    }

    /// Pages with stored bytes, all memories together.
    pub fn stored_pages(&self) -> usize {
        self.memories
            .iter()
            .map(|m| m.stored.iter().filter(|s| s.is_some()).count())
            .sum()
    }
}
