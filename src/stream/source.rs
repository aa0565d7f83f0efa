//! Input: the `Source` seam, and the newline-delimited sources over a byte stream (a local
//! file here, an object in `object_input`).
//!
//! A record is a line without its newline; a last line without one is still a record. The
//! offset after a record is the byte position just past it (past its newline). A byte
//! source's position is that offset as a varint, followed by whatever the source needs to
//! recognise its input again (an object's ETag and size); a file's position is the bare
//! varint, which is also what a version 2 manifest's input offset reads as.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow};

use crate::codec::{Put, Reader};
use crate::error::changed;

/// The longest record a newline-delimited input may hold (its newline not counted): a
/// longer line (or an input that is not newline-delimited) is an error, not an
/// allocation without end.
pub const MAX_RECORD_BYTES: usize = 64 << 20;

/// Where a task's input comes from. A checkpoint stores [`Source::position`]; the task
/// hands it back to [`Source::resume_at`] when it restores that checkpoint.
pub trait Source: Send {
    /// Position the source, once, before anything is read: at the start of the input
    /// (`None`, a fresh task) or at a checkpoint's position. A source that is not the input
    /// the position was taken of (replaced, truncated, another kind) refuses with a
    /// `StreamChanged` error.
    fn resume_at(&mut self, position: Option<&[u8]>) -> crate::Result<()>;
    /// Read the next record into `record` (cleared first). `false` at the end of input.
    fn next_record(&mut self, record: &mut Vec<u8>) -> crate::Result<bool>;
    /// Like `next_record`, but an input that has no end (a Kafka partition followed by a
    /// worker) answers [`Polled::Idle`] when no record came within `wait`, so the task can
    /// checkpoint and hear a stop while it waits. A source with an end never idles.
    fn poll_record(&mut self, record: &mut Vec<u8>, _wait: Duration) -> crate::Result<Polled> {
        Ok(if self.next_record(record)? {
            Polled::Record
        } else {
            Polled::End
        })
    }
    /// The input as one byte stream (stdio mode's stdin): fill `buf` from the current
    /// position, returning how many bytes were read; 0 at the end of input.
    fn read(&mut self, buf: &mut [u8]) -> crate::Result<usize>;
    /// Opaque bytes that name the position after everything returned so far.
    fn position(&self) -> Vec<u8>;
    /// Input bytes consumed so far (progress and statistics; not used to resume).
    fn offset(&self) -> u64;
    /// Where the record that starts at `offset` (a value of [`Source::offset`]) is, in
    /// the terms a user finds it by: "line 7 (byte offset 120)" in a file. Called only
    /// when something went wrong with that record, so it may read the input again.
    fn locate(&mut self, offset: u64) -> String {
        format!("input offset {offset}")
    }
}

/// What [`Source::poll_record`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Polled {
    /// A record, in the buffer.
    Record,
    /// Nothing yet: the input goes on, but no record came in time.
    Idle,
    /// The end of the input.
    End,
}

/// A byte stream that [`ByteLines`] cuts into records: positioned once, then read on.
pub trait ByteInput: Send {
    /// The bytes from where [`ByteInput::start`] positioned it.
    type Reader: Read + Send;
    /// Start reading at `offset`. `identity` is what a checkpoint recorded of the input
    /// (after the offset in its position), `None` on a fresh start: refuse another input.
    fn start(&mut self, offset: u64, identity: Option<&[u8]>) -> Result<Self::Reader>;
    /// What identifies this input: stored after the offset in every position.
    fn identity(&self) -> Vec<u8>;
    /// The input's name in messages.
    fn label(&self) -> String;
    /// How many newlines the input holds before byte `offset`, when that is cheap to
    /// learn (a local file); `None` otherwise.
    fn newlines_before(&mut self, _offset: u64) -> Option<u64> {
        None
    }
}

/// Newline-delimited records over a [`ByteInput`].
pub struct ByteLines<I: ByteInput> {
    input: I,
    reader: Option<BufReader<I::Reader>>,
    offset: u64,
    /// Appended to the offset in `position`: what identifies the input.
    identity: Vec<u8>,
}

impl<I: ByteInput> ByteLines<I> {
    /// The records of `input` (positioned when the task calls `resume_at`).
    pub fn new(input: I) -> Self {
        let identity = input.identity();
        Self {
            input,
            reader: None,
            offset: 0,
            identity,
        }
    }

    /// The reader, and the input for messages (named only when one is needed: this is
    /// on every record's path).
    fn reader(&mut self) -> Result<(&mut BufReader<I::Reader>, &I)> {
        match &mut self.reader {
            Some(reader) => Ok((reader, &self.input)),
            None => Err(anyhow!(
                "input {} is read before it was positioned (resume_at)",
                self.input.label()
            )),
        }
    }
}

impl<I: ByteInput> Source for ByteLines<I> {
    fn resume_at(&mut self, position: Option<&[u8]>) -> crate::Result<()> {
        let (offset, identity) = match position {
            None => (0, None),
            Some(position) => {
                let (offset, identity) = parse_byte_position(position, &self.input.label())?;
                (offset, Some(identity))
            }
        };
        let reader = self.input.start(offset, identity)?;
        self.reader = Some(BufReader::with_capacity(1 << 20, reader));
        self.offset = offset;
        Ok(())
    }

    fn next_record(&mut self, record: &mut Vec<u8>) -> crate::Result<bool> {
        record.clear();
        let offset = self.offset;
        let (reader, input) = self.reader()?;
        // One byte past the limit tells a record of exactly the limit from a longer one.
        let n = reader
            .take(MAX_RECORD_BYTES as u64 + 1)
            .read_until(b'\n', record)
            .map_err(crate::error::from_io)
            .with_context(|| format!("cannot read input {}", input.label()))?;
        if n == 0 {
            return Ok(false);
        }
        if record.len() > MAX_RECORD_BYTES && record.last() != Some(&b'\n') {
            return Err(crate::error::error(
                crate::ErrorKind::Other,
                format!(
                    "input {}: the record at byte offset {offset} is longer than {} MiB, the most \
                     wasnap reads as one record (is the input newline-delimited?)",
                    input.label(),
                    MAX_RECORD_BYTES >> 20
                ),
            )
            .into());
        }
        self.offset += n as u64;
        if record.last() == Some(&b'\n') {
            record.pop();
        }
        Ok(true)
    }

    fn read(&mut self, buf: &mut [u8]) -> crate::Result<usize> {
        let (reader, input) = self.reader()?;
        let n = reader
            .read(buf)
            .map_err(crate::error::from_io)
            .with_context(|| format!("cannot read input {}", input.label()))?;
        self.offset += n as u64;
        Ok(n)
    }

    fn position(&self) -> Vec<u8> {
        let mut position = Vec::with_capacity(10 + self.identity.len());
        position.put_varint(self.offset);
        position.extend_from_slice(&self.identity);
        position
    }

    fn offset(&self) -> u64 {
        self.offset
    }

    fn locate(&mut self, offset: u64) -> String {
        match self.input.newlines_before(offset) {
            Some(lines) => format!("line {} (byte offset {offset})", lines + 1),
            None => format!("input byte offset {offset}"),
        }
    }
}

/// Split a byte source's position into its offset and the identity bytes after it.
pub fn parse_byte_position<'a>(position: &'a [u8], input: &str) -> Result<(u64, &'a [u8])> {
    let what = format!("the checkpoint's position in input {input}");
    let mut r = Reader::new(position, &what);
    let offset = r.varint()?;
    let rest = r.remaining();
    Ok((offset, &position[position.len() - rest..]))
}

/// The most input bytes read again to give a failing record's line number.
const MAX_COUNTED_BYTES: u64 = 1 << 30;

/// A local file of newline-delimited records.
pub type LineSource = ByteLines<FileInput>;

/// A local file as a [`ByteInput`]. Its identity is empty: a file is known by its path.
pub struct FileInput {
    path: PathBuf,
}

impl LineSource {
    /// The file at `path` (opened when the task positions it).
    pub fn open_file(path: &Path) -> Self {
        ByteLines::new(FileInput {
            path: path.to_path_buf(),
        })
    }

    /// The file at `path`, positioned at byte `offset` (tests and tools).
    pub fn open(path: &Path, offset: u64) -> Result<Self> {
        let mut position = Vec::new();
        position.put_varint(offset);
        let mut source = Self::open_file(path);
        source
            .resume_at(Some(&position))
            .map_err(crate::Error::into_anyhow)?;
        Ok(source)
    }
}

impl ByteInput for FileInput {
    type Reader = File;

    fn start(&mut self, offset: u64, identity: Option<&[u8]>) -> Result<File> {
        let path = self.path.display();
        if identity.is_some_and(|id| !id.is_empty()) {
            return Err(changed!(
                "input {path} is a local file, but the checkpoint was taken reading an object (its position names an object version); run the task with the same --input"
            ));
        }
        // Non-blocking, so a FIFO with no writer cannot hang the open; then only a regular
        // file is taken (a device, a FIFO or a directory has no offsets to resume at).
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&self.path)
            .with_context(|| format!("cannot open input {path}"))?;
        let metadata = file
            .metadata()
            .with_context(|| format!("cannot stat input {path}"))?;
        if !metadata.is_file() {
            return Err(crate::error::error(
                crate::ErrorKind::Other,
                format!(
                    "input {path} is not a regular file (a device, a FIFO or a directory has no \
                     offsets to resume at)"
                ),
            ));
        }
        let len = metadata.len();
        if offset > len {
            return Err(changed!(
                "input {path} is {len} bytes but the checkpoint has consumed {offset}: the input was replaced or truncated"
            ));
        }
        file.seek(SeekFrom::Start(offset))
            .with_context(|| format!("cannot seek input {path}"))?;
        Ok(file)
    }

    fn identity(&self) -> Vec<u8> {
        Vec::new()
    }

    fn label(&self) -> String {
        self.path.display().to_string()
    }

    fn newlines_before(&mut self, offset: u64) -> Option<u64> {
        // On an error path: a line number is not worth reading gigabytes for.
        if offset > MAX_COUNTED_BYTES {
            return None;
        }
        // Opened as a resume would (a regular file only, at least `offset` long), then read
        // once up to `offset`.
        let mut file = self.start(offset, None).ok()?;
        file.seek(SeekFrom::Start(0)).ok()?;
        let mut reader = BufReader::with_capacity(1 << 20, file.take(offset));
        let (mut newlines, mut read) = (0u64, 0u64);
        loop {
            let buf = reader.fill_buf().ok()?;
            if buf.is_empty() {
                // Cut short while it was read: no line number rather than a wrong one.
                return (read == offset).then_some(newlines);
            }
            newlines += buf.iter().filter(|&&b| b == b'\n').count() as u64;
            let n = buf.len();
            read += n as u64;
            reader.consume(n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records(source: &mut dyn Source) -> Vec<(String, u64)> {
        let mut out = Vec::new();
        let mut buf = Vec::new();
        while source.next_record(&mut buf).unwrap() {
            out.push((String::from_utf8(buf.clone()).unwrap(), source.offset()));
        }
        out
    }

    #[test]
    fn offsets_point_past_each_record_and_resume_there() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("in");
        std::fs::write(&path, "ab\n\ncde\nlast").unwrap();
        let all = records(&mut LineSource::open(&path, 0).unwrap());
        assert_eq!(
            all,
            vec![
                ("ab".into(), 3),
                ("".into(), 4),
                ("cde".into(), 8),
                ("last".into(), 12)
            ]
        );
        let mut source = LineSource::open(&path, 0).unwrap();
        let mut record = Vec::new();
        source.next_record(&mut record).unwrap();
        source.next_record(&mut record).unwrap();
        let position = source.position();
        let resumed = records(
            &mut LineSource::open(&path, 0)
                .and_then(|mut s| {
                    s.resume_at(Some(&position))?;
                    Ok(s)
                })
                .unwrap(),
        );
        assert_eq!(resumed, all[2..].to_vec());
    }

    #[test]
    fn bytes_and_records_share_one_offset() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("in");
        std::fs::write(&path, "ab\ncd\n").unwrap();
        let mut source = LineSource::open(&path, 1).unwrap();
        let mut buf = [0u8; 4];
        assert_eq!(source.read(&mut buf).unwrap(), 4);
        assert_eq!(&buf, b"b\ncd");
        assert_eq!(source.offset(), 5);
        assert_eq!(records(&mut source), vec![("".into(), 6)]);
    }

    #[test]
    fn an_offset_past_the_end_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("in");
        std::fs::write(&path, "ab\n").unwrap();
        let err = LineSource::open(&path, 10).err().unwrap();
        assert!(format!("{err:#}").contains("replaced or truncated"));
    }

    #[test]
    fn an_object_position_does_not_open_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("in");
        std::fs::write(&path, "ab\n").unwrap();
        let mut position = Vec::new();
        position.put_varint(1);
        position.extend_from_slice(b"etag");
        let err = LineSource::open_file(&path)
            .resume_at(Some(&position))
            .unwrap_err();
        assert!(err.to_string().contains("reading an object"), "{err}");
        assert_eq!(err.kind(), crate::error::ErrorKind::StreamChanged);
    }
}
