//! Crash tests: a run killed with SIGKILL at random moments and restarted until done
//! must leave exactly the output of an uninterrupted run, byte for byte.

mod common;

use std::time::Duration;

use common::*;

const KILLS: usize = 10;

/// Compare two outputs and, on a mismatch, say where they part (not a 10 MB diff).
pub fn assert_same_output(actual: &[u8], expected: &[u8], what: &str) {
    if actual == expected {
        return;
    }
    let (a, e): (Vec<_>, Vec<_>) = (
        actual.split(|b| *b == b'\n').collect(),
        expected.split(|b| *b == b'\n').collect(),
    );
    let line = a
        .iter()
        .zip(&e)
        .position(|(x, y)| x != y)
        .unwrap_or(a.len().min(e.len()));
    panic!(
        "{what}: output differs from the uninterrupted run at line {line} ({} vs {} bytes): got {:?}, expected {:?}",
        actual.len(),
        expected.len(),
        a.get(line).map(|l| String::from_utf8_lossy(l)),
        e.get(line).map(|l| String::from_utf8_lossy(l)),
    );
}

fn crash_test(guest_name: &str, records: usize, numbers: bool, every: u64) {
    let guest = guest(guest_name);
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("input");
    write_input(&input, records, 5000, numbers);

    // The reference: one run, never interrupted, checkpointing only at the end.
    let expected_path = dir.path().join("expected");
    let reference_store = dir.path().join("reference-store");
    run_ok(&run_args(
        &guest,
        &input,
        &expected_path,
        reference_store.to_str().unwrap(),
        1 << 40,
    ));

    let expected = std::fs::read(&expected_path).unwrap();
    assert!(!expected.is_empty());

    let output = dir.path().join("output");
    let store = dir.path().join("store");
    let store = store.to_str().unwrap();
    let args = run_args(&guest, &input, &output, store, every);
    let mut rng = Rng::from_env_or_clock(guest_name);
    let window = (Duration::from_millis(20), Duration::from_millis(250));
    let killed = run_with_kills(&args, KILLS, window, &mut rng, || {
        assert_committed_prefix(&output, store, &expected)
    });
    assert!(killed >= KILLS);
    assert_same_output(&std::fs::read(&output).unwrap(), &expected, guest_name);

    // Running once more on a finished task changes nothing.
    run_ok(&args);
    assert_same_output(&std::fs::read(&output).unwrap(), &expected, guest_name);
}

#[test]
fn rust_wordcount_survives_kill_9() {
    crash_test("wordcount", 300_000, false, 200);
}

#[test]
fn rust_window_survives_kill_9() {
    crash_test("window", 250_000, true, 200);
}

#[test]
fn wat_globals_guest_survives_kill_9() {
    crash_test("wat-globals", 300_000, false, 200);
}
