"""kcat driven as a person would drive it, with a time limit on every run, and its consumer
output read back exactly (binary keys and values included)."""

import re
import subprocess

KCAT_TIMEOUT_S = 60.0
# Each record printed as "<partition> <offset> <key size> <value size>|<key><value>\n"; a size
# of -1 is a null key or value. The sizes make binary payloads unambiguous.
CONSUME_FORMAT = "%p %o %K %S|%k%s\n"
_HEAD = re.compile(rb"(-?\d+) (-?\d+) (-?\d+) (-?\d+)\|")


def run(kcat_bin: str, bootstrap: str, *args, input_bytes=None, timeout_s=KCAT_TIMEOUT_S) -> bytes:
    """Runs kcat against the node; returns stdout, failing the test on a non-zero exit."""
    return run_with_stderr(kcat_bin, bootstrap, *args, input_bytes=input_bytes, timeout_s=timeout_s)[0]


def run_with_stderr(kcat_bin: str, bootstrap: str, *args, input_bytes=None, timeout_s=KCAT_TIMEOUT_S):
    """Runs kcat against the node; returns (stdout, stderr as text), failing the test on a
    non-zero exit."""
    command = [kcat_bin, "-b", bootstrap, "-m", "10", *args]
    result = subprocess.run(command, input=input_bytes, capture_output=True, timeout=timeout_s)
    stderr = result.stderr.decode(errors="replace")
    assert result.returncode == 0, f"{' '.join(command)} exited {result.returncode}: {stderr[-3000:]}"
    return result.stdout, stderr


def consume(kcat_bin: str, bootstrap: str, topic: str, *args, timeout_s=KCAT_TIMEOUT_S):
    """Consumes to the end (-e) and returns [(partition, offset, key, value)], key and value as
    bytes or None. Starts from the beginning unless args say otherwise."""
    if "-o" not in args:
        args = ("-o", "beginning", *args)
    output = run(kcat_bin, bootstrap, "-C", "-t", topic, "-e", "-q", "-f", CONSUME_FORMAT, *args,
                 timeout_s=timeout_s)
    return parse(output)


def parse(output: bytes):
    records = []
    position = 0
    while position < len(output):
        head = _HEAD.match(output, position)
        assert head, f"unexpected kcat output at byte {position}: {output[position:position + 80]!r}"
        partition, offset, key_size, value_size = (int(group) for group in head.groups())
        position = head.end()
        fields = []
        for size in (key_size, value_size):
            if size < 0:
                fields.append(None)
            else:
                fields.append(output[position:position + size])
                position += size
        assert output[position:position + 1] == b"\n", f"record {partition}/{offset} is not followed by a newline"
        position += 1
        records.append((partition, offset, fields[0], fields[1]))
    return records
