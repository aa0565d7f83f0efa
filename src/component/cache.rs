//! The compiled-component cache: compiling a large component (a Python processor is
//! 18 MB of wasm) takes 15–30 s here, and every `wasnap run` of it, every restart after a
//! crash, would pay that again. A compiled component (`Component::serialize`) is kept
//! under the user's cache directory, named by what decides its bytes: the instrumented
//! component's SHA-256, wasmtime's version and the engine's settings
//! (`Engine::precompile_compatibility_hash`).
//!
//! A cache file is only ever one wasnap wrote (temporary file, then rename), read with
//! no symlink followed and a size cap; anything wrong with it means compiling again. A
//! compiled component is native code, so the directory must be this user's own and
//! writable by nobody else (wasnap makes it so, 0700); otherwise it is not used.

use std::hash::{Hash, Hasher};
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

/// The wasmtime release wasnap is built with (pinned exactly in Cargo.toml).
const WASMTIME_VERSION: &str = "48.0.8";

/// The largest cache file read.
const MAX_CACHED_BYTES: u64 = 1 << 30;

/// Where compiled components are kept: `$WASNAP_COMPONENT_CACHE`, else
/// `$XDG_CACHE_HOME/wasnap/components` (`~/.cache/...`). `None` turns caching off.
fn cache_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("WASNAP_COMPONENT_CACHE") {
        return (!dir.is_empty()).then(|| PathBuf::from(dir));
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("wasnap").join("components"))
}

fn cache_key(engine: &Engine, wasm: &[u8]) -> String {
    let mut settings = std::collections::hash_map::DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut settings);
    let digest = Sha256::new()
        .chain_update(wasm)
        .chain_update(WASMTIME_VERSION)
        .chain_update(settings.finish().to_le_bytes())
        .finalize();
    crate::hex::encode(&digest)
}

/// Whether the last [`compile`] found its component in the cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    Cache,
    Compiled,
}

/// Compile `wasm` (an instrumented component), or load it from the cache.
pub fn compile(engine: &Engine, wasm: &[u8]) -> Result<(Component, Origin)> {
    let Some(dir) = cache_dir() else {
        return Ok((Component::new(engine, wasm)?, Origin::Compiled));
    };
    if let Err(err) = own_private_dir(&dir) {
        tracing::warn!(
            "not caching compiled components in {}: {err:#}",
            dir.display()
        );
        return Ok((Component::new(engine, wasm)?, Origin::Compiled));
    }
    let path = dir.join(format!("{}.cwasm", cache_key(engine, wasm)));
    if let Some(bytes) = read_cached(&path) {
        // SAFETY: the file is one this user's wasnap serialized with an engine of these
        // very settings (its name says so); wasmtime checks its header and version too.
        match unsafe { Component::deserialize(engine, &bytes) } {
            Ok(component) => return Ok((component, Origin::Cache)),
            Err(err) => tracing::warn!(
                "compiling again: cached {} is unusable: {err}",
                path.display()
            ),
        }
    }
    let component = Component::new(engine, wasm)?;
    if let Err(err) = write_cached(&dir, &path, &component) {
        tracing::warn!(
            "cannot cache the compiled component in {}: {err:#}",
            dir.display()
        );
    }
    Ok((component, Origin::Compiled))
}

/// Make `dir` (0700) if it is missing, and check it is a directory (not a symlink) owned
/// by this user that no one else can write to.
fn own_private_dir(dir: &std::path::Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    if std::fs::symlink_metadata(dir).is_err() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .context("cannot create the cache directory")?;
    }
    let meta = std::fs::symlink_metadata(dir).context("cannot read the cache directory")?;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if !meta.is_dir() {
        anyhow::bail!("it is not a directory");
    }
    if meta.uid() != me {
        anyhow::bail!("it belongs to user {}, not to this user ({me})", meta.uid());
    }
    if meta.mode() & 0o022 != 0 {
        anyhow::bail!("others can write to it (mode {:o})", meta.mode() & 0o777);
    }
    Ok(())
}

fn read_cached(path: &std::path::Path) -> Option<Vec<u8>> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .ok()?;
    let meta = file.metadata().ok()?;
    if !meta.is_file() || meta.len() > MAX_CACHED_BYTES {
        return None;
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(MAX_CACHED_BYTES).read_to_end(&mut bytes).ok()?;
    Some(bytes)
}

fn write_cached(
    dir: &std::path::Path,
    path: &std::path::Path,
    component: &Component,
) -> Result<()> {
    let bytes = component.serialize()?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    std::io::Write::write_all(&mut tmp, &bytes)?;
    tmp.persist(path)?;
    Ok(())
}
