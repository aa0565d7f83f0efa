//! The guest's resource handle table, mirrored on the host.
//!
//! A component keeps the handles it owns (a `kv.store`, wasi-libc's stderr stream) as
//! small integers in its own memory: indices into a table that wasmtime keeps per
//! component instance and offers no API to read or write. A restored memory is only
//! right if a fresh instance's table holds the same handles at the same indices.
//!
//! So the host mirrors the table. Every handle the guest receives or drops goes through a
//! host function wasnap defines (`host.rs`), and those report here, in call order:
//! [`HandleTable::insert`] and [`HandleTable::remove`] follow wasmtime 48's allocator
//! exactly (indices from 1; a freed slot is reused first, last freed first). A
//! checkpoint writes the mirror down: the number of slots, the free chain, and for each
//! live slot a recipe to make its host object again. A restore re-creates the table in a
//! fresh instance by adopting one handle per slot, in index order (fillers in the free
//! ones), then dropping the fillers in reverse free-chain order; every index wasmtime
//! hands back is checked against the mirror.

use std::collections::HashMap;

use anyhow::{Result, bail};

use crate::codec::{Put, Reader};
use crate::error::corrupt;

/// The most slots the mirror follows: past this the guest is leaking handles and a
/// checkpoint would grow without bound (wasmtime's own store limit is 100 000).
pub const MAX_SLOTS: u32 = 65_536;

/// What a live handle is, and how to make its host object again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Recipe {
    /// A `functionstream:core/kv.store` of this name.
    KvStore { name: String },
    /// A `kv.iterator`: what it has not yet yielded.
    KvIterator { remaining: Vec<(Vec<u8>, Vec<u8>)> },
    /// `wasi:cli/stdin` (an input stream that is always at its end).
    Stdin,
    /// `wasi:cli/stdout`.
    Stdout,
    /// `wasi:cli/stderr`.
    Stderr,
    /// A pollable subscribed to the stream at handle index `stream` (wasi-libc keeps one
    /// per stdio stream).
    StreamPollable { stream: u32 },
    /// A handle wasnap can follow but not make again (a WASI pollable, stream error):
    /// a checkpoint while one is live is refused, naming it.
    Unrestorable(&'static str),
}

impl Recipe {
    pub fn describe(&self) -> &str {
        match self {
            Recipe::KvStore { .. } => "kv.store",
            Recipe::KvIterator { .. } => "kv.iterator",
            Recipe::Stdin => "stdin stream",
            Recipe::Stdout => "stdout stream",
            Recipe::Stderr => "stderr stream",
            Recipe::StreamPollable { .. } => "stream pollable",
            Recipe::Unrestorable(what) => what,
        }
    }
}

/// Which host object a live handle stands for: the resource type and the host's `rep`
/// (its index in the host's resource table), as a destructor sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct HostKey {
    pub type_id: u8,
    pub rep: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Slot {
    Free { next: u32 },
    Live { key: HostKey, recipe: Recipe },
}

/// The mirror of one component instance's handle table.
#[derive(Clone, Debug, Default)]
pub struct HandleTable {
    /// The head of the free chain (a 0-based slot; `slots.len()` when none is free).
    next: u32,
    slots: Vec<Slot>,
    by_key: HashMap<HostKey, u32>,
}

impl HandleTable {
    /// A handle was lowered into the guest: the index the guest got (from 1).
    pub fn insert(&mut self, key: HostKey, recipe: Recipe) -> Result<u32> {
        let next = self.next;
        if next >= MAX_SLOTS {
            bail!(
                "the guest holds more than {MAX_SLOTS} resource handles; wasnap stops following them"
            );
        }
        if next as usize == self.slots.len() {
            self.slots.push(Slot::Free { next: next + 1 });
        }
        let slot = std::mem::replace(&mut self.slots[next as usize], Slot::Live { key, recipe });
        let Slot::Free { next: after } = slot else {
            unreachable!("the free chain points at a live slot");
        };
        self.next = after;
        self.by_key.insert(key, next + 1);
        Ok(next + 1)
    }

    /// The guest dropped the handle of this host object.
    pub fn remove(&mut self, key: HostKey) -> Result<u32> {
        let Some(index) = self.by_key.remove(&key) else {
            bail!("the guest dropped a handle wasnap did not see it receive ({key:?})");
        };
        self.slots[index as usize - 1] = Slot::Free { next: self.next };
        self.next = index - 1;
        Ok(index)
    }

    /// The index the next handle the guest receives will get.
    pub fn next_index(&self) -> u32 {
        self.next + 1
    }

    /// The index of a live handle, if the guest holds it.
    pub fn index_of(&self, key: HostKey) -> Option<u32> {
        self.by_key.get(&key).copied()
    }

    /// Replace the recipe of a live handle (an iterator moved on).
    pub fn update(&mut self, key: HostKey, recipe: Recipe) {
        if let Some(index) = self.by_key.get(&key)
            && let Slot::Live { recipe: r, .. } = &mut self.slots[*index as usize - 1]
        {
            *r = recipe;
        }
    }

    /// The live handles, in index order.
    pub fn live(&self) -> impl Iterator<Item = (u32, HostKey, &Recipe)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, slot)| match slot {
                Slot::Live { key, recipe } => Some((i as u32 + 1, *key, recipe)),
                Slot::Free { .. } => None,
            })
    }

    pub fn slot_count(&self) -> u32 {
        self.slots.len() as u32
    }

    /// The free slots, from the head of the chain (the next to be reused) on.
    pub fn free_chain(&self) -> Vec<u32> {
        let mut chain = Vec::new();
        let mut at = self.next;
        while let Some(Slot::Free { next }) = self.slots.get(at as usize) {
            chain.push(at + 1);
            at = *next;
        }
        chain
    }

    /// The plan a restore follows to make a fresh table equal to this one: for each
    /// index 1..=n, adopt its recipe (`None`: a filler); then drop the fillers in this
    /// order. Refuses a table with a handle that cannot be made again.
    pub fn plan(&self) -> Result<(Vec<Option<&Recipe>>, Vec<u32>)> {
        let mut adopt = Vec::with_capacity(self.slots.len());
        for (i, slot) in self.slots.iter().enumerate() {
            adopt.push(match slot {
                Slot::Live {
                    recipe: Recipe::Unrestorable(what),
                    ..
                } => bail!(
                    "the guest holds a {what} handle (index {}) across calls; wasnap cannot make one again after a restore",
                    i + 1
                ),
                Slot::Live { recipe, .. } => Some(recipe),
                Slot::Free { .. } => None,
            });
        }
        let mut drops = self.free_chain();
        drops.reverse();
        Ok((adopt, drops))
    }

    /// The table as a checkpoint holds it: slot count, free chain, live slots.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<()> {
        let (_, _) = self.plan()?;
        out.put_varint(u64::from(self.slot_count()));
        let chain = self.free_chain();
        out.put_varint(chain.len() as u64);
        for index in chain {
            out.put_varint(u64::from(index));
        }
        let live: Vec<_> = self.live().collect();
        out.put_varint(live.len() as u64);
        for (index, _, recipe) in live {
            out.put_varint(u64::from(index));
            match recipe {
                Recipe::KvStore { name } => {
                    out.put_u8(0);
                    super::kv::put_bytes(out, name.as_bytes());
                }
                Recipe::KvIterator { remaining } => {
                    out.put_u8(1);
                    out.put_varint(remaining.len() as u64);
                    for (k, v) in remaining {
                        super::kv::put_bytes(out, k);
                        super::kv::put_bytes(out, v);
                    }
                }
                Recipe::Stdin => out.put_u8(2),
                Recipe::Stdout => out.put_u8(3),
                Recipe::Stderr => out.put_u8(4),
                Recipe::StreamPollable { stream } => {
                    out.put_u8(5);
                    out.put_varint(u64::from(*stream));
                }
                Recipe::Unrestorable(_) => unreachable!("refused by plan()"),
            }
        }
        Ok(())
    }

    /// Read a table [`HandleTable::encode`] wrote: its slots, with recipes, and the free
    /// chain, checked to be a permutation of the free slots. Host keys are assigned by
    /// the restore, as it makes the objects again.
    pub fn decode(r: &mut Reader<'_>) -> Result<DecodedTable> {
        let slots = r.varint_u32()?;
        if slots > MAX_SLOTS {
            return Err(corrupt!(
                "a checkpoint's handle table has {slots} slots (at most {MAX_SLOTS})"
            ));
        }
        let mut recipes: Vec<Option<Recipe>> = vec![None; slots as usize];
        let chain_len = r.varint_count(1)?;
        let mut chain = Vec::with_capacity(chain_len);
        for _ in 0..chain_len {
            chain.push(r.varint_u32()?);
        }
        let live = r.varint_count(2)?;
        for _ in 0..live {
            let index = r.varint_u32()?;
            let slot = index
                .checked_sub(1)
                .and_then(|i| recipes.get_mut(i as usize))
                .ok_or_else(|| {
                    corrupt!("a checkpoint's handle index {index} is outside its table")
                })?;
            if slot.is_some() {
                return Err(corrupt!(
                    "a checkpoint's handle index {index} appears twice"
                ));
            }
            *slot = Some(match r.u8()? {
                0 => Recipe::KvStore {
                    name: String::from_utf8(super::kv::read_bytes(r)?.to_vec())
                        .map_err(|_| corrupt!("a kv store name is not UTF-8"))?,
                },
                1 => {
                    let n = r.varint_count(2)?;
                    let mut remaining = Vec::with_capacity(n);
                    for _ in 0..n {
                        remaining.push((
                            super::kv::read_bytes(r)?.to_vec(),
                            super::kv::read_bytes(r)?.to_vec(),
                        ));
                    }
                    Recipe::KvIterator { remaining }
                }
                2 => Recipe::Stdin,
                3 => Recipe::Stdout,
                4 => Recipe::Stderr,
                5 => Recipe::StreamPollable {
                    stream: r.varint_u32()?,
                },
                other => return Err(corrupt!("a checkpoint's handle has unknown kind {other}")),
            });
        }
        // A pollable's stream must be a live stream of the same table.
        for recipe in recipes.iter().flatten() {
            if let Recipe::StreamPollable { stream } = recipe {
                let target = stream.checked_sub(1).and_then(|i| recipes.get(i as usize));
                if !matches!(
                    target,
                    Some(Some(Recipe::Stdin | Recipe::Stdout | Recipe::Stderr))
                ) {
                    return Err(corrupt!(
                        "a checkpoint's pollable refers to handle {stream}, which is not a live stream"
                    ));
                }
            }
        }
        let mut free: Vec<u32> = (1..=slots)
            .filter(|i| recipes[*i as usize - 1].is_none())
            .collect();
        let mut sorted_chain = chain.clone();
        sorted_chain.sort_unstable();
        free.sort_unstable();
        if sorted_chain != free {
            return Err(corrupt!(
                "a checkpoint's handle table has a free chain that does not match its free slots"
            ));
        }
        Ok(DecodedTable { recipes, chain })
    }

    /// The mirror of a table a restore rebuilt from `decoded`, given the host key each
    /// live slot's new object got.
    pub fn rebuilt(decoded: &DecodedTable, keys: &[Option<HostKey>]) -> Self {
        let mut table = HandleTable {
            next: decoded.recipes.len() as u32,
            slots: Vec::with_capacity(decoded.recipes.len()),
            by_key: HashMap::new(),
        };
        for (i, (recipe, key)) in decoded.recipes.iter().zip(keys).enumerate() {
            match (recipe, key) {
                (Some(recipe), Some(key)) => {
                    table.slots.push(Slot::Live {
                        key: *key,
                        recipe: recipe.clone(),
                    });
                    table.by_key.insert(*key, i as u32 + 1);
                }
                _ => table.slots.push(Slot::Free { next: 0 }),
            }
        }
        // The fillers are dropped last in chain order reversed: the head is dropped
        // last, and each freed slot points at the one freed before it.
        let mut next = table.slots.len() as u32;
        for index in decoded.chain.iter().rev() {
            table.slots[*index as usize - 1] = Slot::Free { next };
            next = index - 1;
        }
        table.next = next;
        table
    }
}

/// A checkpoint's handle table, read back: each slot's recipe (`None`: free) and the
/// free chain from its head.
#[derive(Debug)]
pub struct DecodedTable {
    pub recipes: Vec<Option<Recipe>>,
    pub chain: Vec<u32>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(rep: u32) -> HostKey {
        HostKey { type_id: 0, rep }
    }

    #[test]
    fn indices_start_at_one_and_the_last_freed_slot_is_reused_first() {
        let mut t = HandleTable::default();
        assert_eq!(t.insert(key(10), Recipe::Stderr).unwrap(), 1);
        assert_eq!(t.insert(key(11), Recipe::Stdout).unwrap(), 2);
        assert_eq!(t.insert(key(12), Recipe::Stdin).unwrap(), 3);
        assert_eq!(t.remove(key(11)).unwrap(), 2);
        assert_eq!(t.remove(key(10)).unwrap(), 1);
        assert_eq!(t.free_chain(), vec![1, 2]);
        assert_eq!(t.insert(key(13), Recipe::Stderr).unwrap(), 1);
        assert_eq!(t.insert(key(14), Recipe::Stderr).unwrap(), 2);
        assert_eq!(t.insert(key(15), Recipe::Stderr).unwrap(), 4);
        assert!(t.remove(key(99)).is_err());
    }

    #[test]
    fn a_live_unrestorable_handle_refuses_the_checkpoint_by_name() {
        let mut t = HandleTable::default();
        t.insert(key(1), Recipe::Unrestorable("wasi pollable"))
            .unwrap();
        let err = t.encode(&mut Vec::new()).unwrap_err();
        assert!(
            err.to_string().contains("wasi pollable handle (index 1)"),
            "{err}"
        );
    }

    /// Replays a table's plan on a second table, as a restore does on wasmtime's.
    fn replay(decoded: &DecodedTable) -> (HandleTable, Vec<Option<HostKey>>) {
        let mut fresh = HandleTable::default();
        let mut keys = Vec::new();
        for (i, recipe) in decoded.recipes.iter().enumerate() {
            let k = HostKey {
                type_id: 1,
                rep: 1000 + i as u32,
            };
            let index = fresh
                .insert(k, recipe.clone().unwrap_or(Recipe::Stdin))
                .unwrap();
            assert_eq!(index, i as u32 + 1);
            keys.push(recipe.as_ref().map(|_| k));
        }
        for index in decoded.chain.iter().rev() {
            let k = HostKey {
                type_id: 1,
                rep: 1000 + index - 1,
            };
            fresh.remove(k).unwrap();
        }
        (fresh, keys)
    }

    proptest! {
        /// Any history of inserts and removes, written down and replayed into a fresh
        /// table the way a restore does, gives a table that allocates exactly as the
        /// original would from then on.
        #[test]
        fn a_replayed_table_allocates_like_the_original(ops in prop::collection::vec(any::<(bool, u8)>(), 0..200)) {
            let mut t = HandleTable::default();
            let mut live: Vec<u32> = Vec::new();
            let mut rep = 0;
            for (insert, pick) in ops {
                if insert || live.is_empty() {
                    rep += 1;
                    t.insert(key(rep), Recipe::KvStore { name: format!("s{rep}") }).unwrap();
                    live.push(rep);
                } else {
                    let r = live.remove(pick as usize % live.len());
                    t.remove(key(r)).unwrap();
                }
            }
            let mut bytes = Vec::new();
            t.encode(&mut bytes).unwrap();
            let decoded = HandleTable::decode(&mut Reader::new(&bytes, "t")).unwrap();
            let (mut wasmtime_side, keys) = replay(&decoded);
            let mut mirror = HandleTable::rebuilt(&decoded, &keys);
            prop_assert_eq!(mirror.free_chain(), t.free_chain());
            prop_assert_eq!(wasmtime_side.free_chain(), t.free_chain());
            for n in 0..5u32 {
                let a = t.insert(key(10_000 + n), Recipe::Stdin).unwrap();
                let b = mirror.insert(key(20_000 + n), Recipe::Stdin).unwrap();
                let c = wasmtime_side.insert(key(30_000 + n), Recipe::Stdin).unwrap();
                prop_assert_eq!(a, b);
                prop_assert_eq!(a, c);
            }
        }
    }

    #[test]
    fn a_free_chain_that_is_not_the_free_slots_is_corrupt() {
        let mut bytes = Vec::new();
        bytes.put_varint(2); // slots
        bytes.put_varint(1); // chain
        bytes.put_varint(1);
        bytes.put_varint(0); // live: none, so slot 2 is free but not chained
        let err = HandleTable::decode(&mut Reader::new(&bytes, "t")).unwrap_err();
        assert!(format!("{err:#}").contains("free chain"), "{err:#}");
    }
}
