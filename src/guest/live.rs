//! A live guest of either kind: a core module (record ABI or stdio program) or a
//! component. The run loop and the snapshot stage speak to this one type; each method
//! goes to the kind's own implementation.

use anyhow::{Result, bail};

use super::instance::{CoreInstance, ProgramOutcome};
use crate::component::ComponentInstance;
use crate::component::kv_runs::KvUpdate;
use crate::state::GlobalValue;

pub enum GuestInstance {
    Core(Box<CoreInstance>),
    Component(Box<ComponentInstance>),
}

/// Call `$method` on whichever kind of instance this is.
macro_rules! either {
    ($self:expr, $i:ident => $body:expr) => {
        match $self {
            GuestInstance::Core($i) => $body,
            GuestInstance::Component($i) => $body,
        }
    };
}

impl GuestInstance {
    /// After a restore wrote the checkpoint's state: undo what instantiation did to
    /// host-side state (random position, output of a start function).
    pub fn rewind_host_state(&mut self, random_position: u64) {
        either!(self, i => i.rewind_host_state(random_position))
    }

    /// The guest's one-time set-up, on a fresh start only: `_initialize` and `init` for
    /// a record guest, `fs-init` for a component.
    pub fn start_fresh(&mut self) -> Result<()> {
        either!(self, i => i.start_fresh())
    }

    /// Hand one record to the guest.
    pub fn process(&mut self, record: &[u8]) -> Result<()> {
        either!(self, i => i.process(record))
    }

    /// Whether this is a stdio program.
    pub fn is_program(&self) -> bool {
        match self {
            GuestInstance::Core(i) => i.is_program(),
            GuestInstance::Component(_) => false,
        }
    }

    fn core(&self) -> Result<&CoreInstance> {
        match self {
            GuestInstance::Core(i) => Ok(i),
            GuestInstance::Component(_) => bail!("a component is not a stdio program"),
        }
    }

    fn core_mut(&mut self) -> Result<&mut CoreInstance> {
        match self {
            GuestInstance::Core(i) => Ok(i),
            GuestInstance::Component(_) => bail!("a component is not a stdio program"),
        }
    }

    /// See [`CoreInstance::attach_stdin`].
    pub fn attach_stdin(
        &mut self,
        source: Box<dyn crate::stream::Source>,
        checkpoint_every: u64,
        data: Option<u32>,
    ) -> Result<()> {
        self.core_mut()?
            .attach_stdin(source, checkpoint_every, data)
    }

    pub fn unwind_data(&self) -> Option<u32> {
        self.core().ok().and_then(CoreInstance::unwind_data)
    }

    pub fn stdin_position(&self) -> Vec<u8> {
        self.core()
            .map(CoreInstance::stdin_position)
            .unwrap_or_default()
    }

    pub fn stdin_offset(&self) -> u64 {
        self.core().map_or(0, CoreInstance::stdin_offset)
    }

    pub fn run_program(&mut self, rewind: bool) -> Result<ProgramOutcome> {
        self.core_mut()?.run_program(rewind)
    }

    /// Drop the output records emitted since the last call (a bench's replay).
    pub fn discard_emitted(&mut self) {
        match self {
            GuestInstance::Core(i) => i.rewind_host_state(i.random_position()),
            GuestInstance::Component(i) => i.rewind_host_state(i.random_position()),
        }
    }

    /// Hand the output records emitted since the last call to `sink` (a component's
    /// records of target K to its output K).
    pub fn take_emitted(&mut self, sink: &mut dyn crate::stream::Sink) -> Result<()> {
        either!(self, i => i.take_emitted(sink))
    }

    pub fn emitted_len(&self) -> usize {
        either!(self, i => i.emitted_len())
    }

    pub fn memory_count(&self) -> usize {
        either!(self, i => i.memory_count())
    }

    /// The bytes of defined memory `index`.
    pub fn memory(&self, index: usize) -> &[u8] {
        either!(self, i => i.memory(index))
    }

    /// The bytes of defined memory `index`, writable (restore only).
    pub fn memory_mut(&mut self, index: usize) -> &mut [u8] {
        either!(self, i => i.memory_mut(index))
    }

    /// The most bytes memory `index` may hold: declared, and the cap when it binds.
    pub fn memory_limit(&self, index: usize) -> (u64, Option<u64>) {
        either!(self, i => i.memory_limit(index))
    }

    /// Grow memory `index` to exactly `bytes` (restore only).
    pub fn grow_memory_to(&mut self, index: usize, bytes: u64) -> Result<()> {
        either!(self, i => i.grow_memory_to(index, bytes))
    }

    pub fn globals(&mut self) -> Result<Vec<GlobalValue>> {
        either!(self, i => i.globals())
    }

    pub fn set_globals(&mut self, values: &[GlobalValue]) -> Result<()> {
        either!(self, i => i.set_globals(values))
    }

    pub fn random_position(&self) -> u64 {
        either!(self, i => i.random_position())
    }

    /// What the host keeps for the guest beyond memories and globals (a summary of a
    /// component's kv state, its handle table and watermarks; empty for a core module),
    /// and the kv runs this checkpoint writes (`None`: no kv change).
    pub fn host_state(&mut self) -> Result<(Vec<u8>, Option<KvUpdate>)> {
        match self {
            GuestInstance::Core(_) => Ok((Vec::new(), None)),
            GuestInstance::Component(i) => i.host_state(),
        }
    }

    /// Put a checkpoint's host state and kv chain back (after memories and globals).
    pub fn restore_host_state(&mut self, bytes: &[u8], kv_runs: &[Vec<u8>]) -> Result<()> {
        match self {
            GuestInstance::Core(_) if bytes.is_empty() && kv_runs.is_empty() => Ok(()),
            GuestInstance::Core(_) => Err(crate::error::corrupt!(
                "the checkpoint holds a component's host state but the guest is a core module"
            )),
            GuestInstance::Component(i) => i.restore_host_state(bytes, kv_runs),
        }
    }
}
