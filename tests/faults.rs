//! Fault injection at each point of the checkpoint protocol, through a wrapping
//! `ObjectStore` (tests/common/faulty.rs): the n-th pack put, manifest put or prune delete
//! fails, is delayed, is torn, or loses its reply. For every case the run either commits
//! or stops with the error, and a restart on the same store produces output identical to
//! an uninterrupted run.

mod common;

use std::sync::Arc;

use common::faulty::{ALL_FAULTS, ALL_POINTS, Fault, FaultyStore, Point};
use common::*;
use wasnap::CheckpointStats;
use wasnap::store::{CheckpointStore, open_object_store};
use wasnap::{CheckpointObserver, NoObserver, RunConfig, TaskConfig};

fn run_task(config: &RunConfig, store: CheckpointStore) -> anyhow::Result<()> {
    let mut task = config.open(store)?;
    task.run(&mut NoObserver)?;
    Ok(())
}

#[test]
fn every_fault_at_every_point_commits_or_aborts_and_a_restart_is_exact() {
    let guest = guest("wordcount");
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    write_input(&input, 3000, 2000, false);
    let reference = reference_output(&guest, &input);

    for point in ALL_POINTS {
        for fault in ALL_FAULTS {
            // The first operation of its kind, and one in the middle of the run.
            for nth in [1, 4] {
                let case = format!("{fault:?} at {point:?} #{nth}");
                let case_dir = dir.path().join(case.replace([' ', '#'], "_"));
                let store_dir = case_dir.join("store");
                let store_url = store_dir.to_str().unwrap();
                let output = case_dir.join("out");
                let config = RunConfig {
                    task: TaskConfig {
                        retain: 2,
                        ..TaskConfig::by_count(250)
                    },
                    ..RunConfig::new(&guest, &input, &output)
                };

                let faulty = Arc::new(FaultyStore::new(
                    open_object_store(store_url).unwrap(),
                    point,
                    fault,
                    nth,
                ));
                let store = CheckpointStore::from_object_store(faulty.clone(), "faulty").unwrap();
                let outcome = run_task(&config, store);
                assert_eq!(faulty.injected(), 1, "{case}: the fault never struck");

                // Delays and failed deletes cost nothing but time and space; anything else
                // that touches the commit must stop the run with the injected error.
                let must_commit = fault == Fault::Delay || point == Point::PruneDelete;
                match &outcome {
                    Ok(()) => assert!(must_commit, "{case}: the run ignored a failed write"),
                    Err(err) => {
                        assert!(!must_commit, "{case}: the run stopped: {err:#}");
                        assert!(
                            format!("{err:#}").contains("injected"),
                            "{case}: the error does not say what failed: {err:#}"
                        );
                    }
                }
                if outcome.is_ok() {
                    assert_same_output(&std::fs::read(&output).unwrap(), &reference, &case);
                }

                // A restart on the real store finishes the job exactly once. Except in one
                // case: the very first manifest torn. Real stores put atomically, so a torn
                // manifest is damage, and damage to the only checkpoint there is cannot be
                // told from damage to a committed one: the restart refuses, clearly.
                let restart = run_task(&config, CheckpointStore::open(store_url).unwrap());
                if (point, fault, nth) == (Point::ManifestPut, Fault::Tear, 1) {
                    let err = restart.expect_err("restart over a torn only manifest");
                    assert!(format!("{err:#}").contains("is usable"), "{case}: {err:#}");
                    continue;
                }
                restart.unwrap_or_else(|err| panic!("{case}: restart failed: {err:#}"));
                assert_same_output(
                    &std::fs::read(&output).unwrap(),
                    &reference,
                    &format!("{case}, after a restart"),
                );
            }
        }
    }
}

/// Every start and every end an observer hears of.
#[derive(Default)]
struct Ledger {
    started: Vec<u64>,
    finished: Vec<(u64, bool)>,
}

impl CheckpointObserver for Ledger {
    fn started(&mut self, generation: u64) {
        self.started.push(generation);
    }
    fn finished(&mut self, generation: u64, outcome: Result<&CheckpointStats, &wasnap::Error>) {
        self.finished.push((generation, outcome.is_ok()));
    }
}

#[test]
fn a_committer_that_dies_fails_the_run_and_observers_hear_of_every_checkpoint() {
    let guest = guest("wordcount");
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    write_input(&input, 3000, 2000, false);
    let reference = reference_output(&guest, &input);
    let store_dir = dir.path().join("store");
    let store_url = store_dir.to_str().unwrap();
    let config = RunConfig {
        task: TaskConfig::by_count(250),
        ..RunConfig::new(&guest, &input, dir.path().join("out"))
    };

    // The third pack put panics, on the committer's thread.
    let faulty = Arc::new(FaultyStore::new(
        open_object_store(store_url).unwrap(),
        Point::PackPut,
        Fault::Panic,
        3,
    ));
    let store = CheckpointStore::from_object_store(faulty.clone(), "faulty").unwrap();
    let mut ledger = Ledger::default();
    let outcome = config
        .open(store)
        .and_then(|mut task| task.run(&mut ledger));
    assert_eq!(faulty.injected(), 1, "the fault never struck");
    let err = outcome.expect_err("a run whose committer died cannot succeed");
    assert!(
        format!("{err:#}").contains("committer stopped unexpectedly"),
        "{err:#}"
    );

    // Every checkpoint started ended exactly once, in order; the first two committed and
    // the third, whose pack put panicked, did not.
    let finished: Vec<u64> = ledger.finished.iter().map(|(g, _)| *g).collect();
    assert_eq!(finished, ledger.started, "{:?}", ledger.finished);
    assert_eq!(ledger.finished[..3], [(1, true), (2, true), (3, false)]);
    assert!(ledger.finished[3..].iter().all(|(_, ok)| !ok));

    let restart = config
        .open(CheckpointStore::open(store_url).unwrap())
        .and_then(|mut task| task.run(&mut NoObserver));
    restart.unwrap_or_else(|err| panic!("restart failed: {err:#}"));
    assert_same_output(
        &std::fs::read(dir.path().join("out")).unwrap(),
        &reference,
        "after the committer died and the run restarted",
    );
}
