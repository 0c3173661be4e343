#!/usr/bin/env python3
"""Failover benchmark: three nodes on 127.0.0.1-3 (run it under `unshare --net`, as
scripts/bench-failover.sh does), one partition with replication factor 3, an idempotent acks=all
confluent-kafka producer writing throughout; ROUNDS times, kill -9 the partition's leader and
measure (1) server side: from the kill to another node's replica leading in a higher term, by
polling the survivors' /cluster every 2 ms, and (2) client side: the longest gap between two
acknowledgements around the kill, for that producer and for pyralog-bench's native producer (one
run per round, on the same partition, --rate 5000, acks=durable: its report's ack_gap_max_ms).
The killed node is restarted and caught up between rounds: the next kill waits until the
leader counts all three replicas in sync (a leader killed while another replica still catches
up leaves no write quorum until it has: a second fault, measured separately with --no-catch-up).
With --sigstop the leader is paused (SIGSTOP) instead of killed, and resumed (SIGCONT) once
the others elected a new leader: no connection is reset, so the followers notice only when
their election timeout passes without a heartbeat; librdkafka only when a request to the
paused node times out, pyralog-bench when a batch unanswered for 500 ms makes it find the new
leader in another node's metadata. With --sigterm the leader is stopped cleanly (SIGTERM): it
hands its leadership to an in-sync follower before it exits (a rolling restart), and answers
NOT_LEADER_OR_FOLLOWER meanwhile, naming the new leader (KIP-951). --rdkafka KEY=VALUE sets
a librdkafka property of the confluent-kafka producer (repeatable): librdkafka waits out its
reconnect backoff (reconnect.backoff.max.ms, 10 s) before it connects to a new leader it
last failed to reach, such as a node restarted in an earlier round. --keep-logs keeps the
nodes' stderr (one file per start, under the printed directory) to read a slow round after.
Each round also counts the produces the survivors refused for too few in-sync replicas
(NOT_ENOUGH_REPLICAS: a new leader that does not count its followers in sync yet; the
producer backs off). Prints medians, p99 and max, and one JSON line.

    python3 scripts/bench-failover.py PYRALOG_BIN ROUNDS [--no-catch-up] [--sigstop | --sigterm]
        [--keep-logs] [--rdkafka KEY=VALUE ...] [extra pyralog flags...]
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "compat"))
from cluster import Cluster, metric_total, wait_until  # noqa: E402
from confluent_kafka import Producer  # noqa: E402
from confluent_kafka.admin import AdminClient, NewTopic  # noqa: E402


def view(node):
    return json.load(urllib.request.urlopen(f"http://127.0.0.{node}:9644/cluster", timeout=1))


def leader_of(nodes, topic):
    """(node, term) of the replica of topic/0 that leads in the highest term, among `nodes`."""
    best = None
    for node in nodes:
        try:
            replicas = view(node)["replicas"]
        except Exception:
            continue
        for replica in replicas:
            if replica["topic"] == topic and replica["partition"] == 0 and replica["leads"]:
                if best is None or replica["term"] > best[1]:
                    best = (node, replica["term"])
    return best


def all_in_sync(topic):
    """Whether the leader of topic/0 counts every replica in sync."""
    found = leader_of([1, 2, 3], topic)
    if found is None:
        return False
    for replica in view(found[0])["replicas"]:
        if replica["topic"] == topic and replica["partition"] == 0 and replica["leads"]:
            return len(replica["in_sync"]) == len(replica["replicas"])
    return False


def refusals(cluster, nodes):
    """NOT_ENOUGH_REPLICAS answers to produces the nodes' shards counted, summed."""
    return sum(metric_total(cluster.node(node).metrics_url, "pyralog_produce_errors_total",
                            kind="not_enough_replicas") for node in nodes)


def percentile(values, p):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def main():
    binary, rounds, extra = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    rdkafka = {}
    while "--rdkafka" in extra:
        at = extra.index("--rdkafka")
        key, value = extra[at + 1].split("=", 1)
        rdkafka[key] = value
        del extra[at:at + 2]
    catch_up = "--no-catch-up" not in extra
    keep_logs = "--keep-logs" in extra
    sigstop, sigterm = "--sigstop" in extra, "--sigterm" in extra
    assert not (sigstop and sigterm), "--sigstop or --sigterm, not both"
    extra = [flag for flag in extra if flag not in ("--no-catch-up", "--sigstop", "--sigterm", "--keep-logs")]
    fault = "SIGSTOP" if sigstop else "SIGTERM" if sigterm else "kill -9"
    base = tempfile.mkdtemp(prefix="pyralog-failover-")
    cluster = Cluster(binary, base, extra_args=extra).start()
    try:
        admin = AdminClient({"bootstrap.servers": cluster.bootstrap})
        admin.create_topics([NewTopic("failover", 1, 3)])["failover"].result(30)
        wait_until("the partition has a leader", lambda: leader_of([1, 2, 3], "failover"))
        acks, errors, stop = [], [], threading.Event()
        settings = {"bootstrap.servers": cluster.bootstrap, "enable.idempotence": True, "acks": "all",
                    "linger.ms": 1, "message.timeout.ms": 60000}
        if sigstop:
            # A paused broker answers nothing and resets nothing: librdkafka notices when its
            # request times out (socket.timeout.ms, 60 s by default, as long as the messages'
            # own timeout, so they failed first). 5 s, as the native bench's 10 s, bounds the gap.
            settings.update({"socket.timeout.ms": 5000, "request.timeout.ms": 5000})
        settings.update(rdkafka)
        producer = Producer(settings)

        def on_delivery(error, _message):
            (errors.append(error) if error else acks.append(time.monotonic()))

        def produce():
            i = 0
            while not stop.is_set():
                try:
                    producer.produce("failover", value=b"x" * 1024, on_delivery=on_delivery)
                    i += 1
                except BufferError:
                    pass
                producer.poll(0.0005)
                if i % 20 == 0:
                    time.sleep(0.001)  # about 10-20k records/s: a steady load, not a flood

        thread = threading.Thread(target=produce, daemon=True)
        thread.start()
        bench = os.path.join(os.path.dirname(binary), "pyralog-bench")
        elections, gaps, native_gaps, catch_ups, refused = [], [], [], [], []
        for _ in range(rounds):
            wait_until("acknowledgements flow", lambda: len(acks) > 100)
            native = subprocess.Popen(
                [bench, "produce", "--broker", "127.0.0.1:7070", "--topic", "failover", "--rate", "5000",
                 "--duration", "5", "--message-bytes", "1024", "--linger-ms", "1", "--json"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            time.sleep(1.5)
            wait_until("the partition has a leader", lambda: leader_of([1, 2, 3], "failover"))
            leader, term = leader_of([1, 2, 3], "failover")
            survivors = [n for n in (1, 2, 3) if n != leader]
            refused_before = refusals(cluster, survivors)
            killed_at = time.monotonic()
            stopping = None
            if sigstop:
                cluster.node(leader).pause()
            elif sigterm:
                # terminate() waits for the clean exit, which comes after the handoff.
                stopping = threading.Thread(target=cluster.node(leader).terminate)
                stopping.start()
            else:
                cluster.node(leader).kill9()
            while True:
                found = leader_of(survivors, "failover")
                if found and found[1] > term:
                    elections.append((time.monotonic() - killed_at) * 1000)
                    break
                if time.monotonic() - killed_at > 30:
                    raise AssertionError("no new leader within 30 s")
                time.sleep(0.002)
            try:
                wait_until("acknowledgements resume", lambda: acks and acks[-1] > killed_at + 0.2,
                           timeout_s=90 if sigstop else 30)
            except AssertionError:
                for node in (1, 2, 3):
                    try:
                        replicas = [r for r in view(node)["replicas"] if r["topic"] == "failover"]
                    except Exception as error:
                        replicas = error
                    print(f"node {node}: {replicas}", file=sys.stderr)
                print(f"delivery errors: {errors[-3:]}", file=sys.stderr)
                raise
            print(f"round {len(elections)}: {fault} of node {leader}, new leader after {elections[-1]:.0f} ms",
                  file=sys.stderr)
            around = [t for t in acks if killed_at - 1 <= t <= killed_at + (60 if sigstop else 5)]
            gaps.append(max((b - a) * 1000 for a, b in zip(around, around[1:])))
            out, _ = native.communicate(timeout=120)
            report = json.loads(out)
            if report["errors"] or report["unacknowledged"]:
                raise AssertionError(f"the native producer lost or failed records: {report}")
            native_gaps.append(report["ack_gap_max_ms"])
            refused.append(refusals(cluster, survivors) - refused_before)
            print(f"round {len(elections)}: native producer's longest gap {native_gaps[-1]:.0f} ms, "
                  f"{report['leader_retries']} retries; librdkafka's {gaps[-1]:.0f} ms; "
                  f"{refused[-1]} produces refused for too few in-sync replicas", file=sys.stderr)
            if sigstop:
                cluster.node(leader).resume()
            else:
                if stopping is not None:
                    stopping.join(30)
                    assert not stopping.is_alive(), f"node {leader} did not stop within 30 s of SIGTERM"
                cluster.node(leader).start().wait_ready()
            wait_until("the restarted node leads or follows again",
                       lambda: all(view(n) for n in (1, 2, 3)), timeout_s=30)
            if catch_up:
                restarted_at = time.monotonic()
                wait_until("every replica is in sync again", lambda: all_in_sync("failover"), timeout_s=180)
                catch_ups.append(time.monotonic() - restarted_at)
                print(f"round {len(elections)}: every replica in sync {catch_ups[-1]:.1f} s after the "
                      f"{'resume' if sigstop else 'restart'}",
                      file=sys.stderr)
            time.sleep(1.0)
        stop.set()
        thread.join(10)
        producer.flush(60)
        summary = {
            "rounds": rounds,
            "flags": " ".join(extra) or "defaults",
            "rdkafka": rdkafka,
            "caught_up_between_rounds": catch_up,
            "fault": fault,
            "election_ms": {"p50": percentile(elections, 50), "p99": percentile(elections, 99), "max": max(elections)},
            "ack_gap_ms": {"p50": percentile(gaps, 50), "p99": percentile(gaps, 99), "max": max(gaps)},
            "native_ack_gap_ms": {"p50": percentile(native_gaps, 50), "p99": percentile(native_gaps, 99),
                                  "max": max(native_gaps)},
            "delivery_errors": len(errors),
            "not_enough_replicas": sum(refused),
        }
        if catch_ups:
            summary["in_sync_after_restart_s"] = {"p50": percentile(catch_ups, 50), "max": max(catch_ups)}
        between = "every replica in sync" if catch_up else "no wait for the restarted replica to catch up"
        print(f"{fault} of the leader, {rounds} rounds ({summary['flags']}; before each kill: {between}):")
        print(f"  new leader after (server side, 2 ms polling): p50 {summary['election_ms']['p50']:.0f} ms, "
              f"p99 {summary['election_ms']['p99']:.0f} ms, max {summary['election_ms']['max']:.0f} ms")
        print(f"  longest gap between acknowledgements (librdkafka acks=all): p50 {summary['ack_gap_ms']['p50']:.0f} "
              f"ms, p99 {summary['ack_gap_ms']['p99']:.0f} ms, max {summary['ack_gap_ms']['max']:.0f} ms")
        print(f"  longest gap between acknowledgements (native pyralog-bench, acks=durable): p50 "
              f"{summary['native_ack_gap_ms']['p50']:.0f} ms, p99 {summary['native_ack_gap_ms']['p99']:.0f} ms, "
              f"max {summary['native_ack_gap_ms']['max']:.0f} ms")
        print(f"  delivery errors: {len(errors)}; produces refused for too few in-sync replicas: {sum(refused)} "
              f"(in {sum(1 for r in refused if r)} of {rounds} rounds)")
        if catch_ups:
            print(f"  {'resumed' if sigstop else 'restarted'} replica back in sync after: p50 {percentile(catch_ups, 50):.1f} s, "
                  f"max {max(catch_ups):.1f} s")
        print(json.dumps(summary))
    finally:
        cluster.stop()
        if keep_logs:
            for node in (1, 2, 3):
                shutil.rmtree(os.path.join(base, f"node{node}"), ignore_errors=True)
            print(f"the nodes' stderr: {base}/logs*/stderr.*", file=sys.stderr)
        else:
            shutil.rmtree(base, ignore_errors=True)  # gigabytes of logs after 30 rounds


if __name__ == "__main__":
    main()
