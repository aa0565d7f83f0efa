//! The same processor under stock wasmtime: the component as its toolchain built it (not
//! instrumented), wasmtime's own memories (copy-on-write images), no checkpoints. What
//! `wasnap bench` compares a component's speed under wasnap with.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use wasmtime::{Engine, Store, StoreLimits};

use super::host::{ComponentHost, Processor};

/// Records per second of `fs-process` over the lines of `input` (after `fs-init` with
/// `config`), with the component at `guest` under a default wasmtime engine.
pub fn records_per_second(guest: &Path, input: &Path, config: &[(String, String)]) -> Result<f64> {
    let wasm = crate::guest::read_module(guest)?;
    let mut engine_config = wasmtime::Config::new();
    engine_config.wasm_component_model(true);
    let engine = Engine::new(&engine_config)?;
    let (component, _) =
        super::cache::compile(&engine, &wasm).context("stock wasmtime rejected the component")?;
    let linker = super::host::linker(&engine)?;
    let wasi = wasmtime_wasi::WasiCtxBuilder::new()
        .stdout(super::stdio::Diagnostics)
        .stderr(super::stdio::Diagnostics)
        .build();
    let host = ComponentHost::new(wasi, StoreLimits::default(), 1);
    let mut store = Store::new(&engine, host);
    let processor = Processor::instantiate(&mut store, &component, &linker)?;
    processor.call_fs_init(&mut store, config)?;
    let text = std::fs::read(input).with_context(|| format!("cannot read {}", input.display()))?;
    let mut records: Vec<&[u8]> = text.split(|b| *b == b'\n').collect();
    if records.last().is_some_and(|r| r.is_empty()) {
        records.pop();
    }
    let started = Instant::now();
    for record in &records {
        processor.call_fs_process(&mut store, 0, record)?;
        store.data_mut().emitted[0].clear();
    }
    Ok(records.len() as f64 / started.elapsed().as_secs_f64().max(1e-9))
}
