//! The tasks one worker runs: one thread per assigned partition, started when the group
//! assigns it, stopped (last checkpoint committed) before the group takes it away, and
//! restarted with a growing delay when it fails while still assigned.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::TopicUrl;
use super::metrics::{Metrics, TaskFigures};
use crate::Error;
use crate::guest::Guest;
use crate::store::CheckpointStore;
use crate::stream::kafka::{KafkaSink, KafkaSource};
use crate::task::{RunSummary, StopHandle, Task, TaskConfig};

/// What every task of a worker shares: compiled once, opened once.
pub(crate) struct Shared {
    pub guest: Arc<Guest>,
    /// The fleet's store; a task's is `within` it.
    pub store: CheckpointStore,
    pub input: TopicUrl,
    pub output: TopicUrl,
    pub task: TaskConfig,
    /// This worker's page caches, one directory per task.
    pub caches: PathBuf,
    pub metrics: Arc<Metrics>,
}

/// A failed task waits this long before its first restart, doubling up to `MAX_BACKOFF`.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

pub(crate) struct Tasks {
    shared: Arc<Shared>,
    running: Mutex<BTreeMap<i32, Running>>,
}

struct Running {
    stop: StopHandle,
    thread: Option<JoinHandle<Result<RunSummary, Error>>>,
    /// Failures in a row, and when the next restart is due.
    failures: u32,
    restart_at: Option<Instant>,
}

impl Tasks {
    pub fn new(shared: Shared) -> Self {
        Self {
            shared: Arc::new(shared),
            running: Mutex::new(BTreeMap::new()),
        }
    }

    fn running(&self) -> MutexGuard<'_, BTreeMap<i32, Running>> {
        // A panic elsewhere while holding the lock leaves the map usable.
        self.running
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Start a task for each of `partitions` not already running.
    pub fn start(&self, partitions: &[i32]) {
        let mut running = self.running();
        for &partition in partitions {
            running.entry(partition).or_insert_with(|| Running {
                stop: StopHandle::new(),
                thread: None,
                failures: 0,
                restart_at: Some(Instant::now()),
            });
        }
        drop(running);
        self.restart_failed();
    }

    /// Stop the tasks of `partitions`: each takes a last checkpoint, and this returns once
    /// every one of them has committed it (or failed) and ended.
    pub fn stop(&self, partitions: &[i32]) {
        let started = Instant::now();
        let stopping: Vec<(i32, Running)> = {
            let mut running = self.running();
            partitions
                .iter()
                .filter_map(|p| running.remove(p).map(|r| (*p, r)))
                .collect()
        };
        // All asked first, so they checkpoint at the same time.
        for (_, task) in &stopping {
            task.stop.stop();
        }
        let count = stopping.len();
        for (partition, task) in stopping {
            if let Some(thread) = task.thread {
                match thread.join() {
                    Ok(Ok(summary)) => tracing::info!(
                        partition,
                        generation = summary.generation,
                        "task stopped after its last checkpoint"
                    ),
                    Ok(Err(err)) => tracing::warn!(partition, "task ended with an error: {err}"),
                    Err(_) => tracing::error!(partition, "task thread panicked"),
                }
            }
            self.shared.metrics.remove(partition);
        }
        if count > 0 {
            tracing::info!(
                tasks = count,
                "stopped in {:.0} ms",
                started.elapsed().as_secs_f64() * 1e3
            );
        }
    }

    pub fn stop_all(&self) {
        let all: Vec<i32> = self.running().keys().copied().collect();
        self.stop(&all);
    }

    /// Start tasks that are due: newly assigned ones, and failed ones whose delay passed.
    pub fn restart_failed(&self) {
        let mut running = self.running();
        for (&partition, task) in running.iter_mut() {
            if let Some(thread) = task.thread.take_if(|t| t.is_finished()) {
                let err = match thread.join() {
                    Ok(Ok(_)) => "ended without being stopped".to_string(),
                    Ok(Err(err)) => err.to_string(),
                    Err(_) => "its thread panicked".to_string(),
                };
                let delay = FIRST_BACKOFF
                    .saturating_mul(1 << task.failures.min(5))
                    .min(MAX_BACKOFF);
                task.failures += 1;
                task.restart_at = Some(Instant::now() + delay);
                tracing::warn!(
                    partition,
                    "task failed ({err}); restarting in {:.0} s",
                    delay.as_secs_f64()
                );
                self.shared.metrics.task(partition).failed(&err);
            }
            if task.thread.is_none() && task.restart_at.is_some_and(|at| Instant::now() >= at) {
                task.restart_at = None;
                task.thread = self.spawn(partition, task.stop.clone());
                if task.thread.is_none() {
                    task.restart_at = Some(Instant::now() + MAX_BACKOFF);
                }
            }
        }
    }

    fn spawn(
        &self,
        partition: i32,
        stop: StopHandle,
    ) -> Option<JoinHandle<Result<RunSummary, Error>>> {
        let shared = Arc::clone(&self.shared);
        let figures = shared.metrics.task(partition);
        figures.opening();
        let spawned = std::thread::Builder::new()
            .name(format!("task-{partition}"))
            .spawn(move || {
                let outcome = run_task(&shared, partition, stop, &figures);
                if let Err(err) = &outcome {
                    figures.failed(&err.to_string());
                }
                outcome
            });
        match spawned {
            Ok(thread) => Some(thread),
            Err(err) => {
                tracing::error!(partition, "cannot start a task thread: {err}");
                None
            }
        }
    }
}

/// One partition's task: restore its newest checkpoint (or start fresh), then follow the
/// partition until stopped.
fn run_task(
    shared: &Shared,
    partition: i32,
    stop: StopHandle,
    figures: &Arc<TaskFigures>,
) -> Result<RunSummary, Error> {
    let store = shared
        .store
        .within(&format!("{}/{partition}", shared.input.topic));
    let source = KafkaSource::follow(&shared.input.partition(partition))?;
    let sink = KafkaSink::open(&shared.output.partition(partition))?;
    let config = TaskConfig {
        cache_dir: Some(
            shared
                .caches
                .join(format!("{}-{partition}", shared.input.topic)),
        ),
        ..shared.task.clone()
    };
    let mut task = Task::open(
        &config,
        &shared.guest,
        store,
        Box::new(source),
        Box::new(sink),
    )?
    .with_stop_handle(stop);
    tracing::info!(partition, generation = task.generation(), "task opened");
    figures.running(task.generation(), task.input_offset());
    task.run(&mut figures.observer())
}
