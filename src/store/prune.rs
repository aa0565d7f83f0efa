//! Retention: keep the newest K checkpoints and delete what none of them needs.
//!
//! Safe against crashes and against a rival writer by construction:
//! - it runs only after a manifest commit succeeded, and never deletes the newest `retain`
//!   manifests or any pack one of them names;
//! - old manifests go first (oldest first), packs after: at every moment each remaining
//!   manifest still has all its packs, so a crash mid-prune leaves a restorable store
//!   (what it left behind is deleted by the next prune);
//! - packs of generations newer than the newest committed one are never touched: they may
//!   belong to a checkpoint in flight. A rival can only commit generation N+1 if it holds
//!   checkpoint N, whose packs are all kept;
//! - a rival that fell behind may create a generation this prune deleted, but
//!   `commit_manifest` then finds a newer one and fences it before it prunes anything.

use std::collections::{BTreeMap, HashSet};

use anyhow::{Context, Result};
use object_store::path::Path;

use super::{CheckpointStore, MANIFESTS, PACKS, manifest_path, pack_path};

/// Staging files (`NAME#N`, what `object_store` writes before it renames an object into
/// place) older than this were left by a write that was interrupted: a kill, a crash, a
/// full disk. Younger ones may belong to a write in progress, by this writer or another.
pub const STAGING_AGE: std::time::Duration = std::time::Duration::from_secs(600);

/// A staging file left in a local store's `manifests/` or `packs/`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StagingFile {
    pub path: std::path::PathBuf,
    pub bytes: u64,
    pub age: std::time::Duration,
}

/// What a prune deleted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PruneReport {
    pub manifests_deleted: usize,
    pub packs_deleted: usize,
    /// Staging files of interrupted writes (local stores only).
    pub staging_deleted: usize,
    pub bytes_freed: u64,
    /// Manifests kept, newest last.
    pub retained: Vec<u64>,
}

/// The packs of manifests a writer committed itself, by generation: (name, size).
pub type KnownPacks = BTreeMap<u64, Vec<(String, u64)>>;

/// Manifests as listed: (generation, size), ascending.
type Listed = [(u64, u64)];

/// The manifests up to `newest`, split into those to delete (all but the newest `retain`,
/// at least 1) and those to keep.
fn split_retained(listed: &Listed, newest: u64, retain: usize) -> (&Listed, &Listed) {
    let upto = listed.partition_point(|(g, _)| *g <= newest);
    let listed = &listed[..upto];
    listed.split_at(listed.len().saturating_sub(retain.max(1)))
}

/// The generation a pack was written for, from its name (`<generation>-<writer>.pack`).
pub fn pack_generation(name: &str) -> Option<u64> {
    let (generation, _) = name.split_once('-')?;
    super::parse_generation(generation)
}

impl CheckpointStore {
    #[doc(hidden)] // the engine's, public for the `internals` feature
    /// Keep the newest `retain` (at least 1) checkpoints up to `newest`; delete older
    /// manifests, every pack no kept manifest names, and old staging files (`gc`).
    pub fn prune(&self, newest: u64, retain: usize) -> Result<PruneReport> {
        let manifests = self.manifests()?;
        self.prune_full(newest, retain, &manifests, &KnownPacks::new())
    }

    #[doc(hidden)] // the engine's, public for the `internals` feature
    /// Retention right after this writer committed `newest`: `listed` is the store's
    /// manifests as the commit's fencing check listed them, and `known` the packs of the
    /// manifests this writer committed. When every manifest to delete or keep is one of
    /// those, the packs to delete follow from them with no listing at all: a pack becomes
    /// garbage only when the last manifest naming it goes. Otherwise (manifests of another
    /// process, or `full`, which the writer asks for now and then to collect what failed
    /// checkpoints left) it lists the packs, as `gc` does.
    pub fn prune_after_commit(
        &self,
        newest: u64,
        retain: usize,
        listed: &[(u64, u64)],
        known: &KnownPacks,
        full: bool,
    ) -> Result<PruneReport> {
        let (old, kept) = split_retained(listed, newest, retain);
        let all_known = old.iter().chain(kept).all(|(g, _)| known.contains_key(g));
        if full || !all_known {
            return self.prune_full(newest, retain, listed, known);
        }
        let live: HashSet<&str> = kept
            .iter()
            .flat_map(|(g, _)| &known[g])
            .map(|(name, _)| name.as_str())
            .collect();
        let doomed: BTreeMap<&str, u64> = old
            .iter()
            .flat_map(|(g, _)| &known[g])
            .filter(|(name, _)| !live.contains(name.as_str()))
            .filter(|(name, _)| pack_generation(name).is_some_and(|g| g <= newest))
            .map(|(name, bytes)| (name.as_str(), *bytes))
            .collect();
        let mut report = PruneReport {
            retained: kept.iter().map(|(g, _)| *g).collect(),
            ..Default::default()
        };
        self.delete_manifests(old, &mut report)?;
        self.delete_all(doomed.keys().map(|name| pack_path(name)).collect())?;
        report.packs_deleted = doomed.len();
        report.bytes_freed += doomed.values().sum::<u64>();
        tracing::debug!(?report, "pruned");
        Ok(report)
    }

    /// Retention from listings: the manifests given, the kept ones' packs (from `known` or
    /// read), the packs listed, and the staging files.
    fn prune_full(
        &self,
        newest: u64,
        retain: usize,
        listed: &[(u64, u64)],
        known: &KnownPacks,
    ) -> Result<PruneReport> {
        let (old, kept) = split_retained(listed, newest, retain);

        // Which packs the kept manifests need. If the store cannot be read, delete nothing:
        // never on a guess. A kept manifest that is corrupt cannot be restored from, so
        // what only it would name needs no keeping.
        let mut live: HashSet<String> = HashSet::new();
        for (generation, _) in kept {
            if let Some(packs) = known.get(generation) {
                live.extend(packs.iter().map(|(name, _)| name.clone()));
                continue;
            }
            match self.read_manifest(*generation) {
                Ok(manifest) => live.extend(manifest.packs.iter().map(|p| p.name())),
                Err(err) if crate::error::kind_of(&err) == crate::ErrorKind::StoreUnavailable => {
                    return Err(err.context("prune: nothing deleted"));
                }
                Err(err) => {
                    tracing::warn!("prune: kept checkpoint {generation} is unreadable: {err:#}")
                }
            }
        }

        let mut report = PruneReport {
            retained: kept.iter().map(|(g, _)| *g).collect(),
            ..Default::default()
        };
        self.delete_manifests(old, &mut report)?;
        let mut doomed = Vec::new();
        for (name, size) in self.list(PACKS)? {
            let Some(generation) = pack_generation(&name) else {
                continue;
            };
            if generation <= newest && !live.contains(&name) {
                doomed.push(pack_path(&name));
                report.packs_deleted += 1;
                report.bytes_freed += size;
            }
        }
        self.delete_all(doomed)?;
        for staged in self.staging_files()? {
            if staged.age >= STAGING_AGE {
                match std::fs::remove_file(&staged.path) {
                    Ok(()) => {
                        report.staging_deleted += 1;
                        report.bytes_freed += staged.bytes;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => {
                        return Err(anyhow::Error::from(e).context(format!(
                            "prune: cannot delete staging file {}",
                            staged.path.display()
                        )));
                    }
                }
            }
        }
        tracing::debug!(?report, "pruned (full)");
        Ok(report)
    }

    /// Delete the `old` manifests, oldest first, before any pack: at every moment each
    /// remaining manifest still has all its packs.
    fn delete_manifests(&self, old: &[(u64, u64)], report: &mut PruneReport) -> Result<()> {
        self.delete_all(old.iter().map(|(g, _)| manifest_path(*g)).collect())?;
        report.manifests_deleted += old.len();
        report.bytes_freed += old.iter().map(|(_, size)| size).sum::<u64>();
        if !old.is_empty() {
            crate::crash::point("prune-manifests-deleted");
        }
        Ok(())
    }

    /// Delete objects, in order, as few requests as the store allows (S3 takes up to a
    /// thousand in one); ones already gone are fine.
    fn delete_all(&self, paths: Vec<Path>) -> Result<()> {
        use futures::StreamExt;
        if paths.is_empty() {
            return Ok(());
        }
        let results: Vec<_> = self.runtime.block_on(
            self.objects
                .delete_stream(futures::stream::iter(paths.into_iter().map(Ok)).boxed())
                .collect(),
        );
        for result in results {
            match result {
                Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => {
                    return Err(anyhow::Error::from(e)
                        .context(format!("prune: cannot delete from store {}", self.label)));
                }
            }
        }
        Ok(())
    }

    #[doc(hidden)] // the engine's, public for the `internals` feature
    /// The staging files in a local store's `manifests/` and `packs/` (none for S3,
    /// whose puts are atomic, or memory). Links and directories are not staging files.
    pub fn staging_files(&self) -> Result<Vec<StagingFile>> {
        let Some(root) = &self.local_root else {
            return Ok(Vec::new());
        };
        let mut found = Vec::new();
        for dir in [MANIFESTS, PACKS] {
            let dir = root.join(dir);
            let entries = match std::fs::read_dir(&dir) {
                Ok(entries) => entries,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => {
                    return Err(
                        anyhow::Error::from(e).context(format!("cannot list {}", dir.display()))
                    );
                }
            };
            for entry in entries {
                let entry = entry.with_context(|| format!("cannot list {}", dir.display()))?;
                let name = entry.file_name();
                let is_staging =
                    name.to_str()
                        .and_then(|n| n.rsplit_once('#'))
                        .is_some_and(|(_, suffix)| {
                            !suffix.is_empty() && suffix.bytes().all(|b| b.is_ascii_digit())
                        });
                // `DirEntry::metadata` does not follow links.
                let Ok(metadata) = entry.metadata() else {
                    continue;
                };
                if !is_staging || !metadata.is_file() {
                    continue;
                }
                let age = metadata
                    .modified()
                    .ok()
                    .and_then(|m| m.elapsed().ok())
                    .unwrap_or_default();
                found.push(StagingFile {
                    path: entry.path(),
                    bytes: metadata.len(),
                    age,
                });
            }
        }
        found.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(found)
    }

    /// Total size of everything under `manifests/` and `packs/`, staging files included.
    pub fn total_bytes(&self) -> crate::Result<u64> {
        let staging: u64 = self.staging_files()?.iter().map(|s| s.bytes).sum();
        Ok(self
            .list(MANIFESTS)?
            .iter()
            .chain(&self.list(PACKS)?)
            .map(|(_, size)| size)
            .sum::<u64>()
            + staging)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_generations_come_from_names() {
        assert_eq!(
            pack_generation("00000000000000000042-0123abcd.pack"),
            Some(42)
        );
        assert_eq!(pack_generation("42-ab.pack"), None);
        assert_eq!(pack_generation("garbage"), None);
    }

    #[test]
    fn writers_whose_coalesced_commits_skip_generations_fence_each_other() {
        use crate::error::Fenced;
        let store = CheckpointStore::open("memory://").unwrap();
        let manifest = |generation: u64, writer: u8| {
            let mut manifest = crate::store::manifest::tests::sample();
            manifest.generation = generation;
            manifest.writer_id = [writer; 16];
            manifest.packs.clear();
            manifest
        };
        store.commit_manifest(&manifest(10, 1), 9).unwrap();
        // Both restored 10. Writer 2 commits 11 first; writer 1's captures 11 to 13
        // merged into one commit, 13, which no one holds: the listing still fences it.
        store.commit_manifest(&manifest(11, 2), 10).unwrap();
        let err = store.commit_manifest(&manifest(13, 1), 10).unwrap_err();
        assert!(err.downcast_ref::<Fenced>().is_some(), "{err:#}");
        // The other order: writer 1's 15 first, then writer 2's 12 (after its 11).
        let store = CheckpointStore::open("memory://").unwrap();
        store.commit_manifest(&manifest(15, 1), 10).unwrap();
        let err = store.commit_manifest(&manifest(12, 2), 11).unwrap_err();
        assert!(err.downcast_ref::<Fenced>().is_some(), "{err:#}");
        // A writer's own gaps are no rival: 18 after its own 15 (12 is older).
        store.commit_manifest(&manifest(18, 1), 15).unwrap();
    }

    #[test]
    fn a_writer_that_fell_behind_cannot_commit_a_generation_a_prune_deleted() {
        use crate::error::Fenced;
        use crate::store::manifest::PackRef;
        let store = CheckpointStore::open("memory://").unwrap();
        let commit = |generation: u64, writer: u8| {
            let mut manifest = crate::store::manifest::tests::sample();
            manifest.generation = generation;
            manifest.writer_id = [writer; 16];
            manifest.packs = vec![PackRef {
                generation,
                writer_id: [writer; 16],
                frames: 1,
                bytes: 1,
            }];
            let pack = manifest.packs[0].name();
            store
                .put_pack(&pack, bytes::Bytes::from_static(b"p"))
                .unwrap();
            store.commit_manifest(&manifest, generation - 1)
        };
        let pack_of = |generation: u64, writer: u8| {
            PackRef {
                generation,
                writer_id: [writer; 16],
                frames: 1,
                bytes: 1,
            }
            .name()
        };
        let mut known = KnownPacks::new();
        for generation in 1..=6 {
            let committed = commit(generation, 1).unwrap();
            known.insert(generation, vec![(pack_of(generation, 1), 1)]);
            store
                .prune_after_commit(generation, 3, &committed.manifests, &known, false)
                .unwrap();
        }
        assert_eq!(store.generations().unwrap(), vec![4, 5, 6]);
        // Writer 2 restored checkpoint 1 long ago; generation 2 is free again, but writer
        // 1 went past it: writer 2 is fenced, and writer 1's checkpoints stay whole.
        let err = commit(2, 2).unwrap_err();
        assert!(err.downcast_ref::<Fenced>().is_some(), "{err:#}");
        let packs: Vec<String> = store
            .list(PACKS)
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        for generation in 4..=6 {
            assert!(packs.contains(&pack_of(generation, 1)), "{packs:?}");
        }
        assert_eq!(store.generations().unwrap(), vec![2, 4, 5, 6]);
    }
}

#[cfg(test)]
mod incremental {
    use super::*;
    use crate::store::manifest::PackRef;

    fn pack(generation: u64, writer: u8) -> PackRef {
        PackRef {
            generation,
            writer_id: [writer; 16],
            frames: 1,
            bytes: 1,
        }
    }

    /// A store with commits 1..=n by writer 1, each naming a cold pack of generation 0 and
    /// its own, and a pack of generation 3 that writer 2's failed checkpoint left.
    fn committed(n: u64) -> (CheckpointStore, KnownPacks, Vec<(u64, u64)>) {
        let store = CheckpointStore::open("memory://").unwrap();
        let put = |p: &PackRef| {
            store
                .put_pack(&p.name(), bytes::Bytes::from_static(b"p"))
                .unwrap()
        };
        put(&pack(3, 2));
        put(&pack(0, 1));
        let mut known = KnownPacks::new();
        let mut listed = Vec::new();
        for g in 1..=n {
            let mut manifest = crate::store::manifest::tests::sample();
            manifest.generation = g;
            // The sample's frame counts, which its runs need.
            manifest.packs = vec![
                PackRef {
                    frames: 10,
                    ..pack(0, 1)
                },
                PackRef {
                    frames: 3,
                    ..pack(g, 1)
                },
            ];
            put(&pack(g, 1));
            listed = store.commit_manifest(&manifest, g - 1).unwrap().manifests;
            known.insert(g, manifest.packs.iter().map(|p| (p.name(), 1)).collect());
        }
        (store, known, listed)
    }

    fn packs(store: &CheckpointStore) -> Vec<(u64, u8)> {
        let mut packs: Vec<(u64, u8)> = store
            .list(PACKS)
            .unwrap()
            .iter()
            .filter_map(|(n, _)| {
                Some((pack_generation(n)?, if n.contains("-0202") { 2 } else { 1 }))
            })
            .collect();
        packs.sort();
        packs
    }

    #[test]
    fn known_packs_prune_without_listing_and_a_full_prune_takes_the_garbage_too() {
        let (store, known, listed) = committed(5);
        let report = store
            .prune_after_commit(5, 2, &listed, &known, false)
            .unwrap();
        assert_eq!(report.retained, vec![4, 5]);
        assert_eq!((report.manifests_deleted, report.packs_deleted), (3, 3));
        // The packs of 1..=3 went with their manifests; the cold pack 0 is still named by
        // 4 and 5; writer 2's garbage waits for a full prune, which lists the packs.
        assert_eq!(packs(&store), vec![(0, 1), (3, 2), (4, 1), (5, 1)]);
        store
            .prune_after_commit(5, 2, &listed, &known, true)
            .unwrap();
        assert_eq!(packs(&store), vec![(0, 1), (4, 1), (5, 1)]);

        // A manifest this writer does not know (another process's) forces the listing.
        let (store, mut known, listed) = committed(5);
        known.remove(&4);
        store
            .prune_after_commit(5, 2, &listed, &known, false)
            .unwrap();
        assert_eq!(packs(&store), vec![(0, 1), (4, 1), (5, 1)]);
    }
}
