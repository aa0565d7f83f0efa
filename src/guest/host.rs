//! What the guest's imports reach: WASI preview 1, `wasnap.emit`, and (for a stdio
//! program) its standard input. One `HostState` per wasmtime store.

use std::time::{Duration, Instant};

use anyhow::Result;
use wasmtime::{Caller, Extern, Linker, Memory, ResourceLimiter, StoreLimits};
use wasmtime_wasi::p1::WasiP1Ctx;

use super::abi::{EMIT_MODULE, EMIT_NAME};
use super::stdin::StdinState;

/// The most output one guest call may leave for the run loop (a record's `process`, a
/// stdio program's run between two stdin reads). The run loop drains it after every
/// call; a guest that emits more in one call stops with an error, not an out-of-memory.
pub const MAX_OUTPUT_PER_CALL: usize = 64 << 20;

/// What host functions can reach.
pub struct HostState {
    pub(super) wasi: WasiP1Ctx,
    /// The ABI memory, cached so `emit` does not look it up by name on every call (`None`
    /// while the start function runs: then it is looked up).
    pub(super) memory: Option<Memory>,
    /// Output since the run loop last drained it: emitted records, each followed by
    /// `\n`, or a stdio program's stdout. At most [`MAX_OUTPUT_PER_CALL`] bytes.
    pub(super) emitted: Vec<u8>,
    /// A stdio program's standard input.
    pub(super) stdin: Option<StdinState>,
    /// When the guest call in progress must end (`--call-timeout-ms`): host calls that
    /// would block past it (a sleep in `poll_oneoff`) fail at once instead.
    pub(super) call_deadline: Option<(Instant, Duration)>,
    /// The guest's monotonic clock (also given to WASI), for `poll_oneoff`'s deadlines.
    pub(super) clock: super::wasi::GuestClock,
    limits: StoreLimits,
}

impl HostState {
    pub(super) fn new(
        wasi: WasiP1Ctx,
        clock: super::wasi::GuestClock,
        limits: StoreLimits,
    ) -> Self {
        Self {
            wasi,
            clock,
            memory: None,
            emitted: Vec::new(),
            stdin: None,
            call_deadline: None,
            limits,
        }
    }

    /// The store's resource limiter (`Store::limiter`).
    pub(super) fn limits(&mut self) -> &mut dyn ResourceLimiter {
        &mut self.limits
    }

    /// Append guest output, or fail once a call's output passes [`MAX_OUTPUT_PER_CALL`].
    pub(super) fn push_output(&mut self, parts: &[&[u8]]) -> wasmtime::Result<()> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        if self.emitted.len().saturating_add(len) > MAX_OUTPUT_PER_CALL {
            return Err(wasmtime::Error::msg(format!(
                "the guest's output passed {} MiB within one call (the most wasnap holds \
                 before the call returns)",
                MAX_OUTPUT_PER_CALL >> 20
            )));
        }
        self.emitted.reserve(len);
        for part in parts {
            self.emitted.extend_from_slice(part);
        }
        Ok(())
    }
}

/// The guest's ABI memory: cached after instantiation; looked up by export while the
/// start function runs (before the cache is set).
pub(super) fn abi_memory(caller: &mut Caller<'_, HostState>) -> wasmtime::Result<Memory> {
    if let Some(memory) = caller.data().memory {
        return Ok(memory);
    }
    match caller.get_export("memory") {
        Some(Extern::Memory(memory)) => Ok(memory),
        _ => Err(wasmtime::Error::msg(
            "the guest called the host before its `memory` export exists",
        )),
    }
}

/// The host side of the guest's imports: WASI preview 1 (with the calls wasnap serves
/// itself, see `wasi`) and `wasnap.emit`.
pub(super) fn add_host_functions(linker: &mut Linker<HostState>) -> Result<()> {
    wasmtime_wasi::p1::add_to_linker_sync(linker, |s: &mut HostState| &mut s.wasi)?;
    super::wasi::add_host_functions(linker)?;
    linker.func_wrap(EMIT_MODULE, EMIT_NAME, emit)?;
    Ok(())
}

/// `wasnap.emit(ptr, len)`: copy one output record out of guest memory.
fn emit(mut caller: Caller<'_, HostState>, ptr: i32, len: i32) -> wasmtime::Result<()> {
    let memory = abi_memory(&mut caller)?;
    let (data, state) = memory.data_and_store_mut(&mut caller);
    let (start, len) = (ptr as u32 as usize, len as u32 as usize);
    let record = data.get(start..start.saturating_add(len)).ok_or_else(|| {
        wasmtime::Error::msg(format!(
            "wasnap.emit({ptr:#x}, {len}) is outside the guest's memory"
        ))
    })?;
    state.push_output(&[record, b"\n"])
}
