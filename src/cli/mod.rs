//! The `wasnap` command line.

/// A line on wasnap's stderr. Unlike `eprintln!` it does not panic when stderr is gone (a
/// closed pipe, a full disk): a run's result must not depend on who reads its messages.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

mod inspect;
mod log;
mod signals;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::builder::TypedValueParser as _;
use clap::{Parser, Subcommand};

use crate::bench;
use crate::error::ErrorKind;
use crate::snapshot::DirtyTracking;
use crate::task::{self, Mode, RunConfig, TaskConfig};

#[derive(Parser)]
#[command(
    name = "wasnap",
    version,
    about = "Durable, exactly-once execution of unmodified stateful WebAssembly stream guests"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a guest over an input (a file, an S3 object or a Kafka partition); rerunning the
    /// same command resumes from the newest checkpoint.
    #[command(
        after_help = "Example:\n  wasnap run target/guests/wordcount.wasm --input input.txt --output output.txt --store store/\n  (kill it at any moment; the same command resumes exactly once)"
    )]
    Run {
        /// The guest: a core module (.wasm, or .wat text) of the record ABI, a
        /// `functionstream:core/processor` component, or with --stdio a WASI command.
        guest: PathBuf,
        #[command(flatten)]
        component: ComponentArgs,
        #[command(flatten)]
        stdio: StdioArgs,
        /// Input records: lines of a file, file:///PATH or s3://BUCKET/KEY, or the records of
        /// kafka://HOST:PORT/TOPIC/PARTITION.
        #[arg(long)]
        input: PathBuf,
        /// Where emitted records go, one line each: a file, or a directory, file:///DIR or
        /// s3://BUCKET/PREFIX of output parts, or one Kafka record each to
        /// kafka://HOST:PORT/TOPIC[/PARTITION] (read them with `wasnap cat`). A component
        /// may have several: the Nth --output takes emit target N-1.
        #[arg(long, required = true)]
        output: Vec<PathBuf>,
        /// What a record the guest fails on (a trap, a time or memory limit) does: stop the
        /// run, or skip it (needs --dead-letter): go back to the newest checkpoint, replay
        /// up to the record, write it with its error to the dead letters, and go on.
        #[arg(long, default_value = "stop", value_parser = ["stop", "skip"])]
        on_trap: String,
        /// With --on-trap skip: where skipped records go, one JSON line each ({"offset",
        /// "error", and "record", or "record_hex" when it is not UTF-8), committed with each
        /// checkpoint like the output (any kind of output, as --output).
        #[arg(long)]
        dead_letter: Option<PathBuf>,
        /// Checkpoint store: a directory, file:///DIR, s3://BUCKET/PREFIX or memory://.
        #[arg(long)]
        store: String,
        #[command(flatten)]
        policy: PolicyArgs,
        /// Seed of the guest's deterministic WASI random stream on a fresh start.
        #[arg(long, default_value_t = crate::guest::random::DEFAULT_SEED)]
        seed: u64,
        #[command(flatten)]
        limits: LimitArgs,
        #[command(flatten)]
        retain: RetainArgs,
        /// With --no-coalesce: checkpoints captured but not yet committed before the guest
        /// waits (otherwise they merge while they wait, and a checkpoint waits only while
        /// they hold 256 MiB of page copies, or the guest's memory if more). 0: each
        /// checkpoint is committed before the guest goes on, with or without --no-coalesce.
        #[arg(long, default_value_t = task::DEFAULT_MAX_IN_FLIGHT as u64)]
        max_in_flight: u64,
        /// Commit every checkpoint on its own, in order, instead of merging those the
        /// store cannot keep up with: one commit per --checkpoint-every N records exactly,
        /// and the guest waits for the store once --max-in-flight are uncommitted.
        #[arg(long)]
        no_coalesce: bool,
        #[command(flatten)]
        state: StateArgs,
        /// No progress lines and no summary line on stderr (errors and warnings still).
        #[arg(long, short)]
        quiet: bool,
    },
    /// Join a fleet: run one task per partition of the input topic that the consumer group
    /// assigns this worker, until SIGTERM or SIGINT (last checkpoints, then leave).
    #[command(
        after_help = "Example:\n  wasnap worker target/guests/wordcount.wasm --input kafka://127.0.0.1:9092/in --output kafka://127.0.0.1:9092/out --group counts --store s3://bucket/fleet"
    )]
    Worker {
        /// The guest: a record-ABI core module (.wasm, or .wat text) or a
        /// `functionstream:core/processor` component.
        guest: PathBuf,
        #[command(flatten)]
        component: ComponentArgs,
        /// kafka://HOST:PORT/TOPIC: each partition is one task.
        #[arg(long)]
        input: String,
        /// kafka://HOST:PORT/TOPIC: input partition P writes output partition P.
        #[arg(long)]
        output: String,
        /// The fleet's store: task P of topic T is PREFIX/T/P (s3://BUCKET/PREFIX, a directory).
        #[arg(long)]
        store: String,
        /// The consumer group the fleet's workers share.
        #[arg(long)]
        group: String,
        #[command(flatten)]
        policy: PolicyArgs,
        /// Serve per-task figures for Prometheus at http://ADDR/metrics (e.g. 127.0.0.1:9464).
        #[arg(long)]
        metrics: Option<std::net::SocketAddr>,
        /// How long a worker that stopped answering keeps its partitions (Kafka's
        /// session.timeout.ms), in milliseconds.
        #[arg(long, default_value_t = 10000, value_parser = clap::value_parser!(u64).range(1000..))]
        session_timeout_ms: u64,
        /// How the group divides partitions: range (eager: every rebalance stops and
        /// restarts every task) or cooperative-sticky (only the tasks that move stop).
        #[arg(long, default_value = "range",
              value_parser = clap::builder::PossibleValuesParser::new(crate::fleet::Assignment::NAMES)
                  .map(|s| s.parse::<crate::fleet::Assignment>().expect("a listed name")))]
        assignment: crate::fleet::Assignment,
        #[command(flatten)]
        limits: LimitArgs,
        #[command(flatten)]
        retain: RetainArgs,
        #[command(flatten)]
        state: StateArgs,
    },
    /// Delete old checkpoints and unreferenced packs offline, and report what was freed.
    #[command(after_help = "Example:\n  wasnap gc --store store/ --retain 1")]
    Gc {
        /// The task's checkpoint store: a directory, file:///DIR or s3://BUCKET/PREFIX.
        #[arg(long)]
        store: String,
        #[command(flatten)]
        retain: RetainArgs,
    },
    /// Measure a guest: per commit, bytes written, stall and costs, beside the Wasman-style
    /// baseline; and the durability tax (records/s with checkpoints ÷ with them off).
    #[command(
        after_help = "Example:\n  wasnap bench target/guests/wordcount.wasm --input input.txt --checkpoint-every 1000"
    )]
    Bench {
        /// The guest: a core module (.wasm, or .wat text) of the record ABI, a
        /// `functionstream:core/processor` component, or with --stdio a WASI command (then
        /// the bench reports what asyncify and checkpoints cost: module size, lines/s plain,
        /// asyncified and with checkpoints).
        guest: PathBuf,
        #[command(flatten)]
        stdio: StdioArgs,
        /// Input records: a file, s3://BUCKET/KEY or kafka://HOST:PORT/TOPIC/PARTITION.
        #[arg(long)]
        input: PathBuf,
        /// Where the output goes (see `run`); default: a scratch file.
        #[arg(long)]
        output: Option<PathBuf>,
        #[command(flatten)]
        policy: PolicyArgs,
        /// Checkpoint store (must be empty); default: a fresh temporary directory.
        #[arg(long)]
        store: Option<String>,
        /// One JSON object per checkpoint on stdout instead of the summary table.
        #[arg(long)]
        json: bool,
        /// Skip the Wasman-style baseline (full gzip every 5th, FNV-64a 4 KiB deltas).
        #[arg(long)]
        no_baseline: bool,
        #[command(flatten)]
        state: StateArgs,
        /// Merge captures the store cannot keep up with, as `run` does (the default here
        /// with an interval). By count alone, each checkpoint is committed on its own, so
        /// that its bytes compare with the baseline's at the same moments.
        #[arg(long)]
        coalesce: bool,
        /// Run the guest this many times under the policy, and once more with checkpoints
        /// off, interleaved (off, on, off, …), and report the fastest of each: one pass on a
        /// busy machine can be a third off. Above 1, pass K has its own store,
        /// `STORE/pass-K`.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=20))]
        passes: u64,
    },
    /// Write the committed output to stdout, in order: of an object-storage output
    /// (`s3://…`, `file:///DIR`, a directory: the published parts), a Kafka partition (its
    /// committed records, one line each) or a file. With `--store`, exactly what the
    /// store's newest checkpoint committed.
    #[command(
        after_help = "Example:\n  wasnap cat --output s3://bucket/out --store s3://bucket/store"
    )]
    Cat {
        /// The output of a run: a file, a directory, s3://BUCKET/PREFIX or
        /// kafka://HOST:PORT/TOPIC[/PARTITION].
        #[arg(long)]
        output: String,
        /// The task's store: limits the output to what its newest checkpoint committed.
        #[arg(long)]
        store: Option<String>,
        /// With --store, of a task with several outputs: which one this is (the Nth
        /// --output of the run is target N-1; its --dead-letter comes after them).
        /// Required when the task has more than one.
        #[arg(long)]
        target: Option<usize>,
    },
    /// Summarise a store and list its checkpoints, newest first.
    #[command(
        after_help = "Examples:\n  wasnap inspect --store store/\n  wasnap inspect --store s3://wasnap/job --details"
    )]
    Inspect {
        /// The checkpoint store: a directory, file:///DIR or s3://BUCKET/PREFIX (a worker's
        /// store lists its tasks).
        #[arg(long)]
        store: String,
        /// Also list, under each checkpoint, the packs it needs (with the frames it uses of
        /// each), its component state and its kv runs.
        #[arg(long)]
        details: bool,
    },
}

/// When checkpoints are taken, as `run`, `worker` and `bench` take it: by time, by record
/// count, or both (whichever comes first). Neither given: every second.
#[derive(clap::Args)]
struct PolicyArgs {
    /// Take a checkpoint every N records (and always at the end of the input). Given alone,
    /// checkpoints are by count only (`bench` then commits each on its own); a worker
    /// checkpoints by time as well.
    #[arg(long, value_parser = at_least_one)]
    checkpoint_every: Option<u64>,
    /// Take a checkpoint once this long has passed since the last one and records came
    /// (`200ms`, `1s`, `2m`) [default: 1s, unless --checkpoint-every is given alone]. It
    /// bounds the records a crash replays and how far committed output trails the input.
    /// Checkpoints the store cannot keep up with merge into one commit (coalescing).
    #[arg(long, value_parser = parse_duration)]
    checkpoint_interval: Option<std::time::Duration>,
}

impl PolicyArgs {
    /// The record count and the interval this policy checkpoints at.
    fn policy(&self) -> (u64, Option<std::time::Duration>) {
        match (self.checkpoint_every, self.checkpoint_interval) {
            (None, None) => (task::NEVER, Some(task::DEFAULT_CHECKPOINT_INTERVAL)),
            (every, interval) => (every.unwrap_or(task::NEVER), interval),
        }
    }
}

/// A component's configuration, as `run` and `worker` take it.
#[derive(clap::Args)]
struct ComponentArgs {
    /// A component's configuration: KEY=VALUE, repeated; `fs-init` gets the pairs in
    /// order on a fresh start (never after a restore).
    #[arg(long = "config", value_name = "KEY=VALUE", value_parser = parse_config_pair)]
    config: Vec<(String, String)>,
}

/// Stdio mode, as `run` and `bench` take it.
#[derive(clap::Args)]
struct StdioArgs {
    /// Stdio mode: GUEST is an unmodified WASI command (a `main`); the input is its
    /// stdin, the output its stdout. Needs binaryen's wasm-opt (asyncify).
    #[arg(long)]
    stdio: bool,
    /// Stdio mode: checkpoint at the first stdin read after this many input bytes.
    #[arg(long, default_value_t = task::DEFAULT_CHECKPOINT_EVERY_BYTES,
          value_parser = at_least_one)]
    checkpoint_every_bytes: u64,
}

/// How many checkpoints a store keeps, as `run`, `worker` and `gc` take it.
#[derive(clap::Args)]
struct RetainArgs {
    /// Keep the newest K checkpoints (of each task, for a worker); older ones, and packs
    /// none of the kept ones needs, are deleted.
    #[arg(long, default_value_t = task::DEFAULT_RETAIN as u64, value_parser = at_least_one)]
    retain: u64,
}

impl RetainArgs {
    fn retain(&self) -> usize {
        usize::try_from(self.retain).unwrap_or(usize::MAX)
    }
}

/// How a checkpoint finds and writes the guest's state, as `run`, `worker` and `bench`
/// take it.
#[derive(clap::Args)]
struct StateArgs {
    /// How a checkpoint finds the changed pages: the kernel's record of written pages
    /// (Linux 6.7+), hashing every page, auto (kernel for large memories where the
    /// kernel offers it), or verify (kernel, checked by hashing everything).
    #[arg(long, default_value_t = DirtyTracking::Auto,
          value_parser = clap::builder::PossibleValuesParser::new(DirtyTracking::NAMES)
              .map(|s| s.parse::<DirtyTracking>().expect("a listed name")))]
    dirty_tracking: DirtyTracking,
    /// Deltas a page may have on top of its last whole version before the next is
    /// written whole: what a restore applies at most per page (0: no deltas; at most 63).
    #[arg(long, default_value_t = crate::snapshot::table::DEFAULT_MAX_DELTAS as u64,
          value_parser = clap::value_parser!(u64).range(0..=crate::snapshot::table::MAX_DELTAS_LIMIT as u64))]
    max_deltas: u64,
    /// Page cache directory: the last captured version of every page, the base of
    /// deltas [default: run: OUTPUT.wasnap-cache beside a file output, else in the user's
    /// cache directory; worker: the temporary directory, removed when it stops; bench: its
    /// scratch directory. A worker and a bench make a directory of their own in DIR and
    /// remove it when they stop].
    #[arg(long)]
    cache_dir: Option<PathBuf>,
}

/// A duration with its unit: `250ms`, `1s`, `1.5s`, `2m`, `1h`.
fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| format!("{text:?} has no unit (ms, s, m or h)"))?;
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a number with a unit"))?;
    let seconds = match unit {
        "ms" => number / 1000.0,
        "s" => number,
        "m" => number * 60.0,
        "h" => number * 3600.0,
        _ => return Err(format!("{text:?}: unknown unit {unit:?} (ms, s, m or h)")),
    };
    std::time::Duration::try_from_secs_f64(seconds)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| format!("{text:?} is not a positive duration"))
}

/// A guest's limits, as `run` and `worker` take them.
#[derive(clap::Args)]
struct LimitArgs {
    /// Cap on the guest's memory, in MiB (all memories together).
    #[arg(long, value_parser = at_least_one)]
    max_memory_mib: Option<u64>,
    /// Time limit for one guest call (`process`, `alloc`, `init`, `_initialize`, the start
    /// function; a component's calls), in milliseconds; the guest's sleeps count.
    #[arg(long, value_parser = at_least_one)]
    call_timeout_ms: Option<u64>,
}

impl LimitArgs {
    fn limits(&self) -> crate::guest::Limits {
        crate::guest::Limits {
            max_memory_bytes: self.max_memory_mib.map(|m| m.saturating_mul(1 << 20)),
            call_timeout: self.call_timeout_ms.map(std::time::Duration::from_millis),
        }
    }
}

/// A count of at least 1, for flags where 0 means nothing: clap's own range check says
/// "0 is not in 1..18446744073709551615".
fn at_least_one(value: &str) -> Result<u64, String> {
    match value.parse::<u64>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("`{value}` is not a whole number")),
    }
}

/// `KEY=VALUE` of `--config`: the key is everything before the first `=`.
fn parse_config_pair(pair: &str) -> Result<(String, String), String> {
    match pair.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_string(), value.to_string())),
        _ => Err(format!("`{pair}` is not KEY=VALUE")),
    }
}

/// The flags given on the command line that the chosen mode of subcommand `name` would
/// ignore, as a refusal; `None` when every flag given is used.
fn unused_flags(name: &str, sub: &clap::ArgMatches) -> Option<String> {
    let given = |id: &str| {
        sub.try_contains_id(id).unwrap_or(false)
            && sub.value_source(id) == Some(clap::parser::ValueSource::CommandLine)
    };
    let stdio = sub.try_get_one::<bool>("stdio").ok().flatten() == Some(&true);
    let (unused, why): (&[&str], &str) = match (name, stdio) {
        ("run", false) | ("bench", false) => (
            &["checkpoint_every_bytes"],
            "is for --stdio (a record guest checkpoints by --checkpoint-every and \
             --checkpoint-interval)",
        ),
        ("run", true) if given("config") => (&["config"], "is for components, not for --stdio"),
        ("run", true) => (
            &["checkpoint_every", "checkpoint_interval"],
            "is not for --stdio: a stdio program checkpoints by --checkpoint-every-bytes",
        ),
        ("bench", true) => (
            &[
                "output",
                "store",
                "json",
                "no_baseline",
                "checkpoint_every",
                "checkpoint_interval",
                "coalesce",
                "passes",
                "dirty_tracking",
                "max_deltas",
                "cache_dir",
            ],
            "is not for bench --stdio, which measures asyncify and checkpoints by \
             --checkpoint-every-bytes in a scratch store of its own",
        ),
        _ => (&[], ""),
    };
    if name == "run"
        && given("max_in_flight")
        && sub.try_get_one::<bool>("no_coalesce").ok().flatten() != Some(&true)
        && sub.try_get_one::<u64>("max_in_flight").ok().flatten() != Some(&0)
    {
        return Some(
            "--max-in-flight N is for --no-coalesce: captures that merge wait mostly by the \
             page copies they hold, not by their number (--max-in-flight 0 commits each \
             checkpoint before the guest goes on)"
                .into(),
        );
    }
    let mut flags: Vec<String> = unused
        .iter()
        .filter(|id| given(id))
        .map(|id| format!("--{}", id.replace('_', "-")))
        .collect();
    if name == "run"
        && stdio
        && sub
            .try_get_many::<PathBuf>("output")
            .ok()
            .flatten()
            .is_some_and(|o| o.len() > 1)
    {
        return Some(
            "--output more than once is for components (each is an emit target); a stdio \
             program has one output, its stdout"
                .into(),
        );
    }
    match flags.len() {
        0 => None,
        1 => Some(format!("{} {why}", flags.remove(0))),
        _ => Some(format!(
            "{} {}",
            flags.join(", "),
            why.replacen("is ", "are ", 1)
        )),
    }
}

/// Exit code when another writer owns the task.
pub const EXIT_FENCED: u8 = 3;

pub fn main() -> ExitCode {
    use clap::{CommandFactory as _, FromArgMatches as _};
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(err) => err.exit(),
    };
    // A flag the chosen mode would ignore is refused, not ignored.
    if let Some((name, sub)) = matches.subcommand()
        && let Some(refusal) = unused_flags(name, sub)
    {
        say!("wasnap: error: {refusal}");
        return ExitCode::from(2);
    }
    // Warnings (a tracker that fell back to hashing, a checkpoint that is unusable) show
    // without WASNAP_LOG; a worker, a service, also says which partitions come and go.
    let default_filter = match cli.command {
        Command::Worker { .. } => "error,wasnap=info",
        _ => "error,wasnap=warn",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("WASNAP_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Fields in colour on a terminal only: a log file gets plain `key=value`.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .event_format(log::Lines)
        .init();
    let result: Result<(), crate::Error> = match cli.command {
        Command::Run {
            guest,
            component: ComponentArgs {
                config: component_config,
            },
            stdio:
                StdioArgs {
                    stdio,
                    checkpoint_every_bytes,
                },
            input,
            output,
            on_trap,
            dead_letter,
            store,
            policy,
            seed,
            limits,
            retain,
            max_in_flight,
            no_coalesce,
            state,
            quiet,
        } => {
            let (checkpoint_every, checkpoint_interval) = policy.policy();
            match (on_trap.as_str(), &dead_letter) {
                ("skip", None) => {
                    say!(
                        "wasnap: error: --on-trap skip needs --dead-letter OUT: where the skipped records go"
                    );
                    return ExitCode::from(2);
                }
                ("stop", Some(_)) => {
                    say!(
                        "wasnap: error: --dead-letter is for --on-trap skip; a failing record stops the run by default"
                    );
                    return ExitCode::from(2);
                }
                ("skip", Some(_)) if stdio => {
                    say!(
                        "wasnap: error: --on-trap skip is for record guests: a stdio program's input has no records to skip"
                    );
                    return ExitCode::from(2);
                }
                _ => {}
            }
            // clap requires one --output at least.
            let mut outputs = output.into_iter();
            let config = RunConfig {
                guest,
                input,
                output: outputs.next().unwrap_or_default(),
                further_outputs: outputs.collect(),
                dead_letter,
                component_config,
                limits: limits.limits(),
                task: TaskConfig {
                    mode: if stdio {
                        Mode::stdio(checkpoint_every_bytes)
                    } else {
                        Mode::records(checkpoint_every)
                    },
                    random_seed: seed,
                    retain: retain.retain(),
                    max_in_flight: usize::try_from(max_in_flight).unwrap_or(usize::MAX),
                    cache_dir: state.cache_dir,
                    max_deltas: state.max_deltas as usize,
                    dirty_tracking: state.dirty_tracking,
                    checkpoint_interval,
                    // Captures the store cannot keep up with merge, whatever the policy
                    // (a stdio program's by bytes too), so the guest does not wait for
                    // the store.
                    coalesce: !no_coalesce,
                    ..TaskConfig::default()
                },
            };
            let mut progress = log::Progress::new(!quiet);
            task::run(&config, &store, &mut progress).map(|summary| {
                let finished_before = summary.resumed_from.is_some()
                    && summary.records == 0
                    && summary.input_bytes == 0;
                if !quiet && finished_before {
                    say!(
                        "wasnap: done: the task had already finished (newest checkpoint {}): \
                         nothing to do",
                        summary.generation
                    );
                } else if !quiet {
                    let resumed = summary
                        .resumed_from
                        .map_or(String::from("fresh start"), |g| {
                            format!("resumed from checkpoint {g}")
                        });
                    let secs = summary.elapsed.as_secs_f64().max(1e-9);
                    let work = if stdio {
                        format!(
                            "{} input bytes in {secs:.2}s ({:.1} MiB/s)",
                            summary.input_bytes,
                            summary.input_bytes as f64 / secs / 1048576.0
                        )
                    } else {
                        format!(
                            "{} records in {secs:.2}s ({:.0}/s)",
                            summary.records,
                            summary.records as f64 / secs
                        )
                    };
                    let skipped = match summary.skipped {
                        0 => String::new(),
                        n => format!("; {n} record(s) the guest failed on skipped to --dead-letter"),
                    };
                    say!(
                        "wasnap: done: {work}, {} checkpoints, newest generation {} ({resumed}){skipped}",
                        summary.checkpoints,
                        summary.generation,
                    );
                }
            })
        }
        Command::Bench {
            guest,
            stdio:
                StdioArgs {
                    stdio: true,
                    checkpoint_every_bytes,
                },
            input,
            ..
        } => bench::stdio::bench_stdio(&guest, &input, checkpoint_every_bytes)
            .and_then(|report| print_out(&report.summary(&guest.display().to_string())))
            .map_err(Into::into),
        Command::Bench {
            guest,
            input,
            output,
            policy,
            store,
            json,
            no_baseline,
            state,
            coalesce,
            passes,
            ..
        } => {
            let (checkpoint_every, checkpoint_interval) = policy.policy();
            let config = bench::BenchConfig {
                guest,
                input,
                output,
                checkpoint_every,
                checkpoint_interval,
                coalesce: coalesce || checkpoint_interval.is_some(),
                store,
                baseline: !no_baseline,
                compare_off: true,
                passes: passes as usize,
                max_deltas: state.max_deltas as usize,
                dirty_tracking: state.dirty_tracking,
                cache_dir: state.cache_dir,
            };
            // The first failure to print is reported once the run is over.
            let mut printed = Ok(());
            let mut print = |record: &bench::CheckpointRecord| {
                if json && printed.is_ok() {
                    let line = serde_json::to_string(record).expect("a record serialises");
                    printed = print_out(&format!("{line}\n"));
                }
            };
            bench::bench(&config, &mut print)
                .and_then(|report| {
                    printed?;
                    if json {
                        let line = serde_json::to_string(&report.summary_record())
                            .expect("a summary serialises");
                        return print_out(&format!("{line}\n"));
                    }
                    print_out(&report.summary(&config.guest.display().to_string()))
                })
                .map_err(Into::into)
        }
        Command::Worker {
            guest,
            component: ComponentArgs {
                config: component_config,
            },
            input,
            output,
            store,
            group,
            policy,
            metrics,
            session_timeout_ms,
            assignment,
            limits,
            retain,
            state,
        } => {
            let config = crate::fleet::WorkerConfig {
                guest,
                component_config,
                limits: limits.limits(),
                input,
                output,
                store,
                group,
                task: TaskConfig {
                    mode: Mode::records(policy.policy().0),
                    retain: retain.retain(),
                    dirty_tracking: state.dirty_tracking,
                    max_deltas: state.max_deltas as usize,
                    // An idle partition must still commit what it has: a worker always
                    // checkpoints by time too.
                    checkpoint_interval: Some(
                        policy
                            .checkpoint_interval
                            .unwrap_or(task::DEFAULT_CHECKPOINT_INTERVAL),
                    ),
                    ..TaskConfig::default()
                },
                metrics,
                cache_dir: state.cache_dir,
                session_timeout: std::time::Duration::from_millis(session_timeout_ms),
                assignment,
            };
            crate::fleet::run_worker(&config, signals::stop_requested())
        }
        Command::Inspect { store, details } => {
            inspect::inspect(&store, details).map_err(Into::into)
        }
        Command::Cat {
            output,
            store,
            target,
        } => cat(&output, store.as_deref(), target).map_err(Into::into),
        Command::Gc { store, retain } => gc(&store, retain.retain()).map_err(Into::into),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // One line naming the cause, outermost context first.
            say!("wasnap: error: {err}");
            match err.kind() {
                ErrorKind::Fenced => ExitCode::from(EXIT_FENCED),
                _ => ExitCode::FAILURE,
            }
        }
    }
}

/// The task id and marker of output `index` in a checkpoint's output marker: the run's
/// outputs in order, its dead letters last (`stream::multi`). Without an index, the task
/// must have one output: another's marker would cut this output at the wrong place.
fn output_of_target(
    task: [u8; 16],
    marker: Vec<u8>,
    index: Option<usize>,
) -> anyhow::Result<([u8; 16], Vec<u8>)> {
    let mut markers = crate::stream::multi::Markers::read(&marker)?.markers;
    let index = match index {
        Some(index) => index,
        None if markers.len() == 1 => 0,
        None => anyhow::bail!(
            "the task has {} outputs (its --output list, then any --dead-letter): say which \
             this is with --target 0 to {}",
            markers.len(),
            markers.len() - 1
        ),
    };
    if index >= markers.len() {
        anyhow::bail!(
            "the task has {} output(s), --target 0 to {}: --target {index} names none",
            markers.len(),
            markers.len().saturating_sub(1)
        );
    }
    Ok((
        crate::stream::multi::output_task_id(&task, index),
        markers.swap_remove(index),
    ))
}

fn cat(output: &str, store: Option<&str>, target: Option<usize>) -> anyhow::Result<()> {
    if target.is_some() && store.is_none() {
        anyhow::bail!("--target picks one of a task's outputs by its checkpoint: it needs --store");
    }
    // A local output that is not there is a mistyped name, not an empty output.
    let local = output.strip_prefix("file://").unwrap_or(output);
    if !output.contains("://") || output.starts_with("file://") {
        let path = std::path::Path::new(local);
        if !path.exists() {
            anyhow::bail!("output {} does not exist", path.display());
        }
    }
    // The store's task id and newest checkpoint's output marker.
    let newest = match store {
        None => None,
        Some(url) => {
            let store = crate::store::CheckpointStore::open_existing(url)
                .map_err(crate::Error::into_anyhow)?;
            match store
                .generations()
                .map_err(crate::Error::into_anyhow)?
                .last()
            {
                Some(&newest) => {
                    let marker = store.read_manifest(newest)?.output_position;
                    let task = store.task_id()?;
                    Some(output_of_target(task, marker, target)?)
                }
                None => anyhow::bail!("store {url} holds no checkpoint"),
            }
        }
    };
    let marker = newest.as_ref().map(|(_, marker)| marker.as_slice());
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    // The same rule as `run`'s, so `cat` reads what `run` wrote.
    match crate::stream::OutputKind::of(std::path::Path::new(output)) {
        crate::stream::OutputKind::Kafka => {
            let task = newest
                .as_ref()
                .map(|(task, marker)| (*task, marker.as_slice()));
            crate::stream::kafka::output::cat(output, task, &mut out)?;
        }
        crate::stream::OutputKind::File => {
            crate::stream::sink::cat_file(std::path::Path::new(output), marker, &mut out)?;
        }
        crate::stream::OutputKind::Parts => {
            crate::stream::object_output::cat(output, marker, &mut out)?;
        }
    }
    use std::io::Write;
    out.flush().or_else(|e| {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            Ok(())
        } else {
            Err(anyhow::Error::from(e).context("cannot write to standard output"))
        }
    })
}

fn gc(url: &str, retain: usize) -> anyhow::Result<()> {
    let store =
        crate::store::CheckpointStore::open_existing(url).map_err(crate::Error::into_anyhow)?;
    let Some(&newest) = store
        .generations()
        .map_err(crate::Error::into_anyhow)?
        .last()
    else {
        return print_out(&format!("no checkpoints in {url}\n"));
    };
    let before = store.total_bytes().map_err(crate::Error::into_anyhow)?;
    let report = store.prune(newest, retain)?;
    print_out(&format!(
        "kept checkpoints {:?}; deleted {} manifests, {} packs and {} staging files, freed {} bytes ({} -> {} bytes)\n",
        report.retained,
        report.manifests_deleted,
        report.packs_deleted,
        report.staging_deleted,
        report.bytes_freed,
        before,
        store.total_bytes().map_err(crate::Error::into_anyhow)?
    ))
}

/// Write to standard output. A reader that stops early (`wasnap bench --json | head`) is
/// not an error: the rest is dropped. Any other failure (a full disk behind a redirect) is.
fn print_out(text: &str) -> anyhow::Result<()> {
    use anyhow::Context as _;
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other.context("cannot write to standard output")?),
    }
}
