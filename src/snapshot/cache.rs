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
use memmap2::MmapMut;

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
    map: Option<MmapMut>,
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
    /// (see [`Self::writable_page`]), so a large memory that is mostly zero costs little.
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

    /// Page `page` of memory `index`, writable, its blocks allocated on disk first.
    fn writable_page(&mut self, index: usize, page: usize) -> Result<&mut [u8]> {
        let memory = &mut self.memories[index];
        let len = memory.map.as_ref().map_or(0, |m| m.len());
        let start = page * PAGE_SIZE;
        let end = (start + PAGE_SIZE).min(len);
        allocate_range(&memory.file, start as u64..end as u64).with_context(|| {
            format!(
                "cannot allocate page cache {}",
                self.dir.join(format!("memory-{index}.pages")).display()
            )
        })?;
        Ok(page_mut(self.bytes_mut(index), page))
    }

    /// Make page `page` of memory `index` zero, giving its disk back where possible.
    fn zero_page(&mut self, index: usize, page: usize) -> Result<()> {
        let memory = &self.memories[index];
        let len = memory.map.as_ref().map_or(0, |m| m.len());
        let start = page * PAGE_SIZE;
        let end = (start + PAGE_SIZE).min(len);
        if !punch_hole(&memory.file, start as u64..end as u64) {
            self.writable_page(index, page)?.fill(0);
        }
        Ok(())
    }

    fn bytes(&self, index: usize) -> &[u8] {
        self.memories[index].map.as_deref().unwrap_or(&[])
    }

    /// Every cached page of memory `index`, writable (the capture updates the dirty ones).
    pub fn bytes_mut(&mut self, index: usize) -> &mut [u8] {
        self.memories[index].map.as_deref_mut().unwrap_or(&mut [])
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
        self.writable_page(index, page)?[..bytes.len()].copy_from_slice(bytes);
        Ok(())
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
            let slot = self.writable_page(page.memory, page.page as usize)?;
            let vouched = page
                .previous_hash
                .is_some_and(|hash| vouches_for(slot, hash));
            if vouched {
                page.base = Some(buffers.copy_of(slot));
                let parts = slot.chunks_mut(PART_SIZE).zip(page.bytes.chunks(PART_SIZE));
                for (part, (cached, new)) in parts.enumerate() {
                    if page.written_parts & (1 << part) != 0 {
                        cached.copy_from_slice(new);
                    }
                }
            } else {
                slot.copy_from_slice(&page.bytes);
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

/// The bytes of page `page` in `bytes`, writable.
fn page_mut(bytes: &mut [u8], page: usize) -> &mut [u8] {
    let start = page * PAGE_SIZE;
    let end = (start + PAGE_SIZE).min(bytes.len());
    &mut bytes[start..end]
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

/// Allocate the blocks of `range` of `file` for real (they read as zeros where they were
/// holes): a write through the mapping into a hole on a full disk would kill the process
/// with SIGBUS, where this returns the error.
fn allocate_range(file: &File, range: std::ops::Range<u64>) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let (Ok(offset), Ok(len)) = (
        libc::off_t::try_from(range.start),
        libc::off_t::try_from(range.end - range.start),
    ) else {
        return Err(std::io::Error::other("page cache size out of range"));
    };
    if len == 0 {
        return Ok(());
    }
    // SAFETY: a plain syscall on a file descriptor this `File` owns.
    match unsafe { libc::posix_fallocate(file.as_raw_fd(), offset, len) } {
        0 => Ok(()),
        errno => Err(std::io::Error::from_raw_os_error(errno)),
    }
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
        // which this process holds an exclusive lock on, and nothing else maps it. A
        // change behind our back would show as a hash mismatch, not as unsoundness in
        // safe code, because the mapping is only read as plain bytes.
        let map = unsafe { MmapMut::map_mut(&self.file) }
            .with_context(|| format!("cannot map page cache {}", path.display()))?;
        self.map = Some(map);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
