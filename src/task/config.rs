//! What a task is asked to do: its mode and the engine's knobs ([`TaskConfig`]), and, for
//! `wasnap run` and embedders that name everything by path or URL, where the guest, the
//! input, the output and the page cache are ([`RunConfig`]).

use std::path::PathBuf;

use anyhow::Result;

use super::Task;
use crate::guest::{Guest, Limits, random};
use crate::snapshot::{self, DirtyTracking};
use crate::store::CheckpointStore;
use crate::stream;

/// How many checkpoints a task keeps by default.
pub const DEFAULT_RETAIN: usize = 3;

/// How many checkpoints may be captured and not yet committed, by default.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 2;

/// Record mode: checkpoint once this much time passed since the last checkpoint (and
/// records came), unless the policy says otherwise. It bounds what a crash replays and
/// how far committed output trails the input (this plus one commit).
pub const DEFAULT_CHECKPOINT_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// A record count that never falls due: no checkpoints by count.
pub const NEVER: u64 = u64::MAX;

/// With coalescing: the least budget of page copies the captures in flight may hold before
/// the next capture waits (one copy of the guest's memory, if that is more), by default.
pub const DEFAULT_MAX_UNCOMMITTED_BYTES: u64 = 256 << 20;

/// Stdio mode: checkpoint at the first stdin read after this many bytes, by default.
pub const DEFAULT_CHECKPOINT_EVERY_BYTES: u64 = 1 << 20;

/// How the guest takes its input, and when checkpoints are due. Each mode has its own
/// driver (`task::records`, `task::program`); everything else is shared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// A record guest (the wasnap ABI): one `process` call per input record; a checkpoint
    /// after every `checkpoint_every` records (`u64::MAX`: not by count; see also
    /// [`TaskConfig::checkpoint_interval`]) and at the end of the input.
    Records {
        /// Records between two checkpoints (`u64::MAX`: by time only).
        checkpoint_every: u64,
    },
    /// An unmodified WASI command: the input is its stdin and the output its stdout; a
    /// checkpoint at its first stdin read after every `checkpoint_every_bytes` bytes, and
    /// once it exits.
    Stdio {
        /// Input bytes between two checkpoints (taken at the next stdin read).
        checkpoint_every_bytes: u64,
    },
}

impl Mode {
    /// A record guest, checkpointed every `checkpoint_every` records.
    pub fn records(checkpoint_every: u64) -> Self {
        Mode::Records { checkpoint_every }
    }

    /// A WASI command, checkpointed every `checkpoint_every_bytes` input bytes.
    pub fn stdio(checkpoint_every_bytes: u64) -> Self {
        Mode::Stdio {
            checkpoint_every_bytes,
        }
    }

    /// Whether this is stdio mode.
    pub fn is_stdio(&self) -> bool {
        matches!(self, Mode::Stdio { .. })
    }
}

impl Default for Mode {
    /// Records, checkpointed by time only (every second by default).
    fn default() -> Self {
        Mode::records(NEVER)
    }
}

/// A task's mode and knobs.
#[derive(Clone, Debug)]
pub struct TaskConfig {
    /// A record guest or a stdio program, and when it checkpoints by count.
    pub mode: Mode,
    /// Seed of the guest's WASI random stream on a fresh start (a restore uses the checkpoint's).
    pub random_seed: u64,
    /// Keep this many newest checkpoints; older ones, and packs none of the kept ones
    /// need, are deleted after each commit. `usize::MAX` keeps everything.
    pub retain: usize,
    /// Checkpoints captured but not yet committed before the guest waits, when they do not
    /// coalesce; 0 commits each checkpoint before the guest goes on (and then none
    /// coalesce).
    pub max_in_flight: usize,
    /// Captures waiting for the committer merge into one commit (`task::coalesce`), so the
    /// guest waits for the store only when a capture is due while those in flight hold
    /// `max_uncommitted_bytes` of page copies and unwritten output (or one copy of the
    /// guest's memory, if that is more).
    /// Off, every capture is committed on its own (`wasnap run --no-coalesce`): what a
    /// benchmark that compares checkpoint by checkpoint needs.
    pub coalesce: bool,
    /// See `coalesce`.
    pub max_uncommitted_bytes: u64,
    /// Where the page cache (the last captured version of every page, the base of deltas)
    /// lives. `None`: under the user's cache directory, named by the store.
    pub cache_dir: Option<PathBuf>,
    /// Deltas a page's chain may have (what a restore applies at most on top of a whole
    /// page); 0 writes every dirty page whole. At most `snapshot::table::MAX_DELTAS_LIMIT`.
    pub max_deltas: usize,
    /// How a capture finds the pages that changed (`snapshot::dirty`).
    pub dirty_tracking: DirtyTracking,
    /// Record mode: checkpoint once this long has passed since the last checkpoint and
    /// records came (an input that trickles, or idles, still commits its output), as well
    /// as by count (`Mode::Records`), whichever comes first. `None`: by count only.
    pub checkpoint_interval: Option<std::time::Duration>,
}

impl Default for TaskConfig {
    fn default() -> Self {
        Self {
            mode: Mode::default(),
            random_seed: random::DEFAULT_SEED,
            retain: DEFAULT_RETAIN,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            cache_dir: None,
            max_deltas: snapshot::table::DEFAULT_MAX_DELTAS,
            dirty_tracking: DirtyTracking::default(),
            checkpoint_interval: Some(DEFAULT_CHECKPOINT_INTERVAL),
            coalesce: true,
            max_uncommitted_bytes: DEFAULT_MAX_UNCOMMITTED_BYTES,
        }
    }
}

impl TaskConfig {
    /// A record task checkpointed by count alone: after every `records` records (and at
    /// the end), each checkpoint committed on its own, in order (no interval, no
    /// coalescing: `wasnap run --checkpoint-every N --no-coalesce`); the other knobs at
    /// their defaults.
    pub fn by_count(records: u64) -> Self {
        Self {
            mode: Mode::records(records),
            checkpoint_interval: None,
            coalesce: false,
            ..Self::default()
        }
    }

    /// The page cache directory of a task on `store`.
    pub(crate) fn cache_dir_for(&self, store: &CheckpointStore) -> PathBuf {
        self.cache_dir
            .clone()
            .unwrap_or_else(|| user_cache_dir(store.label()))
    }
}

/// A task named by paths and URLs: what `wasnap run` is asked to do.
#[derive(Clone, Debug)]
pub struct RunConfig {
    /// The guest module (.wasm, or .wat text); in stdio mode a WASI command.
    pub guest: PathBuf,
    /// A file, `file:///PATH` or `s3://BUCKET/KEY` (see `stream::open_source`).
    pub input: PathBuf,
    /// A file, or a directory, `file:///DIR` or `s3://BUCKET/PREFIX` (`stream::open_sink`).
    pub output: PathBuf,
    /// A component's outputs for emit targets 1, 2, … (`--output` repeated); empty for
    /// one output.
    pub further_outputs: Vec<PathBuf>,
    /// `--on-trap skip`: where records the guest fails on go, each with its error (a
    /// JSON line), committed with the checkpoint like any output. `None`: a failing
    /// record stops the run.
    pub dead_letter: Option<PathBuf>,
    /// Memory cap and per-call time limit for the guest.
    pub limits: Limits,
    /// A component's `--config` pairs, given to `fs-init` on a fresh start.
    pub component_config: Vec<(String, String)>,
    /// The page cache goes beside a file output, and under the user's cache directory
    /// (named by the output) for any other output, unless `task.cache_dir` says where.
    pub task: TaskConfig,
}

impl RunConfig {
    /// A record guest over `input` into `output`, with the default knobs.
    pub fn new(
        guest: impl Into<PathBuf>,
        input: impl Into<PathBuf>,
        output: impl Into<PathBuf>,
    ) -> Self {
        Self {
            guest: guest.into(),
            input: input.into(),
            output: output.into(),
            further_outputs: Vec::new(),
            dead_letter: None,
            component_config: Vec::new(),
            limits: Limits::default(),
            task: TaskConfig::default(),
        }
    }

    /// The same, in `mode`.
    pub fn with_mode(mut self, mode: Mode) -> Self {
        self.task.mode = mode;
        self
    }

    /// The page cache directory this configuration uses.
    pub fn cache_dir(&self) -> PathBuf {
        if let Some(dir) = &self.task.cache_dir {
            return dir.clone();
        }
        if stream::is_object_url(&self.output)
            || stream::is_kafka_url(&self.output)
            || self.output.is_dir()
        {
            return user_cache_dir(&self.output.to_string_lossy());
        }
        let mut name = self.output.file_name().unwrap_or_default().to_os_string();
        name.push(".wasnap-cache");
        self.output.with_file_name(name)
    }

    /// Load the guest for the configured mode.
    pub fn load_guest(&self) -> Result<Guest, crate::Error> {
        let mut guest = if self.task.mode.is_stdio() {
            Guest::load_program(&self.guest, self.limits)?
        } else {
            Guest::load_with_limits(&self.guest, self.limits)?
        };
        guest.set_component_config(self.component_config.clone())?;
        guest.set_outputs(1 + self.further_outputs.len())?;
        Ok(guest)
    }

    /// Open the task on `store`: load the guest, open the input and output, and restore
    /// the newest checkpoint or start fresh.
    pub fn open(&self, store: CheckpointStore) -> Result<Task, crate::Error> {
        let guest = self.load_guest()?;
        self.open_with_guest(&guest, store)
    }

    /// [`RunConfig::open`] with a guest already compiled (`guest` and `limits` are not
    /// read): opening many tasks of one guest compiles it once.
    pub fn open_with_guest(
        &self,
        guest: &Guest,
        store: CheckpointStore,
    ) -> Result<Task, crate::Error> {
        if self.task.mode.is_stdio() && stream::is_kafka_url(&self.input) {
            return Err(crate::error::error(
                crate::ErrorKind::Other,
                "stdio mode reads its stdin from a file or an S3 object, not from Kafka",
            )
            .into());
        }
        self.check_paths_apart(store.label())?;
        // The sink first: a file output's lock must stop a second writer before anything
        // else is read or touched.
        let sink = self.open_outputs()?;
        let source = stream::open_source(&self.input)?;
        let task = TaskConfig {
            cache_dir: Some(self.cache_dir()),
            ..self.task.clone()
        };
        Task::open(&task, guest, store, source, sink)
    }
}

impl RunConfig {
    /// Every output, target 0 first, then the dead letters'.
    fn outputs(&self) -> impl Iterator<Item = &PathBuf> {
        std::iter::once(&self.output)
            .chain(&self.further_outputs)
            .chain(&self.dead_letter)
    }

    /// The output, or for several (a component's emit targets, dead letters) one sink
    /// over them all.
    fn open_outputs(&self) -> Result<Box<dyn stream::Sink>, crate::Error> {
        if self.further_outputs.is_empty() && self.dead_letter.is_none() {
            return stream::open_sink(&self.output);
        }
        if self.outputs().count() > stream::multi::MAX_OUTPUTS {
            return Err(crate::error::error(
                crate::ErrorKind::Other,
                format!(
                    "a task may have at most {} outputs",
                    stream::multi::MAX_OUTPUTS
                ),
            )
            .into());
        }
        let outputs = self
            .outputs()
            .map(|output| stream::open_sink(output))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Box::new(stream::MultiSink::new(
            outputs,
            self.dead_letter.is_some(),
        )))
    }

    /// Refuse an output that would overwrite the task's own input, guest, store or
    /// another output: an output is truncated on a fresh start and cut back on every
    /// resume.
    fn check_paths_apart(&self, store_url: &str) -> Result<(), crate::Error> {
        let outputs: Vec<&PathBuf> = self.outputs().collect();
        // Local outputs compared as the files they name (`out` and `./out` are one).
        let named: Vec<String> = outputs
            .iter()
            .map(|o| match local_path(o) {
                Some(path) => resolve(&path).display().to_string(),
                None => o.display().to_string(),
            })
            .collect();
        for (index, output) in outputs.iter().enumerate() {
            if named[..index].contains(&named[index]) {
                let flags = if index > self.further_outputs.len() {
                    "--dead-letter names an --output"
                } else {
                    "--output is given twice"
                };
                return Err(crate::error::error(
                    crate::ErrorKind::Other,
                    format!("{flags}: {}", output.display()),
                )
                .into());
            }
            self.check_output_apart(output, store_url)?;
        }
        Ok(())
    }

    fn check_output_apart(
        &self,
        output: &std::path::Path,
        store_url: &str,
    ) -> Result<(), crate::Error> {
        let output_arg = output;
        let Some(output) = local_path(output_arg) else {
            return s3_output_apart(output_arg, store_url);
        };
        let output = resolve(&output);
        let clash = |what: &str, other: &std::path::Path| -> Result<(), crate::Error> {
            Err(crate::error::error(
                crate::ErrorKind::Other,
                format!(
                    "--output {} is {what} {}: the output is truncated and rewritten by every run",
                    output_arg.display(),
                    other.display()
                ),
            )
            .into())
        };
        if let Some(input) = local_path(&self.input)
            && same_file(&output, &resolve(&input))
        {
            return clash("the same file as --input", &self.input);
        }
        if same_file(&output, &resolve(&self.guest)) {
            return clash("the same file as the guest", &self.guest);
        }
        if let Some(store) = crate::store::local_dir(store_url) {
            let store = resolve(std::path::Path::new(store));
            if output.starts_with(&store) || store.starts_with(&output) {
                return clash("inside, or holds, the store", &store);
            }
        }
        Ok(())
    }
}

/// An S3 output inside an S3 store's prefix, or holding it, would mix its parts with the
/// store's objects: refused, as a local output inside a local store is.
fn s3_output_apart(output: &std::path::Path, store_url: &str) -> Result<(), crate::Error> {
    let output_text = output.to_string_lossy();
    let (Some(out), Some(store)) = (
        output_text.strip_prefix("s3://"),
        store_url.strip_prefix("s3://"),
    ) else {
        return Ok(());
    };
    let (out, store) = (out.trim_end_matches('/'), store.trim_end_matches('/'));
    let within = |a: &str, b: &str| a == b || a.starts_with(&format!("{b}/"));
    if within(out, store) || within(store, out) {
        return Err(crate::error::error(
            crate::ErrorKind::Other,
            format!(
                "--output {output_text} is inside, or holds, the store {store_url}: give the \
                 output and the store prefixes of their own"
            ),
        )
        .into());
    }
    Ok(())
}

/// The local path an `--input`/`--output` argument names, or `None` for S3 and Kafka.
fn local_path(arg: &std::path::Path) -> Option<PathBuf> {
    let text = arg.to_string_lossy();
    if let Some(path) = text.strip_prefix("file://") {
        return Some(PathBuf::from(path));
    }
    (!text.contains("://")).then(|| arg.to_path_buf())
}

/// `path` made absolute with its links resolved, as far as it exists (a file not created
/// yet is its resolved directory joined with its name).
fn resolve(path: &std::path::Path) -> PathBuf {
    if let Ok(resolved) = std::fs::canonicalize(path) {
        return resolved;
    }
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    match (absolute.parent(), absolute.file_name()) {
        (Some(dir), Some(name)) => resolve(dir).join(name),
        _ => absolute,
    }
}

/// Whether two resolved paths are one file: the same path, or the same inode (hard links).
fn same_file(a: &std::path::Path, b: &std::path::Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    if a == b {
        return true;
    }
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// Open the store at `store_url`, open the task and run it to the end of its input.
///
/// With a dead-letter output (`--on-trap skip`), a record the guest fails on does not stop
/// the run: the task goes back to its newest checkpoint (as a restart would, its
/// uncommitted output cut), replays up to that record, writes it with its error to the
/// dead letters instead of processing it, and goes on. The skip is part of the next
/// checkpoint like any record; a crash before it repeats the failure and the skip, so
/// both outputs stay exactly-once.
///
/// ```
/// use wasnap::{ErrorKind, NoObserver, RunConfig};
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let dir = tempfile::tempdir()?;
/// let (guest, input) = (dir.path().join("echo.wat"), dir.path().join("in.txt"));
/// // A guest that emits every record back, and traps on the empty one.
/// std::fs::write(&guest, r#"(module
///     (import "wasnap" "emit" (func $emit (param i32 i32)))
///     (memory (export "memory") 1)
///     (func (export "alloc") (param i32) (result i32) (i32.const 1024))
///     (func (export "process") (param $ptr i32) (param $len i32)
///         (if (i32.eqz (local.get $len)) (then unreachable))
///         (call $emit (local.get $ptr) (local.get $len))))"#)?;
/// std::fs::write(&input, "a\nb\n")?;
/// let store = dir.path().join("store").display().to_string();
/// let config = RunConfig::new(&guest, &input, dir.path().join("out.txt"));
/// let summary = wasnap::run(&config, &store, &mut NoObserver)?;
/// assert_eq!((summary.records, summary.resumed_from), (2, None));
/// assert_eq!(std::fs::read(dir.path().join("out.txt"))?, b"a\nb\n");
///
/// // More input, and the same call resumes from the newest checkpoint; the empty
/// // record traps, a failure of the guest's.
/// std::fs::write(&input, "a\nb\nc\n\n")?;
/// let err = wasnap::run(&config, &store, &mut NoObserver).unwrap_err();
/// assert_eq!(err.kind(), ErrorKind::Guest);
/// assert!(err.to_string().contains("the record at line 4"), "{err}");
/// assert_eq!(std::fs::read(dir.path().join("out.txt"))?, b"a\nb\n");
/// # Ok(())
/// # }
/// ```
pub fn run(
    config: &RunConfig,
    store_url: &str,
    observer: &mut dyn super::CheckpointObserver,
) -> Result<super::RunSummary, crate::Error> {
    let guest = config.load_guest()?;
    // Before the store is opened (and a local one made): a refused output, or an input
    // file that is not there, leaves nothing behind.
    config.check_paths_apart(store_url)?;
    if let Some(input) = local_path(&config.input)
        && let Err(err) = std::fs::metadata(&input)
    {
        return Err(crate::error::error(
            crate::ErrorKind::Other,
            format!("cannot open input {}: {err}", input.display()),
        )
        .into());
    }
    // Opened once: every reopen after a skip must see the same store (`memory://` too).
    let store = CheckpointStore::open(store_url)?;
    let started = std::time::Instant::now();
    let mut skip = std::collections::BTreeMap::new();
    // The segments before each skip: (resumed from, records, input bytes, checkpoints).
    let mut before: Option<(Option<u64>, u64, u64, u64)> = None;
    let mut segment_from: Option<u64> = None;
    loop {
        let mut task = config.open_with_guest(&guest, store.clone())?;
        if config.dead_letter.is_some() {
            task.skip_poison(super::records::Poison {
                skip: skip.clone(),
                dead_letters: 1 + config.further_outputs.len(),
            })?;
        }
        let (resumed_from, opened_at) = (task.resumed_from(), task.input_offset());
        // The input the segment before a skip got through: up to where this one resumed.
        if let (Some(from), Some((_, _, bytes, _))) = (segment_from.take(), before.as_mut()) {
            *bytes += opened_at.saturating_sub(from);
        }
        let outcome = task.run(observer);
        drop(task);
        let mut summary = match outcome {
            Err(err) => match err.downcast_ref::<crate::error::PoisonRecord>() {
                Some(poison) if skip.len() >= MAX_SKIPPED_RECORDS => {
                    return Err(crate::error::error(
                        crate::ErrorKind::Guest,
                        format!(
                            "{} records failed in this run, the last at input offset {}: the failures are likely not about the records ({})",
                            skip.len() + 1,
                            poison.offset,
                            poison.message
                        ),
                    )
                    .into());
                }
                Some(poison) if !skip.contains_key(&poison.offset) => {
                    let (first, records, bytes, checkpoints) =
                        before.unwrap_or((resumed_from, 0, 0, 0));
                    before = Some((
                        first,
                        records + poison.records,
                        bytes,
                        checkpoints + poison.checkpoints,
                    ));
                    segment_from = Some(opened_at);
                    skip.insert(poison.offset, poison.message.clone());
                    continue;
                }
                _ => return Err(err),
            },
            Ok(summary) => summary,
        };
        if let Some((first, records, bytes, checkpoints)) = before {
            summary.resumed_from = first;
            summary.records += records;
            summary.input_bytes += bytes;
            summary.checkpoints += checkpoints;
            summary.elapsed = started.elapsed();
        }
        summary.skipped = skip.len() as u64;
        return Ok(summary);
    }
}

/// At most this many records are skipped in one run: past it the guest's failures are
/// likely not about the records (a state that no longer fits its memory limit), and each
/// skip costs a restore and a replay.
const MAX_SKIPPED_RECORDS: usize = 1000;

/// `$XDG_CACHE_HOME/wasnap/<hash of key>` (or under `~/.cache`, or the temporary
/// directory): a page cache for a task that has no local file of its own to sit beside.
fn user_cache_dir(key: &str) -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    let key = twox_hash::XxHash3_64::oneshot(key.as_bytes());
    base.join("wasnap").join(format!("{key:016x}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_s3_output_and_store_share_no_prefix() {
        let refused = |output: &str, store: &str| {
            s3_output_apart(std::path::Path::new(output), store).is_err()
        };
        assert!(refused("s3://b/x/store/out", "s3://b/x/store"));
        assert!(refused("s3://b/x/", "s3://b/x"));
        assert!(refused("s3://b/x", "s3://b/x/store"));
        assert!(refused("s3://b", "s3://b/store"));
        assert!(!refused("s3://b/x/out", "s3://b/x/store"));
        assert!(!refused("s3://b/x/storeroom", "s3://b/x/store"));
        assert!(!refused("s3://c/x", "s3://b/x"));
        assert!(!refused("s3://b/x", "store/"));
    }
}
