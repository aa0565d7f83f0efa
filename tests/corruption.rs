//! Every single-byte corruption of every store object is detected or harmless: after
//! flipping any one byte of any manifest or pack, a resumed run either stops with an
//! error or falls back to an older checkpoint, and every run that finishes gives output
//! byte-identical to an uninterrupted run. Never silently wrong output.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use wasnap::guest::Guest;
use wasnap::store::CheckpointStore;
use wasnap::{NoObserver, RunConfig, TaskConfig};

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(files_under(&path));
        } else {
            files.push(path);
        }
    }
    files.sort();
    files
}

#[test]
fn every_flipped_byte_of_every_store_object_is_detected_or_harmless() {
    // The WAT guest keeps its state in non-exported globals and a growing memory log, so
    // both the globals and the pages of a manifest matter.
    let guest_path = guest("wat-globals");
    let guest = Guest::load(&guest_path).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    write_input(&input, 300, 50, false);
    let reference = reference_output(&guest_path, &input);
    let output = dir.path().join("out");
    let store_dir = dir.path().join("store");
    let store_url = store_dir.to_str().unwrap();
    let config = RunConfig {
        task: TaskConfig {
            retain: usize::MAX,
            ..TaskConfig::by_count(100)
        },
        ..RunConfig::new(&guest_path, &input, &output)
    };
    let resume = || -> anyhow::Result<Option<u64>> {
        let store = CheckpointStore::open(store_url).unwrap();
        let mut task = config.open_with_guest(&guest, store)?;
        Ok(task.run(&mut NoObserver)?.resumed_from)
    };
    assert_eq!(resume().unwrap(), None);
    assert_eq!(std::fs::read(&output).unwrap(), reference);

    // A crash just before checkpoint 3 committed: its manifest is gone, its pack is left
    // over, and the output runs past checkpoint 2's marker.
    std::fs::remove_file(store_dir.join("manifests/00000000000000000003")).unwrap();
    let crashed_output = std::fs::read(&output).unwrap();
    let newest = 2;
    let pristine: Vec<(PathBuf, Vec<u8>)> = files_under(&store_dir)
        .into_iter()
        .map(|path| {
            let bytes = std::fs::read(&path).unwrap();
            (path, bytes)
        })
        .collect();
    assert!(
        pristine.len() >= 5,
        "expected manifests and packs: {pristine:?}"
    );

    let mut total_detected = 0;
    for (object, original) in &pristine {
        let name = object
            .strip_prefix(&store_dir)
            .unwrap()
            .display()
            .to_string();
        let (mut harmless, mut detected) = (0usize, 0usize);
        for position in 0..original.len() {
            for mask in [0x01u8, 0xff] {
                // Back to the crashed state with this one byte flipped (a resume adds
                // checkpoints, so the whole store is put back every time).
                std::fs::remove_dir_all(&store_dir).unwrap();
                for (path, bytes) in &pristine {
                    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                    std::fs::write(path, bytes).unwrap();
                }
                let mut damaged = original.clone();
                damaged[position] ^= mask;
                std::fs::write(object, &damaged).unwrap();
                std::fs::write(&output, &crashed_output).unwrap();

                match resume() {
                    Ok(resumed_from) => {
                        // Whatever it restored, a run that finished must be exact.
                        let case = format!("{name} byte {position} ^ {mask:#04x}");
                        assert_same_output(&std::fs::read(&output).unwrap(), &reference, &case);
                        if resumed_from == Some(newest) {
                            harmless += 1;
                        } else {
                            detected += 1;
                        }
                    }
                    Err(_) => detected += 1,
                }
            }
        }
        eprintln!(
            "{name}: {} bytes, {detected} flips detected, {harmless} harmless",
            original.len()
        );
        // The newest manifest is covered by a CRC: every flip of it must be noticed.
        if name.ends_with(&format!("{newest:020}")) {
            assert_eq!(harmless, 0, "{name}: a flipped byte went unnoticed");
        }
        total_detected += detected;
    }
    assert!(
        total_detected > 0,
        "no flip was ever detected: the test does not bite"
    );
}
