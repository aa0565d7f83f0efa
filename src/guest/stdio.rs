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

use anyhow::{Result, bail};
use wasmtime::{Caller, ExternType, Linker, Module};

use super::abi::WASI_MODULE;
use super::host::{HostState, abi_memory};
use super::stdin::UNWIND_DATA_BYTES;

/// A checkpoint is taken at the first stdin read once this much stdout is waiting, so a
/// program that writes much and reads little hands its output on in bounded pieces.
const DRAIN_OUTPUT_BYTES: usize = 8 << 20;

const ERRNO_SUCCESS: i32 = 0;
const ERRNO_BADF: i32 = 8;
const ERRNO_FAULT: i32 = 21;

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
    let memory = abi_memory(&mut caller)?;
    let stdin = caller
        .data_mut()
        .stdin
        .as_mut()
        .ok_or_else(|| wasmtime::Error::msg("stdin is not attached"))?;
    let asyncify = stdin
        .asyncify
        .clone()
        .ok_or_else(|| wasmtime::Error::msg("stdin is not attached"))?;
    let output_waiting = caller.data().emitted.len() >= DRAIN_OUTPUT_BYTES;
    let stdin = caller.data_mut().stdin.as_mut().expect("checked above");
    if stdin.rewinding {
        // Back where the program was unwound: the stack is whole again; now read.
        stdin.rewinding = false;
        asyncify.stop_rewind(&mut caller)?;
    } else if stdin.offset - stdin.last_checkpoint >= stdin.checkpoint_every || output_waiting {
        // A checkpoint is due (or much output waits for the sink): unwind the whole stack into memory and return to the host.
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
        asyncify.start_unwind(&mut caller, data)?;
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
                .read(&mut data[buf + filled..buf + len])
                .map_err(wasmtime::Error::from_anyhow)?;
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
    let memory = abi_memory(&mut caller)?;
    let (data, state) = memory.data_and_store_mut(&mut caller);
    let Some(buffers) = iovecs(data, iovs, iovs_len) else {
        return Ok(ERRNO_FAULT);
    };
    let mut total = 0usize;
    for (buf, len) in buffers {
        let bytes = &data[buf..buf + len];
        if fd == 1 {
            state.push_output(&[bytes])?;
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
