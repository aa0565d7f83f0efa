//! The keyed state a processor keeps on the host (`functionstream:core/kv`), as plain
//! data with no wasmtime in it: named stores of simple keys and complex keys, a byte
//! budget, and the encoding that goes into a checkpoint. The host functions in
//! `host.rs` are thin wrappers over this.
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

use std::collections::BTreeMap;

use anyhow::Result;

use crate::codec::{Put, Reader};
use crate::error::corrupt;

/// The most bytes (keys + values, all stores) the kv state may hold. Past it a write
/// fails with a clear error: the whole state is in every checkpoint's manifest.
pub const MAX_KV_BYTES: usize = 64 << 20;

/// A complex key's prefix: (key-group, key, namespace).
pub type Scope = (Vec<u8>, Vec<u8>, Vec<u8>);

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Store {
    pub simple: BTreeMap<Vec<u8>, Vec<u8>>,
    pub complex: BTreeMap<Scope, BTreeMap<Vec<u8>, Vec<u8>>>,
}

/// Every store, by name, and the bytes they hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Kv {
    stores: BTreeMap<String, Store>,
    bytes: usize,
}

/// Why a kv write was refused.
#[derive(Debug)]
pub struct OverBudget {
    pub would_hold: usize,
}

impl std::fmt::Display for OverBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the processor's kv state would hold {} bytes, more than wasnap's limit of {} MiB",
            self.would_hold,
            MAX_KV_BYTES >> 20
        )
    }
}

impl std::error::Error for OverBudget {}

fn scope_bytes(scope: &Scope) -> usize {
    scope.0.len() + scope.1.len() + scope.2.len()
}

impl Kv {
    /// Bytes held (keys and values of every store).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn store_names(&self) -> impl Iterator<Item = &str> {
        self.stores.keys().map(String::as_str)
    }

    /// Make sure a store of this name exists (opening one is not a write of data).
    pub fn open(&mut self, name: &str) {
        if !self.stores.contains_key(name) {
            self.stores.insert(name.to_string(), Store::default());
        }
    }

    fn admit(&self, grow: usize, shrink: usize) -> Result<(), OverBudget> {
        let would_hold = (self.bytes - shrink).saturating_add(grow);
        if would_hold > MAX_KV_BYTES && grow > shrink {
            return Err(OverBudget { would_hold });
        }
        Ok(())
    }

    fn store_mut(&mut self, name: &str) -> &mut Store {
        self.stores.entry(name.to_string()).or_default()
    }

    pub fn get_state(&self, name: &str, key: &[u8]) -> Option<&[u8]> {
        self.stores.get(name)?.simple.get(key).map(Vec::as_slice)
    }

    pub fn put_state(&mut self, name: &str, key: &[u8], value: &[u8]) -> Result<(), OverBudget> {
        let old = self.get_state(name, key).map_or(0, |v| key.len() + v.len());
        self.admit(key.len() + value.len(), old)?;
        self.store_mut(name)
            .simple
            .insert(key.to_vec(), value.to_vec());
        self.bytes = self.bytes - old + key.len() + value.len();
        Ok(())
    }

    pub fn delete_state(&mut self, name: &str, key: &[u8]) {
        if let Some(old) = self.store_mut(name).simple.remove(key) {
            self.bytes -= key.len() + old.len();
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
        let existing = self.get(name, &scope, user_key).map(<[u8]>::len);
        let old = existing.map_or(0, |v| scope_bytes(&scope) + user_key.len() + v);
        let new = scope_bytes(&scope) + user_key.len() + value.len();
        self.admit(new, old)?;
        self.store_mut(name)
            .complex
            .entry(scope)
            .or_default()
            .insert(user_key.to_vec(), value);
        self.bytes = self.bytes - old + new;
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
        let store = self.store_mut(name);
        let Some(entries) = store.complex.get_mut(scope) else {
            return;
        };
        if let Some(old) = entries.remove(user_key) {
            if entries.is_empty() {
                store.complex.remove(scope);
            }
            self.bytes -= scope_bytes(scope) + user_key.len() + old.len();
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

    /// The whole state, for a checkpoint (see docs/FORMAT.md, "Component host state").
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.put_varint(self.stores.len() as u64);
        for (name, store) in &self.stores {
            put_bytes(out, name.as_bytes());
            out.put_varint(store.simple.len() as u64);
            for (k, v) in &store.simple {
                put_bytes(out, k);
                put_bytes(out, v);
            }
            out.put_varint(store.complex.len() as u64);
            for ((group, key, namespace), entries) in &store.complex {
                put_bytes(out, group);
                put_bytes(out, key);
                put_bytes(out, namespace);
                out.put_varint(entries.len() as u64);
                for (k, v) in entries {
                    put_bytes(out, k);
                    put_bytes(out, v);
                }
            }
        }
    }

    /// Read what [`Kv::encode`] wrote; sizes are checked against the bytes left and the
    /// budget before anything is kept.
    pub fn decode(r: &mut Reader<'_>) -> Result<Self> {
        let mut kv = Kv::default();
        let stores = r.varint_count(2)?;
        for _ in 0..stores {
            let name = String::from_utf8(read_bytes(r)?.to_vec())
                .map_err(|_| corrupt!("a kv store name is not UTF-8"))?;
            let mut store = Store::default();
            for _ in 0..r.varint_count(2)? {
                let (k, v) = (read_bytes(r)?.to_vec(), read_bytes(r)?.to_vec());
                kv.bytes += k.len() + v.len();
                store.simple.insert(k, v);
            }
            for _ in 0..r.varint_count(4)? {
                let scope = (
                    read_bytes(r)?.to_vec(),
                    read_bytes(r)?.to_vec(),
                    read_bytes(r)?.to_vec(),
                );
                let mut entries = BTreeMap::new();
                for _ in 0..r.varint_count(2)? {
                    let (k, v) = (read_bytes(r)?.to_vec(), read_bytes(r)?.to_vec());
                    kv.bytes += scope_bytes(&scope) + k.len() + v.len();
                    entries.insert(k, v);
                }
                store.complex.insert(scope, entries);
            }
            if kv.bytes > MAX_KV_BYTES {
                return Err(corrupt!(
                    "the checkpoint's kv state holds more than {} MiB",
                    MAX_KV_BYTES >> 20
                ));
            }
            kv.stores.insert(name, store);
        }
        Ok(kv)
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
    fn simple_and_complex_keys_round_trip_through_a_checkpoint() {
        let mut kv = Kv::default();
        kv.open("empty");
        kv.put_state("a", b"x", b"1").unwrap();
        kv.put_state("a", b"y", b"22").unwrap();
        kv.put("a", scope("g"), b"u1", b"v".to_vec()).unwrap();
        kv.merge("a", scope("g"), b"u1", b"w").unwrap();
        kv.merge("b", scope("h"), b"u2", b"z").unwrap();
        assert_eq!(kv.get("a", &scope("g"), b"u1"), Some(&b"vw"[..]));
        let mut bytes = Vec::new();
        kv.encode(&mut bytes);
        let back = Kv::decode(&mut Reader::new(&bytes, "kv")).unwrap();
        assert_eq!(back, kv);
        assert_eq!(
            back.bytes(),
            1 + 1 + 1 + 2 + (1 + 1 + 2 + 2 + 2) + (1 + 1 + 2 + 2 + 1)
        );
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
        assert_eq!(kv.bytes(), before - 2);
    }

    #[test]
    fn a_write_past_the_budget_is_refused_and_changes_nothing() {
        let mut kv = Kv::default();
        kv.put_state("s", b"k", &vec![0; MAX_KV_BYTES - 10])
            .unwrap();
        let err = kv.put_state("s", b"k2", &[0; 64]).unwrap_err();
        assert!(err.to_string().contains("limit of 64 MiB"), "{err}");
        assert_eq!(kv.get_state("s", b"k2"), None);
        // Replacing a value with a smaller one is always allowed.
        kv.put_state("s", b"k", b"small").unwrap();
        assert_eq!(kv.bytes(), 6);
    }

    #[test]
    fn a_corrupt_count_is_refused_before_allocating() {
        let mut bytes = Vec::new();
        bytes.put_varint(u64::MAX);
        let err = Kv::decode(&mut Reader::new(&bytes, "kv")).unwrap_err();
        assert!(format!("{err:#}").contains("count"), "{err:#}");
    }
}
