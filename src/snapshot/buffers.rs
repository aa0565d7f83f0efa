//! Page buffers, handed back by the committer once a checkpoint's pages are encoded and
//! reused by the next capture.
//!
//! Why: a capture copies every dirty page and its previous version into buffers of their
//! own. Freshly allocated, each 64 KiB buffer costs 16 page faults and the kernel zeroing
//! 16 pages before the copy even starts, and the allocator hands freed buffers back to
//! the kernel as soon as a checkpoint's worth is freed at once. Once hashing no longer
//! takes the pause (kernel dirty tracking), that was most of what remained of it.

use std::sync::{Arc, Mutex};

/// Buffers kept at most: 64 MiB of 64 KiB pages. A larger checkpoint allocates the rest.
/// Tasks share one pool (`PageBuffers::shared`), so this bounds a whole worker.
const MAX_KEPT: usize = 1024;

#[derive(Clone, Default)]
pub struct PageBuffers {
    spare: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl PageBuffers {
    /// The process's pool, shared by all its tasks: buffers are interchangeable, and one
    /// bound holds for a worker of many tasks as for one run.
    pub fn shared() -> Self {
        static SHARED: std::sync::OnceLock<PageBuffers> = std::sync::OnceLock::new();
        SHARED.get_or_init(PageBuffers::default).clone()
    }

    /// A copy of `bytes`, in a reused buffer when one is spare.
    pub fn copy_of(&self, bytes: &[u8]) -> Vec<u8> {
        let spare = self.spare.lock().ok().and_then(|mut spare| spare.pop());
        match spare {
            Some(mut buffer) => {
                buffer.clear();
                buffer.extend_from_slice(bytes);
                buffer
            }
            None => bytes.to_vec(),
        }
    }

    /// Keep `buffers` for later copies (as many as the pool has room for).
    pub fn give_back(&self, buffers: impl IntoIterator<Item = Vec<u8>>) {
        if let Ok(mut spare) = self.spare.lock() {
            let room = MAX_KEPT.saturating_sub(spare.len());
            spare.extend(buffers.into_iter().take(room));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_given_back_are_reused_with_the_new_bytes_only() {
        let pool = PageBuffers::default();
        let first = pool.copy_of(&[7u8; 100]);
        let address = first.as_ptr();
        pool.give_back([first]);
        let second = pool.copy_of(&[1, 2, 3]);
        assert_eq!(second, vec![1, 2, 3]);
        assert_eq!(second.as_ptr(), address, "the buffer was not reused");
        // The pool keeps at most MAX_KEPT.
        pool.give_back((0..MAX_KEPT + 10).map(|_| vec![0u8; 4]));
        assert_eq!(pool.spare.lock().unwrap().len(), MAX_KEPT);
    }
}
