//! A processor's stdout and stderr: diagnostics, passed to wasnap's own stderr a whole line
//! at a time.
//!
//! A WASI stream that fails hands the guest an `error` handle (`last-operation-failed`),
//! created inside wasmtime-wasi where the handle mirror cannot see it: the mirror and the
//! guest's table would part silently. These streams never fail. A write wasnap's stderr
//! refuses (a closed pipe, a full disk) is dropped: diagnostics are not output, and the
//! guest must behave the same whether or not anyone reads them. Neither is a terminal,
//! so the guest's handle numbering never depends on where stderr goes.
//!
//! Guests write a line in pieces (Rust's `eprintln!` on wasip2 is unbuffered and writes
//! each formatted argument), and wasnap's own log lines share the same stderr, so the
//! stream holds a partial line until its newline arrives (or it grows past a bound, or the
//! guest drops the stream) and then writes whole lines in one call. A flush does not end the
//! line: wasi-libc flushes after every write (`blocking-write-and-flush`).

use std::io::Write;

use bytes::Bytes;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

/// The most bytes a write may pass at once (what `check-write` grants).
const WRITE_BUDGET: usize = 1 << 20;

/// A partial line longer than this is written without waiting for its newline.
const MAX_PENDING_LINE: usize = 64 * 1024;

/// The factory wasmtime-wasi asks for a stream each time the guest calls `get-stderr`
/// (or `get-stdout`).
#[derive(Clone, Copy)]
pub struct Diagnostics;

impl IsTerminal for Diagnostics {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for Diagnostics {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(LineStream::new(write_to_stderr))
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        // WASI 0.3's streams, which components here are never linked with.
        wasmtime_wasi::p2::pipe::SinkOutputStream.async_stream()
    }
}

/// Writes `bytes` to wasnap's stderr in one call, ignoring a refusal (see the module docs).
fn write_to_stderr(bytes: &[u8]) {
    let _ = std::io::stderr().lock().write_all(bytes);
}

/// One stream handed to the guest: its unfinished line, and where whole lines go.
struct LineStream {
    pending: Vec<u8>,
    sink: fn(&[u8]),
}

impl LineStream {
    fn new(sink: fn(&[u8])) -> Self {
        LineStream {
            pending: Vec::new(),
            sink,
        }
    }

    fn pass_on(&self, bytes: &[u8]) {
        if !bytes.is_empty() {
            (self.sink)(bytes);
        }
    }

    fn write_pending(&mut self) {
        self.pass_on(&self.pending);
        self.pending.clear();
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for LineStream {
    async fn ready(&mut self) {}
}

impl OutputStream for LineStream {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        match bytes.iter().rposition(|&b| b == b'\n') {
            Some(last_newline) => {
                let (lines, rest) = bytes.split_at(last_newline + 1);
                if self.pending.is_empty() {
                    self.pass_on(lines);
                } else {
                    self.pending.extend_from_slice(lines);
                    self.write_pending();
                }
                self.pending.extend_from_slice(rest);
            }
            None => self.pending.extend_from_slice(&bytes),
        }
        if self.pending.len() > MAX_PENDING_LINE {
            self.write_pending();
        }
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(WRITE_BUDGET)
    }
}

impl Drop for LineStream {
    fn drop(&mut self) {
        self.write_pending();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    thread_local! {
        static WRITES: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
    }

    fn record(bytes: &[u8]) {
        WRITES.with(|w| w.borrow_mut().push(bytes.to_vec()));
    }

    fn writes() -> Vec<Vec<u8>> {
        WRITES.with(|w| w.take())
    }

    #[test]
    fn a_line_written_in_pieces_is_passed_on_whole() {
        let mut stream = LineStream::new(record);
        for piece in ["progress ", "20000", "\n"] {
            stream.write(Bytes::from(piece)).unwrap();
            stream.flush().unwrap();
        }
        assert_eq!(writes(), vec![b"progress 20000\n".to_vec()]);
        stream.write(Bytes::from("a\nb\nc")).unwrap();
        assert_eq!(writes(), vec![b"a\nb\n".to_vec()]);
        drop(stream);
        assert_eq!(
            writes(),
            vec![b"c".to_vec()],
            "a partial line is written on drop"
        );
    }

    #[test]
    fn a_line_without_end_is_passed_on_past_the_bound() {
        let mut stream = LineStream::new(record);
        stream
            .write(Bytes::from(vec![b'x'; MAX_PENDING_LINE]))
            .unwrap();
        assert!(writes().is_empty());
        stream.write(Bytes::from_static(b"y")).unwrap();
        assert_eq!(writes().concat().len(), MAX_PENDING_LINE + 1);
        drop(stream);
        assert!(writes().is_empty());
    }
}
