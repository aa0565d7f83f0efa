//! Resource limits for a guest: a cap on its memory and a time limit per call.
//!
//! The time limit uses wasmtime's epoch interruption: a ticker thread advances the
//! engine's epoch every [`TICK`], and each guest call gets a deadline of enough ticks.
//! It costs a check on loop back-edges, so it is compiled in only when a limit is set.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use wasmtime::Engine;

/// Granularity of the time limit.
pub const TICK: Duration = Duration::from_millis(10);

/// What a guest may use: its memory and the time of one call. `None`: no limit beyond
/// the module's own (and the engine's 4 GiB per 32-bit memory).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    /// The most bytes all of the guest's memories together may hold.
    pub max_memory_bytes: Option<u64>,
    /// The longest one guest call (`process`, `alloc`, `init`) may run.
    pub call_timeout: Option<Duration>,
}

impl Limits {
    /// The most bytes a memory of type `ty` may ever hold: its declared maximum (or what
    /// its index type can address, or `reserved` bytes where the host allocated less), and
    /// the guest's cap (`--max-memory-mib`, which counts all memories together, so it
    /// bounds each too). The second is `None` when the cap is not what binds.
    pub fn memory_limit(&self, ty: &wasmtime::MemoryType, reserved: u64) -> (u64, Option<u64>) {
        let page = ty.page_size();
        let addressable = if ty.is_64() { 1u64 << 48 } else { 1u64 << 32 };
        let declared = ty
            .maximum()
            .map_or(addressable, |pages| pages.saturating_mul(page))
            .min(addressable)
            .min(reserved);
        match self.max_memory_bytes {
            Some(cap) if cap < declared => (declared, Some(cap)),
            _ => (declared, None),
        }
    }

    /// Epoch ticks a call may run: the timeout rounded up, plus the tick in progress.
    pub fn deadline_ticks(&self) -> Option<u64> {
        self.call_timeout
            .map(|t| t.as_nanos().div_ceil(TICK.as_nanos()) as u64 + 1)
    }
}

/// Advances an engine's epoch every [`TICK`] until dropped.
pub struct EpochTicker {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl EpochTicker {
    pub fn start(engine: &Engine) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (engine, stop) = (engine.clone(), stop.clone());
            std::thread::Builder::new()
                .name("wasnap-epoch".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(TICK);
                        engine.increment_epoch();
                    }
                })
                .expect("spawn the epoch ticker")
        };
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
