//! The test Kafka broker (noida-db, started by scripts/kafka-server.sh) and what tests do
//! with it directly: make topics, produce input, read output back, delete records.

use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use super::root;

/// A broker: its address, and (for one this test binary started) how to restart it.
pub struct Broker {
    pub addr: String,
    pub pid: Option<u32>,
    pub data_dir: Option<String>,
    /// Produce each record in a batch of its own: tansu reports a partition's end as one
    /// past the first offset of its last batch.
    pub one_record_per_batch: bool,
}

static SHARED: OnceLock<Broker> = OnceLock::new();
static TANSU: OnceLock<Broker> = OnceLock::new();

/// The consumer-group broker (tansu): named by the environment (scripts/test.sh starts
/// one), or else one started for this test binary. For groups and input topics only: its
/// `read_committed` shows records of aborted transactions.
pub fn tansu() -> &'static Broker {
    TANSU.get_or_init(|| {
        let mut broker = match std::env::var("WASNAP_TEST_TANSU") {
            Ok(addr) => Broker {
                addr,
                pid: None,
                data_dir: None,
                one_record_per_batch: true,
            },
            Err(_) => start_broker(&["--tansu"]),
        };
        broker.one_record_per_batch = true;
        broker
    })
}

/// The broker named by the environment (scripts/test.sh starts one), or else one started
/// for this test binary, which stops when the binary does.
pub fn kafka() -> &'static Broker {
    SHARED.get_or_init(|| match std::env::var("WASNAP_TEST_KAFKA") {
        Ok(addr) => Broker {
            addr,
            pid: None,
            data_dir: None,
            one_record_per_batch: false,
        },
        Err(_) => start_broker(&[]),
    })
}

/// Start a broker of this test's own (to stop and restart it); `extra` are
/// scripts/kafka-server.sh's options (`--port N --data-dir DIR` restart one).
pub fn start_broker(extra: &[&str]) -> Broker {
    let out = Command::new(root().join("scripts/kafka-server.sh"))
        .args(["start", "--parent-pid", &std::process::id().to_string()])
        .args(extra)
        .stderr(Stdio::inherit())
        .output()
        .expect("run scripts/kafka-server.sh");
    assert!(out.status.success(), "scripts/kafka-server.sh start failed");
    let text = String::from_utf8(out.stdout).unwrap();
    let var = |key: &str| {
        text.lines()
            .filter_map(|l| l.strip_prefix("export ")?.split_once('='))
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.to_string())
            .unwrap_or_else(|| panic!("{key} not printed"))
    };
    if extra.contains(&"--tansu") {
        return Broker {
            addr: var("WASNAP_TEST_TANSU"),
            pid: Some(var("WASNAP_TEST_TANSU_PID").parse().unwrap()),
            data_dir: None,
            one_record_per_batch: true,
        };
    }
    Broker {
        addr: var("WASNAP_TEST_KAFKA"),
        pid: Some(var("WASNAP_TEST_KAFKA_PID").parse().unwrap()),
        data_dir: Some(var("WASNAP_TEST_KAFKA_DATA")),
        one_record_per_batch: false,
    }
}

impl Broker {
    /// Stop this broker (it must be one this test started) and wait until it is gone.
    pub fn stop(&self) {
        let pid = self.pid.expect("a broker this test started");
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        for _ in 0..100 {
            if unsafe { libc::kill(pid as i32, 0) } != 0 {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }

    /// The same broker again: same port, same data.
    pub fn restart(&self) -> Broker {
        let port = self.addr.rsplit(':').next().unwrap().to_string();
        start_broker(&[
            "--port",
            &port,
            "--data-dir",
            self.data_dir.as_deref().unwrap(),
        ])
    }

    pub fn url(&self, topic: &str, partition: Option<i32>) -> String {
        match partition {
            Some(p) => format!("kafka://{}/{topic}/{p}", self.addr),
            None => format!("kafka://{}/{topic}", self.addr),
        }
    }

    fn config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.addr)
            .set("log_level", "3");
        config
    }

    /// A topic no other test uses, with `partitions` partitions.
    pub fn fresh_topic(&self, name: &str, partitions: i32) -> String {
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let topic = format!("{name}-{}-{n}", std::process::id());
        let admin: AdminClient<DefaultClientContext> = self.config().create().unwrap();
        let new = NewTopic::new(&topic, partitions, TopicReplication::Fixed(1));
        let created = futures::executor::block_on(admin.create_topics(
            [&new],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        ))
        .unwrap();
        for result in created {
            result.unwrap_or_else(|(t, e)| panic!("cannot create topic {t}: {e}"));
        }
        topic
    }

    /// Produce each line of `text` as one record of `topic`'s `partition`.
    pub fn produce_lines(&self, topic: &str, partition: i32, text: &[u8]) {
        let mut config = self.config();
        config
            .set("linger.ms", "5")
            .set("queue.buffering.max.messages", "1000000");
        if self.one_record_per_batch {
            config.set("batch.num.messages", "1");
        }
        let producer: BaseProducer = config.create().unwrap();
        // A topic just made may not be in the producer's metadata yet.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        for line in text.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            let mut record = BaseRecord::<(), [u8]>::to(topic)
                .partition(partition)
                .payload(line);
            loop {
                match producer.send(record) {
                    Ok(()) => break,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        record = back;
                        producer.poll(Duration::from_millis(10));
                    }
                    Err((
                        KafkaError::MessageProduction(RDKafkaErrorCode::UnknownPartition),
                        back,
                    )) if std::time::Instant::now() < deadline => {
                        record = back;
                        producer.poll(Duration::from_millis(100));
                    }
                    Err((e, _)) => panic!("cannot produce to {topic}/{partition}: {e}"),
                }
            }
        }
        producer.flush(Duration::from_secs(30)).unwrap();
    }

    /// Another producer's transaction, left open, holding one record `line` in `topic`'s
    /// `partition`: the caller commits it (`commit_transaction`) when it likes.
    pub fn open_transaction(&self, topic: &str, partition: i32, line: &[u8]) -> BaseProducer {
        let producer: BaseProducer = self
            .config()
            .set("transactional.id", format!("other-producer-{topic}"))
            .create()
            .unwrap();
        let timeout = Duration::from_secs(10);
        producer.init_transactions(timeout).unwrap();
        producer.begin_transaction().unwrap();
        let record = BaseRecord::<(), [u8]>::to(topic)
            .partition(partition)
            .payload(line);
        producer.send(record).map_err(|(e, _)| e).unwrap();
        producer.flush(timeout).unwrap();
        producer
    }

    /// The committed records of `topic`'s `partition`, each value followed by `\n`.
    pub fn read_committed(&self, topic: &str, partition: i32) -> Vec<u8> {
        let consumer: BaseConsumer = self
            .config()
            .set("group.id", "wasnap-tests")
            .set("enable.auto.commit", "false")
            .set("isolation.level", "read_committed")
            .set("enable.partition.eof", "true")
            .create()
            .unwrap();
        let (low, high) = consumer
            .fetch_watermarks(topic, partition, Duration::from_secs(10))
            .unwrap();
        let mut out = Vec::new();
        if low >= high {
            return out;
        }
        let mut assignment = TopicPartitionList::new();
        assignment
            .add_partition_offset(topic, partition, Offset::Offset(low))
            .unwrap();
        consumer.assign(&assignment).unwrap();
        loop {
            match consumer.poll(Duration::from_secs(10)) {
                Some(Ok(message)) => {
                    out.extend_from_slice(message.payload().unwrap_or_default());
                    out.push(b'\n');
                    if message.offset() + 1 >= high {
                        return out;
                    }
                }
                Some(Err(KafkaError::PartitionEOF(_))) => return out,
                Some(Err(e)) => panic!("cannot read {topic}/{partition}: {e}"),
                None => panic!("no record from {topic}/{partition} in 10 s"),
            }
        }
    }

    /// Delete the records of `topic`'s `partition` below `offset` (what retention does).
    pub fn delete_records_before(&self, topic: &str, partition: i32, offset: i64) {
        let admin: AdminClient<DefaultClientContext> = self.config().create().unwrap();
        let mut offsets = TopicPartitionList::new();
        offsets
            .add_partition_offset(topic, partition, Offset::Offset(offset))
            .unwrap();
        futures::executor::block_on(admin.delete_records(&offsets, &AdminOptions::new())).unwrap();
    }

    /// The first and one-past-last offsets of `topic`'s `partition` (the high watermark,
    /// which only a `read_uncommitted` consumer reports: librdkafka's default is
    /// `read_committed`, whose end is the last stable offset).
    pub fn watermarks(&self, topic: &str, partition: i32) -> (i64, i64) {
        let consumer: BaseConsumer = self
            .config()
            .set("isolation.level", "read_uncommitted")
            .create()
            .unwrap();
        consumer
            .fetch_watermarks(topic, partition, Duration::from_secs(10))
            .unwrap()
    }

    /// Whether a transaction is open on `topic`'s `partition`: its last stable offset (the
    /// end a `read_committed` consumer sees) is below its high watermark.
    pub fn transaction_open(&self, topic: &str, partition: i32) -> bool {
        let committed: BaseConsumer = self
            .config()
            .set("isolation.level", "read_committed")
            .create()
            .unwrap();
        let (_, stable) = committed
            .fetch_watermarks(topic, partition, Duration::from_secs(10))
            .unwrap();
        stable < self.watermarks(topic, partition).1
    }
}
