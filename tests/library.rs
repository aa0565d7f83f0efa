//! The library API: restore semantics, fencing, observers.

mod common;

use std::path::Path;

use common::*;
use wasnap::CheckpointStats;
use wasnap::error::Fenced;
use wasnap::guest::Guest;
use wasnap::store::CheckpointStore;
use wasnap::{CheckpointObserver, NoObserver, RunConfig, Task, TaskConfig};

fn lines(from: usize, to: usize) -> String {
    (from..to).map(|i| format!("record number {i}\n")).collect()
}

/// Run `guest_name` over 400 records, then append 400 more and resume; `tamper` may
/// change the restored instance before it goes on.
fn resume_after_append(
    guest_name: &str,
    dir: &Path,
    tamper: impl FnOnce(&mut Task),
) -> anyhow::Result<Vec<u8>> {
    let guest = guest(guest_name);
    std::fs::create_dir_all(dir).unwrap();
    let input = dir.join("in");
    let output = dir.join("out");
    let store_dir = dir.join("store");
    let store_url = store_dir.to_str().unwrap();
    std::fs::write(&input, lines(0, 400)).unwrap();
    let config = RunConfig {
        task: TaskConfig::by_count(100),
        ..RunConfig::new(&guest, &input, &output)
    };
    let mut task = config
        .open(CheckpointStore::open(store_url).unwrap())
        .unwrap();
    task.run(&mut NoObserver).unwrap();
    drop(task);

    std::fs::write(&input, lines(0, 800)).unwrap();
    let mut task = config
        .open(CheckpointStore::open(store_url).unwrap())
        .unwrap();
    tamper(&mut task);
    task.run(&mut NoObserver)?;
    Ok(std::fs::read(&output).unwrap())
}

fn uninterrupted(guest_name: &str, dir: &Path) -> Vec<u8> {
    let input = dir.join(format!("{guest_name}-in"));
    let output = dir.join(format!("{guest_name}-reference"));
    std::fs::write(&input, lines(0, 800)).unwrap();
    let config = RunConfig::new(guest(guest_name), &input, &output);
    wasnap::task::run(&config, "memory://", &mut NoObserver).unwrap();
    std::fs::read(&output).unwrap()
}

/// Resuming with the guest's non-exported globals restored gives the uninterrupted output;
/// resuming with them put back to a fresh instance's values (as an engine that snapshots
/// memory only would leave them) does not: either the output differs or the guest breaks.
fn globals_make_the_difference(guest_name: &str) {
    let dir = tempfile::tempdir().unwrap();
    let reference = uninterrupted(guest_name, dir.path());
    let with_globals = resume_after_append(guest_name, &dir.path().join("with"), |_| {}).unwrap();
    assert_eq!(
        with_globals, reference,
        "{guest_name}: resume with globals differs"
    );

    let fresh_globals = Guest::load(&guest(guest_name))
        .unwrap()
        .instantiate(0, 0)
        .unwrap()
        .globals()
        .unwrap();
    let without = resume_after_append(guest_name, &dir.path().join("without"), |task| {
        task.instance().set_globals(&fresh_globals).unwrap();
    });
    match without {
        Ok(output) => assert_ne!(
            output, reference,
            "{guest_name}: a memory-only restore went unnoticed"
        ),
        Err(err) => assert!(
            format!("{err:#}").contains("trapped"),
            "{guest_name}: unexpected failure: {err:#}"
        ),
    }
}

#[test]
fn restoring_non_exported_globals_is_what_makes_the_wat_guest_resume_exactly() {
    globals_make_the_difference("wat-globals");
}

#[test]
fn restoring_non_exported_globals_is_what_makes_the_assemblyscript_guest_resume_exactly() {
    globals_make_the_difference("as-inventory");
}

#[derive(Default)]
struct Recorder {
    events: Vec<String>,
}

impl CheckpointObserver for Recorder {
    fn started(&mut self, generation: u64) {
        self.events.push(format!("start {generation}"));
    }
    fn finished(&mut self, generation: u64, outcome: Result<&CheckpointStats, &wasnap::Error>) {
        self.events.push(match outcome {
            Ok(stats) => format!("ok {generation} offset={}", stats.input_offset),
            Err(e) if e.downcast_ref::<Fenced>().is_some() => format!("fenced {generation}"),
            Err(e) => format!("error {generation}: {e:#}"),
        });
    }
}

#[test]
fn a_second_writer_on_the_same_store_is_fenced_and_observers_hear_of_it() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    std::fs::write(&input, lines(0, 50)).unwrap();
    let store_url = dir.path().join("store");
    let store_url = store_url.to_str().unwrap();
    let config_a = RunConfig {
        task: TaskConfig::by_count(10),
        ..RunConfig::new(guest("wordcount"), &input, dir.path().join("a"))
    };
    let config_b = RunConfig {
        task: TaskConfig::by_count(10),
        ..RunConfig::new(guest("wordcount"), &input, dir.path().join("b"))
    };

    // Both writers start from the same (empty) store.
    let mut a = config_a
        .open(CheckpointStore::open(store_url).unwrap())
        .unwrap();
    let mut b = config_b
        .open(CheckpointStore::open(store_url).unwrap())
        .unwrap();
    let (mut seen_a, mut seen_b) = (Recorder::default(), Recorder::default());
    a.checkpoint(&mut seen_a).unwrap();
    let err = b.checkpoint(&mut seen_b).unwrap_err();
    assert_eq!(
        err.downcast_ref::<Fenced>().map(|f| f.generation),
        Some(1),
        "{err:#}"
    );
    assert!(format!("{err:#}").contains("another writer owns this task"));
    assert_eq!(b.generation(), 0, "a fenced writer must not advance");
    assert_eq!(seen_a.events, vec!["start 1", "ok 1 offset=0"]);
    assert_eq!(seen_b.events, vec!["start 1", "fenced 1"]);

    // The winner goes on; what is in the store is the winner's.
    a.run(&mut seen_a).unwrap();
    assert_eq!(seen_a.events.len(), 2 + 2 * 5);
    let store = CheckpointStore::open(store_url).unwrap();
    let newest = store
        .read_manifest(*store.generations().unwrap().last().unwrap())
        .unwrap();
    assert_eq!(
        newest.input_offset,
        std::fs::metadata(&input).unwrap().len()
    );
}

#[test]
fn commits_are_create_only_on_every_backend() {
    let dir = tempfile::tempdir().unwrap();
    let store_dir = dir.path().join("store");
    for url in [store_dir.to_str().unwrap(), "memory://"] {
        let store = CheckpointStore::open(url).unwrap();
        let input = dir.path().join("in");
        std::fs::write(&input, lines(0, 5)).unwrap();
        // Two tasks (as on two machines: two outputs) over one object store; for
        // memory:// they must share the instance.
        let config_a = RunConfig::new(guest("wat-globals"), &input, dir.path().join("out-a"));
        let config_b = RunConfig::new(guest("wat-globals"), &input, dir.path().join("out-b"));
        let shared = store.object_store().clone();
        let mut a = config_a
            .open(CheckpointStore::from_object_store(shared.clone(), url).unwrap())
            .unwrap();
        let mut b = config_b
            .open(CheckpointStore::from_object_store(shared, url).unwrap())
            .unwrap();
        a.checkpoint(&mut NoObserver).unwrap();
        assert!(
            b.checkpoint(&mut NoObserver)
                .unwrap_err()
                .downcast_ref::<Fenced>()
                .is_some(),
            "{url}"
        );
        assert_eq!(store.generations().unwrap(), vec![1]);
    }
}
