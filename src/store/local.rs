//! A local directory as an object store, refusing what a directory can hold but an
//! object store cannot: symbolic links and files that are not regular.
//!
//! `object_store`'s `LocalFileSystem` follows links (a `packs` link to elsewhere would let
//! retention delete files outside the store) and opens whatever it finds (a FIFO in place
//! of a pack blocks the open for ever). This wrapper checks, before each operation, every
//! directory between the store's root and the object with `lstat`: a link anywhere below
//! the root is an error, and an object that exists must be a regular file. wasnap creates
//! no links in a store; the root itself is the user's to choose and may be one.
//!
//! A check and the open that follows are two steps: this guards against a store laid out
//! wrongly (by mistake or by a hostile copy), not against a rival rewriting it in between.

use std::fmt;
use std::path::{Path as FsPath, PathBuf};

use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::BoxStream;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, Result,
};

/// A store object that is not a regular file, or is reached through a link: damage to
/// the store (a restore falls back past it), never followed.
#[derive(Debug)]
pub struct NotRegular {
    pub path: PathBuf,
    pub what: &'static str,
}

impl fmt::Display for NotRegular {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} is {}; a store holds only regular files and directories (wasnap follows no links in it)",
            self.path.display(),
            self.what
        )
    }
}

impl std::error::Error for NotRegular {}

/// A `LocalFileSystem` that refuses links and non-regular files (see the module doc).
#[derive(Debug)]
pub struct CheckedLocal {
    inner: LocalFileSystem,
    root: PathBuf,
}

impl fmt::Display for CheckedLocal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CheckedLocal({})", self.root.display())
    }
}

/// How an object about to be used must look, if it exists.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Leaf {
    /// Read it: a regular file.
    Regular,
    /// It is replaced or removed, never opened: a link there is harmless (a rename or an
    /// unlink acts on the link itself), anything else but a directory too.
    Replaced,
}

impl CheckedLocal {
    pub fn new(inner: LocalFileSystem, root: PathBuf) -> Self {
        Self { inner, root }
    }

    fn check(&self, location: &Path, leaf: Option<Leaf>) -> Result<()> {
        check(&self.root, location, leaf)
    }
}

/// Check the directories from `root` down to `location` (or to the prefix `location`
/// itself names, for a listing: `leaf` is `None`) and, per `leaf`, the object.
fn check(root: &FsPath, location: &Path, leaf: Option<Leaf>) -> Result<()> {
    let parts: Vec<_> = location.parts().collect();
    let mut path = root.to_path_buf();
    for (i, part) in parts.iter().enumerate() {
        path.push(part.as_ref());
        let last = i + 1 == parts.len();
        let metadata = match std::fs::symlink_metadata(&path) {
            Ok(metadata) => metadata,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => {
                return Err(object_store::Error::Generic {
                    store: "LocalFileSystem",
                    source: Box::new(e),
                });
            }
        };
        let kind = metadata.file_type();
        let refuse = |what| {
            Err(object_store::Error::Generic {
                store: "LocalFileSystem",
                source: Box::new(NotRegular {
                    path: path.clone(),
                    what,
                }),
            })
        };
        match (last, leaf) {
            (false, _) | (true, None) if kind.is_symlink() => {
                return refuse("a symbolic link");
            }
            (false, _) | (true, None) if !kind.is_dir() => {
                return refuse("not a directory");
            }
            (true, Some(Leaf::Regular)) if kind.is_symlink() => {
                return refuse("a symbolic link");
            }
            (true, Some(Leaf::Regular)) if !kind.is_file() => {
                return refuse("not a regular file (a FIFO, a device, a socket or a directory)");
            }
            (true, Some(Leaf::Replaced)) if kind.is_dir() => {
                return refuse("a directory");
            }
            _ => {}
        }
    }
    Ok(())
}

/// Whether a listed object lies under `root` through no link, and is a regular file.
fn listed_object_is_plain(root: &FsPath, location: &Path) -> bool {
    check(root, location, Some(Leaf::Regular)).is_ok()
}

#[async_trait]
impl ObjectStore for CheckedLocal {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        self.check(location, Some(Leaf::Replaced))?;
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        self.check(location, Some(Leaf::Replaced))?;
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        self.check(location, Some(Leaf::Regular))?;
        self.inner.get_opts(location, options).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        let root = self.root.clone();
        let checked = locations.map(move |location| {
            let location = location?;
            check(&root, &location, Some(Leaf::Replaced))?;
            Ok(location)
        });
        self.inner.delete_stream(checked.boxed())
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        if let Some(prefix) = prefix
            && let Err(e) = self.check(prefix, None)
        {
            return futures::stream::once(async { Err(e) }).boxed();
        }
        let root = self.root.clone();
        self.inner
            .list(prefix)
            .filter(move |meta| {
                let keep = match meta {
                    Ok(meta) => listed_object_is_plain(&root, &meta.location),
                    Err(_) => true,
                };
                if !keep && let Ok(meta) = meta {
                    tracing::warn!(
                        "{} in the store is a link or not a regular file: ignored",
                        meta.location
                    );
                }
                std::future::ready(keep)
            })
            .boxed()
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        if let Some(prefix) = prefix {
            self.check(prefix, None)?;
        }
        let mut listed = self.inner.list_with_delimiter(prefix).await?;
        listed
            .objects
            .retain(|meta| listed_object_is_plain(&self.root, &meta.location));
        listed
            .common_prefixes
            .retain(|dir| self.check(dir, None).is_ok());
        Ok(listed)
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.check(from, Some(Leaf::Regular))?;
        self.check(to, Some(Leaf::Replaced))?;
        self.inner.copy_opts(from, to, options).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::ObjectStoreExt;

    fn store(dir: &FsPath) -> CheckedLocal {
        let inner = LocalFileSystem::new_with_prefix(dir).unwrap();
        CheckedLocal::new(inner, dir.to_path_buf())
    }

    fn refused(err: object_store::Error) -> bool {
        matches!(&err, object_store::Error::Generic { source, .. } if source.is::<NotRegular>())
    }

    #[tokio::test(flavor = "current_thread")]
    async fn links_and_special_files_are_refused_and_never_followed() {
        let outside = tempfile::tempdir().unwrap();
        let victim = outside.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        store
            .put(&Path::from("packs/a.pack"), PutPayload::from_static(b"a"))
            .await
            .unwrap();

        // A link in place of a directory: no read, no write, no delete, no listing through it.
        std::os::unix::fs::symlink(outside.path(), dir.path().join("manifests")).unwrap();
        let through = Path::from("manifests/victim");
        assert!(refused(store.get(&through).await.unwrap_err()));
        assert!(refused(store.delete(&through).await.unwrap_err()));
        assert!(refused(
            store
                .put(&through, PutPayload::from_static(b"x"))
                .await
                .unwrap_err()
        ));
        let listed: Vec<_> = store.list(Some(&Path::from("manifests"))).collect().await;
        assert!(listed.iter().any(|r| r.is_err()), "{listed:?}");
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");

        // A link in place of an object: not read; listed objects leave it out.
        std::os::unix::fs::symlink(&victim, dir.path().join("packs/b.pack")).unwrap();
        assert!(refused(
            store.get(&Path::from("packs/b.pack")).await.unwrap_err()
        ));
        let listed: Vec<_> = store
            .list(Some(&Path::from("packs")))
            .map(|m| m.unwrap().location.to_string())
            .collect()
            .await;
        assert_eq!(listed, vec!["packs/a.pack"]);

        // A FIFO in place of an object: refused at once, not opened (which would block).
        let fifo = dir.path().join("packs/c.pack");
        let name = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(name.as_ptr(), 0o600) }, 0);
        assert!(refused(
            store.get(&Path::from("packs/c.pack")).await.unwrap_err()
        ));
        // Deleting what is there is fine: the link or FIFO goes, never its target.
        store.delete(&Path::from("packs/b.pack")).await.unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    }
}
