"""Fixtures of the real-client compatibility suite: a fresh `pyralog` node per test (the binary
comes from $PYRALOG_BIN, pyralog-bench from $PYRALOG_BENCH or beside it), a per-test time limit,
and the node's stderr attached to the report of a test that fails."""

import os
import shutil
import signal

import pytest

from node import Node

# No test of this suite needs more; one that does is stuck.
TEST_TIMEOUT_S = 150


def _binary(variable: str, default=None) -> str:
    path = os.environ.get(variable) or default
    if not path:
        raise pytest.UsageError(f"set {variable} to the path of the binary (scripts/compat/run.sh does)")
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        raise pytest.UsageError(f"{variable}={path} is not an executable file")
    return path


def pytest_configure(config):
    # Refuse to start without the binaries, kcat or kafkajs rather than fail every test one by one.
    pyralog = _binary("PYRALOG_BIN")
    _binary("PYRALOG_BENCH", os.path.join(os.path.dirname(pyralog), "pyralog-bench"))
    if shutil.which("kcat") is None:
        raise pytest.UsageError("kcat is not installed (scripts/compat/run.sh installs it)")
    kafkajs = os.path.join(os.path.dirname(os.path.abspath(__file__)), "js", "node_modules", "kafkajs")
    if shutil.which("node") is None or not os.path.isdir(kafkajs):
        raise pytest.UsageError("node or kafkajs is missing (scripts/compat/run.sh installs them: npm ci in scripts/compat/js)")


@pytest.fixture(scope="session")
def pyralog_bin() -> str:
    return _binary("PYRALOG_BIN")


@pytest.fixture(scope="session")
def bench_bin(pyralog_bin) -> str:
    return _binary("PYRALOG_BENCH", os.path.join(os.path.dirname(pyralog_bin), "pyralog-bench"))


@pytest.fixture(scope="session")
def kcat_bin() -> str:
    return shutil.which("kcat")


@pytest.fixture
def start_node(request, pyralog_bin, tmp_path):
    """Starts nodes with extra flags ("{kafka_port}" in a flag becomes the Kafka port); every
    node is killed at teardown."""
    nodes = []
    request.node.pyralog_nodes = nodes

    def start(*extra_args):
        index = len(nodes)
        node = Node(pyralog_bin, str(tmp_path / f"data{index}"), str(tmp_path / f"logs{index}"), extra_args)
        nodes.append(node)
        return node.start()

    yield start
    # A node that died during the test fails it, even if every assertion passed.
    died = [(index, node.process.returncode) for index, node in enumerate(nodes)
            if node.process is not None and node.process.poll() is not None]
    for node in nodes:
        node.kill()
    assert not died, f"pyralog nodes (index, exit code) exited during the test: {died}"


@pytest.fixture
def node(start_node) -> Node:
    return start_node()


class SuiteTimeout(Exception):
    pass


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    def expire(signum, frame):
        raise SuiteTimeout(f"{item.name} ran past {TEST_TIMEOUT_S}s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(TEST_TIMEOUT_S)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for index, node in enumerate(getattr(item, "pyralog_nodes", [])):
            for start in range(1, node.starts + 1):
                try:
                    with open(node.stderr_path(start), "rb") as stderr:
                        text = stderr.read()[-6000:].decode(errors="replace")
                except FileNotFoundError:
                    continue
                report.sections.append((f"pyralog node {index} stderr (start {start})", text or "(empty)"))
