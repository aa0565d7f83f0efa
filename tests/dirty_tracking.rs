//! Kernel dirty tracking on real guests: checked against hashing at every checkpoint,
//! through restores, memory growth, several memories and memory64; a tracker that fails
//! mid-run; and a process where the kernel's interface is taken away by seccomp.

mod common;

use std::process::Stdio;

use common::*;
use wasnap::CheckpointStats;
use wasnap::snapshot::DirtyTracking;
use wasnap::snapshot::dirty::{Dirty, DirtyTracker, KernelTracker};
use wasnap::state::PAGE_SIZE;
use wasnap::store::CheckpointStore;
use wasnap::{CheckpointObserver, Mode, RunConfig, TaskConfig};

/// Every checkpoint's stats, in order; a failed checkpoint fails the test.
#[derive(Default)]
struct Stats(Vec<CheckpointStats>);

impl CheckpointObserver for Stats {
    fn finished(&mut self, generation: u64, outcome: Result<&CheckpointStats, &wasnap::Error>) {
        match outcome {
            Ok(stats) => self.0.push(stats.clone()),
            Err(err) => panic!("checkpoint {generation} failed: {err:#}"),
        }
    }
}

/// Run `config` to the end of its input on the store at `store`, returning its stats.
fn run_task(config: &RunConfig, store: &str) -> Vec<CheckpointStats> {
    let mut task = config.open(CheckpointStore::open(store).unwrap()).unwrap();
    let mut stats = Stats::default();
    task.run(&mut stats).unwrap();
    stats.0
}

/// Checks that the kernel, not hashing, answered from checkpoint `from` on (the first of
/// a fresh start hashes everything: nothing was armed yet; a restore arms the tracker).
fn assert_kernel_answered(what: &str, stats: &[CheckpointStats], memories: usize, from: usize) {
    for s in &stats[from..] {
        assert_eq!(
            s.kernel_tracked_memories, memories,
            "{what}: checkpoint {} was not tracked by the kernel",
            s.generation
        );
        let pages = s.memory_bytes.div_ceil(PAGE_SIZE as u64) as usize;
        assert!(
            s.hashed_pages <= pages,
            "{what}: hashed more pages than exist"
        );
        assert!(
            s.hashed_pages >= s.dirty_pages + s.zero_pages,
            "{what}: checkpoint {} changed pages that were never hashed",
            s.generation
        );
    }
}

/// For each guest: a fresh run, then a resume over a longer input, every checkpoint of
/// both checked by `verify` (the kernel's pages must include every page whose hash
/// changed, or the checkpoint fails); the output must be the uninterrupted run's.
#[test]
fn the_kernel_reports_every_page_hashing_finds_on_every_guest() {
    let cases: &[(&str, bool, usize)] = &[
        ("wordcount", false, 1),
        ("window", true, 1),
        ("counter", false, 1),
        ("wat-globals", false, 1),
        ("c-wordcount", false, 1),
        ("c-sessions", false, 1),
        ("as-wordcount", false, 1),
        ("as-inventory", false, 1),
        ("bigstate", false, 1),
    ];
    let dir = tempfile::tempdir().unwrap();
    for &(name, numbers, memories) in cases {
        let guest = guest(name);
        let case = dir.path().join(name);
        std::fs::create_dir_all(&case).unwrap();
        let input = case.join("input");
        let records = if name == "bigstate" { 9_000 } else { 12_000 };
        write_input(&input, records, 3000, numbers);
        let expected = reference_output(&guest, &input);
        let full = std::fs::read(&input).unwrap();
        // First run: the first two thirds of the input.
        let cut = full[..full.len() * 2 / 3]
            .iter()
            .rposition(|b| *b == b'\n')
            .unwrap()
            + 1;
        std::fs::write(&input, &full[..cut]).unwrap();
        let store = case.join("store").display().to_string();
        let config = RunConfig {
            task: TaskConfig {
                dirty_tracking: DirtyTracking::Verify,
                ..TaskConfig::by_count(500)
            },
            ..RunConfig::new(&guest, &input, case.join("output"))
        };
        let first = run_task(&config, &store);
        assert!(first.len() >= 10, "{name}: {} checkpoints", first.len());
        assert_kernel_answered(name, &first, memories, 1);
        // Resume: the restore wrote every page, and the kernel must see only what follows.
        std::fs::write(&input, &full).unwrap();
        let second = run_task(&config, &store);
        assert!(second.len() >= 5, "{name}: {} checkpoints", second.len());
        assert_kernel_answered(&format!("{name} resumed"), &second, memories, 0);
        assert_same_output(
            &std::fs::read(case.join("output")).unwrap(),
            &expected,
            name,
        );
        let hashed: usize = second.iter().map(|s| s.hashed_pages).sum();
        let pages: u64 = second
            .iter()
            .map(|s| s.memory_bytes / PAGE_SIZE as u64)
            .sum();
        eprintln!("{name}: the kernel's record left {hashed} of {pages} pages to hash");
    }
}

/// Stdio programs unwind and rewind their stacks through memory at every checkpoint;
/// checked the same way, over one run (a program that ended cannot be resumed with more).
#[test]
fn the_kernel_reports_every_page_hashing_finds_on_stdio_programs() {
    for name in ["stdio-wordfreq", "stdio-c-wordfreq"] {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("input");
        write_input(&input, 30_000, 3000, false);
        let config = RunConfig {
            task: TaskConfig {
                mode: Mode::stdio(16 << 10),
                dirty_tracking: DirtyTracking::Verify,
                // Each checkpoint on its own: the test checks them one by one.
                coalesce: false,
                ..TaskConfig::default()
            },
            ..RunConfig::new(guest(name), &input, dir.path().join("output"))
        };
        let stats = run_task(&config, dir.path().join("store").to_str().unwrap());
        assert!(stats.len() >= 10, "{name}: {} checkpoints", stats.len());
        assert_kernel_answered(name, &stats, 1, 1);
        let hash_config = RunConfig {
            output: dir.path().join("hashed-output"),
            task: TaskConfig {
                dirty_tracking: DirtyTracking::Hash,
                ..config.task.clone()
            },
            ..config.clone()
        };
        run_task(
            &hash_config,
            dir.path().join("store-hash").to_str().unwrap(),
        );
        assert_same_output(
            &std::fs::read(&config.output).unwrap(),
            &std::fs::read(&hash_config.output).unwrap(),
            name,
        );
    }
}

/// A guest with two memories, one of them 64-bit, both grown while it runs and written
/// in their new pages and in scattered old ones.
const GROWING_GUEST: &str = r#"(module
  (import "wasnap" "emit" (func $emit (param i32 i32)))
  (memory (export "memory") 2)
  (memory $wide i64 1)
  (global $n (mut i32) (i32.const 0))
  (func (export "alloc") (param i32) (result i32) (i32.const 0))
  (func (export "process") (param $ptr i32) (param $len i32)
    (local $page i32)
    (global.set $n (i32.add (global.get $n) (i32.const 1)))
    ;; every 7th record grows each memory by a page
    (if (i32.eqz (i32.rem_u (global.get $n) (i32.const 7)))
      (then (drop (memory.grow (i32.const 1)))
            (drop (memory.grow $wide (i64.const 1)))))
    ;; write the count into a page chosen by the count, in each memory
    (local.set $page (i32.rem_u (i32.mul (global.get $n) (i32.const 2654435761)) (memory.size)))
    (i32.store (i32.add (i32.mul (local.get $page) (i32.const 65536)) (i32.const 4096))
               (global.get $n))
    (i64.store $wide
      (i64.add (i64.mul (i64.rem_u (i64.extend_i32_u (global.get $n)) (memory.size $wide))
                        (i64.const 65536)) (i64.const 60000))
      (i64.extend_i32_u (global.get $n)))
    (call $emit (local.get $ptr) (local.get $len))))"#;

#[test]
fn grown_memories_several_memories_and_memory64_are_tracked() {
    let dir = tempfile::tempdir().unwrap();
    let guest = dir.path().join("growing.wat");
    std::fs::write(&guest, GROWING_GUEST).unwrap();
    let input = dir.path().join("input");
    write_input(&input, 3000, 100, false);
    let expected = reference_output(&guest, &input);
    let store = dir.path().join("store").display().to_string();
    let config = RunConfig {
        task: TaskConfig {
            dirty_tracking: DirtyTracking::Verify,
            ..TaskConfig::by_count(50)
        },
        ..RunConfig::new(&guest, &input, dir.path().join("output"))
    };
    let stats = run_task(&config, &store);
    assert_kernel_answered("growing", &stats, 2, 1);
    let grown = stats
        .windows(2)
        .filter(|w| w[1].memory_bytes > w[0].memory_bytes);
    assert!(
        grown.count() >= 50,
        "the memories did not grow between checkpoints"
    );
    assert_same_output(
        &std::fs::read(&config.output).unwrap(),
        &expected,
        "growing",
    );
}

/// A tracker that fails at every third collect, as a kernel interface that goes away
/// would: those checkpoints hash everything, and nothing is lost.
struct Flaky {
    inner: KernelTracker,
    collects: usize,
}

impl DirtyTracker for Flaky {
    fn collect(&mut self, index: usize, memory: &[u8]) -> anyhow::Result<Dirty> {
        self.collects += 1;
        if self.collects.is_multiple_of(3) {
            anyhow::bail!("injected: the tracker's interface went away");
        }
        self.inner.collect(index, memory)
    }
    fn arm(&mut self, index: usize, memory: &[u8]) -> anyhow::Result<()> {
        self.inner.arm(index, memory)
    }
}

#[test]
fn a_tracker_failing_mid_run_falls_back_to_hashing_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let guest = guest("c-wordcount");
    let input = dir.path().join("input");
    write_input(&input, 10_000, 3000, false);
    let expected = reference_output(&guest, &input);
    let config = RunConfig {
        task: TaskConfig::by_count(250),
        ..RunConfig::new(&guest, &input, dir.path().join("output"))
    };
    let store = dir.path().join("store").display().to_string();
    let mut task = config.open(CheckpointStore::open(&store).unwrap()).unwrap();
    task.set_dirty_tracker(Box::new(Flaky {
        inner: KernelTracker::new(0).unwrap(),
        collects: 0,
    }));
    let mut stats = Stats::default();
    task.run(&mut stats).unwrap();
    drop(task);
    let kernel = stats
        .0
        .iter()
        .filter(|s| s.kernel_tracked_memories == 1)
        .count();
    let hashed = stats.0.len() - kernel;
    // Every third collect failed; the one after each failure is kernel-tracked again.
    assert!(
        hashed >= stats.0.len() / 3,
        "{hashed} of {} hashed",
        stats.0.len()
    );
    assert!(
        kernel >= stats.0.len() / 2,
        "{kernel} of {} kernel",
        stats.0.len()
    );
    assert_same_output(&std::fs::read(&config.output).unwrap(), &expected, "flaky");
    // And the store restores to the same state a clean run reaches.
    let out = run_ok(&run_args(&guest, &input, &config.output, &store, 250));
    assert!(stderr(&out).is_empty(), "{}", stderr(&out));
    assert_same_output(&std::fs::read(&config.output).unwrap(), &expected, "flaky");
}

/// `wasnap run` in a child whose seccomp filter refuses `userfaultfd` (as Docker's
/// default profile does).
fn run_without_userfaultfd(args: &[String], log: &str) -> std::process::Output {
    use std::os::unix::process::CommandExt;
    let mut cmd = wasnap();
    cmd.args(args).env("WASNAP_LOG", log).stdin(Stdio::null());
    // SAFETY: the closure only makes two prctl calls, which are async-signal-safe.
    unsafe { cmd.pre_exec(refuse_userfaultfd) };
    cmd.output().expect("spawn wasnap")
}

/// A seccomp filter: `userfaultfd` fails with EPERM, everything else is allowed.
fn refuse_userfaultfd() -> std::io::Result<()> {
    const BPF_LD_W_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
    const BPF_JEQ_K: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
    const BPF_RET_K: u16 = 0x06; // BPF_RET | BPF_K
    const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
    const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
    let stmt = |code, k| libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    };
    let filter = [
        stmt(BPF_LD_W_ABS, 0), // seccomp_data.nr
        libc::sock_filter {
            code: BPF_JEQ_K,
            jt: 0,
            jf: 1,
            k: libc::SYS_userfaultfd as u32,
        },
        stmt(BPF_RET_K, SECCOMP_RET_ERRNO | libc::EPERM as u32),
        stmt(BPF_RET_K, SECCOMP_RET_ALLOW),
    ];
    let program = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: plain prctl calls with a filter that lives until they return.
    unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
            || libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                &program as *const libc::sock_fprog,
            ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

fn tracking_args(base: Vec<String>, tracking: &str) -> Vec<String> {
    let mut args = base;
    args.extend(["--dirty-tracking".to_string(), tracking.to_string()]);
    args
}

#[test]
fn without_userfaultfd_auto_hashes_with_the_same_output_and_kernel_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let guest = guest("bigstate"); // 256 MiB: auto would pick the kernel where it can
    let input = dir.path().join("input");
    write_input(&input, 4000, 3000, false);
    let run_in = |name: &str, tracking: &str, sandboxed: bool| {
        let output = dir.path().join(name);
        let store = dir
            .path()
            .join(format!("{name}-store"))
            .display()
            .to_string();
        let args = tracking_args(run_args(&guest, &input, &output, &store, 500), tracking);
        let out = if sandboxed {
            run_without_userfaultfd(&args, "wasnap=debug")
        } else {
            run(&args)
        };
        (out, output)
    };
    let (out, kernel_output) = run_in("kernel", "kernel", false);
    assert!(out.status.success(), "{}", stderr(&out));
    let (out, fallback_output) = run_in("fallback", "auto", true);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("kernel dirty tracking is unavailable"),
        "the debug log does not say why the kernel was not used: {}",
        stderr(&out)
    );
    assert_same_output(
        &std::fs::read(&fallback_output).unwrap(),
        &std::fs::read(&kernel_output).unwrap(),
        "auto without userfaultfd",
    );
    // The filter really takes the kernel's interface away (else this test tests nothing).
    let inspect = ["inspect".to_string(), "--store".into(), "memory://".into()];
    let here = String::from_utf8(run_ok(&inspect).stdout).unwrap();
    let sandboxed = String::from_utf8(run_without_userfaultfd(&inspect, "off").stdout).unwrap();
    assert!(here.contains("auto: kernel"), "{here}");
    assert!(
        sandboxed.contains("auto: hash (kernel unavailable: cannot open a userfaultfd"),
        "{sandboxed}"
    );
    let (out, refused_output) = run_in("refused", "kernel", true);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("kernel dirty tracking is not available here")
            && stderr(&out).contains("--dirty-tracking auto or hash"),
        "{}",
        stderr(&out)
    );
    assert!(
        std::fs::read(&refused_output)
            .unwrap_or_default()
            .is_empty(),
        "a refused run wrote output"
    );
}

#[test]
fn inspect_and_bench_say_which_tracker_is_used() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("input");
    write_input(&input, 3000, 3000, false);
    // An existing store with no checkpoints (inspect never creates one).
    let store = dir.path().join("store");
    std::fs::create_dir(&store).unwrap();
    let out = run_ok(&[
        "inspect".into(),
        "--store".into(),
        store.display().to_string(),
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("dirty tracking on this machine: auto: kernel for memories of 4 MiB"),
        "{text}"
    );
    let bench = |tracking: &str| {
        let args = tracking_args(
            vec![
                "bench".into(),
                guest("wordcount").display().to_string(),
                "--input".into(),
                input.display().to_string(),
                "--checkpoint-every".into(),
                "300".into(),
                "--json".into(),
                "--no-baseline".into(),
                "--passes".into(),
                "1".into(),
            ],
            tracking,
        );
        let out = run_ok(&args);
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|r| r.get("kind").is_none()) // the run's summary, last
            .collect::<Vec<_>>()
    };
    let kernel = bench("kernel");
    let hash = bench("hash");
    assert_eq!(
        kernel[0]["tracker"], "hash",
        "the first checkpoint hashes everything"
    );
    assert!(kernel[1..].iter().all(|r| r["tracker"] == "kernel"));
    assert!(hash.iter().all(|r| r["tracker"] == "hash"));
    // Same guest, same input: the same pages changed, whoever found them.
    let dirty = |records: &[serde_json::Value]| -> Vec<u64> {
        records
            .iter()
            .map(|r| r["dirty_pages"].as_u64().unwrap())
            .collect()
    };
    assert_eq!(dirty(&kernel), dirty(&hash));
}
