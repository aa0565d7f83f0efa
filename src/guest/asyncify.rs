//! The asyncify transform for stdio mode: binaryen's `wasm-opt --asyncify`, limited to
//! the one import a checkpoint may interrupt (`wasi_snapshot_preview1.fd_read`), so the
//! program can unwind its stack into linear memory there and rewind later, in this process
//! or after a restore in another.
//!
//! The transformed module is cached by the SHA-256 of the original and the `wasm-opt`
//! version, in `$WASNAP_CACHE_DIR`, else `$XDG_CACHE_HOME/wasnap`, else `~/.cache/wasnap`.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

/// The import where a checkpoint can be taken.
pub const UNWIND_IMPORT: &str = "wasi_snapshot_preview1.fd_read";

/// The `wasm-opt` to run: `$WASNAP_WASM_OPT`, else the one on `PATH`.
fn wasm_opt() -> PathBuf {
    std::env::var_os("WASNAP_WASM_OPT").map_or_else(|| PathBuf::from("wasm-opt"), PathBuf::from)
}

fn cache_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("WASNAP_CACHE_DIR") {
        return Some(PathBuf::from(dir));
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return Some(PathBuf::from(dir).join("wasnap"));
    }
    std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache/wasnap"))
}

/// `wasm-opt --version`, which goes into the cache key: another binaryen may transform
/// differently.
fn wasm_opt_version() -> Result<String> {
    let out = Command::new(wasm_opt()).arg("--version").output().with_context(|| {
        format!(
            "stdio mode needs binaryen's `wasm-opt` ({} could not be run; scripts/setup.sh installs it, \
             or set WASNAP_WASM_OPT)",
            wasm_opt().display()
        )
    })?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The asyncified form of `original`, from the cache or made now.
pub fn asyncify(original: &[u8]) -> Result<Vec<u8>> {
    let version = wasm_opt_version()?;
    let key = {
        let mut h = Sha256::new();
        h.update(original);
        let original_sha = crate::hex::encode(&h.finalize());
        let version_sha = crate::hex::encode(&Sha256::digest(version.as_bytes())[..8]);
        format!("{original_sha}-{version_sha}.wasm")
    };
    let cached = cache_dir().map(|dir| dir.join("asyncify").join(&key));
    if let Some(path) = &cached
        && let Ok(bytes) = std::fs::read(path)
        && wasmparser::Validator::new_with_features(wasmparser::WasmFeatures::all())
            .validate_all(&bytes)
            .is_ok()
    {
        tracing::debug!(path = %path.display(), "asyncified module from the cache");
        return Ok(bytes);
    }

    let scratch = tempfile::tempdir().context("cannot create a scratch directory")?;
    let input = scratch.path().join("program.wasm");
    let output = scratch.path().join("asyncified.wasm");
    std::fs::write(&input, original)?;
    let out = Command::new(wasm_opt())
        .arg(&input)
        .arg("--asyncify")
        .arg(format!("--pass-arg=asyncify-imports@{UNWIND_IMPORT}"))
        // Asyncify's instrumentation is slow unoptimised; binaryen recommends optimising.
        .arg("-O1")
        .arg("-o")
        .arg(&output)
        .output()
        .with_context(|| format!("cannot run {}", wasm_opt().display()))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let first = stderr.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
        bail!(
            "the asyncify transform ({version}) rejected the program: {}",
            first.trim()
        );
    }
    let bytes = std::fs::read(&output)?;
    if let Some(path) = &cached {
        // A cache that cannot be written only costs the transform next time.
        let write = || -> std::io::Result<()> {
            std::fs::create_dir_all(path.parent().expect("a file in a directory"))?;
            let tmp = path.with_extension(format!("tmp{}", std::process::id()));
            std::fs::write(&tmp, &bytes)?;
            std::fs::rename(&tmp, path)
        };
        if let Err(err) = write() {
            tracing::warn!(
                "cannot cache the asyncified module at {}: {err}",
                path.display()
            );
        }
    }
    Ok(bytes)
}
