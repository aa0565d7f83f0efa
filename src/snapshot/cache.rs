//! The local page cache: the last captured version of every page, the base each dirty
//! page is delta-encoded against. One memory-mapped file per guest memory, so a guest
//! of many GiB does not need as much again in anonymous memory: the kernel pages the
//! cache out and in.
//!
//! Never trusted blindly: before a cached page is used as a base its XXH3 hash is checked
//! against the hash of the version last captured; a page that fails the check is written
//! whole instead. After a restart the cache is brought back in line with the restored
//! memory, page by page (a cache lost or damaged is thereby rebuilt).

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use memmap2::Mmap;

use super::buffers::PageBuffers;
use super::capture::Capture;
use super::dirty::PART_SIZE;
use super::pages::{self, PAGE_SIZE};

pub struct PageCache {
    dir: PathBuf,
    memories: Vec<CachedMemory>,
}

struct CachedMemory {
    file: File,
    /// `None` while the memory is empty (a zero-length file cannot be mapped).
    /// Read-only: every write goes through the file (`PageCache::write_at`).
    map: Option<Mmap>,
}

impl PageCache {
    /// Open (creating if needed) the cache files for `memory_count` memories in `dir`.
    /// The cache is wasnap's own: a link or a special file found in place of a cache
    /// file is removed (never followed), and `dir` itself must not be a link.
    pub fn open(dir: &Path, memory_count: usize) -> Result<Self> {
        if std::fs::symlink_metadata(dir).is_ok_and(|m| m.file_type().is_symlink()) {
            anyhow::bail!(
                "page cache directory {} is a symbolic link; wasnap does not follow links \
                 it did not make (give the directory it points to with --cache-dir)",
                dir.display()
            );
        }
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create page cache directory {}", dir.display()))?;
        let memories = (0..memory_count)
            .map(|index| {
                let path = dir.join(format!("memory-{index}.pages"));
                let file = open_cache_file(&path)?;
                let mut memory = CachedMemory { file, map: None };
                let len = memory.file.metadata()?.len();
                memory.map_len(len, &path)?;
                Ok(memory)
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            dir: dir.to_path_buf(),
            memories,
        })
    }

    fn path(&self, index: usize) -> PathBuf {
        self.dir.join(format!("memory-{index}.pages"))
    }

    /// Make memory `index`'s cache exactly `byte_len` bytes long (new pages read as zero).
    /// The file stays sparse: a page takes disk only once a non-zero version is written
    /// (see [`Self::write_at`]), so a large memory that is mostly zero costs little.
    pub fn resize(&mut self, index: usize, byte_len: u64) -> Result<()> {
        let path = self.path(index);
        let memory = &mut self.memories[index];
        let old_len = memory.map.as_ref().map_or(0, |m| m.len() as u64);
        if old_len == byte_len {
            return Ok(());
        }
        memory.map = None;
        memory.file.set_len(byte_len).with_context(|| {
            format!(
                "cannot resize page cache {} to {byte_len} bytes",
                path.display()
            )
        })?;
        memory.map_len(byte_len, &path)
    }

    /// Write `bytes` at `offset` of memory `index`'s cache. Through the file, never
    /// through the mapping (which only reads; on Linux both see the same page cache).
    /// Through the mapping, a write to a page the file has no block for yet (a new page,
    /// a hole) faults it in, and the kernel zeroes it and the read-ahead around it first:
    /// on a large guest's first checkpoint that was most of the committer's time. And a
    /// full disk is an error here, where through the mapping it kills the process
    /// (SIGBUS).
    fn write_at(&mut self, index: usize, offset: usize, bytes: &[u8]) -> Result<()> {
        use std::os::unix::fs::FileExt;
        self.memories[index]
            .file
            .write_all_at(bytes, offset as u64)
            .with_context(|| format!("cannot write page cache {}", self.path(index).display()))
    }

    /// Make page `page` of memory `index` zero, giving its disk back where possible.
    fn zero_page(&mut self, index: usize, page: usize) -> Result<()> {
        let memory = &self.memories[index];
        let len = memory.map.as_ref().map_or(0, |m| m.len());
        let start = page * PAGE_SIZE;
        let end = (start + PAGE_SIZE).min(len);
        if !punch_hole(&memory.file, start as u64..end as u64) {
            self.write_at(index, start, &vec![0; end - start])?;
        }
        Ok(())
    }

    fn bytes(&self, index: usize) -> &[u8] {
        self.memories[index].map.as_deref().unwrap_or(&[])
    }

    /// The cached version of page `page` of memory `index`, if the cache has that page and
    /// its hash is `expected` (the hash of the version last captured).
    #[cfg(test)]
    pub fn verified_page(&self, index: usize, page: usize, expected: u64) -> Option<&[u8]> {
        let bytes = self.bytes(index);
        if page * PAGE_SIZE >= bytes.len() {
            return None;
        }
        let cached = pages::page(bytes, page);
        vouches_for(cached, expected).then_some(cached)
    }

    /// Overwrite page `page` of memory `index` (the cache must be long enough).
    pub fn store_page(&mut self, index: usize, page: usize, bytes: &[u8]) -> Result<()> {
        self.write_at(index, page * PAGE_SIZE, bytes)
    }

    /// Bring memory `index`'s cache in line with `memory` (whose page hashes are
    /// `hashes`): every page whose cached hash differs is rewritten. Returns how many were.
    pub fn sync_with(&mut self, index: usize, memory: &[u8], hashes: &[u64]) -> Result<usize> {
        self.resize(index, memory.len() as u64)?;
        let cached_hashes = pages::hash_pages(self.bytes(index));
        let mut rewritten = 0;
        for (page, (hash, cached)) in hashes.iter().zip(&cached_hashes).enumerate() {
            if hash != cached {
                let new = pages::page(memory, page);
                if new.iter().all(|b| *b == 0) {
                    self.zero_page(index, page)?;
                } else {
                    self.store_page(index, page, new)?;
                }
                rewritten += 1;
            }
        }
        Ok(rewritten)
    }

    /// Move the cache from the last capture's versions to `capture`'s, taking each dirty
    /// page's previous version out on the way as its delta base (where the cache vouches
    /// for it by hash). Runs on the committer, in capture order, so the cache always holds
    /// the versions the next capture's pages are based on; never during the pause.
    ///
    /// Where the base vouched, only the parts the capture says were written are rewritten:
    /// the rest is the same in both versions. Where it did not (damaged, or the page is
    /// new), the page is written whole, which heals it. A part the tracker failed to name
    /// leaves the cache wrong for that page: its next base fails the check and that page
    /// is written whole, so it costs compression, never data.
    pub fn advance(&mut self, capture: &mut Capture, buffers: &PageBuffers) -> Result<()> {
        let mut old_lens = Vec::with_capacity(capture.memories.len());
        for (index, memory) in capture.memories.iter().enumerate() {
            old_lens.push(self.bytes(index).len());
            self.resize(index, memory.byte_len)?;
        }
        for page in &mut capture.dirty {
            let start = page.page as usize * PAGE_SIZE;
            let slot = pages::page(self.bytes(page.memory), page.page as usize);
            let vouched = page
                .previous_hash
                .is_some_and(|hash| vouches_for(slot, hash));
            if vouched {
                page.base = Some(buffers.copy_of(slot));
                for parts in written_runs(page.written_parts, page.bytes.len()) {
                    self.write_at(page.memory, start + parts.start, &page.bytes[parts])?;
                }
            } else {
                self.write_at(page.memory, start, &page.bytes)?;
            }
        }
        for &(memory, page) in &capture.zeroed {
            // A page beyond the old length is new, and zero in the cache already: writing
            // it would only allocate file pages for nothing.
            if (page as usize) * PAGE_SIZE < old_lens[memory] {
                self.zero_page(memory, page as usize)?;
            }
        }
        Ok(())
    }
}

/// The byte ranges of a page of `len` bytes that `written_parts` marks (bit `i`: 4 KiB
/// part `i`), adjacent parts joined: one write each.
fn written_runs(written_parts: u16, len: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
    // At most 16 parts: one per bit of `written_parts` (a page is 64 KiB).
    let parts = len.div_ceil(PART_SIZE).min(16);
    let written = move |part: usize| part < parts && written_parts & (1 << part) != 0;
    let mut part = 0;
    std::iter::from_fn(move || {
        while part < parts && !written(part) {
            part += 1;
        }
        let first = part;
        while written(part) {
            part += 1;
        }
        (first < parts).then(|| first * PART_SIZE..(part * PART_SIZE).min(len))
    })
}

/// Whether a cached page is the version whose hash is `expected`: the check before any
/// cached page is used.
pub fn vouches_for(cached: &[u8], expected: u64) -> bool {
    pages::hash_page(cached) == expected
}

/// Open a cache file, creating it: never through a link, and only a regular file. What
/// is in its place otherwise (a link someone planted, a FIFO) is removed first.
fn open_cache_file(path: &Path) -> Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    if let Ok(found) = std::fs::symlink_metadata(path)
        && !found.is_file()
    {
        if found.is_dir() {
            anyhow::bail!("page cache file {} is a directory", path.display());
        }
        tracing::warn!(
            "page cache file {} is a link or a special file: replaced",
            path.display()
        );
        std::fs::remove_file(path).with_context(|| format!("cannot remove {}", path.display()))?;
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .with_context(|| format!("cannot open page cache {}", path.display()))?;
    if !file.metadata()?.is_file() {
        anyhow::bail!("page cache {} is not a regular file", path.display());
    }
    Ok(file)
}

/// Turn `range` of `file` back into a hole (it reads as zeros, and takes no disk), or, where
/// the file system cannot, report that it could not.
fn punch_hole(file: &File, range: std::ops::Range<u64>) -> bool {
    use std::os::fd::AsRawFd;
    let (Ok(offset), Ok(len)) = (
        libc::off_t::try_from(range.start),
        libc::off_t::try_from(range.end - range.start),
    ) else {
        return false;
    };
    // SAFETY: a plain syscall on a file descriptor this `File` owns.
    unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        ) == 0
    }
}

impl CachedMemory {
    fn map_len(&mut self, len: u64, path: &Path) -> Result<()> {
        if len == 0 {
            self.map = None;
            return Ok(());
        }
        // SAFETY: the file is private to this task: it sits beside the task's output,
        // which this process holds an exclusive lock on, and nothing else maps it. The
        // cache's own writes go through the file while no slice of the mapping is held
        // (`write_at` takes `&mut self`). A change behind our back would show as a hash
        // mismatch, not as unsoundness in safe code, because the mapping is only read as
        // plain bytes.
        let map = unsafe { Mmap::map(&self.file) }
            .with_context(|| format!("cannot map page cache {}", path.display()))?;
        self.map = Some(map);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_parts_become_one_write_per_run() {
        let runs = |parts: u16, len: usize| written_runs(parts, len).collect::<Vec<_>>();
        const P: usize = PART_SIZE;
        assert!(runs(0, PAGE_SIZE).is_empty());
        assert_eq!(runs(u16::MAX, PAGE_SIZE), vec![0..PAGE_SIZE]);
        assert_eq!(runs(0b1, PAGE_SIZE), vec![0..P]);
        assert_eq!(runs(0b1000_0000_0000_0000, PAGE_SIZE), vec![15 * P..16 * P]);
        assert_eq!(
            runs(0b1100_0000_0110_1101, PAGE_SIZE),
            vec![0..P, 2 * P..4 * P, 5 * P..7 * P, 14 * P..16 * P]
        );
        // A page shorter than 64 KiB: parts past its end are ignored, the last is cut.
        assert_eq!(runs(u16::MAX, 2 * P + 100), vec![0..2 * P + 100]);
        assert!(runs(0b1_0000, 2 * P).is_empty());
    }

    #[test]
    fn pages_are_verified_before_use_and_the_cache_resyncs() {
        let dir = tempfile::tempdir().unwrap();
        let mut memory = vec![0u8; 3 * PAGE_SIZE];
        memory[PAGE_SIZE + 5] = 9;
        let hashes = pages::hash_pages(&memory);

        let mut cache = PageCache::open(dir.path(), 1).unwrap();
        assert!(
            cache.verified_page(0, 1, hashes[1]).is_none(),
            "empty cache"
        );
        assert_eq!(cache.sync_with(0, &memory, &hashes).unwrap(), 1);
        assert_eq!(
            cache.verified_page(0, 1, hashes[1]).unwrap(),
            &memory[PAGE_SIZE..2 * PAGE_SIZE]
        );
        drop(cache);

        // Damage the file behind the cache's back: the page no longer verifies.
        let path = dir.path().join("memory-0.pages");
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[PAGE_SIZE + 6] = 1;
        std::fs::write(&path, bytes).unwrap();
        let mut cache = PageCache::open(dir.path(), 1).unwrap();
        assert!(cache.verified_page(0, 1, hashes[1]).is_none());
        assert_eq!(cache.sync_with(0, &memory, &hashes).unwrap(), 1);
        assert!(cache.verified_page(0, 1, hashes[1]).is_some());
    }
}
