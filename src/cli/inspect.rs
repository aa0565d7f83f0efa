//! `wasnap inspect`: what checkpoints a store holds, newest first, after a summary of the
//! newest and of how much of the store is live; on request, which packs each needs.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;

use anyhow::Result;

use crate::bench::human_bytes;
use crate::store::{CheckpointStore, MANIFESTS, PACKS};

/// What `inspect` prints: a summary first, then one line per checkpoint, newest first;
/// `details` adds each checkpoint's packs and component state under its line.
pub fn inspect(url: &str, details: bool) -> Result<()> {
    let store = CheckpointStore::open_existing(url).map_err(crate::Error::into_anyhow)?;
    let mut out = String::new();
    let manifest_sizes: BTreeMap<String, u64> = store.list(MANIFESTS)?.into_iter().collect();
    let pack_sizes: BTreeMap<String, u64> = store.list(PACKS)?.into_iter().collect();
    let generations = store.generations().map_err(crate::Error::into_anyhow)?;
    if generations.is_empty() {
        // A worker's store holds its tasks' stores, one per partition.
        let tasks = fleet_tasks(&store)?;
        if !tasks.is_empty() {
            if details {
                anyhow::bail!(
                    "{url} is a worker's store: --details is for one task's, \
                     e.g. inspect --store {}/{} --details",
                    url.trim_end_matches('/'),
                    tasks[0].0
                );
            }
            write_fleet(&mut out, url, &tasks)?;
            return super::print_out(&out);
        }
        // `wasnap bench --passes N` writes each pass under `pass-K`.
        let passes = bench_passes(&store)?;
        if !passes.is_empty() {
            anyhow::bail!(
                "no checkpoints in {url}: it holds the stores of a bench's passes ({}); \
                 inspect one, e.g. inspect --store {}/{}{}",
                passes.join(", "),
                url.trim_end_matches('/'),
                passes[0],
                if details { " --details" } else { "" }
            );
        }
    }
    let now_ms = unix_ms_now();
    // Objects some readable checkpoint needs; the rest is garbage a gc will take.
    let mut live: HashSet<String> = HashSet::new();
    let mut rows = String::new();
    let mut newest: Option<String> = None;
    let mut unreadable = 0;
    for &generation in generations.iter().rev() {
        let manifest_name = format!("{generation:020}");
        let m = match store.read_manifest(generation) {
            Ok(m) => m,
            Err(err) => {
                writeln!(rows, "{generation:>10} unreadable: {err:#}")?;
                unreadable += 1;
                continue;
            }
        };
        live.insert(format!("{MANIFESTS}/{manifest_name}"));
        let names: Vec<String> = m.packs.iter().map(|p| p.name()).collect();
        live.extend(names.iter().map(|n| format!("{PACKS}/{n}")));
        let restore_bytes: u64 = names.iter().filter_map(|n| pack_sizes.get(n)).sum();
        let age = ago(now_ms, m.created_unix_ms);
        newest.get_or_insert_with(|| {
            format!(
                "newest: generation {generation}, input offset {}, committed {age}; a restore \
                 reads {} packs ({}) into {} of memory",
                m.input_offset,
                m.packs.len(),
                human_bytes(restore_bytes as f64),
                human_bytes(m.memory_bytes() as f64),
            )
        });
        writeln!(
            rows,
            "{:>10} {:>10} {:>14} {:>14} {:>10} {:>7} {:>5} {:>10}",
            generation,
            age,
            m.input_offset,
            m.output_marker,
            human_bytes(m.memory_bytes() as f64),
            m.stored_pages(),
            m.packs.len(),
            human_bytes(restore_bytes as f64),
        )?;
        if details {
            write_details(&mut rows, &m, &names, &pack_sizes)?;
        }
    }
    // Left by interrupted writes (local stores): garbage, removed by a gc once old.
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

    // The summary.
    match (generations.first(), generations.last()) {
        (Some(oldest), Some(newest_generation)) => writeln!(
            out,
            "{url}: {} checkpoints, generations {oldest} to {newest_generation}",
            generations.len()
        )?,
        _ => writeln!(out, "no checkpoints in {url}")?,
    }
    if unreadable > 0 {
        writeln!(
            out,
            "unreadable: {unreadable} checkpoint(s), listed below; a resume starts from the \
             newest readable one, and the packs only they need count as garbage here"
        )?;
    }
    if let Some(newest) = newest {
        writeln!(out, "{newest}")?;
    }
    writeln!(
        out,
        "objects: {} manifests, {} packs, {} in all; live (needed by a checkpoint): {}; \
         garbage: {}",
        manifest_sizes.len(),
        pack_sizes.len(),
        human_bytes(total as f64),
        human_bytes(live_bytes as f64),
        human_bytes(total.saturating_sub(live_bytes) as f64),
    )?;
    if !staging.is_empty() {
        writeln!(
            out,
            "staging files of interrupted writes: {} ({}); a gc deletes those older than {} s",
            staging.len(),
            human_bytes(staging_bytes as f64),
            crate::store::prune::STAGING_AGE.as_secs()
        )?;
    }
    // Not a property of the store but what a run here would do.
    writeln!(
        out,
        "dirty tracking on this machine: {}",
        crate::snapshot::DirtyTracking::Auto.describe()
    )?;
    if !generations.is_empty() {
        writeln!(
            out,
            "\n{:>10} {:>10} {:>14} {:>14} {:>10} {:>7} {:>5} {:>10}",
            "generation",
            "committed",
            "input_offset",
            "output_marker",
            "memory",
            "pages",
            "packs",
            "restore"
        )?;
        out.push_str(&rows);
        out.push_str(COLUMNS);
        if !details {
            out.push_str("each checkpoint's packs and component state: inspect --details\n");
        }
    }
    super::print_out(&out)
}

/// What the columns of the checkpoint table mean.
const COLUMNS: &str = "
columns: generation = the checkpoint's number (a resume starts from the newest readable one);
  committed = how long ago; input_offset = input bytes consumed (Kafka: the next offset);
  output_marker = the output's committed bytes (or part); memory = the guest's memory;
  pages = its 64 KiB pages that are stored (all-zero pages are not); packs = how many packs
  a restore reads; restore = their bytes
";

/// Under a checkpoint's line: each pack it needs and how much of it is used, its component
/// state and its kv runs.
fn write_details(
    out: &mut String,
    m: &crate::store::Manifest,
    names: &[String],
    pack_sizes: &BTreeMap<String, u64>,
) -> Result<()> {
    // A pack is GENERATION-WRITER.pack (the writer's id in hex); a frame is one page's
    // encoding (or a run's chunk) in it: a pack whose frames no kept checkpoint uses goes.
    for ((pack, name), live_frames) in m.packs.iter().zip(names).zip(m.live_frames()) {
        let size = pack_sizes
            .get(name)
            .map_or("MISSING".to_string(), |s| human_bytes(*s as f64));
        writeln!(
            out,
            "{:>12}pack {name}: {live_frames} of its {} frames (encoded pages) used, {size}",
            "", pack.frames
        )?;
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
                let pack = names.get(run.pack as usize).map_or("?", String::as_str);
                format!("{kind} {} in {pack}", human_bytes(run.bytes as f64))
            })
            .collect();
        writeln!(out, "{:>12}kv runs: {}", "", runs.join(", "))?;
    }
    Ok(())
}

fn unix_ms_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `created_unix_ms` as an age: "12 s ago", "5 min ago", "3 h ago", "2 d ago".
fn ago(now_ms: u64, then_ms: u64) -> String {
    let s = now_ms.saturating_sub(then_ms) / 1000;
    match s {
        0..120 => format!("{s} s ago"),
        120..7200 => format!("{} min ago", s / 60),
        7200..172_800 => format!("{} h ago", s / 3600),
        _ => format!("{} d ago", s / 86_400),
    }
}

/// The `pass-K` stores holding checkpoints, in pass order.
fn bench_passes(store: &CheckpointStore) -> Result<Vec<String>> {
    let mut passes: Vec<(u32, String)> = store
        .subdirectories(None)?
        .into_iter()
        .filter_map(|name| Some((name.strip_prefix("pass-")?.parse().ok()?, name)))
        .collect();
    passes.sort();
    let mut kept = Vec::new();
    for (_, name) in passes {
        if !store
            .within(&name)
            .generations()
            .map_err(crate::Error::into_anyhow)?
            .is_empty()
        {
            kept.push(name);
        }
    }
    Ok(kept)
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
            if !task
                .generations()
                .map_err(crate::Error::into_anyhow)?
                .is_empty()
            {
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
    let now_ms = unix_ms_now();
    let mut total = 0;
    for (name, task) in tasks {
        let generations = task.generations().map_err(crate::Error::into_anyhow)?;
        let newest = *generations.last().expect("tasks with a checkpoint only");
        let bytes = task.total_bytes().map_err(crate::Error::into_anyhow)?;
        total += bytes;
        let line = match task.read_manifest(newest) {
            Ok(m) => {
                let newest_pack = m
                    .packs
                    .iter()
                    .find(|p| p.generation == newest)
                    .map_or(0, |p| p.bytes);
                format!(
                    "{:>10} {:>5} {:>13} {:>12} {:>12} {:>12} {:>14}",
                    newest,
                    generations.len(),
                    m.input_offset,
                    human_bytes(m.memory_bytes() as f64),
                    human_bytes(newest_pack as f64),
                    human_bytes(bytes as f64),
                    ago(now_ms, m.created_unix_ms),
                )
            }
            Err(err) => format!("{newest:>10} unreadable: {err:#}"),
        };
        writeln!(out, "{name:<24} {line}")?;
    }
    writeln!(out, "store: {} in all", human_bytes(total as f64))?;
    Ok(())
}
