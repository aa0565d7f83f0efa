//! The kv state in checkpoints: sorted runs, each checkpoint writing only what changed.
//!
//! A checkpoint's kv state is a *chain* of runs, applied oldest first: a whole run (every
//! entry of the state when it was written) and delta runs (each key changed since the
//! run before it, with its new value or a tombstone). A run is sorted by key (store,
//! then existence, simple keys, complex keys), so it is also what a merge of runs
//! produces. The committer puts each new run into the checkpoint's pack as frames and
//! the manifest names the chain (docs/FORMAT.md, "Kv runs").
//!
//! The chain stays short and proportional to the live data, with no I/O here: the guest's
//! side keeps, per run of the chain, its level and the keys it holds (not the values).
//! - each checkpoint with changes appends a delta run of level 0;
//! - two runs of the same level at the end of the chain merge into one of the next level,
//!   written from the current values of their keys (a binary counter: at most about
//!   log2(checkpoints) runs, and a key is rewritten log2 times at most);
//! - when the chain's bytes pass twice what a whole run would take now (plus
//!   `SLACK_BYTES`), or its runs pass `MAX_RUNS`, the next run is written whole and the
//!   chain restarts from it.
//!
//! A capture thus hands over an update, "keep the first `keep` runs of the last chain,
//! then these runs", and a restore applies the runs the manifest names in order.

use std::collections::BTreeSet;

use anyhow::Result;

use super::kv::{
    Changes, EntryKey, KIND_COMPLEX_DELETE, KIND_COMPLEX_PUT, KIND_OPENED, KIND_SIMPLE_DELETE,
    KIND_SIMPLE_PUT, KeyRef, Kv, MAX_KV_BYTES, Scope, encode_entry, read_bytes,
};
use crate::codec::{Put, Reader};
use crate::error::corrupt;

/// The first byte of every run: its format version.
const RUN_VERSION: u8 = 1;
/// The level of a whole run: never merged into.
const WHOLE_LEVEL: u8 = u8::MAX;
/// A chain may outgrow twice the live bytes by this much before it is rewritten whole
/// (a small state is cheaper to rewrite than to track).
const SLACK_BYTES: u64 = 64 << 10;
/// At most this many runs in a chain (with the binary counter, about 2^MAX_RUNS deltas).
pub const MAX_RUNS: usize = 24;
/// The most bytes a chain's runs take together: a writer rewrites a chain whole before it
/// passes twice the state (at most `MAX_KV_BYTES`) plus `SLACK_BYTES`. What a manifest
/// may name, so what a restore may have to read and hold.
pub const MAX_CHAIN_BYTES: u64 = 2 * MAX_KV_BYTES as u64 + SLACK_BYTES;

/// What one capture changes in the chain: keep its first `keep` runs, then append `runs`
/// (encoded, oldest first).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvUpdate {
    pub keep: usize,
    pub runs: Vec<Vec<u8>>,
}

impl KvUpdate {
    /// `later`, taken right after this one, folded in: the chain after both.
    pub fn then(self, later: KvUpdate) -> KvUpdate {
        if later.keep <= self.keep {
            return later;
        }
        // `later` keeps all the runs this one kept, and some of those it added.
        let mut runs = self.runs;
        runs.truncate(later.keep - self.keep);
        runs.extend(later.runs);
        KvUpdate {
            keep: self.keep,
            runs,
        }
    }
}

/// One run of the chain, as the guest's side remembers it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct RunInfo {
    level: u8,
    bytes: u64,
    /// The keys the run holds (empty for a whole run, which never merges).
    keys: BTreeSet<KeyRef>,
}

/// The chain of the last capture (see the module docs).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KvLog {
    runs: Vec<RunInfo>,
}

impl KvLog {
    /// Bytes of all the chain's runs.
    pub fn bytes(&self) -> u64 {
        self.runs.iter().map(|r| r.bytes).sum()
    }

    /// The update for a checkpoint of `kv` now: `None` when nothing changed since the
    /// last one.
    pub fn capture(&mut self, kv: &mut Kv) -> Option<KvUpdate> {
        let mut keys = match kv.take_changed() {
            Changes::Keys(keys) if keys.is_empty() => return None,
            Changes::Keys(keys) => keys,
            Changes::All => return Some(self.restart_whole(kv)),
        };
        if self.runs.is_empty() {
            // A chain starts with a whole run.
            return Some(self.restart_whole(kv));
        }
        let mut level = 0;
        let mut keep = self.runs.len();
        // Merge the new run into the chain's tail while the levels match.
        while let Some(last) = self.runs.last()
            && last.level == level
        {
            let last = self.runs.pop().expect("just seen");
            keys.extend(last.keys);
            level += 1;
            keep = self.runs.len();
        }
        let run = encode_keys(kv, level, &keys);
        let chain_bytes = self.bytes() + run.len() as u64;
        let too_long = self.runs.len() + 1 > MAX_RUNS;
        if too_long || chain_bytes > 2 * kv.bytes() as u64 + SLACK_BYTES {
            return Some(self.restart_whole(kv));
        }
        self.runs.push(RunInfo {
            level,
            bytes: run.len() as u64,
            keys,
        });
        Some(KvUpdate {
            keep,
            runs: vec![run],
        })
    }

    /// Restart the chain from a whole run of `kv`.
    fn restart_whole(&mut self, kv: &Kv) -> KvUpdate {
        let whole = encode_whole(kv);
        self.runs = vec![RunInfo {
            level: WHOLE_LEVEL,
            bytes: whole.len() as u64,
            keys: BTreeSet::new(),
        }];
        KvUpdate {
            keep: 0,
            runs: vec![whole],
        }
    }

    /// The state and the log a checkpoint's chain of `runs` rebuilds (checked against
    /// the budget as it is read).
    pub fn restore<'a>(runs: impl IntoIterator<Item = &'a [u8]>) -> Result<(Kv, KvLog)> {
        let mut kv = Kv::default();
        let mut log = KvLog::default();
        for (index, run) in runs.into_iter().enumerate() {
            if index >= MAX_RUNS {
                return Err(corrupt!(
                    "the checkpoint's kv chain has more than {MAX_RUNS} runs"
                ));
            }
            // A run lists keys in order, not in the order the guest wrote them: within
            // one, the state may pass the budget for a while. After it, it may not.
            kv.allow_run(Some(run.len()));
            let (level, keys) = apply_run(&mut kv, run, index)?;
            kv.allow_run(None);
            if kv.bytes() > MAX_KV_BYTES {
                return Err(corrupt!(
                    "kv run {index} of the checkpoint is corrupt: it leaves {} bytes, more than the limit of {} MiB",
                    kv.bytes(),
                    MAX_KV_BYTES >> 20
                ));
            }
            // Deltas come in strictly falling levels (the binary counter's digits).
            if let Some(previous) = log.runs.last()
                && level >= previous.level
            {
                return Err(corrupt!(
                    "kv run {index} of the checkpoint is corrupt: level {level} after level {}",
                    previous.level
                ));
            }
            log.runs.push(RunInfo {
                level,
                bytes: run.len() as u64,
                keys: if level == WHOLE_LEVEL {
                    BTreeSet::new()
                } else {
                    keys
                },
            });
        }
        kv.take_changed();
        Ok((kv, log))
    }
}

/// A delta run of `level`: each of `keys` with its current value, or a tombstone.
fn encode_keys(kv: &Kv, level: u8, keys: &BTreeSet<KeyRef>) -> Vec<u8> {
    let mut out = vec![RUN_VERSION, level];
    out.put_varint(keys.len() as u64);
    for key in keys {
        encode_entry(&mut out, key, kv.value_of(key));
    }
    out
}

/// A whole run: every entry of `kv`.
fn encode_whole(kv: &Kv) -> Vec<u8> {
    let mut entries = 0u64;
    let mut body = Vec::with_capacity(kv.bytes());
    for (name, store) in kv.stores() {
        let mut entry = |key: EntryKey, value: &[u8]| {
            let key = KeyRef {
                store: name.clone(),
                key,
            };
            encode_entry(&mut body, &key, Some(value));
            entries += 1;
        };
        entry(EntryKey::Opened, &[]);
        for (k, v) in &store.simple {
            entry(EntryKey::Simple(k.clone()), v);
        }
        for (scope, values) in &store.complex {
            for (k, v) in values {
                entry(EntryKey::Complex(scope.clone(), k.clone()), v);
            }
        }
    }
    let mut out = vec![RUN_VERSION, WHOLE_LEVEL];
    out.put_varint(entries);
    out.extend_from_slice(&body);
    out
}

/// Apply run number `index` of a chain to `kv`; returns its level and keys.
fn apply_run(kv: &mut Kv, run: &[u8], index: usize) -> Result<(u8, BTreeSet<KeyRef>)> {
    let what = format!("kv run {index} of the checkpoint");
    let mut r = Reader::new(run, &what);
    let version = r.u8()?;
    if version != RUN_VERSION {
        return Err(corrupt!(
            "{what} has format version {version}, not {RUN_VERSION}"
        ));
    }
    let level = r.u8()?;
    if level != WHOLE_LEVEL && usize::from(level) >= MAX_RUNS {
        return Err(corrupt!("{what} is corrupt: level {level}"));
    }
    if (level == WHOLE_LEVEL) != (index == 0) {
        return Err(corrupt!(
            "{what} is corrupt: a chain starts with a whole run, and has only one"
        ));
    }
    let mut keys = BTreeSet::new();
    // Each entry: a kind and a store name's length at least.
    for _ in 0..r.varint_count(2)? {
        let kind = r.u8()?;
        let store = String::from_utf8(read_bytes(&mut r)?.to_vec())
            .map_err(|_| corrupt!("{what} is corrupt: a store name is not UTF-8"))?;
        let over = |e: super::kv::OverBudget| corrupt!("{what} is corrupt: {e}");
        let key = match kind {
            KIND_OPENED => {
                kv.open(&store).map_err(over)?;
                EntryKey::Opened
            }
            KIND_SIMPLE_PUT | KIND_SIMPLE_DELETE => {
                let k = read_bytes(&mut r)?;
                if kind == KIND_SIMPLE_PUT {
                    kv.put_state(&store, k, read_bytes(&mut r)?).map_err(over)?;
                } else {
                    kv.delete_state(&store, k);
                }
                EntryKey::Simple(k.to_vec())
            }
            KIND_COMPLEX_PUT | KIND_COMPLEX_DELETE => {
                let scope: Scope = (
                    read_bytes(&mut r)?.to_vec(),
                    read_bytes(&mut r)?.to_vec(),
                    read_bytes(&mut r)?.to_vec(),
                );
                let user_key = read_bytes(&mut r)?;
                if kind == KIND_COMPLEX_PUT {
                    let value = read_bytes(&mut r)?.to_vec();
                    kv.put(&store, scope.clone(), user_key, value)
                        .map_err(over)?;
                } else {
                    kv.delete(&store, &scope, user_key);
                }
                EntryKey::Complex(scope, user_key.to_vec())
            }
            other => return Err(corrupt!("{what} is corrupt: entry kind {other}")),
        };
        if level != WHOLE_LEVEL {
            keys.insert(KeyRef { store, key });
        }
    }
    r.finish()?;
    Ok((level, keys))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The chain a sequence of updates leaves, as the committer keeps it.
    fn fold(chain: &mut Vec<Vec<u8>>, update: KvUpdate) {
        assert!(update.keep <= chain.len());
        chain.truncate(update.keep);
        chain.extend(update.runs);
    }

    #[derive(Clone, Debug)]
    enum Op {
        Put(u8, u8, u8),
        Delete(u8, u8),
        Complex(u8, u8, u8),
        DeletePrefix(u8),
        Open(u8),
        Checkpoint,
        Coalesce,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0..3u8, 0..40u8, any::<u8>()).prop_map(|(s, k, v)| Op::Put(s, k, v)),
            2 => (0..3u8, 0..40u8).prop_map(|(s, k)| Op::Delete(s, k)),
            2 => (0..3u8, 0..20u8, any::<u8>()).prop_map(|(s, k, v)| Op::Complex(s, k, v)),
            1 => (0..3u8).prop_map(Op::DeletePrefix),
            1 => (0..5u8).prop_map(Op::Open),
            2 => Just(Op::Checkpoint),
            1 => Just(Op::Coalesce),
        ]
    }

    fn scope() -> Scope {
        (b"g".to_vec(), b"k".to_vec(), b"ns".to_vec())
    }

    proptest! {
        /// Whatever the writes and however captures are merged before commit, the chain
        /// the committer keeps rebuilds the state exactly, with the same digest, and
        /// stays short and proportional to the live bytes.
        #[test]
        fn a_chain_of_runs_rebuilds_the_state(ops in proptest::collection::vec(op(), 1..400)) {
            let mut kv = Kv::default();
            let mut log = KvLog::default();
            let mut chain: Vec<Vec<u8>> = Vec::new();
            let mut pending: Option<KvUpdate> = None;
            let mut checkpoints = 0;
            for op in ops {
                match op {
                    Op::Put(s, k, v) => kv.put_state(&format!("s{s}"), &[k], &vec![v; k as usize]).unwrap(),
                    Op::Delete(s, k) => kv.delete_state(&format!("s{s}"), &[k]),
                    Op::Complex(s, k, v) => kv.merge(&format!("s{s}"), scope(), &[k], &[v]).unwrap(),
                    Op::DeletePrefix(s) => kv.delete_prefix(&format!("s{s}"), &scope(), &[]),
                    Op::Open(s) => kv.open(&format!("s{s}")).unwrap(),
                    Op::Checkpoint | Op::Coalesce => {
                        checkpoints += 1;
                        let update = log.capture(&mut kv);
                        pending = match (pending.take(), update) {
                            (Some(a), Some(b)) => Some(a.then(b)),
                            (a, b) => a.or(b),
                        };
                        if matches!(op, Op::Checkpoint) {
                            if let Some(update) = pending.take() {
                                fold(&mut chain, update);
                            }
                            let (back, back_log) =
                                KvLog::restore(chain.iter().map(Vec::as_slice)).unwrap();
                            prop_assert_eq!(&back, &kv);
                            prop_assert_eq!(back.digest(), kv.digest());
                            prop_assert_eq!(&back_log, &log);
                            prop_assert!(chain.len() <= MAX_RUNS);
                            let bytes: u64 = chain.iter().map(|r| r.len() as u64).sum();
                            prop_assert!(
                                bytes <= 2 * kv.bytes() as u64 + SLACK_BYTES + 64,
                                "{} bytes of runs for {} live after {} checkpoints",
                                bytes, kv.bytes(), checkpoints
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn a_checkpoint_with_few_changes_writes_a_small_run() {
        let mut kv = Kv::default();
        for k in 0..10_000u32 {
            kv.put_state("s", &k.to_le_bytes(), &[7; 100]).unwrap();
        }
        let mut log = KvLog::default();
        let first = log.capture(&mut kv).unwrap();
        assert_eq!(first.keep, 0);
        assert!(first.runs[0].len() > 10_000 * 100);
        assert_eq!(
            log.capture(&mut kv),
            None,
            "nothing changed, nothing written"
        );
        kv.put_state("s", &5u32.to_le_bytes(), &[8; 100]).unwrap();
        let second = log.capture(&mut kv).unwrap();
        assert_eq!(second.keep, 1);
        assert!(second.runs[0].len() < 200, "{}", second.runs[0].len());
    }

    #[test]
    fn runs_of_one_level_merge_and_a_long_chain_is_rewritten_whole() {
        let mut kv = Kv::default();
        kv.put_state("s", b"base", &[0; 1 << 20]).unwrap();
        let mut log = KvLog::default();
        let mut chain = Vec::new();
        fold(&mut chain, log.capture(&mut kv).unwrap());
        for i in 0..7u32 {
            kv.put_state("s", &i.to_le_bytes(), b"v").unwrap();
            fold(&mut chain, log.capture(&mut kv).unwrap());
        }
        // Seven deltas after the whole run: levels 2, 1, 0 (binary 111).
        assert_eq!(chain.len(), 4);
        assert_eq!(
            log.runs.iter().map(|r| r.level).collect::<Vec<_>>(),
            [255, 2, 1, 0]
        );
        // Replacing the big value twice over makes the chain more than twice the state.
        kv.put_state("s", b"base", &[1; 1 << 20]).unwrap();
        fold(&mut chain, log.capture(&mut kv).unwrap());
        kv.put_state("s", b"base", &[2; 1 << 20]).unwrap();
        let update = log.capture(&mut kv).unwrap();
        assert_eq!(update.keep, 0, "rewritten whole");
        fold(&mut chain, update);
        assert_eq!(chain.len(), 1);
    }

    /// A run lists keys in order, not in the order the guest wrote them: a state the
    /// guest kept within budget must restore even if the run passes it halfway.
    #[test]
    fn a_state_within_budget_restores_whatever_order_its_run_lists_keys_in() {
        let mut kv = Kv::default();
        let mut log = KvLog::default();
        let mut chain = Vec::new();
        let big = vec![1u8; 40 << 20];
        kv.put_state("s", b"b", &big).unwrap();
        fold(&mut chain, log.capture(&mut kv).unwrap());
        kv.delete_state("s", b"b");
        kv.put_state("s", b"a", &big).unwrap();
        fold(&mut chain, log.capture(&mut kv).unwrap());
        assert_eq!(chain.len(), 2, "a delta that puts a before it deletes b");
        let (back, _) = KvLog::restore(chain.iter().map(Vec::as_slice)).unwrap();
        assert_eq!(back, kv);
    }

    #[test]
    fn opening_stores_counts_against_the_budget() {
        let mut kv = Kv::default();
        let name = "n".repeat(1 << 20);
        let mut opened = 0;
        let err = loop {
            match kv.open(&format!("{opened}{name}")) {
                Ok(()) => opened += 1,
                Err(err) => break err,
            }
        };
        // Each store takes its name and a little framing: one fewer than 64 MiB of names.
        assert_eq!(opened, (MAX_KV_BYTES >> 20) - 1);
        assert!(err.to_string().contains("limit of 64 MiB"), "{err}");
    }

    #[test]
    fn a_chain_whose_levels_do_not_fall_is_refused() {
        let mut kv = Kv::default();
        kv.put_state("s", b"k", b"v").unwrap();
        let whole = encode_whole(&kv);
        let keys: BTreeSet<KeyRef> = [KeyRef {
            store: "s".into(),
            key: EntryKey::Simple(b"k".to_vec()),
        }]
        .into();
        let (one, zero) = (encode_keys(&kv, 1, &keys), encode_keys(&kv, 0, &keys));
        KvLog::restore([&whole[..], &one, &zero]).unwrap();
        for chain in [[&whole[..], &zero, &zero], [&whole[..], &zero, &one]] {
            let err = KvLog::restore(chain).unwrap_err();
            assert!(format!("{err:#}").contains("after level"), "{err:#}");
        }
        let deep = encode_keys(&kv, MAX_RUNS as u8, &keys);
        assert!(KvLog::restore([&whole[..], &deep]).is_err());
    }

    #[test]
    fn a_damaged_run_is_refused_with_its_cause() {
        let mut kv = Kv::default();
        kv.put_state("s", b"k", b"v").unwrap();
        let whole = encode_whole(&kv);
        let mut bad_kind = whole.clone();
        bad_kind[3] = 9;
        let mut huge_count = vec![RUN_VERSION, WHOLE_LEVEL];
        huge_count.put_varint(u64::MAX);
        let delta_first = encode_keys(&kv, 0, &BTreeSet::new());
        for (run, cause) in [
            (&bad_kind, "entry kind 9"),
            (&huge_count, "a count of"),
            (&whole[..whole.len() - 1].to_vec(), "does not fit"),
            (&delta_first, "starts with a whole run"),
        ] {
            let err = KvLog::restore([run.as_slice()]).unwrap_err();
            assert!(format!("{err:#}").contains(cause), "{err:#}");
        }
    }
}
