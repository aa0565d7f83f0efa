//! Input and output in object storage: a directory output and an S3 output through kills,
//! a task that fails over between two "machines" that share nothing but S3, and the bad
//! inputs (a missing or replaced input object, an output prefix of another task).

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use object_store::ObjectStoreExt;
use object_store::path::Path as ObjectPath;

fn cat(output: &str, store: Option<&str>) -> Vec<u8> {
    let mut args = vec!["cat".to_string(), "--output".into(), output.into()];
    if let Some(store) = store {
        args.extend(["--store".into(), store.into()]);
    }
    run_ok(&args).stdout
}

fn put_object(url: &str, bytes: Vec<u8>) {
    let (bucket, key) = url.strip_prefix("s3://").unwrap().split_once('/').unwrap();
    let store = s3().object_store(&format!("s3://{bucket}"), None);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime
        .block_on(store.put(&ObjectPath::from(key), bytes.into()))
        .unwrap();
}

/// A machine: its own working directory, HOME and cache, nothing shared but S3.
struct Machine {
    dir: tempfile::TempDir,
}

impl Machine {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn command(&self, args: &[String]) -> std::process::Command {
        let mut cmd = wasnap();
        cmd.args(args)
            .current_dir(self.dir.path())
            .env("HOME", self.dir.path())
            .env("XDG_CACHE_HOME", self.dir.path().join("cache"))
            .stdin(Stdio::null());
        cmd
    }
}

/// Alternate two machines, killing each run after a random delay, `kills` times; then
/// let machine B finish.
fn failover(args: &[String], kills: usize, rng: &mut Rng) {
    let machines = [Machine::new(), Machine::new()];
    let deadline = Instant::now() + Duration::from_secs(300);
    for kill in 0..kills {
        assert!(Instant::now() < deadline, "failover loop took too long");
        let machine = &machines[kill % 2];
        let mut child = machine
            .command(args)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let delay = Duration::from_millis(100 + rng.below(600));
        let started = Instant::now();
        while started.elapsed() < delay {
            if let Some(status) = child.try_wait().unwrap() {
                let out = child.wait_with_output().unwrap();
                assert!(status.success(), "a run failed: {}", stderr(&out));
                panic!("the run finished after {kill} kills; make the input longer");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        child.kill().unwrap();
        child.wait().unwrap();
    }
    let out = machines[1].command(args).output().unwrap();
    assert!(
        out.status.success(),
        "the last run failed: {}",
        stderr(&out)
    );
}

fn s3_failover(guest_name: &str) {
    let s3 = s3();
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("input");
    write_input(&input, 200_000, 5000, false);
    let guest = guest(guest_name);
    let expected = reference_output(&guest, &input);
    let base = s3.fresh_url(&format!("failover-{guest_name}"));
    let (input_url, output_url, store_url) = (
        format!("{base}/in/records.txt"),
        format!("{base}/out"),
        format!("{base}/store"),
    );
    put_object(&input_url, std::fs::read(&input).unwrap());
    let args = vec![
        "run".to_string(),
        guest.display().to_string(),
        "--input".into(),
        input_url,
        "--output".into(),
        output_url.clone(),
        "--store".into(),
        store_url.clone(),
        "--quiet".into(),
        "--checkpoint-every".into(),
        "500".into(),
    ];
    let mut rng = Rng::from_env_or_clock(guest_name);
    failover(&args, 10, &mut rng);
    assert_same_output(&cat(&output_url, Some(&store_url)), &expected, guest_name);
    assert_same_output(&cat(&output_url, None), &expected, guest_name);
}

#[test]
fn failover_on_s3_c_wordcount() {
    s3_failover("c-wordcount");
}

#[test]
fn failover_on_s3_wat_globals() {
    s3_failover("wat-globals");
}

#[test]
fn a_directory_output_survives_kills_and_cat_reads_it() {
    let guest = guest("c-wordcount");
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("input");
    write_input(&input, 300_000, 5000, false);
    let expected = reference_output(&guest, &input);
    let output = dir.path().join("out");
    let output_url = format!("file://{}", output.display());
    let store = dir.path().join("store").display().to_string();
    let mut args = run_args(
        &guest,
        &input,
        std::path::Path::new(&output_url),
        &store,
        200,
    );
    args.extend([
        "--cache-dir".into(),
        dir.path().join("cache").display().to_string(),
    ]);
    let mut rng = Rng::from_env_or_clock("directory output");
    let window = (Duration::from_millis(20), Duration::from_millis(250));
    run_with_kills(&args, 10, window, &mut rng, || {
        // Whatever is published is a prefix of the reference.
        let published = cat(&output_url, None);
        assert!(
            expected.starts_with(&published),
            "published output is not a prefix"
        );
    });
    assert_same_output(&cat(&output_url, Some(&store)), &expected, "c-wordcount");
    assert_same_output(&cat(&output_url, None), &expected, "c-wordcount");
    // Small parts were merged: fewer parts than checkpoints.
    let parts = std::fs::read_dir(output.join("parts")).unwrap().count();
    let checkpoints = 300_000 / 200;
    assert!(
        parts < checkpoints / 4,
        "{parts} parts for {checkpoints} checkpoints"
    );
}

#[test]
fn a_missing_or_replaced_input_object_is_a_clear_error() {
    let s3 = s3();
    let base = s3.fresh_url("bad-input");
    let guest = guest("c-wordcount");
    let input_url = format!("{base}/in.txt");
    let output = tempfile::tempdir().unwrap();
    let out_file = output.path().join("out");
    let store = format!("{base}/store");
    let args = run_args(
        &guest,
        std::path::Path::new(&input_url),
        &out_file,
        &store,
        2,
    );
    let missing = run(&args);
    assert_eq!(missing.status.code(), Some(1));
    assert!(
        stderr(&missing).contains("does not exist"),
        "{}",
        stderr(&missing)
    );

    put_object(&input_url, b"a b\nc d\ne f\n".to_vec());
    run_ok(&args);
    assert!(!std::fs::read(&out_file).unwrap().is_empty());
    put_object(&input_url, b"another input altogether\n".to_vec());
    let before = std::fs::read(&out_file).unwrap();
    let replaced = run(&args);
    assert_eq!(replaced.status.code(), Some(1));
    assert!(
        stderr(&replaced).contains("replaced") || stderr(&replaced).contains("truncated"),
        "{}",
        stderr(&replaced)
    );
    assert_eq!(std::fs::read(&out_file).unwrap(), before, "nothing touched");
}

#[test]
fn an_output_prefix_of_another_task_is_refused() {
    let guest = guest("c-wordcount");
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("input");
    write_input(&input, 1000, 50, false);
    let output_url = format!("file://{}", dir.path().join("out").display());
    let output = std::path::Path::new(&output_url);
    let first = dir.path().join("store1").display().to_string();
    run_ok(&run_args(&guest, &input, output, &first, 100));
    let published = cat(&output_url, None);
    let second = dir.path().join("store2").display().to_string();
    let refused = run(&run_args(&guest, &input, output, &second, 100));
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        stderr(&refused).contains("another task"),
        "{}",
        stderr(&refused)
    );
    assert_eq!(cat(&output_url, None), published, "nothing touched");
}
