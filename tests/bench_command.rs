//! `wasnap bench`: its per-checkpoint figures are the engine's real ones.

mod common;

use common::*;

fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .map(|e| {
            if e.file_type().unwrap().is_dir() {
                dir_bytes(&e.path())
            } else {
                e.metadata().unwrap().len()
            }
        })
        .sum()
}

#[test]
fn json_lines_account_for_every_byte_put_to_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    write_input(&input, 5000, 300, false);
    let store = dir.path().join("store");
    let out = wasnap()
        .args([
            "bench",
            guest("wordcount").to_str().unwrap(),
            "--input",
            input.to_str().unwrap(),
        ])
        .args([
            "--checkpoint-every",
            "500",
            "--json",
            "--store",
            store.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let mut records: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // One line per commit, then the run's summary. By count alone, each of the 10
    // checkpoints is its own commit.
    let summary = records.pop().unwrap();
    assert_eq!(summary["kind"], "summary", "{summary}");
    assert_eq!(records.len(), 10);
    assert_eq!(
        (summary["commits"].as_u64(), summary["captures"].as_u64()),
        (Some(10), Some(10))
    );
    let tax = summary["tax"].as_f64().unwrap();
    assert!(
        tax > 0.0 && summary["off_records_per_sec"].as_f64().unwrap() > 0.0,
        "{summary}"
    );
    assert!(summary["commit_lag_p50_us"].as_u64() <= summary["commit_lag_max_us"].as_u64());
    // Three passes under the policy by default, each into its own store; the figures are
    // the fastest one's.
    assert_eq!(summary["passes"].as_u64(), Some(3), "{summary}");
    let fastest = summary["fastest_pass"].as_u64().unwrap();
    assert!((1..=3).contains(&fastest), "{summary}");
    let field = |r: &serde_json::Value, k: &str| {
        r[k].as_u64()
            .unwrap_or_else(|| panic!("{k} missing in {r}"))
    };
    let mut total = 0;
    for (i, r) in records.iter().enumerate() {
        assert_eq!(field(r, "generation"), i as u64 + 1);
        assert_eq!(
            field(r, "delta_bytes"),
            field(r, "pack_bytes") + field(r, "manifest_bytes")
        );
        assert!(field(r, "memory_bytes") > 0 && field(r, "stall_us") > 0);
        assert!(field(r, "stall_us") >= field(r, "hash_us"));
        assert!(field(r, "baseline_bytes") > 0);
        assert_eq!(
            r["baseline_full"].as_bool().unwrap(),
            i % 5 == 0,
            "full baseline every 5th"
        );
        total += field(r, "delta_bytes");
    }
    // Every byte in the fastest pass's store was reported, and nothing else was written
    // but the task's id, once, when the task was opened. The other passes wrote their
    // own stores, beside it.
    let pass = store.join(format!("pass-{fastest}"));
    let task = std::fs::read_to_string(pass.join("task")).unwrap();
    assert!(
        task.starts_with("wasnap task 1\n") && task.len() == 47,
        "{task:?}"
    );
    assert_eq!(total + task.len() as u64, dir_bytes(&pass));
    let mut stores: Vec<String> = std::fs::read_dir(&store)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    stores.sort();
    assert_eq!(stores, ["pass-1", "pass-2", "pass-3"]);
    for name in &stores {
        let other = store.join(name).join("manifests");
        assert_eq!(std::fs::read_dir(&other).unwrap().count(), 10, "{name}");
    }
    // inspect on the given store points at the passes; on a pass, it lists its checkpoints.
    let inspect = |store: &std::path::Path| {
        wasnap()
            .args(["inspect", "--store", store.to_str().unwrap()])
            .output()
            .unwrap()
    };
    let root = inspect(&store);
    let said = String::from_utf8_lossy(&root.stderr);
    assert!(
        !root.status.success()
            && said.contains("pass-1, pass-2, pass-3")
            && said.contains("/pass-1"),
        "{said}"
    );
    let one = inspect(&pass);
    assert!(
        one.status.success(),
        "{}",
        String::from_utf8_lossy(&one.stderr)
    );
    assert!(
        String::from_utf8_lossy(&one.stdout).contains("10 checkpoints"),
        "{}",
        String::from_utf8_lossy(&one.stdout)
    );
}

#[test]
fn several_passes_need_the_scratch_output_and_an_empty_store() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    write_input(&input, 500, 300, false);
    let bench = |extra: &[&str]| {
        wasnap()
            .args([
                "bench",
                guest("wordcount").to_str().unwrap(),
                "--input",
                input.to_str().unwrap(),
                "--no-baseline",
            ])
            .args(extra)
            .output()
            .unwrap()
    };
    let output = dir.path().join("out.jsonl");
    let out = bench(&["--output", output.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("--passes 3 with --output"),
        "{}",
        stderr(&out)
    );
    assert!(!output.exists());
    // With one pass, the output is the run's.
    let out = bench(&["--output", output.to_str().unwrap(), "--passes", "1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        std::fs::read(&output).unwrap(),
        reference_output(&guest("wordcount"), &input)
    );
    // A store whose second pass already holds checkpoints is refused before any runs.
    let store = dir.path().join("store");
    let out = bench(&["--store", store.to_str().unwrap(), "--passes", "2"]);
    assert!(out.status.success(), "{}", stderr(&out));
    std::fs::remove_dir_all(store.join("pass-1")).unwrap();
    let out = bench(&["--store", store.to_str().unwrap(), "--passes", "2"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("pass-2 holds checkpoints"),
        "{}",
        stderr(&out)
    );
    assert!(!store.join("pass-1").join("manifests").exists());
    // A given --cache-dir gets a directory of the bench's own, removed at the end:
    // what was there already is left alone.
    let caches = dir.path().join("caches");
    std::fs::create_dir_all(caches.join("cache-1")).unwrap();
    std::fs::write(caches.join("cache-1").join("mine"), b"keep").unwrap();
    let cache_dir = caches.to_str().unwrap();
    let out = bench(&["--cache-dir", cache_dir, "--passes", "2"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        std::fs::read(caches.join("cache-1").join("mine")).unwrap(),
        b"keep"
    );
    let left: Vec<_> = std::fs::read_dir(&caches)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, ["cache-1"], "the bench's own caches are gone");
}

#[test]
fn the_summary_compares_with_the_baseline() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    write_input(&input, 2000, 300, true);
    let out = wasnap()
        .args([
            "bench",
            guest("window").to_str().unwrap(),
            "--input",
            input.to_str().unwrap(),
            "--checkpoint-every",
            "500",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8(out.stdout).unwrap();
    for expected in [
        "2000 records",
        "4 checkpoints",
        "bytes written, total",
        "the fastest of 3 passes",
        "stall, mean",
        "than the baseline",
    ] {
        assert!(
            text.contains(expected),
            "summary lacks {expected:?}:\n{text}"
        );
    }
}

#[test]
fn the_stdio_bench_reports_the_transform_and_its_cost() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    write_input(&input, 3000, 300, false);
    let out = wasnap()
        .args([
            "bench",
            "--stdio",
            guest("stdio-wordfreq").to_str().unwrap(),
        ])
        .args([
            "--input",
            input.to_str().unwrap(),
            "--checkpoint-every-bytes",
            "4096",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("3000 input lines"), "{text}");
    assert!(text.contains("asyncified (+"), "the module grows: {text}");
    for row in [
        "plain WASI, original module",
        "asyncified, no checkpoint",
        "checkpoints (every 4.0 KiB)",
    ] {
        assert!(text.contains(row), "missing {row:?}: {text}");
    }
    // A checkpoint is taken at the first stdin read after 4 KiB, and Rust's stdin reads
    // 8 KiB at a time: one checkpoint per read at least, plus the one at the end.
    let reads = std::fs::metadata(&input).unwrap().len() / 8192;
    let checkpoints: u64 = text
        .lines()
        .find_map(|l| {
            l.strip_prefix("wasnap, ")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap();
    assert!(checkpoints > reads, "expected more than {reads}: {text}");
}

#[test]
fn a_reader_that_stops_early_is_no_error() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    write_input(&input, 5000, 300, false);
    let mut child = wasnap()
        .args(["bench", guest("wordcount").to_str().unwrap(), "--input"])
        .arg(&input)
        .args(["--checkpoint-every", "100", "--json", "--no-baseline"])
        // One pass: its lines are printed as its commits come.
        .args(["--passes", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Like `| head -n 1`: one line, then the pipe is closed.
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(first.starts_with("{\"generation\":1,"), "{first}");
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{:?}: {stderr}", out.status);
    assert!(!stderr.contains("panicked"), "{stderr}");
}
