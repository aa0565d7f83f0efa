//! Bad input gets a clear, one-line error, no panic, and loses nothing.

mod common;

use std::path::Path;
use std::process::Output;

use common::*;

/// The run failed cleanly: a non-zero exit that is not a panic, one error line naming `cause`.
fn assert_clean_failure(out: &Output, cause: &str) {
    assert!(
        !out.status.success(),
        "expected a failure mentioning {cause:?}"
    );
    assert_ne!(
        out.status.code(),
        Some(101),
        "wasnap panicked: {}",
        stderr(out)
    );
    let err = stderr(out);
    assert!(!err.contains("panicked"), "wasnap panicked: {err}");
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("wasnap: error:"))
        .collect();
    assert_eq!(lines.len(), 1, "expected one error line, got: {err}");
    assert!(
        lines[0].contains(cause),
        "error does not mention {cause:?}: {}",
        lines[0]
    );
}

fn store_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Traps on a record that is exactly `boom`; otherwise emits the record count.
const TRAPPING_GUEST: &str = r#"(module
  (import "wasnap" "emit" (func $emit (param i32 i32)))
  (memory (export "memory") 1)
  (global $n (mut i32) (i32.const 0))
  (func (export "alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "process") (param $ptr i32) (param $len i32)
    (if (i32.and (i32.eq (local.get $len) (i32.const 4))
                 (i32.eq (i32.load (local.get $ptr)) (i32.const 0x6d6f6f62))) ;; "boom"
      (then unreachable))
    (global.set $n (i32.add (global.get $n) (i32.const 1)))
    (i32.store8 (i32.const 0) (i32.add (i32.const 48) (i32.rem_u (global.get $n) (i32.const 10))))
    (call $emit (i32.const 0) (i32.const 1))))"#;

#[test]
fn a_file_that_is_not_wasm_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let guest = dir.path().join("guest.wasm");
    std::fs::write(&guest, "#!/bin/sh\necho I am not wasm\n").unwrap();
    let input = dir.path().join("in");
    std::fs::write(&input, "a\n").unwrap();
    let out = run(&run_args(
        &guest,
        &input,
        &dir.path().join("out"),
        store_str(&dir.path().join("s")),
        10,
    ));
    assert_clean_failure(&out, "not a WebAssembly module");

    let out = run(&run_args(
        &dir.path().join("missing.wasm"),
        &input,
        &dir.path().join("out"),
        "memory://",
        10,
    ));
    assert_clean_failure(&out, "cannot read guest");
}

#[test]
fn guests_that_break_the_abi_are_named_and_refused() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    std::fs::write(&input, "a\n").unwrap();
    let cases = [
        (
            r#"(module (memory (export "memory") 1) (func (export "alloc") (param i32) (result i32) i32.const 0))"#,
            "does not export `process`, which the wasnap record ABI requires (alloc(len: i32) -> i32, process(ptr: i32, len: i32), memory); it exports `memory`, `alloc`",
        ),
        (
            r#"(module (memory (export "memory") 1) (func (export "alloc") (param i32) (result i32) i32.const 0)
                 (func (export "process") (param i32)))"#,
            "export `process` has type (i32) -> (), but the wasnap ABI requires (i32, i32) -> ()",
        ),
        (
            r#"(module (func (export "alloc") (param i32) (result i32) i32.const 0) (func (export "process") (param i32 i32)))"#,
            "does not export `memory`",
        ),
        (
            r#"(module (func (export "run")))"#,
            "does not export `alloc`, `process`, `memory`, which the wasnap record ABI requires (alloc(len: i32) -> i32, process(ptr: i32, len: i32), memory); it exports `run`",
        ),
        (
            r#"(module (import "env" "now" (func)) (memory (export "memory") 1))"#,
            "imports `env.now`",
        ),
        (
            r#"(module (memory (export "memory") 1) (func (export "_start")))"#,
            "looks like a WASI command",
        ),
        (
            r#"(module (table 1 funcref) (memory (export "memory") 1) (func (table.set (i32.const 0) (ref.null func))))"#,
            "mutates a table",
        ),
    ];
    for (i, (wat, cause)) in cases.iter().enumerate() {
        let guest = dir.path().join(format!("g{i}.wat"));
        std::fs::write(&guest, wat).unwrap();
        let out = run(&run_args(
            &guest,
            &input,
            &dir.path().join("out"),
            "memory://",
            10,
        ));
        assert_clean_failure(&out, cause);
    }
}

#[test]
fn a_trap_mid_stream_stops_cleanly_and_the_store_stays_restorable() {
    let dir = tempfile::tempdir().unwrap();
    let guest = dir.path().join("trap.wat");
    std::fs::write(&guest, TRAPPING_GUEST).unwrap();
    let mut lines: Vec<String> = (0..1000).map(|i| format!("r{i:03}")).collect();
    lines[650] = "boom".into(); // same length as the others: offsets stay valid once it is fixed
    let input = dir.path().join("in");
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    let (output, store) = (dir.path().join("out"), dir.path().join("store"));
    let args = run_args(&guest, &input, &output, store_str(&store), 100);

    let out = run(&args);
    assert_clean_failure(&out, "the guest trapped in `process`");
    assert!(
        stderr(&out).contains(&format!("the record at line 651 (byte offset {})", 650 * 5)),
        "{}",
        stderr(&out)
    );
    // Only committed output stays: 600 records, checkpointed at 100, 200, … 600.
    assert_eq!(newest_marker(store_str(&store)), Some(600 * 2));
    assert_eq!(std::fs::read(&output).unwrap().len(), 600 * 2);
    // The same input traps again at the same record, and still loses nothing.
    assert_clean_failure(&run(&args), "the guest trapped in `process`");

    // Fix the record; the run resumes from the checkpoint and ends as a clean run would.
    lines[650] = "r650".into();
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    run_ok(&args);
    let reference = dir.path().join("reference");
    run_ok(&run_args(&guest, &input, &reference, "memory://", 1 << 30));
    assert_eq!(
        std::fs::read(&output).unwrap(),
        std::fs::read(&reference).unwrap()
    );
}

/// A guest whose `alloc` answers a record of 5 bytes with a pointer outside its memory:
/// a broken contract on that record, which stops the run like a trap, naming the record,
/// and which `--on-trap skip` sends to the dead letters like a trap.
#[test]
fn a_record_alloc_places_outside_memory_stops_the_run_or_is_skipped_like_a_trap() {
    let dir = tempfile::tempdir().unwrap();
    let guest = dir.path().join("bad-alloc.wat");
    let module = TRAPPING_GUEST.replace(
        "(func (export \"alloc\") (param i32) (result i32) (i32.const 1024))",
        "(func (export \"alloc\") (param i32) (result i32)
           (if (result i32) (i32.eq (local.get 0) (i32.const 5))
             (then (i32.const -16)) (else (i32.const 1024))))",
    );
    assert_ne!(module, TRAPPING_GUEST, "the guest's alloc was not replaced");
    std::fs::write(&guest, module).unwrap();
    let mut lines: Vec<String> = (0..1000).map(|i| format!("r{i:03}")).collect();
    lines[650] = "r650!".into();
    let input = dir.path().join("in");
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    let store = dir.path().join("store");
    let args = run_args(
        &guest,
        &input,
        &dir.path().join("out"),
        store_str(&store),
        100,
    );
    let out = run(&args);
    assert_clean_failure(&out, "returned 0xfffffff0, which is outside its memory");
    assert!(
        stderr(&out).contains("the record at line 651"),
        "{}",
        stderr(&out)
    );

    let dead = dir.path().join("dead");
    let mut skipping = args.clone();
    skipping.extend([
        "--on-trap".into(),
        "skip".into(),
        "--dead-letter".into(),
        dead.display().to_string(),
    ]);
    run_ok(&skipping);
    let letters = std::fs::read_to_string(&dead).unwrap();
    let letter: serde_json::Value = serde_json::from_str(letters.trim_end()).unwrap();
    assert_eq!(letters.lines().count(), 1, "{letters}");
    assert_eq!(letter["record"], "r650!");
    assert_eq!(letter["offset"], 650 * 5);
    assert!(
        letter["error"]
            .as_str()
            .unwrap()
            .contains("outside its memory"),
        "{letter}"
    );
    // The other 999 records each emitted a line, their count's last digit, and the
    // skipped one none: the count after it goes on from 650.
    let output = std::fs::read_to_string(dir.path().join("out")).unwrap();
    let counts: Vec<&str> = output.lines().collect();
    assert_eq!(counts.len(), 999);
    assert_eq!(
        counts[649..652],
        ["0", "1", "2"],
        "the record after the skipped one counts as the 651st"
    );
    // One output and its dead letters are two: `cat` asks which, and reads either.
    let cat = |output: &Path, target: Option<&str>| {
        let mut args = vec![
            "cat".to_string(),
            "--output".into(),
            output.display().to_string(),
            "--store".into(),
            store_str(&store).into(),
        ];
        args.extend(
            target
                .map(|t| ["--target".to_string(), t.to_string()])
                .into_iter()
                .flatten(),
        );
        run(&args)
    };
    assert_clean_failure(
        &cat(&dir.path().join("out"), None),
        "the task has 2 outputs",
    );
    assert_eq!(
        cat(&dir.path().join("out"), Some("0")).stdout,
        output.as_bytes()
    );
    assert_eq!(cat(&dead, Some("1")).stdout, letters.as_bytes());
}

/// A record guest that also exports `_start` runs as a record guest, and is told that its
/// `_start` (a command's constructors and `main`) is never called.
#[test]
fn a_record_guest_that_is_also_a_command_runs_and_is_warned_its_start_is_not_called() {
    let dir = tempfile::tempdir().unwrap();
    let guest = dir.path().join("both.wat");
    let module = TRAPPING_GUEST.trim_end().strip_suffix(')').unwrap();
    std::fs::write(
        &guest,
        format!("{module}\n  (func (export \"_start\") unreachable))"),
    )
    .unwrap();
    let input = dir.path().join("in");
    std::fs::write(&input, "a\nb\nc\n").unwrap();
    let output = dir.path().join("out");
    let out = run_ok(&run_args(&guest, &input, &output, "memory://", 10));
    assert!(stderr(&out).contains("never `_start`"), "{}", stderr(&out));
    assert_eq!(std::fs::read(&output).unwrap(), b"1\n2\n3\n");
}

#[test]
fn a_changed_module_is_refused_and_nothing_is_touched() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    write_input(&input, 2000, 100, false);
    let (output, store) = (dir.path().join("out"), dir.path().join("store"));
    run_ok(&run_args(
        &guest("wordcount"),
        &input,
        &output,
        store_str(&store),
        500,
    ));
    let before_output = std::fs::read(&output).unwrap();
    let before_store = wasnap::store::CheckpointStore::open(store_str(&store))
        .unwrap()
        .generations()
        .unwrap();

    let out = run(&run_args(
        &guest("wat-globals"),
        &input,
        &output,
        store_str(&store),
        500,
    ));
    assert_clean_failure(&out, "the guest module changed since checkpoint");
    assert_eq!(std::fs::read(&output).unwrap(), before_output);
    let after_store = wasnap::store::CheckpointStore::open(store_str(&store))
        .unwrap()
        .generations()
        .unwrap();
    assert_eq!(after_store, before_store);
}

/// Run wordcount over part of its input and return (dir, args, store path).
fn stopped_midway() -> (tempfile::TempDir, Vec<String>, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    write_input(&input, 3000, 400, false);
    let store = dir.path().join("store");
    let args = run_args(
        &guest("wordcount"),
        &input,
        &dir.path().join("out"),
        store_str(&store),
        1000,
    );
    run_ok(&args);
    (dir, args, store)
}

fn newest_object(dir: &Path) -> std::path::PathBuf {
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    names.sort();
    names.pop().unwrap()
}

fn flip_byte(path: &Path, at: usize) {
    let mut bytes = std::fs::read(path).unwrap();
    let at = at.min(bytes.len() - 1);
    bytes[at] ^= 0x40;
    std::fs::write(path, bytes).unwrap();
}

/// The run resumed, said why it fell back, and its output is still exactly the reference.
fn assert_fell_back(
    out: &Output,
    unusable: u64,
    resumed: u64,
    cause: &str,
    output: &Path,
    reference: &[u8],
) {
    let err = stderr(out);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains(&format!("checkpoint {unusable} is unusable")) && err.contains(cause),
        "{err}"
    );
    assert!(
        err.contains(&format!("resuming from older checkpoint {resumed}")),
        "{err}"
    );
    assert_eq!(
        std::fs::read(output).unwrap(),
        reference,
        "output after the fallback differs"
    );
}

#[test]
fn a_corrupted_newest_manifest_is_detected_and_an_older_checkpoint_used() {
    let (dir, args, store) = stopped_midway();
    let output = dir.path().join("out");
    let reference = std::fs::read(&output).unwrap();
    let manifest = newest_object(&store.join("manifests"));
    let len = std::fs::metadata(&manifest).unwrap().len() as usize;
    flip_byte(&manifest, len / 2);
    assert_fell_back(&run(&args), 3, 2, "checksum mismatch", &output, &reference);
    // The resumed run committed after the corrupt one; generations only go up.
    assert_eq!(
        newest_object(&store.join("manifests")).file_name().unwrap(),
        "00000000000000000004"
    );
}

#[test]
fn a_corrupted_or_missing_pack_is_detected_and_an_older_checkpoint_used() {
    type Damage = fn(&Path);
    let damages: [(Damage, &str); 3] = [
        // A flipped byte in a page frame of the newest checkpoint's own pack.
        (
            |pack| flip_byte(pack, std::fs::metadata(pack).unwrap().len() as usize - 10),
            "CRC mismatch",
        ),
        (
            |pack| std::fs::write(pack, b"garbage").unwrap(),
            "is 7 bytes, but its manifest says",
        ),
        (|pack| std::fs::remove_file(pack).unwrap(), "is missing"),
    ];
    for (damage, cause) in damages {
        let (dir, args, store) = stopped_midway();
        let output = dir.path().join("out");
        let reference = std::fs::read(&output).unwrap();
        damage(&newest_object(&store.join("packs")));
        assert_fell_back(&run(&args), 3, 2, cause, &output, &reference);
    }
}

#[test]
fn a_store_without_a_usable_checkpoint_is_an_error() {
    let (_dir, args, store) = stopped_midway();
    for entry in std::fs::read_dir(store.join("manifests")).unwrap() {
        let path = entry.unwrap().path();
        let len = std::fs::metadata(&path).unwrap().len() as usize;
        flip_byte(&path, len - 1);
    }
    let out = run(&args);
    assert_clean_failure(&out, "none of the 3 checkpoints");
    assert!(
        stderr(&out).contains("checkpoint 1 is unusable"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn bad_arguments_get_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    std::fs::write(&input, "a\n").unwrap();
    let out = run(&run_args(
        &guest("wordcount"),
        &input,
        &dir.path().join("out"),
        "ftp://host/x",
        10,
    ));
    assert_clean_failure(&out, "unknown scheme `ftp`");
    let store = dir.path().join("store");
    let out = run(&run_args(
        &guest("wordcount"),
        &dir.path().join("nope"),
        &dir.path().join("out"),
        store.to_str().unwrap(),
        10,
    ));
    assert_clean_failure(&out, "cannot open input");
    // A mistyped input leaves no output file and no store behind.
    assert!(!dir.path().join("out").exists() && !store.exists());
    let out = run(&run_args(
        &guest("wordcount"),
        &input,
        &dir.path().join("out"),
        "memory://",
        0,
    ));
    assert!(!out.status.success() && stderr(&out).contains("--checkpoint-every"));
    // Counts of 0 are refused in words, not as clap's range of u64.
    for (flag, args) in [
        (
            "--checkpoint-every",
            vec!["run", "g.wasm", "--input", "i", "--output", "o"],
        ),
        ("--retain", vec!["gc"]),
        (
            "--max-memory-mib",
            vec!["run", "g.wasm", "--input", "i", "--output", "o"],
        ),
    ] {
        let out = wasnap()
            .args(&args)
            .args(["--store", "memory://", flag, "0"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{flag}");
        let err = stderr(&out);
        assert!(
            err.contains(&format!("invalid value '0' for '{flag}"))
                && err.contains("must be at least 1"),
            "{flag}: {err}"
        );
        assert!(!err.contains("18446744073709551615"), "{err}");
    }
}

/// A flag the chosen mode would not use is refused (exit 2, naming the flags), never
/// silently ignored; the same flags in the mode that uses them run.
#[test]
fn flags_a_mode_would_ignore_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    std::fs::write(&input, "a b\nb\n").unwrap();
    let out = dir.path().join("out").display().to_string();
    let (records, stdio) = (
        guest("wordcount").display().to_string(),
        guest("stdio-wordfreq").display().to_string(),
    );
    let input = input.display().to_string();
    let refused = |args: &[&str], says: &str| {
        let result = wasnap().args(args).output().unwrap();
        assert_eq!(
            result.status.code(),
            Some(2),
            "{args:?}: {}",
            stderr(&result)
        );
        assert!(
            stderr(&result).contains(says),
            "{args:?}: {}",
            stderr(&result)
        );
    };
    let common = ["--input", &input, "--output", &out, "--store", "memory://"];
    let with = |head: &[&str], tail: &[&str]| -> Vec<String> {
        head.iter()
            .chain(&common)
            .chain(tail)
            .map(|s| s.to_string())
            .collect()
    };
    let args = with(&["run", &records], &["--checkpoint-every-bytes", "10"]);
    refused(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        "--checkpoint-every-bytes is for --stdio",
    );
    let args = with(
        &["run", &stdio, "--stdio"],
        &["--checkpoint-every", "10", "--checkpoint-interval", "1s"],
    );
    refused(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        "--checkpoint-every, --checkpoint-interval are not for --stdio",
    );
    let args = with(
        &["run", &stdio, "--stdio"],
        &["--output", &format!("{out}2")],
    );
    refused(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        "a stdio program has one output",
    );
    refused(
        &[
            "bench",
            &stdio,
            "--stdio",
            "--input",
            &input,
            "--json",
            "--max-deltas",
            "2",
        ],
        "--json, --max-deltas are not for bench --stdio",
    );
    let args = with(&["run", &records], &["--max-in-flight", "3"]);
    refused(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        "--max-in-flight N is for --no-coalesce",
    );
    // Where they are used, the same flags run.
    for tail in [
        &["--max-in-flight", "3", "--no-coalesce"][..],
        &["--max-in-flight", "0"],
    ] {
        let args = with(&["run", &records], tail);
        let result = wasnap().args(&args).output().unwrap();
        assert!(result.status.success(), "{tail:?}: {}", stderr(&result));
    }
    let args = with(
        &["run", &stdio, "--stdio"],
        &["--checkpoint-every-bytes", "2"],
    );
    assert!(wasnap().args(&args).output().unwrap().status.success());
    let args = with(
        &["run", &records],
        &["--checkpoint-every", "1", "--max-deltas", "2"],
    );
    assert!(wasnap().args(&args).output().unwrap().status.success());
}

/// `cat` reads an output by the rule `run` wrote it by; a FIFO where the output should be
/// is refused at once rather than waited on.
#[test]
fn cat_refuses_an_output_that_is_not_a_file_a_directory_or_a_url() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    let out = wasnap()
        .args(["cat", "--output", fifo.to_str().unwrap()])
        .output()
        .unwrap();
    assert_clean_failure(&out, "is not a regular file, a directory or an output URL");
}
