//! One live guest: a wasmtime store + instance, the `wasnap.emit` host function, WASI,
//! and typed handles on everything the run loop and the snapshot stage touch.

use anyhow::{Context, Result, anyhow, bail};
use wasmtime::{Global, Memory, Store, StoreLimits, StoreLimitsBuilder, TypedFunc, Val};
use wasmtime_wasi::WasiCtxBuilder;

use super::host::HostState;
use super::random::DeterministicRandom;
use super::stdin::{Asyncify, StdinState, UNWIND_DATA_BYTES};
use super::{Guest, GuestKind, Limits};
use crate::error::{ErrorKind, Kinded, error, kind_of};
use crate::state::{GlobalKind, GlobalValue};

/// How a guest is entered.
enum Entry {
    /// The record ABI: `alloc` and `process` per record, after `_initialize` and `init`.
    Records {
        alloc: TypedFunc<i32, i32>,
        process: TypedFunc<(i32, i32), ()>,
        initialize: Option<TypedFunc<(), ()>>,
        init: Option<TypedFunc<(), ()>>,
    },
    /// An asyncified WASI command: `_start`, unwound and rewound around checkpoints.
    Program {
        start: TypedFunc<(), ()>,
        asyncify: Asyncify,
    },
}

/// Why a stdio program's `_start` returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProgramOutcome {
    /// It unwound at a stdin read for a checkpoint; rewind to go on.
    Unwound,
    /// It ended, with this exit status.
    Exited(i32),
}

fn global_value(val: Val) -> Result<GlobalValue> {
    Ok(match val {
        Val::I32(v) => GlobalValue::I32(v),
        Val::I64(v) => GlobalValue::I64(v),
        Val::F32(v) => GlobalValue::F32(v),
        Val::F64(v) => GlobalValue::F64(v),
        Val::V128(v) => GlobalValue::V128(v.as_u128()),
        other => bail!("cannot snapshot a global of type {:?}", other),
    })
}

fn wasm_value(value: GlobalValue) -> Val {
    match value {
        GlobalValue::I32(v) => Val::I32(v),
        GlobalValue::I64(v) => Val::I64(v),
        GlobalValue::F32(v) => Val::F32(v),
        GlobalValue::F64(v) => Val::F64(v),
        GlobalValue::V128(v) => Val::V128(v.into()),
    }
}

/// A guest error as one line: a trap with its message, a limit, `proc_exit`, or a host
/// error. Of kind `Guest`, unless a host function the guest called failed for a reason of
/// its own (the input became unavailable under a stdio program's `fd_read`). The wasm
/// backtrace wasmtime attaches (many lines) goes to the debug log, not into the message.
fn describe(limits: &Limits, err: wasmtime::Error, function: &str) -> anyhow::Error {
    // "in `process`", or a phrase of the caller's own (instantiation).
    let at = if function.contains(' ') {
        function.to_string()
    } else {
        format!("in `{function}`")
    };
    let guest = |message: String| error(ErrorKind::Guest, message);
    if let Some(exit) = err.downcast_ref::<wasmtime_wasi::I32Exit>() {
        return guest(format!("the guest called proc_exit({}) {at}", exit.0));
    }
    if let Some(wasmtime::Trap::Interrupt) = err.downcast_ref::<wasmtime::Trap>() {
        let ms = limits.call_timeout.map_or(0, |t| t.as_millis());
        return crate::error::GuestTimedOut(format!(
            "the guest ran past its time limit of {ms} ms {at}"
        ))
        .into();
    }
    if let Some(backtrace) = err.downcast_ref::<wasmtime::WasmBacktrace>() {
        tracing::debug!("the guest failed {at}: {backtrace}");
    }
    if let Some(trap) = err.downcast_ref::<wasmtime::Trap>() {
        return guest(format!("the guest trapped {at}: {trap}"));
    }
    if let Some(max) = limits.max_memory_bytes
        && format!("{err:#}").contains("forcing trap when growing memory")
    {
        return guest(format!(
            "the guest tried to grow its memory past its limit of {max} bytes (--max-memory-mib) {at}"
        ));
    }
    let err = anyhow::Error::from(err);
    let message = format!("the guest failed {at}");
    if !err.is::<wasmtime::WasmBacktrace>() {
        return match kind_of(&err) {
            ErrorKind::Other => err.context(Kinded::new(ErrorKind::Guest, message)),
            _ => err.context(message),
        };
    }
    // The chain without the backtrace, as one error of the same kind.
    let kind = match kind_of(&err) {
        ErrorKind::Other => ErrorKind::Guest,
        kind => kind,
    };
    let backtrace = err
        .downcast_ref::<wasmtime::WasmBacktrace>()
        .map(|b| b.to_string());
    let causes: Vec<String> = err
        .chain()
        .map(|cause| cause.to_string())
        .filter(|cause| Some(cause) != backtrace.as_ref())
        .collect();
    error(kind, format!("{message}: {}", causes.join(": ")))
}

/// Give the next guest call its full time budget: in epoch ticks for its wasm code, and
/// as an instant for host calls that would block (`wasi::poll_oneoff`).
fn arm_deadline(store: &mut Store<HostState>, limits: &Limits) {
    if let Some(ticks) = limits.deadline_ticks() {
        store.set_epoch_deadline(ticks);
    }
    if let Some(timeout) = limits.call_timeout {
        store.data_mut().call_deadline = Some((std::time::Instant::now() + timeout, timeout));
    }
}

pub struct CoreInstance {
    store: Store<HostState>,
    abi_memory: Memory,
    entry: Entry,
    /// Every defined memory, in index order (the snapshot's memory list).
    memories: Vec<Memory>,
    /// Every defined mutable global, in index order (the snapshot's global list).
    globals: Vec<(Global, GlobalKind)>,
    random: DeterministicRandom,
    limits: Limits,
    /// Keeps the epoch ticking for the time limit, even once the `Guest` is dropped.
    _ticker: Option<std::sync::Arc<super::limits::EpochTicker>>,
}

impl CoreInstance {
    pub(super) fn new(
        guest: &Guest,
        pre: &wasmtime::InstancePre<HostState>,
        random_seed: u64,
        random_position: u64,
    ) -> Result<Self> {
        let random = DeterministicRandom::new(random_seed, random_position);
        let clock = super::wasi::GuestClock::new();
        let wasi = WasiCtxBuilder::new()
            .inherit_stderr()
            .monotonic_clock(clock)
            .secure_random(random.clone())
            .insecure_random(random.clone())
            .insecure_random_seed(u128::from(random_seed))
            .build_p1();
        let mut store = Store::new(
            &guest.engine,
            HostState::new(
                wasi,
                clock,
                match guest.limits.max_memory_bytes {
                    Some(max) => StoreLimitsBuilder::new()
                        .memory_size(usize::try_from(max).unwrap_or(usize::MAX))
                        .trap_on_grow_failure(true)
                        .build(),
                    None => StoreLimits::default(),
                },
            ),
        );
        store.limiter(HostState::limits);
        // The start function runs inside instantiate: it gets a deadline too.
        arm_deadline(&mut store, &guest.limits);

        let instance = pre.instantiate(&mut store).map_err(|err| {
            describe(
                &guest.limits,
                err,
                "while it was instantiated (its initial memory, or its start function)",
            )
        })?;

        let abi_memory = instance
            .get_memory(&mut store, "memory")
            .ok_or_else(|| anyhow!("the guest does not export `memory`"))?;
        store.data_mut().memory = Some(abi_memory);
        let memories = guest
            .state
            .memories
            .iter()
            .map(|m| {
                instance
                    .get_memory(&mut store, &m.export_name)
                    .ok_or_else(|| anyhow!("instrumented export {} is missing", m.export_name))
            })
            .collect::<Result<_>>()?;
        let globals = guest
            .state
            .globals
            .iter()
            .map(|(g, kind)| {
                instance
                    .get_global(&mut store, &g.export_name)
                    .map(|global| (global, *kind))
                    .ok_or_else(|| anyhow!("instrumented export {} is missing", g.export_name))
            })
            .collect::<Result<_>>()?;
        let typed =
            |store: &mut Store<HostState>, name: &str| -> Result<Option<TypedFunc<(), ()>>> {
                Ok(match instance.get_func(&mut *store, name) {
                    Some(f) => Some(f.typed(&*store)?),
                    None => None,
                })
            };
        let entry = match &guest.kind {
            GuestKind::Records(abi) => Entry::Records {
                alloc: instance.get_typed_func(&mut store, "alloc")?,
                process: instance.get_typed_func(&mut store, "process")?,
                initialize: if abi.has_initialize {
                    typed(&mut store, "_initialize")?
                } else {
                    None
                },
                init: if abi.has_init {
                    typed(&mut store, "init")?
                } else {
                    None
                },
            },
            GuestKind::Component => bail!("a component has no core instance (a wasnap bug)"),
            GuestKind::Program => Entry::Program {
                start: instance.get_typed_func(&mut store, "_start")?,
                asyncify: Asyncify::lookup(&instance, &mut store)?,
            },
        };
        Ok(Self {
            entry,
            store,
            abi_memory,
            memories,
            globals,
            random,
            limits: guest.limits,
            _ticker: guest.ticker.clone(),
        })
    }

    /// Give the next guest call its full time budget.
    fn arm_deadline(&mut self) {
        arm_deadline(&mut self.store, &self.limits);
    }

    /// After a restore wrote the checkpoint's memories and globals: undo what the
    /// instantiation (the module's start function) did to host-side state, so the guest
    /// goes on exactly as the checkpointed one would have. Its random stream goes back to
    /// the checkpoint's position, and anything it emitted is dropped (the checkpoint's
    /// output holds what the start function emitted on the fresh start).
    pub fn rewind_host_state(&mut self, random_position: u64) {
        self.random.set_position(random_position);
        self.store.data_mut().emitted.clear();
    }

    fn describe(&self, err: wasmtime::Error, function: &str) -> anyhow::Error {
        describe(&self.limits, err, function)
    }

    /// Run the guest's one-time set-up: `_initialize` (WASI reactors), then `init` (a stdio
    /// program has none: `_start` is its whole run). Only on a fresh start: after a
    /// restore the snapshot already holds its effects.
    pub fn start_fresh(&mut self) -> Result<()> {
        match &self.entry {
            Entry::Records {
                initialize, init, ..
            } => {
                let (initialize, init) = (initialize.clone(), init.clone());
                if let Some(f) = initialize {
                    self.arm_deadline();
                    f.call(&mut self.store, ())
                        .map_err(|e| self.describe(e, "_initialize"))?;
                }
                if let Some(f) = init {
                    self.arm_deadline();
                    f.call(&mut self.store, ())
                        .map_err(|e| self.describe(e, "init"))?;
                }
            }
            Entry::Program { .. } => {}
        }
        Ok(())
    }

    /// Hand one record to the guest: `alloc(len)`, copy the bytes, `process(ptr, len)`.
    pub fn process(&mut self, record: &[u8]) -> Result<()> {
        // The fields apart, so that the guest's functions are called in place: cloning a
        // `TypedFunc` takes a reference in wasmtime's type registry, which was 13 % of the
        // counter guest's CPU at 3.5 M records/s.
        let Self {
            store,
            abi_memory,
            entry,
            limits,
            ..
        } = self;
        let Entry::Records { alloc, process, .. } = entry else {
            bail!("a stdio program takes no records");
        };
        let len = i32::try_from(record.len()).map_err(|_| {
            anyhow!(
                "a record of {} bytes is too large for the guest ABI",
                record.len()
            )
        })?;
        if let Some(max) = limits.max_memory_bytes
            && record.len() as u64 > max
        {
            bail!(error(
                ErrorKind::Guest,
                format!(
                    "a record of {} bytes cannot fit in the guest's memory limit of {max} bytes",
                    record.len()
                )
            ));
        }
        arm_deadline(store, limits);
        let ptr = alloc
            .call(&mut *store, len)
            .map_err(|e| describe(limits, e, "alloc"))?;
        abi_memory
            .write(&mut *store, ptr as u32 as usize, record)
            .map_err(|_| {
                // The guest's own failure on this record, as a trap would be: with
                // `--on-trap skip`, the record goes to the dead letters.
                error(
                    ErrorKind::Guest,
                    format!(
                        "the guest's alloc({len}) returned {ptr:#x}, which is outside its memory"
                    ),
                )
            })?;
        arm_deadline(store, limits);
        process
            .call(store, (ptr, len))
            .map_err(|e| describe(limits, e, "process"))
    }

    /// Whether this is a stdio program (else a record guest).
    pub fn is_program(&self) -> bool {
        matches!(self.entry, Entry::Program { .. })
    }

    /// Give a stdio program its input, from `offset` on, with a checkpoint due at the
    /// first read after every `checkpoint_every` bytes; `data` is where an earlier unwind
    /// left the program's stack (from the checkpoint), if it was ever unwound.
    pub fn attach_stdin(
        &mut self,
        source: Box<dyn crate::stream::Source>,
        checkpoint_every: u64,
        data: Option<u32>,
    ) -> Result<()> {
        let Entry::Program { asyncify, .. } = &self.entry else {
            bail!("only a stdio program reads stdin");
        };
        if let Some(data) = data {
            let needed = u64::from(data) + UNWIND_DATA_BYTES;
            if (self.abi_memory.data_size(&self.store) as u64) < needed {
                bail!("the program's memory does not hold its unwind data (store corrupt?)");
            }
        }
        let mut stdin = StdinState::new(source, checkpoint_every.max(1), data);
        stdin.asyncify = Some(asyncify.clone());
        self.store.data_mut().stdin = Some(stdin);
        Ok(())
    }

    /// Where the program's stack was unwound to, once it has been.
    pub fn unwind_data(&self) -> Option<u32> {
        self.store.data().stdin.as_ref().and_then(|s| s.data)
    }

    /// The input's position after the stdin bytes handed to the program (empty before
    /// stdin is attached).
    pub fn stdin_position(&self) -> Vec<u8> {
        self.store
            .data()
            .stdin
            .as_ref()
            .map_or_else(Vec::new, |s| s.position())
    }

    /// Stdin bytes handed to the program so far.
    pub fn stdin_offset(&self) -> u64 {
        self.store.data().stdin.as_ref().map_or(0, |s| s.offset)
    }

    /// Run a stdio program until it unwinds for a checkpoint or ends; `rewind` re-enters it
    /// where it last unwound (in this process or the one that took the checkpoint).
    pub fn run_program(&mut self, rewind: bool) -> Result<ProgramOutcome> {
        let Entry::Program { start, asyncify } = &self.entry else {
            bail!("a record guest has no `_start` to run");
        };
        let (start, asyncify) = (start.clone(), asyncify.clone());
        let stdin = self
            .store
            .data_mut()
            .stdin
            .as_mut()
            .ok_or_else(|| anyhow!("stdin is not attached"))?;
        stdin.unwound = false;
        stdin.rewinding = rewind;
        if rewind {
            let data = stdin
                .data
                .ok_or_else(|| anyhow!("no unwound stack to rewind (store corrupt?)"))?;
            asyncify
                .start_rewind(&mut self.store, data)
                .map_err(|e| self.describe(e, "asyncify_start_rewind"))?;
        }
        self.arm_deadline();
        let result = start.call(&mut self.store, ());
        let unwound = self.store.data().stdin.as_ref().is_some_and(|s| s.unwound);
        match result {
            Ok(()) if unwound => {
                asyncify
                    .stop_unwind(&mut self.store)
                    .map_err(|e| self.describe(e, "asyncify_stop_unwind"))?;
                Ok(ProgramOutcome::Unwound)
            }
            Ok(()) => Ok(ProgramOutcome::Exited(0)),
            Err(err) => match err.downcast_ref::<wasmtime_wasi::I32Exit>() {
                Some(exit) => Ok(ProgramOutcome::Exited(exit.0)),
                None => Err(self.describe(err, "_start")),
            },
        }
    }

    /// Output records emitted since the last call, each followed by `\n`; the buffer is left empty.
    pub fn take_emitted(&mut self, sink: &mut dyn crate::stream::Sink) -> Result<()> {
        sink.buffer().append(&mut self.store.data_mut().emitted);
        Ok(())
    }

    /// Bytes emitted and not yet taken.
    pub fn emitted_len(&self) -> usize {
        self.store.data().emitted.len()
    }

    pub fn memory_count(&self) -> usize {
        self.memories.len()
    }

    /// The bytes of defined memory `index`.
    pub fn memory(&self, index: usize) -> &[u8] {
        self.memories[index].data(&self.store)
    }

    /// The bytes of defined memory `index`, writable (restore only).
    pub fn memory_mut(&mut self, index: usize) -> &mut [u8] {
        self.memories[index].data_mut(&mut self.store)
    }

    /// The most bytes memory `index` may ever hold ([`Limits::memory_limit`]).
    pub fn memory_limit(&self, index: usize) -> (u64, Option<u64>) {
        let ty = self.memories[index].ty(&self.store);
        self.limits.memory_limit(&ty, u64::MAX)
    }

    /// Grow memory `index` to exactly `bytes` (restore only; memories never shrink).
    pub fn grow_memory_to(&mut self, index: usize, bytes: u64) -> Result<()> {
        let memory = self.memories[index];
        let current = memory.data_size(&self.store) as u64;
        let page = memory.page_size(&self.store);
        if bytes < current {
            bail!(
                "memory {index} is {current} bytes in a fresh instance but {bytes} in the checkpoint"
            );
        }
        if !(bytes - current).is_multiple_of(page) {
            bail!(
                "memory {index}: checkpoint size {bytes} is not a whole number of {page}-byte pages"
            );
        }
        if bytes > current {
            memory
                .grow(&mut self.store, (bytes - current) / page)
                .map_err(anyhow::Error::from)
                .with_context(|| format!("cannot grow memory {index} to {bytes} bytes"))?;
        }
        Ok(())
    }

    /// The value of every defined mutable global, in index order.
    pub fn globals(&mut self) -> Result<Vec<GlobalValue>> {
        self.globals
            .iter()
            .map(|(g, _)| global_value(g.get(&mut self.store)))
            .collect()
    }

    /// Set every defined mutable global (restore only).
    pub fn set_globals(&mut self, values: &[GlobalValue]) -> Result<()> {
        if values.len() != self.globals.len() {
            bail!(
                "the checkpoint holds {} globals but the guest has {}",
                values.len(),
                self.globals.len()
            );
        }
        for (i, ((global, kind), value)) in self.globals.iter().zip(values).enumerate() {
            if value.kind() != *kind {
                bail!(
                    "global {i} is {kind:?} in the guest but {:?} in the checkpoint",
                    value.kind()
                );
            }
            global.set(&mut self.store, wasm_value(*value))?;
        }
        Ok(())
    }

    /// How many bytes of the WASI random stream the guest has drawn.
    pub fn random_position(&self) -> u64 {
        self.random.position()
    }
}
