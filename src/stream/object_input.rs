//! Input from object storage: `s3://BUCKET/KEY`, newline-delimited records read with ranged
//! GETs of [`BLOCK_BYTES`], [`READ_AHEAD`] blocks ahead on a thread of their own, so the
//! guest does not wait on each GET.
//!
//! The position is the byte offset followed by the object's size and ETag, taken with a
//! HEAD when the source opens. A restore checks them against the object as it is now: a
//! replaced input is an error, never a silent mix of two inputs. Every GET is conditional
//! on the ETag too (`If-Match`), so a replacement during a run stops the run.

use std::io::Read;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender};

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use object_store::path::Path;
use object_store::{GetOptions, GetRange, ObjectStore, ObjectStoreExt};

use super::source::{ByteInput, ByteLines};
use crate::codec::{Put, Reader};
use crate::error::{ErrorKind, Kinded, StoreUnavailable, changed};

/// Bytes per ranged GET.
pub const BLOCK_BYTES: u64 = 8 << 20;
/// Blocks fetched ahead of the one being read.
pub const READ_AHEAD: usize = 3;

/// Records of an object in object storage.
pub type ObjectSource = ByteLines<ObjectInput>;

/// What identifies one version of an object.
#[derive(Debug, PartialEq, Eq)]
struct Version {
    size: u64,
    etag: Option<String>,
}

impl Version {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.put_varint(self.size);
        let etag = self.etag.as_deref().unwrap_or("");
        out.put_varint(etag.len() as u64);
        out.extend_from_slice(etag.as_bytes());
        out
    }

    fn decode(bytes: &[u8], url: &str) -> Result<Self> {
        let what = format!("the checkpoint's position in input {url}");
        let mut r = Reader::new(bytes, &what);
        let size = r.varint()?;
        let len = r.varint_count(1)?;
        let etag = String::from_utf8(r.bytes(len)?.to_vec())
            .map_err(|_| crate::error::corrupt!("{what} is corrupt: its ETag is not UTF-8"))?;
        Ok(Self {
            size,
            etag: (!etag.is_empty()).then_some(etag),
        })
    }

    fn describe(&self) -> String {
        match &self.etag {
            Some(etag) => format!("{} bytes, ETag {etag}", self.size),
            None => format!("{} bytes", self.size),
        }
    }
}

/// Split `s3://BUCKET/KEY` into the bucket's URL and the key.
pub fn split_object_url(url: &str) -> Result<(String, Path)> {
    let rest = url
        .strip_prefix("s3://")
        .ok_or_else(|| anyhow!("input URL {url:?}: expected s3://BUCKET/KEY"))?;
    match rest.split_once('/') {
        Some((bucket, key)) if !bucket.is_empty() && !key.trim_matches('/').is_empty() => {
            Ok((format!("s3://{bucket}"), Path::from(key.trim_matches('/'))))
        }
        _ => bail!("input URL {url:?}: expected s3://BUCKET/KEY"),
    }
}

/// One object as a [`ByteInput`]: its size and ETag, taken with a HEAD at open, are its
/// identity.
pub struct ObjectInput {
    url: String,
    key: Path,
    objects: Arc<dyn ObjectStore>,
    /// Moves to the prefetching thread when the input is positioned.
    runtime: Option<tokio::runtime::Runtime>,
    version: Version,
}

impl ObjectSource {
    /// The object `url`: it must exist now (a HEAD), and is read once positioned.
    pub fn open_object(url: &str) -> Result<Self> {
        let (bucket, key) = split_object_url(url)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the input's I/O runtime")?;
        let objects = {
            let _guard = runtime.enter();
            crate::store::open_object_store(&bucket)?
        };
        let meta = match runtime.block_on(objects.head(&key)) {
            Ok(meta) => meta,
            Err(object_store::Error::NotFound { .. }) => {
                bail!("input {url} does not exist")
            }
            Err(e) => {
                return Err(anyhow!(e)
                    .context("cannot look up its size and version")
                    .context(StoreUnavailable {
                        what: "input",
                        store: url.to_string(),
                    }));
            }
        };
        Ok(ByteLines::new(ObjectInput {
            url: url.to_string(),
            key,
            objects,
            runtime: Some(runtime),
            version: Version {
                size: meta.size,
                etag: meta.e_tag,
            },
        }))
    }
}

impl ByteInput for ObjectInput {
    type Reader = Prefetch;

    fn start(&mut self, offset: u64, identity: Option<&[u8]>) -> Result<Prefetch> {
        let url = &self.url;
        let now = &self.version;
        if let Some(identity) = identity {
            if identity.is_empty() {
                return Err(changed!(
                    "input {url} is an object, but the checkpoint was taken reading a local file; run the task with the same --input"
                ));
            }
            let then = Version::decode(identity, url)?;
            if now.size < offset {
                return Err(changed!(
                    "input {url} is {} bytes but the checkpoint has consumed {offset}: the input was replaced or truncated",
                    now.size
                ));
            }
            let replaced = match (&then.etag, &now.etag) {
                (Some(a), Some(b)) => a != b,
                _ => then.size != now.size,
            };
            if replaced {
                return Err(changed!(
                    "input {url} was replaced since the checkpoint: it was {}, it is now {}; resuming would mix two inputs (start a new store to process the new one)",
                    then.describe(),
                    now.describe()
                ));
            }
        }
        let runtime = self
            .runtime
            .take()
            .ok_or_else(|| anyhow!("input {url} is positioned twice"))?;
        Prefetch::start(
            runtime,
            self.objects.clone(),
            self.key.clone(),
            offset,
            now,
            url,
        )
    }

    fn identity(&self) -> Vec<u8> {
        self.version.encode()
    }

    fn label(&self) -> String {
        self.url.clone()
    }
}

/// Blocks of one object from `offset` to its end, fetched ahead on a thread.
pub struct Prefetch {
    blocks: Receiver<std::result::Result<Bytes, Kinded>>,
    current: Bytes,
}

impl Prefetch {
    fn start(
        runtime: tokio::runtime::Runtime,
        objects: Arc<dyn ObjectStore>,
        key: Path,
        offset: u64,
        version: &Version,
        url: &str,
    ) -> Result<Self> {
        let (sender, blocks) = std::sync::mpsc::sync_channel(READ_AHEAD);
        let (size, etag, url) = (version.size, version.etag.clone(), url.to_string());
        std::thread::Builder::new()
            .name("wasnap-input".into())
            .spawn(move || fetch_blocks(runtime, objects, key, offset, size, etag, url, sender))
            .context("cannot start the input reader")?;
        Ok(Self {
            blocks,
            current: Bytes::new(),
        })
    }
}

#[allow(clippy::too_many_arguments)]
fn fetch_blocks(
    runtime: tokio::runtime::Runtime,
    objects: Arc<dyn ObjectStore>,
    key: Path,
    mut offset: u64,
    size: u64,
    etag: Option<String>,
    url: String,
    blocks: SyncSender<std::result::Result<Bytes, Kinded>>,
) {
    while offset < size {
        let end = (offset + BLOCK_BYTES).min(size);
        let options = GetOptions {
            range: Some(GetRange::Bounded(offset..end)),
            if_match: etag.clone(),
            ..Default::default()
        };
        let got = runtime.block_on(async {
            let result = objects.get_opts(&key, options).await?;
            result.bytes().await
        });
        let block = match got {
            Ok(bytes) if bytes.len() as u64 == end - offset => Ok(bytes),
            Ok(bytes) => Err(Kinded::new(
                ErrorKind::StreamChanged,
                format!(
                    "input {url} ended early: {} bytes at offset {offset}, expected {} (replaced during the run?)",
                    bytes.len(),
                    end - offset
                ),
            )),
            Err(object_store::Error::Precondition { .. }) => Err(Kinded::new(
                ErrorKind::StreamChanged,
                format!("input {url} was replaced during the run (its ETag changed)"),
            )),
            Err(e) => Err(Kinded::new(
                ErrorKind::StoreUnavailable,
                format!("input {url} is unavailable: cannot read it at offset {offset}: {e}"),
            )),
        };
        let failed = block.is_err();
        if blocks.send(block).is_err() || failed {
            return; // the reader is gone, or has been told why the input stops
        }
        offset = end;
    }
}

impl Read for Prefetch {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            match self.blocks.recv() {
                Ok(Ok(block)) => self.current = block,
                Ok(Err(error)) => return Err(std::io::Error::other(error)),
                Err(_) => return Ok(0), // every block was sent: the end of the object
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_urls_need_a_bucket_and_a_key() {
        let (bucket, key) = split_object_url("s3://b/dir/in.txt").unwrap();
        assert_eq!((bucket.as_str(), key.as_ref()), ("s3://b", "dir/in.txt"));
        for bad in ["s3://b", "s3://b/", "s3:///k", "file:///x"] {
            assert!(split_object_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn versions_round_trip() {
        for version in [
            Version {
                size: 5,
                etag: Some("\"abc\"".into()),
            },
            Version {
                size: 1 << 40,
                etag: None,
            },
        ] {
            assert_eq!(Version::decode(&version.encode(), "u").unwrap(), version);
        }
    }
}
