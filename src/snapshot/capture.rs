//! Capture: what changed in a paused guest since the last committed checkpoint.
//!
//! Called only between two guest calls, when no guest frame is live, so the memories and
//! mutable globals are the guest's whole state. Capture itself copies nothing: the pack is
//! encoded straight from the paused guest's memory.

use std::sync::Arc;

use anyhow::Result;

use super::pages::{self, PageChange};
use super::table::{MemoryTable, PageTable, StoredPage};
use crate::guest::{GlobalValue, GuestInstance};
use crate::store::pack::{Encoding, FrameRef};

/// The changes of one memory since the committed table.
pub struct MemoryDelta {
    pub byte_len: u64,
    pub hashes: Vec<u64>,
    pub changes: Vec<(usize, PageChange)>,
}

/// Everything a checkpoint must record beyond the committed table.
pub struct Delta {
    pub globals: Vec<GlobalValue>,
    pub memories: Vec<MemoryDelta>,
}

/// Hash every page of every memory and diff it against `committed`.
pub fn capture(instance: &mut GuestInstance, committed: &PageTable) -> Result<Delta> {
    let globals = instance.globals()?;
    let memories = (0..instance.memory_count())
        .map(|index| {
            let memory = instance.memory(index);
            let hashes = pages::hash_pages(memory);
            let changes = pages::diff(memory, &hashes, &committed.memories[index].hashes);
            MemoryDelta {
                byte_len: memory.len() as u64,
                hashes,
                changes,
            }
        })
        .collect();
    Ok(Delta { globals, memories })
}

impl Delta {
    /// The bytes of every dirty page, memory by memory, in page order: the pack's contents.
    pub fn dirty_pages<'a>(&self, instance: &'a GuestInstance) -> Vec<&'a [u8]> {
        self.memories
            .iter()
            .enumerate()
            .flat_map(|(index, m)| {
                let memory = instance.memory(index);
                m.changes
                    .iter()
                    .filter(|(_, change)| *change == PageChange::Dirty)
                    .map(move |(page, _)| pages::page(memory, *page))
            })
            .collect()
    }

    pub fn dirty_count(&self) -> usize {
        self.count(PageChange::Dirty)
    }

    pub fn zeroed_count(&self) -> usize {
        self.count(PageChange::Zeroed)
    }

    fn count(&self, kind: PageChange) -> usize {
        self.memories
            .iter()
            .map(|m| m.changes.iter().filter(|(_, c)| *c == kind).count())
            .sum()
    }

    /// The table after this delta is committed: dirty pages now live in `pack` at `frames`
    /// (in `dirty_pages` order), zeroed pages are zero, every other page is where it was.
    pub fn next_table(
        &self,
        committed: &PageTable,
        pack: &Arc<str>,
        frames: &[FrameRef],
    ) -> PageTable {
        let mut frames = frames.iter();
        let memories = self
            .memories
            .iter()
            .zip(&committed.memories)
            .map(|(delta, old)| {
                let mut stored = old.stored.clone();
                stored.resize(delta.hashes.len(), None);
                for (page, change) in &delta.changes {
                    stored[*page] = match change {
                        PageChange::Zeroed => None,
                        PageChange::Dirty => Some(StoredPage {
                            pack: pack.clone(),
                            encoding: Encoding::Zstd,
                            frame: *frames.next().expect("one frame per dirty page"),
                        }),
                    };
                }
                MemoryTable {
                    byte_len: delta.byte_len,
                    hashes: delta.hashes.clone(),
                    stored,
                }
            })
            .collect();
        PageTable { memories }
    }
}
