//! A fault-injecting `ObjectStore`: wraps a real store and, at one chosen point (the n-th
//! pack put, manifest put or prune delete), fails, delays, tears or loses the reply of
//! that one operation. Every other call goes straight through.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::BoxStream;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    ObjectStoreExt, PutMultipartOptions, PutOptions, PutPayload, PutResult, Result,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Point {
    PackPut,
    ManifestPut,
    PruneDelete,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The operation does not happen and reports an error.
    Fail,
    /// The operation happens after a pause.
    Delay,
    /// Half the object is written, then the operation reports an error (a put that died
    /// mid-upload on a store without atomic puts).
    Tear,
    /// The operation happens but its reply is lost: the caller sees an error.
    LostReply,
    /// Every operation at the point from the n-th on happens after a pause: a slow store.
    Slow,
    /// The operation panics: a bug in a store backend, or anything else that kills the
    /// thread it runs on.
    Panic,
}

pub const ALL_FAULTS: [Fault; 4] = [Fault::Fail, Fault::Delay, Fault::Tear, Fault::LostReply];
pub const ALL_POINTS: [Point; 3] = [Point::PackPut, Point::ManifestPut, Point::PruneDelete];

pub struct FaultyStore {
    inner: Arc<dyn ObjectStore>,
    plan: Arc<Plan>,
}

/// Where and how to strike; shared with the delete stream, which outlives `&self`.
struct Plan {
    point: Point,
    fault: Fault,
    /// The fault hits the `nth` operation at `point` (1-based).
    nth: usize,
    seen: AtomicUsize,
    injected: AtomicUsize,
}

impl FaultyStore {
    pub fn new(inner: Arc<dyn ObjectStore>, point: Point, fault: Fault, nth: usize) -> Self {
        let plan = Plan {
            point,
            fault,
            nth,
            seen: AtomicUsize::new(0),
            injected: AtomicUsize::new(0),
        };
        Self {
            inner,
            plan: Arc::new(plan),
        }
    }

    /// How many faults were injected (0 or 1, or more for `Slow`): a test checks its fault
    /// did strike.
    pub fn injected(&self) -> usize {
        self.plan.injected.load(Ordering::SeqCst)
    }
}

impl Plan {
    /// Whether this call at `point` is the one to hit.
    fn hit(&self, point: Point) -> bool {
        if point != self.point {
            return false;
        }
        let seen = self.seen.fetch_add(1, Ordering::SeqCst) + 1;
        let hit = seen == self.nth || (self.fault == Fault::Slow && seen > self.nth);
        if hit {
            self.injected.fetch_add(1, Ordering::SeqCst);
        }
        hit
    }

    fn error(&self) -> object_store::Error {
        object_store::Error::Generic {
            store: "faulty",
            source: format!("injected {:?} at {:?}", self.fault, self.point).into(),
        }
    }
}

const DELAY: Duration = Duration::from_millis(300);

fn point_of_put(location: &Path) -> Option<Point> {
    let first = location.parts().next()?;
    match first.as_ref() {
        "packs" => Some(Point::PackPut),
        "manifests" => Some(Point::ManifestPut),
        _ => None,
    }
}

impl fmt::Display for FaultyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FaultyStore({})", self.inner)
    }
}

impl fmt::Debug for FaultyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let plan = &self.plan;
        write!(
            f,
            "FaultyStore({:?} {:?} #{})",
            plan.point, plan.fault, plan.nth
        )
    }
}

#[async_trait]
impl ObjectStore for FaultyStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        let Some(point) = point_of_put(location) else {
            return self.inner.put_opts(location, payload, opts).await;
        };
        if !self.plan.hit(point) {
            return self.inner.put_opts(location, payload, opts).await;
        }
        match self.plan.fault {
            Fault::Fail => Err(self.plan.error()),
            Fault::Delay | Fault::Slow => {
                tokio::time::sleep(DELAY).await;
                self.inner.put_opts(location, payload, opts).await
            }
            Fault::Tear => {
                let bytes: Vec<u8> = payload.iter().flat_map(|b| b.iter().copied()).collect();
                let half = PutPayload::from(bytes[..bytes.len() / 2].to_vec());
                self.inner.put_opts(location, half, opts).await?;
                Err(self.plan.error())
            }
            Fault::LostReply => {
                self.inner.put_opts(location, payload, opts).await?;
                Err(self.plan.error())
            }
            Fault::Panic => panic!("{}", self.plan.error()),
        }
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        self.inner.get_opts(location, options).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        let inner = self.inner.clone();
        let plan = self.plan.clone();
        locations
            .then(move |location| {
                let inner = inner.clone();
                let plan = plan.clone();
                async move {
                    let location = location?;
                    if !plan.hit(Point::PruneDelete) {
                        return inner.delete(&location).await.map(|()| location);
                    }
                    match plan.fault {
                        // A delete cannot be half done: tearing it is failing it.
                        Fault::Fail | Fault::Tear => Err(plan.error()),
                        Fault::Delay | Fault::Slow => {
                            tokio::time::sleep(DELAY).await;
                            inner.delete(&location).await.map(|()| location)
                        }
                        Fault::LostReply => {
                            inner.delete(&location).await?;
                            Err(plan.error())
                        }
                        Fault::Panic => panic!("{}", plan.error()),
                    }
                }
            })
            .boxed()
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}
