"""pyralog-bench and `pyralog topic` as a new user meets them, through the real binaries and a
real node: what they say about missing topics, a consume that ends short, the wrong port, a
node that is not running; the timeline file and its plot; help for every flag."""

import csv
import json
import os
import re
import subprocess
import sys

from node import free_port

RUN_TIMEOUT_S = 120.0
PLOT_SCRIPT = os.path.join(os.path.dirname(__file__), "..", "plot-bench.py")


def run(*command):
    """Runs a command; returns (exit code, stdout, stderr)."""
    result = subprocess.run([str(part) for part in command], capture_output=True, timeout=RUN_TIMEOUT_S)
    return result.returncode, result.stdout.decode(errors="replace"), result.stderr.decode(errors="replace")


def bench_json(bench_bin, *args):
    """Runs pyralog-bench with --json; returns (exit code, report, stderr)."""
    code, stdout, stderr = run(bench_bin, *args, "--json", "--deadline-secs", "60")
    lines = stdout.strip().splitlines()
    assert lines, f"pyralog-bench {' '.join(args)} exited {code} with no report: {stderr}"
    return code, json.loads(lines[-1]), stderr


def test_a_consume_that_ends_short_exits_4_and_says_how_many_and_why(node, bench_bin):
    code, report, stderr = bench_json(bench_bin, "produce", "--broker", node.native, "--topic", "short",
                                      "--messages", "50", "--message-bytes", "100")
    assert code == 0, stderr
    assert report["acked"] == 50

    code, report, stderr = bench_json(bench_bin, "consume", "--broker", node.native, "--topic", "short",
                                      "--messages", "80", "--idle-secs", "1")

    assert code == 4, stderr
    assert report["consumed"] == 50
    closing = stderr.strip().splitlines()[-1]
    assert closing.startswith("FAILED: consumed 50 of the 80 messages asked for (--messages)"), stderr
    assert "no record arrived for 1 s (--idle-secs)" in closing, stderr
    # The rate is over the time spent receiving, not the idle second that ended the run.
    assert report["rate_seconds"] + 0.9 < report["seconds"], report


def test_the_human_report_names_its_latency_and_ends_with_one_plain_line(node, bench_bin):
    code, stdout, stderr = run(bench_bin, "produce", "--broker", node.native, "--topic", "plain",
                               "--messages", "200", "--message-bytes", "100")
    assert code == 0, stderr
    assert stdout.strip().splitlines()[-1] == "done: 200 of 200 messages acknowledged", stdout

    code, stdout, stderr = run(bench_bin, "consume", "--broker", node.native, "--topic", "plain",
                               "--messages", "200", "--verify")
    assert code == 0, stderr
    assert "record age at consume, us (from the record's timestamp" in stdout, stdout
    assert re.search(r"^verify_problems +0 +duplicates, reorders", stdout, re.M), stdout
    assert stdout.strip().splitlines()[-1].startswith("verified 200 of 200 messages consumed"), stdout


def topics(pyralog_bin, node):
    code, stdout, stderr = run(pyralog_bin, "topic", "list", "--broker", node.native)
    assert code == 0, stderr
    return {line.split("\t")[0]: line.split("\t")[1] for line in stdout.splitlines()}


def test_consume_refuses_a_missing_topic_and_produce_says_it_creates_one(node, bench_bin, pyralog_bin):
    code, stdout, stderr = run(bench_bin, "consume", "--broker", node.native, "--topic", "absent")
    assert code == 1, stderr
    assert "topic 'absent' does not exist, nothing to consume" in stderr, stderr
    assert "--create-topic" in stderr, stderr
    assert "absent" not in topics(pyralog_bin, node)

    code, report, stderr = bench_json(bench_bin, "consume", "--broker", node.native, "--topic", "absent",
                                      "--create-topic", "--partitions", "3", "--idle-secs", "0.5")
    assert code == 0, stderr
    assert "topic 'absent' does not exist; creating it with 3 partitions" in stderr, stderr
    assert topics(pyralog_bin, node)["absent"] == "3 partitions"

    code, report, stderr = bench_json(bench_bin, "produce", "--protocol", "kafka", "--broker", node.bootstrap,
                                      "--topic", "fresh", "--partitions", "4", "--messages", "10")
    assert code == 0, stderr
    assert "topic 'fresh' does not exist; creating it with 4 partitions (--partitions)" in stderr, stderr
    assert topics(pyralog_bin, node)["fresh"] == "4 partitions"


def test_the_timeline_has_one_row_per_second_and_plots(node, bench_bin, tmp_path):
    timeline = tmp_path / "produce.csv"
    code, report, stderr = bench_json(bench_bin, "e2e", "--broker", node.native, "--topic", "timeline",
                                      "--duration", "3", "--rate", "500", "--message-bytes", "100",
                                      "--timeline", timeline)
    assert code == 0, stderr
    with open(timeline, newline="") as file:
        rows = list(csv.DictReader(file))
    assert list(rows[0]) == ["elapsed_s", "messages_per_s", "mb_per_s", "p50_ms", "p99_ms", "max_ms", "errors"]
    # One row at each second, and one for the part-second before the consumers finished.
    elapsed = [float(row["elapsed_s"]) for row in rows]
    assert 3 <= len(rows) <= 5, rows
    for second, at in zip([1, 2, 3], elapsed):
        assert abs(at - second) < 0.3, elapsed
    assert elapsed == sorted(elapsed), elapsed
    assert sum(float(row["messages_per_s"]) for row in rows[:3]) > 3 * 300, rows
    assert all(row["errors"] == "0" for row in rows), rows
    assert float(rows[0]["p50_ms"]) <= float(rows[0]["p99_ms"]) <= float(rows[0]["max_ms"]), rows

    png = tmp_path / "produce.png"
    code, stdout, stderr = run(sys.executable, PLOT_SCRIPT, timeline, "-o", png)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert code != 0 and "pip install matplotlib" in stderr, stderr
    else:
        assert code == 0, stderr
        with open(png, "rb") as file:
            assert file.read(8) == b"\x89PNG\r\n\x1a\n"


def test_the_wrong_protocol_is_named_by_the_client_and_the_node(node, bench_bin, pyralog_bin):
    code, stdout, stderr = run(bench_bin, "produce", "--broker", node.bootstrap, "--messages", "1")
    assert code == 2, stderr
    assert f"{node.bootstrap} speaks the Kafka protocol, not Pyralog's native protocol" in stderr, stderr
    assert "native listener (--listen, default 127.0.0.1:7070)" in stderr, stderr
    assert "add --protocol kafka" in stderr, stderr

    code, stdout, stderr = run(bench_bin, "produce", "--protocol", "kafka", "--broker", node.native,
                               "--messages", "1")
    assert code == 2, stderr
    assert f"{node.native} speaks Pyralog's native protocol, not the Kafka protocol" in stderr, stderr
    assert "Kafka listener (--kafka-listen, default 127.0.0.1:9092)" in stderr, stderr
    assert "drop --protocol kafka" in stderr, stderr
    # The node said so too, once for each.
    log = node.stderr_tail()
    assert log.count("a native Pyralog client connected to the Kafka listener (--kafka-listen)") == 1, log
    assert log.count("a Kafka client connected to the native listener (--listen)") == 1, log

    code, stdout, stderr = run(pyralog_bin, "topic", "list", "--broker", node.bootstrap)
    assert code != 0
    assert "speaks the Kafka protocol" in stderr, stderr


def test_a_refused_connection_says_no_node_is_listening_once(bench_bin, pyralog_bin):
    address = f"127.0.0.1:{free_port()}"
    for protocol in ("native", "kafka"):
        code, stdout, stderr = run(bench_bin, "produce", "--protocol", protocol, "--broker", address,
                                   "--messages", "1")
        assert code == 2, stderr
        assert f"no pyralog node is listening on {address} (connection refused): is it running?" in stderr
        assert stderr.count("refused") == 1, stderr
    code, stdout, stderr = run(pyralog_bin, "topic", "list", "--broker", address)
    assert code != 0
    assert stderr.strip() == (f"pyralog: no pyralog node is listening on {address} (connection refused): "
                              "is it running? start it with `target/release/pyralog`"), stderr


def test_errors_carry_no_rust_names(node, pyralog_bin):
    code, stdout, stderr = run(pyralog_bin, "topic", "describe", "nope", "--broker", node.native)
    assert code != 0
    assert stderr.strip() == "pyralog: topic 'nope' does not exist", stderr
    assert not re.search(r"\b[A-Z][a-z]+[A-Z]\w*\b", stderr), stderr


OPTION = re.compile(r"^\s+(-\w, )?--[\w-]+( <[^>]+>)?(\s{2,}(?P<help>\S.*))?$")


def undocumented_options(command):
    """The options `command -h` lists with no help text: none beside them, and none on the
    next, further indented line (where clap puts a long one)."""
    code, stdout, stderr = run(*command, "-h")
    assert code == 0, stderr
    lines = stdout.splitlines()
    listed, undocumented = 0, []
    for line, following in zip(lines, lines[1:] + [""]):
        match = OPTION.match(line)
        if not match:
            continue
        listed += 1
        indent = len(line) - len(line.lstrip())
        below = following.strip() and len(following) - len(following.lstrip()) > indent + 2
        if not match.group("help") and not (below and not OPTION.match(following)):
            undocumented.append(line.strip())
    assert listed, stdout
    return undocumented


def test_every_flag_of_every_subcommand_has_help(bench_bin, pyralog_bin):
    for mode in ("produce", "consume", "fetch", "e2e"):
        assert undocumented_options([bench_bin, mode]) == [], mode
    for action in ("create", "list", "describe", "delete"):
        assert undocumented_options([pyralog_bin, "topic", action]) == [], action
    code, stdout, stderr = run(bench_bin, "consume", "--help")
    assert "[default: 10]" in stdout and "Seconds without a record" in stdout, stdout
    assert "verify_unread (messages below the partitions' ends" in " ".join(stdout.split()), stdout
