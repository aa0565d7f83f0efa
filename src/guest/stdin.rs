//! A stdio program's standard input and the asyncify handles that suspend it: the state
//! `fd_read` (in `stdio`) works on, held in the store's `HostState`.

use anyhow::{Result, anyhow};
use wasmtime::{AsContextMut, Instance, TypedFunc, WasmParams, WasmResults};

use crate::stream::Source;

/// Room for the unwound call stack. The region is grown onto the memory at the first
/// unwind, not before `_start`: an allocator that claims all of the initial memory as
/// heap at its first call (wasi-libc's dlmalloc before `__heap_end`) must not get it.
pub const UNWIND_DATA_BYTES: u64 = 1 << 20;

/// The asyncify exports the transform adds.
#[derive(Clone)]
pub struct Asyncify {
    start_unwind: TypedFunc<i32, ()>,
    stop_unwind: TypedFunc<(), ()>,
    start_rewind: TypedFunc<i32, ()>,
    stop_rewind: TypedFunc<(), ()>,
}

impl Asyncify {
    pub fn lookup(instance: &Instance, mut store: impl AsContextMut) -> Result<Self> {
        Ok(Self {
            start_unwind: export(instance, &mut store, "asyncify_start_unwind")?,
            stop_unwind: export(instance, &mut store, "asyncify_stop_unwind")?,
            start_rewind: export(instance, &mut store, "asyncify_start_rewind")?,
            stop_rewind: export(instance, &mut store, "asyncify_stop_rewind")?,
        })
    }

    pub fn start_unwind(&self, store: impl AsContextMut, data: u32) -> wasmtime::Result<()> {
        self.start_unwind.call(store, data as i32)
    }

    pub fn stop_unwind(&self, store: impl AsContextMut) -> wasmtime::Result<()> {
        self.stop_unwind.call(store, ())
    }

    pub fn start_rewind(&self, store: impl AsContextMut, data: u32) -> wasmtime::Result<()> {
        self.start_rewind.call(store, data as i32)
    }

    pub fn stop_rewind(&self, store: impl AsContextMut) -> wasmtime::Result<()> {
        self.stop_rewind.call(store, ())
    }
}

/// The program's standard input, and the unwind/rewind bookkeeping `fd_read` needs.
pub struct StdinState {
    source: Box<dyn Source>,
    /// Input bytes handed to the program so far: a checkpoint's input offset.
    pub offset: u64,
    /// Take a checkpoint at the first stdin read after this many bytes since the last one.
    pub checkpoint_every: u64,
    pub last_checkpoint: u64,
    /// Where the unwind data lives in memory 0, once the first unwind has made room.
    pub data: Option<u32>,
    pub asyncify: Option<Asyncify>,
    /// `_start` is being re-entered to rewind; the next `fd_read` stops the rewind.
    pub rewinding: bool,
    /// `fd_read` started an unwind: `_start` returned to checkpoint, not because it ended.
    pub unwound: bool,
}

impl StdinState {
    /// The input's position after the bytes handed to the program.
    pub fn position(&self) -> Vec<u8> {
        self.source.position()
    }

    /// Read from the input at its position (not counted in `offset` until the caller
    /// has handed the bytes over).
    pub fn read(&mut self, buf: &mut [u8]) -> Result<usize> {
        self.source.read(buf).map_err(crate::Error::into_anyhow)
    }

    pub fn new(source: Box<dyn Source>, checkpoint_every: u64, data: Option<u32>) -> Self {
        let offset = source.offset();
        Self {
            source,
            offset,
            checkpoint_every,
            last_checkpoint: offset,
            data,
            asyncify: None,
            rewinding: false,
            unwound: false,
        }
    }
}

/// The function the transform exported as `name`, typed.
fn export<Params: WasmParams, Results: WasmResults>(
    instance: &Instance,
    mut store: impl AsContextMut,
    name: &str,
) -> Result<TypedFunc<Params, Results>> {
    let func = instance
        .get_func(&mut store, name)
        .ok_or_else(|| anyhow!("the asyncified program does not export `{name}`"))?;
    Ok(func.typed(&store)?)
}
