//! Deterministic crash points, for the tests that stop a process at every step of the
//! commit protocol in turn. Each step calls [`point`] with its name; with the
//! `internals` feature (wasnap's own test builds) and `WASNAP_CRASH_AT=STEP[:N]` set, the
//! process kills itself with SIGKILL the `N`th time (default 1) it reaches `STEP`, exactly
//! as a `kill -9` there would. The shipped binary has no crash points: they compile to
//! nothing without the feature.
//!
//! The steps (in protocol order):
//!
//! | step | where |
//! |---|---|
//! | `restore-fetched` | restore: packs read, nothing written to the guest yet |
//! | `restore-pages-written` | restore: memory written, globals not yet set |
//! | `commit-pack-put` | committer: the pack is stored, the output not yet durable |
//! | `commit-output-durable` | committer: pack and output durable, no manifest yet |
//! | `commit-manifest-created` | committer: the manifest exists (the commit point), nothing published |
//! | `commit-published` | committer: the output published, nothing pruned |
//! | `prune-manifests-deleted` | retention: old manifests deleted, their packs not yet |
//! | `output-part-put` | object output: a checkpoint's part stored (before the manifest) |
//! | `output-index-put` | object output: one part published of those its commit publishes |
//! | `output-merge-put` | object output: a merged part published, the small ones still listed |
//! | `kafka-transaction-committed` | Kafka output: the transaction committed, no manifest yet |

#[cfg(feature = "internals")]
pub(crate) fn point(step: &str) {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};

    static PLAN: OnceLock<Option<(String, u64)>> = OnceLock::new();
    static REACHED: AtomicU64 = AtomicU64::new(0);
    let plan = PLAN.get_or_init(|| {
        let spec = std::env::var("WASNAP_CRASH_AT").ok()?;
        Some(match spec.split_once(':') {
            Some((step, n)) => (step.to_string(), n.parse().unwrap_or(1)),
            None => (spec, 1),
        })
    });
    if let Some((at, nth)) = plan
        && at == step
        && REACHED.fetch_add(1, Ordering::SeqCst) + 1 == *nth
    {
        eprintln!("wasnap: crash point {step} (#{nth}): SIGKILL");
        // SAFETY: plain syscalls; the process ends here.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
}

#[cfg(not(feature = "internals"))]
#[inline(always)]
pub(crate) fn point(_step: &str) {}
