//! Where a task starts: from nothing (a fresh instance, its one-time set-up run), or from
//! the newest usable checkpoint in the store (a fresh instance, memories and globals
//! restored). The streams are positioned by the caller, from what this returns.

use anyhow::{Context, Result};

use crate::error::ModuleChanged;
use crate::guest::{Guest, GuestInstance};
use crate::snapshot::{self, PageTable};
use crate::store::manifest::RunState;
use crate::store::{CheckpointStore, Manifest};

/// A guest ready to go on, and where its streams and numbering start.
pub(super) struct Start {
    pub instance: GuestInstance,
    /// The restored checkpoint's page table (empty on a fresh start): the base of the
    /// next checkpoint's deltas.
    pub table: PageTable,
    /// The restored pages' hashes, per memory (empty on a fresh start).
    pub hashes: Vec<Vec<u64>>,
    /// The checkpoint's input position and output marker (`None` on a fresh start).
    pub input_position: Option<Vec<u8>>,
    pub output_marker: Option<Vec<u8>>,
    pub random_seed: u64,
    /// The newest generation in the store: the next commit follows it, even when that
    /// one was unusable and an older one was restored (generations only go up).
    pub generation: u64,
    pub resumed_from: Option<u64>,
    pub run_state: RunState,
}

/// Restore the newest usable checkpoint of `store`, or start `guest` fresh with
/// `random_seed` if the store has none.
pub(super) fn start(guest: &Guest, store: &CheckpointStore, random_seed: u64) -> Result<Start> {
    let generations = store.generations().map_err(crate::Error::into_anyhow)?;
    let Some(&newest) = generations.last() else {
        let mut instance = guest.instantiate(random_seed, 0)?;
        instance.start_fresh()?;
        let memories = instance.memory_count();
        return Ok(Start {
            instance,
            table: PageTable::empty(memories),
            hashes: vec![Vec::new(); memories],
            input_position: None,
            output_marker: None,
            random_seed,
            generation: 0,
            resumed_from: None,
            run_state: if guest.is_program() {
                RunState::ProgramStart
            } else {
                RunState::Records
            },
        });
    };
    let (manifest, instance, restored) = restore_newest_usable(guest, store, &generations)?;
    Ok(Start {
        instance,
        table: restored.table,
        hashes: restored.hashes,
        input_position: Some(manifest.input_position),
        output_marker: Some(manifest.output_position),
        random_seed: manifest.random_seed,
        generation: newest,
        resumed_from: Some(manifest.generation),
        run_state: manifest.run_state,
    })
}

/// Restore the newest checkpoint that is usable. A corrupt or missing manifest or pack makes
/// a checkpoint unusable: say so and fall back to the one before (still exactly-once: the
/// output is cut back to that checkpoint's marker). A store that cannot be reached, or a
/// guest that is not the checkpoints' module, stops the run instead.
fn restore_newest_usable(
    guest: &Guest,
    store: &CheckpointStore,
    generations: &[u64],
) -> Result<(Manifest, GuestInstance, snapshot::Restored)> {
    let mut newest_error = None;
    for &generation in generations.iter().rev() {
        match restore(guest, store, generation) {
            Ok((manifest, instance, restored)) => {
                tracing::debug!(
                    generation,
                    input_offset = manifest.input_offset,
                    output_marker = manifest.output_marker,
                    pages = manifest.stored_pages(),
                    "restored"
                );
                if newest_error.is_some() {
                    tracing::warn!("resuming from older checkpoint {generation}");
                }
                return Ok((manifest, instance, restored));
            }
            // An older checkpoint cannot help when the store is out of reach, the module is
            // another, the guest itself fails (its start function, its memory limit), or
            // another writer owns the task.
            // By kind, which holds however the error was wrapped on its way.
            Err(err)
                if matches!(
                    crate::error::kind_of(&err),
                    crate::ErrorKind::StoreUnavailable
                        | crate::ErrorKind::ModuleChanged
                        | crate::ErrorKind::Guest
                        | crate::ErrorKind::Fenced
                ) =>
            {
                return Err(err);
            }
            Err(err) => {
                tracing::warn!("checkpoint {generation} is unusable: {err:#}");
                newest_error.get_or_insert(err);
            }
        }
    }
    let err = newest_error.expect("there was at least one generation");
    Err(err.context(format!(
        "none of the {} checkpoints in store {} is usable",
        generations.len(),
        store.label()
    )))
}

/// Restore checkpoint `generation` into a fresh instance of `guest`.
fn restore(
    guest: &Guest,
    store: &CheckpointStore,
    generation: u64,
) -> Result<(Manifest, GuestInstance, snapshot::Restored)> {
    let manifest = store.read_manifest(generation)?;
    if manifest.module_sha256 != guest.module_sha256() {
        return Err(ModuleChanged {
            generation,
            expected: crate::hex::encode(&manifest.module_sha256),
            actual: crate::hex::encode(&guest.module_sha256()),
        }
        .into());
    }
    let mut instance = guest.instantiate(manifest.random_seed, manifest.random_position)?;
    let restored = snapshot::restore(&mut instance, &manifest, store)
        .with_context(|| format!("cannot restore checkpoint {generation}"))?;
    // A component's handles go back after its memories: the replay touches neither.
    instance
        .restore_host_state(&manifest.host_state, &restored.kv_runs)
        .with_context(|| format!("cannot restore checkpoint {generation}"))?;
    instance.rewind_host_state(manifest.random_position);
    Ok((manifest, instance, restored))
}
