"""`pyralog --config FILE` through the real binary: a TOML file's settings take effect as a Kafka
client sees them, flags on the command line override the file, an unknown key or a nested
value is refused by name before anything is created, the JSON /config serves starts a second
node with the same settings, and the start-up summary lists them."""

import json
import subprocess
import urllib.request

from confluent_kafka import KafkaError, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from node import Node, free_port

HTTP_TIMEOUT_S = 10.0
CLIENT_CALL_TIMEOUT_S = 10.0
FLUSH_TIMEOUT_S = 30.0
REFUSAL_TIMEOUT_S = 30.0
# Settings a second node must differ in to run beside the first: its addresses and data.
PER_NODE_KEYS = {"config", "data-dir", "listen", "kafka-listen", "metrics-listen"}
# How the summary's last line starts.
SUMMARY_CONFIG = "  config      from "


def running_config(node) -> dict:
    with urllib.request.urlopen(f"{node.metrics_url}/config", timeout=HTTP_TIMEOUT_S) as response:
        return json.loads(response.read())


def config_line(node) -> str:
    """The start-up summary's config line (the summary ends with the ready line, which the node
    waited for)."""
    lines = [line for line in node.stdout_lines if line.startswith(SUMMARY_CONFIG)]
    assert len(lines) == 1, node.stdout_lines
    return lines[0]


def parse_summary(line: str):
    """The start-up summary's config line as (source, {key: value})."""
    assert line.startswith(SUMMARY_CONFIG), line
    source, _, settings = line[len(SUMMARY_CONFIG):].rstrip("\n").partition(": ")
    return source, dict(setting.split("=", 1) for setting in settings.split(" "))


def topic_partitions(bootstrap: str, topic: str):
    """The partition count Kafka metadata gives for `topic`, or the metadata's error code."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    metadata = admin.list_topics(topic=topic, timeout=CLIENT_CALL_TIMEOUT_S)
    found = metadata.topics[topic]
    return found.error.code() if found.error is not None else len(found.partitions)


def test_the_file_sets_defaults_and_flags_override_it(start_node, tmp_path):
    config = tmp_path / "node.toml"
    # A dashed key and an underscored one: both spellings are taken.
    config.write_text("default-partitions = 3\nauto_create_topics = false\n")

    node = start_node("--config", str(config), "--default-partitions", "5")

    settings = running_config(node)
    assert (settings["default-partitions"], settings["auto-create-topics"]) == (5, False), settings
    # The file is no setting: /config leaves it out (so its JSON can be fed back as a file),
    # and the summary names it (test_the_start_up_summary_lists_every_setting...).
    assert "config" not in settings, settings
    # The file turned auto-creation off: metadata for a new topic does not create it.
    assert topic_partitions(node.bootstrap, "not-created") == KafkaError.UNKNOWN_TOPIC_OR_PART
    # The flag's default partition count, not the file's, for a CreateTopics asking for the default.
    admin = AdminClient({"bootstrap.servers": node.bootstrap})
    (future,) = admin.create_topics([NewTopic("defaulted", num_partitions=-1)],
                                    operation_timeout=CLIENT_CALL_TIMEOUT_S).values()
    future.result(timeout=CLIENT_CALL_TIMEOUT_S)
    assert topic_partitions(node.bootstrap, "defaulted") == 5

    # The other way round: the flag turns auto-creation back on, the file's count holds.
    other = start_node("--config", str(config), "--auto-create-topics", "true")

    settings = running_config(other)
    assert (settings["default-partitions"], settings["auto-create-topics"]) == (3, True), settings
    errors = []
    producer = Producer({"bootstrap.servers": other.bootstrap, "error_cb": errors.append})
    producer.produce("auto-created", value=b"first",
                     on_delivery=lambda error, _: error is not None and errors.append(error))
    assert producer.flush(FLUSH_TIMEOUT_S) == 0 and errors == [], errors[:5]
    assert topic_partitions(other.bootstrap, "auto-created") == 3


def refused(pyralog_bin, tmp_path, file_name: str, text: str):
    """Starts the daemon with a config file it must refuse; returns (exit code, stdout, stderr,
    the data directory it was given)."""
    config = tmp_path / file_name
    config.write_text(text)
    data_dir = tmp_path / f"data-{file_name}"
    command = [pyralog_bin, "--config", str(config), "--data-dir", str(data_dir),
               "--listen", f"127.0.0.1:{free_port()}", "--kafka-listen", f"127.0.0.1:{free_port()}",
               "--metrics-listen", f"127.0.0.1:{free_port()}", "--shards", "1"]
    result = subprocess.run(command, capture_output=True, timeout=REFUSAL_TIMEOUT_S)
    return result.returncode, result.stdout.decode(), result.stderr.decode(), data_dir


def test_an_unknown_key_or_a_nested_value_is_refused_by_name_before_anything_starts(pyralog_bin, tmp_path):
    code, stdout, stderr, data_dir = refused(pyralog_bin, tmp_path, "typo.toml",
                                             "shards = 1\ndefault-partitons = 3\n")
    assert code == 2, stderr
    assert "unknown key 'default-partitons'" in stderr, stderr
    assert stdout == ""
    assert not data_dir.exists()

    code, stdout, stderr, data_dir = refused(pyralog_bin, tmp_path, "nested.toml",
                                             "[listen]\nhost = \"127.0.0.1\"\n")
    assert code == 2, stderr
    assert "key 'listen' is a table" in stderr, stderr
    assert not data_dir.exists()

    code, stdout, stderr, data_dir = refused(pyralog_bin, tmp_path, "nested.json", '{"cpus": [0, 1]}')
    assert code == 2, stderr
    assert "key 'cpus' is an array" in stderr, stderr
    assert not data_dir.exists()


def test_the_json_of_config_starts_a_node_with_the_same_settings(start_node, tmp_path):
    first = start_node("--default-partitions", "4", "--auto-create-topics", "false", "--durability", "cached",
                       "--flush-interval-ms", "50", "--segment-bytes", "1048576", "--retention-ms", "3600000",
                       "--group-initial-rebalance-delay-ms", "100", "--metrics-partitions")
    served = tmp_path / "served.json"
    with urllib.request.urlopen(f"{first.metrics_url}/config", timeout=HTTP_TIMEOUT_S) as response:
        served.write_bytes(response.read())

    # node.py's own addresses and data directory come after the file on the command line.
    second = start_node("--config", str(served))

    before, after = running_config(first), running_config(second)
    assert "config" not in after, after
    assert {k: v for k, v in after.items() if k not in PER_NODE_KEYS} == \
        {k: v for k, v in before.items() if k not in PER_NODE_KEYS}
    assert (after["durability"], after["retention-ms"], after["metrics-partitions"]) == ("cached", 3600000, True)
    assert after["data-dir"] == second.data_dir != first.data_dir


def start_summary_node(pyralog_bin, tmp_path, name, *extra_args):
    node = Node(pyralog_bin, str(tmp_path / f"data-{name}"), str(tmp_path / f"logs-{name}"), extra_args)
    try:
        return node.start()
    except BaseException:
        node.kill()
        raise


def test_the_start_up_summary_lists_every_setting_and_where_it_came_from(pyralog_bin, tmp_path):
    config = tmp_path / "node.toml"
    config.write_text("default-partitions = 3\nflush-interval-ms = 250\n")

    node = start_summary_node(pyralog_bin, tmp_path, "file", "--config", str(config), "--default-partitions", "5")
    try:
        served = running_config(node)
        source, settings = parse_summary(config_line(node))
        node.stop()
    finally:
        node.kill()

    assert source == f"{config}, then flags"
    assert (settings["default-partitions"], settings["flush-interval-ms"]) == ("5", "250"), settings
    assert settings["data-dir"] == node.data_dir
    assert settings["metrics-listen"] == f"127.0.0.1:{node.metrics_port}"
    # The summary names exactly the settings /config serves (those with a value), with their values.
    assert set(settings) == {key for key, value in served.items() if value is not None and key != "config"}
    for key, value in served.items():
        if key in settings:
            assert settings[key] == (value if isinstance(value, str) else json.dumps(value)), key

    plain = start_summary_node(pyralog_bin, tmp_path, "plain")
    try:
        assert parse_summary(config_line(plain))[0] == "defaults and flags"
        plain.stop()
    finally:
        plain.kill()
