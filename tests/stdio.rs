//! Stdio mode: unmodified WASI commands (a Rust program using `stdin().lines()` and a
//! `HashMap`, a C program using `fgets` and `malloc`), killed with SIGKILL at random
//! points, must finish with output byte-identical to an uninterrupted run and to the same
//! program compiled natively. Wrong programs get clear errors.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::*;

fn stdio_args(program: &Path, input: &Path, output: &Path, store: &str, every: u64) -> Vec<String> {
    vec![
        "run".into(),
        "--stdio".into(),
        program.display().to_string(),
        "--input".into(),
        input.display().to_string(),
        "--output".into(),
        output.display().to_string(),
        "--store".into(),
        store.into(),
        "--checkpoint-every-bytes".into(),
        every.to_string(),
        "--quiet".into(),
    ]
}

/// The program's output when run natively, with the input file as stdin.
fn native_output(binary: &Path, input: &Path) -> Vec<u8> {
    let out = Command::new(binary)
        .stdin(std::fs::File::open(input).unwrap())
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(out.status.success(), "the native program failed");
    out.stdout
}

fn native_c_program(dir: &Path) -> PathBuf {
    let binary = dir.join("wordfreq-native");
    let status = Command::new("cc")
        .args(["-O2", "-o"])
        .arg(&binary)
        .arg(root().join("guests/stdio/wordfreq.c"))
        .status()
        .expect("run cc");
    assert!(status.success(), "cannot compile the C program natively");
    binary
}

fn native_rust_program() -> PathBuf {
    let target = root().join("target/guests/native");
    let status = Command::new(env!("CARGO"))
        .args([
            "build",
            "--quiet",
            "--release",
            "-p",
            "stdio-wordfreq",
            "--manifest-path",
        ])
        .arg(root().join("guests/rust/Cargo.toml"))
        .arg("--target-dir")
        .arg(&target)
        .status()
        .expect("run cargo");
    assert!(status.success(), "cannot build the Rust program natively");
    target.join("release/stdio-wordfreq")
}

/// Kill a stdio run of `program` ten times at random points, finish it, and compare the
/// output with an uninterrupted run and with the native program's.
fn crash_test(program: &str, native: &Path) {
    program_crash_test(program, native, &[]);
}

/// [`crash_test`], every run given `extra` arguments too.
fn program_crash_test(program: &str, native: &Path, extra: &[&str]) {
    let program = guest(program);
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("input");
    // Long enough that ten kills 30-300 ms into each run never reach its end (200 000
    // lines did once, on a fast clean-clone CI run: finished after 7 kills).
    write_input(&input, 600_000, 5000, false);
    let store = dir.path().join("store");
    let store = store.to_str().unwrap();

    let reference_out = dir.path().join("reference");
    run_ok(&stdio_args(
        &program,
        &input,
        &reference_out,
        "memory://",
        1 << 40,
    ));
    let reference = std::fs::read(&reference_out).unwrap();
    assert_same_output(
        &reference,
        &native_output(native, &input),
        "native vs wasnap",
    );

    let output = dir.path().join("out");
    let mut args = stdio_args(&program, &input, &output, store, 64 << 10);
    args.extend(extra.iter().map(|a| a.to_string()));
    let mut rng = Rng::from_env_or_clock("stdio");
    run_with_kills(&args, 10, &mut rng, || {
        assert_committed_prefix(&output, store, &reference)
    });
    assert_same_output(&std::fs::read(&output).unwrap(), &reference, "after kills");
    // Many checkpoints were taken mid-run, not just one at the end.
    let generations = open_store(store).generations().unwrap();
    assert!(
        generations.last().copied().unwrap_or(0) > 10,
        "{generations:?}"
    );

    // A finished task stays finished.
    run_ok(&args);
    assert_same_output(&std::fs::read(&output).unwrap(), &reference, "rerun");
}

#[test]
fn a_rust_program_reading_stdin_lines_survives_kill_9() {
    crash_test("stdio-wordfreq", &native_rust_program());
}

#[test]
fn a_c_program_reading_stdin_with_fgets_survives_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    crash_test("stdio-c-wordfreq", &native_c_program(dir.path()));
}

const KERNEL_TRACKING: [&str; 2] = ["--dirty-tracking", "kernel"];

#[test]
fn a_rust_program_survives_kill_9_with_kernel_dirty_tracking() {
    program_crash_test("stdio-wordfreq", &native_rust_program(), &KERNEL_TRACKING);
}

#[test]
fn a_c_program_survives_kill_9_with_kernel_dirty_tracking() {
    let dir = tempfile::tempdir().unwrap();
    program_crash_test(
        "stdio-c-wordfreq",
        &native_c_program(dir.path()),
        &KERNEL_TRACKING,
    );
}

fn run_wat(dir: &Path, wat: &str, stdio: bool) -> std::process::Output {
    let program = dir.join("program.wat");
    std::fs::write(&program, wat).unwrap();
    let input = dir.join("in");
    std::fs::write(&input, "some input\n").unwrap();
    let mut args = stdio_args(&program, &input, &dir.join("out"), "memory://", 1);
    if !stdio {
        // A record run: without --stdio and its byte count (refused in this mode).
        let bytes = args
            .iter()
            .position(|a| a == "--checkpoint-every-bytes")
            .unwrap();
        args.drain(bytes..bytes + 2);
        args.retain(|a| a != "--stdio");
    }
    run(&args)
}

#[test]
fn programs_stdio_mode_cannot_run_get_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    std::fs::write(&input, "a b\n").unwrap();
    let out = dir.path().join("out");

    // A record guest is not a command, and a command is not a record guest.
    let err = stderr(&run(&stdio_args(
        &guest("wordcount"),
        &input,
        &out,
        "memory://",
        1,
    )));
    assert!(err.contains("run it without --stdio"), "{err}");
    let err = stderr(&run(&run_args(
        &guest("stdio-wordfreq"),
        &input,
        &out,
        "memory://",
        1,
    )));
    assert!(err.contains("run it with --stdio"), "{err}");

    // Reading stdin past fd_read would escape the input offset.
    let pread = r#"(module
      (import "wasi_snapshot_preview1" "fd_pread" (func $pread (param i32 i32 i32 i64 i32) (result i32)))
      (import "wasi_snapshot_preview1" "fd_read" (func $read (param i32 i32 i32 i32) (result i32)))
      (memory (export "memory") 1)
      (func (export "_start")
        (i32.store (i32.const 0) (i32.const 64))
        (i32.store (i32.const 4) (i32.const 16))
        (drop (call $pread (i32.const 0) (i32.const 0) (i32.const 1) (i64.const 0) (i32.const 8)))))"#;
    let out = run_wat(dir.path(), pread, true);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("reads stdin with fd_pread"),
        "{}",
        stderr(&out)
    );

    // A module wasm-opt cannot transform (tail calls, which binaryen's default features
    // leave out) is named as such.
    let tail_call = r#"(module
      (memory (export "memory") 1)
      (func $f (result i32) (i32.const 1))
      (func $g (result i32) (return_call $f))
      (func (export "_start") (drop (call $g))))"#;
    let out = run_wat(dir.path(), tail_call, true);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("asyncify transform"),
        "{}",
        stderr(&out)
    );

    // A reactor (no `_start`) is not a command.
    let reactor = r#"(module (memory (export "memory") 1) (func (export "_initialize")))"#;
    let out = run_wat(dir.path(), reactor, true);
    assert!(
        stderr(&out).contains("not a WASI command"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_failing_exit_status_is_reported_and_the_output_kept() {
    let dir = tempfile::tempdir().unwrap();
    // Echoes its first read of stdin to stdout, then exits with status 7.
    let wat = r#"(module
      (import "wasi_snapshot_preview1" "fd_read" (func $read (param i32 i32 i32 i32) (result i32)))
      (import "wasi_snapshot_preview1" "fd_write" (func $write (param i32 i32 i32 i32) (result i32)))
      (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
      (memory (export "memory") 1)
      (func (export "_start")
        (i32.store (i32.const 0) (i32.const 64))
        (i32.store (i32.const 4) (i32.const 100))
        (drop (call $read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 8)))
        (i32.store (i32.const 4) (i32.load (i32.const 8)))
        (drop (call $write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 12)))
        (call $exit (i32.const 7))))"#;
    let program = dir.path().join("program.wat");
    std::fs::write(&program, wat).unwrap();
    let input = dir.path().join("in");
    std::fs::write(&input, "hello\n").unwrap();
    let output = dir.path().join("out");
    let store = dir.path().join("store");
    let args = stdio_args(&program, &input, &output, store.to_str().unwrap(), 1);
    for attempt in 0..2 {
        let out = run(&args);
        assert_eq!(out.status.code(), Some(1), "attempt {attempt}");
        assert!(
            stderr(&out).contains("exited with status 7"),
            "{}",
            stderr(&out)
        );
        assert_eq!(
            std::fs::read(&output).unwrap(),
            b"hello\n",
            "attempt {attempt}"
        );
    }
}

#[test]
fn a_program_that_writes_more_than_the_drain_size_takes_a_checkpoint_mid_run() {
    // Writes 200 x 64 KiB of "0123456789abcde\n" to stdout, reading a byte of stdin
    // before each write: at the first read past 8 MiB of waiting output the run unwinds
    // the program for a checkpoint, whose 8 MiB the committer writes; the rest goes at the
    // exit's.
    let wat = r#"(module
      (import "wasi_snapshot_preview1" "fd_read" (func $read (param i32 i32 i32 i32) (result i32)))
      (import "wasi_snapshot_preview1" "fd_write" (func $write (param i32 i32 i32 i32) (result i32)))
      (memory (export "memory") 2)
      (func (export "_start")
        (local $i i32)
        (loop $fill
          (i64.store (i32.add (i32.const 65536) (local.get $i)) (i64.const 0x3736353433323130))
          (i64.store (i32.add (i32.const 65544) (local.get $i)) (i64.const 0x0a65646362613938))
          (local.set $i (i32.add (local.get $i) (i32.const 16)))
          (br_if $fill (i32.lt_u (local.get $i) (i32.const 65536))))
        (i32.store (i32.const 0) (i32.const 65536))
        (i32.store (i32.const 4) (i32.const 65536))
        (i32.store (i32.const 16) (i32.const 32))
        (i32.store (i32.const 20) (i32.const 1))
        (local.set $i (i32.const 0))
        (loop $out
          (drop (call $read (i32.const 0) (i32.const 16) (i32.const 1) (i32.const 24)))
          (drop (call $write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
          (local.set $i (i32.add (local.get $i) (i32.const 1)))
          (br_if $out (i32.lt_u (local.get $i) (i32.const 200))))))"#;
    let dir = tempfile::tempdir().unwrap();
    let program = dir.path().join("program.wat");
    std::fs::write(&program, wat).unwrap();
    let input = dir.path().join("in");
    std::fs::write(&input, "unread\n").unwrap();
    let (output, store) = (dir.path().join("out"), dir.path().join("store"));
    let store_url = store.display().to_string();
    let mut args = stdio_args(&program, &input, &output, &store_url, 1 << 20);
    // Each capture its own commit, so that both are counted.
    args.extend(["--retain".into(), "100".into(), "--no-coalesce".into()]);
    run_ok(&args);
    let written = std::fs::read(&output).unwrap();
    let expected = b"0123456789abcde\n".repeat(200 * 4096);
    assert_eq!(written.len(), expected.len(), "output length");
    assert!(written == expected, "the output's bytes differ");
    // One checkpoint when 8 MiB waited, and the one at the program's exit.
    let generations = open_store(&store_url).generations().unwrap();
    assert_eq!(generations.len(), 2, "checkpoints: {generations:?}");
    // Run again: the task is done, and its output stays as it was.
    run_ok(&args);
    assert!(
        std::fs::read(&output).unwrap() == expected,
        "output changed"
    );
}

#[test]
fn the_transformed_module_is_cached_by_the_originals_hash_and_a_bad_entry_is_redone() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let program = guest("stdio-c-wordfreq");
    let input = dir.path().join("in");
    write_input(&input, 500, 50, false);
    let run_once = |name: &str| {
        let out = wasnap()
            .args(stdio_args(
                &program,
                &input,
                &dir.path().join(name),
                "memory://",
                1 << 20,
            ))
            .env("WASNAP_CACHE_DIR", &cache)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        std::fs::read(dir.path().join(name)).unwrap()
    };
    let first = run_once("out-1");
    let entries: Vec<PathBuf> = std::fs::read_dir(cache.join("asyncify"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(entries.len(), 1, "{entries:?}");
    let sha = {
        use sha2::Digest;
        wasnap::hex::encode(&sha2::Sha256::digest(std::fs::read(&program).unwrap()))
    };
    let name = entries[0]
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    assert!(
        name.starts_with(&sha),
        "{name} is not keyed by the original's SHA-256"
    );

    // A damaged cache entry is not used: the transform runs again and replaces it.
    std::fs::write(&entries[0], b"not wasm").unwrap();
    assert_eq!(run_once("out-2"), first);
    assert!(std::fs::read(&entries[0]).unwrap().starts_with(b"\0asm"));
}
