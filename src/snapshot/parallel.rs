//! Work spread over the machine's cores, for the stages that do the same thing to many
//! pages (hashing, copying changed pages out of a guest, encoding, decoding on restore),
//! within one allowance of helper threads for the whole process ([`Helpers`]).

use std::sync::atomic::{AtomicUsize, Ordering};

/// The cores this process may use, read once: `available_parallelism` reads the cgroup's
/// files at every call, and stages that run in a capture's pause ask for it.
pub fn cores() -> usize {
    static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Helper threads running at once in the whole process, across all its tasks: one per
/// core beyond the first (the calling thread does a share too). A worker of 32 tasks
/// checkpointing at once would otherwise start 32 x cores threads.
fn helpers() -> &'static AtomicUsize {
    static SPARE: std::sync::OnceLock<AtomicUsize> = std::sync::OnceLock::new();
    SPARE.get_or_init(|| AtomicUsize::new(cores().saturating_sub(1)))
}

/// Helper threads taken from the process's allowance, given back when dropped. Every
/// stage that spreads pages over threads takes its helpers here, so a worker of many tasks
/// never runs more than one thread per core for them, whatever each task does.
pub struct Helpers(usize);

impl Helpers {
    /// Up to one helper per core beyond the first (0 when the others hold them all): for
    /// work the guest waits for (a capture's pause, a restore).
    pub fn take() -> Self {
        Self::take_up_to(cores().saturating_sub(1))
    }

    /// Up to one helper per core beyond the first two: for work that runs beside the
    /// guest (encoding a checkpoint), which leaves the guest a core of its own. On two
    /// cores, encoding on both took the guest's: the first checkpoint of a 256 MiB guest
    /// cost it 0.4 s of its 2.3 s.
    pub fn take_beside_guest() -> Self {
        Self::take_up_to(cores().saturating_sub(2))
    }

    fn take_up_to(most: usize) -> Self {
        let spare = helpers();
        let mut available = spare.load(Ordering::Relaxed);
        loop {
            let taken = available.min(most);
            if taken == 0 {
                return Self(0);
            }
            match spare.compare_exchange_weak(
                available,
                available - taken,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Self(taken),
                Err(now) => available = now,
            }
        }
    }

    /// Threads the work may run on: the caller's and the helpers taken.
    pub fn threads(&self) -> usize {
        self.0 + 1
    }
}

impl Drop for Helpers {
    fn drop(&mut self) {
        helpers().fetch_add(self.0, Ordering::AcqRel);
    }
}

/// `each` applied to every item, results in the items' order: on the calling thread
/// below `threshold` items (starting threads would cost more) or when the process has no
/// helper thread to spare, else on the calling thread and the [`Helpers`] it got, each
/// taking a run of consecutive items.
pub fn map_in_order<T: Send, R: Send>(
    mut items: Vec<T>,
    threshold: usize,
    each: impl Fn(T) -> R + Sync,
) -> Vec<R> {
    if items.len() < threshold {
        return items.into_iter().map(each).collect();
    }
    let helpers = Helpers::take();
    if helpers.threads() == 1 {
        return items.into_iter().map(each).collect();
    }
    let per_thread = items.len().div_ceil(helpers.threads());
    let mut batches = Vec::new();
    while !items.is_empty() {
        let rest = items.split_off(per_thread.min(items.len()));
        batches.push(std::mem::replace(&mut items, rest));
    }
    let each = &each;
    let mut batches = batches.into_iter();
    let own = batches.next().unwrap_or_default();
    std::thread::scope(|scope| {
        let workers: Vec<_> = batches
            .map(|batch| scope.spawn(move || batch.into_iter().map(each).collect::<Vec<_>>()))
            .collect();
        let mut results: Vec<R> = own.into_iter().map(each).collect();
        for worker in workers {
            results.extend(worker.join().expect("a page worker panicked"));
        }
        results
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_keep_the_items_order_on_one_thread_and_on_many() {
        let items: Vec<u32> = (0..1000).collect();
        let expected: Vec<u64> = items.iter().map(|i| u64::from(*i) * 3).collect();
        assert_eq!(
            map_in_order(items.clone(), usize::MAX, |i| u64::from(i) * 3),
            expected
        );
        assert_eq!(map_in_order(items, 0, |i| u64::from(i) * 3), expected);
        assert!(map_in_order(Vec::<u32>::new(), 0, |i| i).is_empty());
    }

    #[test]
    fn helpers_are_bounded_across_callers_and_given_back() {
        let cores = cores();
        // Many callers at once: each still gets every result, in order.
        let expected: Vec<u64> = (0..500).map(|i| i * 2).collect();
        std::thread::scope(|scope| {
            for _ in 0..8 {
                scope.spawn(|| {
                    let items: Vec<u64> = (0..500).collect();
                    assert_eq!(map_in_order(items, 0, |i| i * 2), expected);
                });
            }
        });
        // Other tests may hold helpers right now, but never more than the allowance.
        assert!(helpers().load(Ordering::Relaxed) <= cores.saturating_sub(1));
        let held = Helpers::take();
        assert!(held.threads() <= cores);
        let more = Helpers::take();
        assert!(
            held.threads() + more.threads() - 2 <= cores.saturating_sub(1),
            "two holders together stay within the allowance"
        );
        drop((held, more));
        // Beside a running guest, the work leaves it a core (on one core, the caller's
        // thread is all there is).
        let beside = Helpers::take_beside_guest();
        assert!(beside.threads() <= cores.saturating_sub(1).max(1));
    }
}
