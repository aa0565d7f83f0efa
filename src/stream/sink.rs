//! Output: the `Sink` seam, and a local file that each `emit` appends one record and `\n` to.
//!
//! A sink's part in a checkpoint has three steps. At the pause, [`Sink::checkpoint`] closes
//! what was emitted so far and returns the marker the manifest stores, with an
//! [`OutputCommit`]. Off the pause, the committer calls [`OutputCommit::make_durable`]
//! before it puts the manifest, and [`OutputCommit::publish`] after the manifest committed
//! (and before the next one): what an outside reader sees changes only there. A restore
//! hands the marker back to [`Sink::resume_at`].
//!
//! Bytes are written at positions the sink tracks itself (not `O_APPEND`), so a restore can
//! cut the file back to a checkpoint's flush marker and continue from there. The marker is
//! the length made durable with fsync at a checkpoint, before the manifest that names it
//! is committed; bytes past the newest committed marker belong to no checkpoint and are
//! cut on the next restore.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::codec::{Put, Reader};
use crate::error::{OutputLocked, changed};

/// Where a task's output goes.
pub trait Sink: Send {
    /// Continue after the checkpoint whose output marker is `marker` (`None`: a fresh
    /// start) of the task `task` (the store's id for it, the same on every machine): drop
    /// whatever no checkpoint committed, check the output is still the one the checkpoint
    /// wrote, and see to it that what it committed becomes visible.
    fn resume_at(&mut self, task: &[u8; 16], marker: Option<&[u8]>) -> crate::Result<()>;
    /// Where emitted bytes go (whole records with their newlines).
    fn buffer(&mut self) -> &mut Vec<u8>;
    /// Where a component's records of emit target `target` go: the buffer for target 0,
    /// and nothing else unless the sink has several outputs (`MultiSink`).
    fn target_buffer(&mut self, target: usize) -> Option<&mut Vec<u8>> {
        (target == 0).then(|| self.buffer())
    }
    /// How many outputs the sink writes (a `MultiSink`'s, or 1).
    fn output_count(&self) -> usize {
        1
    }
    /// Bytes emitted and not yet handed on, every output together.
    fn buffered_len(&mut self) -> usize {
        self.buffer().len()
    }
    /// Hand on the buffer if it has grown large.
    fn maybe_write(&mut self) -> crate::Result<()>;
    /// At a checkpoint's pause: everything emitted so far belongs to this checkpoint.
    fn checkpoint(&mut self, generation: u64, writer_id: &[u8; 16]) -> crate::Result<OutputFlush>;
    /// Output bytes emitted so far, buffered included.
    fn len(&self) -> u64;
    /// Whether the restored checkpoint's output is not all visible to readers yet (its
    /// publish was cut short by a crash): then the task takes a checkpoint before it
    /// ends, even with no new input, since only a commit may change what readers see.
    fn needs_commit(&self) -> bool {
        false
    }
    /// Whether the output holds nothing, buffered or written.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One checkpoint's output: its marker, and the work that commits it.
pub struct OutputFlush {
    /// Opaque: stored in the manifest, handed back to [`Sink::resume_at`].
    pub marker: Vec<u8>,
    /// Output bytes this checkpoint commits in all (what `inspect` and stats show).
    pub bytes: u64,
    /// What makes the flushed output durable and visible once the manifest committed.
    pub commit: Box<dyn OutputCommit>,
}

/// Run by the committer, off the guest's thread, in generation order.
pub trait OutputCommit: Send {
    /// Before the manifest is put: the output the marker names must survive a crash.
    fn make_durable(&mut self) -> crate::Result<()>;
    /// After the manifest committed: make the output visible to readers.
    fn publish(&mut self) -> crate::Result<()> {
        Ok(())
    }
    /// Bytes of output this commit holds in memory until it runs (an object output's
    /// part): counted with the page copies of checkpoints waiting for the store, against
    /// the memory they may hold before the guest waits.
    fn held_bytes(&self) -> u64 {
        0
    }
}

/// The marker of a file output: its length, as a varint.
pub fn file_marker(len: u64) -> Vec<u8> {
    let mut marker = Vec::new();
    marker.put_varint(len);
    marker
}

fn parse_file_marker(marker: &[u8], path: &Path) -> Result<u64> {
    let what = format!("the checkpoint's marker for output {}", path.display());
    let mut r = Reader::new(marker, &what);
    let len = r.varint()?;
    if r.remaining() != 0 {
        return Err(changed!(
            "output {} is a local file, but the checkpoint wrote its output elsewhere (object storage or Kafka); run the task with the same --output",
            path.display()
        ));
    }
    Ok(len)
}

/// Buffered output is written to the file (not yet fsynced) past this size.
const WRITE_THRESHOLD: usize = 1 << 20;

/// Makes an output durable from another thread (the checkpoint committer): fsync covers
/// every byte written so far, and so every flush marker handed out before it.
pub struct Durability {
    file: std::result::Result<File, String>,
    path: PathBuf,
}

impl OutputCommit for Durability {
    fn make_durable(&mut self) -> crate::Result<()> {
        Ok(self.sync()?)
    }
}

impl Durability {
    pub fn sync(&self) -> Result<()> {
        let path = self.path.display();
        let file = self
            .file
            .as_ref()
            .map_err(|e| anyhow::anyhow!("cannot reopen output {path}: {e}"))?;
        file.sync_data()
            .with_context(|| format!("cannot fsync output {path}"))
    }
}

/// A local file of output lines: written as the guest emits, fsynced at each checkpoint,
/// cut back to the checkpoint's length on restore, locked against a second writer.
pub struct FileSink {
    file: File,
    path: PathBuf,
    /// Bytes written to the file so far.
    written: u64,
    /// Bytes emitted and not yet written.
    buffer: Vec<u8>,
}

impl FileSink {
    /// Open `path` (created if missing) and lock it: one live writer per output file, so a
    /// second process on the same task stops before it can cut back output the first one
    /// committed. The lock goes with the process, even on SIGKILL.
    pub fn open(path: &Path) -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .with_context(|| format!("cannot open output {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(OutputLocked {
                    path: path.to_path_buf(),
                }
                .into());
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(anyhow::Error::from(e)
                    .context(format!("cannot lock output {}", path.display())));
            }
        }
        sync_parent_dir(path)?;
        Ok(Self {
            file,
            path: path.to_path_buf(),
            written: 0,
            buffer: Vec::with_capacity(WRITE_THRESHOLD),
        })
    }

    /// Continue after the checkpoint whose flush marker is `marker` (0 on a fresh start):
    /// cut the file back to it.
    pub fn resume_at(&mut self, marker: u64) -> Result<()> {
        let path = self.path.display();
        let len = self
            .file
            .metadata()
            .with_context(|| format!("cannot stat output {path}"))?
            .len();
        if len < marker {
            return Err(changed!(
                "output {path} is {len} bytes but the checkpoint made {marker} bytes durable: the output was truncated or replaced, or is not the one this store's task writes (run it with the same --output)"
            ));
        }
        if len > marker {
            self.file
                .set_len(marker)
                .with_context(|| format!("cannot cut output {path} back to {marker} bytes"))?;
        }
        self.file
            .sync_all()
            .with_context(|| format!("cannot fsync output {path}"))?;
        self.written = marker;
        self.buffer.clear();
        Ok(())
    }

    /// The file must be exactly as long as what this sink wrote: anything else means
    /// another program truncated or wrote it, and writing on would leave a hole of zeros
    /// (or interleave) that no checkpoint could tell from real output.
    fn check_untouched(&self) -> Result<()> {
        let path = self.path.display();
        let len = self
            .file
            .metadata()
            .with_context(|| format!("cannot stat output {path}"))?
            .len();
        if len != self.written {
            return Err(changed!(
                "output {path} was changed behind wasnap's back: it is {len} bytes, but wasnap wrote {}",
                self.written
            ));
        }
        Ok(())
    }

    fn write_buffer(&mut self) -> Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        self.check_untouched()?;
        self.file
            .write_all_at(&self.buffer, self.written)
            .with_context(|| format!("cannot write output {}", self.path.display()))?;
        self.written += self.buffer.len() as u64;
        self.buffer.clear();
        Ok(())
    }

    /// Write everything emitted so far and fsync it: returns the new flush marker.
    pub fn flush_durable(&mut self) -> Result<u64> {
        let marker = self.flush()?;
        self.durability().sync()?;
        Ok(marker)
    }

    /// Write everything emitted so far, without fsync: returns the length that a later
    /// `Durability::sync` makes durable, the flush marker of a checkpoint in flight.
    pub fn flush(&mut self) -> Result<u64> {
        self.write_buffer()?;
        self.check_untouched()?;
        Ok(self.written)
    }

    /// A handle that fsyncs this output from another thread.
    pub fn durability(&self) -> Durability {
        Durability {
            file: self.file.try_clone().map_err(|e| e.to_string()),
            path: self.path.clone(),
        }
    }

    /// Drop everything after `marker` (after a failed run: only committed output stays).
    pub fn cut_back(&mut self, marker: u64) -> Result<()> {
        self.buffer.clear();
        self.file
            .set_len(marker)
            .with_context(|| format!("cannot cut output {} back", self.path.display()))?;
        self.written = marker;
        self.file
            .sync_all()
            .with_context(|| format!("cannot fsync output {}", self.path.display()))
    }
}

impl Sink for FileSink {
    fn resume_at(&mut self, _task: &[u8; 16], marker: Option<&[u8]>) -> crate::Result<()> {
        let len = match marker {
            None => 0,
            Some(marker) => parse_file_marker(marker, &self.path)?,
        };
        Ok(FileSink::resume_at(self, len)?)
    }

    fn buffer(&mut self) -> &mut Vec<u8> {
        &mut self.buffer
    }

    fn maybe_write(&mut self) -> crate::Result<()> {
        if self.buffer.len() >= WRITE_THRESHOLD {
            Ok(self.write_buffer()?)
        } else {
            Ok(())
        }
    }

    fn checkpoint(
        &mut self,
        _generation: u64,
        _writer_id: &[u8; 16],
    ) -> crate::Result<OutputFlush> {
        let len = self.flush()?;
        Ok(OutputFlush {
            marker: file_marker(len),
            bytes: len,
            commit: Box::new(self.durability()),
        })
    }

    fn len(&self) -> u64 {
        self.written + self.buffer.len() as u64
    }
}

/// Write a file output to `out`: all of it, or with the marker of the store's newest
/// checkpoint, exactly what that checkpoint committed (a live run may have written more).
pub fn cat_file(path: &Path, marker: Option<&[u8]>, out: &mut dyn std::io::Write) -> Result<u64> {
    // Non-blocking, so a FIFO cannot hang the open; then only a regular file is read.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .with_context(|| format!("cannot read output {}", path.display()))?;
    let metadata = file
        .metadata()
        .with_context(|| format!("cannot stat output {}", path.display()))?;
    if !metadata.is_file() {
        anyhow::bail!(
            "output {} is not a regular file, a directory or an output URL",
            path.display()
        );
    }
    let actual = metadata.len();
    let len = match marker {
        None => actual,
        Some(marker) => parse_file_marker(marker, path)?,
    };
    if actual < len {
        return Err(changed!(
            "output {} is {actual} bytes but the store's newest checkpoint committed {len}: the output was truncated or replaced",
            path.display(),
        ));
    }
    let copied = std::io::copy(&mut std::io::Read::take(file, len), out)
        .with_context(|| format!("cannot copy output {} to stdout", path.display()))?;
    if copied != len {
        return Err(changed!(
            "output {} ended after {copied} of the {len} committed bytes while it was read",
            path.display()
        ));
    }
    Ok(len)
}

/// A file created since the last fsync of its directory can vanish in a crash.
fn sync_parent_dir(path: &Path) -> Result<()> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(parent)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot fsync directory {}", parent.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opening_at_a_marker_cuts_back_uncommitted_output() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out");
        let mut sink = FileSink::open(&path).unwrap();
        sink.resume_at(0).unwrap();
        sink.buffer().extend_from_slice(b"a\nb\n");
        assert_eq!(sink.flush_durable().unwrap(), 4);
        sink.buffer().extend_from_slice(b"uncommitted\n");
        sink.flush_durable().unwrap();
        drop(sink);
        let mut sink = FileSink::open(&path).unwrap();
        sink.resume_at(4).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"a\nb\n");
        sink.buffer().extend_from_slice(b"c\n");
        sink.flush_durable().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"a\nb\nc\n");
    }

    #[test]
    fn an_output_shorter_than_the_marker_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out");
        std::fs::write(&path, b"ab").unwrap();
        let err = FileSink::open(&path).unwrap().resume_at(10).err().unwrap();
        assert!(format!("{err:#}").contains("truncated or replaced"));
    }

    #[test]
    fn a_second_writer_on_the_same_output_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out");
        let first = FileSink::open(&path).unwrap();
        let err = FileSink::open(&path).err().unwrap();
        assert!(err.downcast_ref::<OutputLocked>().is_some(), "{err:#}");
        drop(first);
        FileSink::open(&path).unwrap();
    }
}
