//! Work spread over the machine's cores, for the stages that do the same thing to many
//! pages (hashing the pages a tracker listed, copying changed pages out of a guest).

/// `each` applied to every item, results in the items' order: on the calling thread
/// below `threshold` items (starting threads would cost more), else on one thread per
/// core, each taking a run of consecutive items.
pub fn map_in_order<T: Send, R: Send>(
    mut items: Vec<T>,
    threshold: usize,
    each: impl Fn(T) -> R + Sync,
) -> Vec<R> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    if items.len() < threshold || threads == 1 {
        return items.into_iter().map(each).collect();
    }
    let per_thread = items.len().div_ceil(threads);
    let mut batches = Vec::new();
    while !items.is_empty() {
        let rest = items.split_off(per_thread.min(items.len()));
        batches.push(std::mem::replace(&mut items, rest));
    }
    let each = &each;
    std::thread::scope(|scope| {
        let workers: Vec<_> = batches
            .into_iter()
            .map(|batch| scope.spawn(move || batch.into_iter().map(each).collect::<Vec<_>>()))
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().expect("a page worker panicked"))
            .collect()
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
}
