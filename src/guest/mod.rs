//! Loading, checking and running a guest: instrument → compile → check ABI → instantiate.

pub mod abi;
pub mod asyncify;
pub(crate) mod host;
pub mod instance;
pub mod instrument;
pub mod limits;
mod live;
pub mod random;
mod stdin;
pub mod stdio;
pub(crate) mod wasi;

use std::path::Path;

use anyhow::{Context, Result};

use crate::Error;
use crate::error::{ErrorKind, KindContext};
use wasmtime::{Config, Engine, InstancePre, Linker, Module};

pub use instance::{CoreInstance, ProgramOutcome};
pub use instrument::Instrumented;
pub use limits::Limits;
pub use live::GuestInstance;

/// What kind of guest a module is.
pub enum GuestKind {
    /// A record guest (the wasnap ABI: `alloc`, `process`, `wasnap.emit`).
    Records(abi::Abi),
    /// An unmodified WASI command in stdio mode, asyncified.
    Program,
    /// A component of the `functionstream:core/processor` world.
    Component,
}

/// What instantiates a guest of each kind.
enum Body {
    Core(InstancePre<host::HostState>),
    Component(Box<crate::component::CompiledComponent>),
}

/// A compiled, instrumented guest, ready to be instantiated any number of times.
pub struct Guest {
    engine: Engine,
    /// Imports resolved once; every instantiation (fresh or restore) starts from here.
    body: Body,
    kind: GuestKind,
    limits: Limits,
    /// Runs while a time limit is set and this guest or any of its instances lives.
    ticker: Option<std::sync::Arc<limits::EpochTicker>>,
    /// What state the instrumented module exposes (its bytes are dropped once compiled).
    pub state: Instrumented,
}

impl Guest {
    /// Read a guest from a file: a wasm binary, or WAT text if the name ends in `.wat`.
    pub fn load(path: &Path) -> Result<Self, Error> {
        Self::load_with_limits(path, Limits::default())
    }

    /// [`Guest::load`], with resource limits for every instance. A component is loaded
    /// as a processor (`functionstream:core/processor`), a core module as a record guest.
    pub fn load_with_limits(path: &Path, limits: Limits) -> Result<Self, Error> {
        let guest = read_module(path)
            .and_then(|bytes| {
                if crate::component::is_component(&bytes) {
                    Self::compile_component(&bytes, limits)
                } else {
                    Self::compile_records(&bytes, limits)
                }
            })
            .with_kind_context(ErrorKind::InvalidGuest, || {
                format!("cannot load guest {}", path.display())
            })?;
        Ok(guest)
    }

    /// Read an unmodified WASI command for stdio mode: check it, asyncify it (cached),
    /// instrument and compile it.
    pub fn load_program(path: &Path, limits: Limits) -> Result<Self, Error> {
        let program = read_module(path)
            .and_then(|bytes| Self::compile_program(&bytes, limits))
            .with_kind_context(ErrorKind::InvalidGuest, || {
                format!("cannot load program {}", path.display())
            })?;
        Ok(program)
    }

    /// [`Guest::load_program`] from wasm bytes.
    pub fn program_from_wasm(wasm: &[u8], limits: Limits) -> Result<Self, Error> {
        let program = Self::compile_program(wasm, limits)
            .kind_context(ErrorKind::InvalidGuest, "cannot load the program")?;
        Ok(program)
    }

    fn compile_program(wasm: &[u8], limits: Limits) -> Result<Self> {
        instrument::check_is_core_module(wasm)?;
        let engine = Engine::new(&engine_config(limits))?;
        let original = Module::new(&engine, wasm)
            .map_err(anyhow::Error::from)
            .context("wasmtime rejected the program")?;
        stdio::check_command(&original)?;
        let transformed = asyncify::asyncify(wasm)?;
        let mut state = instrument::instrument(&transformed)?;
        // The identity checkpoints are bound to is what actually runs: the transformed
        // module (another binaryen may lay its state out differently).
        let module = Module::new(&engine, &state.wasm)
            .map_err(anyhow::Error::from)
            .context("wasmtime rejected the asyncified program")?;
        let mut linker: Linker<host::HostState> = Linker::new(&engine);
        host::add_host_functions(&mut linker)?;
        stdio::add_host_functions(&mut linker)?;
        let pre = linker
            .instantiate_pre(&module)
            .map_err(anyhow::Error::from)
            .context("cannot link the program's imports")?;
        state.wasm = Vec::new();
        Self::finish(engine, Body::Core(pre), GuestKind::Program, limits, state)
    }

    /// Whether this is a stdio program.
    pub fn is_program(&self) -> bool {
        matches!(self.kind, GuestKind::Program)
    }

    /// Instrument, compile and check a guest given as wasm bytes.
    pub fn from_wasm(wasm: &[u8]) -> Result<Self, Error> {
        Self::from_wasm_with_limits(wasm, Limits::default())
    }

    /// [`Guest::from_wasm`], with resource limits for every instance.
    pub fn from_wasm_with_limits(wasm: &[u8], limits: Limits) -> Result<Self, Error> {
        let guest = Self::compile_records(wasm, limits)
            .kind_context(ErrorKind::InvalidGuest, "cannot load the guest")?;
        Ok(guest)
    }

    fn compile_records(wasm: &[u8], limits: Limits) -> Result<Self> {
        let mut state = instrument::instrument(wasm)?;
        let engine = Engine::new(&engine_config(limits))?;
        let module = Module::new(&engine, &state.wasm)
            .map_err(anyhow::Error::from)
            .context("wasmtime rejected the guest")?;
        let abi = abi::check(&module)?;
        let mut linker: Linker<host::HostState> = Linker::new(&engine);
        host::add_host_functions(&mut linker)?;
        let pre = linker
            .instantiate_pre(&module)
            .map_err(anyhow::Error::from)
            .context("cannot link the guest's imports")?;
        state.wasm = Vec::new();
        Self::finish(
            engine,
            Body::Core(pre),
            GuestKind::Records(abi),
            limits,
            state,
        )
    }

    fn compile_component(wasm: &[u8], limits: Limits) -> Result<Self> {
        let compiled = crate::component::CompiledComponent::compile(wasm, engine_config(limits))?;
        let engine = compiled.engine.clone();
        let state = Instrumented {
            wasm: Vec::new(),
            original_sha256: compiled.state.original_sha256,
            memories: Vec::new(),
            memory_types: Vec::new(),
            globals: Vec::new(),
        };
        Self::finish(
            engine,
            Body::Component(Box::new(compiled)),
            GuestKind::Component,
            limits,
            state,
        )
    }

    /// Whether this is a component.
    pub fn is_component(&self) -> bool {
        matches!(self.kind, GuestKind::Component)
    }

    /// The `--config` pairs a component's `fs-init` gets on a fresh start.
    pub fn set_component_config(&mut self, config: Vec<(String, String)>) -> Result<(), Error> {
        match &mut self.body {
            Body::Component(compiled) => {
                compiled.config = config;
                Ok(())
            }
            Body::Core(_) if config.is_empty() => Ok(()),
            Body::Core(_) => Err(crate::error::error(
                ErrorKind::Other,
                "--config is for components; this guest is a core module",
            )
            .into()),
        }
    }

    /// How many outputs the run gives the guest: a component's `emit` targets. Only a
    /// component has more than one.
    pub fn set_outputs(&mut self, outputs: usize) -> Result<(), Error> {
        match &mut self.body {
            Body::Component(compiled) => {
                compiled.outputs = outputs.max(1);
                Ok(())
            }
            Body::Core(_) if outputs <= 1 => Ok(()),
            Body::Core(_) => Err(crate::error::error(
                ErrorKind::Other,
                "--output more than once is for components (each further output is an emit target); this guest is a core module",
            )
            .into()),
        }
    }

    fn finish(
        engine: Engine,
        body: Body,
        kind: GuestKind,
        limits: Limits,
        state: Instrumented,
    ) -> Result<Self> {
        let ticker = limits
            .call_timeout
            .map(|_| std::sync::Arc::new(limits::EpochTicker::start(&engine)));
        Ok(Self {
            engine,
            body,
            kind,
            limits,
            ticker,
            state,
        })
    }

    /// SHA-256 of the module as the user gave it.
    pub fn module_sha256(&self) -> [u8; 32] {
        self.state.original_sha256
    }

    /// A fresh instance whose WASI random stream starts at `random_position`.
    /// Nothing of the guest has run yet but its start function.
    pub fn instantiate(&self, random_seed: u64, random_position: u64) -> Result<GuestInstance> {
        Ok(match &self.body {
            Body::Core(pre) => GuestInstance::Core(Box::new(CoreInstance::new(
                self,
                pre,
                random_seed,
                random_position,
            )?)),
            Body::Component(compiled) => {
                GuestInstance::Component(Box::new(crate::component::ComponentInstance::new(
                    compiled,
                    self.limits,
                    random_seed,
                    random_position,
                )?))
            }
        })
    }
}

pub(crate) fn engine_config(limits: Limits) -> Config {
    let mut config = Config::new();
    config
        .wasm_multi_memory(true)
        .wasm_memory64(true)
        .epoch_interruption(limits.call_timeout.is_some())
        // Said outright because kernel dirty tracking depends on it: the on-demand
        // allocator never resets a live memory behind the tracker's back, as the pooling
        // allocator does when it recycles a slot (`snapshot::dirty::kernel`).
        .allocation_strategy(wasmtime::InstanceAllocationStrategy::OnDemand);
    config
}

/// A module's bytes: a wasm binary, or WAT text if the name ends in `.wat`.
pub(crate) fn read_module(path: &Path) -> Result<Vec<u8>> {
    let bytes =
        std::fs::read(path).with_context(|| format!("cannot read guest {}", path.display()))?;
    if path.extension().is_some_and(|e| e == "wat") {
        return Ok(wat::parse_bytes(&bytes)
            .with_context(|| format!("{} is not valid WAT", path.display()))?
            .into_owned());
    }
    Ok(bytes)
}
