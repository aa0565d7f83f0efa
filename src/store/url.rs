//! Store URLs: which `ObjectStore` backend a `--store` argument names.

use std::sync::Arc;

use anyhow::{Context, Result, bail};
use object_store::ObjectStore;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;

/// Open the object store a `--store` argument names:
/// - `DIR` or `file:///DIR`: a local directory (created if missing), every write fsynced;
/// - `memory://`: in memory, gone when the process exits (tests, trying things out).
pub fn open_object_store(url: &str) -> Result<Arc<dyn ObjectStore>> {
    if url == "memory://" || url == "memory:///" {
        return Ok(Arc::new(InMemory::new()));
    }
    let dir = if let Some(path) = url.strip_prefix("file://") {
        if !path.starts_with('/') {
            bail!("store URL {url:?}: a file:// URL needs an absolute path (file:///path/to/dir)");
        }
        path
    } else if let Some((scheme, _)) = url.split_once("://") {
        bail!(
            "store URL {url:?}: unknown scheme `{scheme}` (expected a directory, file:///DIR or memory://)"
        );
    } else {
        url
    };
    if dir.is_empty() {
        bail!("store URL is empty");
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create store directory {dir}"))?;
    // fsync is off by default in object_store; a checkpoint that is not on disk is not a checkpoint.
    let fs = LocalFileSystem::new_with_prefix(dir)
        .with_context(|| format!("cannot open store directory {dir}"))?
        .with_fsync(true);
    Ok(Arc::new(fs))
}
