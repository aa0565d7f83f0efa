//! A full disk: the store (or the output, or the page cache) on a small tmpfs that fills
//! up mid-run. The run
//! stops with a clear error, the checkpoints committed before are intact, and a resume
//! with room to write finishes with output identical to an uninterrupted run.
//!
//! The tmpfs is mounted in a private mount namespace (`unshare`), so the test needs no
//! privileges beyond what `unshare --user --map-root-user` grants, and leaves nothing mounted.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

/// Run `script` with `sh` in a new mount namespace where `$SMALL` is a tmpfs of `size`.
/// Returns what the script printed on stdout.
fn in_small_tmpfs(small: &Path, size: &str, script: &str, env: &[(&str, &Path)]) -> String {
    std::fs::create_dir_all(small).unwrap();
    let full_script =
        format!("set -e; mount -t tmpfs -o size={size} tmpfs \"$SMALL\"; set +e; {script}");
    // As root, a mount namespace is enough; otherwise a user namespace grants the mount.
    let mut last_error = String::new();
    for prefix in [
        &["--mount"][..],
        &["--user", "--map-root-user", "--mount"][..],
    ] {
        let out = Command::new("unshare")
            .args(prefix)
            .args(["sh", "-c", &full_script])
            .env("SMALL", small)
            .env("WASNAP", env!("CARGO_BIN_EXE_wasnap"))
            .envs(env.iter().map(|(k, v)| (*k, *v)))
            .output()
            .expect("run unshare (util-linux)");
        if out.status.success() {
            return String::from_utf8_lossy(&out.stdout).into_owned();
        }
        last_error = String::from_utf8_lossy(&out.stderr).into_owned();
    }
    panic!("cannot mount a tmpfs in a private namespace: {last_error}");
}

/// The run (whose shell printed `printed`, and whose stderr is in `err_path`) exited 1
/// saying the disk is full. Returns its stderr.
fn assert_stopped_on_full_disk(printed: &str, err_path: &Path) -> String {
    let err = std::fs::read_to_string(err_path).unwrap();
    assert!(
        printed.contains("exit=1"),
        "expected exit 1, got {printed} ({err})"
    );
    assert!(
        err.contains("No space left on device"),
        "the error does not say the disk is full: {err}"
    );
    err
}

/// The checkpoints committed before the disk filled are in `store` and match the start of
/// `output`; with room to write, the run resumes from them and finishes exactly once.
fn assert_resumes_exactly(
    (guest, input, reference): (&Path, &Path, &[u8]),
    output: &Path,
    store: &str,
    what: &str,
) {
    assert!(
        !open_store(store).generations().unwrap().is_empty(),
        "{what}: nothing was committed before the disk filled"
    );
    assert_committed_prefix(output, store, reference);
    run_ok(&run_args(guest, input, output, store, 2000));
    assert_same_output(&std::fs::read(output).unwrap(), reference, what);
}

fn setup(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf, Vec<u8>) {
    let guest = guest("wordcount");
    let input = dir.join("in");
    // Many distinct words: the guest's hash map, and with it every checkpoint, keeps growing.
    write_input(&input, 60_000, 1_000_000, false);
    let reference = reference_output(&guest, &input);
    (guest, input, reference)
}

#[test]
fn a_full_store_disk_stops_the_run_clearly_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (guest, input, reference) = setup(dir.path());
    let small = dir.path().join("small");
    let saved = dir.path().join("saved-store");
    let output = dir.path().join("out");
    let args = run_args(&guest, &input, &output, "$SMALL/store", 2000).join(" ");
    let printed = in_small_tmpfs(
        &small,
        "1m",
        &format!(
            "\"$WASNAP\" {args} 2>\"$ERR\"; echo \"exit=$?\"; cp -a \"$SMALL/store\" \"$SAVED\""
        ),
        &[("ERR", &dir.path().join("err")), ("SAVED", &saved)],
    );
    let err = assert_stopped_on_full_disk(&printed, &dir.path().join("err"));
    assert_eq!(err.lines().count(), 1, "expected one error line: {err}");

    assert_resumes_exactly(
        (&guest, &input, &reference),
        &output,
        saved.to_str().unwrap(),
        &format!("after a full store disk ({err})"),
    );
}

#[test]
fn a_full_output_disk_stops_the_run_clearly_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (guest, input, reference) = setup(dir.path());
    let small = dir.path().join("small");
    let store = dir.path().join("store");
    let saved = dir.path().join("saved-out");
    // The page cache, which sits beside the output by default, goes to the big disk here:
    // this test fills the disk with output alone.
    let mut args = run_args(
        &guest,
        &input,
        Path::new("$SMALL/out"),
        store.to_str().unwrap(),
        2000,
    );
    args.extend([
        "--cache-dir".into(),
        dir.path().join("cache").display().to_string(),
    ]);
    let args = args.join(" ");
    assert!(
        reference.len() > 256 << 10,
        "the output must outgrow the small disk"
    );
    let printed = in_small_tmpfs(
        &small,
        "256k",
        &format!("\"$WASNAP\" {args} 2>\"$ERR\"; echo \"exit=$?\"; cp \"$SMALL/out\" \"$SAVED\""),
        &[("ERR", &dir.path().join("err")), ("SAVED", &saved)],
    );
    let err = assert_stopped_on_full_disk(&printed, &dir.path().join("err"));
    assert_resumes_exactly(
        (&guest, &input, &reference),
        &saved,
        store.to_str().unwrap(),
        &format!("after a full output disk ({err})"),
    );
}

/// The page cache (the last version of every page, a delta's base) on a disk that fills:
/// the checkpoint that cannot move the cache on fails with the disk's error, not SIGBUS
/// (the cache is written through the file, never through its mapping), and the run
/// resumes from the checkpoints before it.
#[test]
fn a_full_page_cache_disk_stops_the_run_clearly_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (guest, input, reference) = setup(dir.path());
    let small = dir.path().join("small");
    let store = dir.path().join("store");
    let output = dir.path().join("out");
    let mut args = run_args(&guest, &input, &output, store.to_str().unwrap(), 2000);
    args.extend(["--cache-dir".into(), "$SMALL/cache".into()]);
    let args = args.join(" ");
    // 2 MiB: the first checkpoints' pages fit; the guest's hash map outgrows it.
    let printed = in_small_tmpfs(
        &small,
        "2m",
        &format!("\"$WASNAP\" {args} 2>\"$ERR\"; echo \"exit=$?\""),
        &[("ERR", &dir.path().join("err"))],
    );
    let err = assert_stopped_on_full_disk(&printed, &dir.path().join("err"));
    assert!(
        err.contains("cannot write page cache"),
        "the error does not name the page cache: {err}"
    );
    assert_resumes_exactly(
        (&guest, &input, &reference),
        &output,
        store.to_str().unwrap(),
        &format!("after a full page cache disk ({err})"),
    );
}
