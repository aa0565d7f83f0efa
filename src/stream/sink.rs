//! Output: the `Sink` seam, and a local file that each `emit` appends one record and `\n` to.
//!
//! A sink's part in a checkpoint has three steps. At the pause, [`Sink::checkpoint`] closes
//! what was emitted so far and returns the marker the manifest stores, with an
//! [`OutputCommit`]. Off the pause, the committer calls [`OutputCommit::make_durable`]
//! before it puts the manifest, and [`OutputCommit::publish`] after the manifest committed
//! (and before the next one): what an outside reader sees changes only there. A restore
//! hands the marker back to [`Sink::resume_at`].
//!
//! A file output's bytes are written in order, each where the ones before ended (not
//! `O_APPEND`): by the committer, or by the guest's thread between checkpoints once much
//! is buffered. So a restore can cut the file back to a checkpoint's flush marker and
//! continue from there. The marker is the length made durable with fsync
//! at a checkpoint, before the manifest that names it is committed; bytes past the newest
//! committed marker belong to no checkpoint and are cut on the next restore.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt as _};
use std::path::Path;
use std::sync::{Arc, Mutex};

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
    /// part, a file output's bytes since the checkpoint before): counted with the page
    /// copies of checkpoints waiting for the store, against the memory they may hold
    /// before the guest waits.
    fn held_bytes(&self) -> u64 {
        0
    }
    /// Whether the next commit of the same output does everything this one would, its
    /// publish included (a file's: the next writes and fsyncs every byte up to its own
    /// marker). Captures that merge then drop this one (`task::coalesce`), and a file is
    /// fsynced once for all of them.
    fn done_by_the_next(&self) -> bool {
        false
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

/// Buffered output is written on the guest's thread, between checkpoints, past this size
/// (when nothing handed to checkpoints waits to be written): a run with rare checkpoints,
/// or none, holds little output in memory.
const WRITE_THRESHOLD: usize = 1 << 20;

/// What a file sink and its checkpoints' commits share.
#[derive(Default)]
struct Written {
    /// The file's length as written so far (by the sink or by a commit).
    len: u64,
    /// Of it, what an fsync has made durable.
    durable: u64,
    /// Checkpoints' bytes not yet written, in order, each with where it goes.
    queue: VecDeque<(u64, Vec<u8>)>,
    /// Which run of the sink this is: one more at every restore (`resume_at`), so a
    /// commit from before it can never write the new run's bytes.
    run: u64,
    /// A write failed part-way: the file's length is unknown until a restore cuts it back.
    failed: bool,
}

impl Written {
    /// Whether the file may be written on: no failed write, and exactly as long as this
    /// sink wrote (anything else means another program truncated or wrote it, and
    /// writing on would leave a hole of zeros, or interleave, that no checkpoint could
    /// tell from real output).
    fn check(&self, file: &File, path: &Path) -> Result<()> {
        let path = path.display();
        if self.failed {
            anyhow::bail!(
                "output {path}: an earlier write failed part-way; run the task again to resume from its newest checkpoint"
            );
        }
        let len = file
            .metadata()
            .with_context(|| format!("cannot stat output {path}"))?
            .len();
        if len != self.len {
            return Err(changed!(
                "output {path} was changed behind wasnap's back: it is {len} bytes, but wasnap wrote {}",
                self.len
            ));
        }
        Ok(())
    }
}

/// A file sink's shared state. A panic elsewhere while it was held leaves plain numbers
/// and whole chunks: use it anyway.
fn lock(written: &Mutex<Written>) -> std::sync::MutexGuard<'_, Written> {
    written
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One checkpoint's output to a file, written by the committer off the guest's pause.
/// Its bytes wait in the sink's queue; its commit writes every chunk queued up to its own
/// marker, in order, each where the one before it ended, and fsyncs. Chunks of later
/// checkpoints wait for their own commits: a commit that fails (a full disk) then fails
/// with its own bytes, not with those of checkpoints after it. The commits of captures
/// merged into one (`task::coalesce`) are the last one's alone, so one fsync for all.
struct FileWrite {
    file: Arc<File>,
    path: Arc<Path>,
    written: Arc<Mutex<Written>>,
    /// The sink's run this checkpoint belongs to (`Written::run`).
    run: u64,
    /// This checkpoint's marker: the file's length once its bytes are written.
    marker: u64,
    /// The memory its own bytes take (for the budget of memory held by checkpoints in
    /// flight): the chunk's allocation, which may be larger than its bytes.
    held: u64,
}

/// Chunks a commit took from the queue: where the first goes, and the chunks.
type Taken = (u64, VecDeque<(u64, Vec<u8>)>);

impl FileWrite {
    /// An error that only a bug in wasnap can cause.
    fn bug(&self, what: String) -> crate::Error {
        anyhow::anyhow!("output {}: {what} (a bug in wasnap)", self.path.display()).into()
    }

    /// The same, for a run whose bytes are then lost: its file is not written on.
    fn lost(&self, what: String) -> crate::Error {
        lock(&self.written).failed = true;
        self.bug(what)
    }

    /// A `doing` ("write", "fsync") of the file that failed part-way: the file's length,
    /// or what of it is durable, is unknown, so it is not written on.
    fn failed(&self, err: std::io::Error, doing: &str) -> crate::Error {
        lock(&self.written).failed = true;
        anyhow::Error::from(err)
            .context(format!("cannot {doing} output {}", self.path.display()))
            .into()
    }

    /// The shared state, as long as it is still this checkpoint's run of the sink (a
    /// commit of a run before a restore leaves the new run alone).
    fn lock_own_run(&self) -> crate::Result<std::sync::MutexGuard<'_, Written>> {
        let written = lock(&self.written);
        if written.run != self.run {
            return Err(self.bug("a checkpoint of a run before the restore".into()));
        }
        Ok(written)
    }

    /// Step 1, under the lock: check the file, and take the chunks queued up to this
    /// checkpoint's marker; `None` when an earlier commit made it durable already.
    fn take(&self) -> crate::Result<Option<Taken>> {
        let mut written = self.lock_own_run()?;
        written.check(&self.file, &self.path)?;
        if written.durable >= self.marker {
            return Ok(None);
        }
        let own = written
            .queue
            .iter()
            .take_while(|(at, _)| *at < self.marker)
            .count();
        let at = written.len;
        Ok(Some((at, written.queue.drain(..own).collect())))
    }

    /// Step 2, without the lock, which the guest's thread takes at every checkpoint:
    /// write the chunks taken, in order from `at`; returns where they end. While chunks
    /// are taken and unwritten, the length the sink records is short of what it handed
    /// on, so its `maybe_write` keeps off the file; with none taken it may write
    /// meanwhile, and then the length is its own to record.
    fn write(&self, (at, chunks): Taken) -> crate::Result<u64> {
        let mut end = at;
        for (chunk_at, bytes) in &chunks {
            if *chunk_at != end {
                return Err(self.lost(format!("bytes for offset {chunk_at} would go at {end}")));
            }
            if let Err(err) = self.file.write_all_at(bytes, end) {
                return Err(self.failed(err, "write"));
            }
            end += bytes.len() as u64;
        }
        if !chunks.is_empty() {
            self.lock_own_run()?.len = end;
        }
        Ok(end)
    }

    /// Step 3: fsync, and record what is durable: every byte up to `end`, all written
    /// before the fsync began.
    fn finish(&self, end: u64) -> crate::Result<()> {
        if let Err(err) = self.file.sync_data() {
            return Err(self.failed(err, "fsync"));
        }
        let mut written = self.lock_own_run()?;
        written.durable = written.durable.max(end);
        let durable = written.durable;
        drop(written);
        if durable < self.marker {
            return Err(self.lost(format!(
                "{durable} bytes durable, but the checkpoint's marker is {}",
                self.marker
            )));
        }
        Ok(())
    }
}

impl OutputCommit for FileWrite {
    /// Every byte up to the marker written and fsynced: it survives a crash before the
    /// manifest that names it is put.
    fn make_durable(&mut self) -> crate::Result<()> {
        match self.take()? {
            None => Ok(()), // an earlier commit wrote and fsynced this far
            Some(taken) => {
                let end = self.write(taken)?;
                self.finish(end)
            }
        }
    }

    fn held_bytes(&self) -> u64 {
        self.held
    }

    fn done_by_the_next(&self) -> bool {
        true
    }
}

/// A local file of output lines. The guest's thread only buffers what it emits: each
/// checkpoint queues its bytes for the committer (`FileWrite`), which writes and fsyncs
/// them before the manifest (writing them at the pause was a sixth of the window guest's
/// pause: the `pwrite` into the kernel's page cache). Between checkpoints a large buffer
/// is written by the guest's thread, when nothing queued waits to be written. A restore
/// cuts the file back to the checkpoint's length. The file is locked against a second
/// writer.
pub struct FileSink {
    file: Arc<File>,
    path: Arc<Path>,
    written: Arc<Mutex<Written>>,
    /// Output bytes handed on so far (written, or queued for checkpoints): where the next
    /// bytes go.
    end: u64,
    /// Bytes emitted and not yet handed on.
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
            file: Arc::new(file),
            path: path.into(),
            written: Arc::default(),
            end: 0,
            buffer: Vec::new(),
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
        let mut written = lock(&self.written);
        *written = Written {
            len: marker,
            durable: marker,
            queue: VecDeque::new(),
            run: written.run + 1,
            failed: false,
        };
        drop(written);
        self.end = marker;
        self.buffer.clear();
        Ok(())
    }

    /// At a checkpoint's pause: queue what was emitted since the last one, and return the
    /// commit that writes it.
    fn queue_checkpoint(&mut self) -> FileWrite {
        let bytes = self.buffer.len();
        let mut held = 0;
        let mut written = lock(&self.written);
        if bytes > 0 {
            // The next checkpoint's buffer starts at this one's size (up to the
            // threshold): emitting into it then seldom grows it.
            let capacity = bytes.min(WRITE_THRESHOLD);
            let chunk = std::mem::replace(&mut self.buffer, Vec::with_capacity(capacity));
            held = chunk.capacity() as u64;
            written.queue.push_back((self.end, chunk));
            self.end += bytes as u64;
        }
        let run = written.run;
        drop(written);
        FileWrite {
            file: Arc::clone(&self.file),
            path: Arc::clone(&self.path),
            written: Arc::clone(&self.written),
            run,
            marker: self.end,
            held,
        }
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
        if self.buffer.len() < WRITE_THRESHOLD {
            return Ok(());
        }
        // Never waits for the committer: while it writes, or while checkpoints' bytes
        // wait for it, the buffer grows (an early checkpoint bounds it, as for outputs
        // that hold a checkpoint's bytes until its commit).
        let mut written = match self.written.try_lock() {
            Ok(written) => written,
            Err(std::sync::TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return Ok(()),
        };
        if written.len != self.end {
            return Ok(());
        }
        written.check(&self.file, &self.path)?;
        if let Err(err) = self.file.write_all_at(&self.buffer, self.end) {
            written.failed = true;
            return Err(anyhow::Error::from(err)
                .context(format!("cannot write output {}", self.path.display()))
                .into());
        }
        self.end += self.buffer.len() as u64;
        written.len = self.end;
        drop(written);
        self.buffer.clear();
        if self.buffer.capacity() > 2 * WRITE_THRESHOLD {
            // Grown while the committer was behind: give the memory back.
            self.buffer = Vec::with_capacity(WRITE_THRESHOLD);
        }
        Ok(())
    }

    fn checkpoint(
        &mut self,
        _generation: u64,
        _writer_id: &[u8; 16],
    ) -> crate::Result<OutputFlush> {
        let write = self.queue_checkpoint();
        Ok(OutputFlush {
            marker: file_marker(write.marker),
            bytes: write.marker,
            commit: Box::new(write),
        })
    }

    fn len(&self) -> u64 {
        self.end + self.buffer.len() as u64
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

    /// A sink on a new, empty output file (in a directory that lasts as long as the
    /// `TempDir`), started fresh.
    fn fresh_sink() -> (tempfile::TempDir, std::path::PathBuf, FileSink) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out");
        let mut sink = FileSink::open(&path).unwrap();
        sink.resume_at(0).unwrap();
        (dir, path, sink)
    }

    /// Emit `bytes` and take a checkpoint: its marker and its commit, not yet run.
    fn checkpoint(sink: &mut FileSink, bytes: &[u8]) -> (u64, Box<dyn OutputCommit>) {
        sink.buffer().extend_from_slice(bytes);
        let flush = Sink::checkpoint(sink, 1, &[0; 16]).unwrap();
        assert_eq!(flush.marker, file_marker(flush.bytes));
        (flush.bytes, flush.commit)
    }

    #[test]
    fn opening_at_a_marker_cuts_back_uncommitted_output() {
        let (_dir, path, mut sink) = fresh_sink();
        let (marker, mut commit) = checkpoint(&mut sink, b"a\nb\n");
        assert_eq!(marker, 4);
        commit.make_durable().unwrap();
        checkpoint(&mut sink, b"uncommitted\n")
            .1
            .make_durable()
            .unwrap();
        // The file stays locked while anything of the sink's holds it open.
        drop((sink, commit));
        let mut sink = FileSink::open(&path).unwrap();
        sink.resume_at(4).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"a\nb\n");
        checkpoint(&mut sink, b"c\n").1.make_durable().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"a\nb\nc\n");
    }

    #[test]
    fn the_pause_writes_nothing_and_the_commits_write_in_order() {
        let (_dir, path, mut sink) = fresh_sink();
        let (first, mut a) = checkpoint(&mut sink, b"one\n");
        let (second, mut b) = checkpoint(&mut sink, b"two\nthree\n");
        let (third, mut c) = checkpoint(&mut sink, b"");
        assert_eq!((first, second, third), (4, 14, 14));
        assert_eq!(Sink::len(&sink), 14);
        assert_eq!(std::fs::read(&path).unwrap(), b"", "written at the pause");
        // Each holds its chunk's allocation until it runs; one with no bytes, nothing.
        let held = (a.held_bytes(), b.held_bytes(), c.held_bytes());
        assert!(held.0 >= 4 && held.1 >= 10 && held.2 == 0, "{held:?}");
        // Each commit writes its own bytes and those before; one with nothing of its own
        // finds its marker durable.
        a.make_durable().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"one\n");
        b.make_durable().unwrap();
        c.make_durable().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"one\ntwo\nthree\n");
        // A later commit alone (the earlier ones merged into it) writes theirs too.
        let (_, merged) = checkpoint(&mut sink, b"four\n");
        let (_, mut kept) = checkpoint(&mut sink, b"five\n");
        assert!(merged.done_by_the_next());
        drop(merged);
        kept.make_durable().unwrap();
        assert_eq!(
            std::fs::read(&path).unwrap(),
            b"one\ntwo\nthree\nfour\nfive\n"
        );

        // Changed behind the sink's back: the next commit refuses to write on, one with
        // no bytes of its own too.
        let (_, mut d) = checkpoint(&mut sink, b"six\n");
        let (_, mut e) = checkpoint(&mut sink, b"");
        d.make_durable().unwrap();
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(3)
            .unwrap();
        let (_, mut f) = checkpoint(&mut sink, b"seven\n");
        for commit in [&mut e, &mut f] {
            let err = commit.make_durable().unwrap_err().into_anyhow();
            assert!(
                format!("{err:#}").contains("changed behind wasnap's back"),
                "{err:#}"
            );
        }
        assert_eq!(std::fs::read(&path).unwrap(), b"one");
    }

    #[test]
    fn a_large_buffer_is_written_between_checkpoints_only_when_none_waits_to_be() {
        let (_dir, path, mut sink) = fresh_sink();
        let big = vec![b'x'; WRITE_THRESHOLD];
        sink.buffer().extend_from_slice(&big[1..]);
        sink.maybe_write().unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            0,
            "under the threshold"
        );
        sink.buffer().push(b'\n');
        sink.maybe_write().unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), big.len() as u64);
        // A checkpoint's bytes wait for the committer: the buffer waits behind them.
        let (marker, mut commit) = checkpoint(&mut sink, b"a\n");
        sink.buffer().extend_from_slice(&big);
        sink.maybe_write().unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), big.len() as u64);
        assert_eq!(Sink::len(&sink), marker + big.len() as u64);
        commit.make_durable().unwrap();
        sink.maybe_write().unwrap();
        // A checkpoint with nothing of its own to write, the guest's thread writing again
        // before its commit runs: the commit leaves the file's length to the sink.
        let (marker, mut empty) = checkpoint(&mut sink, b"");
        assert_eq!(marker, 2 * big.len() as u64 + 2);
        sink.buffer().extend_from_slice(&big);
        sink.maybe_write().unwrap();
        empty.make_durable().unwrap();
        sink.buffer().extend_from_slice(&big);
        sink.maybe_write().unwrap();
        let (last, mut commit) = checkpoint(&mut sink, b"b\n");
        commit.make_durable().unwrap();
        let file = std::fs::read(&path).unwrap();
        assert_eq!(file.len() as u64, last);
        let expected = [&big[1..], b"\n", b"a\n", &big, &big, &big, b"b\n"].concat();
        assert!(file == expected, "the file's bytes are out of order");
    }

    #[test]
    fn a_commit_with_nothing_queued_leaves_the_length_to_a_write_between_its_steps() {
        let (_dir, path, mut sink) = fresh_sink();
        let big = vec![b'y'; WRITE_THRESHOLD];
        sink.buffer().extend_from_slice(&big);
        sink.maybe_write().unwrap();
        // A checkpoint with nothing of its own; its commit's steps, the guest's thread
        // writing between the first two.
        let commit = sink.queue_checkpoint();
        let taken = commit.take().unwrap().expect("not durable yet");
        sink.buffer().extend_from_slice(&big);
        sink.maybe_write().unwrap();
        let end = commit.write(taken).unwrap();
        commit.finish(end).unwrap();
        // The length stays the guest's: it writes on, and the next commit finds the file
        // as long as it should be.
        sink.buffer().extend_from_slice(&big);
        sink.maybe_write().unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            3 * big.len() as u64
        );
        let (last, mut next) = checkpoint(&mut sink, b"z\n");
        next.make_durable().unwrap();
        let expected = [&big[..], &big, &big, b"z\n"].concat();
        assert_eq!(last, expected.len() as u64);
        assert!(
            std::fs::read(&path).unwrap() == expected,
            "the file's bytes differ"
        );
    }

    #[test]
    fn a_commit_from_before_a_restore_writes_nothing() {
        let (_dir, path, mut sink) = fresh_sink();
        let (_, mut stale) = checkpoint(&mut sink, b"lost\n");
        sink.resume_at(0).unwrap();
        let (_, mut fresh) = checkpoint(&mut sink, b"kept\n");
        let err = stale.make_durable().unwrap_err().into_anyhow();
        assert!(format!("{err:#}").contains("before the restore"), "{err:#}");
        fresh.make_durable().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"kept\n");
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
