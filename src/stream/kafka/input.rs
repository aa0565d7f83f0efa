//! Input from one Kafka partition: each record's value is one guest record. The
//! checkpoint's position is the offset of the next record (with the topic and partition,
//! to refuse another input); the broker's group offsets are never used. A run reads up to
//! where the partition ended when the task was positioned, then ends like a file does.

use anyhow::{Result, anyhow, bail};
use rdkafka::Offset;
use rdkafka::TopicPartitionList;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;

use super::{KafkaUrl, Quiet, REQUEST_TIMEOUT};
use crate::codec::{Put, Reader};
use crate::error::changed;
use crate::stream::Source;

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
}

impl KafkaSource {
    /// The partition `url` names; it must exist (checked now, before anything is touched).
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
    fn resume_at(&mut self, position: Option<&[u8]>) -> Result<()> {
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
                    ));
                }
                if offset < low {
                    return Err(self.out_of_range(offset, low));
                }
                if offset > high {
                    return Err(changed!(
                        "input {} ends at offset {high}, but the checkpoint has consumed up to {offset}: the broker lost records it had acknowledged (restarted without them on disk?), or the topic was deleted and made again",
                        self.url.label()
                    ));
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
        self.end = high;
        self.done = next >= high;
        Ok(())
    }

    fn next_record(&mut self, record: &mut Vec<u8>) -> Result<bool> {
        let deadline = std::time::Instant::now() + REQUEST_TIMEOUT;
        while !self.done {
            let polled = self.consumer.poll(REQUEST_TIMEOUT);
            match polled {
                Some(Ok(message)) => {
                    record.clear();
                    record.extend_from_slice(message.payload().unwrap_or_default());
                    self.next = message.offset() + 1;
                    self.done = self.next >= self.end;
                    return Ok(true);
                }
                // The end of the committed records (the rest, if any, are transaction
                // markers or aborted records, which read_committed never returns).
                Some(Err(KafkaError::PartitionEOF(_))) => self.done = true,
                Some(Err(KafkaError::MessageConsumption(
                    RDKafkaErrorCode::OffsetOutOfRange | RDKafkaErrorCode::AutoOffsetReset,
                ))) => {
                    let (low, _) = self.url.watermarks(&self.consumer)?;
                    return Err(self.out_of_range(self.next, low));
                }
                // Transient (a broker restarting): librdkafka reconnects on its own.
                Some(Err(err)) if std::time::Instant::now() < deadline => {
                    tracing::debug!("input {}: {err}", self.url.label());
                }
                Some(Err(err)) => {
                    return Err(self.url.unavailable(err, "cannot read the partition"));
                }
                None => {
                    return Err(self.url.unavailable(
                        KafkaError::MessageConsumption(RDKafkaErrorCode::RequestTimedOut),
                        "no record arrived from the partition",
                    ));
                }
            }
        }
        Ok(false)
    }

    fn read(&mut self, _buf: &mut [u8]) -> Result<usize> {
        bail!("stdio mode reads its stdin from a file or an S3 object, not from Kafka")
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
