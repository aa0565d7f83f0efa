//! wasnap: durable, exactly-once execution of unmodified stateful WebAssembly stream guests.
//!
//! A [`Task`] runs a [`Guest`] over a [`Source`] into a [`Sink`] and checkpoints it into a
//! [`CheckpointStore`]: the guest's whole linear memory and every mutable global, with no
//! help from the guest, bound in one atomic manifest to the input's position and the
//! output's marker. Open the same task again after a crash and it resumes exactly once.
//!
//! ```
//! use wasnap::{CheckpointStore, Guest, NoObserver, Result, Sink, Source, Task, TaskConfig};
//! # use wasnap::{OutputCommit, OutputFlush};
//! # use std::sync::{Arc, Mutex};
//!
//! /// Records from memory; the position is the index of the next one.
//! struct Lines { lines: Vec<&'static str>, next: usize }
//!
//! impl Source for Lines {
//!     fn resume_at(&mut self, position: Option<&[u8]>) -> Result<()> {
//!         self.next = position.map_or(0, |p| p[0] as usize);
//!         Ok(())
//!     }
//!     fn next_record(&mut self, record: &mut Vec<u8>) -> Result<bool> {
//!         let Some(line) = self.lines.get(self.next) else { return Ok(false) };
//!         record.clear();
//!         record.extend_from_slice(line.as_bytes());
//!         self.next += 1;
//!         Ok(true)
//!     }
//!     fn read(&mut self, _buf: &mut [u8]) -> Result<usize> { unimplemented!("stdio mode only") }
//!     fn position(&self) -> Vec<u8> { vec![self.next as u8] }
//!     fn offset(&self) -> u64 { self.next as u64 }
//! }
//!
//! /// Output to memory, shared with the caller; the marker is the committed length.
//! struct Collect { out: Arc<Mutex<Vec<u8>>>, buffer: Vec<u8> }
//!
//! struct Nothing;
//! impl OutputCommit for Nothing {
//!     fn make_durable(&mut self) -> Result<()> { Ok(()) }
//! }
//!
//! impl Sink for Collect {
//!     fn resume_at(&mut self, _task: &[u8; 16], marker: Option<&[u8]>) -> Result<()> {
//!         let len = marker.map_or(0, |m| u64::from_le_bytes(m.try_into().unwrap()));
//!         self.out.lock().unwrap().truncate(len as usize);
//!         Ok(())
//!     }
//!     fn buffer(&mut self) -> &mut Vec<u8> { &mut self.buffer }
//!     fn maybe_write(&mut self) -> Result<()> { Ok(()) }
//!     fn checkpoint(&mut self, _generation: u64, _writer: &[u8; 16]) -> Result<OutputFlush> {
//!         let mut out = self.out.lock().unwrap();
//!         out.append(&mut self.buffer);
//!         let len = out.len() as u64;
//!         Ok(OutputFlush { marker: len.to_le_bytes().to_vec(), bytes: len, commit: Box::new(Nothing) })
//!     }
//!     fn len(&self) -> u64 { self.out.lock().unwrap().len() as u64 + self.buffer.len() as u64 }
//! }
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // A guest that counts its records and emits the count after each.
//! let guest = Guest::from_wasm(&wat::parse_str(r#"(module
//!     (import "wasnap" "emit" (func $emit (param i32 i32)))
//!     (memory (export "memory") 1)
//!     (global $count (mut i32) (i32.const 0))
//!     (func (export "alloc") (param i32) (result i32) (i32.const 1024))
//!     (func (export "process") (param i32 i32)
//!         (global.set $count (i32.add (global.get $count) (i32.const 1)))
//!         (i32.store8 (i32.const 0) (i32.add (i32.const 48) (global.get $count)))
//!         (call $emit (i32.const 0) (i32.const 1))))"#)?)?;
//! let store = CheckpointStore::open("memory://")?;
//! let out = Arc::new(Mutex::new(Vec::new()));
//! let cache = tempfile::tempdir()?;
//! let config = TaskConfig { cache_dir: Some(cache.path().into()), ..TaskConfig::default() };
//! let source = Lines { lines: vec!["a", "b", "c"], next: 0 };
//! let sink = Collect { out: out.clone(), buffer: Vec::new() };
//! let mut task = Task::open(&config, &guest, store, Box::new(source), Box::new(sink))?;
//! let summary = task.run(&mut NoObserver)?;
//! assert_eq!(summary.records, 3);
//! assert_eq!(*out.lock().unwrap(), b"1\n2\n3\n");
//! # Ok(())
//! # }
//! ```
//!
//! Every fallible call returns [`Result`], whose [`Error`] has an [`ErrorKind`] (what a
//! caller may do about it) and prints as one line naming the cause. A `Source` or `Sink`
//! of your own returns the same type: `?` converts `anyhow` and `std::io` errors, and an
//! error your source or sink returns keeps its kind and message on its way out of the
//! task.
//!
//! The pipeline, one stage per module:
//!
//! ```text
//! guest.wasm ─guest::instrument─▶ every memory and mutable global exported
//!            ─guest::instance──▶ wasmtime instance + `wasnap.emit` + WASI preview 1
//! stream::Source ─record─▶ guest.process ─emit─▶ stream::Sink
//! every N records (task): snapshot::dirty (which pages changed: hashing, or the kernel's
//!                          record) ─▶ snapshot::capture ─▶ delta (page codecs)
//!                          ─▶ store::pack ─▶ store::manifest (the commit)
//! restart (task): newest manifest ─▶ snapshot::restore ─▶ position the source and the sink
//! ```
//!
//! The stages are private. The `internals` feature makes them public for wasnap's own
//! tests and benchmarks; they are not a stable API.

#![warn(missing_docs)]

// The stages: public with the `internals` feature (wasnap's own tests and benchmarks),
// crate-private otherwise. Written out (not by a macro) so rustfmt and readers see them.
#[cfg(feature = "internals")]
#[doc(hidden)]
pub mod bench;
#[cfg(not(feature = "internals"))]
mod bench;
#[cfg(feature = "internals")]
#[doc(hidden)]
pub mod cli;
#[cfg(not(feature = "internals"))]
mod cli;
#[cfg(feature = "internals")]
#[doc(hidden)]
pub mod codec;
#[cfg(not(feature = "internals"))]
mod codec;
#[cfg(feature = "internals")]
#[doc(hidden)]
pub mod component;
#[cfg(not(feature = "internals"))]
mod component;
#[cfg(feature = "internals")]
#[doc(hidden)]
pub mod delta;
#[cfg(not(feature = "internals"))]
mod delta;
#[cfg(feature = "internals")]
#[doc(hidden)]
pub mod fleet;
#[cfg(not(feature = "internals"))]
mod fleet;
#[cfg(feature = "internals")]
#[doc(hidden)]
pub mod guest;
#[cfg(not(feature = "internals"))]
mod guest;
#[cfg(feature = "internals")]
#[doc(hidden)]
pub mod hex;
#[cfg(not(feature = "internals"))]
mod hex;
#[cfg(feature = "internals")]
#[doc(hidden)]
pub mod snapshot;
#[cfg(not(feature = "internals"))]
mod snapshot;
#[cfg(feature = "internals")]
#[doc(hidden)]
pub mod state;
#[cfg(not(feature = "internals"))]
mod state;
#[cfg(feature = "internals")]
#[doc(hidden)]
pub mod store;
#[cfg(not(feature = "internals"))]
mod store;
#[cfg(feature = "internals")]
#[doc(hidden)]
pub mod stream;
#[cfg(not(feature = "internals"))]
mod stream;
#[cfg(feature = "internals")]
#[doc(hidden)]
pub mod task;
#[cfg(not(feature = "internals"))]
mod task;

mod crash;
pub mod error;

pub use error::{Error, ErrorKind, Result};
pub use guest::{Guest, Limits};
pub use snapshot::DirtyTracking;
pub use store::CheckpointStore;
pub use stream::{
    ByteInput, ByteLines, FileSink, LineSource, ObjectSink, ObjectSource, OutputCommit,
    OutputFlush, Polled, Sink, Source, open_sink, open_source,
};
pub use task::{
    CheckpointObserver, CheckpointStats, Mode, NoObserver, RunConfig, RunSummary, StopHandle, Task,
    TaskConfig, run,
};

/// The `wasnap` command line (the binary's `main`): not part of the library's API.
#[doc(hidden)]
pub fn cli_main() -> std::process::ExitCode {
    cli::main()
}
