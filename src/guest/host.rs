//! What the guest's imports reach: WASI preview 1, `wasnap.emit`, and (for a stdio
//! program) its standard input. One `HostState` per wasmtime store.

use anyhow::Result;
use wasmtime::{Caller, Linker, Memory, ResourceLimiter, StoreLimits};
use wasmtime_wasi::p1::WasiP1Ctx;

use super::abi::{EMIT_MODULE, EMIT_NAME};
use super::stdin::StdinState;

/// What host functions can reach.
pub struct HostState {
    wasi: WasiP1Ctx,
    /// The ABI memory, cached so `emit` does not look it up by name on every call.
    pub(super) memory: Option<Memory>,
    /// Output since the run loop last drained it: emitted records, each followed by
    /// `\n`, or a stdio program's stdout.
    pub(super) emitted: Vec<u8>,
    /// A stdio program's standard input.
    pub(super) stdin: Option<StdinState>,
    limits: StoreLimits,
}

impl HostState {
    pub(super) fn new(wasi: WasiP1Ctx, limits: StoreLimits) -> Self {
        Self {
            wasi,
            memory: None,
            emitted: Vec::new(),
            stdin: None,
            limits,
        }
    }

    /// The store's resource limiter (`Store::limiter`).
    pub(super) fn limits(&mut self) -> &mut dyn ResourceLimiter {
        &mut self.limits
    }
}

/// The host side of the guest's imports: WASI preview 1 and `wasnap.emit`.
pub(super) fn add_host_functions(linker: &mut Linker<HostState>) -> Result<()> {
    wasmtime_wasi::p1::add_to_linker_sync(linker, |s: &mut HostState| &mut s.wasi)?;
    linker.func_wrap(EMIT_MODULE, EMIT_NAME, emit)?;
    Ok(())
}

/// `wasnap.emit(ptr, len)`: copy one output record out of guest memory.
fn emit(mut caller: Caller<'_, HostState>, ptr: i32, len: i32) -> wasmtime::Result<()> {
    let memory = caller
        .data()
        .memory
        .expect("memory is set right after instantiation");
    let (data, state) = memory.data_and_store_mut(&mut caller);
    let (start, len) = (ptr as u32 as usize, len as u32 as usize);
    let record = data.get(start..start.saturating_add(len)).ok_or_else(|| {
        wasmtime::Error::msg(format!(
            "wasnap.emit({ptr:#x}, {len}) is outside the guest's memory"
        ))
    })?;
    state.emitted.reserve(len + 1);
    state.emitted.extend_from_slice(record);
    state.emitted.push(b'\n');
    Ok(())
}
