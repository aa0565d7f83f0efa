//! A processor's stdout and stderr: diagnostics, passed to wasnap's own stderr.
//!
//! A WASI stream that fails hands the guest an `error` handle (`last-operation-failed`),
//! created inside wasmtime-wasi where the handle mirror cannot see it: the mirror and the
//! guest's table would part silently. These streams never fail. A write wasnap's stderr
//! refuses (a closed pipe, a full disk) is dropped: diagnostics are not output, and the
//! guest must behave the same whether or not anyone reads them. Neither is a terminal,
//! so the guest's handle numbering never depends on where stderr goes.

use std::io::Write;

use bytes::Bytes;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

/// The most bytes a write may pass at once (what `check-write` grants).
const WRITE_BUDGET: usize = 1 << 20;

#[derive(Clone, Copy)]
pub struct Diagnostics;

impl IsTerminal for Diagnostics {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for Diagnostics {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(Diagnostics)
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        // WASI 0.3's streams, which components here are never linked with.
        wasmtime_wasi::p2::pipe::SinkOutputStream.async_stream()
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for Diagnostics {
    async fn ready(&mut self) {}
}

impl OutputStream for Diagnostics {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        let _ = std::io::stderr().write_all(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(WRITE_BUDGET)
    }
}
