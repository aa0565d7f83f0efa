//! Helpers shared by the integration tests: the guests (built from source by the
//! project's script), inputs, and running the real `wasnap` binary.
#![allow(dead_code)]

pub mod faulty;
pub mod kafka;
pub mod proxy;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use wasnap::store::CheckpointStore;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Build every guest with `scripts/build-guests.sh` (once per test binary) and return
/// the path of the one named `name` (`wordcount`, `window`, `wat-globals`, …).
pub fn guest(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let status = Command::new(root().join("scripts/build-guests.sh"))
            .status()
            .expect("run scripts/build-guests.sh");
        assert!(
            status.success(),
            "scripts/build-guests.sh failed (run scripts/setup.sh first?)"
        );
    });
    let path = root().join("target/guests").join(format!("{name}.wasm"));
    assert!(
        path.exists(),
        "guest {name} was not built at {}",
        path.display()
    );
    path
}

/// The `wasnap` binary, with the test S3 server's settings if one was started.
pub fn wasnap() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_wasnap"));
    // Compiled components (a Python processor takes 15-30 s to compile) are shared by
    // every test run, whatever cache directory a test gives wasnap otherwise.
    cmd.env(
        "WASNAP_COMPONENT_CACHE",
        root().join("target/component-cache"),
    );
    if let Some(s3) = S3.get() {
        cmd.envs(s3.env.iter().map(|(k, v)| (k, v)));
    }
    cmd
}

/// The test S3 server: the one named by the environment (scripts/test.sh starts one), or
/// else one started for this test binary, which exits when the binary does.
pub struct S3Server {
    pub env: Vec<(String, String)>,
}

static S3: OnceLock<S3Server> = OnceLock::new();

pub fn s3() -> &'static S3Server {
    S3.get_or_init(|| {
        const KEYS: [&str; 6] = [
            "AWS_ENDPOINT",
            "AWS_ALLOW_HTTP",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_REGION",
            "WASNAP_TEST_S3_BUCKET",
        ];
        if KEYS.iter().all(|k| std::env::var(k).is_ok()) {
            return S3Server {
                env: KEYS
                    .iter()
                    .map(|k| (k.to_string(), std::env::var(k).unwrap()))
                    .collect(),
            };
        }
        let out = Command::new(root().join("scripts/s3-server.sh"))
            .args(["start", "--parent-pid", &std::process::id().to_string()])
            .stderr(Stdio::inherit())
            .output()
            .expect("run scripts/s3-server.sh");
        assert!(out.status.success(), "scripts/s3-server.sh start failed");
        let env = String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .filter_map(|l| l.strip_prefix("export ")?.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        S3Server { env }
    })
}

impl S3Server {
    pub fn var(&self, key: &str) -> &str {
        self.env
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .unwrap_or_else(|| panic!("{key} not set"))
    }

    /// A store URL no other test uses: a prefix in a bucket of its own, made now. (moto
    /// scans a whole bucket for every listing: one bucket for all tests would make every
    /// test's listings as slow as the sum of all tests' objects.)
    pub fn fresh_url(&self, test: &str) -> String {
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name: String = test
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '-'
                }
            })
            .take(40)
            .collect();
        let bucket = format!("t-{name}-{}-{n}", std::process::id());
        self.create_bucket(&bucket);
        format!("s3://{bucket}/{test}")
    }

    /// Create a bucket on the test server (moto takes an unsigned request).
    pub fn create_bucket(&self, bucket: &str) {
        use std::io::{Read, Write};
        let endpoint = self.var("AWS_ENDPOINT");
        let host = endpoint
            .strip_prefix("http://")
            .expect("the test server speaks http");
        let mut stream = std::net::TcpStream::connect(host).expect("reach the test S3 server");
        write!(
            stream,
            "PUT /{bucket} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut reply = String::new();
        stream.read_to_string(&mut reply).unwrap();
        assert!(
            reply.starts_with("HTTP/1.1 200") || reply.starts_with("HTTP/1.0 200"),
            "cannot create bucket {bucket}: {reply}"
        );
    }

    /// An S3 object store for `url`, built from this server's settings (not the process
    /// environment, which tests do not change).
    pub fn object_store(
        &self,
        url: &str,
        endpoint: Option<&str>,
    ) -> std::sync::Arc<dyn object_store::ObjectStore> {
        let rest = url.strip_prefix("s3://").unwrap();
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let s3 = object_store::aws::AmazonS3Builder::new()
            .with_endpoint(endpoint.unwrap_or(self.var("AWS_ENDPOINT")))
            .with_allow_http(true)
            .with_access_key_id(self.var("AWS_ACCESS_KEY_ID"))
            .with_secret_access_key(self.var("AWS_SECRET_ACCESS_KEY"))
            .with_region(self.var("AWS_REGION"))
            .with_bucket_name(bucket)
            .build()
            .unwrap();
        std::sync::Arc::new(object_store::prefix::PrefixStore::new(s3, prefix))
    }
}

/// Open a store URL in this process: S3 through the test server, anything else as the CLI would.
pub fn open_store(url: &str) -> CheckpointStore {
    if url.starts_with("s3://") {
        CheckpointStore::from_object_store(s3().object_store(url, None), url).unwrap()
    } else {
        CheckpointStore::open(url).unwrap()
    }
}

/// A small deterministic generator (xorshift), so inputs and kill times can be reproduced from a seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// A seed from the clock, printed so a failing run can be repeated with `WASNAP_TEST_SEED`.
    pub fn from_env_or_clock(what: &str) -> Self {
        let seed = std::env::var("WASNAP_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
            });
        eprintln!("{what}: WASNAP_TEST_SEED={seed}");
        Self::new(seed)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// `records` lines for the component processors' emit targets (`guests/components`): a
/// line `#to 1 …` goes to target 1, `#to 2 …` to target 2, words to target 0. Written to
/// `path`, and returned.
pub fn write_emit_targets_input(path: &Path, records: usize) -> String {
    let mut text = String::new();
    for i in 0..records {
        match i % 7 {
            3 => text.push_str(&format!("#to 1 one-{i}\n")),
            5 if i % 2 == 1 => text.push_str(&format!("#to 2 two-{i}\n")),
            _ => text.push_str(&format!("w{} w{}\n", i % 13, i % 5)),
        }
    }
    std::fs::write(path, &text).unwrap();
    text
}

/// `records` lines of words drawn from a vocabulary of `vocabulary` words, or of integers
/// when `numbers` is set.
pub fn write_input(path: &Path, records: usize, vocabulary: u64, numbers: bool) {
    let mut rng = Rng::new(42);
    let mut text = String::new();
    for _ in 0..records {
        if numbers {
            text.push_str(&(rng.below(1_000_000) as i64 - 500_000).to_string());
        } else {
            let words = 1 + rng.below(8);
            for w in 0..words {
                if w > 0 {
                    text.push(' ');
                }
                text.push_str(&format!("w{}", rng.below(vocabulary)));
            }
        }
        text.push('\n');
    }
    std::fs::write(path, text).unwrap();
}

/// The output of one uninterrupted run of `guest` over `input`, checkpointing only at the
/// end: what every interrupted run must reproduce byte for byte.
pub fn reference_output(guest: &Path, input: &Path) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("reference");
    run_ok(&run_args(guest, input, &output, "memory://", 1 << 40));
    std::fs::read(&output).unwrap()
}

/// Arguments of `wasnap run` checkpointing every `every` records, each checkpoint its own
/// commit (`--no-coalesce`): the policy of the tests that count commits or name
/// generations.
pub fn run_args(guest: &Path, input: &Path, output: &Path, store: &str, every: u64) -> Vec<String> {
    let mut args = coalescing_run_args(guest, input, output, store, every);
    args.push("--no-coalesce".into());
    args
}

/// Arguments of `wasnap run` checkpointing every `every` records, captures the store
/// cannot keep up with merging into one commit (as by default).
pub fn coalescing_run_args(
    guest: &Path,
    input: &Path,
    output: &Path,
    store: &str,
    every: u64,
) -> Vec<String> {
    vec![
        "run".into(),
        guest.display().to_string(),
        "--input".into(),
        input.display().to_string(),
        "--output".into(),
        output.display().to_string(),
        "--store".into(),
        store.into(),
        "--checkpoint-every".into(),
        every.to_string(),
        "--quiet".into(),
    ]
}

/// Run `wasnap` with `args` to completion.
pub fn run(args: &[String]) -> Output {
    wasnap()
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("spawn wasnap")
}

pub fn run_ok(args: &[String]) -> Output {
    let out = run(args);
    assert!(
        out.status.success(),
        "wasnap {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// What one run said on stderr about its checkpoints (with [`CHECKPOINT_LOG`]).
#[derive(Debug, Default)]
pub struct RunLog {
    /// The generation it first restored, at its start (`None`: a fresh start).
    pub resumed_from: Option<u64>,
    /// The newest generation it reported committed (0: none), and how many commits.
    pub committed: u64,
    pub commits: u64,
    /// Everything it printed, for failure messages.
    pub text: String,
    /// How it ended (once it has).
    pub status: std::process::ExitStatus,
}

impl RunLog {
    fn read(&mut self, line: &str) {
        let generation = || {
            line.split_whitespace()
                .find_map(|field| field.strip_prefix("generation="))
                .and_then(|g| g.parse::<u64>().ok())
        };
        if line.contains("checkpoint committed") {
            self.committed = self.committed.max(generation().unwrap_or(0));
            self.commits += 1;
        } else if line.contains(" restored ") || line.contains(": restored") {
            // The process's resume is its first restore: a run that skips a poison record
            // restores again, from a checkpoint it committed itself.
            self.resumed_from = self.resumed_from.or_else(generation);
        }
        self.text.push_str(line);
        self.text.push('\n');
    }
}

/// The log filter that makes a run say what it restored and what it committed.
pub const CHECKPOINT_LOG: &str =
    "error,wasnap=warn,wasnap::task::committer=debug,wasnap::task::recovery=debug";

/// A run of `wasnap` whose stderr is read line by line as it comes.
pub struct LoggedRun {
    pub child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    pub log: RunLog,
}

impl LoggedRun {
    pub fn spawn(args: &[String]) -> Self {
        let mut command = wasnap();
        command.args(args);
        Self::start(command)
    }

    /// Start `command` (a `wasnap` command line) with its checkpoints logged.
    pub fn start(mut command: Command) -> Self {
        let mut child = command
            .env("WASNAP_LOG", CHECKPOINT_LOG)
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn wasnap");
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            lines,
            log: RunLog::default(),
        }
    }

    /// Read what the run printed, for up to `wait`; `false` once its stderr is closed.
    fn pump(&mut self, wait: Duration) -> bool {
        match self.lines.recv_timeout(wait) {
            Ok(line) => {
                self.log.read(&line);
                while let Ok(line) = self.lines.try_recv() {
                    self.log.read(&line);
                }
                true
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => true,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => false,
        }
    }

    /// Wait until the run reports a commit (`true`) or ends (`false`).
    pub fn wait_for_commit(&mut self, deadline: Instant) -> bool {
        self.wait_for_commits(1, deadline)
    }

    /// Wait until the run reports `n` commits (`true`) or ends (`false`).
    pub fn wait_for_commits(&mut self, n: u64, deadline: Instant) -> bool {
        while self.log.commits < n {
            assert!(
                Instant::now() < deadline,
                "no checkpoint committed in time:\n{}",
                self.log.text
            );
            if !self.pump(Duration::from_millis(20)) {
                return false;
            }
        }
        true
    }

    /// Kill the run with SIGKILL and read the rest of what it printed.
    pub fn kill(&mut self) {
        self.child.kill().unwrap(); // SIGKILL
        self.child.wait().unwrap();
        while self.pump(Duration::from_secs(5)) {}
    }

    /// Let the run finish; it must succeed.
    pub fn finish(self) -> RunLog {
        let log = self.finish_any();
        assert!(log.status.success(), "wasnap failed:\n{}", log.text);
        log
    }

    /// Let the run finish, however it ends.
    pub fn finish_any(mut self) -> RunLog {
        while self.pump(Duration::from_secs(1)) {}
        self.log.status = self.child.wait().unwrap();
        self.log
    }
}

/// How long after the commit it waited for a run is killed: a random delay in this range.
/// Short, since commits come every few milliseconds: a kill lands anywhere in the protocol
/// of the commits that follow, and a run consumes little input before it.
const KILL_DELAY: (Duration, Duration) = (Duration::ZERO, Duration::from_millis(20));

/// Run `args` again and again, each run killed with SIGKILL after it reported its first
/// commit, or its second, plus a random [`KILL_DELAY`], until `kills` runs have been
/// killed; then let the last run finish. `after_kill` checks invariants with the process
/// gone. Fails unless every run after a kill resumed from a checkpoint at least as new as
/// the newest its predecessor reported committed (a reported commit is durable) and newer
/// than the one its predecessor resumed from (every kill came after progress was made).
/// Returns the number of such resumes, which is `kills`.
pub fn run_with_kills(
    args: &[String],
    kills: usize,
    rng: &mut Rng,
    after_kill: impl FnMut(),
) -> usize {
    run_with_kills_of(
        |_| {
            let mut command = wasnap();
            command.args(args);
            command
        },
        kills,
        rng,
        after_kill,
    )
}

/// [`run_with_kills`], run `i` (0 for the first, `kills` for the last, which finishes)
/// started as `command(i)` says: on alternating machines, say.
pub fn run_with_kills_of(
    mut command: impl FnMut(usize) -> Command,
    kills: usize,
    rng: &mut Rng,
    mut after_kill: impl FnMut(),
) -> usize {
    let deadline = Instant::now() + Duration::from_secs(300);
    let (mut resumes, mut previous_resume, mut previous_commit) = (0, 0u64, 0u64);
    let mut check_resume = |log: &RunLog, previous_resume: u64, previous_commit: u64| {
        let resumed = log.resumed_from.unwrap_or(0);
        assert!(
            resumed >= previous_commit,
            "a run resumed from checkpoint {resumed}, older than checkpoint {previous_commit} the killed run had committed:\n{}",
            log.text
        );
        if resumed > previous_resume {
            resumes += 1;
        }
        resumed
    };
    for kill in 0..kills {
        let mut run = LoggedRun::start(command(kill));
        let commits = 1 + rng.below(2);
        if !run.wait_for_commits(commits, deadline) {
            let status = run.child.wait().unwrap();
            assert!(
                status.success(),
                "a run failed on its own:\n{}",
                run.log.text
            );
            panic!("the run finished after {kill} kills; the input is too short for {kills} kills");
        }
        let span = (KILL_DELAY.1 - KILL_DELAY.0).as_micros() as u64;
        let delay = KILL_DELAY.0 + Duration::from_micros(rng.below(span.max(1)));
        let killed_at = Instant::now() + delay;
        while Instant::now() < killed_at && run.pump(Duration::from_millis(1)) {}
        if run.child.try_wait().unwrap().is_some() {
            let log = run.finish_any();
            panic!(
                "the run finished after {kill} kills; the input is too short for {kills} kills:\n{}",
                log.text
            );
        }
        run.kill();
        if kill > 0 {
            previous_resume = check_resume(&run.log, previous_resume, previous_commit);
        }
        previous_commit = run.log.committed;
        after_kill();
    }
    let last = LoggedRun::start(command(kills)).finish();
    check_resume(&last, previous_resume, previous_commit);
    assert_eq!(
        resumes, kills,
        "only {resumes} of the {kills} runs after a kill resumed from a newer checkpoint"
    );
    resumes
}

/// The newest committed checkpoint's flush marker in the local store at `dir`, if any.
pub fn newest_marker(store: &str) -> Option<u64> {
    let store = open_store(store);
    let newest = *store.generations().unwrap().last()?;
    Some(store.read_manifest(newest).unwrap().output_marker)
}

/// Exactly-once at a crash point: the output holds at least the newest checkpoint's
/// committed bytes, and those are the reference output's first bytes.
pub fn assert_committed_prefix(output: &Path, store: &str, expected: &[u8]) {
    let marker = newest_marker(store).expect("a committed checkpoint to check the output against");
    let actual = std::fs::read(output).unwrap_or_default();
    let marker = marker as usize;
    assert!(
        actual.len() >= marker,
        "output is {} bytes, shorter than the committed marker {marker}",
        actual.len()
    );
    assert!(
        marker <= expected.len(),
        "committed marker {marker} is past the whole reference output"
    );
    assert!(
        actual[..marker] == expected[..marker],
        "committed output (first {marker} bytes) differs from the reference"
    );
}

const KILLS: usize = 10;

/// Compare two outputs and, on a mismatch, say where they part (not a 10 MB diff).
pub fn assert_same_output(actual: &[u8], expected: &[u8], what: &str) {
    if actual == expected {
        return;
    }
    let (a, e): (Vec<_>, Vec<_>) = (
        actual.split(|b| *b == b'\n').collect(),
        expected.split(|b| *b == b'\n').collect(),
    );
    let line = a
        .iter()
        .zip(&e)
        .position(|(x, y)| x != y)
        .unwrap_or(a.len().min(e.len()));
    panic!(
        "{what}: output differs from the uninterrupted run at line {line} ({} vs {} bytes): got {:?}, expected {:?}",
        actual.len(),
        expected.len(),
        a.get(line).map(|l| String::from_utf8_lossy(l)),
        e.get(line).map(|l| String::from_utf8_lossy(l)),
    );
}

/// Kill a run of `guest_name` over `records` generated records `KILLS` times, finish it,
/// and compare with an uninterrupted run; the checkpoints go to `store`.
pub fn crash_test_on(guest_name: &str, records: usize, numbers: bool, every: u64, store: &str) {
    crash_test_with(guest_name, records, numbers, every, store, &[]);
}

/// [`crash_test_on`], every run of `wasnap run` given `extra` arguments too.
pub fn crash_test_with(
    guest_name: &str,
    records: usize,
    numbers: bool,
    every: u64,
    store: &str,
    extra: &[&str],
) {
    let guest = guest(guest_name);
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("input");
    write_input(&input, records, 5000, numbers);

    let expected = reference_output(&guest, &input);
    assert!(!expected.is_empty());

    let output = dir.path().join("output");
    let mut args = coalescing_run_args(&guest, &input, &output, store, every);
    // Every `every` records or 20 ms, captures the store cannot keep up with merging
    // (coalescing), as they do by default.
    args.extend(["--checkpoint-interval".into(), "20ms".into()]);
    args.extend(extra.iter().map(|a| a.to_string()));
    let mut rng = Rng::from_env_or_clock(guest_name);
    run_with_kills(&args, KILLS, &mut rng, || {
        assert_committed_prefix(&output, store, &expected)
    });
    assert_same_output(&std::fs::read(&output).unwrap(), &expected, guest_name);

    // Running once more on a finished task changes nothing.
    run_ok(&args);
    assert_same_output(&std::fs::read(&output).unwrap(), &expected, guest_name);
}
