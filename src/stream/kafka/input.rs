//! Input from one Kafka partition: each record's value is one guest record. The
//! checkpoint's position is the offset of the next record (with the topic and partition,
//! to refuse another input); the broker's group offsets are never used. A run reads up to
//! where the partition ended when the task was positioned, then ends like a file does; a
//! worker's task follows the partition as it grows.

use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};
use rdkafka::Offset;
use rdkafka::TopicPartitionList;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;

use super::{KafkaUrl, Quiet, REQUEST_TIMEOUT};
use crate::codec::{Put, Reader};
use crate::error::changed;
use crate::stream::{Polled, Source};

/// Records of one Kafka partition.
pub struct KafkaSource {
    url: KafkaUrl,
    consumer: BaseConsumer<Quiet>,
    /// The offset of the next record to hand out.
    next: i64,
    /// Where the source ends: the partition's last stable offset when it was positioned
    /// (one past its last record, unless a transaction was open there).
    end: i64,
    /// Whether the partition's end (of committed records) was reached.
    done: bool,
    /// Follow the partition as it grows (a worker's task) rather than end where it ended
    /// when the task was positioned (a run).
    follow: bool,
    /// Since when reads have failed (a broker away), if they do.
    trouble_since: Option<Instant>,
}

impl KafkaSource {
    /// The partition `url` names, read up to where it ends when the task positions it;
    /// it must exist (checked now, before anything is touched).
    pub fn open(url: &str) -> Result<Self> {
        let url = KafkaUrl::parse(url, None)?;
        let consumer = url.consumer()?;
        url.watermarks(&consumer)?;
        Ok(Self {
            url,
            consumer,
            next: 0,
            end: 0,
            done: false,
            follow: false,
            trouble_since: None,
        })
    }

    /// The partition `url` names, followed as it grows: it never ends, and
    /// [`Source::poll_record`] idles when no record is there yet.
    pub fn follow(url: &str) -> Result<Self> {
        Ok(Self {
            follow: true,
            ..Self::open(url)?
        })
    }

    /// What names this input in a position: topic and partition.
    fn identity(&self) -> Vec<u8> {
        format!("{}/{}", self.url.topic, self.url.partition).into_bytes()
    }

    fn out_of_range(&self, offset: i64, low: i64) -> anyhow::Error {
        changed!(
            "input {}: the checkpoint resumes at offset {offset}, but the partition now starts at {low}: records were deleted by retention before they were processed; resuming would skip them (start a new store to process what is left)",
            self.url.label()
        )
    }
}

impl Source for KafkaSource {
    fn resume_at(&mut self, position: Option<&[u8]>) -> crate::Result<()> {
        let (low, high) = self.url.watermarks(&self.consumer)?;
        let next = match position {
            None => low,
            Some(position) => {
                let what = format!("the checkpoint's position in input {}", self.url.label());
                let mut r = Reader::new(position, &what);
                let offset = r.varint()? as i64;
                let identity = &position[position.len() - r.remaining()..];
                if identity != self.identity().as_slice() {
                    return Err(changed!(
                        "input {} is not the input the checkpoint read ({}); run the task with the same --input",
                        self.url.label(),
                        String::from_utf8_lossy(identity)
                    ).into());
                }
                if offset < low {
                    return Err(self.out_of_range(offset, low).into());
                }
                if offset > high {
                    return Err(changed!(
                        "input {} ends at offset {high}, but the checkpoint has consumed up to {offset}: the broker lost records it had acknowledged (restarted without them on disk?), or the topic was deleted and made again",
                        self.url.label()
                    ).into());
                }
                offset
            }
        };
        let mut assignment = TopicPartitionList::new();
        assignment
            .add_partition_offset(&self.url.topic, self.url.partition, Offset::Offset(next))
            .map_err(|e| anyhow!(e))?;
        self.consumer
            .assign(&assignment)
            .map_err(|e| self.url.unavailable(e, "cannot read the partition"))?;
        self.next = next;
        self.end = if self.follow { i64::MAX } else { high };
        self.done = next >= self.end;
        Ok(())
    }

    fn next_record(&mut self, record: &mut Vec<u8>) -> crate::Result<bool> {
        loop {
            match self.poll_record(record, REQUEST_TIMEOUT)? {
                Polled::Record => return Ok(true),
                Polled::End => return Ok(false),
                Polled::Idle => {}
            }
        }
    }

    fn poll_record(&mut self, record: &mut Vec<u8>, wait: Duration) -> crate::Result<Polled> {
        // A partition read to its end has records up to there: one that sends none for as
        // long as a request may take is unavailable. Only a followed partition idles.
        let wait = if self.follow { wait } else { REQUEST_TIMEOUT };
        let deadline = Instant::now() + wait;
        while !self.done {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.consumer.poll(left) {
                Some(Ok(message)) => {
                    self.trouble_since = None;
                    record.clear();
                    record.extend_from_slice(message.payload().unwrap_or_default());
                    self.next = message.offset() + 1;
                    self.done = self.next >= self.end;
                    return Ok(Polled::Record);
                }
                // The end of the committed records (the rest, if any, are transaction
                // markers or aborted records, which read_committed never returns). A
                // followed partition waits for more.
                Some(Err(KafkaError::PartitionEOF(_))) => {
                    self.trouble_since = None;
                    if !self.follow {
                        self.done = true;
                    } else if Instant::now() >= deadline {
                        return Ok(Polled::Idle);
                    }
                }
                Some(Err(KafkaError::MessageConsumption(
                    RDKafkaErrorCode::OffsetOutOfRange | RDKafkaErrorCode::AutoOffsetReset,
                ))) => {
                    let (low, _) = self.url.watermarks(&self.consumer)?;
                    return Err(self.out_of_range(self.next, low).into());
                }
                // Transient (a broker restarting): librdkafka reconnects on its own, for
                // as long as one request may take.
                Some(Err(err)) => {
                    let since = *self.trouble_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= REQUEST_TIMEOUT {
                        return Err(self
                            .url
                            .unavailable(err, "cannot read the partition")
                            .into());
                    }
                    tracing::debug!("input {}: {err}", self.url.label());
                }
                None if self.follow => return Ok(Polled::Idle),
                None => {
                    return Err(self
                        .url
                        .unavailable(
                            KafkaError::MessageConsumption(RDKafkaErrorCode::RequestTimedOut),
                            "no record arrived from the partition",
                        )
                        .into());
                }
            }
        }
        Ok(Polled::End)
    }

    fn read(&mut self, _buf: &mut [u8]) -> crate::Result<usize> {
        Err(
            anyhow!("stdio mode reads its stdin from a file or an S3 object, not from Kafka")
                .into(),
        )
    }

    fn position(&self) -> Vec<u8> {
        let mut position = Vec::new();
        position.put_varint(self.next as u64);
        position.extend_from_slice(&self.identity());
        position
    }

    fn offset(&self) -> u64 {
        self.next as u64
    }
}
