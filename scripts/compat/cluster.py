"""Three `pyralog` nodes as three hosts: node N binds 127.0.0.N (native 7070, Kafka 9092,
cluster 9100, metrics 9644; per-shard ports follow each), seeded with each other; optionally
more nodes, not in the seeds, that join as brokers. Meant to run
in a network namespace of its own (scripts/compat/run.sh runs the cluster tests under
`unshare --net`), where those addresses are free and iptables rules cut links between nodes
without touching the machine's network.
"""

import os
import shutil
import signal
import subprocess
import threading
import time

READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0
NATIVE_PORT = 7070
KAFKA_PORT = 9092
CLUSTER_PORT = 9100
METRICS_PORT = 9644


class ClusterNode:
    def __init__(self, binary, node_id, seeds, data_dir, log_dir, extra_args=()):
        self.binary = binary
        self.node_id = node_id
        self.host = f"127.0.0.{node_id}"
        self.seeds = seeds
        self.data_dir = data_dir
        self.log_dir = log_dir
        self.extra_args = list(extra_args)
        self.process = None
        self.starts = 0
        self.stdout_lines = []
        os.makedirs(log_dir, exist_ok=True)

    @property
    def bootstrap(self):
        return f"{self.host}:{KAFKA_PORT}"

    @property
    def native(self):
        return f"{self.host}:{NATIVE_PORT}"

    @property
    def metrics_url(self):
        return f"http://{self.host}:{METRICS_PORT}"

    def command(self):
        command = [
            self.binary,
            "--data-dir", self.data_dir,
            "--node-id", str(self.node_id),
            "--seeds", self.seeds,
            "--listen", self.native,
            "--kafka-listen", self.bootstrap,
            "--metrics-listen", f"{self.host}:{METRICS_PORT}",
            "--shards", "2",
            "--cache-bytes", "16777216",
            *self.extra_args,
        ]
        setpriv = shutil.which("setpriv")
        return [setpriv, "--pdeathsig", "KILL", *command] if setpriv else command

    def start(self):
        """Starts the node and waits for its ready line (it may wait for its seeds first)."""
        assert self.process is None, f"node {self.node_id} is running"
        self.starts += 1
        stderr = open(self.stderr_path(), "wb")
        try:
            process = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                       stderr=stderr)
        finally:
            stderr.close()
        self.process = process
        self._ready = threading.Event()
        lines = []
        self.stdout_lines = lines

        def read_stdout():
            for line in process.stdout:
                lines.append(line.decode(errors="replace"))
                if " ready" in lines[-1]:
                    self._ready.set()
            self._ready.set()

        threading.Thread(target=read_stdout, daemon=True).start()
        return self

    def wait_ready(self):
        assert self._ready.wait(READY_TIMEOUT_S), f"node {self.node_id} printed no ready line: {self.stderr_tail()}"
        assert self.process.poll() is None, f"node {self.node_id} exited: {self.stderr_tail()}"
        return self

    def kill9(self):
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(timeout=STOP_TIMEOUT_S)

    def terminate(self):
        """SIGTERM and wait for a clean exit."""
        process, self.process = self.process, None
        if process is None:
            return
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=STOP_TIMEOUT_S)
        assert code == 0, f"node {self.node_id} exited with {code} on SIGTERM: {self.stderr_tail()}"

    def pause(self):
        self.process.send_signal(signal.SIGSTOP)

    def resume(self):
        self.process.send_signal(signal.SIGCONT)

    def stderr_path(self, start=None):
        return os.path.join(self.log_dir, f"stderr.{self.starts if start is None else start}")

    def stderr_tail(self, limit=4000):
        try:
            with open(self.stderr_path(), "rb") as stderr:
                return stderr.read()[-limit:].decode(errors="replace")
        except FileNotFoundError:
            return ""


class Cluster:
    def __init__(self, binary, base_dir, size=3, extra_args=(), brokers=0):
        """`size` seeds, then `brokers` nodes that are not seeds (they say where they listen)."""
        seeds = ",".join(f"{n}@127.0.0.{n}:{CLUSTER_PORT}" for n in range(1, size + 1))

        def node(n):
            joining = ["--cluster-listen", f"127.0.0.{n}:{CLUSTER_PORT}"] if n > size else []
            return ClusterNode(binary, n, seeds, os.path.join(base_dir, f"node{n}"),
                               os.path.join(base_dir, f"logs{n}"), [*extra_args, *joining])

        self.nodes = [node(n) for n in range(1, size + brokers + 1)]

    def start(self):
        # Seeds wait for each other to agree on the cluster id: start them all, then wait.
        for node in self.nodes:
            node.start()
        for node in self.nodes:
            node.wait_ready()
        return self.wait_formed()

    def wait_formed(self):
        """Waits until every node is registered: Kafka metadata lists each node's shards."""
        from confluent_kafka.admin import AdminClient

        def registered():
            # Every node's own view: a node lists itself before its registration applies.
            everyone = {node.node_id for node in self.nodes}
            for node in self.nodes:
                brokers = AdminClient({"bootstrap.servers": node.bootstrap}).list_topics(timeout=5).brokers
                if {broker // 1000 for broker in brokers} != everyone:
                    return False
            return True

        wait_until("every node is registered with the controller", registered)
        return self

    @property
    def bootstrap(self):
        return ",".join(node.bootstrap for node in self.nodes)

    def node(self, node_id):
        return self.nodes[node_id - 1]

    def stop(self):
        for node in self.nodes:
            node.kill9()


def metric_total(metrics_url, name, **labels):
    """The sum of a node's `name` samples (on every shard) whose labels include `labels`,
    read from its /metrics."""
    import urllib.request
    text = urllib.request.urlopen(f"{metrics_url}/metrics", timeout=5).read().decode()
    wanted = [f'{key}="{value}"' for key, value in labels.items()]
    return sum(int(float(line.split()[-1])) for line in text.splitlines()
               if line.startswith(name + "{") and all(label in line for label in wanted))


def wait_until(what, condition, timeout_s=30.0, interval_s=0.05):
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            value = condition()
            if value:
                return value
        except Exception as error:  # the cluster may still be electing
            last = error
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting until {what} (last error: {last})")
