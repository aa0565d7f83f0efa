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

use std::collections::HashSet;

use anyhow::{Context, Result};
use object_store::ObjectStoreExt;
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

/// The generation a pack was written for, from its name (`<generation>-<writer>.pack`).
pub fn pack_generation(name: &str) -> Option<u64> {
    let (generation, _) = name.split_once('-')?;
    super::parse_generation(generation)
}

impl CheckpointStore {
    /// Keep the newest `retain` (at least 1) checkpoints up to `newest`; delete older
    /// manifests and every pack no kept manifest names.
    pub fn prune(&self, newest: u64, retain: usize) -> Result<PruneReport> {
        self.prune_with(newest, retain, &|_| None)
    }

    /// [`Self::prune`], where `known` may give the pack names of a kept manifest without
    /// reading it (the writer remembers what it committed).
    pub fn prune_with(
        &self,
        newest: u64,
        retain: usize,
        known: &dyn Fn(u64) -> Option<Vec<String>>,
    ) -> Result<PruneReport> {
        let retain = retain.max(1);
        let manifests: Vec<(u64, u64)> = self
            .list(MANIFESTS)?
            .into_iter()
            .filter_map(|(name, size)| Some((crate::store::parse_generation(&name)?, size)))
            .filter(|(generation, _)| *generation <= newest)
            .collect::<std::collections::BTreeMap<_, _>>()
            .into_iter()
            .collect();
        let split = manifests.len().saturating_sub(retain);
        let (old, kept) = manifests.split_at(split);

        // Which packs the kept manifests need. If the store cannot be read, delete nothing:
        // never on a guess. A kept manifest that is corrupt cannot be restored from, so
        // what only it would name needs no keeping.
        let mut live: HashSet<String> = HashSet::new();
        for (generation, _) in kept {
            if let Some(names) = known(*generation) {
                live.extend(names);
                continue;
            }
            match self.read_manifest(*generation) {
                Ok(manifest) => live.extend(manifest.packs.iter().map(|p| p.name())),
                Err(err) if err.is::<crate::error::StoreUnavailable>() => {
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
        for (generation, size) in old {
            self.delete(&manifest_path(*generation))?;
            report.manifests_deleted += 1;
            report.bytes_freed += size;
        }
        if !old.is_empty() {
            crate::crash::point("prune-manifests-deleted");
        }
        for (name, size) in self.list(PACKS)? {
            let Some(generation) = pack_generation(&name) else {
                continue;
            };
            if generation <= newest && !live.contains(&name) {
                self.delete(&pack_path(&name))?;
                report.packs_deleted += 1;
                report.bytes_freed += size;
            }
        }
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
        tracing::debug!(?report, "pruned");
        Ok(report)
    }

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

    /// Delete an object (already gone is fine).
    fn delete(&self, path: &Path) -> Result<()> {
        match self.runtime.block_on(self.objects.delete(path)) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(anyhow::Error::from(e).context(format!(
                "prune: cannot delete {path} in store {}",
                self.label
            ))),
        }
    }

    /// Total size of everything under `manifests/` and `packs/`, staging files included.
    pub fn total_bytes(&self) -> Result<u64> {
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
            store.commit_manifest(&manifest)
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
        for generation in 1..=6 {
            commit(generation, 1).unwrap();
            let known = |g: u64| Some(vec![pack_of(g, 1)]);
            store.prune_with(generation, 3, &known).unwrap();
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
