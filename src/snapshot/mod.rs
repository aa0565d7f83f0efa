//! Capturing a paused guest's state, encoding it, and restoring it into a fresh instance.
//!
//! - `pages`: hash 64 KiB pages, diff against the last capture;
//! - `dirty`: which pages may have changed (hashing them all, or the kernel's record);
//! - `cache`: the last captured version of every page, the base of deltas, moved on by
//!   the committer after each capture;
//! - `buffers`: page copies the committer hands back for the next capture;
//! - `capture`: on the guest's thread, the only pause: hash, copy dirty pages out;
//! - `encode`: off the guest's thread: deltas or whole pages, compaction, the pack;
//! - `rebase`: where a full chain's next delta stands;
//! - `table`: every page's chain of frames (whole page, then deltas), and a component's
//!   kv runs;
//! - `kv`: a component's kv runs as frames of the checkpoint's pack;
//! - `restore`: rebuild memories and globals from a manifest and its packs.

pub mod buffers;
pub mod cache;
pub mod capture;
pub mod dirty;
pub mod encode;
pub mod kv;
pub mod pages;
pub(crate) mod parallel;
pub mod rebase;
pub mod restore;
pub mod table;

pub use buffers::PageBuffers;
pub use cache::PageCache;
pub use capture::{Capture, capture};
pub use dirty::{DirtyTracker, DirtyTracking};
pub use restore::{Restored, restore};
pub use table::PageTable;
