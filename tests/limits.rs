//! Resource limits: a guest that runs away in time or memory stops with a clear error,
//! and what was committed before stays intact.

mod common;

use std::time::{Duration, Instant};

use common::*;

/// Spins forever on a record that is exactly `spin`, and grows its memory by 16 pages
/// (1 MiB) on a record that is exactly `grow`; otherwise emits `ok`.
const RUNAWAY_GUEST: &str = r#"(module
  (import "wasnap" "emit" (func $emit (param i32 i32)))
  (memory (export "memory") 1)
  (func (export "alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "process") (param $ptr i32) (param $len i32)
    (if (i32.and (i32.eq (local.get $len) (i32.const 4))
                 (i32.eq (i32.load (local.get $ptr)) (i32.const 0x6e697073))) ;; "spin"
      (then (loop $forever (br $forever))))
    (if (i32.and (i32.eq (local.get $len) (i32.const 4))
                 (i32.eq (i32.load (local.get $ptr)) (i32.const 0x776f7267))) ;; "grow"
      (then (drop (memory.grow (i32.const 16)))))
    (i32.store16 (i32.const 0) (i32.const 0x6b6f)) ;; "ok"
    (call $emit (i32.const 0) (i32.const 2))))"#;

fn setup(lines: &[&str]) -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let guest = dir.path().join("runaway.wat");
    std::fs::write(&guest, RUNAWAY_GUEST).unwrap();
    let input = dir.path().join("in");
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    (dir, guest, input)
}

#[test]
fn a_call_past_its_time_limit_stops_with_a_clear_error() {
    let mut lines = vec!["x"; 50];
    lines[30] = "spin";
    let (dir, guest, input) = setup(&lines);
    let store = dir.path().join("store");
    let output = dir.path().join("out");
    let mut args = run_args(&guest, &input, &output, store.to_str().unwrap(), 10);
    args.extend(["--call-timeout-ms".into(), "200".into()]);
    let started = Instant::now();
    let out = run(&args);
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "the time limit did not stop the guest"
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("ran past its time limit of 200 ms in `process`"),
        "{err}"
    );
    // The 31st line, named by its line as well as its offset.
    assert!(
        err.contains("the record at line 31 (byte offset 60)"),
        "{err}"
    );
    // Records 0..30 were committed at 10, 20, 30; the output holds exactly those.
    assert_eq!(std::fs::read(&output).unwrap(), b"ok\n".repeat(30));
}

#[test]
fn growing_past_the_memory_cap_stops_with_a_clear_error() {
    let mut lines = vec!["x"; 20];
    for line in lines.iter_mut().skip(5) {
        *line = "grow";
    }
    let (dir, guest, input) = setup(&lines);
    let output = dir.path().join("out");
    let mut args = run_args(&guest, &input, &output, "memory://", 100);
    args.extend(["--max-memory-mib".into(), "4".into()]);
    let err = stderr(&run(&args));
    // 64 KiB to start, 1 MiB per `grow`: the 4th grow would pass 4 MiB.
    assert!(
        err.contains("tried to grow its memory past its limit of 4194304 bytes"),
        "{err}"
    );
    assert!(
        err.contains(&format!("at line 9 (byte offset {})", 5 * 2 + 3 * 5)),
        "{err}"
    );

    // Without the cap the same input runs to the end.
    let out = run(&run_args(&guest, &input, &output, "memory://", 100));
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn generous_limits_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    write_input(&input, 20_000, 2000, false);
    let reference = reference_output(&guest("wordcount"), &input);
    let output = dir.path().join("out");
    let mut args = run_args(
        &guest("wordcount"),
        &input,
        &output,
        dir.path().join("s").to_str().unwrap(),
        500,
    );
    args.extend([
        "--call-timeout-ms".into(),
        "5000".into(),
        "--max-memory-mib".into(),
        "64".into(),
    ]);
    run_ok(&args);
    assert_eq!(std::fs::read(&output).unwrap(), reference);
}
