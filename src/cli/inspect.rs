//! `wasnap inspect`: what checkpoints a store holds, which packs each needs, and how much
//! of the store is live.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;

use anyhow::Result;

use crate::bench::human_bytes;
use crate::store::{CheckpointStore, MANIFESTS, PACKS};

pub fn inspect(url: &str) -> Result<()> {
    let store = CheckpointStore::open(url)?;
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
    }
    let total: u64 = manifest_sizes.values().chain(pack_sizes.values()).sum();
    let live_bytes: u64 = manifest_sizes
        .iter()
        .map(|(n, s)| (format!("{MANIFESTS}/{n}"), s))
        .chain(pack_sizes.iter().map(|(n, s)| (format!("{PACKS}/{n}"), s)))
        .filter(|(path, _)| live.contains(path))
        .map(|(_, s)| s)
        .sum();
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
