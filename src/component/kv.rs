//! The keyed state a processor keeps on the host (`functionstream:core/kv`), as plain
//! data with no wasmtime in it: named stores of simple keys and complex keys, a byte
//! budget, the keys changed since the last checkpoint, and a digest of the whole state.
//! The host functions in `host.rs` are thin wrappers over this; `kv_runs` turns the
//! changed keys into the runs a checkpoint writes.
//!
//! Semantics where the WIT file is silent (written down in docs/GUESTS and FORMAT):
//! - `store(name)` opens the store of that name; two handles of one name share data.
//! - simple keys and complex keys are separate key spaces of a store;
//! - a complex key is ordered by (key-group, key, namespace, user-key), bytewise;
//! - `merge` appends the value to the existing one (an absent key merges as a put);
//! - `delete-prefix` deletes every user key of the same (key-group, key, namespace) that
//!   starts with the given user key;
//! - `list-states` and `list-complex` return keys (user keys) in `[start, end)`, an empty
//!   `end` meaning no upper bound;
//! - `scan-complex` yields (user-key, value) pairs of one (key-group, key, namespace) as
//!   they were when the scan started.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::Result;

use crate::codec::{Put, Reader};

/// The most bytes the kv state may take, counted as a whole run writes it (keys, values,
/// store names and their framing: `encode_entry`). Past it a write fails with a clear
/// error: the state lives in the host's memory, and a checkpoint may write it whole.
pub const MAX_KV_BYTES: usize = 64 << 20;

/// A complex key's prefix: (key-group, key, namespace).
pub type Scope = (Vec<u8>, Vec<u8>, Vec<u8>);

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Store {
    pub simple: BTreeMap<Vec<u8>, Vec<u8>>,
    pub complex: BTreeMap<Scope, BTreeMap<Vec<u8>, Vec<u8>>>,
}

/// One key of the kv state, in the order runs list them: by store, then the store's
/// existence, its simple keys, its complex keys.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KeyRef {
    pub store: String,
    pub key: EntryKey,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum EntryKey {
    /// The store itself (an opened store exists even when empty).
    Opened,
    Simple(Vec<u8>),
    Complex(Scope, Vec<u8>),
}

/// Every store, by name, and the bytes they take.
#[derive(Clone, Debug)]
pub struct Kv {
    /// The most bytes a write may leave: `MAX_KV_BYTES`, but while a restore applies a
    /// run (in key order, not the order the guest wrote) up to that run's size more.
    budget: usize,
    stores: BTreeMap<String, Store>,
    /// Bytes of every entry's encoding (`encode_entry`): the size of a whole run.
    bytes: usize,
    /// Keys written, deleted or created since the last [`Kv::take_changed`].
    changed: BTreeSet<KeyRef>,
    /// Bytes of the keys in `changed`; past `MAX_KV_BYTES` (a guest that writes and
    /// deletes ever new keys) the set is dropped and the next checkpoint is whole.
    changed_bytes: usize,
    changed_all: bool,
    /// The wrapping sum of the XXH3 of every entry's encoding (`encode_entry`), so that
    /// it follows each write in O(entry) time: what a restore checks.
    digest: u64,
}

/// What changed since the last checkpoint.
#[derive(Debug, PartialEq, Eq)]
pub enum Changes {
    Keys(BTreeSet<KeyRef>),
    /// Too many keys to list: write the state whole.
    All,
}

impl Default for Kv {
    fn default() -> Self {
        Kv {
            budget: MAX_KV_BYTES,
            stores: BTreeMap::new(),
            bytes: 0,
            changed: BTreeSet::new(),
            changed_bytes: 0,
            changed_all: false,
            digest: 0,
        }
    }
}

/// Two states are equal when they hold the same data, whatever changed lately.
impl PartialEq for Kv {
    fn eq(&self, other: &Self) -> bool {
        self.stores == other.stores && self.bytes == other.bytes
    }
}

impl Eq for Kv {}

/// Why a kv write was refused.
#[derive(Debug)]
pub struct OverBudget {
    pub would_hold: usize,
}

impl std::fmt::Display for OverBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the processor's kv state would take {} bytes, more than wasnap's limit of {} MiB",
            self.would_hold,
            MAX_KV_BYTES >> 20
        )
    }
}

impl std::error::Error for OverBudget {}

pub const KIND_OPENED: u8 = 0;
pub const KIND_SIMPLE_PUT: u8 = 1;
pub const KIND_SIMPLE_DELETE: u8 = 2;
pub const KIND_COMPLEX_PUT: u8 = 3;
pub const KIND_COMPLEX_DELETE: u8 = 4;

/// One entry as a kv run holds it (docs/FORMAT.md, "Kv runs"): `value` `None` is a
/// tombstone.
/// The length of `entry`'s encoding with `value` (what `encode_entry` writes).
pub fn entry_len(entry: &KeyRef, value: &[u8]) -> usize {
    let field = |len: usize| crate::codec::varint_len(len as u64) + len;
    let key = match &entry.key {
        EntryKey::Opened => return 1 + field(entry.store.len()),
        EntryKey::Simple(key) => field(key.len()),
        EntryKey::Complex((group, key, namespace), user_key) => {
            field(group.len()) + field(key.len()) + field(namespace.len()) + field(user_key.len())
        }
    };
    1 + field(entry.store.len()) + key + field(value.len())
}

pub fn encode_entry(out: &mut Vec<u8>, entry: &KeyRef, value: Option<&[u8]>) {
    let (put, delete) = match entry.key {
        EntryKey::Opened => (KIND_OPENED, KIND_OPENED),
        EntryKey::Simple(_) => (KIND_SIMPLE_PUT, KIND_SIMPLE_DELETE),
        EntryKey::Complex(..) => (KIND_COMPLEX_PUT, KIND_COMPLEX_DELETE),
    };
    out.put_u8(if value.is_some() { put } else { delete });
    put_bytes(out, entry.store.as_bytes());
    match &entry.key {
        EntryKey::Opened => return,
        EntryKey::Simple(key) => put_bytes(out, key),
        EntryKey::Complex((group, key, namespace), user_key) => {
            for part in [group, key, namespace, user_key] {
                put_bytes(out, part);
            }
        }
    }
    if let Some(value) = value {
        put_bytes(out, value);
    }
}

impl Kv {
    /// Bytes held (keys and values of every store).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn store_names(&self) -> impl Iterator<Item = &str> {
        self.stores.keys().map(String::as_str)
    }

    pub fn stores(&self) -> &BTreeMap<String, Store> {
        &self.stores
    }

    /// The order-free digest of the whole state.
    pub fn digest(&self) -> u64 {
        self.digest
    }

    /// What changed since the last call, which starts the next round.
    pub fn take_changed(&mut self) -> Changes {
        let keys = std::mem::take(&mut self.changed);
        self.changed_bytes = 0;
        if std::mem::take(&mut self.changed_all) {
            Changes::All
        } else {
            Changes::Keys(keys)
        }
    }

    /// Make sure a store of this name exists.
    pub fn open(&mut self, name: &str) -> Result<(), OverBudget> {
        if !self.stores.contains_key(name) {
            let opened = KeyRef {
                store: name.to_string(),
                key: EntryKey::Opened,
            };
            self.admit(entry_len(&opened, &[]), 0)?;
            self.store_admitted(name);
        }
        Ok(())
    }

    /// Let a restore apply a run of `run_bytes` (see `budget`); `None`: back to normal.
    pub(crate) fn allow_run(&mut self, run_bytes: Option<usize>) {
        self.budget = MAX_KV_BYTES.saturating_add(run_bytes.unwrap_or(0));
    }

    /// Note a change of `entry` from `old` to `new` (`None`: absent) in the digest and
    /// the changed keys.
    fn record(&mut self, entry: KeyRef, old: Option<&[u8]>, new: Option<&[u8]>) {
        if let Some(old) = old {
            self.weigh(&entry, old, false);
        }
        if let Some(new) = new {
            self.weigh(&entry, new, true);
        }
        self.mark_changed(entry);
    }

    /// Count `entry` holding `value` into (`add`) or out of the digest and the bytes.
    fn weigh(&mut self, entry: &KeyRef, value: &[u8], add: bool) {
        let mut encoded = Vec::with_capacity(entry_len(entry, value));
        encode_entry(&mut encoded, entry, Some(value));
        let hash = twox_hash::XxHash3_64::oneshot(&encoded);
        if add {
            self.digest = self.digest.wrapping_add(hash);
            self.bytes += encoded.len();
        } else {
            self.digest = self.digest.wrapping_sub(hash);
            self.bytes -= encoded.len();
        }
    }

    fn mark_changed(&mut self, entry: KeyRef) {
        if self.changed_all {
            return;
        }
        let len = entry_len(&entry, &[]);
        if self.changed.insert(entry) {
            self.changed_bytes += len;
        }
        if self.changed_bytes > MAX_KV_BYTES {
            self.changed.clear();
            self.changed_all = true;
        }
    }

    /// The current value of an entry: `Some(&[])` for an existing store's `Opened`.
    pub fn value_of(&self, entry: &KeyRef) -> Option<&[u8]> {
        let store = self.stores.get(&entry.store)?;
        match &entry.key {
            EntryKey::Opened => Some(&[]),
            EntryKey::Simple(key) => store.simple.get(key).map(Vec::as_slice),
            EntryKey::Complex(scope, user_key) => {
                store.complex.get(scope)?.get(user_key).map(Vec::as_slice)
            }
        }
    }

    /// Whether `entry` may take `value` in place of what takes `old` bytes now (a store
    /// it creates included).
    fn admit_entry(&self, entry: &KeyRef, value: &[u8], old: usize) -> Result<(), OverBudget> {
        let mut grow = entry_len(entry, value);
        if !self.stores.contains_key(&entry.store) {
            grow += entry_len(
                &KeyRef {
                    store: entry.store.clone(),
                    key: EntryKey::Opened,
                },
                &[],
            );
        }
        self.admit(grow, old)
    }

    fn admit(&self, grow: usize, shrink: usize) -> Result<(), OverBudget> {
        let would_hold = (self.bytes - shrink).saturating_add(grow);
        if would_hold > self.budget && grow > shrink {
            return Err(OverBudget { would_hold });
        }
        Ok(())
    }

    /// The store `name`, created if new: only once its bytes were admitted.
    fn store_admitted(&mut self, name: &str) -> &mut Store {
        if !self.stores.contains_key(name) {
            let opened = KeyRef {
                store: name.to_string(),
                key: EntryKey::Opened,
            };
            self.record(opened, None, Some(&[]));
        }
        self.stores.entry(name.to_string()).or_default()
    }

    pub fn get_state(&self, name: &str, key: &[u8]) -> Option<&[u8]> {
        self.stores.get(name)?.simple.get(key).map(Vec::as_slice)
    }

    pub fn put_state(&mut self, name: &str, key: &[u8], value: &[u8]) -> Result<(), OverBudget> {
        let entry = KeyRef {
            store: name.to_string(),
            key: EntryKey::Simple(key.to_vec()),
        };
        let old = self
            .get_state(name, key)
            .map_or(0, |v| entry_len(&entry, v));
        self.admit_entry(&entry, value, old)?;
        let previous = self
            .store_admitted(name)
            .simple
            .insert(key.to_vec(), value.to_vec());
        self.record(entry, previous.as_deref(), Some(value));
        Ok(())
    }

    pub fn delete_state(&mut self, name: &str, key: &[u8]) {
        let removed = self
            .stores
            .get_mut(name)
            .and_then(|store| store.simple.remove(key));
        if let Some(old) = removed {
            let entry = KeyRef {
                store: name.to_string(),
                key: EntryKey::Simple(key.to_vec()),
            };
            self.record(entry, Some(&old), None);
        }
    }

    /// Keys in `[start, end)`; an empty `end` is no upper bound.
    pub fn list_states(&self, name: &str, start: &[u8], end: &[u8]) -> Vec<Vec<u8>> {
        let Some(store) = self.stores.get(name) else {
            return Vec::new();
        };
        store
            .simple
            .range(start.to_vec()..)
            .take_while(|(k, _)| end.is_empty() || k.as_slice() < end)
            .map(|(k, _)| k.clone())
            .collect()
    }

    pub fn get(&self, name: &str, scope: &Scope, user_key: &[u8]) -> Option<&[u8]> {
        self.stores
            .get(name)?
            .complex
            .get(scope)?
            .get(user_key)
            .map(Vec::as_slice)
    }

    pub fn put(
        &mut self,
        name: &str,
        scope: Scope,
        user_key: &[u8],
        value: Vec<u8>,
    ) -> Result<(), OverBudget> {
        let entry = KeyRef {
            store: name.to_string(),
            key: EntryKey::Complex(scope.clone(), user_key.to_vec()),
        };
        let old = self
            .get(name, &scope, user_key)
            .map_or(0, |v| entry_len(&entry, v));
        self.admit_entry(&entry, &value, old)?;
        // Weighed before the value moves into the map, the old one as it comes out: no
        // copy of either.
        self.weigh(&entry, &value, true);
        let previous = self
            .store_admitted(name)
            .complex
            .entry(scope)
            .or_default()
            .insert(user_key.to_vec(), value);
        if let Some(previous) = previous {
            self.weigh(&entry, &previous, false);
        }
        self.mark_changed(entry);
        Ok(())
    }

    /// Append `value` to the existing value (a put when there is none).
    pub fn merge(
        &mut self,
        name: &str,
        scope: Scope,
        user_key: &[u8],
        value: &[u8],
    ) -> Result<(), OverBudget> {
        let mut merged = self.get(name, &scope, user_key).unwrap_or(&[]).to_vec();
        merged.extend_from_slice(value);
        self.put(name, scope, user_key, merged)
    }

    pub fn delete(&mut self, name: &str, scope: &Scope, user_key: &[u8]) {
        let Some(store) = self.stores.get_mut(name) else {
            return;
        };
        let Some(entries) = store.complex.get_mut(scope) else {
            return;
        };
        if let Some(old) = entries.remove(user_key) {
            if entries.is_empty() {
                store.complex.remove(scope);
            }
            let entry = KeyRef {
                store: name.to_string(),
                key: EntryKey::Complex(scope.clone(), user_key.to_vec()),
            };
            self.record(entry, Some(&old), None);
        }
    }

    /// Delete every user key of `scope` that starts with `prefix`.
    pub fn delete_prefix(&mut self, name: &str, scope: &Scope, prefix: &[u8]) {
        let doomed: Vec<Vec<u8>> = match self.stores.get(name).and_then(|s| s.complex.get(scope)) {
            Some(entries) => entries
                .range(prefix.to_vec()..)
                .take_while(|(k, _)| k.starts_with(prefix))
                .map(|(k, _)| k.clone())
                .collect(),
            None => return,
        };
        for key in doomed {
            self.delete(name, scope, &key);
        }
    }

    /// User keys of `scope` in `[start, end)`; an empty `end` is no upper bound.
    pub fn list_complex(
        &self,
        name: &str,
        scope: &Scope,
        start: &[u8],
        end: &[u8],
    ) -> Vec<Vec<u8>> {
        let Some(entries) = self.stores.get(name).and_then(|s| s.complex.get(scope)) else {
            return Vec::new();
        };
        entries
            .range(start.to_vec()..)
            .take_while(|(k, _)| end.is_empty() || k.as_slice() < end)
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Every (user key, value) of `scope`, in order: what a scan iterates over.
    pub fn scan(&self, name: &str, scope: &Scope) -> Vec<(Vec<u8>, Vec<u8>)> {
        self.stores
            .get(name)
            .and_then(|s| s.complex.get(scope))
            .map(|entries| {
                entries
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }
}

pub(crate) fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.put_varint(bytes.len() as u64);
    out.extend_from_slice(bytes);
}

pub(crate) fn read_bytes<'a>(r: &mut Reader<'a>) -> Result<&'a [u8]> {
    let n = r.varint_count(1)?;
    r.bytes(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope(g: &str) -> Scope {
        (g.into(), b"k".to_vec(), b"ns".to_vec())
    }

    #[test]
    fn bytes_and_digest_follow_every_write_and_come_back_when_it_is_undone() {
        let mut kv = Kv::default();
        kv.open("empty").unwrap();
        let (empty_bytes, empty_digest) = (kv.bytes(), kv.digest());
        assert_eq!(empty_bytes, 1 + 1 + 5, "an opened store's entry");
        kv.put_state("a", b"x", b"1").unwrap();
        kv.put("a", scope("g"), b"u1", b"v".to_vec()).unwrap();
        kv.merge("a", scope("g"), b"u1", b"w").unwrap();
        assert_eq!(kv.get("a", &scope("g"), b"u1"), Some(&b"vw"[..]));
        // Store "a", its simple key, its complex key: each entry as a run encodes it.
        let a = |key| KeyRef {
            store: "a".into(),
            key,
        };
        let expected = empty_bytes
            + entry_len(&a(EntryKey::Opened), &[])
            + entry_len(&a(EntryKey::Simple(b"x".to_vec())), b"1")
            + entry_len(&a(EntryKey::Complex(scope("g"), b"u1".to_vec())), b"vw");
        assert_eq!(kv.bytes(), expected);
        let mut encoded = Vec::new();
        encode_entry(
            &mut encoded,
            &a(EntryKey::Simple(b"x".to_vec())),
            Some(b"1"),
        );
        assert_eq!(
            encoded.len(),
            entry_len(&a(EntryKey::Simple(b"x".to_vec())), b"1")
        );

        let digest = kv.digest();
        kv.put_state("a", b"x", b"2").unwrap();
        assert_ne!(kv.digest(), digest);
        kv.put_state("a", b"x", b"1").unwrap();
        assert_eq!(kv.digest(), digest, "the digest depends on the data only");
        kv.delete_state("a", b"x");
        kv.delete("a", &scope("g"), b"u1");
        assert_eq!(
            kv.bytes(),
            expected
                - entry_len(&a(EntryKey::Simple(b"x".to_vec())), b"1")
                - entry_len(&a(EntryKey::Complex(scope("g"), b"u1".to_vec())), b"vw")
        );
        assert_ne!(kv.digest(), empty_digest, "store a still exists");
        let Changes::Keys(changed) = kv.take_changed() else {
            panic!("a few keys changed")
        };
        assert_eq!(changed.len(), 4, "{changed:?}");
        assert_eq!(kv.take_changed(), Changes::Keys(Default::default()));
    }

    #[test]
    fn a_guest_touching_ever_new_keys_gets_a_whole_checkpoint_not_an_unbounded_list() {
        let mut kv = Kv::default();
        let key = vec![7u8; 1 << 20];
        for i in 0..(MAX_KV_BYTES >> 20) + 1 {
            let mut k = key.clone();
            k[..8].copy_from_slice(&(i as u64).to_le_bytes());
            kv.put_state("s", &k, b"").unwrap();
            kv.delete_state("s", &k);
        }
        assert_eq!(kv.take_changed(), Changes::All);
        assert!(kv.changed.is_empty());
    }

    #[test]
    fn ranges_prefixes_and_scans_follow_key_order() {
        let mut kv = Kv::default();
        for k in ["a", "ab", "abc", "b", "c"] {
            kv.put_state("s", k.as_bytes(), b"v").unwrap();
            kv.put("s", scope("g"), k.as_bytes(), k.as_bytes().to_vec())
                .unwrap();
        }
        assert_eq!(
            kv.list_states("s", b"ab", b"c"),
            vec![b"ab".to_vec(), b"abc".to_vec(), b"b".to_vec()]
        );
        assert_eq!(kv.list_states("s", b"b", b"").len(), 2);
        kv.delete_prefix("s", &scope("g"), b"ab");
        assert_eq!(
            kv.list_complex("s", &scope("g"), b"", b""),
            vec![b"a".to_vec(), b"b".to_vec(), b"c".to_vec()]
        );
        assert_eq!(kv.scan("s", &scope("g"))[2], (b"c".to_vec(), b"c".to_vec()));
        assert!(kv.scan("s", &scope("other")).is_empty());
        let before = kv.bytes();
        kv.delete_state("s", b"a");
        // kind, store name "s", key "a", value "v": each length-prefixed.
        assert_eq!(kv.bytes(), before - (1 + 2 + 2 + 2));
    }

    #[test]
    fn a_write_past_the_budget_is_refused_and_changes_nothing() {
        let mut kv = Kv::default();
        kv.put_state("s", b"k", &vec![0; MAX_KV_BYTES - 100])
            .unwrap();
        let err = kv.put_state("s", b"k2", &[0; 200]).unwrap_err();
        assert!(err.to_string().contains("limit of 64 MiB"), "{err}");
        assert_eq!(kv.get_state("s", b"k2"), None);
        // Replacing a value with a smaller one is always allowed.
        kv.put_state("s", b"k", b"small").unwrap();
        // The store's entry (kind, name) and the key's (kind, name, key, value).
        assert_eq!(kv.bytes(), (1 + 2) + (1 + 2 + 2 + 6));
    }
}
