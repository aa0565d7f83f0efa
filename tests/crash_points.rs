//! Deterministic crashes: the process stops itself with SIGKILL at each step of the
//! commit protocol in turn (`WASNAP_CRASH_AT`, see `src/crash.rs`), for a file output,
//! an object-storage output and a Kafka output, and mid-restore; the same command run
//! again must then finish with exactly the output of an uninterrupted run.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::path::Path;

use common::kafka::kafka;
use common::*;

/// Steps every kind of output goes through.
const COMMIT_STEPS: [&str; 5] = [
    "commit-pack-put",
    "commit-output-durable",
    "commit-manifest-created",
    "commit-published",
    "prune-manifests-deleted",
];
const RESTORE_STEPS: [&str; 2] = ["restore-fetched", "restore-pages-written"];

/// The guest, its input (enough for dozens of checkpoints, so object parts merge) and
/// what an uninterrupted run writes.
struct Case {
    dir: tempfile::TempDir,
    guest: std::path::PathBuf,
    input: std::path::PathBuf,
    expected: Vec<u8>,
}

impl Case {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let guest = guest("c-wordcount");
        let input = dir.path().join("input");
        write_input(&input, 4000, 500, false);
        let expected = reference_output(&guest, &input);
        Self {
            dir,
            guest,
            input,
            expected,
        }
    }

    /// Arguments of a run; `coalesce` lets captures merge while they wait for the
    /// committer, else each is committed before the guest goes on (the steps then come in
    /// a fixed order, and each crash point's `N`th occurrence is one the run reaches).
    fn args(&self, output: &str, store: &Path, coalesce: bool) -> Vec<String> {
        let mut args = coalescing_run_args(
            &self.guest,
            &self.input,
            Path::new(output),
            store.to_str().unwrap(),
            100,
        );
        args.extend([
            "--retain".into(),
            "2".into(),
            "--cache-dir".into(),
            store.with_extension("cache").display().to_string(),
        ]);
        if !coalesce {
            args.extend(["--max-in-flight".into(), "0".into()]);
        }
        args
    }
}

/// Run `args` with the crash point `at` armed: the process must die there, by SIGKILL
/// (or, if `may_miss`, finish without reaching it).
fn crash_at(args: &[String], at: &str) {
    crash_at_or_finish(args, at, false);
}

fn crash_at_or_finish(args: &[String], at: &str, may_miss: bool) {
    let out = wasnap()
        .args(args)
        .env("WASNAP_CRASH_AT", at)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let stderr = stderr(&out);
    if may_miss && out.status.success() {
        return;
    }
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGKILL),
        "the run did not stop at crash point {at}: {:?}\n{stderr}",
        out.status
    );
    assert!(
        stderr.contains(&format!("crash point {}", at.split(':').next().unwrap())),
        "{stderr}"
    );
}

/// For each step: a fresh task crashed at the step's second occurrence, then resumed to
/// the end; and a task crashed mid-restore of a checkpoint, then resumed. `read` gives
/// what the output holds (committed) after the final run.
fn crash_at_every_step(
    kind: &str,
    steps: &[&str],
    output_for: &dyn Fn(&Case, &str) -> String,
    read: &dyn Fn(&str, &Path) -> Vec<u8>,
) {
    let case = Case::new();
    for step in steps.iter().chain(&RESTORE_STEPS) {
        let name = step.split(':').next().unwrap();
        let output = output_for(&case, name);
        let store = case.dir.path().join(format!("store-{name}"));
        let args = case.args(&output, &store, false);
        if step.starts_with("restore-") {
            // Checkpoints first (a crash after the fourth commit), then the restore dies.
            crash_at(&args, "commit-published:4");
            crash_at(&args, step);
        } else if step.contains(':') {
            crash_at(&args, step);
        } else {
            // The second time: after one commit, so the rerun restores it.
            crash_at(&args, &format!("{step}:2"));
        }
        let finished = LoggedRun::spawn(&args).finish();
        assert!(
            finished.resumed_from.is_some(),
            "{kind} {step}: the rerun did not resume: {}",
            finished.text
        );
        assert_same_output(
            &read(&output, &store),
            &case.expected,
            &format!("{kind} output, crash at {step}"),
        );
    }
}

#[test]
fn a_file_output_is_exact_after_a_crash_at_every_step() {
    crash_at_every_step(
        "file",
        &COMMIT_STEPS,
        &|case, step| {
            case.dir
                .path()
                .join(format!("out-{step}"))
                .display()
                .to_string()
        },
        &|output, _| std::fs::read(output).unwrap(),
    );
}

#[test]
fn an_object_output_is_exact_after_a_crash_at_every_step() {
    let mut steps = COMMIT_STEPS.to_vec();
    // Parts merge once 32 are published: the run has one merge.
    steps.extend(["output-part-put", "output-index-put", "output-merge-put:1"]);
    crash_at_every_step(
        "object",
        &steps,
        &|case, step| {
            let dir = case.dir.path().join(format!("out-{step}"));
            std::fs::create_dir(&dir).unwrap();
            format!("file://{}", dir.display())
        },
        &|output, store| {
            let out = run_ok(&[
                "cat".into(),
                "--output".into(),
                output.into(),
                "--store".into(),
                store.display().to_string(),
            ]);
            // What readers see without the store is the same, once the task finished.
            let published = run_ok(&["cat".into(), "--output".into(), output.into()]);
            assert_same_output(
                &published.stdout,
                &out.stdout,
                &format!("published output of {output}"),
            );
            out.stdout
        },
    );
}

#[test]
fn a_kafka_output_is_exact_after_a_crash_at_every_step() {
    let broker = kafka();
    let mut steps = COMMIT_STEPS.to_vec();
    steps.push("kafka-transaction-committed");
    crash_at_every_step(
        "kafka",
        &steps,
        &|_, step| broker.url(&broker.fresh_topic(&format!("crash-{step}"), 1), None),
        &|output, _| {
            let topic = output.rsplit('/').next().unwrap();
            broker.read_committed(topic, 0)
        },
    );
}

/// With captures merging while they wait (the default), the steps interleave with the
/// guest and each crash point falls where timing puts it: each step is armed at its first,
/// second and third occurrence (a run may finish first), and the output must be exact
/// after every one, for a file and an object output.
#[test]
fn coalesced_commits_are_exact_after_a_crash_at_any_step() {
    let case = Case::new();
    let mut steps = COMMIT_STEPS.to_vec();
    steps.extend(["output-part-put", "output-index-put"]);
    for step in steps {
        for nth in 1..=3 {
            for object in [false, true] {
                let name = format!("{step}-{nth}-{object}");
                let output = if object {
                    let dir = case.dir.path().join(format!("out-{name}"));
                    std::fs::create_dir(&dir).unwrap();
                    format!("file://{}", dir.display())
                } else {
                    case.dir
                        .path()
                        .join(format!("out-{name}"))
                        .display()
                        .to_string()
                };
                let store = case.dir.path().join(format!("store-{name}"));
                let args = case.args(&output, &store, true);
                crash_at_or_finish(&args, &format!("{step}:{nth}"), true);
                LoggedRun::spawn(&args).finish();
                let got = if object {
                    run_ok(&[
                        "cat".into(),
                        "--output".into(),
                        output.clone(),
                        "--store".into(),
                        store.display().to_string(),
                    ])
                    .stdout
                } else {
                    std::fs::read(&output).unwrap()
                };
                assert_same_output(&got, &case.expected, &format!("coalesced, crash at {name}"));
                if object {
                    let published = run_ok(&["cat".into(), "--output".into(), output]);
                    assert_same_output(
                        &published.stdout,
                        &case.expected,
                        &format!("published, crash at {name}"),
                    );
                }
            }
        }
    }
}
