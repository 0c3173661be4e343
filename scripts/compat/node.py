"""A real `pyralog` daemon on loopback for one test: start, restart on the same data directory
and ports, stop. The daemon runs with the parent-death signal set (setpriv), so it cannot
outlive a test run that is killed before its teardown.
"""

import os
import shutil
import signal
import socket
import subprocess
import threading

READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 20.0
# A port picked free may be taken before the daemon binds it: try again with new ones.
START_ATTEMPTS_MAX = 5


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Node:
    def __init__(self, binary: str, data_dir: str, log_dir: str, extra_args=()):
        self.binary = binary
        self.data_dir = data_dir
        self.log_dir = log_dir
        self.extra_args = list(extra_args)
        self.native_port = None
        self.kafka_port = None
        self.metrics_port = None
        self.process = None
        self.starts = 0
        self.stdout_lines = []
        os.makedirs(data_dir, exist_ok=True)
        os.makedirs(log_dir, exist_ok=True)

    @property
    def bootstrap(self) -> str:
        """The Kafka listener, as clients bootstrap from it."""
        return f"127.0.0.1:{self.kafka_port}"

    @property
    def metrics_url(self) -> str:
        """The operator's HTTP endpoints (/metrics, /health, /config)."""
        return f"http://127.0.0.1:{self.metrics_port}"

    @property
    def native(self) -> str:
        """The native protocol's shared address."""
        return f"127.0.0.1:{self.native_port}"

    def command(self):
        command = [
            self.binary,
            "--data-dir", self.data_dir,
            "--listen", self.native,
            "--shard-port-base", "0",
            "--kafka-listen", self.bootstrap,
            # Each shard is also a Kafka broker on a port of its own; free ones here.
            "--kafka-shard-port-base", "0",
            "--shards", "2",
            "--cache-bytes", "16777216",
            "--metrics-listen", f"127.0.0.1:{self.metrics_port}",
            *[arg.format(kafka_port=self.kafka_port) for arg in self.extra_args],
        ]
        setpriv = shutil.which("setpriv")
        return [setpriv, "--pdeathsig", "KILL", *command] if setpriv else command

    def start(self):
        """Starts on fresh free ports, trying again with new ones if the daemon exits early."""
        assert self.process is None, "the node is running"
        failures = []
        for _ in range(START_ATTEMPTS_MAX):
            self.native_port, self.kafka_port, self.metrics_port = free_port(), free_port(), free_port()
            if len({self.native_port, self.kafka_port, self.metrics_port}) < 3:
                continue
            if self._launch():
                return self
            failures.append(self.stderr_tail())
        raise AssertionError(f"pyralog did not start in {START_ATTEMPTS_MAX} attempts: {failures}")

    def restart(self):
        """SIGTERM, wait for the exit, and start again on the same data directory and ports."""
        self.stop()
        assert self._launch(), f"pyralog did not come back on the same ports: {self.stderr_tail()}"
        return self

    def stop(self):
        """SIGTERM and wait for a clean exit (code 0); SIGKILL if it does not come."""
        process, self.process = self.process, None
        if process is None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=STOP_TIMEOUT_S)
            raise AssertionError(f"pyralog did not stop within {STOP_TIMEOUT_S}s of SIGTERM")
        assert code == 0, f"pyralog exited with {code} on SIGTERM: {self.stderr_tail()}"

    def kill(self):
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(timeout=STOP_TIMEOUT_S)

    def stderr_path(self, start=None) -> str:
        return os.path.join(self.log_dir, f"stderr.{self.starts if start is None else start}")

    def stderr_tail(self, limit: int = 4000) -> str:
        try:
            with open(self.stderr_path(), "rb") as stderr:
                return stderr.read()[-limit:].decode(errors="replace")
        except FileNotFoundError:
            return ""

    def _launch(self) -> bool:
        """Starts the daemon; true once it printed its ready line, false if it exited first."""
        self.starts += 1
        stderr = open(self.stderr_path(), "wb")
        try:
            process = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                       stderr=stderr)
        finally:
            stderr.close()
        ready = threading.Event()
        lines = []

        def read_stdout():
            # Keeps draining after the ready line so the daemon never blocks on a full pipe.
            for line in process.stdout:
                lines.append(line.decode(errors="replace"))
                if " ready" in lines[-1]:
                    ready.set()
            ready.set()  # end of output: the daemon exited

        threading.Thread(target=read_stdout, daemon=True).start()
        if not ready.wait(READY_TIMEOUT_S):
            process.kill()
            process.wait(timeout=STOP_TIMEOUT_S)
            raise AssertionError(f"pyralog printed no ready line within {READY_TIMEOUT_S}s: {lines}")
        if not any(" ready" in line for line in lines):
            process.wait(timeout=STOP_TIMEOUT_S)
            return False
        self.stdout_lines = lines
        self.process = process
        return True
