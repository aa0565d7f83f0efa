//! Capturing a paused guest's state and restoring it into a fresh instance.
//!
//! - `pages`: hash 64 KiB pages, diff against the last committed table;
//! - `table`: the page table of the last committed checkpoint (hash + where each page lives);
//! - `capture`: globals + page changes of a paused instance, and the next table;
//! - `restore`: rebuild memories and globals from a manifest and its packs.

pub mod capture;
pub mod pages;
pub mod restore;
pub mod table;

pub use capture::{Delta, capture};
pub use pages::PAGE_SIZE;
pub use restore::restore;
pub use table::{PageTable, StoredPage};
