//! Hostile guests, inputs, stores and paths, as an attacker would try them: each ends with
//! exact output or a clear one-line error, with no panic, no hang, no allocation beyond
//! the guest's cap plus a documented constant, and nothing outside the store, the output
//! and the cache touched.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// A non-zero exit that is not a panic, with one error line that names `cause`.
fn assert_clean_failure(out: &Output, cause: &str) {
    let err = stderr(out);
    assert!(
        !out.status.success(),
        "expected a failure mentioning {cause:?}: {err}"
    );
    assert_ne!(out.status.code(), Some(101), "wasnap panicked: {err}");
    assert!(!err.contains("panicked"), "wasnap panicked: {err}");
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| !l.starts_with("wasnap: warning"))
        .collect();
    assert_eq!(lines.len(), 1, "expected exactly one line, got: {err}");
    assert!(lines[0].starts_with("wasnap: error: "), "{err}");
    assert!(
        lines[0].contains(cause),
        "the error does not mention {cause:?}: {err}"
    );
}

/// Write `wat` as `NAME.wat` in `dir` (wasnap reads WAT text by that extension).
fn wat(dir: &Path, name: &str, wat: &str) -> PathBuf {
    let path = dir.join(format!("{name}.wat"));
    std::fs::write(&path, wat).unwrap();
    path
}

fn lines(path: &Path, from: usize, to: usize) {
    let text: String = (from..to).map(|i| format!("record {i}\n")).collect();
    std::fs::write(path, text).unwrap();
}

fn args(guest: &Path, input: &Path, output: &Path, store: &Path, every: u64) -> Vec<String> {
    run_args(guest, input, output, store.to_str().unwrap(), every)
}

/// Run with a deadline: a hang fails the test instead of blocking it. Also returns the
/// highest resident memory the process reached (VmHWM), in bytes.
fn run_bounded(args: &[String], limit: Duration) -> (Output, u64) {
    let mut child = wasnap()
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status_path = format!("/proc/{}/status", child.id());
    let started = Instant::now();
    let mut peak = 0u64;
    // Read stderr on the side, so a chatty child cannot block on a full pipe.
    let mut err = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = Vec::new();
        std::io::Read::read_to_end(&mut err, &mut text).unwrap();
        text
    });
    loop {
        if let Ok(status) = std::fs::read_to_string(&status_path)
            && let Some(kb) = status
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        {
            peak = peak.max(kb * 1024);
        }
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            panic!("wasnap {args:?} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut out = child.wait_with_output().unwrap();
    out.stderr = reader.join().unwrap();
    (out, peak)
}

// 1. Host-side state a start function changed does not survive into a restore.

const RANDOM_GUEST: &str = r#"(module
  (import "wasi_snapshot_preview1" "random_get" (func $random (param i32 i32) (result i32)))
  (import "wasnap" "emit" (func $emit (param i32 i32)))
  (memory (export "memory") 1)
  (func $start
    (drop (call $random (i32.const 0) (i32.const 8)))
    (call $emit (i32.const 0) (i32.const 8)))
  (start $start)
  (func (export "alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "process") (param i32 i32)
    (drop (call $random (i32.const 16) (i32.const 4)))
    (call $emit (i32.const 16) (i32.const 4))))"#;

#[test]
fn a_start_function_that_draws_random_and_emits_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let guest = wat(dir.path(), "random", RANDOM_GUEST);
    let whole = dir.path().join("whole");
    lines(&whole, 0, 20);
    let reference = dir.path().join("reference");
    run_ok(&args(
        &guest,
        &whole,
        &reference,
        &dir.path().join("s0"),
        1 << 40,
    ));

    // 10 records, then 10 more appended and the same command again (a resume).
    let input = dir.path().join("input");
    let output = dir.path().join("output");
    let store = dir.path().join("store");
    lines(&input, 0, 10);
    run_ok(&args(&guest, &input, &output, &store, 5));
    lines(&input, 0, 20);
    run_ok(&args(&guest, &input, &output, &store, 5));
    assert_same_output(
        &std::fs::read(&output).unwrap(),
        &std::fs::read(&reference).unwrap(),
        "random draws after a resume",
    );
}

// 2. Links planted in the cache or the store are never followed.

#[test]
fn a_link_planted_in_the_page_cache_is_replaced_not_followed() {
    let dir = tempfile::tempdir().unwrap();
    let victim = dir.path().join("notes.txt");
    std::fs::write(&victim, "precious").unwrap();
    let guest = guest("wordcount");
    let input = dir.path().join("input");
    write_input(&input, 2000, 100, false);
    let output = dir.path().join("out");
    let cache = dir.path().join("out.wasnap-cache");
    std::fs::create_dir(&cache).unwrap();
    std::os::unix::fs::symlink(&victim, cache.join("memory-0.pages")).unwrap();
    run_ok(&args(
        &guest,
        &input,
        &output,
        &dir.path().join("store"),
        500,
    ));
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
    assert_same_output(
        &std::fs::read(&output).unwrap(),
        &reference_output(&guest, &input),
        "with a planted link",
    );

    // A cache directory that is itself a link is refused.
    let other = dir.path().join("out2");
    std::os::unix::fs::symlink(dir.path(), dir.path().join("out2.wasnap-cache")).unwrap();
    let out = run(&args(
        &guest,
        &input,
        &other,
        &dir.path().join("store2"),
        500,
    ));
    assert_clean_failure(&out, "is a symbolic link");
}

#[test]
fn a_store_whose_packs_are_a_link_is_damaged_and_nothing_outside_is_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let guest = guest("wordcount");
    let input = dir.path().join("input");
    write_input(&input, 3000, 100, false);
    let output = dir.path().join("out");
    let store = dir.path().join("store");
    let mut run_args = args(&guest, &input, &output, &store, 500);
    run_args.extend(["--retain".into(), "1".into()]);
    // Half the input, then the packs moved out and linked back in.
    let half = dir.path().join("half");
    std::fs::write(
        &half,
        &std::fs::read(&input).unwrap()[..std::fs::read(&input).unwrap().len() / 2],
    )
    .unwrap();
    run_ok(&args(&guest, &half, &output, &store, 500));
    let outside = dir.path().join("outside");
    std::fs::rename(store.join("packs"), &outside).unwrap();
    std::fs::write(
        outside.join("00000000000000000001-00000000000000000000000000000000.pack"),
        "x",
    )
    .unwrap();
    let before: Vec<_> = std::fs::read_dir(&outside)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    std::os::unix::fs::symlink(&outside, store.join("packs")).unwrap();
    let out = run(&run_args);
    assert_clean_failure(&out, "symbolic link");
    let after: Vec<_> = std::fs::read_dir(&outside)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        before.len(),
        after.len(),
        "files outside the store were deleted"
    );
}

// 3. A guest's output is bounded.

#[test]
fn a_guest_that_emits_without_end_stops_with_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let guest = wat(
        dir.path(),
        "flood",
        r#"(module
          (import "wasnap" "emit" (func $emit (param i32 i32)))
          (memory (export "memory") 1)
          (func (export "alloc") (param i32) (result i32) (i32.const 0))
          (func (export "process") (param i32 i32)
            (loop $l (call $emit (i32.const 0) (i32.const 65536)) (br $l))))"#,
    );
    let input = dir.path().join("input");
    lines(&input, 0, 3);
    for limits in [["--max-memory-mib", "1"], ["--call-timeout-ms", "1000"]] {
        let mut run_args = args(
            &guest,
            &input,
            &dir.path().join("out"),
            &dir.path().join("store"),
            1,
        );
        run_args.extend(limits.iter().map(|s| s.to_string()));
        let (out, peak) = run_bounded(&run_args, Duration::from_secs(60));
        assert_clean_failure(&out, "output passed 64 MiB");
        assert!(peak < 400 << 20, "the process reached {} MiB", peak >> 20);
    }
}

#[test]
fn output_waiting_for_an_object_sink_forces_checkpoints_instead_of_growing() {
    let dir = tempfile::tempdir().unwrap();
    // 1 MiB of output per record: 300 MiB in all, but checkpoints only every million.
    let guest = wat(
        dir.path(),
        "big",
        r#"(module
          (import "wasnap" "emit" (func $emit (param i32 i32)))
          (memory (export "memory") 17)
          (func (export "alloc") (param i32) (result i32) (i32.const 0))
          (func (export "process") (param i32 i32)
            (call $emit (i32.const 0) (i32.const 1048575))))"#,
    );
    let input = dir.path().join("input");
    lines(&input, 0, 300);
    let out_dir = dir.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let store = dir.path().join("store");
    let run_args = args(&guest, &input, &out_dir, &store, 1_000_000);
    let (out, peak) = run_bounded(&run_args, Duration::from_secs(120));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(peak < 600 << 20, "the process reached {} MiB", peak >> 20);
    assert!(
        open_store(store.to_str().unwrap())
            .generations()
            .unwrap()
            .len()
            >= 3,
        "no early checkpoints"
    );
    let cat = run_ok(&[
        "cat".into(),
        "--output".into(),
        out_dir.display().to_string(),
    ]);
    assert_eq!(cat.stdout.len(), 300 << 20);
}

// 4. The call time limit covers blocking host calls.

fn sleeper(dir: &Path, nanos: u64) -> PathBuf {
    wat(
        dir,
        &format!("sleep{nanos}"),
        &format!(
            r#"(module
          (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
          (import "wasnap" "emit" (func $emit (param i32 i32)))
          (memory (export "memory") 1)
          (func (export "alloc") (param i32) (result i32) (i32.const 1024))
          (func (export "process") (param i32 i32)
            (i64.store (i32.const 64) (i64.const 7))
            (i32.store8 (i32.const 72) (i32.const 0))
            (i32.store (i32.const 80) (i32.const 1))
            (i64.store (i32.const 88) (i64.const {nanos}))
            (i64.store (i32.const 96) (i64.const 0))
            (i32.store16 (i32.const 104) (i32.const 0))
            (i32.store (i32.const 300)
              (call $poll (i32.const 64) (i32.const 128) (i32.const 1) (i32.const 200)))
            ;; errno, events, the event's userdata and type: 4 + 4 + 8 + 1 bytes
            (i32.store (i32.const 304) (i32.load (i32.const 200)))
            (i64.store (i32.const 308) (i64.load (i32.const 128)))
            (i32.store8 (i32.const 316) (i32.load8_u (i32.const 138)))
            (call $emit (i32.const 300) (i32.const 17))))"#
        ),
    )
}

#[test]
fn a_guest_that_sleeps_past_its_time_limit_stops_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("input");
    lines(&input, 0, 3);
    for nanos in [2_000_000_000u64, 1_000_000_000_000] {
        let guest = sleeper(dir.path(), nanos);
        let mut run_args = args(
            &guest,
            &input,
            &dir.path().join("out"),
            &dir.path().join(format!("s{nanos}")),
            1,
        );
        run_args.extend(["--call-timeout-ms".into(), "200".into()]);
        let (out, _) = run_bounded(&run_args, Duration::from_secs(30));
        assert_clean_failure(&out, "past its time limit of 200 ms");
    }
    // A short sleep within the limit sleeps and answers as WASI says: one clock event.
    let guest = sleeper(dir.path(), 1_000_000);
    let output = dir.path().join("short");
    let mut run_args = args(&guest, &input, &output, &dir.path().join("short-store"), 1);
    run_args.extend(["--call-timeout-ms".into(), "5000".into()]);
    run_ok(&run_args);
    let mut record = vec![0u8; 4];
    record.extend(1u32.to_le_bytes());
    record.extend(7u64.to_le_bytes());
    record.push(0);
    record.push(b'\n');
    assert_eq!(std::fs::read(&output).unwrap(), record.repeat(3));
}

// 5. Crafted store objects: bounded, and an unusable newest checkpoint falls back.

/// A store with several checkpoints of a finished half run, and what the whole run writes.
struct Stopped {
    _dir: tempfile::TempDir,
    args: Vec<String>,
    store: PathBuf,
    output: PathBuf,
    expected: Vec<u8>,
}

fn stopped_halfway() -> Stopped {
    let dir = tempfile::tempdir().unwrap();
    let guest = guest("wordcount");
    let input = dir.path().join("input");
    write_input(&input, 4000, 200, false);
    let expected = reference_output(&guest, &input);
    let half = dir.path().join("half");
    let bytes = std::fs::read(&input).unwrap();
    let cut = bytes[..bytes.len() / 2]
        .iter()
        .rposition(|b| *b == b'\n')
        .unwrap()
        + 1;
    std::fs::write(&half, &bytes[..cut]).unwrap();
    let output = dir.path().join("out");
    let store = dir.path().join("store");
    run_ok(&args(&guest, &half, &output, &store, 300));
    let args = args(&guest, &input, &output, &store, 300);
    Stopped {
        _dir: dir,
        args,
        store,
        output,
        expected,
    }
}

impl Stopped {
    fn newest_manifest(&self) -> PathBuf {
        let store = open_store(self.store.to_str().unwrap());
        let newest = *store.generations().unwrap().last().unwrap();
        self.store.join(format!("manifests/{newest:020}"))
    }

    fn a_pack_of_the_newest(&self) -> PathBuf {
        let store = open_store(self.store.to_str().unwrap());
        let newest = *store.generations().unwrap().last().unwrap();
        let manifest = store.read_manifest(newest).unwrap();
        self.store
            .join("packs")
            .join(manifest.packs.last().unwrap().name())
    }

    /// The run goes on from an older checkpoint, warns, and writes exactly the reference.
    fn assert_falls_back(&self, what: &str) {
        let (out, peak) = run_bounded(&self.args, Duration::from_secs(120));
        assert!(out.status.success(), "{what}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("unusable"),
            "{what}: no warning: {}",
            stderr(&out)
        );
        assert!(
            peak < 500 << 20,
            "{what}: the process reached {} MiB",
            peak >> 20
        );
        assert_same_output(&std::fs::read(&self.output).unwrap(), &self.expected, what);
    }

    fn rewrite_newest_manifest(&self, change: impl FnOnce(&mut wasnap::store::Manifest)) {
        let path = self.newest_manifest();
        let mut manifest =
            wasnap::store::Manifest::decode(&std::fs::read(&path).unwrap(), "test").unwrap();
        change(&mut manifest);
        std::fs::write(&path, manifest.encode().unwrap()).unwrap();
    }
}

fn sparse_file(path: &Path, len: u64) {
    let _ = std::fs::remove_file(path);
    std::fs::File::create(path).unwrap().set_len(len).unwrap();
}

fn fifo(path: &Path) {
    let _ = std::fs::remove_file(path);
    let name = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(name.as_ptr(), 0o600) }, 0);
}

#[test]
fn a_manifest_claiming_a_huge_memory_falls_back() {
    for pages in [10_000_000_000u64, 1_000_000_000] {
        let s = stopped_halfway();
        s.rewrite_newest_manifest(|m| m.memories[0].byte_len = pages * 65536);
        s.assert_falls_back(&format!("{pages} pages"));
    }
}

#[test]
fn a_manifest_naming_millions_of_packs_falls_back() {
    let s = stopped_halfway();
    s.rewrite_newest_manifest(|m| {
        let pack = m.packs[0].clone();
        m.packs = (0..2_000_000u64)
            .map(|g| wasnap::store::manifest::PackRef {
                generation: g,
                ..pack.clone()
            })
            .collect();
    });
    s.assert_falls_back("2 000 000 packs");
}

#[test]
fn huge_sparse_objects_and_fifos_in_the_store_fall_back_or_fail_cleanly() {
    let s = stopped_halfway();
    sparse_file(&s.a_pack_of_the_newest(), 3 << 30);
    s.assert_falls_back("a 3 GiB pack");

    let s = stopped_halfway();
    sparse_file(&s.newest_manifest(), 3 << 30);
    s.assert_falls_back("a 3 GiB manifest");

    let s = stopped_halfway();
    fifo(&s.a_pack_of_the_newest());
    s.assert_falls_back("a FIFO pack");

    for (what, damage) in [("a 3 GiB task object", 0), ("a FIFO task object", 1)] {
        let s = stopped_halfway();
        let task = s.store.join("task");
        if damage == 0 {
            sparse_file(&task, 3 << 30);
        } else {
            fifo(&task);
        }
        let (out, peak) = run_bounded(&s.args, Duration::from_secs(60));
        assert_clean_failure(&out, "task");
        assert!(
            peak < 300 << 20,
            "{what}: the process reached {} MiB",
            peak >> 20
        );
    }
}

#[test]
fn a_manifest_with_the_largest_generation_number_is_not_a_checkpoint() {
    let s = stopped_halfway();
    std::fs::copy(
        s.newest_manifest(),
        s.store.join("manifests/18446744073709551615"),
    )
    .unwrap();
    run_ok(&s.args);
    assert_same_output(
        &std::fs::read(&s.output).unwrap(),
        &s.expected,
        "after the rerun",
    );
    // And later runs go on committing.
    run_ok(&s.args);
}

// 6. Endless or hostile inputs.

#[test]
fn devices_fifos_and_endless_lines_are_refused_as_input() {
    let dir = tempfile::tempdir().unwrap();
    let guest = guest("wordcount");
    let fifo_input = dir.path().join("fifo");
    fifo(&fifo_input);
    for (input, cause) in [
        (PathBuf::from("/dev/zero"), "not a regular file"),
        (fifo_input, "not a regular file"),
    ] {
        let (out, peak) = run_bounded(
            &args(
                &guest,
                &input,
                &dir.path().join("out"),
                &dir.path().join("store"),
                10,
            ),
            Duration::from_secs(30),
        );
        assert_clean_failure(&out, cause);
        assert!(peak < 300 << 20);
    }
    let long = dir.path().join("long");
    let mut text = b"a short record\n".to_vec();
    text.resize(text.len() + (65 << 20), b'x');
    std::fs::write(&long, &text).unwrap();
    let (out, peak) = run_bounded(
        &args(
            &guest,
            &long,
            &dir.path().join("out2"),
            &dir.path().join("store2"),
            10,
        ),
        Duration::from_secs(60),
    );
    assert_clean_failure(&out, "longer than 64 MiB");
    assert!(peak < 400 << 20, "{} MiB", peak >> 20);
}

// 7. The same path twice.

#[test]
fn an_output_that_is_the_input_the_guest_or_in_the_store_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let guest_file = dir.path().join("guest.wasm");
    std::fs::copy(guest("wordcount"), &guest_file).unwrap();
    let input = dir.path().join("input");
    write_input(&input, 100, 10, false);
    let original_input = std::fs::read(&input).unwrap();
    let original_guest = std::fs::read(&guest_file).unwrap();
    let store = dir.path().join("store");
    let link = dir.path().join("link-to-input");
    std::os::unix::fs::symlink(&input, &link).unwrap();
    for (output, cause) in [
        (input.clone(), "the same file as --input"),
        (link, "the same file as --input"),
        (guest_file.clone(), "the same file as the guest"),
        (store.join("out"), "the store"),
    ] {
        let out = run(&args(&guest_file, &input, &output, &store, 10));
        assert_clean_failure(&out, cause);
    }
    assert_eq!(std::fs::read(&input).unwrap(), original_input);
    assert_eq!(std::fs::read(&guest_file).unwrap(), original_guest);
}

// 8. Output changed behind wasnap's back.

#[test]
fn an_output_truncated_mid_run_is_noticed_then_and_on_resume() {
    let dir = tempfile::tempdir().unwrap();
    let guest = guest("wordcount");
    let input = dir.path().join("input");
    write_input(&input, 600_000, 5000, false);
    let output = dir.path().join("out");
    let store = dir.path().join("store");
    let run_args = args(&guest, &input, &output, &store, 1000);
    let mut live = LoggedRun::spawn(&run_args);
    assert!(live.wait_for_commit(Instant::now() + Duration::from_secs(60)));
    std::fs::File::options()
        .write(true)
        .open(&output)
        .unwrap()
        .set_len(0)
        .unwrap();
    let log = live.finish_any();
    assert!(
        !log.status.success(),
        "the run did not notice: {}",
        log.text
    );
    assert!(
        log.text.contains("changed behind wasnap's back"),
        "{}",
        log.text
    );
    let rerun = run(&run_args);
    assert_clean_failure(&rerun, "truncated or replaced");
    let cat = run(&[
        "cat".into(),
        "--output".into(),
        output.display().to_string(),
        "--store".into(),
        store.display().to_string(),
    ]);
    assert_clean_failure(&cat, "truncated or replaced");
}

// 9. Staging files of interrupted writes are garbage.

#[test]
fn staging_files_left_by_a_kill_are_garbage_that_gc_and_retention_collect() {
    let s = stopped_halfway();
    let old = s
        .store
        .join("packs/00000000000000000009-00000000000000000000000000000000.pack#1");
    let young = s
        .store
        .join("packs/00000000000000000009-00000000000000000000000000000000.pack#2");
    std::fs::write(&old, vec![7u8; 1 << 20]).unwrap();
    std::fs::write(&young, vec![7u8; 1000]).unwrap();
    let status = std::process::Command::new("touch")
        .args(["-d", "1 hour ago"])
        .arg(&old)
        .status()
        .unwrap();
    assert!(status.success());
    let inspect = run_ok(&[
        "inspect".into(),
        "--store".into(),
        s.store.display().to_string(),
    ]);
    let text = String::from_utf8_lossy(&inspect.stdout).into_owned();
    assert!(
        text.contains("staging files of interrupted writes: 2"),
        "{text}"
    );
    let gc = run_ok(&["gc".into(), "--store".into(), s.store.display().to_string()]);
    assert!(String::from_utf8_lossy(&gc.stdout).contains("1 staging files"));
    assert!(!old.exists() && young.exists());
    // Retention in a run collects it too, once old.
    std::fs::rename(&young, &old).unwrap();
    let status = std::process::Command::new("touch")
        .args(["-d", "1 hour ago"])
        .arg(&old)
        .status()
        .unwrap();
    assert!(status.success());
    run_ok(&s.args);
    assert!(!old.exists());
    assert_same_output(&std::fs::read(&s.output).unwrap(), &s.expected, "after gc");
}

// 10. Panics, silent successes, disk, messages.

#[test]
fn reading_commands_never_create_what_they_read() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("typo");
    for command in [
        vec!["cat", "--output"],
        vec!["inspect", "--store"],
        vec!["gc", "--store"],
    ] {
        let mut argv: Vec<String> = command.iter().map(|s| s.to_string()).collect();
        argv.push(missing.display().to_string());
        let out = run(&argv);
        assert_clean_failure(&out, "does not exist");
        assert!(
            !missing.exists(),
            "{command:?} created {}",
            missing.display()
        );
    }
}

#[test]
fn a_memory_grown_to_4_gib_of_zeros_keeps_the_page_cache_sparse() {
    let dir = tempfile::tempdir().unwrap();
    let guest = wat(
        dir.path(),
        "grow",
        r#"(module
          (import "wasnap" "emit" (func $emit (param i32 i32)))
          (memory (export "memory") 1)
          (func (export "init") (drop (memory.grow (i32.const 65535))))
          (func (export "alloc") (param i32) (result i32) (i32.const 1024))
          (func (export "process") (param i32 i32) (call $emit (local.get 0) (local.get 1))))"#,
    );
    let input = dir.path().join("input");
    lines(&input, 0, 5);
    let output = dir.path().join("out");
    run_ok(&args(&guest, &input, &output, &dir.path().join("store"), 2));
    let cache = dir.path().join("out.wasnap-cache/memory-0.pages");
    let metadata = std::fs::metadata(&cache).unwrap();
    assert_eq!(metadata.len(), 4 << 30);
    assert!(
        metadata.blocks() * 512 < 16 << 20,
        "the page cache takes {} MiB on disk",
        (metadata.blocks() * 512) >> 20
    );
}

#[test]
fn guest_failures_are_one_line_that_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("input");
    lines(&input, 0, 3);
    let cases = [
        (
            "emit-oob",
            r#"(module
              (import "wasnap" "emit" (func $emit (param i32 i32)))
              (memory (export "memory") 1)
              (func (export "alloc") (param i32) (result i32) (i32.const 1024))
              (func (export "process") (param i32 i32)
                (call $emit (i32.const 0xffffff00) (i32.const 1000))))"#,
            vec![],
            "outside the guest's memory",
        ),
        (
            "start-loop",
            r#"(module
              (import "wasnap" "emit" (func $emit (param i32 i32)))
              (memory (export "memory") 1)
              (func $forever (loop $l (br $l)))
              (start $forever)
              (func (export "alloc") (param i32) (result i32) (i32.const 1024))
              (func (export "process") (param i32 i32)))"#,
            vec!["--call-timeout-ms", "200"],
            "time limit of 200 ms while it was instantiated",
        ),
        (
            "start-emit-oob",
            r#"(module
              (import "wasnap" "emit" (func $emit (param i32 i32)))
              (memory (export "memory") 1)
              (func $start (call $emit (i32.const 0xffffff00) (i32.const 1000)))
              (start $start)
              (func (export "alloc") (param i32) (result i32) (i32.const 1024))
              (func (export "process") (param i32 i32)))"#,
            vec![],
            "outside the guest's memory",
        ),
    ];
    for (name, text, extra, cause) in cases {
        let guest = wat(dir.path(), name, text);
        let mut run_args = args(
            &guest,
            &input,
            &dir.path().join(format!("out-{name}")),
            &dir.path().join(format!("store-{name}")),
            1,
        );
        run_args.extend(extra.iter().map(|s| s.to_string()));
        let (out, _) = run_bounded(&run_args, Duration::from_secs(30));
        assert_clean_failure(&out, cause);
    }
}

#[test]
fn closing_a_standard_stream_is_refused_so_a_restore_finds_it_open() {
    let dir = tempfile::tempdir().unwrap();
    // Emits fd_close(2)'s errno, then fd_write's on stderr: the same before and after a resume.
    let guest = wat(
        dir.path(),
        "close",
        r#"(module
          (import "wasi_snapshot_preview1" "fd_close" (func $close (param i32) (result i32)))
          (import "wasi_snapshot_preview1" "fd_write" (func $write (param i32 i32 i32 i32) (result i32)))
          (import "wasnap" "emit" (func $emit (param i32 i32)))
          (memory (export "memory") 1)
          (data (i32.const 100) "x")
          (func (export "alloc") (param i32) (result i32) (i32.const 1024))
          (func (export "process") (param i32 i32)
            (i32.store (i32.const 0) (call $close (i32.const 2)))
            (i32.store (i32.const 200) (i32.const 100))
            (i32.store (i32.const 204) (i32.const 0))
            (i32.store (i32.const 4) (call $write (i32.const 2) (i32.const 200) (i32.const 1) (i32.const 208)))
            (call $emit (i32.const 0) (i32.const 8))))"#,
    );
    let input = dir.path().join("input");
    lines(&input, 0, 4);
    let output = dir.path().join("out");
    run_ok(&args(&guest, &input, &output, &dir.path().join("store"), 2));
    let mut record = 58u32.to_le_bytes().to_vec(); // notsup
    record.extend(0u32.to_le_bytes());
    record.push(b'\n');
    assert_eq!(std::fs::read(&output).unwrap(), record.repeat(4));
}

#[test]
fn credentials_in_the_s3_endpoint_never_appear_in_errors() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("input");
    lines(&input, 0, 3);
    let out = wasnap()
        .args(run_args(
            &guest("wordcount"),
            &input,
            &dir.path().join("out"),
            "s3://bucket/prefix",
            10,
        ))
        .env(
            "AWS_ENDPOINT",
            "http://AKIDEXAMPLE:wJalrXUtnFEMIsecret@127.0.0.1:9",
        )
        .env("AWS_ALLOW_HTTP", "true")
        .env("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
        .env("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMIsecret")
        .env("AWS_REGION", "us-east-1")
        .env("WASNAP_S3_RETRY_SECS", "1")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = stderr(&out);
    assert!(!out.status.success());
    assert!(!err.contains("wJalrXUtnFEMIsecret"), "{err}");
}

#[test]
fn a_stdio_program_whose_start_function_writes_stdout_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    // `cat`, with a start function that writes a line first.
    let program = wat(
        dir.path(),
        "hello-cat",
        r#"(module
          (import "wasi_snapshot_preview1" "fd_read" (func $read (param i32 i32 i32 i32) (result i32)))
          (import "wasi_snapshot_preview1" "fd_write" (func $write (param i32 i32 i32 i32) (result i32)))
          (memory (export "memory") 1)
          (data (i32.const 0) "start\n")
          (func $hello
            (i32.store (i32.const 16) (i32.const 0))
            (i32.store (i32.const 20) (i32.const 6))
            (drop (call $write (i32.const 1) (i32.const 16) (i32.const 1) (i32.const 24))))
          (start $hello)
          (func (export "_start")
            (loop $more
              (i32.store (i32.const 32) (i32.const 1024))
              (i32.store (i32.const 36) (i32.const 512))
              (drop (call $read (i32.const 0) (i32.const 32) (i32.const 1) (i32.const 40)))
              (if (i32.load (i32.const 40))
                (then
                  (i32.store (i32.const 48) (i32.const 1024))
                  (i32.store (i32.const 52) (i32.load (i32.const 40)))
                  (drop (call $write (i32.const 1) (i32.const 48) (i32.const 1) (i32.const 56)))
                  (br $more))))))"#,
    );
    let input = dir.path().join("input");
    lines(&input, 0, 2000);
    let mut expected = b"start\n".to_vec();
    expected.extend(std::fs::read(&input).unwrap());
    let output = dir.path().join("out");
    let store = dir.path().join("store");
    let args: Vec<String> = [
        "run",
        "--stdio",
        program.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
        "--store",
        store.to_str().unwrap(),
        "--checkpoint-every-bytes",
        "1000",
        // Each checkpoint committed before the program goes on: the third commit is one
        // the run reaches.
        "--max-in-flight",
        "0",
        "--quiet",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    // Stopped after its third commit, then resumed: the start function runs again at the
    // restore's instantiation, and what it wrote then must not reach the output.
    let out = wasnap()
        .args(&args)
        .env("WASNAP_CRASH_AT", "commit-published:3")
        .output()
        .unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&out.status),
        Some(libc::SIGKILL),
        "{}",
        stderr(&out)
    );
    let resumed = LoggedRun::spawn(&args).finish();
    assert!(resumed.resumed_from.is_some(), "{}", resumed.text);
    assert_same_output(
        &std::fs::read(&output).unwrap(),
        &expected,
        "stdio start function",
    );
}
