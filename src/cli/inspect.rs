//! `wasnap inspect`: what checkpoints a store holds, which packs each needs, and how much
//! of the store is live.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;

use anyhow::Result;

use crate::bench::human_bytes;
use crate::store::{CheckpointStore, MANIFESTS, PACKS};

pub fn inspect(url: &str) -> Result<()> {
    let store = CheckpointStore::open_existing(url)?;
    let mut out = String::new();
    // Not a property of the store but what a run here would do, first: the store's
    // summary stays the last line.
    writeln!(
        out,
        "dirty tracking on this machine: {}",
        crate::snapshot::DirtyTracking::Auto.describe()
    )?;
    let manifest_sizes: BTreeMap<String, u64> = store.list(MANIFESTS)?.into_iter().collect();
    let pack_sizes: BTreeMap<String, u64> = store.list(PACKS)?.into_iter().collect();
    let generations = store.generations()?;
    if generations.is_empty() {
        // A worker's store holds its tasks' stores, one per partition.
        let tasks = fleet_tasks(&store)?;
        if !tasks.is_empty() {
            write_fleet(&mut out, url, &tasks)?;
            return super::print_out(&out);
        }
        writeln!(out, "no checkpoints in {url}")?;
    } else {
        writeln!(
            out,
            "{:>10} {:>14} {:>14} {:>14} {:>7} {:>6} {:>5} {:>9} {:>11}",
            "generation",
            "input_offset",
            "flush_marker",
            "memory_bytes",
            "pages",
            "layers",
            "packs",
            "manifest",
            "restore_from"
        )?;
    }
    // Objects some readable checkpoint needs; the rest is garbage a prune will take.
    let mut live: HashSet<String> = HashSet::new();
    for generation in generations {
        let manifest_name = format!("{generation:020}");
        let manifest_bytes = manifest_sizes.get(&manifest_name).copied().unwrap_or(0);
        let m = match store.read_manifest(generation) {
            Ok(m) => m,
            Err(err) => {
                writeln!(out, "{generation:>10} unreadable: {err:#}")?;
                continue;
            }
        };
        live.insert(format!("{MANIFESTS}/{manifest_name}"));
        let live_frames = m.live_frames();
        let names: Vec<String> = m.packs.iter().map(|p| p.name()).collect();
        let restore_bytes: u64 = names.iter().filter_map(|n| pack_sizes.get(n)).sum();
        let layers = m.memories.iter().map(|m| m.layers.len()).max().unwrap_or(0);
        writeln!(
            out,
            "{:>10} {:>14} {:>14} {:>14} {:>7} {:>6} {:>5} {:>9} {:>11}",
            generation,
            m.input_offset,
            m.output_marker,
            m.memory_bytes(),
            m.stored_pages(),
            layers,
            m.packs.len(),
            manifest_bytes,
            human_bytes(restore_bytes as f64),
        )?;
        for ((pack, name), live_frames) in m.packs.iter().zip(&names).zip(live_frames) {
            let size = pack_sizes
                .get(name)
                .map_or("MISSING".to_string(), |s| human_bytes(*s as f64));
            writeln!(
                out,
                "{:>12}{name}  {live_frames}/{} frames used, {size}",
                "", pack.frames
            )?;
            live.insert(format!("{PACKS}/{name}"));
        }
        if !m.host_state.is_empty() {
            let state = crate::component::describe_host_state(&m.host_state)
                .unwrap_or_else(|err| format!("unreadable: {err:#}"));
            writeln!(out, "{:>12}component: {state}", "")?;
        }
        if !m.kv_runs.is_empty() {
            // The chain a restore applies: the whole run, then the deltas.
            let runs: Vec<String> = m
                .kv_runs
                .iter()
                .enumerate()
                .map(|(i, run)| {
                    let kind = if i == 0 { "whole" } else { "delta" };
                    format!(
                        "{kind} {} in {}",
                        human_bytes(run.bytes as f64),
                        names[run.pack as usize]
                    )
                })
                .collect();
            writeln!(out, "{:>12}kv runs: {}", "", runs.join(", "))?;
        }
    }
    // Left by interrupted writes (local stores): garbage, removed by a prune once old.
    let staging = store.staging_files()?;
    let staging_bytes: u64 = staging.iter().map(|s| s.bytes).sum();
    let total: u64 = manifest_sizes
        .values()
        .chain(pack_sizes.values())
        .sum::<u64>()
        + staging_bytes;
    let live_bytes: u64 = manifest_sizes
        .iter()
        .map(|(n, s)| (format!("{MANIFESTS}/{n}"), s))
        .chain(pack_sizes.iter().map(|(n, s)| (format!("{PACKS}/{n}"), s)))
        .filter(|(path, _)| live.contains(path))
        .map(|(_, s)| s)
        .sum();
    if !staging.is_empty() {
        writeln!(
            out,
            "staging files of interrupted writes: {} ({}); a prune deletes those older than {} s",
            staging.len(),
            human_bytes(staging_bytes as f64),
            crate::store::prune::STAGING_AGE.as_secs()
        )?;
    }
    writeln!(
        out,
        "store: {} manifests, {} packs, {} in all; live (needed by a checkpoint): {}; garbage: {}",
        manifest_sizes.len(),
        pack_sizes.len(),
        human_bytes(total as f64),
        human_bytes(live_bytes as f64),
        human_bytes(total.saturating_sub(live_bytes) as f64),
    )?;
    super::print_out(&out)
}

/// The task stores of a worker's store: `TOPIC/PARTITION/` holding manifests.
fn fleet_tasks(store: &CheckpointStore) -> Result<Vec<(String, CheckpointStore)>> {
    let mut tasks = Vec::new();
    for topic in store.subdirectories(None)? {
        if topic == MANIFESTS || topic == PACKS {
            continue;
        }
        let mut partitions: Vec<(i32, String)> = store
            .subdirectories(Some(&topic))?
            .into_iter()
            .filter_map(|p| Some((p.parse().ok()?, p)))
            .collect();
        partitions.sort();
        for (_, partition) in partitions {
            let name = format!("{topic}/{partition}");
            let task = store.within(&name);
            if !task.generations()?.is_empty() {
                tasks.push((name, task));
            }
        }
    }
    Ok(tasks)
}

/// One line per task of a worker's store: where it stands and what it costs.
fn write_fleet(out: &mut String, url: &str, tasks: &[(String, CheckpointStore)]) -> Result<()> {
    writeln!(
        out,
        "{} tasks in {url} (a worker's store: TOPIC/PARTITION each)",
        tasks.len()
    )?;
    writeln!(
        out,
        "{:<24} {:>10} {:>5} {:>13} {:>12} {:>12} {:>12} {:>14}",
        "task", "generation", "kept", "input_offset", "memory", "newest_pack", "store", "committed"
    )?;
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let mut total = 0;
    for (name, task) in tasks {
        let generations = task.generations()?;
        let newest = *generations.last().expect("tasks with a checkpoint only");
        let bytes = task.total_bytes()?;
        total += bytes;
        let line = match task.read_manifest(newest) {
            Ok(m) => {
                let newest_pack = m
                    .packs
                    .iter()
                    .find(|p| p.generation == newest)
                    .map_or(0, |p| p.bytes);
                let age = now_ms.saturating_sub(m.created_unix_ms) as f64 / 1000.0;
                format!(
                    "{:>10} {:>5} {:>13} {:>12} {:>12} {:>12} {:>14}",
                    newest,
                    generations.len(),
                    m.input_offset,
                    human_bytes(m.memory_bytes() as f64),
                    human_bytes(newest_pack as f64),
                    human_bytes(bytes as f64),
                    format!("{age:.0} s ago"),
                )
            }
            Err(err) => format!("{newest:>10} unreadable: {err:#}"),
        };
        writeln!(out, "{name:<24} {line}")?;
    }
    writeln!(out, "store: {} in all", human_bytes(total as f64))?;
    Ok(())
}
