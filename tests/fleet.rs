//! A fleet of `wasnap worker`s on real brokers with their tasks' checkpoints on the real S3
//! server (moto): workers killed with SIGKILL and replaced while records arrive, a worker
//! joining and leaving (eager and cooperative rebalancing), and every output partition read
//! back against an uninterrupted run of the guest over that partition's input, byte for
//! byte; and what a worker refuses before it joins.
//!
//! Two brokers, as two clusters would be: the input topic and the consumer group on tansu,
//! whose group coordinator expires a killed member and elects a new leader; the output
//! topic on noida-db, whose transactions and `read_committed` are right. (noida-db's
//! group coordinator keeps a killed leader forever and the group stops; tansu's
//! `read_committed` shows aborted records. Neither alone can test a fleet.)

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::kafka::{Broker, kafka, tansu};
use common::*;

/// Session timeout of the test workers: how long a killed worker's partitions wait.
const SESSION_TIMEOUT_MS: &str = "6000";

/// One fleet: an input and an output topic of `partitions` partitions, a store on S3, a
/// consumer group, and the workers started so far.
struct Fleet {
    dir: tempfile::TempDir,
    /// The input topic and the group's broker (tansu), and the output's (noida-db).
    groups: &'static Broker,
    broker: &'static Broker,
    input_topic: String,
    output_topic: String,
    store: String,
    group: String,
    /// Each partition's input lines, and what the guest writes for them uninterrupted.
    inputs: Vec<Vec<Vec<u8>>>,
    expected: Vec<Vec<u8>>,
    /// How many of each partition's lines were produced so far.
    produced: usize,
    /// The workers' `--assignment`.
    assignment: &'static str,
    /// The guest every worker runs.
    guest: PathBuf,
    workers: Vec<Worker>,
}

struct Worker {
    child: Child,
    log: PathBuf,
}

impl Fleet {
    fn new(name: &str, partitions: i32, records: usize) -> Self {
        Self::of_guest("wordcount", name, partitions, records)
    }

    fn of_guest(guest_name: &str, name: &str, partitions: i32, records: usize) -> Self {
        let broker = kafka();
        let groups = tansu();
        let dir = tempfile::tempdir().unwrap();
        let guest = guest(guest_name);
        let mut inputs = Vec::new();
        let mut expected = Vec::new();
        let mut rng = Rng::new(7);
        for p in 0..partitions {
            // Words of this partition's own: output sent to the wrong partition shows.
            let text: String = (0..records)
                .map(|_| {
                    let words = 1 + rng.below(6);
                    let line: Vec<String> = (0..words)
                        .map(|_| format!("p{p}w{}", rng.below(300)))
                        .collect();
                    line.join(" ") + "\n"
                })
                .collect();
            let file = dir.path().join(format!("input-{p}"));
            std::fs::write(&file, &text).unwrap();
            expected.push(reference_output(&guest, &file));
            inputs.push(text.lines().map(|l| l.as_bytes().to_vec()).collect());
        }
        let store = s3().fresh_url(&format!("fleet-{name}"));
        Self {
            input_topic: groups.fresh_topic(&format!("fleet-in-{name}"), partitions),
            output_topic: broker.fresh_topic(&format!("fleet-out-{name}"), partitions),
            group: format!("fleet-{name}-{}", std::process::id()),
            dir,
            groups,
            broker,
            store,
            inputs,
            expected,
            produced: 0,
            assignment: "range",
            guest,
            workers: Vec::new(),
        }
    }

    fn is_component(&self) -> bool {
        self.guest
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("component-"))
    }

    /// Produce the next `count` lines of every partition.
    fn produce(&mut self, count: usize) {
        let end = (self.produced + count).min(self.inputs[0].len());
        if end == self.produced {
            return;
        }
        for (p, lines) in self.inputs.iter().enumerate() {
            let mut text = lines[self.produced..end].join(&b'\n');
            text.push(b'\n');
            self.groups
                .produce_lines(&self.input_topic, p as i32, &text);
            let (_, high) = self.groups.watermarks(&self.input_topic, p as i32);
            assert_eq!(
                high, end as i64,
                "partition {p} of the input after producing"
            );
        }
        self.produced = end;
    }

    fn produce_rest(&mut self) {
        self.produce(usize::MAX / 2);
    }

    /// Start one more worker; returns its index.
    fn start_worker(&mut self) -> usize {
        let index = self.workers.len();
        let log = self.dir.path().join(format!("worker-{index}.log"));
        let child = wasnap()
            .args([
                "worker".to_string(),
                self.guest.display().to_string(),
                "--input".into(),
                self.groups.url(&self.input_topic, None),
                "--output".into(),
                self.broker.url(&self.output_topic, None),
                "--store".into(),
                self.store.clone(),
                "--group".into(),
                self.group.clone(),
                "--checkpoint-every".into(),
                "400".into(),
                "--checkpoint-interval".into(),
                "300ms".into(),
                "--assignment".into(),
                self.assignment.into(),
                "--session-timeout-ms".into(),
                SESSION_TIMEOUT_MS.into(),
                // Port 0: the worker logs the port it bound. (A port picked here and
                // bound later could be taken in between by another test's worker.)
                "--metrics".into(),
                "127.0.0.1:0".into(),
                "--cache-dir".into(),
                self.dir.path().join("caches").display().to_string(),
            ])
            // A component's configuration reaches each task's fs-init.
            .args(
                self.is_component()
                    .then_some(["--config", "store=fleet-counts"])
                    .into_iter()
                    .flatten(),
            )
            .env("WASNAP_LOG", "wasnap=info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        self.workers.push(Worker { child, log });
        index
    }

    fn kill(&mut self, index: usize) {
        let child = &mut self.workers[index].child;
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// Ask a worker to stop (SIGTERM): last checkpoints, leave the group, exit 0.
    fn stop(&mut self, index: usize) {
        let worker = &mut self.workers[index];
        unsafe { libc::kill(worker.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = worker.child.try_wait().unwrap() {
                assert!(
                    status.success(),
                    "worker {index} exited with {status} on SIGTERM:\n{}",
                    self.log(index)
                );
                return;
            }
            assert!(Instant::now() < deadline, "worker {index} did not stop");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The tasks worker `index` has committed a checkpoint of since it last opened them,
    /// with the newest committed generation of each.
    fn committed_tasks(&self, index: usize) -> Vec<(i32, u64)> {
        let metrics = self.metrics(index);
        let log = self.log(index);
        self.partitions_of(index)
            .into_iter()
            .filter_map(|p| {
                let label = format!(
                    "wasnap_task_generation{{topic=\"{}\",partition=\"{p}\"}}",
                    self.input_topic
                );
                let generation = metrics.iter().find(|(n, _)| *n == label)?.1 as u64;
                (generation > opened_at(&log, p).unwrap_or(0)).then_some((p, generation))
            })
            .collect()
    }

    fn running(&mut self, index: usize) -> bool {
        self.workers[index].child.try_wait().unwrap().is_none()
    }

    fn log(&self, index: usize) -> String {
        std::fs::read_to_string(&self.workers[index].log).unwrap_or_default()
    }

    /// The figures a worker serves, as (name with labels, value).
    fn metrics(&self, index: usize) -> Vec<(String, f64)> {
        // The address the worker logged once it bound its port.
        let log = self.log(index);
        let Some(address) =
            (log.lines()).find_map(|l| l.split("metrics at http://").nth(1)?.split('/').next())
        else {
            return Vec::new();
        };
        let Ok(mut stream) = TcpStream::connect(address) else {
            return Vec::new();
        };
        write!(stream, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut page = String::new();
        let _ = stream.read_to_string(&mut page);
        page.lines()
            .filter(|l| !l.starts_with('#') && !l.starts_with("HTTP") && l.contains(' '))
            .filter_map(|l| {
                let (name, value) = l.rsplit_once(' ')?;
                Some((name.to_string(), value.parse().ok()?))
            })
            .collect()
    }

    /// The partitions a worker runs a task for (opened and running), by its metrics.
    fn partitions_of(&self, index: usize) -> Vec<i32> {
        self.metrics(index)
            .iter()
            .filter(|(name, up)| name.starts_with("wasnap_task_up{") && *up == 1.0)
            .filter_map(|(name, _)| {
                name.split("partition=\"")
                    .nth(1)?
                    .split('"')
                    .next()?
                    .parse()
                    .ok()
            })
            .collect()
    }

    /// Wait until every output partition holds as many bytes as the uninterrupted run
    /// wrote (or more: duplicates), then compare each byte for byte.
    fn assert_exact_output(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        for (p, expected) in self.expected.iter().enumerate() {
            loop {
                let got = self.broker.read_committed(&self.output_topic, p as i32);
                if got.len() >= expected.len() || Instant::now() >= deadline {
                    if got != *expected {
                        eprintln!("{}", self.logs());
                    }
                    assert_same_output(&got, expected, &format!("output partition {p}"));
                    break;
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    }

    /// Wait until `done` holds, polling; panics with `what` and the logs after `timeout`.
    fn wait_until(&self, timeout: Duration, what: &str, done: impl Fn(&Self) -> bool) {
        let deadline = Instant::now() + timeout;
        while !done(self) {
            assert!(
                Instant::now() < deadline,
                "timed out waiting until {what}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Each worker's log and where its tasks stand, for a failure message.
    fn logs(&self) -> String {
        (0..self.workers.len())
            .map(|i| {
                let standing: String = self
                    .metrics(i)
                    .iter()
                    .filter(|(name, _)| {
                        name.starts_with("wasnap_task_input_offset")
                            || name.starts_with("wasnap_task_lag")
                    })
                    .map(|(name, value)| format!("{name} {value}\n"))
                    .collect();
                format!("--- worker {i}\n{}{standing}", self.log(i))
            })
            .collect()
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for worker in &mut self.workers {
            let _ = worker.child.kill();
            let _ = worker.child.wait();
        }
    }
}

/// The newest generation a log says `partition`'s task was opened at.
fn opened_at(log: &str, partition: i32) -> Option<u64> {
    log.lines()
        .filter(|l| l.contains("task opened") && l.contains(&format!("partition={partition} ")))
        .filter_map(|l| {
            l.split("generation=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .max()
}

/// Kill -9 a random worker every few seconds and start a new one, ten times, while records
/// arrive; then the survivors stop cleanly.
#[test]
fn three_workers_killed_and_replaced_ten_times_write_each_record_once_in_order() {
    workers_killed_and_replaced("wordcount", 8, 10);
}

mod component_workers_killed_and_replaced_write_each_record_once_in_order {
    use super::workers_killed_and_replaced;

    #[test]
    fn python() {
        workers_killed_and_replaced("component-python", 4, 4);
    }

    #[test]
    fn rust() {
        workers_killed_and_replaced("component-rust", 4, 3);
    }

    /// Fewer partitions and kills: each task of this guest has 80 MiB of memory and
    /// dirties about 320 pages a checkpoint. Still one partition per worker at least:
    /// a victim with none would never commit.
    #[test]
    fn javascript() {
        workers_killed_and_replaced("component-js", 3, 2);
    }
}

/// Three workers of `guest_name` over `partitions` partitions, one killed at random and
/// replaced `kill_count` times while records keep coming: every output partition must then
/// equal an uninterrupted run's, and every kill must have come after commits that a later
/// restore resumed from.
fn workers_killed_and_replaced(guest_name: &str, partitions: i32, kill_count: usize) {
    const RECORDS: usize = 3000;
    let mut fleet = Fleet::of_guest(
        guest_name,
        &format!("kills-{guest_name}"),
        partitions,
        RECORDS,
    );
    fleet.produce(RECORDS / 4);
    let mut live: Vec<usize> = (0..3).map(|_| fleet.start_worker()).collect();
    let mut rng = Rng::from_env_or_clock("fleet kills");
    // Per kill: the tasks the victim had committed checkpoints of (partition, generation),
    // and where each worker's log stood.
    let mut kills = Vec::new();
    for kill in 0..kill_count {
        std::thread::sleep(Duration::from_millis(1500 + rng.below(3000)));
        // Records keep arriving while workers die; the batches leave an eighth of the
        // input for the waits below, or a victim whose tasks reopened after the last batch
        // (a worker joined) could not commit again.
        fleet.produce((RECORDS * 3 / 4 - RECORDS / 8).div_ceil(kill_count));
        let victim = live.remove(rng.below(live.len() as u64) as usize);
        assert!(
            fleet.running(victim),
            "worker {victim} died on its own before kill {kill}:\n{}",
            fleet.log(victim)
        );
        // The kill lands after the victim committed checkpoints of tasks it runs. A task
        // checkpoints only once records came: a few more keep coming while it waits.
        // The logs are marked before each look, and the mark kept with what that look
        // found: a rebalance (a worker just joined) may hand those tasks over at any
        // moment after, and their next owner then opens them after the mark.
        let deadline = Instant::now() + Duration::from_secs(60);
        let (committed, logs_at) = loop {
            let logs_at: Vec<usize> = (0..fleet.workers.len())
                .map(|i| fleet.log(i).len())
                .collect();
            let committed = fleet.committed_tasks(victim);
            if !committed.is_empty() {
                break (committed, logs_at);
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting until worker {victim} commits a checkpoint before kill {kill}\n{}",
                fleet.logs()
            );
            std::thread::sleep(Duration::from_millis(500));
            fleet.produce(2);
        };
        std::thread::sleep(Duration::from_millis(rng.below(500)));
        fleet.kill(victim);
        kills.push((committed, logs_at));
        live.push(fleet.start_worker());
    }
    fleet.produce_rest();
    fleet.assert_exact_output(Duration::from_secs(180));
    // Every task is owned by exactly one live worker.
    fleet.wait_until(
        Duration::from_secs(60),
        "every task has one live owner",
        |fleet| {
            let mut owned: Vec<i32> = live.iter().flat_map(|&w| fleet.partitions_of(w)).collect();
            owned.sort();
            owned == (0..partitions).collect::<Vec<_>>()
        },
    );
    // Every kill came after the victim had committed checkpoints, and each of those tasks
    // was opened again afterwards (by now every task has a live owner) from that
    // checkpoint or a newer one.
    let resumed = kills
        .iter()
        .filter(|(committed, logs_at)| {
            !committed.is_empty()
                && committed.iter().all(|&(partition, generation)| {
                    (0..fleet.workers.len()).any(|i| {
                        let log = fleet.log(i);
                        let after = &log[logs_at.get(i).copied().unwrap_or(0).min(log.len())..];
                        opened_at(after, partition).is_some_and(|g| g >= generation)
                    })
                })
        })
        .count();
    assert_eq!(
        resumed,
        kill_count,
        "only {resumed} of {kill_count} kills came after commits that later restores resumed from: {kills:?}\n{}",
        fleet.logs()
    );
    // The survivors stop cleanly.
    for worker in live {
        fleet.stop(worker);
    }
    // Nothing more after the clean stops (their last checkpoints wrote no output twice).
    fleet.assert_exact_output(Duration::from_secs(10));
    if fleet.is_component() {
        let task_store = format!("{}/{}/0", fleet.store, fleet.input_topic);
        let inspect = run_ok(&[
            "inspect".into(),
            "--store".into(),
            task_store,
            "--details".into(),
        ]);
        let text = String::from_utf8_lossy(&inspect.stdout);
        assert!(text.contains("store(s) [fleet-counts]"), "{text}");
    }
}

#[test]
fn a_joining_worker_takes_partitions_over_and_hands_them_back_where_they_stood() {
    joining_worker("range");
}

/// The same with incremental rebalancing: the first worker's tasks that do not move run
/// on through both rebalances (none of them is stopped).
#[test]
fn with_cooperative_rebalancing_only_the_tasks_that_move_stop() {
    joining_worker("cooperative-sticky");
}

fn joining_worker(assignment: &'static str) {
    const PARTITIONS: i32 = 6;
    const RECORDS: usize = 2000;
    let mut fleet = Fleet::new(&format!("join-{assignment}"), PARTITIONS, RECORDS);
    fleet.assignment = assignment;
    fleet.produce(RECORDS / 3);
    let first = fleet.start_worker();
    fleet.wait_until(
        Duration::from_secs(60),
        "the first worker runs every task",
        |fleet| fleet.partitions_of(first).len() == PARTITIONS as usize,
    );
    let second = fleet.start_worker();
    fleet.wait_until(
        Duration::from_secs(60),
        "the second worker takes partitions over",
        |fleet| {
            let (a, b) = (fleet.partitions_of(first), fleet.partitions_of(second));
            !b.is_empty() && a.len() + b.len() == PARTITIONS as usize
        },
    );
    let moved = fleet.partitions_of(second);
    fleet.produce(RECORDS / 3);
    // The second worker commits checkpoints of its own for what it took over.
    fleet.wait_until(
        Duration::from_secs(60),
        "the second worker commits",
        |fleet| {
            fleet.metrics(second).iter().any(|(name, value)| {
                name.starts_with("wasnap_task_checkpoints_total{") && *value > 0.0
            })
        },
    );
    fleet.stop(second);
    fleet.wait_until(
        Duration::from_secs(60),
        "the first worker runs every task again",
        |fleet| fleet.partitions_of(first).len() == PARTITIONS as usize,
    );
    // Each partition that moved back resumed from the last checkpoint the second worker
    // committed, not from an older one of the first worker's.
    let second_log = fleet.log(second);
    let first_log = fleet.log(first);
    if assignment == "cooperative-sticky" {
        for p in (0..PARTITIONS).filter(|p| !moved.contains(p)) {
            assert_eq!(
                last_generation_logged(&first_log, p, "task stopped after its last checkpoint"),
                None,
                "partition {p} never moved, yet its task was stopped:\n{first_log}"
            );
        }
    }
    for p in &moved {
        let stopped_at =
            last_generation_logged(&second_log, *p, "task stopped after its last checkpoint")
                .unwrap_or_else(|| {
                    panic!("partition {p}: no last checkpoint logged:\n{second_log}")
                });
        let reopened_at = last_generation_logged(&first_log, *p, "task opened")
            .unwrap_or_else(|| panic!("partition {p}: not reopened:\n{first_log}"));
        assert_eq!(
            reopened_at, stopped_at,
            "partition {p} came back at generation {reopened_at}, not at the second worker's last ({stopped_at})"
        );
    }
    fleet.produce_rest();
    fleet.assert_exact_output(Duration::from_secs(120));
    fleet.stop(first);
    // `inspect` on the fleet's store: one line per task, at its input's end.
    let inspect = run_ok(&["inspect".into(), "--store".into(), fleet.store.clone()]);
    let text = String::from_utf8_lossy(&inspect.stdout);
    assert!(text.contains(&format!("{PARTITIONS} tasks in")), "{text}");
    for p in 0..PARTITIONS {
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("{}/{p} ", fleet.input_topic)))
            .unwrap_or_else(|| panic!("no line for partition {p}:\n{text}"));
        let offset: u64 = line.split_whitespace().nth(3).unwrap().parse().unwrap();
        assert_eq!(offset, RECORDS as u64, "partition {p}: {line}");
    }
}

/// The generation of the last line of `log` that says `what` about `partition`.
fn last_generation_logged(log: &str, partition: i32, what: &str) -> Option<u64> {
    log.lines()
        .filter(|l| l.contains(what) && l.contains(&format!("partition={partition} ")))
        .filter_map(|l| {
            l.split("generation=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .next_back()
}

/// A worker refuses, before joining, what it could never run: a missing output topic, an
/// output with fewer partitions than the input, a URL naming a partition, a file that is
/// not a guest.
#[test]
fn a_worker_refuses_topics_it_cannot_run() {
    let (groups, broker) = (tansu(), kafka());
    let input = groups.fresh_topic("refuse-in", 4);
    let few = broker.fresh_topic("refuse-few", 2);
    let enough = broker.fresh_topic("refuse-out", 4);
    let dir = tempfile::tempdir().unwrap();
    let not_wasm = dir.path().join("guest.wasm");
    std::fs::write(&not_wasm, "hello").unwrap();
    let store = dir.path().join("store").display().to_string();
    let worker = |guest: &std::path::Path, input: String, output: String| {
        let out = wasnap()
            .args(["worker".to_string(), guest.display().to_string()])
            .args(["--input".to_string(), input, "--output".into(), output])
            .args(["--store", &store, "--group", "refuse"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
        stderr(&out)
    };
    let wordcount = guest("wordcount");
    let cases = [
        (
            &wordcount,
            groups.url(&input, None),
            broker.url("no-such-topic", None),
            "does not exist",
        ),
        (
            &wordcount,
            groups.url(&input, None),
            broker.url(&few, None),
            "fewer than input topic",
        ),
        (
            &wordcount,
            groups.url(&input, Some(1)),
            broker.url(&few, None),
            "the group assigns",
        ),
        (
            &not_wasm,
            groups.url(&input, None),
            broker.url(&enough, None),
            "not a WebAssembly module",
        ),
    ];
    for (guest, input, output, expected) in cases {
        let message = worker(guest, input, output);
        assert!(
            message.contains(expected),
            "expected {expected:?}: {message}"
        );
    }
    assert!(
        !dir.path().join("store").join(&input).exists(),
        "nothing was written"
    );
}
