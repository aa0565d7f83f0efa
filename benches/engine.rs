//! Criterion benchmarks of the engine's hot paths, with the comparison each target needs:
//!
//! - `page_hashing`: XXH3 over 64 KiB pages vs. a plain memcpy of the same bytes;
//! - `page_delta`: each frame encoding of one 64 KiB page, for three kinds of change
//!   (scattered counters, values appended over zeros, a heap rewritten in part), beside
//!   the whole page: what trying one more candidate costs the committer; and
//!   `best_delta`, the committer's choice among them; and what precedes them: counting
//!   the changed words, and the survey of a rewritten page (`delta::survey`);
//! - `rebase`: a full chain of sparse deltas (a page of counters) rebased, its versions
//!   walked down from the cached top vs. rebuilt up from the store's whole page;
//! - `checkpoint`: 16 MiB / 256 MiB / 1 GiB guests at 0.1 %, 1 % and 10 % dirty pages,
//!   to a local-disk store with fsync: `commit` is the whole protocol (capture, encode,
//!   pack put, fsync, commit), `stall` only the part the guest waits for (capture);
//! - `dirty_tracking`: the same guests and changes with each dirty tracker, hashing every
//!   page and the kernel's record of written pages: `pause` is the stall alone,
//!   `writes+pause` adds the guest's writes, where the kernel's first-write faults fall;
//! - `restore`: the same sizes from local disk, vs. reading the same bytes from the page cache;
//! - `warm_resume`: instantiate + restore + first `process` of a small guest (module compiled);
//! - `record_call`: one record through a trivial guest.
//!
//! Set `WASNAP_BENCH_SIZES=16,256` (MiB) to skip the 1 GiB cases on a small machine.

use std::hint::black_box;
use std::path::Path;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use wasnap::guest::Guest;
use wasnap::snapshot::{self, DirtyTracking};
use wasnap::state::PAGE_SIZE;
use wasnap::store::CheckpointStore;
use wasnap::{NoObserver, RunConfig, Task, TaskConfig};

const MIB: usize = 1 << 20;

fn sizes_mib() -> Vec<usize> {
    std::env::var("WASNAP_BENCH_SIZES")
        .ok()
        .map(|s| s.split(',').filter_map(|v| v.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![16, 256, 1024])
}

/// A guest of `mib` MiB whose `process` takes a record of u32 page indices and changes one
/// byte in each of those pages; a record of one `u32::MAX` fills the whole memory with a
/// non-repeating pattern (so no page is zero and none compresses to nothing).
fn sized_guest(mib: usize) -> Vec<u8> {
    let pages = mib * MIB / 65536;
    wat::parse_str(format!(
        r#"(module
          (memory (export "memory") {pages})
          (func (export "alloc") (param i32) (result i32) (i32.const 0))
          (func (export "process") (param $ptr i32) (param $len i32)
            (local $i i32) (local $addr i32) (local $x i64)
            (if (i32.eq (i32.load (i32.const 0)) (i32.const -1))
              (then
                (local.set $x (i64.const 0x9E3779B97F4A7C15))
                (loop $fill
                  (local.set $x (i64.xor (local.get $x) (i64.shl (local.get $x) (i64.const 13))))
                  (local.set $x (i64.xor (local.get $x) (i64.shr_u (local.get $x) (i64.const 7))))
                  (local.set $x (i64.xor (local.get $x) (i64.shl (local.get $x) (i64.const 17))))
                  ;; half-random words: compressible like real heaps, not trivially
                  (i64.store (local.get $addr) (i64.and (local.get $x) (i64.const 0x0F0F00FF00FF0F0F)))
                  (local.set $addr (i32.add (local.get $addr) (i32.const 8)))
                  (br_if $fill (i32.lt_u (local.get $addr) (i32.const {bytes}))))
                (return)))
            (loop $pages
              (local.set $addr (i32.add (i32.mul (i32.load (i32.add (local.get $ptr) (local.get $i))) (i32.const 65536)) (i32.const 65532)))
              (i32.store8 (local.get $addr) (i32.add (i32.load8_u (local.get $addr)) (i32.const 1)))
              (local.set $i (i32.add (local.get $i) (i32.const 4)))
              (br_if $pages (i32.lt_u (local.get $i) (local.get $len))))))"#,
        bytes = (mib * MIB) as u64 as i64 as i32,
    ))
    .unwrap()
}

struct SizedTask {
    _dir: tempfile::TempDir,
    task: Task,
    store_url: String,
    guest_path: std::path::PathBuf,
    pages: usize,
    rng: u64,
}

impl SizedTask {
    fn new(mib: usize) -> Self {
        Self::with_tracking(mib, DirtyTracking::default())
    }

    fn with_tracking(mib: usize, dirty_tracking: DirtyTracking) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let guest_path = dir.path().join("guest.wasm");
        std::fs::write(&guest_path, sized_guest(mib)).unwrap();
        let input = dir.path().join("input");
        std::fs::write(&input, "").unwrap();
        let store_url = dir.path().join("store").display().to_string();
        let config = RunConfig {
            task: TaskConfig {
                dirty_tracking,
                // The page cache's file system matters: see "The page cache" in docs/DESIGN.md.
                cache_dir: std::env::var_os("WASNAP_BENCH_CACHE_DIR").map(|d| {
                    std::path::Path::new(&d).join(format!("cache-{}-{mib}", std::process::id()))
                }),
                ..TaskConfig::default()
            },
            ..RunConfig::new(&guest_path, &input, dir.path().join("output"))
        };
        let mut task = config
            .open(CheckpointStore::open(&store_url).unwrap())
            .unwrap();
        task.instance().process(&u32::MAX.to_le_bytes()).unwrap();
        task.checkpoint(&mut NoObserver).unwrap(); // the first, full checkpoint
        Self {
            _dir: dir,
            task,
            store_url,
            guest_path,
            pages: mib * MIB / PAGE_SIZE,
            rng: 0x2545_F491_4F6C_DD1D,
        }
    }

    /// Change one byte in `count` distinct random pages.
    fn dirty(&mut self, count: usize) {
        let mut pages = std::collections::BTreeSet::new();
        while pages.len() < count.min(self.pages) {
            self.rng ^= self.rng << 13;
            self.rng ^= self.rng >> 7;
            self.rng ^= self.rng << 17;
            pages.insert((self.rng % self.pages as u64) as u32);
        }
        let record: Vec<u8> = pages.iter().flat_map(|p| p.to_le_bytes()).collect();
        self.task.instance().process(&record).unwrap();
    }
}

/// xorshift64.
fn next(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// (name, previous version, new version) of a page, for three kinds of change.
fn page_changes() -> Vec<(&'static str, Vec<u8>, Vec<u8>)> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let words = |v: Vec<u32>| -> Vec<u8> { v.iter().flat_map(|w| w.to_le_bytes()).collect() };
    // A histogram: 250 of 16 384 counters bumped.
    let counters: Vec<u32> = (0..16_384).map(|_| (next(&mut x) % 50) as u32).collect();
    let mut bumped = counters.clone();
    for _ in 0..250 {
        bumped[(next(&mut x) % 16_384) as usize] += 1;
    }
    // A ring: 1000 i64 values in ±500 000 written over zeros.
    let mut ring = vec![0u8; PAGE_SIZE];
    for slot in ring.chunks_exact_mut(8).take(1000) {
        let v = (next(&mut x) % 1_000_000) as i64 - 500_000;
        slot.copy_from_slice(&v.to_le_bytes());
    }
    // A heap: small integers and pointers, 40 % of its words rewritten.
    let heap: Vec<u32> = (0..16_384)
        .map(|_| next(&mut x).is_multiple_of(4) as u32 * (next(&mut x) as u32 % 0x20_0000))
        .collect();
    let mut churned = heap.clone();
    for w in churned.iter_mut() {
        if next(&mut x) % 5 < 2 {
            *w = next(&mut x) as u32 % 0x20_0000;
        }
    }
    vec![
        ("counters", words(counters), words(bumped)),
        ("ring", vec![0u8; PAGE_SIZE], ring),
        ("heap", words(heap), words(churned)),
    ]
}

fn page_delta(c: &mut Criterion) {
    use wasnap::delta::{self, Encoding};
    let mut group = c.benchmark_group("page_delta");
    group.throughput(Throughput::Bytes(PAGE_SIZE as u64));
    let mut cctx = delta::compressor().unwrap();
    let mut coder = delta::Coder::new().unwrap();
    let mut scratch = Vec::new();
    let mut survey = delta::survey::Survey::default();
    for (change, old, new) in page_changes() {
        // What every delta starts with, and what a rewritten page may add before its
        // prefix delta.
        let id = BenchmarkId::new("changed_words", change);
        group.bench_function(id, |b| {
            b.iter(|| delta::sparse::changed_words(black_box(&new), black_box(&old)))
        });
        let id = BenchmarkId::new("survey", change);
        group.bench_function(id, |b| b.iter(|| survey.found_percent(&new, &old)));
        // What the committer runs per delta: the candidates it picks, and the choice.
        let id = BenchmarkId::new("best_delta", change);
        group.bench_function(id, |b| {
            b.iter(|| coder.best_delta(&new, &old, true).unwrap())
        });
        for encoding in [
            Encoding::Full,
            Encoding::XorDelta,
            Encoding::SparseDelta,
            Encoding::PrefixDelta,
        ] {
            let id = BenchmarkId::new(format!("{encoding:?}"), change);
            group.bench_function(id, |b| {
                b.iter(|| {
                    delta::encode_payload(&mut cctx, encoding, &new, &old, &mut scratch).unwrap()
                })
            });
        }
    }
    group.finish();
}

/// A full chain of a page of counters (a whole page, then `max_deltas` sparse deltas, 250
/// counters bumped each), the version it rebuilds, and the next version: a rebase's input.
fn full_chain(
    max_deltas: usize,
) -> (
    Vec<u8>,
    Vec<u8>,
    Vec<snapshot::table::FrameLoc>,
    snapshot::rebase::ChainPacks,
) {
    use std::sync::Arc;
    use wasnap::store::{manifest::PackRef, pack::PackBuilder, recent::LoadedPack};
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let mut counters: Vec<u32> = (0..16_384).map(|_| (next(&mut x) % 50) as u32).collect();
    let bytes = |v: &[u32]| -> Vec<u8> { v.iter().flat_map(|w| w.to_le_bytes()).collect() };
    let mut versions = vec![bytes(&counters)];
    for _ in 0..=max_deltas {
        for _ in 0..250 {
            counters[(next(&mut x) % 16_384) as usize] += 1;
        }
        versions.push(bytes(&counters));
    }
    let mut coder = wasnap::delta::Coder::new().unwrap();
    let mut builder = PackBuilder::new(1, &[7; 16], 0);
    let (encoding, payload) = coder.whole(&versions[0]).unwrap();
    builder.push_payload(encoding, &payload).unwrap();
    for pair in versions[..=max_deltas].windows(2) {
        let (encoding, payload) = coder
            .best_delta(&pair[1], &pair[0], false)
            .unwrap()
            .unwrap();
        // Undoable, so that the walk down is what `down_from_the_top` measures.
        assert_eq!(encoding, wasnap::delta::Encoding::SparseDelta);
        builder.push_payload(encoding, &payload).unwrap();
    }
    let frames = max_deltas as u32 + 1;
    let pack = bytes::Bytes::from(builder.finish());
    let pack_ref = PackRef {
        generation: 1,
        writer_id: [7; 16],
        frames,
        bytes: pack.len() as u64,
    };
    let loaded = Arc::new(LoadedPack::parse(&pack_ref, pack).unwrap());
    let shared = Arc::new(pack_ref.clone());
    let chain = (0..frames)
        .map(|frame| snapshot::table::FrameLoc {
            pack: shared.clone(),
            frame,
            len: 0,
        })
        .collect();
    let packs = snapshot::rebase::ChainPacks::from([(pack_ref, loaded)]);
    let newest = versions.pop().unwrap();
    let top = versions.pop().unwrap();
    (newest, top, chain, packs)
}

/// A full chain's rebase, its versions walked down from the cached top or up from the
/// store's whole page (`snapshot::rebase`): the same choice, at different costs.
fn rebase(c: &mut Criterion) {
    let max_deltas = snapshot::table::DEFAULT_MAX_DELTAS;
    let (newest, top, chain, packs) = full_chain(max_deltas);
    let mut coder = wasnap::delta::Coder::new().unwrap();
    let rebased = |top, coder: &mut wasnap::delta::Coder<'_>| {
        snapshot::rebase::best_rebase(&newest, top, &chain, max_deltas, &packs, coder).unwrap()
    };
    assert_eq!(
        rebased(Some(&top[..]), &mut coder),
        rebased(None, &mut coder),
        "both walks write the same frame"
    );
    let mut group = c.benchmark_group("rebase");
    group.throughput(Throughput::Bytes(PAGE_SIZE as u64));
    for (walk, top) in [
        ("down_from_the_top", Some(&top[..])),
        ("up_from_the_store", None),
    ] {
        group.bench_function(BenchmarkId::new("best_rebase", walk), |b| {
            b.iter(|| rebased(top, &mut coder))
        });
    }
    group.finish();
}

fn page_hashing(c: &mut Criterion) {
    let memory: Vec<u8> = (0..64 * MIB).map(|i| (i * 31 % 251) as u8).collect();
    let mut copy = vec![0u8; memory.len()];
    let mut group = c.benchmark_group("page_hashing");
    group.throughput(Throughput::Bytes(memory.len() as u64));
    group.bench_function("xxh3_64KiB_pages/64MiB", |b| {
        b.iter(|| black_box(snapshot::pages::hash_pages(&memory)))
    });
    group.bench_function("memcpy/64MiB", |b| {
        b.iter(|| copy.copy_from_slice(black_box(&memory)))
    });
    group.finish();
}

fn checkpoint(c: &mut Criterion) {
    let mut group = c.benchmark_group("checkpoint");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(4));
    for mib in sizes_mib() {
        let mut sized = SizedTask::new(mib);
        for permille in [1usize, 10, 100] {
            let dirty = (sized.pages * permille / 1000).max(1);
            let percent = format!("{:.1}%_dirty", permille as f64 / 10.0);
            // The whole checkpoint, capture to commit (what a synchronous engine stalls for).
            let id = BenchmarkId::new(format!("{mib}MiB"), format!("{percent}/commit"));
            group.bench_function(id, |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        sized.dirty(dirty);
                        let started = Instant::now();
                        sized.task.checkpoint(&mut NoObserver).unwrap();
                        total += started.elapsed();
                    }
                    total
                })
            });
            // Only the pause: hashing and copying the dirty pages; the rest runs beside
            // the guest.
            let id = BenchmarkId::new(format!("{mib}MiB"), format!("{percent}/stall"));
            bench_pause(&mut group, id, &mut sized, dirty, false);
        }
    }
    group.finish();
}

/// The pause of a checkpoint after `dirty` pages changed; with `writes`, plus the time
/// the guest took to change them (where the kernel tracker's first-write faults fall).
fn bench_pause(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    id: BenchmarkId,
    sized: &mut SizedTask,
    dirty: usize,
    writes: bool,
) {
    group.bench_function(id, |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let started = Instant::now();
                sized.dirty(dirty);
                if writes {
                    total += started.elapsed();
                }
                total += sized.task.checkpoint(&mut NoObserver).unwrap().stall;
            }
            total
        })
    });
}

fn dirty_tracking(c: &mut Criterion) {
    let mut group = c.benchmark_group("dirty_tracking");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    for mib in sizes_mib() {
        for tracking in [DirtyTracking::Hash, DirtyTracking::Kernel] {
            let mut sized = SizedTask::with_tracking(mib, tracking);
            // Armed by the first checkpoint; the second is the first the kernel can answer.
            sized.dirty(1);
            sized.task.checkpoint(&mut NoObserver).unwrap();
            for permille in [1usize, 10, 100] {
                let dirty = (sized.pages * permille / 1000).max(1);
                let case = format!("{mib}MiB/{:.1}%_dirty", permille as f64 / 10.0);
                let id = BenchmarkId::new(format!("{tracking}/pause"), &case);
                bench_pause(&mut group, id, &mut sized, dirty, false);
                let id = BenchmarkId::new(format!("{tracking}/writes+pause"), &case);
                bench_pause(&mut group, id, &mut sized, dirty, true);
            }
        }
    }
    group.finish();
}

fn restore(c: &mut Criterion) {
    let mut group = c.benchmark_group("restore");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(4));
    for mib in sizes_mib() {
        let sized = SizedTask::new(mib);
        let store = CheckpointStore::open(&sized.store_url).unwrap();
        let newest = *store.generations().unwrap().last().unwrap();
        let manifest = store.read_manifest(newest).unwrap();
        let guest = Guest::load(&sized.guest_path).unwrap();
        group.throughput(Throughput::Bytes((mib * MIB) as u64));
        group.bench_function(
            BenchmarkId::new("from_local_disk", format!("{mib}MiB")),
            |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let mut instance = guest.instantiate(0, 0).unwrap();
                        let started = Instant::now();
                        black_box(snapshot::restore(&mut instance, &manifest, &store).unwrap());
                        total += started.elapsed();
                    }
                    total
                })
            },
        );
        // The comparison: the same number of bytes read from a file in the page cache.
        let file = sized._dir.path().join("page-cache-copy");
        std::fs::write(&file, vec![7u8; mib * MIB]).unwrap();
        group.bench_function(
            BenchmarkId::new("read_from_page_cache", format!("{mib}MiB")),
            |b| b.iter(|| black_box(std::fs::read(&file).unwrap())),
        );
    }
    group.finish();
}

fn small_guest_task(dir: &Path) -> (std::path::PathBuf, String) {
    let guest = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/guests/wordcount.wasm");
    assert!(guest.exists(), "run scripts/build-guests.sh first");
    let input = dir.join("input");
    let text: String = (0..5000)
        .map(|i| format!("w{} w{} w{}\n", i % 700, i % 13, i % 101))
        .collect();
    std::fs::write(&input, text).unwrap();
    let store_url = dir.join("store").display().to_string();
    let config = RunConfig::new(&guest, &input, dir.join("output"));
    wasnap::task::run(&config, &store_url, &mut NoObserver).unwrap();
    (guest, store_url)
}

fn warm_resume(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let (guest_path, store_url) = small_guest_task(dir.path());
    let guest = Guest::load(&guest_path).unwrap();
    let store = CheckpointStore::open(&store_url).unwrap();
    let newest = *store.generations().unwrap().last().unwrap();
    // Its parts, to see where the time goes.
    let manifest = store.read_manifest(newest).unwrap();
    c.bench_function("warm_resume_parts/read_manifest", |b| {
        b.iter(|| black_box(store.read_manifest(newest).unwrap()))
    });
    let packs: Vec<_> = manifest.packs.iter().collect();
    c.bench_function("warm_resume_parts/read_packs", |b| {
        b.iter(|| black_box(store.read_all_packs(&packs).unwrap()))
    });
    c.bench_function("warm_resume_parts/instantiate", |b| {
        b.iter(|| black_box(guest.instantiate(0, 0).unwrap()))
    });
    c.bench_function("warm_resume/wordcount", |b| {
        b.iter(|| {
            // Warm: the module is compiled; read the manifest, instantiate, restore, go on.
            let manifest = store.read_manifest(newest).unwrap();
            let mut instance = guest
                .instantiate(manifest.random_seed, manifest.random_position)
                .unwrap();
            snapshot::restore(&mut instance, &manifest, &store).unwrap();
            instance.process(b"hello resumed world").unwrap();
            black_box(instance.emitted_len())
        })
    });
}

fn record_call(c: &mut Criterion) {
    let guest = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/guests/counter.wasm");
    assert!(guest.exists(), "run scripts/build-guests.sh first");
    let mut instance = Guest::load(&guest).unwrap().instantiate(0, 0).unwrap();
    instance.start_fresh().unwrap();
    let mut group = c.benchmark_group("record_call");
    group.throughput(Throughput::Elements(1));
    group.bench_function("counter", |b| {
        b.iter(|| {
            instance
                .process(black_box(b"a typical record of some forty bytes...."))
                .unwrap();
            instance.discard_emitted();
        })
    });
    group.finish();
}

criterion_group!(
    benches,
    page_hashing,
    page_delta,
    rebase,
    record_call,
    warm_resume,
    checkpoint,
    dirty_tracking,
    restore
);
criterion_main!(benches);
