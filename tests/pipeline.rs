//! The checkpoint pipeline end to end: deltas and chains, the page cache (damaged or lost),
//! compaction, and checkpoints in flight while the guest goes on (back-pressure).

mod common;

use std::path::Path;
use std::sync::Arc;

use common::faulty::{Fault, FaultyStore, Point};
use common::*;
use wasnap::CheckpointStats;
use wasnap::delta::Encoding;
use wasnap::guest::Guest;
use wasnap::snapshot;
use wasnap::state::PAGE_SIZE;
use wasnap::store::{CheckpointStore, open_object_store};
use wasnap::{CheckpointObserver, NoObserver, RunConfig, Task, TaskConfig};

const PAGES: u32 = 64;

/// A guest whose record says what to do to which pages: `r` rewrites each listed page with
/// fresh noise (its delta is as big as the page), `t` touches one byte of each (a tiny
/// delta). Page indices follow as little-endian u32s; records land in page 0, which the
/// guest clears again.
fn pages_guest(dir: &Path) -> std::path::PathBuf {
    let wasm = wat::parse_str(format!(
        r#"(module
          (memory (export "memory") {PAGES})
          (global $x (mut i64) (i64.const 0x9E3779B97F4A7C15))
          (func (export "alloc") (param i32) (result i32) (i32.const 16))
          (func (export "process") (param $ptr i32) (param $len i32)
            (local $i i32) (local $addr i32) (local $end i32) (local $x i64)
            (local.set $i (i32.const 1))
            (block $done (loop $pages
              (br_if $done (i32.ge_u (local.get $i) (local.get $len)))
              (local.set $addr (i32.mul (i32.load (i32.add (local.get $ptr) (local.get $i))) (i32.const 65536)))
              (if (i32.eq (i32.load8_u (local.get $ptr)) (i32.const 114))
                (then
                  (local.set $end (i32.add (local.get $addr) (i32.const 65536)))
                  (local.set $x (global.get $x))
                  (loop $fill
                    (local.set $x (i64.xor (local.get $x) (i64.shl (local.get $x) (i64.const 13))))
                    (local.set $x (i64.xor (local.get $x) (i64.shr_u (local.get $x) (i64.const 7))))
                    (local.set $x (i64.xor (local.get $x) (i64.shl (local.get $x) (i64.const 17))))
                    (i64.store (local.get $addr) (local.get $x))
                    (local.set $addr (i32.add (local.get $addr) (i32.const 8)))
                    (br_if $fill (i32.lt_u (local.get $addr) (local.get $end))))
                  (global.set $x (local.get $x)))
                (else
                  (i32.store8 (i32.add (local.get $addr) (i32.const 100))
                    (i32.add (i32.load8_u (i32.add (local.get $addr) (i32.const 100))) (i32.const 1)))))
              (local.set $i (i32.add (local.get $i) (i32.const 4)))
              (br $pages)))
            ;; Page 0 only ever holds the record being read: clear it, so it stays zero.
            (memory.fill (local.get $ptr) (i32.const 0) (local.get $len)))
        )"#
    ))
    .unwrap();
    let path = dir.join("pages.wasm");
    std::fs::write(&path, wasm).unwrap();
    path
}

fn record(op: u8, pages: impl IntoIterator<Item = u32>) -> Vec<u8> {
    let mut record = vec![op];
    for page in pages {
        record.extend_from_slice(&page.to_le_bytes());
    }
    record
}

/// A task of the pages guest, driven record by record through the library.
fn pages_task(dir: &Path, retain: usize) -> (Task, RunConfig, String) {
    let guest = pages_guest(dir);
    let input = dir.join("in");
    std::fs::write(&input, "").unwrap();
    let config = RunConfig {
        task: TaskConfig {
            retain,
            ..TaskConfig::default()
        },
        ..RunConfig::new(&guest, &input, dir.join("out"))
    };
    let store_url = dir.join("store").display().to_string();
    let task = config
        .open(CheckpointStore::open(&store_url).unwrap())
        .unwrap();
    (task, config, store_url)
}

/// Restore the newest checkpoint into a fresh instance and check it is the live memory.
fn assert_newest_restores_to(task: &mut Task, config: &RunConfig, store_url: &str) {
    let store = CheckpointStore::open(store_url).unwrap();
    let newest = *store.generations().unwrap().last().unwrap();
    let manifest = store.read_manifest(newest).unwrap();
    let mut fresh = Guest::load(&config.guest)
        .unwrap()
        .instantiate(manifest.random_seed, manifest.random_position)
        .unwrap();
    snapshot::restore(&mut fresh, &manifest, &store).unwrap();
    assert!(
        fresh.memory(0) == task.instance().memory(0),
        "checkpoint {newest} does not restore to the live memory"
    );
}

fn step(task: &mut Task, op: u8, pages: impl IntoIterator<Item = u32>) -> CheckpointStats {
    task.instance().process(&record(op, pages)).unwrap();
    task.checkpoint(&mut NoObserver).unwrap()
}

#[test]
fn small_changes_go_as_deltas_and_chains_stay_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let (mut task, config, store_url) = pages_task(dir.path(), 3);
    let first = step(&mut task, b'r', 1..PAGES);
    assert_eq!(
        first.whole_pages, first.dirty_pages,
        "nothing to delta against yet"
    );
    let mut rebased_rounds = 0;
    for round in 0..20 {
        let stats = step(&mut task, b't', 1..=20);
        // Every touched page is a tiny delta. Where its chain is full (8 deltas, every 9th
        // version at first) it is rebased onto an earlier layer, not restarted whole.
        assert_eq!(stats.dirty_pages, 20, "round {round}");
        assert_eq!(stats.delta_pages, 20, "round {round}: {stats:?}");
        assert!(
            stats.encoded_bytes < 20 * 200,
            "round {round}: deltas of one byte: {stats:?}"
        );
        assert!(
            stats.rebased_pages == 0 || stats.rebased_pages == 20,
            "round {round}: {stats:?}"
        );
        if stats.rebased_pages == 20 {
            rebased_rounds += 1;
        }
        assert_newest_restores_to(&mut task, &config, &store_url);
    }
    // Tiny deltas rebase onto the whole page (layer 0 buys the most room): chains fill
    // after 8 deltas, at rounds 8 and 16.
    assert_eq!(rebased_rounds, 2, "full chains are rebased");
    let store = CheckpointStore::open(&store_url).unwrap();
    let newest = *store.generations().unwrap().last().unwrap();
    let layers = store.read_manifest(newest).unwrap().memories[0]
        .layers
        .len();
    assert!(layers <= 9, "a chain longer than 8 deltas: {layers} layers");
}

#[test]
fn compaction_frees_old_packs_and_restores_stay_exact() {
    let dir = tempfile::tempdir().unwrap();
    let (mut task, config, store_url) = pages_task(dir.path(), 2);
    // Every round rewrites 15 hot pages and one new page that then stays cold: every pack
    // but the newest ends up with one live frame of sixteen, pinned by its cold page.
    const ROUNDS: u32 = 40;
    let mut compacted = 0;
    for round in 0..ROUNDS {
        let stats = step(&mut task, b'r', (1..=15).chain([16 + round]));
        compacted += stats.compacted_frames;
        assert_newest_restores_to(&mut task, &config, &store_url);
    }
    assert!(compacted > 0, "the cold pages were never compacted");
    let packs: Vec<String> = std::fs::read_dir(dir.path().join("store/packs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(
        !packs.iter().any(|p| p.starts_with(&format!("{:020}-", 1))),
        "the first pack outlived its pages: {packs:?}"
    );
    // Without compaction every pack would stay (40 × 16 pages); with it, the store stays
    // within a small multiple of the live pages.
    let live = u64::from(15 + ROUNDS) * PAGE_SIZE as u64;
    let total = CheckpointStore::open(&store_url)
        .unwrap()
        .total_bytes()
        .unwrap();
    assert!(
        total < 3 * live,
        "store is {total} bytes for {live} live bytes ({} packs)",
        packs.len()
    );
}

#[test]
fn a_damaged_or_lost_page_cache_is_never_trusted_and_is_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let (mut task, config, store_url) = pages_task(dir.path(), 3);
    step(&mut task, b'r', 1..PAGES);
    assert_eq!(step(&mut task, b't', 1..=20).delta_pages, 20);

    // Scribble over the cached versions of pages 1..=10 behind the engine's back (the
    // file is mapped shared, so the mapping sees it). Those must be written whole.
    let cache_file = config.cache_dir().join("memory-0.pages");
    {
        use std::os::unix::fs::FileExt;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&cache_file)
            .unwrap();
        for page in 1..=10u64 {
            file.write_all_at(b"scribble", page * PAGE_SIZE as u64 + 500)
                .unwrap();
        }
    }
    let stats = step(&mut task, b't', 1..=20);
    assert_eq!(
        (stats.whole_pages, stats.delta_pages),
        (10, 10),
        "{stats:?}"
    );
    assert_newest_restores_to(&mut task, &config, &store_url);
    drop(task);

    // The cache lost altogether: the next run rebuilds it from the restored memory, and
    // deltas work again at once.
    std::fs::remove_dir_all(config.cache_dir()).unwrap();
    let mut task = config
        .open(CheckpointStore::open(&store_url).unwrap())
        .unwrap();
    let stats = step(&mut task, b't', 1..=20);
    assert_eq!(stats.delta_pages, 20, "{stats:?}");
    assert_newest_restores_to(&mut task, &config, &store_url);
}

/// Counts checkpoints started and not yet finished.
#[derive(Default)]
struct InFlight {
    now: usize,
    max: usize,
    finished: usize,
}

impl CheckpointObserver for InFlight {
    fn started(&mut self, _generation: u64) {
        self.now += 1;
        self.max = self.max.max(self.now);
    }
    fn finished(&mut self, _generation: u64, outcome: Result<&CheckpointStats, &wasnap::Error>) {
        outcome.expect("checkpoint failed");
        self.now -= 1;
        self.finished += 1;
    }
}

/// Run `config` on the local store at `store_url`, `fault` striking its `nth` pack put
/// (`Fault::Slow`: every one from the `nth` on), counting the checkpoints in flight.
fn run_behind_pack_put(
    config: &RunConfig,
    store_url: &str,
    fault: Fault,
    nth: usize,
) -> (wasnap::RunSummary, InFlight, Arc<FaultyStore>) {
    let objects = open_object_store(store_url).unwrap();
    let faulty = Arc::new(FaultyStore::new(objects, Point::PackPut, fault, nth));
    let store = CheckpointStore::from_object_store(faulty.clone(), "faulty").unwrap();
    let mut task = config.open(store).unwrap();
    let mut observer = InFlight::default();
    let summary = task.run(&mut observer).unwrap();
    (summary, observer, faulty)
}

#[test]
fn a_slow_store_is_overlapped_up_to_the_bound_and_then_holds_the_guest_back() {
    let guest = guest("wordcount");
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    write_input(&input, 3000, 500, false);
    let reference = reference_output(&guest, &input);
    for max_in_flight in [0, 1, 3] {
        let case_dir = dir.path().join(format!("in-flight-{max_in_flight}"));
        let store_url = case_dir.join("store").display().to_string();
        let output = case_dir.join("out");
        let config = RunConfig {
            task: TaskConfig {
                max_in_flight,
                ..TaskConfig::by_count(200)
            },
            ..RunConfig::new(&guest, &input, &output)
        };
        // Every pack put after the first takes 300 ms: far slower than 200 records.
        let (summary, observer, slow) = run_behind_pack_put(&config, &store_url, Fault::Slow, 2);
        assert!(slow.injected() > 5, "the store was not slow");
        assert_eq!(observer.now, 0, "a checkpoint was left unsettled");
        assert_eq!(observer.finished as u64, summary.checkpoints);
        // The guest captured the next checkpoint while the earlier ones were being
        // written, but never more than the bound allows.
        assert_eq!(
            observer.max,
            max_in_flight + 1,
            "max_in_flight {max_in_flight}: at most {} started and unfinished",
            observer.max
        );
        assert_same_output(
            &std::fs::read(&output).unwrap(),
            &reference,
            &format!("max_in_flight {max_in_flight}"),
        );
    }
}

/// With coalescing, a capture waits for the committer only once the captures in flight
/// hold the byte budget (at least one copy of the guest's memory), or 64 of them are in
/// flight. A first pack put held up by the store leaves the guest free to capture after
/// it; with a budget of 1 byte (that is: one copy of the memory) the copies stop it after
/// a few captures, with the default budget only the count does.
#[test]
fn coalesced_captures_wait_only_once_their_copies_reach_the_byte_budget() {
    let guest = guest("wordcount");
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    write_input(&input, 1000, 500, false);
    let reference = reference_output(&guest, &input);
    for budget in [1, TaskConfig::default().max_uncommitted_bytes] {
        let case_dir = dir.path().join(format!("budget-{budget}"));
        let store_url = case_dir.join("store").display().to_string();
        let output = case_dir.join("out");
        let config = RunConfig {
            task: TaskConfig {
                coalesce: true,
                max_uncommitted_bytes: budget,
                ..TaskConfig::by_count(1)
            },
            ..RunConfig::new(&guest, &input, &output)
        };
        // The first pack put takes 300 ms: a capture a record comes far faster.
        let (summary, observer, delayed) =
            run_behind_pack_put(&config, &store_url, Fault::Delay, 1);
        assert_eq!(delayed.injected(), 1, "the first pack put was not delayed");
        assert_eq!(observer.now, 0, "a checkpoint was left unsettled");
        assert_eq!(summary.checkpoints, 1000, "a capture a record");
        if budget == 1 {
            assert!(
                (2..64).contains(&observer.max),
                "budget {budget}: the capture after the first went ahead, and the copies \
                 stopped the guest before the count did: {} in flight at most",
                observer.max
            );
        } else {
            assert_eq!(observer.max, 64, "the default budget: the count limit held");
        }
        assert_same_output(
            &std::fs::read(&output).unwrap(),
            &reference,
            &format!("budget {budget}"),
        );
    }
}

/// `wasnap run --checkpoint-every N` alone: captures the store cannot keep up with merge
/// into one commit (fewer manifests than generations, the output exact), unless
/// `--no-coalesce`, which commits every one of them. A checkpoint after every record is
/// far faster to capture than to commit (two fsynced puts, a listing and the output's
/// fsync), so the committer falls behind.
#[test]
fn by_count_alone_the_run_coalesces_unless_told_not_to() {
    let guest = guest("wordcount");
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    write_input(&input, 800, 500, false);
    let reference = reference_output(&guest, &input);
    for coalesce in [true, false] {
        let case = dir.path().join(format!("coalesce-{coalesce}"));
        let (output, store) = (case.join("out"), case.join("store"));
        let store_url = store.display().to_string();
        let mut args = match coalesce {
            true => coalescing_run_args(&guest, &input, &output, &store_url, 1),
            false => run_args(&guest, &input, &output, &store_url, 1),
        };
        args.extend(["--retain".into(), "1000000".into()]);
        run_ok(&args);
        let commits = std::fs::read_dir(store.join("manifests")).unwrap().count() as u64;
        let newest = *open_store(&store_url)
            .generations()
            .unwrap()
            .last()
            .unwrap();
        // One capture per record, and the one at the end of the input is the last record's.
        assert_eq!(newest, 800, "coalesce {coalesce}: a generation per capture");
        if coalesce {
            assert!(
                commits < newest,
                "captures merged: {commits} commits of {newest} captures"
            );
        } else {
            assert_eq!(commits, newest, "each capture its own commit");
        }
        assert_same_output(
            &std::fs::read(&output).unwrap(),
            &reference,
            &format!("coalesce {coalesce}"),
        );
    }
}

#[test]
fn a_real_histogram_goes_as_sparse_deltas_and_restores_exactly() {
    // The window guest bumps one of 65 536 histogram buckets (four pages) per record:
    // each checkpoint changes a few hundred scattered words on each of those pages.
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("numbers");
    write_input(&input, 6000, 0, true);
    let store_url = dir.path().join("store").display().to_string();
    let config = RunConfig {
        task: TaskConfig {
            // Every pack stays, to be counted.
            retain: usize::MAX,
            ..TaskConfig::by_count(500)
        },
        ..RunConfig::new(guest("window"), &input, dir.path().join("output"))
    };
    let mut task = config
        .open(CheckpointStore::open(&store_url).unwrap())
        .unwrap();
    let summary = task.run(&mut NoObserver).unwrap();
    assert_eq!(summary.checkpoints, 12);
    assert_newest_restores_to(&mut task, &config, &store_url);

    let mut encodings = std::collections::BTreeMap::new();
    for pack in std::fs::read_dir(dir.path().join("store/packs")).unwrap() {
        let bytes = std::fs::read(pack.unwrap().path()).unwrap();
        let index = wasnap::store::pack::PackIndex::parse(&bytes, "pack").unwrap();
        for frame in &index.frames {
            let encoding = bytes[frame.start + wasnap::store::pack::FRAME_HEADER_LEN - 1];
            *encodings.entry(encoding).or_insert(0) += 1;
        }
    }
    let sparse = encodings
        .get(&(Encoding::SparseDelta as u8))
        .copied()
        .unwrap_or(0);
    // Four histogram pages at each of the 11 checkpoints after the first.
    assert!(sparse >= 4 * 11, "frames by encoding: {encodings:?}");
}
