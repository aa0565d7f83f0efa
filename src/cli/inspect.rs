//! `wasnap inspect`: what checkpoints a store holds.

use anyhow::Result;

use crate::store::{self, CheckpointStore};

pub fn inspect(url: &str) -> Result<()> {
    let store = CheckpointStore::open(url)?;
    let generations = store.generations()?;
    if generations.is_empty() {
        println!("no checkpoints in {url}");
        return Ok(());
    }
    println!(
        "{:>10} {:>14} {:>14} {:>14} {:>8} {:>12}",
        "generation", "input_offset", "flush_marker", "memory_bytes", "pages", "pack_bytes"
    );
    for generation in generations {
        match store.read_manifest(generation) {
            Ok(m) => {
                let own_pack = store::pack_path(&store::pack_name(generation, &m.writer_id));
                let pack_bytes = store.object_size(&own_pack)?.unwrap_or(0);
                println!(
                    "{:>10} {:>14} {:>14} {:>14} {:>8} {:>12}",
                    generation,
                    m.input_offset,
                    m.output_marker,
                    m.memory_bytes(),
                    m.stored_pages(),
                    pack_bytes
                );
            }
            Err(err) => println!("{generation:>10} unreadable: {err:#}"),
        }
    }
    Ok(())
}
