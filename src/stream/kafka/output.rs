//! Output to one Kafka partition, exactly once, by two means together (see
//! `docs/KAFKA.md`):
//!
//! - **Transactions fence zombies.** The producer's `transactional.id` is the task's
//!   (`wasnap-<task id>`, the same on every machine); opening the task calls
//!   `init_transactions`, which aborts whatever a previous writer left open and fences it:
//!   its next commit fails, and it stops (exit 3). Each checkpoint's output is one
//!   transaction, committed before the checkpoint's manifest (`make_durable`).
//! - **Sequence numbers make a replay idempotent.** Every record carries the task id and
//!   its output sequence number in headers. A crash after a transaction committed but
//!   before its manifest did means the next run replays records that are already in the
//!   partition; after fencing the old writer, it reads the partition (read_committed) for
//!   this task's highest sequence number and skips every replayed record up to it. Guests
//!   are deterministic, so a replayed record is the record already there.
//!
//! Consumers of the output read with `isolation.level=read_committed`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Result, anyhow};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};

use super::{KafkaUrl, Quiet, REQUEST_TIMEOUT, SEQUENCE_HEADER, TASK_HEADER, is_fenced};
use crate::codec::{Put, Reader};
use crate::error::{ErrorKind, Kinded, changed};
use crate::hex;
use crate::stream::{OutputCommit, OutputFlush, Sink};

/// Records of one Kafka partition, written in one transaction per checkpoint.
pub struct KafkaSink {
    url: KafkaUrl,
    task: [u8; 16],
    producer: Option<Arc<BaseProducer<Quiet>>>,
    /// Sequence number of the next record emitted, and output bytes emitted, as of the
    /// last checkpoint.
    next_seq: u64,
    bytes: u64,
    buffer: Vec<u8>,
    shared: Arc<Mutex<Shared>>,
}

/// Kept between the guest's thread (markers) and the committer's (transactions).
#[derive(Default)]
struct Shared {
    /// Where a restore must start reading to see every committed record of this task
    /// numbered at or above a marker's next sequence number.
    scan_from: i64,
    /// The highest sequence number of this task already in the partition when the task
    /// was opened: replayed records up to it are skipped.
    skip_through: Option<u64>,
}

/// What a checkpoint of a Kafka output commits: records numbered below `next_seq`
/// (`bytes` of output, whole lines), where a restore reads from to find replayed ones,
/// and the start of a line the guest had not finished (a stdio program's output: the
/// guest will not write it again, so the checkpoint keeps it).
#[derive(Debug, PartialEq, Eq)]
struct Marker {
    next_seq: u64,
    bytes: u64,
    scan_from: u64,
    unfinished: Vec<u8>,
}

/// Marker bytes start with this, telling them from a file's or an object output's.
const MARKER_TAG: u8 = 0x4B;

impl Marker {
    fn encode(&self) -> Vec<u8> {
        let mut out = vec![MARKER_TAG];
        out.put_varint(self.next_seq);
        out.put_varint(self.bytes);
        out.put_varint(self.scan_from);
        out.put_varint(self.unfinished.len() as u64);
        out.extend_from_slice(&self.unfinished);
        out
    }

    fn decode(bytes: &[u8], url: &str) -> Result<Self> {
        let what = format!("the checkpoint's marker for output {url}");
        let mut r = Reader::new(bytes, &what);
        if bytes.len() < 4 || r.u8()? != MARKER_TAG {
            return Err(changed!(
                "output {url} is a Kafka partition, but the checkpoint wrote its output elsewhere; run the task with the same --output"
            ));
        }
        let (next_seq, bytes, scan_from) = (r.varint()?, r.varint()?, r.varint()?);
        let len = r.varint_count(1)?;
        let marker = Self {
            next_seq,
            bytes,
            scan_from,
            unfinished: r.bytes(len)?.to_vec(),
        };
        r.finish()?;
        Ok(marker)
    }
}

impl KafkaSink {
    /// The partition `url` names; it must exist (checked now, before anything is touched).
    pub fn open(url: &str) -> Result<Self> {
        let url = KafkaUrl::parse(url, Some(0))?;
        url.watermarks(&url.consumer()?)?;
        Ok(Self {
            url,
            task: [0; 16],
            producer: None,
            next_seq: 0,
            bytes: 0,
            buffer: Vec::new(),
            shared: Default::default(),
        })
    }

    /// Fence every earlier writer of this task, then find this task's highest sequence
    /// number at or after `scan_from`.
    fn fence_and_scan(&mut self, scan_from: i64) -> Result<(i64, Option<u64>)> {
        let producer: BaseProducer<Quiet> = self
            .url
            .config()
            .set(
                "transactional.id",
                format!("wasnap-{}", hex::encode(&self.task)),
            )
            .set("transaction.timeout.ms", "60000")
            .set("message.timeout.ms", "15000")
            .create_with_context(Quiet::default())
            .map_err(|e| self.url.unavailable(e, "cannot create a producer"))?;
        producer
            .init_transactions(REQUEST_TIMEOUT)
            .map_err(|e| self.url.unavailable(e, "cannot start transactions"))?;
        self.producer = Some(Arc::new(producer));
        let consumer = self.url.consumer()?;
        let (low, _) = self.url.watermarks(&consumer)?;
        // Every record up to the end must be readable, committed or aborted, before the
        // scan can trust that what it did not see is not there.
        let high = self.url.end_offset()?;
        self.url.wait_until_stable(&consumer, high)?;
        if scan_from > high {
            return Err(changed!(
                "output {} ends at offset {high}, but the checkpoint's output reached {scan_from}: the broker lost records it had committed (restarted without them on disk?), or the topic was deleted and made again; the output cannot be completed exactly once",
                self.url.label()
            ));
        }
        let from = scan_from.max(low);
        let mut highest = highest_sequence(&self.url, &consumer, &self.task, from, high)?;
        // A committed read that starts mid-partition relies on the broker to name only
        // the aborted transactions that reach into it. One that also names older ones
        // (noida-db 0.2.3 does) makes the client drop every later record of this
        // producer, committed or not, and a replay would write them twice. Records of
        // this task past what the committed read saw are either aborted or hidden so:
        // then read the whole partition, which every broker serves right.
        if from > low {
            let uncommitted = self.url.uncommitted_consumer()?;
            let any = highest_sequence(&self.url, &uncommitted, &self.task, from, high)?;
            if any > highest {
                tracing::debug!(
                    from,
                    low,
                    high,
                    "records past the committed scan: reading the whole partition"
                );
                highest = highest_sequence(&self.url, &consumer, &self.task, low, high)?;
            }
        }
        Ok((high, highest))
    }
}

/// The highest sequence number among `task`'s records in offsets `from..until` of the
/// partition that `consumer` reads (committed ones only, unless it reads uncommitted).
fn highest_sequence(
    url: &KafkaUrl,
    consumer: &BaseConsumer<Quiet>,
    task: &[u8; 16],
    from: i64,
    until: i64,
) -> Result<Option<u64>> {
    if from >= until {
        return Ok(None);
    }
    let task = hex::encode(task);
    let mut highest = None;
    read_partition(url, consumer, from, until, &mut |message| {
        if let Some(seq) = sequence_of(message, &task) {
            highest = highest.max(Some(seq));
        }
    })?;
    Ok(highest)
}

/// This record's sequence number, if it is one of `task`'s.
fn sequence_of(message: &rdkafka::message::BorrowedMessage<'_>, task: &str) -> Option<u64> {
    let headers = message.headers()?;
    let header = |name: &str| headers.iter().find(|h| h.key == name).and_then(|h| h.value);
    (header(TASK_HEADER)? == task.as_bytes())
        .then(|| {
            std::str::from_utf8(header(SEQUENCE_HEADER)?)
                .ok()?
                .parse()
                .ok()
        })
        .flatten()
}

/// Hand every committed record at offsets `from..until` to `each`, in order.
fn read_partition(
    url: &KafkaUrl,
    consumer: &BaseConsumer<Quiet>,
    from: i64,
    until: i64,
    each: &mut dyn FnMut(&rdkafka::message::BorrowedMessage<'_>),
) -> Result<()> {
    let mut assignment = TopicPartitionList::new();
    assignment
        .add_partition_offset(&url.topic, url.partition, Offset::Offset(from))
        .map_err(|e| anyhow!(e))?;
    consumer
        .assign(&assignment)
        .map_err(|e| url.unavailable(e, "cannot read the partition"))?;
    loop {
        match consumer.poll(REQUEST_TIMEOUT) {
            Some(Ok(message)) => {
                let offset = message.offset();
                if offset < until {
                    each(&message);
                }
                if offset + 1 >= until {
                    return Ok(());
                }
            }
            Some(Err(KafkaError::PartitionEOF(_))) => return Ok(()),
            Some(Err(err)) => return Err(url.unavailable(err, "cannot read the partition")),
            None => {
                return Err(url.unavailable(
                    KafkaError::MessageConsumption(RDKafkaErrorCode::RequestTimedOut),
                    "no record arrived from the partition",
                ));
            }
        }
    }
}

impl Sink for KafkaSink {
    fn resume_at(&mut self, task: &[u8; 16], marker: Option<&[u8]>) -> crate::Result<()> {
        self.task = *task;
        let marker = match marker {
            Some(marker) => Marker::decode(marker, &self.url.label())?,
            // A fresh task may still have output in the partition: a writer that committed
            // a transaction and died before its first manifest. Read it all.
            None => Marker {
                next_seq: 0,
                bytes: 0,
                scan_from: 0,
                unfinished: Vec::new(),
            },
        };
        let scan_from = i64::try_from(marker.scan_from).unwrap_or(i64::MAX);
        let (high, highest) = self.fence_and_scan(scan_from)?;
        tracing::debug!(
            output = self.url.label(),
            next_seq = marker.next_seq,
            already_there = ?highest,
            "output positioned"
        );
        self.next_seq = marker.next_seq;
        self.bytes = marker.bytes;
        self.buffer = marker.unfinished;
        *self.shared.lock().expect("output lock") = Shared {
            // Until the replay is past what is there, a restore must read from here again.
            scan_from: if highest.is_some_and(|s| s >= marker.next_seq) {
                scan_from
            } else {
                high
            },
            skip_through: highest,
        };
        Ok(())
    }

    fn buffer(&mut self) -> &mut Vec<u8> {
        &mut self.buffer
    }

    fn maybe_write(&mut self) -> crate::Result<()> {
        Ok(()) // one transaction per checkpoint, put by the committer
    }

    fn checkpoint(
        &mut self,
        _generation: u64,
        _writer_id: &[u8; 16],
    ) -> crate::Result<OutputFlush> {
        // Whole lines only: a stdio program's last line so far may be unfinished, and
        // stays for the next checkpoint (a record is a whole line).
        let whole = self
            .buffer
            .iter()
            .rposition(|b| *b == b'\n')
            .map_or(0, |i| i + 1);
        let rest = self.buffer.split_off(whole);
        let lines = std::mem::replace(&mut self.buffer, rest);
        let first_seq = self.next_seq;
        self.next_seq += lines.iter().filter(|b| **b == b'\n').count() as u64;
        self.bytes += lines.len() as u64;
        let scan_from = self.shared.lock().expect("output lock").scan_from;
        let marker = Marker {
            next_seq: self.next_seq,
            bytes: self.bytes,
            scan_from: scan_from as u64,
            unfinished: self.buffer.clone(),
        };
        let producer = self
            .producer
            .clone()
            .ok_or_else(|| anyhow!("output {} is not positioned", self.url.label()))?;
        Ok(OutputFlush {
            marker: marker.encode(),
            bytes: self.bytes,
            commit: Box::new(Transaction {
                url: self.url.clone(),
                task: hex::encode(&self.task),
                producer,
                first_seq,
                lines,
                shared: self.shared.clone(),
            }),
        })
    }

    fn len(&self) -> u64 {
        self.bytes + self.buffer.len() as u64
    }
}

/// One checkpoint's records, produced in one transaction.
struct Transaction {
    url: KafkaUrl,
    task: String,
    producer: Arc<BaseProducer<Quiet>>,
    first_seq: u64,
    /// Output lines, each ending in `\n` (not sent).
    lines: Vec<u8>,
    shared: Arc<Mutex<Shared>>,
}

impl Transaction {
    /// Produce the records not already in the partition, and commit.
    fn produce(&self, skip_through: Option<u64>) -> Result<Option<(u64, u64)>, KafkaError> {
        let producer = &self.producer;
        let mut produced: Option<(u64, u64)> = None;
        let mut began = false;
        let records = self.lines.split(|b| *b == b'\n');
        let count = self.lines.iter().filter(|b| **b == b'\n').count();
        for (seq, value) in (self.first_seq..).zip(records.take(count)) {
            if skip_through.is_some_and(|s| seq <= s) {
                continue;
            }
            if !began {
                producer.begin_transaction()?;
                began = true;
            }
            let seq_text = seq.to_string();
            let headers = OwnedHeaders::new_with_capacity(2)
                .insert(Header {
                    key: TASK_HEADER,
                    value: Some(self.task.as_bytes()),
                })
                .insert(Header {
                    key: SEQUENCE_HEADER,
                    value: Some(seq_text.as_bytes()),
                });
            let mut record = BaseRecord::to(&self.url.topic)
                .partition(self.url.partition)
                .payload(value)
                .headers(headers);
            // A full local queue drains as the broker acknowledges: wait, then retry.
            loop {
                match producer.send::<(), [u8]>(record) {
                    Ok(()) => break,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        record = back;
                        producer.poll(Duration::from_millis(1));
                    }
                    Err((err, _)) => return Err(err),
                }
            }
            produced = Some((produced.map_or(seq, |(first, _)| first), seq));
        }
        if began {
            // rdkafka's commit flushes by polling in steps of 100 ms that never end early:
            // drain the delivery reports in 1 ms steps first (100 ms a checkpoint, else).
            let deadline = std::time::Instant::now() + REQUEST_TIMEOUT;
            while producer.in_flight_count() > 0 && std::time::Instant::now() < deadline {
                producer.poll(Duration::from_millis(1));
            }
            producer.commit_transaction(REQUEST_TIMEOUT)?;
            crate::crash::point("kafka-transaction-committed");
        }
        Ok(produced)
    }

    /// Check that the records numbered `first..=last` are in the partition at or after
    /// `from`, committed: a broker that restarted may have lost a transaction's records
    /// or its state yet taken its commit (noida-db can), which would leave a gap.
    fn verify(&self, first: u64, last: u64, from: i64) -> Result<()> {
        let consumer = self.url.consumer()?;
        let high = self.url.end_offset()?;
        self.url.wait_until_stable(&consumer, high)?;
        let mut found = std::collections::BTreeSet::new();
        read_partition(&self.url, &consumer, from.min(high), high, &mut |message| {
            if let Some(seq) = sequence_of(message, &self.task) {
                found.insert(seq);
            }
        })?;
        match (first..=last).find(|seq| !found.contains(seq)) {
            None => Ok(()),
            Some(missing) => Err(changed!(
                "output {}: the broker lost records of a transaction it had committed (from number {missing} of {first}..={last}; it restarted without them on disk?); the next run writes them again",
                self.url.label()
            )),
        }
    }
}

impl OutputCommit for Transaction {
    fn make_durable(&mut self) -> crate::Result<()> {
        let skip_through = self.shared.lock().expect("output lock").skip_through;
        let context = self.producer.context();
        let (troubles, delivered) = (context.troubles(), context.delivered_end());
        match self.produce(skip_through) {
            Ok(Some((first, last))) => {
                // Trouble on the way (a broker restart): make sure the records are there.
                if context.troubles() > troubles {
                    self.verify(first, last, delivered)?;
                }
                // Once the replay is past what was there, a restore can start reading
                // where this transaction's records ended.
                if skip_through.is_none_or(|s| last >= s) {
                    let delivered = self.producer.context().delivered_end();
                    let mut shared = self.shared.lock().expect("output lock");
                    shared.scan_from = shared.scan_from.max(delivered);
                }
                Ok(())
            }
            Ok(None) => Ok(()),
            Err(err) if is_fenced(&err) => Err(anyhow!(err)
                .context(Kinded::new(
                    ErrorKind::Fenced,
                    format!(
                        "another writer owns this task: it took over the transactions of output {}; this writer is fenced and stops without committing",
                        self.url.label()
                    ),
                ))
                .into()),
            Err(err) => {
                let _ = self.producer.abort_transaction(REQUEST_TIMEOUT);
                Err(self.url.unavailable(err, "cannot commit a transaction").into())
            }
        }
    }
}

/// Write the committed records of the partition `url` to `out`, one line each. With the
/// task id and marker of the store's newest checkpoint, exactly that task's committed
/// output; without, every committed record of the partition.
pub fn cat(
    url: &str,
    task: Option<([u8; 16], &[u8])>,
    out: &mut dyn std::io::Write,
) -> Result<u64> {
    let url = KafkaUrl::parse(url, Some(0))?;
    let consumer = url.consumer()?;
    let (low, high) = url.watermarks(&consumer)?;
    let limit = match task {
        None => None,
        Some((task, marker)) => Some((hex::encode(&task), Marker::decode(marker, &url.label())?)),
    };
    let mut written = 0u64;
    let mut failed = None;
    read_partition(&url, &consumer, low, high, &mut |message| {
        if failed.is_some() {
            return;
        }
        if let Some((task, marker)) = &limit
            && sequence_of(message, task).is_none_or(|seq| seq >= marker.next_seq)
        {
            return;
        }
        let value = message.payload().unwrap_or_default();
        if let Err(e) = out.write_all(value).and_then(|()| out.write_all(b"\n")) {
            failed = Some(e);
        }
        written += value.len() as u64 + 1;
    })?;
    if let Some(e) = failed {
        return Err(anyhow::Error::from(e).context("cannot write to stdout"));
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_round_trip_and_other_outputs_are_refused() {
        for unfinished in [&b""[..], b"half a li"] {
            let marker = Marker {
                next_seq: 12,
                bytes: 345,
                scan_from: 6789,
                unfinished: unfinished.to_vec(),
            };
            assert_eq!(Marker::decode(&marker.encode(), "k").unwrap(), marker);
        }
        let file = crate::stream::sink::file_marker(0x4B);
        let err = Marker::decode(&file, "k").unwrap_err();
        assert!(format!("{err:#}").contains("elsewhere"), "{err:#}");
    }
}
