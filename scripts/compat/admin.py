"""Topic admin over the Kafka listener through kafka-python's admin client."""

from kafka import KafkaAdminClient
from kafka.admin import NewTopic

ADMIN_TIMEOUT_MS = 10_000


def admin_client(bootstrap: str) -> KafkaAdminClient:
    return KafkaAdminClient(bootstrap_servers=bootstrap, client_id="compat-admin",
                            request_timeout_ms=ADMIN_TIMEOUT_MS)


def create_topic(bootstrap: str, name: str, partitions: int):
    admin = admin_client(bootstrap)
    try:
        result = admin.create_topics([NewTopic(name, partitions, 1)], timeout_ms=ADMIN_TIMEOUT_MS)
        (topic,) = result["topics"]
        assert topic["error_code"] == 0, topic
        assert topic["num_partitions"] == partitions, topic
    finally:
        admin.close()
