//! Membership of the Kafka consumer group: the group, not wasnap, decides which worker
//! runs which partition.
//!
//! The group consumer only takes part in the group; it reads no records (its partitions
//! are paused as soon as they are assigned). Each task reads its partition with a consumer
//! of its own, from the offset its checkpoint holds: the group's committed offsets are
//! never used.
//!
//! By default the eager protocol (range): on every rebalance each member gives up all its
//! partitions, then gets its new share. librdkafka calls the revoke callback before the
//! partitions are released, on the thread that polls; the tasks take their last checkpoint
//! and stop inside it, so the next owner restores a checkpoint nobody writes after. With
//! `--assignment cooperative-sticky` the callbacks name only the partitions that move
//! (the handlers below are the same: stop what is revoked, start what is assigned), and
//! the other tasks run on through the rebalance.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Result, anyhow};
use rdkafka::ClientContext;
use rdkafka::TopicPartitionList;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

use super::TopicUrl;
use super::tasks::Tasks;
use crate::error::StoreUnavailable;
use crate::stream::kafka::KafkaUrl;

/// How the group divides partitions among its workers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Assignment {
    /// Eager: every rebalance revokes every partition, then assigns them anew.
    #[default]
    Range,
    /// Incremental (KIP-429): a rebalance revokes only the partitions that move, so the
    /// other tasks go on running. Needs a broker whose coordinator supports it.
    CooperativeSticky,
}

impl Assignment {
    pub const NAMES: [&'static str; 2] = ["range", "cooperative-sticky"];

    fn strategy(self) -> &'static str {
        match self {
            Assignment::Range => "range",
            Assignment::CooperativeSticky => "cooperative-sticky",
        }
    }
}

impl std::str::FromStr for Assignment {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "range" => Ok(Assignment::Range),
            "cooperative-sticky" => Ok(Assignment::CooperativeSticky),
            other => Err(format!(
                "unknown assignment {other:?} (range, cooperative-sticky)"
            )),
        }
    }
}

pub(crate) struct Membership {
    consumer: BaseConsumer<GroupContext>,
    group: String,
}

struct GroupContext {
    tasks: Arc<Tasks>,
}

impl Membership {
    /// Join `group`, subscribed to the input topic; partitions arrive at a later `poll`.
    pub fn join(
        input: &TopicUrl,
        group: &str,
        session_timeout: Duration,
        assignment: Assignment,
        tasks: &Arc<Tasks>,
    ) -> Result<Self> {
        let url = input.at(0);
        let session_ms = session_timeout.as_millis().max(1000);
        let consumer: BaseConsumer<GroupContext> = url
            .config()
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false")
            .set("partition.assignment.strategy", assignment.strategy())
            .set("session.timeout.ms", session_ms.to_string())
            .set("heartbeat.interval.ms", (session_ms / 3).to_string())
            // Also the rebalance timeout: how long the group waits for every member to
            // rejoin (noida-db waits that long for a member that died, not the session
            // timeout). Twice the session timeout leaves the tasks time to take their
            // last checkpoints inside a revoke.
            .set("max.poll.interval.ms", (2 * session_ms).to_string())
            .create_with_context(GroupContext {
                tasks: Arc::clone(tasks),
            })
            .map_err(|e| unavailable(&url, e, "cannot create the group consumer"))?;
        // The topic must exist: the group would otherwise wait for it without a word.
        url.partition_count(&consumer)?;
        consumer
            .subscribe(&[&input.topic])
            .map_err(|e| unavailable(&url, e, "cannot join the consumer group"))?;
        Ok(Self {
            consumer,
            group: group.to_string(),
        })
    }

    /// Serve the group for up to `timeout`: heartbeats run on librdkafka's thread, but
    /// rebalances (and with them the tasks' starts and stops) happen here. An error is a
    /// refusal the worker cannot wait out (a session timeout the broker does not allow,
    /// a group it may not join); passing trouble is retried by librdkafka.
    pub fn poll(&self, timeout: Duration) -> Result<()> {
        match self.consumer.poll(timeout) {
            // Records of paused partitions fetched before the pause: not ours to read.
            Some(Ok(_)) | None => Ok(()),
            Some(Err(KafkaError::MessageConsumption(code))) if refuses_membership(code) => {
                let hint = if code == RDKafkaErrorCode::InvalidSessionTimeout {
                    " (--session-timeout-ms must lie within the broker's group.min.session.timeout.ms and group.max.session.timeout.ms; Kafka's lowest by default is 6000)"
                } else {
                    ""
                };
                Err(anyhow!(
                    "the broker refuses this worker in group {}: {code}{hint}",
                    self.group
                ))
            }
            Some(Err(err)) => {
                tracing::debug!("consumer group: {err}");
                Ok(())
            }
        }
    }

    /// Leave the group now, so its partitions go to the other workers at once.
    pub fn leave(self) {
        self.consumer.unsubscribe();
        // Closing runs the last revoke (the tasks already stopped) and sends LeaveGroup.
        drop(self.consumer);
    }
}

/// Errors of joining a group that retrying does not mend.
fn refuses_membership(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::InvalidSessionTimeout
            | RDKafkaErrorCode::InvalidGroupId
            | RDKafkaErrorCode::GroupAuthorizationFailed
            | RDKafkaErrorCode::TopicAuthorizationFailed
            | RDKafkaErrorCode::InconsistentGroupProtocol
    )
}

fn partitions(list: &TopicPartitionList) -> Vec<i32> {
    list.elements().iter().map(|e| e.partition()).collect()
}

fn unavailable(url: &KafkaUrl, err: KafkaError, doing: &str) -> anyhow::Error {
    anyhow!(err)
        .context(format!("{doing} (kafka://{}/{})", url.brokers, url.topic))
        .context(StoreUnavailable {
            what: "the Kafka cluster",
            store: format!("kafka://{}", url.brokers),
        })
}

impl ClientContext for GroupContext {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        tracing::debug!(?level, facility, "librdkafka (group): {message}");
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::debug!("librdkafka (group): {error}: {reason}");
    }
}

impl ConsumerContext for GroupContext {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(list) => {
                let partitions = partitions(list);
                tracing::info!(?partitions, "partitions revoked: last checkpoints");
                self.tasks.stop(&partitions);
            }
            Rebalance::Assign(_) => {}
            Rebalance::Error(err) => tracing::warn!("consumer group rebalance failed: {err}"),
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(list) = rebalance {
            let partitions = partitions(list);
            tracing::info!(?partitions, "partitions assigned");
            if let Err(err) = consumer.pause(list) {
                tracing::debug!("cannot pause the group consumer's partitions: {err}");
            }
            self.tasks.start(&partitions);
        }
    }
}
