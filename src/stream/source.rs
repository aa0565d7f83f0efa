//! Input: a file of newline-delimited records. The newline is not part of the record; a
//! last line without one is still a record. The offset after a record is the byte
//! position just past it (past its newline), which is what a checkpoint records.

use std::fs::File;
use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

pub struct LineSource {
    reader: BufReader<File>,
    offset: u64,
    path: PathBuf,
}

impl LineSource {
    /// Open `path` positioned at `offset` (0 on a fresh start; a checkpoint's offset on restore).
    pub fn open(path: &Path, offset: u64) -> Result<Self> {
        let mut file =
            File::open(path).with_context(|| format!("cannot open input {}", path.display()))?;
        let len = file
            .metadata()
            .with_context(|| format!("cannot stat input {}", path.display()))?
            .len();
        if offset > len {
            bail!(
                "input {} is {len} bytes but the checkpoint has consumed {offset}: the input was replaced or truncated",
                path.display()
            );
        }
        file.seek(SeekFrom::Start(offset))
            .with_context(|| format!("cannot seek input {}", path.display()))?;
        Ok(Self {
            reader: BufReader::with_capacity(1 << 20, file),
            offset,
            path: path.to_path_buf(),
        })
    }

    /// Read the next record into `record` (cleared first). `false` at the end of input.
    pub fn next_record(&mut self, record: &mut Vec<u8>) -> Result<bool> {
        record.clear();
        let n = self
            .reader
            .read_until(b'\n', record)
            .with_context(|| format!("cannot read input {}", self.path.display()))?;
        if n == 0 {
            return Ok(false);
        }
        self.offset += n as u64;
        if record.last() == Some(&b'\n') {
            record.pop();
        }
        Ok(true)
    }

    /// Byte position after the last record returned.
    pub fn offset(&self) -> u64 {
        self.offset
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records(source: &mut LineSource) -> Vec<(String, u64)> {
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
        let resumed = records(&mut LineSource::open(&path, 4).unwrap());
        assert_eq!(resumed, all[2..].to_vec());
    }

    #[test]
    fn an_offset_past_the_end_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("in");
        std::fs::write(&path, "ab\n").unwrap();
        let err = LineSource::open(&path, 10).err().unwrap();
        assert!(format!("{err:#}").contains("replaced or truncated"));
    }
}
