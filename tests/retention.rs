//! Retention: the store keeps the newest K checkpoints, stays proportional to the guest's
//! memory, and every kept checkpoint still restores to the exact output.

mod common;

use std::path::Path;

use common::*;

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

fn store_bytes(store: &str) -> u64 {
    open_store(store).total_bytes().unwrap()
}

#[test]
fn five_hundred_checkpoints_keep_the_store_small_and_every_kept_one_restores() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    write_input(&input, 50_000, 0, true);
    let reference = reference_output(&guest("window"), &input);

    let store = dir.path().join("store");
    let store_url = store.to_str().unwrap();
    let output = dir.path().join("out");
    run_ok(&run_args(&guest("window"), &input, &output, store_url, 100));
    assert_eq!(std::fs::read(&output).unwrap(), reference);

    let checkpoints = open_store(store_url);
    assert_eq!(
        checkpoints.generations().unwrap(),
        vec![498, 499, 500],
        "retain 3 by default"
    );
    let memory = checkpoints.read_manifest(500).unwrap().memory_bytes();
    let size = store_bytes(store_url);
    assert!(
        size <= 2 * memory,
        "store is {size} bytes for a {memory}-byte guest after 500 checkpoints"
    );

    // Every kept checkpoint restores: make it the newest in a copy of the store, resume, compare.
    for generation in [498u64, 499] {
        let copy = dir.path().join(format!("store-{generation}"));
        copy_dir(&store, &copy);
        for newer in generation + 1..=500 {
            std::fs::remove_file(copy.join(format!("manifests/{newer:020}"))).unwrap();
        }
        let out = dir.path().join(format!("out-{generation}"));
        std::fs::copy(&output, &out).unwrap();
        let run = run_ok(&run_args(
            &guest("window"),
            &input,
            &out,
            copy.to_str().unwrap(),
            100,
        ));
        assert!(
            stderr(&run).is_empty() || !stderr(&run).contains("warning"),
            "{}",
            stderr(&run)
        );
        assert_eq!(
            std::fs::read(&out).unwrap(),
            reference,
            "resume from checkpoint {generation}"
        );
    }
}

#[test]
fn gc_frees_what_no_kept_checkpoint_needs_and_leaves_in_flight_packs_alone() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    write_input(&input, 5000, 400, false);
    let store = dir.path().join("store");
    let store_url = store.to_str().unwrap();
    let output = dir.path().join("out");
    let mut args = run_args(&guest("wordcount"), &input, &output, store_url, 250);
    args.extend(["--retain".to_string(), "1000".to_string()]);
    run_ok(&args);
    assert_eq!(open_store(store_url).generations().unwrap().len(), 20);

    // A pack a losing writer left behind, and one a checkpoint in flight is writing.
    let lost = store
        .join("packs")
        .join(format!("{:020}-{}.pack", 7, "ab".repeat(16)));
    let in_flight = store
        .join("packs")
        .join(format!("{:020}-{}.pack", 21, "cd".repeat(16)));
    std::fs::write(&lost, b"lost race").unwrap();
    std::fs::write(&in_flight, b"in flight").unwrap();

    let before = store_bytes(store_url);
    let out = wasnap()
        .args(["gc", "--store", store_url, "--retain", "2"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        report.contains("kept checkpoints [19, 20]") && report.contains("deleted 18 manifests"),
        "{report}"
    );
    let after = store_bytes(store_url);
    assert!(after < before, "gc freed nothing: {report}");
    assert!(
        !lost.exists(),
        "an unreferenced pack of an old generation survived"
    );
    assert!(
        in_flight.exists(),
        "gc deleted a pack of a generation not yet committed"
    );

    // The kept checkpoints are whole: a resume from 19 (with 20 gone) gives the same output.
    let expected = std::fs::read(&output).unwrap();
    std::fs::remove_file(store.join(format!("manifests/{:020}", 20))).unwrap();
    run_ok(&args);
    assert_eq!(std::fs::read(&output).unwrap(), expected);
}

#[test]
fn inspect_shows_each_checkpoints_packs_and_what_is_live() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    write_input(&input, 2000, 400, false);
    let store = dir.path().join("store");
    let store_url = store.to_str().unwrap();
    let mut args = run_args(
        &guest("wordcount"),
        &input,
        &dir.path().join("out"),
        store_url,
        250,
    );
    args.extend(["--retain".to_string(), "1000".to_string()]);
    run_ok(&args);
    // Garbage: a pack no checkpoint names (a writer that lost a race left it).
    let stray = format!("{:020}-{}.pack", 3, "ab".repeat(16));
    std::fs::write(store.join("packs").join(&stray), b"lost race").unwrap();

    let out = wasnap()
        .args(["inspect", "--store", store_url, "--details"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let rows: Vec<&str> = text
        .lines()
        .filter(|l| {
            l.split_whitespace()
                .next()
                .is_some_and(|t| t.parse::<u64>().is_ok())
        })
        .collect();
    assert_eq!(rows.len(), 8, "{text}");
    // Every pack line names a pack that exists, with its frames in use.
    let pack_lines: Vec<&str> = text.lines().filter(|l| l.contains(".pack")).collect();
    assert!(pack_lines.len() >= rows.len(), "{text}");
    for line in &pack_lines {
        let name = line
            .trim()
            .strip_prefix("pack ")
            .unwrap()
            .split(':')
            .next()
            .unwrap();
        assert!(store.join("packs").join(name).exists(), "{line}");
        assert!(line.contains("frames (encoded pages) used"), "{line}");
    }
    assert!(
        !text.contains(&stray),
        "the stray pack is no checkpoint's: {text}"
    );
    let summary = text.lines().find(|l| l.starts_with("objects: ")).unwrap();
    assert!(
        summary.starts_with("objects: 8 manifests") && summary.ends_with("garbage: 9 B"),
        "{summary}"
    );
}
