//! Loading, checking and running a guest: instrument → compile → check ABI → instantiate.

pub mod abi;
pub mod instance;
pub mod instrument;
pub mod limits;
pub mod random;

use std::path::Path;

use anyhow::{Context, Result};
use wasmtime::{Config, Engine, InstancePre, Linker, Module};

pub use instance::{GlobalValue, GuestInstance};
pub use instrument::{GlobalKind, Instrumented, StateExport};
pub use limits::Limits;

/// A compiled, instrumented guest, ready to be instantiated any number of times.
pub struct Guest {
    engine: Engine,
    /// Imports resolved once; every instantiation (fresh or restore) starts from here.
    pre: InstancePre<instance::HostState>,
    abi: abi::Abi,
    limits: Limits,
    /// Runs while a time limit is set and this guest or any of its instances lives.
    ticker: Option<std::sync::Arc<limits::EpochTicker>>,
    /// What state the instrumented module exposes (its bytes are dropped once compiled).
    pub state: Instrumented,
}

impl Guest {
    /// Read a guest from a file: a wasm binary, or WAT text if the name ends in `.wat`.
    pub fn load(path: &Path) -> Result<Self> {
        Self::load_with_limits(path, Limits::default())
    }

    /// [`Guest::load`], with resource limits for every instance.
    pub fn load_with_limits(path: &Path, limits: Limits) -> Result<Self> {
        let bytes =
            std::fs::read(path).with_context(|| format!("cannot read guest {}", path.display()))?;
        let bytes = if path.extension().is_some_and(|e| e == "wat") {
            wat::parse_bytes(&bytes)
                .with_context(|| format!("{} is not valid WAT", path.display()))?
                .into_owned()
        } else {
            bytes
        };
        Self::from_wasm_with_limits(&bytes, limits)
            .with_context(|| format!("cannot load guest {}", path.display()))
    }

    /// Instrument, compile and check a guest given as wasm bytes.
    pub fn from_wasm(wasm: &[u8]) -> Result<Self> {
        Self::from_wasm_with_limits(wasm, Limits::default())
    }

    /// [`Guest::from_wasm`], with resource limits for every instance.
    pub fn from_wasm_with_limits(wasm: &[u8], limits: Limits) -> Result<Self> {
        let mut state = instrument::instrument(wasm)?;
        let mut config = Config::new();
        config
            .wasm_multi_memory(true)
            .wasm_memory64(true)
            .epoch_interruption(limits.call_timeout.is_some());
        let engine = Engine::new(&config)?;
        let module = Module::new(&engine, &state.wasm)
            .map_err(anyhow::Error::from)
            .context("wasmtime rejected the guest")?;
        let abi = abi::check(&module)?;
        let mut linker: Linker<instance::HostState> = Linker::new(&engine);
        instance::add_host_functions(&mut linker)?;
        let pre = linker
            .instantiate_pre(&module)
            .map_err(anyhow::Error::from)
            .context("cannot link the guest's imports")?;
        state.wasm = Vec::new();
        let ticker = limits
            .call_timeout
            .map(|_| std::sync::Arc::new(limits::EpochTicker::start(&engine)));
        Ok(Self {
            engine,
            pre,
            abi,
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
        GuestInstance::new(self, random_seed, random_position)
    }
}
