//! The first-guest quick start of docs/GUESTS.md, as written: the Rust and C guests are
//! taken from the page's marked code blocks (`<!-- first-guest: NAME -->` on the line
//! before a block), built and run with the page's own commands, killed with SIGKILL after
//! committed checkpoints, and compared byte for byte with an uninterrupted run, with each
//! other and with the logic the page describes. Needs what `scripts/setup.sh` installs
//! (the wasm32-wasip1 Rust target, Debian's clang, lld and wasi-libc) and the test S3
//! server: a missing tool fails the test, it is never skipped.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Instant;

use common::*;

const DOC: &str = "docs/GUESTS.md";

/// The blocks the test needs, by marker name.
const BLOCKS: [&str; 9] = [
    "rust/Cargo.toml",
    "rust/src/lib.rs",
    "rust/build.sh",
    "c/first.c",
    "c/build.sh",
    "run.sh",
    "run.out",
    "kill.sh",
    "s3.sh",
];

/// The page's marked code blocks, by the name in their marker.
fn doc_blocks() -> BTreeMap<String, String> {
    let text = std::fs::read_to_string(root().join(DOC)).unwrap();
    let mut blocks = BTreeMap::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        let Some(name) = line
            .trim()
            .strip_prefix("<!-- first-guest: ")
            .and_then(|rest| rest.strip_suffix(" -->"))
        else {
            continue;
        };
        let fence = lines.next().unwrap_or_default();
        assert!(
            fence.starts_with("```"),
            "{DOC}: the marker `{name}` is not followed by a code block"
        );
        let mut body = String::new();
        loop {
            let line = lines
                .next()
                .unwrap_or_else(|| panic!("{DOC}: the block `{name}` is not closed"));
            if line.starts_with("```") {
                break;
            }
            body.push_str(line);
            body.push('\n');
        }
        assert!(
            blocks.insert(name.to_string(), body).is_none(),
            "{DOC}: two blocks are marked `{name}`"
        );
    }
    for name in BLOCKS {
        assert!(
            blocks.contains_key(name),
            "{DOC}: no block is marked `{name}`"
        );
    }
    blocks
}

/// Run `script` with `sh` in `dir`, with this build's `wasnap` and the `cargo` that runs
/// the tests first on `PATH`; `-e` unless `lenient`. Returns its output, whatever its status.
fn sh(dir: &Path, script: &str, lenient: bool, env: &[(String, String)]) -> Output {
    let wasnap_dir = Path::new(env!("CARGO_BIN_EXE_wasnap")).parent().unwrap();
    let cargo_dir = Path::new(env!("CARGO")).parent().unwrap();
    let path = std::env::join_paths(
        [wasnap_dir.to_path_buf(), cargo_dir.to_path_buf()]
            .into_iter()
            .chain(std::env::split_paths(
                &std::env::var_os("PATH").unwrap_or_default(),
            )),
    )
    .unwrap();
    let mut command = Command::new("sh");
    if !lenient {
        command.arg("-e");
    }
    command
        .arg("-c")
        .arg(script)
        .current_dir(dir)
        .env("PATH", path)
        // The guest's own build, not one the environment configured for the host.
        .env("CARGO_TARGET_DIR", dir.join("target"))
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_TARGET")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .expect("run sh")
}

/// [`sh`] with `-e`; it must succeed.
fn sh_ok(dir: &Path, script: &str, what: &str, env: &[(String, String)]) -> String {
    let out = sh(dir, script, false, env);
    assert!(
        out.status.success(),
        "{what} failed ({}); is everything scripts/setup.sh installs there?\n--- script\n{script}--- stdout\n{}--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    String::from_utf8(out.stdout).unwrap()
}

/// What the page says the guests do: for every word (a run of bytes between ASCII
/// whitespace: space, \t, \n, \f, \r) of every line, `<word> <times seen so far>\n`.
fn word_counts(input: &[u8]) -> Vec<u8> {
    let mut counts: HashMap<&[u8], u64> = HashMap::new();
    let mut out = Vec::new();
    let input = input.strip_suffix(b"\n").unwrap_or(input);
    for record in input.split(|b| *b == b'\n') {
        for word in record
            .split(u8::is_ascii_whitespace)
            .filter(|w| !w.is_empty())
        {
            let count = counts.entry(word).or_insert(0);
            *count += 1;
            out.extend_from_slice(word);
            out.extend_from_slice(format!(" {count}\n").as_bytes());
        }
    }
    out
}

/// An input with words the guests must treat alike: runs of spaces and tabs, empty lines,
/// `\r` (CRLF lines), non-ASCII bytes and one long word.
fn awkward_input(path: &Path) {
    write_input(path, 60_000, 5000, false);
    let mut text = std::fs::read(path).unwrap();
    text.extend_from_slice(b"\n  w1\t\tw2  \r\nw1\r\n\n\xc3\xa9t\xc3\xa9 \xff w1\x0cw2\x0bw3\n");
    text.extend_from_slice(&vec![b'x'; 5000]);
    text.extend_from_slice(b" w1\n");
    std::fs::write(path, text).unwrap();
}

/// Kill runs of `guest` over `input` three times after committed checkpoints, finish, and
/// compare with `expected`.
fn survives_kill_9(guest: &Path, input: &Path, expected: &[u8], what: &str) {
    let dir = tempfile::tempdir().unwrap();
    let (output, store) = (dir.path().join("output"), dir.path().join("store"));
    let store = store.to_str().unwrap();
    let mut args = coalescing_run_args(guest, input, &output, store, 200);
    args.extend(["--checkpoint-interval".into(), "20ms".into()]);
    let mut rng = Rng::from_env_or_clock(what);
    run_with_kills(&args, 3, &mut rng, || {
        assert_committed_prefix(&output, store, expected)
    });
    assert_same_output(&std::fs::read(&output).unwrap(), expected, what);
}

#[test]
fn the_first_guest_quick_start_works_as_written() {
    let started = Instant::now();
    let step = |what: &str| {
        eprintln!(
            "first_guest: {what} at {:.1} s",
            started.elapsed().as_secs_f64()
        )
    };
    let blocks = doc_blocks();
    let dir = tempfile::tempdir().unwrap();
    for name in BLOCKS {
        let path = dir.path().join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &blocks[name]).unwrap();
    }
    let (rust, c) = (dir.path().join("rust"), dir.path().join("c"));

    // Built with the page's commands; each leaves first.wasm in its directory.
    sh_ok(
        &rust,
        &blocks["rust/build.sh"],
        "the Rust guest's build",
        &[],
    );
    sh_ok(&c, &blocks["c/build.sh"], "the C guest's build", &[]);
    let guests: [(&str, PathBuf); 2] = [
        ("rust", rust.join("first.wasm")),
        ("c", c.join("first.wasm")),
    ];
    for (what, guest) in &guests {
        assert!(
            guest.is_file(),
            "the {what} build left no {}",
            guest.display()
        );
    }
    step("built");

    // The first run, and the output the page shows for it.
    for (what, guest) in &guests {
        let dir = guest.parent().unwrap();
        let out = sh_ok(
            dir,
            &blocks["run.sh"],
            &format!("run.sh with the {what} guest"),
            &[],
        );
        assert_eq!(out, blocks["run.out"], "run.sh with the {what} guest");
        let words = std::fs::read(dir.join("words.txt")).unwrap();
        assert_eq!(
            out.as_bytes(),
            word_counts(&words),
            "the {what} guest's counts"
        );
    }
    step("run.sh");

    // The page's kill -9 session, with the Rust guest: the resumed output is identical.
    // (Where the kill lands is up to the clock here; `survives_kill_9` below makes sure.)
    let out = sh(&rust, &blocks["kill.sh"], true, &[]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        stdout.lines().any(|l| l == "identical") && stderr.contains("(resumed from checkpoint"),
        "kill.sh: the resumed run does not match the reference\n--- stdout\n{stdout}--- stderr\n{stderr}"
    );
    let big = std::fs::read(rust.join("big.txt")).unwrap();
    // Not vacuous: the page's input has its 500 000 lines.
    assert_eq!(big.iter().filter(|&&b| b == b'\n').count(), 500_000);
    assert_eq!(
        std::fs::read(rust.join("big.out")).unwrap(),
        word_counts(&big)
    );
    let resumed = stderr
        .lines()
        .find(|l| l.contains("(resumed from checkpoint"))
        .unwrap_or_default();
    step(&format!(
        "kill.sh ({})",
        resumed.trim_start_matches("wasnap: ")
    ));

    // Both guests, killed three times each after committed checkpoints, end as the
    // page's logic says: hence byte-identical to an uninterrupted run and to each other.
    let input = dir.path().join("input");
    awkward_input(&input);
    let expected = word_counts(&std::fs::read(&input).unwrap());
    let references: Vec<Vec<u8>> = guests
        .iter()
        .map(|(_, guest)| reference_output(guest, &input))
        .collect();
    assert_same_output(
        &references[1],
        &references[0],
        "the C guest against the Rust guest",
    );
    for ((what, guest), reference) in guests.iter().zip(&references) {
        assert_same_output(reference, &expected, what);
        survives_kill_9(guest, &input, &expected, what);
        step(&format!("{what} guest through kill -9"));
    }

    // The S3 lines, against the test S3 server (this binary starts one unless
    // scripts/test.sh did), in a bucket of their own instead of `wasnap`, and without the
    // lines that start and stop a server.
    let script = &blocks["s3.sh"];
    let (server_lines, kept): (Vec<&str>, Vec<&str>) = script
        .lines()
        .partition(|l| l.contains("scripts/s3-server.sh"));
    assert_eq!(
        server_lines.len(),
        2,
        "s3.sh: the server's start and stop lines"
    );
    let url = s3().fresh_url("first-guest");
    let kept = kept.join("\n").replace("s3://wasnap/first", &url);
    assert!(kept.contains(&url), "s3.sh names no s3://wasnap/first");
    let out = sh_ok(&rust, &kept, "s3.sh", &s3().env);
    assert_eq!(out, blocks["run.out"], "s3.sh");
    step("s3.sh");
}
