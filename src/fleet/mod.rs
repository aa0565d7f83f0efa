//! A fleet of workers: `wasnap worker` runs one task per Kafka partition it is assigned.
//!
//! - `group`: membership of the consumer group, which assigns the partitions; a revoked
//!   partition's task takes a last checkpoint and stops before the partition is released;
//! - `tasks`: the tasks this process runs, one thread each, sharing one compiled guest,
//!   one object-store client and I/O runtime;
//! - `metrics`: per-task figures, served to Prometheus (`--metrics`).
//!
//! No coordinator of wasnap's own: Kafka's group protocol decides who runs a partition,
//! and the store (manifest create-if-absent, then a listing) and the output's
//! transactional id fence a worker that still runs a task it no longer owns. A task whose
//! worker died resumes from its newest checkpoint wherever the partition goes next.
//!
//! Layout: partition `P` of input topic `T` is task `PREFIX/T/P` in the store, and writes
//! partition `P` of the output topic.

mod group;
pub mod metrics;
mod tasks;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::guest::{Guest, Limits};
use crate::store::CheckpointStore;
use crate::stream::kafka::KafkaUrl;
use crate::task::TaskConfig;
pub use group::Assignment;
use group::Membership;
use metrics::Metrics;
use tasks::Tasks;

/// How often a worker without work to do checks on its tasks and its stop flag.
const TICK: Duration = Duration::from_millis(200);

/// What `wasnap worker` is asked to run.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// The guest: a record-ABI core module (.wasm or .wat) or a processor component.
    pub guest: PathBuf,
    /// A component's `--config` pairs, given to each task's `fs-init` on a fresh start.
    pub component_config: Vec<(String, String)>,
    pub limits: Limits,
    /// `kafka://HOST:PORT/TOPIC`: the topic whose partitions are the tasks.
    pub input: String,
    /// `kafka://HOST:PORT/TOPIC`: partition P of the input writes partition P here.
    pub output: String,
    /// The store holding every task: `PREFIX/<topic>/<partition>` each.
    pub store: String,
    /// The consumer group the workers of one fleet share.
    pub group: String,
    /// Every task's knobs (record mode; the interval makes an idle partition commit).
    pub task: TaskConfig,
    /// Serve per-task figures for Prometheus at `http://ADDR/metrics`.
    pub metrics: Option<SocketAddr>,
    /// Where this worker's page caches go (one directory per task, removed when the
    /// worker stops) [default: the temporary directory].
    pub cache_dir: Option<PathBuf>,
    /// Kafka's `session.timeout.ms`: how long a worker that stopped answering keeps its
    /// partitions before the group gives them to others.
    pub session_timeout: Duration,
    /// Eager (range) or incremental (cooperative-sticky) rebalancing.
    pub assignment: Assignment,
}

/// A topic as `--input`/`--output` of a worker names it.
#[derive(Clone, Debug)]
pub(crate) struct TopicUrl {
    pub brokers: String,
    pub topic: String,
}

impl TopicUrl {
    fn parse(url: &str, what: &str) -> Result<Self> {
        let parsed = KafkaUrl::parse(url, Some(0))
            .with_context(|| format!("{what} of a worker: expected kafka://HOST:PORT/TOPIC"))?;
        if url.trim_end_matches('/').matches('/').count() != 3 {
            bail!(
                "{what} {url:?}: a worker's {what} names a topic (kafka://HOST:PORT/TOPIC); the group assigns its partitions"
            );
        }
        Ok(Self {
            brokers: parsed.brokers,
            topic: parsed.topic,
        })
    }

    /// Partition `partition` of this topic.
    pub fn at(&self, partition: i32) -> KafkaUrl {
        KafkaUrl {
            brokers: self.brokers.clone(),
            topic: self.topic.clone(),
            partition,
        }
    }

    /// Partition `partition` of this topic, as a task's `--input`/`--output` names it.
    pub fn partition(&self, partition: i32) -> String {
        self.at(partition).label()
    }
}

/// Both topics exist, and the output has a partition for every input partition.
fn check_partitions(input: &TopicUrl, output: &TopicUrl) -> Result<()> {
    let count = |topic: &TopicUrl| {
        let url = topic.at(0);
        url.partition_count(&url.consumer()?)
    };
    let (inputs, outputs) = (count(input)?, count(output)?);
    if outputs < inputs {
        bail!(
            "output topic {} has {outputs} partitions, fewer than input topic {}'s {inputs}: input partition P writes output partition P",
            output.topic,
            input.topic
        );
    }
    Ok(())
}

/// Run a worker until `stop` is set (SIGTERM, SIGINT): join the group, run a task for
/// every partition assigned, hand partitions over on a rebalance; at the end, every task
/// takes a last checkpoint before the worker leaves the group.
pub fn run_worker(config: &WorkerConfig, stop: &AtomicBool) -> Result<(), crate::Error> {
    let input = TopicUrl::parse(&config.input, "input")?;
    let output = TopicUrl::parse(&config.output, "output")?;
    if config.task.mode.is_stdio() {
        return Err(anyhow::anyhow!("a worker runs record guests, not stdio programs").into());
    }
    // Everything a task needs that can fail for the whole fleet fails here, first.
    check_partitions(&input, &output)?;
    let mut guest = Guest::load_with_limits(&config.guest, config.limits)?;
    guest.set_component_config(config.component_config.clone())?;
    let guest = Arc::new(guest);
    let store = CheckpointStore::open(&config.store)?;
    let cache_base = config.cache_dir.clone().unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&cache_base)
        .with_context(|| format!("cannot create cache directory {}", cache_base.display()))?;
    // This process's own: two workers on one machine never share a page cache.
    let caches = tempfile::Builder::new()
        .prefix("wasnap-worker-")
        .tempdir_in(&cache_base)
        .with_context(|| {
            format!(
                "cannot create a cache directory in {}",
                cache_base.display()
            )
        })?;
    let metrics = Arc::new(Metrics::new(&input));
    let _server = match config.metrics {
        Some(addr) => Some(metrics::serve(addr, Arc::clone(&metrics))?),
        None => None,
    };
    let tasks = Arc::new(Tasks::new(tasks::Shared {
        guest,
        store,
        input: input.clone(),
        output,
        task: config.task.clone(),
        caches: caches.path().to_path_buf(),
        metrics: Arc::clone(&metrics),
    }));
    let membership = Membership::join(
        &input,
        &config.group,
        config.session_timeout,
        config.assignment,
        &tasks,
    )?;
    tracing::info!(
        group = config.group,
        topic = input.topic,
        "worker joined; waiting for partitions"
    );
    let mut outcome = Ok(());
    while !stop.load(Ordering::Relaxed) && outcome.is_ok() {
        outcome = membership.poll(TICK);
        tasks.restart_failed();
    }
    tracing::info!("worker stopping: last checkpoints, then leaving the group");
    tasks.stop_all();
    membership.leave();
    Ok(outcome?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_names_topics_not_partitions() {
        let url = TopicUrl::parse("kafka://127.0.0.1:9092/words", "input").unwrap();
        assert_eq!(
            (url.brokers.as_str(), url.topic.as_str()),
            ("127.0.0.1:9092", "words")
        );
        assert_eq!(url.partition(7), "kafka://127.0.0.1:9092/words/7");
        assert!(TopicUrl::parse("kafka://h:1/words/", "input").is_ok());
        let err = TopicUrl::parse("kafka://h:1/words/3", "input").unwrap_err();
        assert!(format!("{err:#}").contains("the group assigns"), "{err:#}");
        assert!(TopicUrl::parse("s3://b/k", "output").is_err());
    }
}
