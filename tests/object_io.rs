//! Input and output in object storage: a task that fails over between two "machines" that
//! share nothing but S3, for every guest and both stdio programs; a second live writer on
//! another machine; S3 going away mid-run; a directory output through kills; and the bad
//! inputs (a missing, shorter or replaced input object, an output prefix of another task).

mod common;

use std::collections::BTreeSet;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::proxy::Proxy;
use common::*;
use futures::TryStreamExt;
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

/// The names of the objects under `dir` of the S3 prefix `url`.
fn list_names(url: &str, dir: &str) -> Vec<String> {
    let store = s3().object_store(url, None);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let listed: Vec<_> = runtime
        .block_on(store.list(Some(&ObjectPath::from(dir))).try_collect())
        .unwrap();
    listed
        .iter()
        .filter_map(|meta| meta.location.filename().map(str::to_string))
        .collect()
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
            .env_remove("WASNAP_CACHE_DIR")
            .stdin(Stdio::null());
        cmd
    }
}

/// Alternate two machines, killing each run a random delay after it committed, `kills`
/// times; then let machine B finish. After every kill, what is published is a prefix of
/// `expected`, and every run resumed from the newest checkpoint the one before committed.
fn failover(args: &[String], kills: usize, output_url: &str, expected: &[u8], rng: &mut Rng) {
    let machines = [Machine::new(), Machine::new()];
    let mut kill = 0;
    run_with_kills_of(
        |run| machines[run % 2].command(args),
        kills,
        rng,
        || {
            let published = cat(output_url, None);
            assert!(
                expected.starts_with(&published),
                "after kill {kill}: the published output is not a prefix of the expected one"
            );
            kill += 1;
        },
    );
}

/// Where a failover task keeps its input, output and store: one S3 prefix.
struct S3Task {
    input: String,
    output: String,
    store: String,
}

impl S3Task {
    fn new(name: &str, input: &std::path::Path) -> Self {
        let base = s3().fresh_url(name);
        let task = Self {
            input: format!("{base}/in/records.txt"),
            output: format!("{base}/out"),
            store: format!("{base}/store"),
        };
        put_object(&task.input, std::fs::read(input).unwrap());
        task
    }

    fn args(&self, guest: &std::path::Path, every: u64, stdio: bool) -> Vec<String> {
        let mut args = vec![
            "run".to_string(),
            guest.display().to_string(),
            "--input".into(),
            self.input.clone(),
            "--output".into(),
            self.output.clone(),
            "--store".into(),
            self.store.clone(),
            "--quiet".into(),
        ];
        if stdio {
            // Stdio mode checkpoints by input bytes, and always coalesces.
            args.extend([
                "--stdio".into(),
                "--checkpoint-every-bytes".into(),
                every.to_string(),
            ]);
        } else {
            // With an interval, captures coalesce while they wait for S3 (the default's
            // way).
            args.extend([
                "--checkpoint-every".into(),
                every.to_string(),
                "--checkpoint-interval".into(),
                "50ms".into(),
            ]);
        }
        args
    }
}

/// The output of an uninterrupted stdio run of `program` over `input`.
fn stdio_reference(program: &std::path::Path, input: &std::path::Path) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("reference");
    let args: Vec<String> = vec![
        "run".into(),
        "--stdio".into(),
        program.display().to_string(),
        "--input".into(),
        input.display().to_string(),
        "--output".into(),
        output.display().to_string(),
        "--store".into(),
        "memory://".into(),
        "--checkpoint-every-bytes".into(),
        (1u64 << 40).to_string(),
        "--quiet".into(),
    ];
    run_ok(&args);
    std::fs::read(&output).unwrap()
}

/// Fail `guest_name` over between two machines ten times, on S3 input, output and store;
/// `wasnap cat` must then equal an uninterrupted run, with and without the store.
fn s3_failover(guest_name: &str, stdio: bool) {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("input");
    // Long enough for ten kills: a run that waits on S3 commits while its captures
    // coalesce goes through about 20k records before its kill.
    // (A stdio program reads faster still.)
    // The Python and JavaScript components start slower (a compiled-component cache
    // read, ~0.5 s) and run 4-20x slower: fewer records last the ten kills.
    let records = if stdio {
        600_000
    } else if ["component-python", "component-js"].contains(&guest_name) {
        40_000
    } else {
        300_000
    };
    write_input(&input, records, 5000, guest_name == "window");
    let guest = guest(guest_name);
    let expected = if stdio {
        stdio_reference(&guest, &input)
    } else {
        reference_output(&guest, &input)
    };
    let task = S3Task::new(&format!("failover-{guest_name}"), &input);
    let args = task.args(&guest, if stdio { 32 << 10 } else { 500 }, stdio);
    let mut rng = Rng::from_env_or_clock(guest_name);
    failover(&args, 10, &task.output, &expected, &mut rng);
    assert_same_output(&cat(&task.output, Some(&task.store)), &expected, guest_name);
    assert_same_output(&cat(&task.output, None), &expected, guest_name);
}

mod failover_on_s3 {
    use super::s3_failover;

    #[test]
    fn rust_wordcount() {
        s3_failover("wordcount", false);
    }

    #[test]
    fn rust_window() {
        s3_failover("window", false);
    }

    #[test]
    fn wat_globals() {
        s3_failover("wat-globals", false);
    }

    #[test]
    fn c_sessions() {
        s3_failover("c-sessions", false);
    }

    #[test]
    fn c_wordcount() {
        s3_failover("c-wordcount", false);
    }

    #[test]
    fn assemblyscript_inventory() {
        s3_failover("as-inventory", false);
    }

    #[test]
    fn assemblyscript_wordcount() {
        s3_failover("as-wordcount", false);
    }

    #[test]
    fn rust_component() {
        s3_failover("component-rust", false);
    }

    #[test]
    fn python_component() {
        s3_failover("component-python", false);
    }

    #[test]
    fn javascript_component() {
        s3_failover("component-js", false);
    }

    #[test]
    fn rust_stdio_program() {
        s3_failover("stdio-wordfreq", true);
    }

    #[test]
    fn c_stdio_program() {
        s3_failover("stdio-c-wordfreq", true);
    }
}

#[test]
fn a_second_live_writer_on_another_machine_is_fenced_and_never_published() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("input");
    write_input(&input, 150_000, 5000, false);
    let guest = guest("c-wordcount");
    let expected = reference_output(&guest, &input);
    let task = S3Task::new("second-writer", &input);
    let mut args = task.args(&guest, 200, false);
    // Every manifest stays, so every committed writer can be named below.
    args.extend(["--retain".into(), "100000".into()]);
    let (a, b) = (Machine::new(), Machine::new());
    let mut first = a.command(&args).stderr(Stdio::piped()).spawn().unwrap();
    wait_for_generation(&task.store, 3);
    let mut second = b.command(&args).stderr(Stdio::piped()).spawn().unwrap();
    let mut published_while_racing = Vec::new();
    while first.try_wait().unwrap().is_none() || second.try_wait().unwrap().is_none() {
        published_while_racing = cat(&task.output, None);
        assert!(
            expected.starts_with(&published_while_racing),
            "the published output is not a prefix of the expected one while two writers race"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let (first, second) = (
        first.wait_with_output().unwrap(),
        second.wait_with_output().unwrap(),
    );
    // At least one is fenced. Both can be: captures that coalesced skip generations, so
    // two writers' commits need not meet at one name, and each then sees the other's
    // manifest past the last it knew of. Running the command again finishes the task.
    let codes = [first.status.code(), second.status.code()];
    assert!(
        codes.contains(&Some(3)) && codes.iter().all(|c| [Some(0), Some(3)].contains(c)),
        "a writer must be fenced and none fail otherwise: {codes:?}\nA: {}\nB: {}",
        stderr(&first),
        stderr(&second)
    );
    for (run, code) in [(&first, codes[0]), (&second, codes[1])] {
        if code == Some(3) {
            assert!(
                stderr(run).contains("another writer owns this task"),
                "{}",
                stderr(run)
            );
        }
    }
    if codes == [Some(3), Some(3)] {
        let rerun = a.command(&args).output().unwrap();
        assert!(
            rerun.status.success(),
            "the rerun failed: {}",
            stderr(&rerun)
        );
    }
    assert!(
        !published_while_racing.is_empty(),
        "nothing was published while racing"
    );
    assert_same_output(&cat(&task.output, None), &expected, "two writers");
    assert_same_output(
        &cat(&task.output, Some(&task.store)),
        &expected,
        "two writers",
    );

    // Only writers that committed a manifest ever published: the published parts' writers
    // all appear among the manifests'.
    let store = open_store(&task.store);
    let committed: BTreeSet<String> = store
        .generations()
        .unwrap()
        .into_iter()
        .map(|g| wasnap::hex::encode(&store.read_manifest(g).unwrap().writer_id))
        .collect();
    let writer_of = |name: &str| name.rsplit('-').next().unwrap().to_string();
    let published: BTreeSet<String> = list_names(&task.output, "index")
        .iter()
        .map(|n| writer_of(n))
        .collect();
    let written: BTreeSet<String> = list_names(&task.output, "parts")
        .iter()
        .map(|n| writer_of(n))
        .collect();
    assert!(
        published.is_subset(&committed),
        "published by writers that never committed: {:?}",
        published.difference(&committed).collect::<Vec<_>>()
    );
    // The first writer committed before the second started; the second may have created
    // manifests too (and been fenced by its listing after one), and so may a rerun.
    let runs = if codes == [Some(3), Some(3)] { 3 } else { 2 };
    assert!(
        (1..=runs).contains(&committed.len()),
        "writers that committed: {committed:?}"
    );
    assert!(written.is_superset(&published));
}

/// Wait (up to a minute) until the store at `url` has committed generation `generation`.
fn wait_for_generation(url: &str, generation: u64) {
    let started = Instant::now();
    loop {
        let newest = open_store(url).generations().unwrap().last().copied();
        if newest >= Some(generation) {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "generation {generation} was never committed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn s3_going_away_mid_run_stops_the_run_and_loses_nothing_of_input_or_output() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("input");
    write_input(&input, 150_000, 5000, false);
    let guest = guest("wordcount");
    let expected = reference_output(&guest, &input);
    let task = S3Task::new("outage-io", &input);
    let args = task.args(&guest, 200, false);
    let upstream = s3()
        .var("AWS_ENDPOINT")
        .trim_start_matches("http://")
        .parse()
        .unwrap();
    let mut proxy = Proxy::start(upstream, 0);
    let endpoint = proxy.endpoint();
    let via_proxy = |args: &[String]| {
        let mut cmd = wasnap();
        cmd.args(args)
            .env("AWS_ENDPOINT", &endpoint)
            .env("WASNAP_S3_RETRY_SECS", "3")
            .stdin(Stdio::null());
        cmd
    };
    let child = via_proxy(&args).stderr(Stdio::piped()).spawn().unwrap();
    wait_for_generation(&task.store, 3);
    proxy.stop();
    let out = child.wait_with_output().unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("wasnap: error:") && err.contains("unavailable"),
        "unclear error: {err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    // Unreachable at the start too: a clear error, nothing touched.
    let out = via_proxy(&args).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("unavailable"), "{}", stderr(&out));
    // What was committed and published before the outage is intact.
    let published = cat(&task.output, None);
    assert!(!published.is_empty() && expected.starts_with(&published));

    proxy.restart();
    let out = via_proxy(&args).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_same_output(&cat(&task.output, None), &expected, "outage");
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
    run_with_kills(&args, 10, &mut rng, || {
        // Whatever is published is a prefix of the reference, and whatever the newest
        // checkpoint committed is there to read.
        let published = cat(&output_url, None);
        assert!(
            expected.starts_with(&published),
            "published output is not a prefix"
        );
        if newest_marker(&store).is_some() {
            let committed = cat(&output_url, Some(&store));
            assert!(expected.starts_with(&committed) && committed.len() >= published.len());
        }
    });
    assert_same_output(&cat(&output_url, Some(&store)), &expected, "c-wordcount");
    assert_same_output(&cat(&output_url, None), &expected, "c-wordcount");
    // Small parts were merged: far fewer published than checkpoints (the small parts'
    // bytes stay for readers until they are old).
    let published = std::fs::read_dir(output.join("index")).unwrap().count();
    let checkpoints = 300_000 / 200;
    assert!(
        published < checkpoints / 4,
        "{published} parts published for {checkpoints} checkpoints"
    );
}

#[test]
fn a_missing_shorter_or_replaced_input_object_is_a_clear_error() {
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
    let before = std::fs::read(&out_file).unwrap();
    assert!(!before.is_empty());
    for (replacement, says) in [
        (&b"a b\n"[..], "has consumed 12"),
        (
            &b"another input altogether\n"[..],
            "was replaced since the checkpoint",
        ),
    ] {
        put_object(&input_url, replacement.to_vec());
        let refused = run(&args);
        assert_eq!(refused.status.code(), Some(1));
        assert!(stderr(&refused).contains(says), "{}", stderr(&refused));
        assert_eq!(std::fs::read(&out_file).unwrap(), before, "nothing touched");
    }
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
    // And the first task's store and output still agree.
    assert_eq!(cat(&output_url, Some(&first)), published);
}

#[test]
fn cat_reads_a_file_output_up_to_the_newest_checkpoint() {
    let guest = guest("c-wordcount");
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("input");
    write_input(&input, 1000, 50, false);
    let output = dir.path().join("out");
    let store = dir.path().join("store").display().to_string();
    run_ok(&run_args(&guest, &input, &output, &store, 100));
    let committed = std::fs::read(&output).unwrap();
    let output_arg = output.display().to_string();
    assert_eq!(cat(&output_arg, Some(&store)), committed);
    // Bytes past the newest checkpoint's marker (a live run's) are not committed output.
    let mut longer = committed.clone();
    longer.extend_from_slice(b"not yet committed\n");
    std::fs::write(&output, &longer).unwrap();
    assert_eq!(cat(&output_arg, Some(&store)), committed);
    assert_eq!(cat(&output_arg, None), longer);
}
