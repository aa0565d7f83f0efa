//! The same guarantees against a real S3 server (moto, started by the project's scripts):
//! crash recovery, fencing of a second writer, commit races, and S3 going away.

mod common;

use std::process::Stdio;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::proxy::Proxy;
use common::*;
use wasnap::error::Fenced;
use wasnap::state::GlobalValue;
use wasnap::store::manifest::{Manifest, MemoryManifest, PackRef, Run};
use wasnap::store::pack_name;

/// An S3 store beside a local input and output. Every other guest runs on an S3 store
/// (with S3 input and output, failing over between two machines) in `object_io.rs`, and
/// on a local store in `crash.rs`: the store is the same code whatever the guest.
#[test]
fn rust_wordcount_survives_kill_9_on_s3() {
    crash_test_on(
        "wordcount",
        120_000,
        false,
        200,
        &s3().fresh_url("crash-wordcount"),
    );
}

/// A manifest of `pages` scattered pages whose entries do not compress much.
fn big_manifest(generation: u64, writer_id: [u8; 16], pages: u32, rng: &mut Rng) -> Manifest {
    let mut next_page = 0u32;
    let runs: Vec<Run> = (0..pages)
        .map(|_| {
            let first_page = next_page + (rng.below(1000) as u32);
            next_page = first_page + 1;
            Run {
                first_page,
                pages: 1,
                pack: 0,
                first_frame: rng.below(u64::from(u32::MAX - 1)) as u32,
            }
        })
        .collect();
    Manifest {
        generation,
        writer_id,
        module_sha256: [1; 32],
        input_offset: rng.next(),
        output_marker: rng.next(),
        input_position: vec![],
        output_position: vec![],
        random_seed: 0,
        random_position: 0,
        created_unix_ms: 0,
        run_state: wasnap::store::manifest::RunState::Records,
        packs: vec![PackRef {
            generation,
            writer_id,
            frames: u32::MAX,
            bytes: 1 << 40,
        }],
        globals: vec![GlobalValue::I32(rng.next() as i32)],
        memories: vec![MemoryManifest {
            byte_len: (u64::from(next_page) + 1) << 16,
            digest: rng.next(),
            layers: vec![runs],
        }],
        host_state: vec![],
        kv_runs: vec![],
    }
}

#[test]
fn sixteen_racing_writers_one_winner_every_round() {
    const WRITERS: usize = 16;
    const ROUNDS: u64 = 20;
    let url = s3().fresh_url("race");
    let mut seed_rng = Rng::from_env_or_clock("race");
    for round in 1..=ROUNDS {
        // Every fifth round: manifests and packs over 5 MB, where stock moto let two win.
        let big = round % 5 == 0;
        let pages = if big { 1_100_000 } else { 100 };
        let pack_bytes = if big { 6 << 20 } else { 1000 };
        let barrier = Arc::new(Barrier::new(WRITERS));
        let results: Vec<(u8, anyhow::Result<usize>, usize)> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..WRITERS)
                .map(|w| {
                    let (barrier, url) = (barrier.clone(), url.clone());
                    let mut rng = Rng::new(seed_rng.next());
                    scope.spawn(move || {
                        let store = open_store(&url);
                        let writer_id = [w as u8; 16];
                        let manifest = big_manifest(round, writer_id, pages, &mut rng);
                        let size = manifest.encode().unwrap().len();
                        store
                            .put_pack(
                                &pack_name(round, &writer_id),
                                vec![w as u8; pack_bytes].into(),
                            )
                            .unwrap();
                        barrier.wait();
                        (
                            w as u8,
                            store.commit_manifest(&manifest, round - 1).map(|c| c.bytes),
                            size,
                        )
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let winners: Vec<u8> = results
            .iter()
            .filter(|(_, r, _)| r.is_ok())
            .map(|(w, _, _)| *w)
            .collect();
        assert_eq!(winners.len(), 1, "round {round}: winners {winners:?}");
        for (_, result, _) in results.iter().filter(|(_, r, _)| r.is_err()) {
            let err = result.as_ref().unwrap_err();
            assert!(
                err.downcast_ref::<Fenced>().is_some(),
                "round {round}: a loser failed otherwise: {err:#}"
            );
        }
        if big {
            assert!(
                results.iter().all(|(_, _, size)| *size > 5 << 20),
                "round {round}: manifests are not over 5 MB"
            );
        }
        // What the store holds is the winner's manifest, whole.
        let stored = open_store(&url).read_manifest(round).unwrap();
        assert_eq!(stored.writer_id, [winners[0]; 16], "round {round}");
        assert_eq!(stored.stored_pages(), pages as usize);
    }
}

#[test]
fn a_second_run_on_a_live_task_is_fenced_and_a_third_finishes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    write_input(&input, 400_000, 5000, false);
    let reference = reference_output(&guest("wordcount"), &input);

    let url = s3().fresh_url("two-writers");
    let output = dir.path().join("out");
    let args = run_args(&guest("wordcount"), &input, &output, &url, 200);
    let mut first = wasnap()
        .args(&args)
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the first writer has committed, then start a second on the same task.
    wait_for_a_commit(&url, "the first writer never committed");
    let second = run(&args);
    assert_eq!(
        second.status.code(),
        Some(3),
        "second writer: {}",
        stderr(&second)
    );
    assert!(
        stderr(&second).contains("another writer owns this task"),
        "{}",
        stderr(&second)
    );
    assert!(
        first.try_wait().unwrap().is_none(),
        "the first writer should still be running"
    );
    first.kill().unwrap();
    first.wait().unwrap();

    // The third finishes with captures merging while they wait for S3 (the default's
    // way): the same task under another policy, and far fewer commits to the test server
    // than one per 200 records of the 400 000.
    run_ok(&coalescing_run_args(
        &guest("wordcount"),
        &input,
        &output,
        &url,
        200,
    ));
    assert_same_output(&std::fs::read(&output).unwrap(), &reference, "two writers");
}

/// Wait (up to a minute) until the store at `url` holds a committed checkpoint.
fn wait_for_a_commit(url: &str, what: &str) {
    let started = Instant::now();
    while newest_marker(url).is_none() {
        assert!(started.elapsed() < Duration::from_secs(60), "{what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Run `args` with the S3 endpoint replaced by `endpoint`.
fn wasnap_via(endpoint: &str, args: &[String]) -> std::process::Command {
    let mut cmd = wasnap();
    cmd.args(args)
        .env("AWS_ENDPOINT", endpoint)
        .env("WASNAP_S3_RETRY_SECS", "3")
        .stdin(Stdio::null());
    cmd
}

fn upstream() -> std::net::SocketAddr {
    s3().var("AWS_ENDPOINT")
        .trim_start_matches("http://")
        .parse()
        .unwrap()
}

#[test]
fn s3_going_away_stops_the_run_cleanly_and_nothing_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    write_input(&input, 300_000, 5000, false);
    let reference = reference_output(&guest("wordcount"), &input);

    let url = s3().fresh_url("outage");
    let output = dir.path().join("out");
    let args = run_args(&guest("wordcount"), &input, &output, &url, 200);
    let mut proxy = Proxy::start(upstream(), 0);
    let child = wasnap_via(&proxy.endpoint(), &args)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_a_commit(&url, "no checkpoint before the outage");
    proxy.stop();
    let out = child.wait_with_output().unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("wasnap: error:") && err.contains("store"),
        "unclear error: {err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    // What was committed before the outage is intact.
    assert_committed_prefix(&output, &url, &reference);

    proxy.restart();
    // Finished with captures merging (the default's way): far fewer commits to the test
    // server than one per 200 records.
    let finish = coalescing_run_args(&guest("wordcount"), &input, &output, &url, 200);
    let out = wasnap_via(&proxy.endpoint(), &finish).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_same_output(&std::fs::read(&output).unwrap(), &reference, "outage");
}

#[test]
fn transient_s3_errors_are_retried_inside_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    write_input(&input, 20_000, 500, false);
    let reference = reference_output(&guest("wordcount"), &input);

    let proxy = Proxy::start(upstream(), 2); // every other new connection: 503
    let url = s3().fresh_url("flaky");
    let output = dir.path().join("out");
    let out = wasnap_via(
        &proxy.endpoint(),
        &run_args(&guest("wordcount"), &input, &output, &url, 500),
    )
    .output()
    .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        proxy.faults.load(std::sync::atomic::Ordering::SeqCst) >= 1,
        "no fault was injected"
    );
    assert_same_output(&std::fs::read(&output).unwrap(), &reference, "flaky");
    // 20 000 records, a checkpoint every 500: 40 commits, of which retention keeps 3.
    assert_eq!(open_store(&url).generations().unwrap(), vec![38, 39, 40]);
}

#[test]
fn credentials_never_appear_in_errors_or_logs() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    write_input(&input, 100, 50, false);
    let secret = "wasnap-Very-Secret-Key-0123456789";
    // Nothing listens on the endpoint: every request fails, and is retried, and logged.
    let unused = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let out = wasnap()
        .args(run_args(
            &guest("wordcount"),
            &input,
            &dir.path().join("out"),
            "s3://wasnap/creds",
            10,
        ))
        .env("AWS_ENDPOINT", format!("http://{unused}"))
        .env("AWS_SECRET_ACCESS_KEY", secret)
        .env("WASNAP_S3_RETRY_SECS", "1")
        .env("WASNAP_LOG", "trace")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let (err, outp) = (
        stderr(&out),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    );
    assert!(err.contains("wasnap: error:"), "{err}");
    assert!(
        !err.contains(secret) && !outp.contains(secret),
        "the secret key leaked: {err}"
    );

    let out = run(&run_args(
        &guest("wordcount"),
        &input,
        &dir.path().join("out"),
        "s3:///nobucket",
        10,
    ));
    assert!(stderr(&out).contains("no bucket"), "{}", stderr(&out));
}

/// A misconfigured S3 setup gets one line that says which of the run's URLs failed (the
/// input, the output or the store), names the cause once, and says what to set.
#[test]
fn s3_errors_name_what_failed_and_the_setting_to_fix() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    write_input(&input, 100, 50, false);
    let url = s3().fresh_url("hints");
    let wordcount = guest("wordcount");
    let local_out = dir.path().join("out");
    let expect = |out: &std::process::Output, starts: &str, hint: &str| {
        let err = stderr(out);
        assert_eq!(out.status.code(), Some(1), "{err}");
        let line = err
            .lines()
            .find(|l| l.starts_with("wasnap: error: "))
            .unwrap_or_else(|| panic!("no error line: {err}"));
        assert!(line.starts_with(starts), "{line}");
        assert!(line.ends_with(hint), "{line}");
        // object_store's errors hold their sources' text: each is said once.
        for cause in ["URL scheme is not allowed", "builder error", "NoSuchBucket"] {
            assert!(line.matches(cause).count() <= 1, "{line}");
        }
    };
    let no_http = "(the S3 endpoint is http://: set AWS_ALLOW_HTTP=true to allow it)";
    // The store, the input and the output over http:// without AWS_ALLOW_HTTP.
    let store_args = run_args(&wordcount, &input, &local_out, &url, 10);
    let out = wasnap()
        .args(&store_args)
        .env_remove("AWS_ALLOW_HTTP")
        .output()
        .unwrap();
    expect(
        &out,
        &format!("wasnap: error: store {url} is unavailable"),
        no_http,
    );
    let object = format!("{url}/input.txt");
    let local_store = dir.path().join("store");
    let mut input_args = run_args(
        &wordcount,
        &input,
        &local_out,
        local_store.to_str().unwrap(),
        10,
    );
    input_args[3] = object.clone();
    let out = wasnap()
        .args(&input_args)
        .env_remove("AWS_ALLOW_HTTP")
        .output()
        .unwrap();
    expect(
        &out,
        &format!("wasnap: error: input {object} is unavailable"),
        no_http,
    );
    let mut output_args = run_args(
        &wordcount,
        &input,
        &local_out,
        local_store.to_str().unwrap(),
        10,
    );
    output_args[5] = format!("{url}/output/");
    let out = wasnap()
        .args(&output_args)
        .env_remove("AWS_ALLOW_HTTP")
        .output()
        .unwrap();
    expect(
        &out,
        &format!("wasnap: error: output {url}/output/ is unavailable"),
        no_http,
    );
    // A bucket that does not exist.
    let out = run(&run_args(
        &wordcount,
        &input,
        &local_out,
        "s3://no-such-bucket-here/x",
        10,
    ));
    expect(
        &out,
        "wasnap: error: store s3://no-such-bucket-here/x is unavailable",
        "(the bucket does not exist: create it, or name another in the URL)",
    );
    // No endpoint at all: a warning first, before any request (this URL names no bucket,
    // so none is made: the test never talks to AWS itself).
    let out = wasnap()
        .args(["inspect", "--store", "s3:///x"])
        .env_remove("AWS_ENDPOINT")
        .output()
        .unwrap();
    assert!(stderr(&out).contains("no bucket"), "{}", stderr(&out));
    assert!(
        stderr(&out).starts_with(
            "wasnap: warning: s3:///x: AWS_ENDPOINT is not set, so S3 requests go to AWS itself"
        ),
        "{}",
        stderr(&out)
    );
}

#[test]
fn inspect_reads_an_s3_store_pruned_to_the_kept_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    write_input(&input, 1000, 50, false);
    let url = s3().fresh_url("inspect");
    run_ok(&run_args(
        &guest("wordcount"),
        &input,
        &dir.path().join("out"),
        &url,
        250,
    ));
    let out = wasnap()
        .args(["inspect", "--store", &url])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", stderr(&out));
    // 1000 records, a checkpoint every 250: generations 1..=4, of which the newest 3 are
    // kept, listed newest first.
    let generations: Vec<&str> = text
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next())
        .filter(|first| first.parse::<u64>().is_ok())
        .collect();
    assert_eq!(generations, ["4", "3", "2"], "{text}");
    assert!(text.contains("3 checkpoints, generations 2 to 4"), "{text}");
    // Pruning on S3: checkpoint 1's manifest is gone, and its pack exists exactly when a
    // kept checkpoint still needs one of its pages.
    let store = open_store(&url);
    assert_eq!(
        store.object_size(&wasnap::store::manifest_path(1)).unwrap(),
        None
    );
    let writer = store.read_manifest(4).unwrap().writer_id;
    let pack_1 = wasnap::store::pack_path(&wasnap::store::pack_name(1, &writer));
    let pack_1_needed = (2..=4).any(|g| {
        store
            .read_manifest(g)
            .unwrap()
            .packs
            .iter()
            .any(|p| p.generation == 1)
    });
    assert_eq!(store.object_size(&pack_1).unwrap().is_some(), pack_1_needed);
}
