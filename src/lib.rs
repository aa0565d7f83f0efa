//! wasnap: durable, exactly-once execution of unmodified stateful WebAssembly stream guests.
//!
//! The pipeline, one stage per module:
//!
//! ```text
//! guest.wasm ─guest::instrument─▶ every memory and mutable global exported
//!            ─guest::instance──▶ wasmtime instance + `wasnap.emit` + WASI preview 1
//! stream::LineSource ─record─▶ guest.process ─emit─▶ stream::FileSink
//! every N records (task): snapshot::dirty (which pages changed: hashing, or the kernel's
//!                          record) ─▶ snapshot::capture ─▶ store::pack ─▶ store::manifest (the commit)
//! restart (task): newest manifest ─▶ snapshot::restore ─▶ seek input, cut output back
//! ```

pub mod bench;
pub mod cli;
pub mod error;
pub mod guest;
pub mod snapshot;
pub mod store;
pub mod stream;
pub mod task;

pub use error::{Fenced, ModuleChanged, OutputLocked};
pub use task::{CheckpointObserver, CheckpointStats, RunConfig, RunSummary, Task};
