"""Small Kafka chores for wasnap's scripts (the tests use the rdkafka crate instead).

  kafka_tool.py BROKER create TOPIC [PARTITIONS]   make a topic (one replica)
  kafka_tool.py BROKER produce TOPIC PARTITION FILE one record per line of FILE
  kafka_tool.py BROKER read TOPIC PARTITION         committed records to stdout, one per line
"""

import sys

from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic


def create(broker, topic, partitions="1"):
    admin = AdminClient({"bootstrap.servers": broker})
    for future in admin.create_topics([NewTopic(topic, int(partitions), 1)]).values():
        future.result()


def produce(broker, topic, partition, path):
    producer = Producer({"bootstrap.servers": broker, "linger.ms": 5})
    with open(path, "rb") as lines:
        for line in lines:
            while True:
                try:
                    producer.produce(topic, value=line.rstrip(b"\n"), partition=int(partition))
                    break
                except BufferError:
                    producer.poll(0.01)
    if producer.flush(60):
        sys.exit("kafka_tool: records still unsent after 60 s")


def read(broker, topic, partition):
    consumer = Consumer({
        "bootstrap.servers": broker,
        "group.id": "wasnap-tool",
        "enable.auto.commit": False,
        "isolation.level": "read_committed",
        "enable.partition.eof": True,
    })
    low, high = consumer.get_watermark_offsets(TopicPartition(topic, int(partition)), timeout=10)
    if low >= high:
        return
    consumer.assign([TopicPartition(topic, int(partition), low)])
    out = sys.stdout.buffer
    while True:
        message = consumer.poll(10)
        if message is None:
            sys.exit("kafka_tool: no record in 10 s")
        if message.error():
            if message.error().code() == KafkaError._PARTITION_EOF:
                return
            sys.exit(f"kafka_tool: {message.error()}")
        out.write(message.value() + b"\n")
        if message.offset() + 1 >= high:
            return


if __name__ == "__main__":
    broker, command, *args = sys.argv[1:]
    {"create": create, "produce": produce, "read": read}[command](broker, *args)
