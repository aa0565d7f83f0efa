//! `wasnap inspect`: what checkpoints a store holds.

use std::fmt::Write as _;
use std::io::Write as _;

use anyhow::Result;

use crate::store::{self, CheckpointStore};

pub fn inspect(url: &str) -> Result<()> {
    let store = CheckpointStore::open(url)?;
    let mut out = String::new();
    let generations = store.generations()?;
    if generations.is_empty() {
        writeln!(out, "no checkpoints in {url}")?;
    } else {
        writeln!(
            out,
            "{:>10} {:>14} {:>14} {:>14} {:>8} {:>12}",
            "generation", "input_offset", "flush_marker", "memory_bytes", "pages", "pack_bytes"
        )?;
    }
    for generation in generations {
        match store.read_manifest(generation) {
            Ok(m) => {
                let own_pack = store::pack_path(&store::pack_name(generation, &m.writer_id));
                let pack_bytes = store.object_size(&own_pack)?.unwrap_or(0);
                writeln!(
                    out,
                    "{:>10} {:>14} {:>14} {:>14} {:>8} {:>12}",
                    generation,
                    m.input_offset,
                    m.output_marker,
                    m.memory_bytes(),
                    m.stored_pages(),
                    pack_bytes
                )?;
            }
            Err(err) => writeln!(out, "{generation:>10} unreadable: {err:#}")?,
        }
    }
    // A reader that stops early (`| head`) is not an error.
    match std::io::stdout().lock().write_all(out.as_bytes()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}
