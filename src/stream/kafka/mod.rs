//! Kafka streams: one partition in (`input`), one partition out (`output`), exactly once.
//! The protocol and its failure cases are written down in `docs/KAFKA.md`.
//!
//! ```text
//! --input  kafka://HOST:PORT/TOPIC/PARTITION    one record per Kafka record (its value)
//! --output kafka://HOST:PORT/TOPIC[/PARTITION]  one Kafka record per output line (partition 0 by default)
//! ```

pub mod input;
pub mod output;

use std::time::Duration;

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use anyhow::{Result, anyhow, bail};
use rdkafka::ClientConfig;
use rdkafka::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{DeliveryResult, Message};
use rdkafka::producer::ProducerContext;

use crate::error::{ErrorKind, StoreUnavailable, error};

pub use input::KafkaSource;
pub use output::KafkaSink;

/// How long one request to the broker may take before the run stops with "unavailable"
/// (librdkafka retries within it).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// How long a read of the output waits for other transactions on the partition to end:
/// longer than wasnap's own `transaction.timeout.ms` (60 s), after which the broker aborts
/// a transaction its writer abandoned.
const STABLE_TIMEOUT: Duration = Duration::from_secs(75);

/// A partition of a topic on a broker, as a `kafka://` URL names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KafkaUrl {
    /// `HOST:PORT` (or several, comma-separated): librdkafka's `bootstrap.servers`.
    pub brokers: String,
    pub topic: String,
    pub partition: i32,
}

impl KafkaUrl {
    /// Parse `kafka://HOST:PORT/TOPIC/PARTITION`; without a partition, `default_partition`
    /// (none: the partition is required).
    pub fn parse(url: &str, default_partition: Option<i32>) -> Result<Self> {
        let form = if default_partition.is_some() {
            "kafka://HOST:PORT/TOPIC[/PARTITION]"
        } else {
            "kafka://HOST:PORT/TOPIC/PARTITION"
        };
        let rest = url
            .strip_prefix("kafka://")
            .ok_or_else(|| anyhow!("{url:?} is not a Kafka URL ({form})"))?;
        let mut fields = rest.split('/');
        let brokers = fields.next().unwrap_or_default();
        let topic = fields.next().unwrap_or_default();
        let partition = match (fields.next(), default_partition) {
            (Some(p), _) if !p.is_empty() => p
                .parse::<i32>()
                .ok()
                .filter(|p| *p >= 0)
                .ok_or_else(|| anyhow!("Kafka URL {url:?}: partition {p:?} is not a number"))?,
            (_, Some(default)) => default,
            (_, None) => bail!("Kafka URL {url:?} names no partition ({form})"),
        };
        if brokers.is_empty() || topic.is_empty() || fields.next().is_some() {
            bail!("Kafka URL {url:?}: expected {form}");
        }
        Ok(Self {
            brokers: brokers.to_string(),
            topic: topic.to_string(),
            partition,
        })
    }

    pub fn label(&self) -> String {
        format!("kafka://{}/{}/{}", self.brokers, self.topic, self.partition)
    }

    /// A client configuration for this broker.
    pub(crate) fn config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.brokers)
            .set("socket.timeout.ms", "10000")
            // librdkafka's logs reach `Quiet::log`: up to "info", where it reports a
            // connection lost (a broker restarting), which `Quiet` counts as trouble.
            .set_log_level(RDKafkaLogLevel::Info);
        // librdkafka's own debug contexts (`cgrp`, `protocol`, `all`…), for diagnosis:
        // they reach the log at WASNAP_LOG=debug.
        if let Ok(contexts) = std::env::var("WASNAP_KAFKA_DEBUG") {
            config
                .set("debug", contexts)
                .set_log_level(RDKafkaLogLevel::Debug);
        }
        config
    }

    /// A consumer of committed records only (`read_committed`), assigned by hand (no
    /// group: the checkpoint, not the broker, keeps the position). Its watermarks end at
    /// the last stable offset: below the first record of a transaction still open.
    pub(crate) fn consumer(&self) -> Result<BaseConsumer<Quiet>> {
        self.consumer_reading("read_committed")
    }

    /// A consumer of every record, committed, aborted or in an open transaction.
    pub(crate) fn uncommitted_consumer(&self) -> Result<BaseConsumer<Quiet>> {
        self.consumer_reading("read_uncommitted")
    }

    fn consumer_reading(&self, isolation: &str) -> Result<BaseConsumer<Quiet>> {
        self.config()
            .set("group.id", "wasnap")
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("isolation.level", isolation)
            .set("enable.partition.eof", "true")
            .set("auto.offset.reset", "error")
            .create_with_context(Quiet::default())
            .map_err(|e| self.unavailable(e, "cannot create a consumer"))
    }

    /// Check the partition exists, and return its watermarks: the first offset still
    /// held, and one past the last record written.
    fn watermarks(&self, consumer: &BaseConsumer<Quiet>) -> Result<(i64, i64)> {
        let metadata = consumer
            .fetch_metadata(Some(&self.topic), REQUEST_TIMEOUT)
            .map_err(|e| self.unavailable(e, "cannot read the broker's metadata"))?;
        let topic = metadata
            .topics()
            .iter()
            .find(|t| t.name() == self.topic)
            .ok_or_else(|| self.missing())?;
        if topic.error().is_some() {
            return Err(self.missing());
        }
        if !topic.partitions().iter().any(|p| p.id() == self.partition) {
            return Err(error(
                ErrorKind::Other,
                format!(
                    "Kafka topic {} has no partition {} (it has {})",
                    self.topic,
                    self.partition,
                    topic.partitions().len()
                ),
            ));
        }
        consumer
            .fetch_watermarks(&self.topic, self.partition, REQUEST_TIMEOUT)
            .map_err(|e| self.unavailable(e, "cannot read the partition's offsets"))
    }

    /// How many partitions the topic has; an error if it does not exist.
    pub(crate) fn partition_count<C: ConsumerContext>(
        &self,
        consumer: &BaseConsumer<C>,
    ) -> Result<usize> {
        let metadata = consumer
            .fetch_metadata(Some(&self.topic), REQUEST_TIMEOUT)
            .map_err(|e| self.unavailable(e, "cannot read the broker's metadata"))?;
        match metadata.topics().iter().find(|t| t.name() == self.topic) {
            Some(topic) if topic.error().is_none() && !topic.partitions().is_empty() => {
                Ok(topic.partitions().len())
            }
            _ => Err(self.missing()),
        }
    }

    /// One past the last record written to the partition, committed or not: the high
    /// watermark, which a `read_committed` consumer does not report.
    fn end_offset(&self) -> Result<i64> {
        let consumer = self.consumer_reading("read_uncommitted")?;
        Ok(self.watermarks(&consumer)?.1)
    }

    /// Wait until no transaction open on the partition holds back records below `end`
    /// (the last stable offset reaches it), so that a `read_committed` read up to `end`
    /// sees every committed record there. Another producer's transaction ends within its
    /// timeout; one that a broker forgot on a restart never does.
    fn wait_until_stable(&self, consumer: &BaseConsumer<Quiet>, end: i64) -> Result<()> {
        let deadline = std::time::Instant::now() + STABLE_TIMEOUT;
        loop {
            let (_, stable) = self.watermarks(consumer)?;
            if stable >= end {
                return Ok(());
            }
            if std::time::Instant::now() >= deadline {
                return Err(anyhow!(
                    "cannot read the committed records of {} up to offset {end}: a transaction left open at offset {stable} has held them back for {} s (another producer's, still running, or one the broker forgot when it restarted and will never end; on noida-db, delete and make the topic again)",
                    self.label(),
                    STABLE_TIMEOUT.as_secs()
                )
                .context(StoreUnavailable {
                    what: "the Kafka cluster",
                    store: format!("kafka://{}", self.brokers),
                }));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn missing(&self) -> anyhow::Error {
        error(
            ErrorKind::Other,
            format!(
                "Kafka topic {} does not exist on {} (create it first: wasnap does not create topics)",
                self.topic, self.brokers
            ),
        )
    }

    /// A broker that did not answer, or failed a request.
    fn unavailable(&self, err: KafkaError, doing: &str) -> anyhow::Error {
        anyhow!(err)
            .context(format!("{doing} ({})", self.label()))
            .context(StoreUnavailable {
                what: "the Kafka cluster",
                store: format!("kafka://{}", self.brokers),
            })
    }
}

/// The clients' context. librdkafka reports passing trouble (a broker restarting, the end
/// of a partition no one is polling) on its own channel; what matters to a run surfaces
/// as an error of the call that needed the broker, so these are only debug logs. A
/// producer also notes the offset of the last record the broker acknowledged.
#[derive(Default)]
pub struct Quiet {
    delivered: AtomicI64,
    troubles: AtomicU64,
}

impl Quiet {
    /// One past the offset of the last record delivered (0 before any).
    pub fn delivered_end(&self) -> i64 {
        self.delivered.load(Ordering::SeqCst)
    }

    /// How many errors and lost connections librdkafka has reported on its own channel
    /// (a broker restarting, say).
    pub fn troubles(&self) -> u64 {
        self.troubles.load(Ordering::SeqCst)
    }
}

impl ClientContext for Quiet {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        // A lost connection is logged (facility FAIL), not always reported as an error.
        if facility == "FAIL" {
            self.troubles.fetch_add(1, Ordering::SeqCst);
        }
        tracing::debug!(?level, facility, "librdkafka: {message}");
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.troubles.fetch_add(1, Ordering::SeqCst);
        tracing::debug!("librdkafka: {error}: {reason}");
    }
}

impl ConsumerContext for Quiet {}

impl ProducerContext for Quiet {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Ok(message) = result {
            self.delivered
                .fetch_max(message.offset() + 1, Ordering::SeqCst);
        }
    }
}

/// Whether a Kafka error says this producer was fenced by a newer one with the same
/// transactional id.
fn is_fenced(err: &KafkaError) -> bool {
    let code = match err {
        KafkaError::Transaction(e) => e.code(),
        other => match other.rdkafka_error_code() {
            Some(code) => code,
            None => return false,
        },
    };
    matches!(
        code,
        RDKafkaErrorCode::Fenced
            | RDKafkaErrorCode::ProducerFenced
            | RDKafkaErrorCode::InvalidProducerEpoch
    )
}

/// The header names wasnap's output records carry.
pub const TASK_HEADER: &str = "wasnap-task";
pub const SEQUENCE_HEADER: &str = "wasnap-seq";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_a_broker_topic_and_partition() {
        let url = KafkaUrl::parse("kafka://127.0.0.1:9092/words/3", None).unwrap();
        assert_eq!(
            (url.brokers.as_str(), url.topic.as_str(), url.partition),
            ("127.0.0.1:9092", "words", 3)
        );
        let out = KafkaUrl::parse("kafka://h:1/counts", Some(0)).unwrap();
        assert_eq!(out.partition, 0);
        for bad in [
            "kafka://h:1/words",
            "kafka://h:1/",
            "kafka:///t/0",
            "kafka://h:1/t/x",
            "kafka://h:1/t/-1",
            "kafka://h:1/t/0/extra",
            "s3://b/k",
        ] {
            assert!(KafkaUrl::parse(bad, None).is_err(), "{bad}");
        }
    }
}
