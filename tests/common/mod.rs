//! Helpers shared by the integration tests: the guests (built from source by the
//! project's script), inputs, and running the real `wasnap` binary.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

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

pub fn wasnap() -> Command {
    Command::new(env!("CARGO_BIN_EXE_wasnap"))
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

/// Arguments of `wasnap run`.
pub fn run_args(guest: &Path, input: &Path, output: &Path, store: &str, every: u64) -> Vec<String> {
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

/// Run `args` again and again, killing each run with SIGKILL after a random delay in
/// `kill_window`, until `kills` runs have been killed mid-run; then let the last run
/// finish. Returns how many runs were killed while still running.
/// `after_kill` is called after every kill, with the process gone, to check invariants.
pub fn run_with_kills(
    args: &[String],
    kills: usize,
    kill_window: (Duration, Duration),
    rng: &mut Rng,
    mut after_kill: impl FnMut(),
) -> usize {
    let mut killed = 0;
    let deadline = Instant::now() + Duration::from_secs(300);
    while killed < kills {
        assert!(Instant::now() < deadline, "crash loop took too long");
        let mut child = wasnap()
            .args(args)
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn wasnap");
        let span = (kill_window.1 - kill_window.0).as_micros() as u64;
        let delay = kill_window.0 + Duration::from_micros(rng.below(span.max(1)));
        let started = Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                let out = child.wait_with_output().unwrap();
                assert!(
                    status.success(),
                    "a run failed on its own: {}",
                    stderr(&out)
                );
                panic!(
                    "the run finished after {killed} kills; the input is too short for {kills} kills in {kill_window:?}"
                );
            }
            if started.elapsed() >= delay {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        killed += 1;
        after_kill();
    }
    run_ok(args);
    killed
}

/// The newest committed checkpoint's flush marker in the local store at `dir`, if any.
pub fn newest_marker(store: &str) -> Option<u64> {
    let store = wasnap::store::CheckpointStore::open(store).unwrap();
    let newest = *store.generations().unwrap().last()?;
    Some(store.read_manifest(newest).unwrap().output_marker)
}

/// Exactly-once at a crash point: the output holds at least the newest checkpoint's
/// committed bytes, and those are the reference output's first bytes.
pub fn assert_committed_prefix(output: &Path, store: &str, expected: &[u8]) {
    let Some(marker) = newest_marker(store) else {
        return;
    };
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
