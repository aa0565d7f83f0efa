//! Components: unmodified WASI 0.2 components of FunctionStream's
//! `functionstream:core/processor` world (`wit/processor.wit`), made durable like core
//! modules.
//!
//! The stages, one per file:
//! - `instrument`: export every core module's state and append an accessor that reads
//!   and writes all globals, grows memories and puts handles back in the guest's table;
//! - `memories`: allocate the component's memories so the host knows where they are;
//! - `host`: the imports (collector, kv, WASI 0.2), with every handle the guest gets or
//!   drops reported to
//! - `handles`: the mirror of the guest's handle table, written into checkpoints;
//! - `kv`: the keyed state, plain data;
//! - `instance`: one live component, as the run loop and snapshot stage see it.
//!
//! A checkpoint of a component is the same as of a core module (pages of every memory,
//! every mutable global) plus its host state: the kv contents, the handle table and the
//! watermarks, in the manifest (docs/FORMAT.md).

pub mod cache;
pub mod handles;
pub mod host;
pub mod instance;
pub mod instrument;
pub mod kv;
pub mod kv_runs;
pub mod memories;
pub mod plain;
pub mod stdio;

use std::sync::Arc;

use anyhow::{Context, Result};
use wasmtime::Engine;
use wasmtime::component::InstancePre;

pub use instance::{ComponentInstance, describe_host_state};
pub use instrument::InstrumentedComponent;

/// Whether `wasm` is a component (by its header: version 0x0d, layer 1).
pub fn is_component(wasm: &[u8]) -> bool {
    wasm.len() >= 8 && &wasm[0..4] == b"\0asm" && wasm[4..8] == [0x0d, 0x00, 0x01, 0x00]
}

/// A component instrumented, compiled and linked: instantiated once per run or restore.
pub struct CompiledComponent {
    pub(crate) engine: Engine,
    pub(crate) pre: InstancePre<host::ComponentHost>,
    /// What the instrumentation found (its bytes dropped once compiled).
    pub state: InstrumentedComponent,
    /// The `--config` pairs `fs-init` gets on a fresh start.
    pub config: Vec<(String, String)>,
    /// How many outputs the run has: the targets `emit` may name.
    pub outputs: usize,
}

impl CompiledComponent {
    /// Instrument and compile `wasm` with the engine settings of core guests plus what
    /// components need.
    pub fn compile(wasm: &[u8], mut config: wasmtime::Config) -> Result<Self> {
        let mut state = instrument::instrument(wasm)?;
        config
            .wasm_component_model(true)
            // Copy-on-write images need wasmtime's own mmap; wasnap's memories are its own
            // (wasmtime reaches `unreachable!` with both, wasmtime issue #10740).
            .memory_init_cow(false)
            .with_host_memory(Arc::new(memories::Creator));
        let engine = Engine::new(&config)?;
        let started = std::time::Instant::now();
        let (component, origin) =
            cache::compile(&engine, &state.wasm).context("wasmtime rejected the component")?;
        tracing::info!(
            "component {} in {:.2} s",
            match origin {
                cache::Origin::Cache => "loaded from the compiled-component cache",
                cache::Origin::Compiled => "compiled",
            },
            started.elapsed().as_secs_f64()
        );
        state.wasm = Vec::new();
        let linker = host::linker(&engine)?;
        let pre = linker
            .instantiate_pre(&component)
            .map_err(anyhow::Error::from)
            .context(
                "cannot link the component's imports (is it a `functionstream:core/processor`?)",
            )?;
        // Its exports, checked once here rather than at the first instantiation.
        host::ProcessorPre::new(pre.clone())
            .map_err(anyhow::Error::from)
            .context("the component is not a `functionstream:core/processor`")?;
        Ok(Self {
            engine,
            pre,
            state,
            config: Vec::new(),
            outputs: 1,
        })
    }
}
