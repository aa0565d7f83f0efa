//! Store URLs: which `ObjectStore` backend a `--store` argument names.

use std::sync::Arc;

use anyhow::{Context, Result, bail};
use std::time::Duration;

use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::prefix::PrefixStore;
use object_store::{BackoffConfig, ObjectStore, RetryConfig};

/// Open the object store a `--store` argument names:
/// - `DIR` or `file:///DIR`: a local directory (created if missing), every write fsynced;
/// - `s3://BUCKET[/PREFIX]`: S3, configured the usual way from the environment
///   (`AWS_ENDPOINT`, `AWS_ALLOW_HTTP`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
///   `AWS_REGION`, …);
/// - `memory://`: in memory, gone when the process exits (tests, trying things out).
pub fn open_object_store(url: &str) -> Result<Arc<dyn ObjectStore>> {
    open_object_store_with(url, true)
}

/// [`open_object_store`]; a local directory that does not exist is created only if
/// `create` (a run), else an error (`inspect`, `gc`, `cat` only read what is there).
pub fn open_object_store_with(url: &str, create: bool) -> Result<Arc<dyn ObjectStore>> {
    if url == "memory://" || url == "memory:///" {
        return Ok(Arc::new(InMemory::new()));
    }
    // `s3:/bucket` is a typo, not a local directory named `s3:`.
    for scheme in ["s3:", "file:", "memory:"] {
        if url.starts_with(scheme) && !url.starts_with(&format!("{scheme}//")) {
            bail!("store URL {url:?}: {scheme} needs two slashes ({scheme}//…)");
        }
    }
    if let Some(rest) = url.strip_prefix("s3://") {
        return open_s3(url, rest);
    }
    let dir = if let Some(path) = url.strip_prefix("file://") {
        if !path.starts_with('/') {
            bail!("store URL {url:?}: a file:// URL needs an absolute path (file:///path/to/dir)");
        }
        path
    } else if let Some((scheme, _)) = url.split_once("://") {
        bail!(
            "store URL {url:?}: unknown scheme `{scheme}` (expected a directory, file:///DIR, s3://BUCKET/PREFIX or memory://)"
        );
    } else {
        url
    };
    if dir.is_empty() {
        bail!("store URL is empty");
    }
    if !create && !std::path::Path::new(dir).is_dir() {
        bail!("store directory {dir} does not exist");
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create store directory {dir}"))?;
    // fsync is off by default in object_store; a checkpoint that is not on disk is not a checkpoint.
    let fs = LocalFileSystem::new_with_prefix(dir)
        .with_context(|| format!("cannot open store directory {dir}"))?
        .with_fsync(true);
    Ok(Arc::new(super::local::CheckedLocal::new(fs, dir.into())))
}

/// The directory a local store URL names (`DIR` or `file:///DIR`), or `None` for S3 and
/// memory stores.
pub fn local_dir(url: &str) -> Option<&str> {
    if url.starts_with("memory://") || url.starts_with("s3://") {
        return None;
    }
    match url.strip_prefix("file://") {
        Some(path) => Some(path),
        None if url.contains("://") => None,
        None => Some(url),
    }
}

/// Transient S3 errors (5xx, dropped connections) are retried with exponential backoff
/// inside a checkpoint; past this budget the checkpoint fails and the run stops.
fn s3_retry() -> RetryConfig {
    let budget = std::env::var("WASNAP_S3_RETRY_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    RetryConfig {
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            base: 2.0,
        },
        max_retries: 8,
        retry_timeout: Duration::from_secs(budget),
    }
}

/// Whether the environment names an S3 endpoint (object_store reads any of these).
pub(crate) fn s3_endpoint_configured() -> bool {
    ["AWS_ENDPOINT", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"]
        .iter()
        .any(|var| std::env::var_os(var).is_some())
}

/// With no endpoint configured, object_store talks to AWS itself: right in production,
/// a surprise for someone who meant a local S3 server. Said once per process.
fn warn_if_no_endpoint(url: &str) {
    static WARNED: std::sync::Once = std::sync::Once::new();
    if !s3_endpoint_configured() {
        WARNED.call_once(|| {
            tracing::warn!(
                "{url}: AWS_ENDPOINT is not set, so S3 requests go to AWS itself (set it for \
                 another S3 server, e.g. AWS_ENDPOINT=http://127.0.0.1:9000; for AWS, \
                 https://s3.REGION.amazonaws.com says so and silences this)"
            );
        });
    }
}

fn open_s3(url: &str, rest: &str) -> Result<Arc<dyn ObjectStore>> {
    warn_if_no_endpoint(url);
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        bail!("store URL {url:?}: no bucket (expected s3://BUCKET/PREFIX)");
    }
    // Errors from the builder name the setting, never its value: no credential leaks.
    let s3 = AmazonS3Builder::from_env()
        .with_bucket_name(bucket)
        .with_retry(s3_retry())
        .build()
        .with_context(|| format!("cannot configure S3 for store {url:?}"))?;
    let prefix = prefix.trim_matches('/');
    Ok(if prefix.is_empty() {
        Arc::new(s3)
    } else {
        Arc::new(PrefixStore::new(s3, prefix))
    })
}
