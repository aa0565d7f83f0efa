//! Components of FunctionStream's `functionstream:core/processor` world, in three
//! languages (guests/components: Rust, Python plain and with stubbed WASI, JavaScript),
//! under wasnap: their output against a reference implementation of their logic, kill -9
//! at any moment, handles held across a restore, `--config`, `inspect`, and the
//! components wasnap refuses.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::*;

/// Every component guest; all implement the same word count (guests/components/README.md).
const COMPONENTS: [&str; 4] = [
    "component-rust",
    "component-python",
    "component-python-stubwasi",
    "component-js",
];

/// What the component guests print for `input`: per record `N:` and ` word=M/K` per word,
/// where M counts the word in the guest's memory and K in its kv store (the same number
/// when both survive every restore).
fn expected_output(input: &[u8]) -> Vec<u8> {
    let mut counts: HashMap<&[u8], u64> = HashMap::new();
    let mut out = Vec::new();
    for (n, line) in input.split(|b| *b == b'\n').enumerate() {
        if n + 1 == input.split(|b| *b == b'\n').count() && line.is_empty() {
            break;
        }
        out.extend_from_slice(format!("{}:", n + 1).as_bytes());
        for word in line
            .split(|b| b.is_ascii_whitespace())
            .filter(|w| !w.is_empty())
        {
            let count = counts.entry(word).or_default();
            *count += 1;
            out.extend_from_slice(b" ");
            out.extend_from_slice(word);
            out.extend_from_slice(format!("={count}/{count}").as_bytes());
        }
        out.push(b'\n');
    }
    out
}

#[test]
fn every_component_matches_a_reference_implementation_of_its_logic() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("input");
    write_input(&input, 3000, 300, false);
    let expected = expected_output(&std::fs::read(&input).unwrap());
    for name in COMPONENTS {
        let guest = guest(name);
        // A checkpoint every 250 records: each captures the kv state and the handles.
        let output = dir.path().join(format!("{name}.out"));
        let store = dir.path().join(format!("{name}.store"));
        let args = run_args(&guest, &input, &output, &store.display().to_string(), 250);
        run_ok(&args);
        assert_same_output(&std::fs::read(&output).unwrap(), &expected, name);
    }
}

fn crash_test(name: &str, records: usize) {
    crash_test_on(
        name,
        records,
        false,
        500,
        &tempfile::tempdir().unwrap().keep().display().to_string(),
    );
}

mod kill_9 {
    #[test]
    fn rust() {
        super::crash_test("component-rust", 120_000);
    }

    #[test]
    fn python() {
        super::crash_test("component-python", 30_000);
    }

    #[test]
    fn javascript() {
        super::crash_test("component-js", 30_000);
    }
}

/// After a restore the guest goes on with the kv store handle and the stderr stream (and
/// the pollable wasi-libc keeps on it) it opened in `fs-init`, before the checkpoint:
/// `fs-init` does not run again, its `progress` lines still reach stderr, and its counts
/// still agree with the kv store's.
#[test]
fn a_resumed_component_uses_the_kv_store_and_stderr_it_opened_before_the_checkpoint() {
    for name in ["component-rust", "component-python"] {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("input");
        write_input(&input, 20_000, 300, false);
        let expected = expected_output(&std::fs::read(&input).unwrap());
        let output = dir.path().join("output");
        let store = dir.path().join("store").display().to_string();
        let mut args = run_args(&guest(name), &input, &output, &store, 500);
        args.extend(["--retain".into(), "10".into()]);
        let mut first = LoggedRun::spawn(&args);
        assert!(first.wait_for_commits(2, Instant::now() + Duration::from_secs(120)));
        first.kill();
        assert!(
            first.log.text.contains("processor ready"),
            "{}",
            first.log.text
        );

        let resumed = LoggedRun::spawn(&args).finish();
        assert!(resumed.resumed_from.is_some(), "{}", resumed.text);
        assert!(
            !resumed.text.contains("processor ready"),
            "{name}: fs-init ran again after a restore:\n{}",
            resumed.text
        );
        assert!(
            resumed.text.contains("progress 20000"),
            "{name}: the resumed guest's stderr lines are missing:\n{}",
            resumed.text
        );
        assert_same_output(&std::fs::read(&output).unwrap(), &expected, name);

        let inspect = run_ok(&[
            "inspect".into(),
            "--store".into(),
            store.clone(),
            "--details".into(),
        ]);
        let text = String::from_utf8_lossy(&inspect.stdout);
        assert!(
            text.contains("component: kv") && text.contains("1:kv.store"),
            "{name}: inspect does not show the component state:\n{text}"
        );
        // The kv state is a chain of runs in every retained checkpoint: whole first,
        // then the deltas of later checkpoints, merged as they accumulate (this guest
        // touches most of its keys between checkpoints, so its chain is rewritten whole
        // about every third checkpoint: of ten, some have deltas).
        let chains: Vec<&str> = text
            .lines()
            .filter_map(|line| line.trim().strip_prefix("kv runs: "))
            .collect();
        assert!(
            chains.len() >= 3 && chains.iter().all(|c| c.starts_with("whole ")),
            "{name}: {chains:?}"
        );
        assert!(
            chains.iter().any(|c| c.contains(", delta ")),
            "{name}: {chains:?}"
        );

        // `gc` down to the newest checkpoint keeps every pack its kv chain lies in: the
        // task still restores (and, finished, has nothing left to do).
        run_ok(&[
            "gc".into(),
            "--store".into(),
            store.clone(),
            "--retain".into(),
            "1".into(),
        ]);
        let after_gc = LoggedRun::spawn(&args).finish();
        assert!(after_gc.resumed_from.is_some(), "{}", after_gc.text);
        assert_same_output(&std::fs::read(&output).unwrap(), &expected, name);
    }
}

#[test]
fn config_pairs_reach_fs_init_on_a_fresh_start_only() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("input");
    write_input(&input, 500, 50, false);
    let store = dir.path().join("store").display().to_string();
    let mut args = run_args(
        &guest("component-rust"),
        &input,
        &dir.path().join("output"),
        &store,
        100,
    );
    args.extend(["--config".into(), "store=totals".into()]);
    run_ok(&args);
    let inspect = run_ok(&[
        "inspect".into(),
        "--store".into(),
        store,
        "--details".into(),
    ]);
    let text = String::from_utf8_lossy(&inspect.stdout);
    assert!(text.contains("store(s) [totals]"), "{text}");

    let bad = run(&[
        "run".into(),
        guest("wordcount").display().to_string(),
        "--input".into(),
        input.display().to_string(),
        "--output".into(),
        dir.path().join("out2").display().to_string(),
        "--store".into(),
        "memory://".into(),
        "--config".into(),
        "a=b".into(),
    ]);
    assert!(!bad.status.success());
    assert!(
        stderr(&bad).contains("--config is for components"),
        "{}",
        stderr(&bad)
    );
}

/// Components wasnap cannot restore exactly are refused at load time, each with an error
/// that names the construct.
#[test]
fn components_wasnap_cannot_restore_are_refused_by_name() {
    let cases = [
        (
            "another world",
            r#"(component (core module $m (func (export "f"))) (core instance (instantiate $m)))"#,
            "not a `functionstream:core/processor`",
        ),
        (
            "a guest-defined resource",
            r#"(component (type $r (resource (rep i32))) (core func (canon resource.new $r)))"#,
            "resource type of its own",
        ),
        (
            "a module instantiated twice",
            r#"(component (core module $m) (core instance (instantiate $m)) (core instance (instantiate $m)))"#,
            "instantiates core module 0 twice",
        ),
        (
            "a nested component with a module",
            r#"(component (component (core module $m)))"#,
            "nests a component with core modules",
        ),
        (
            "a nested component with a core instance",
            r#"(component (component (core type $t (module)) (core instance)))"#,
            "more than types, imports and exports",
        ),
        (
            "a component start function",
            r#"(component (import "f" (func $f)) (start $f))"#,
            "start function",
        ),
        (
            "async lowering",
            r#"(component (import "f" (func $f)) (core func (canon lower (func $f) async)))"#,
            "async",
        ),
    ];
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("input");
    std::fs::write(&input, "a\n").unwrap();
    for (what, wat, expected) in cases {
        let guest = dir.path().join("bad.wat");
        std::fs::write(&guest, wat).unwrap();
        let out = run(&run_args(
            &guest,
            &input,
            &dir.path().join("output"),
            "memory://",
            10,
        ));
        assert!(!out.status.success(), "{what} was accepted");
        let err = stderr(&out);
        assert!(err.contains(expected), "{what}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{what}: not one line: {err}");
    }
}

/// A guest that drops its kv store handle mid-stream and opens the store again (the Rust
/// guest's `#reopen`: the new handle is taken before the old one is dropped, so the
/// guest's handle table has free slots to rebuild) survives kill -9 exactly.
#[test]
fn a_guest_that_reopens_its_store_mid_stream_survives_kills() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("input");
    write_input(&input, 40_000, 300, false);
    // Every 997th record reopens the store.
    let text = std::fs::read_to_string(&input).unwrap();
    let lines: Vec<&str> = text
        .lines()
        .enumerate()
        .map(|(i, line)| if i % 997 == 500 { "#reopen" } else { line })
        .collect();
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    let guest = guest("component-rust");
    let expected = reference_output(&guest, &input);
    assert!(String::from_utf8_lossy(&expected).contains("501: reopened"));
    let output = dir.path().join("output");
    let store = dir.path().join("store").display().to_string();
    let mut args = coalescing_run_args(&guest, &input, &output, &store, 300);
    args.extend(["--checkpoint-interval".into(), "20ms".into()]);
    let mut rng = Rng::from_env_or_clock("reopen");
    run_with_kills(&args, 6, &mut rng, || {
        assert_committed_prefix(&output, &store, &expected)
    });
    assert_same_output(&std::fs::read(&output).unwrap(), &expected, "reopen");
    // Every retained checkpoint's table has a fourth slot, one of them free: the store
    // handle moved between slots 1 and 4.
    let inspect = run_ok(&[
        "inspect".into(),
        "--store".into(),
        store,
        "--details".into(),
    ]);
    let text = String::from_utf8_lossy(&inspect.stdout);
    assert!(
        text.contains("of 4 slots") && !text.contains("of 3 slots"),
        "{text}"
    );
}

/// A record on which the processor traps stops the run with one line naming the export
/// and the trap; what was committed before it stays, and a rerun stops the same way.
#[test]
fn a_trap_in_fs_process_stops_the_run_with_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("input");
    std::fs::write(&input, "a b\nc\n#trap\nd\n").unwrap();
    let output = dir.path().join("output");
    let store = dir.path().join("store").display().to_string();
    let args = run_args(&guest("component-rust"), &input, &output, &store, 1);
    for attempt in 0..2 {
        let out = run(&args);
        assert!(!out.status.success());
        let err = stderr(&out);
        let line = err
            .lines()
            .find(|l| l.starts_with("wasnap: error"))
            .unwrap_or_else(|| panic!("attempt {attempt}: no error line in {err}"));
        assert!(
            line.contains("the processor failed in `fs-process`") && line.contains("unreachable"),
            "attempt {attempt}: {line}"
        );
        assert_eq!(
            std::fs::read(&output).unwrap(),
            b"1: a=1/1 b=1/1\n2: c=1/1\n"
        );
    }
}

/// wasnap's own stderr unwritable (a full disk behind it): the processor's stderr writes
/// and wasnap's progress lines are dropped, and the run finishes as it would otherwise
/// (a failing WASI stream would hand the guest an error handle; an `eprintln!` would
/// panic).
#[test]
fn a_run_whose_stderr_is_unwritable_finishes_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("input");
    write_input(&input, 3000, 300, false);
    let expected = expected_output(&std::fs::read(&input).unwrap());
    let output = dir.path().join("output");
    let store = dir.path().join("store").display().to_string();
    let mut args = run_args(&guest("component-rust"), &input, &output, &store, 500);
    args.retain(|a| a != "--quiet");
    let status = wasnap()
        .args(&args)
        .stdin(std::process::Stdio::null())
        .stderr(std::fs::File::create("/dev/full").unwrap())
        .status()
        .unwrap();
    assert!(status.success(), "{status}");
    assert_same_output(
        &std::fs::read(&output).unwrap(),
        &expected,
        "stderr on /dev/full",
    );
}

/// A processor that emits to targets 0, 1 and 2 gets one output per target (`--output`
/// repeated, in order), each exactly once through kill -9: one checkpoint commits all
/// three. The same task with another number of outputs, or an emit to a target the run
/// does not have, stops with a line that names the cause; `cat --target` reads any one.
#[test]
fn each_emit_target_has_its_own_output_and_all_of_them_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("input");
    let text = write_emit_targets_input(&input, 40_000);
    let outputs: Vec<_> = (0..3).map(|i| dir.path().join(format!("out{i}"))).collect();
    let args = |outputs: &[std::path::PathBuf], store: &str| {
        let mut args = run_args(&guest("component-rust"), &input, &outputs[0], store, 500);
        for output in &outputs[1..] {
            args.extend(["--output".into(), output.display().to_string()]);
        }
        args
    };

    // Uninterrupted: what each output holds.
    let reference: Vec<_> = (0..3).map(|i| dir.path().join(format!("ref{i}"))).collect();
    let reference_store = dir.path().join("ref-store").display().to_string();
    run_ok(&args(&reference, &reference_store));
    let expected: Vec<Vec<u8>> = reference
        .iter()
        .map(|p| std::fs::read(p).unwrap())
        .collect();
    let ones: String = text
        .lines()
        .filter_map(|l| l.strip_prefix("#to 1 "))
        .map(|t| format!("{t}\n"))
        .collect();
    assert_eq!(String::from_utf8_lossy(&expected[1]), ones);
    assert!(
        expected[2].starts_with(b"two-5\n"),
        "{:?}",
        &expected[2][..20]
    );
    assert!(
        String::from_utf8_lossy(&expected[0]).contains("4: to 1\n"),
        "target 0 says where the others went"
    );

    let store = dir.path().join("store").display().to_string();
    let mut rng = Rng::from_env_or_clock("several outputs");
    run_with_kills(&args(&outputs, &store), 3, &mut rng, || {});
    for (i, output) in outputs.iter().enumerate() {
        assert_same_output(
            &std::fs::read(output).unwrap(),
            &expected[i],
            &format!("output {i}"),
        );
        let cat = run_ok(&[
            "cat".into(),
            "--output".into(),
            output.display().to_string(),
            "--store".into(),
            store.clone(),
            "--target".into(),
            i.to_string(),
        ]);
        assert_eq!(cat.stdout, expected[i], "cat --target {i}");
    }
    // Without --target, which output this is is not guessed.
    let unnamed = run(&[
        "cat".into(),
        "--output".into(),
        outputs[1].display().to_string(),
        "--store".into(),
        store.clone(),
    ]);
    assert!(!unnamed.status.success());
    assert!(
        stderr(&unnamed).contains("the task has 3 outputs")
            && stderr(&unnamed).contains("--target 0 to 2"),
        "{}",
        stderr(&unnamed)
    );

    // The same task with two outputs: refused, naming the cause.
    let refused = run(&args(&outputs[..2], &store));
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("the checkpoint wrote 3 outputs and this run gives 2"),
        "{}",
        stderr(&refused)
    );
    // An emit to a target the run has no output for.
    let fresh = dir.path().join("fresh-store").display().to_string();
    let one_output = run(&args(&outputs[..1], &fresh));
    assert!(!one_output.status.success());
    assert!(
        stderr(&one_output).contains("emitted a record to target 1; this run gives it 1 output(s)"),
        "{}",
        stderr(&one_output)
    );
}

/// `--on-trap skip`: a record the guest traps on goes, with the trap's message, to the
/// dead letters, and the run goes on from its newest checkpoint. Through kill -9 at
/// random moments after commits (a rerun meets each failure again and skips it again) the
/// output and the dead letters are each byte-identical to an uninterrupted run's. Either
/// flag without the other is refused.
#[test]
fn records_the_guest_traps_on_are_skipped_to_the_dead_letters_exactly_once_through_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("input");
    let poison = [777, 9_000, 9_001, 23_456, 39_999];
    let mut text = String::new();
    for i in 0..40_000 {
        if poison.contains(&i) {
            text.push_str("#trap\n");
        } else {
            text.push_str(&format!("w{} w{}\n", i % 17, i % 5));
        }
    }
    std::fs::write(&input, &text).unwrap();
    let args = |name: &str| {
        let mut args = run_args(
            &guest("component-rust"),
            &input,
            &dir.path().join(format!("{name}.out")),
            &dir.path()
                .join(format!("{name}.store"))
                .display()
                .to_string(),
            500,
        );
        let dead = dir
            .path()
            .join(format!("{name}.dead"))
            .display()
            .to_string();
        args.extend([
            "--on-trap".into(),
            "skip".into(),
            "--dead-letter".into(),
            dead,
        ]);
        args
    };
    let read =
        |name: &str, ext: &str| std::fs::read(dir.path().join(format!("{name}.{ext}"))).unwrap();

    run_ok(&args("reference"));
    let (output, dead) = (read("reference", "out"), read("reference", "dead"));
    let letters: Vec<serde_json::Value> = String::from_utf8(dead.clone())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(letters.len(), poison.len(), "{letters:?}");
    for (letter, line) in letters.iter().zip(poison) {
        let offset = text.lines().take(line).map(|l| l.len() + 1).sum::<usize>();
        assert_eq!(letter["offset"], offset, "{letter}");
        assert_eq!(letter["record"], "#trap");
        assert!(
            letter["error"]
                .as_str()
                .unwrap()
                .contains("failed in `fs-process`"),
            "{letter}"
        );
    }
    let lines = output
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .count();
    assert_eq!(
        lines,
        40_000 - poison.len(),
        "every other record has its output line"
    );

    let mut rng = Rng::from_env_or_clock("poison records");
    run_with_kills(&args("killed"), 4, &mut rng, || {});
    assert_same_output(&read("killed", "out"), &output, "output");
    assert_same_output(&read("killed", "dead"), &dead, "dead letters");

    // A task that stopped on the first of them takes --on-trap skip from its checkpoint
    // (its dead letters start then), and a memory:// store works too (one store across
    // the reopens a skip makes).
    let mut stopping = args("stopped");
    stopping.truncate(stopping.len() - 4);
    let stopped = run(&stopping);
    assert!(!stopped.status.success());
    assert!(
        stderr(&stopped).contains("failed in `fs-process`"),
        "{}",
        stderr(&stopped)
    );
    run_ok(&args("stopped"));
    assert_same_output(&read("stopped", "out"), &output, "output after stopping");
    assert_same_output(
        &read("stopped", "dead"),
        &dead,
        "dead letters after stopping",
    );
    let mut in_memory = args("memory");
    let store = in_memory.iter().position(|a| a == "--store").unwrap() + 1;
    in_memory[store] = "memory://".into();
    in_memory.retain(|a| a != "--quiet");
    let summary = stderr(&run_ok(&in_memory));
    // Every record once in the summary, though the records after each skip's checkpoint
    // were processed twice (before the failure, and replayed after it).
    assert!(
        summary.contains("done: 40000 records")
            && summary.contains("5 record(s) the guest failed on skipped to --dead-letter"),
        "{summary}"
    );
    assert_same_output(&read("memory", "out"), &output, "output, memory:// store");
    assert_same_output(
        &read("memory", "dead"),
        &dead,
        "dead letters, memory:// store",
    );

    let mut without_dead_letters = args("refused");
    without_dead_letters.truncate(without_dead_letters.len() - 2);
    let refused = run(&without_dead_letters);
    assert_eq!(refused.status.code(), Some(2));
    assert!(
        stderr(&refused).contains("--on-trap skip needs --dead-letter"),
        "{}",
        stderr(&refused)
    );
    let mut without_skip = args("refused");
    without_skip.retain(|a| a != "--on-trap" && a != "skip");
    let refused = run(&without_skip);
    assert_eq!(refused.status.code(), Some(2));
    assert!(
        stderr(&refused).contains("--dead-letter is for --on-trap skip"),
        "{}",
        stderr(&refused)
    );
}
