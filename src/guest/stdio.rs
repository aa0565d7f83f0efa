//! Stdio mode: an unmodified WASI command (`_start`, reading stdin, writing stdout) made
//! durable. Its module is asyncified (see `asyncify`), and wasnap serves its standard
//! streams itself:
//!
//! - `fd_read` on stdin reads the input file at the task's offset. When a checkpoint is
//!   due, it instead starts an asyncify *unwind*: the program's whole call stack is saved
//!   into a region of its linear memory and `_start` returns to the host, which then
//!   checkpoints memory and globals like any guest's and starts a *rewind*: `_start` is
//!   called again, re-enters the same frames, and reaches this `fd_read` again, which now
//!   stops the rewind and reads. After a crash the same rewind starts from the restored
//!   checkpoint.
//! - `fd_write` on stdout goes to the task's output (cut back on restore like any
//!   guest's); stderr goes to wasnap's stderr.
//! - Reading stdin any other way (`fd_pread`) stops the run with a clear error: those
//!   bytes would escape the input offset.
//!
//! Everything else is WASI preview 1 as for record guests.

use std::io::Write as _;

use anyhow::{Result, anyhow, bail};
use wasmtime::{Caller, ExternType, Instance, Linker, Module, Store, TypedFunc};

use super::abi::WASI_MODULE;
use super::instance::HostState;

/// Room for the unwound call stack. The region is grown onto the memory at the first
/// unwind, not before `_start`: an allocator that claims all of the initial memory as
/// heap at its first call (wasi-libc's dlmalloc before `__heap_end`) must not get it.
pub const UNWIND_DATA_BYTES: u64 = 1 << 20;

const ERRNO_SUCCESS: i32 = 0;
const ERRNO_BADF: i32 = 8;
const ERRNO_FAULT: i32 = 21;

/// The asyncify exports the transform adds.
#[derive(Clone)]
pub struct Asyncify {
    start_unwind: TypedFunc<i32, ()>,
    stop_unwind: TypedFunc<(), ()>,
    start_rewind: TypedFunc<i32, ()>,
    stop_rewind: TypedFunc<(), ()>,
}

impl Asyncify {
    pub fn lookup(instance: &Instance, store: &mut Store<HostState>) -> Result<Self> {
        let get = |store: &mut Store<HostState>, name: &str| {
            instance
                .get_func(&mut *store, name)
                .ok_or_else(|| anyhow!("the asyncified program does not export `{name}`"))
        };
        Ok(Self {
            start_unwind: get(store, "asyncify_start_unwind")?.typed(&*store)?,
            stop_unwind: get(store, "asyncify_stop_unwind")?.typed(&*store)?,
            start_rewind: get(store, "asyncify_start_rewind")?.typed(&*store)?,
            stop_rewind: get(store, "asyncify_stop_rewind")?.typed(&*store)?,
        })
    }

    pub fn stop_unwind(&self, store: &mut Store<HostState>) -> wasmtime::Result<()> {
        self.stop_unwind.call(store, ())
    }

    pub fn start_rewind(&self, store: &mut Store<HostState>, data: u32) -> wasmtime::Result<()> {
        self.start_rewind.call(store, data as i32)
    }
}

/// The program's standard input, and the unwind/rewind bookkeeping `fd_read` needs.
pub struct StdinState {
    source: Box<dyn crate::stream::Source>,
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

    pub fn new(
        source: Box<dyn crate::stream::Source>,
        checkpoint_every: u64,
        data: Option<u32>,
    ) -> Self {
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

/// Check that an (original, untransformed) module is a WASI command wasnap can run.
pub fn check_command(module: &Module) -> Result<()> {
    match module.get_export("_start") {
        Some(ExternType::Func(ty)) if ty.params().len() == 0 && ty.results().len() == 0 => {}
        Some(_) => bail!("the program's `_start` is not a function of no arguments"),
        None if module.get_export("process").is_some() => bail!(
            "the program is not a WASI command (no `_start` export): it looks like a wasnap \
             record guest; run it without --stdio"
        ),
        None => bail!(
            "the program is not a WASI command: it has no `_start` export (stdio mode runs \
             programs with a `main`)"
        ),
    }
    for import in module.imports() {
        if import.module() != WASI_MODULE || !matches!(import.ty(), ExternType::Func(_)) {
            bail!(
                "the program imports `{}.{}`; stdio mode provides WASI preview 1 only",
                import.module(),
                import.name()
            );
        }
    }
    match module.get_export("memory") {
        Some(ExternType::Memory(ty)) if !ty.is_64() => Ok(()),
        _ => bail!("the program does not export a 32-bit `memory`"),
    }
}

/// Serve stdin, stdout and stderr (shadowing WASI's own `fd_read`, `fd_write`, `fd_pread`).
pub fn add_host_functions(linker: &mut Linker<HostState>) -> Result<()> {
    linker.allow_shadowing(true);
    linker.func_wrap(WASI_MODULE, "fd_read", fd_read)?;
    linker.func_wrap(WASI_MODULE, "fd_write", fd_write)?;
    linker.func_wrap(WASI_MODULE, "fd_pread", fd_pread)?;
    Ok(())
}

/// The `(buf, len)` pairs of an iovec array in guest memory, or `None` if out of bounds.
fn iovecs(memory: &[u8], iovs: i32, count: i32) -> Option<Vec<(usize, usize)>> {
    (0..count as u32 as usize)
        .map(|i| {
            let at = (iovs as u32 as usize).checked_add(i * 8)?;
            let entry = memory.get(at..at + 8)?;
            let buf = u32::from_le_bytes(entry[..4].try_into().ok()?) as usize;
            let len = u32::from_le_bytes(entry[4..].try_into().ok()?) as usize;
            memory.get(buf..buf.checked_add(len)?)?;
            Some((buf, len))
        })
        .collect()
}

fn put_u32(memory: &mut [u8], at: i32, value: u32) -> bool {
    let at = at as u32 as usize;
    match memory.get_mut(at..at.saturating_add(4)) {
        Some(dst) => {
            dst.copy_from_slice(&value.to_le_bytes());
            true
        }
        None => false,
    }
}

fn fd_read(
    mut caller: Caller<'_, HostState>,
    fd: i32,
    iovs: i32,
    iovs_len: i32,
    nread: i32,
) -> wasmtime::Result<i32> {
    if fd != 0 {
        return Ok(ERRNO_BADF);
    }
    let memory = caller
        .data()
        .memory
        .expect("memory is set at instantiation");
    let stdin = caller
        .data_mut()
        .stdin
        .as_mut()
        .ok_or_else(|| wasmtime::Error::msg("stdin is not attached"))?;
    let asyncify = stdin.asyncify.clone().expect("set at instantiation");
    if stdin.rewinding {
        // Back where the program was unwound: the stack is whole again; now read.
        stdin.rewinding = false;
        asyncify.stop_rewind.call(&mut caller, ())?;
    } else if stdin.offset - stdin.last_checkpoint >= stdin.checkpoint_every {
        // A checkpoint is due: unwind the whole stack into memory and return to the host.
        stdin.last_checkpoint = stdin.offset;
        stdin.unwound = true;
        let data = match stdin.data {
            Some(data) => data,
            None => {
                let page = memory.page_size(&caller);
                let old_pages = memory.grow(&mut caller, UNWIND_DATA_BYTES.div_ceil(page))?;
                let data = u32::try_from(old_pages * page)
                    .map_err(|_| wasmtime::Error::msg("no room for the unwind data below 4 GiB"))?;
                caller
                    .data_mut()
                    .stdin
                    .as_mut()
                    .expect("checked above")
                    .data = Some(data);
                data
            }
        };
        let header = [data + 8, data + UNWIND_DATA_BYTES as u32];
        let bytes: Vec<u8> = header.iter().flat_map(|v| v.to_le_bytes()).collect();
        memory
            .write(&mut caller, data as usize, &bytes)
            .map_err(|_| wasmtime::Error::msg("the unwind data region is outside memory"))?;
        asyncify.start_unwind.call(&mut caller, data as i32)?;
        return Ok(ERRNO_SUCCESS); // ignored: the program unwinds
    }

    let (data, state) = memory.data_and_store_mut(&mut caller);
    let stdin = state.stdin.as_mut().expect("checked above");
    let Some(buffers) = iovecs(data, iovs, iovs_len) else {
        return Ok(ERRNO_FAULT);
    };
    let mut total = 0usize;
    'buffers: for (buf, len) in buffers {
        // Fill each buffer unless the input ends: the same bytes in the same reads, whether
        // the run was interrupted or not.
        let mut filled = 0;
        while filled < len {
            let n = stdin
                .source
                .read(&mut data[buf + filled..buf + len])
                .map_err(|e| wasmtime::Error::msg(format!("{e:#}")))?;
            if n == 0 {
                break 'buffers;
            }
            filled += n;
            total += n;
        }
    }
    stdin.offset += total as u64;
    if !put_u32(data, nread, total as u32) {
        return Ok(ERRNO_FAULT);
    }
    Ok(ERRNO_SUCCESS)
}

fn fd_write(
    mut caller: Caller<'_, HostState>,
    fd: i32,
    iovs: i32,
    iovs_len: i32,
    nwritten: i32,
) -> wasmtime::Result<i32> {
    if fd != 1 && fd != 2 {
        return Ok(ERRNO_BADF);
    }
    let memory = caller
        .data()
        .memory
        .expect("memory is set at instantiation");
    let (data, state) = memory.data_and_store_mut(&mut caller);
    let Some(buffers) = iovecs(data, iovs, iovs_len) else {
        return Ok(ERRNO_FAULT);
    };
    let mut total = 0usize;
    for (buf, len) in buffers {
        let bytes = &data[buf..buf + len];
        if fd == 1 {
            state.emitted.extend_from_slice(bytes);
        } else {
            let _ = std::io::stderr().write_all(bytes);
        }
        total += len;
    }
    if !put_u32(data, nwritten, total as u32) {
        return Ok(ERRNO_FAULT);
    }
    Ok(ERRNO_SUCCESS)
}

fn fd_pread(
    _caller: Caller<'_, HostState>,
    fd: i32,
    _iovs: i32,
    _iovs_len: i32,
    _offset: i64,
    _nread: i32,
) -> wasmtime::Result<i32> {
    if fd == 0 {
        return Err(wasmtime::Error::msg(
            "the program reads stdin with fd_pread; stdio mode supports reading stdin only \
             through fd_read (its offset is the checkpoint's input offset)",
        ));
    }
    Ok(ERRNO_BADF)
}
