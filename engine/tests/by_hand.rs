//! The daemon started as the README's "By hand" section starts it: from a working directory,
//! by a relative path, with its default flags (so its default ports and `./pyralog-data`), and
//! started again on the same ports right after a `kill -9` with clients still connected.
//!
//! The default ports are fixed, so everything that needs them is one test, run by itself; the
//! other tests take free ports. A node someone left running on 127.0.0.1:7070 makes it fail
//! with that node named.

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pyralog_net::client::{BatchBuilder, Client};
use pyralog_net::codec::Acks;

/// The binary as the README runs it: `target/release/pyralog`, a path relative to the working
/// directory (a link to the binary under test).
const RELATIVE_BINARY: &str = "target/release/pyralog";

/// A working directory laid out like a checkout: the binary at `target/release/pyralog`.
fn checkout() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("target/release")).unwrap();
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_pyralog"), dir.path().join(RELATIVE_BINARY)).unwrap();
    dir
}

fn pyralog(cwd: &Path, args: &[&str]) -> Command {
    let mut command = Command::new(RELATIVE_BINARY);
    command.current_dir(cwd).args(args);
    command
}

/// A running node, killed if the test panics.
struct Running(Option<Child>);

impl Running {
    fn id(&self) -> u32 {
        self.0.as_ref().expect("running").id()
    }

    /// SIGKILL, not waited for: as `kill -9 PID` in a shell returns before the process is
    /// gone. The caller reaps it.
    fn kill9(mut self) -> Child {
        let mut child = self.0.take().expect("running");
        child.kill().unwrap();
        child
    }

    fn terminate(mut self) -> std::process::ExitStatus {
        let mut child = self.0.take().expect("running");
        // SAFETY: sending SIGTERM to our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        child.wait().unwrap()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Starts the node and waits for its summary; panics with what it said if it stops instead.
fn start(cwd: &Path, args: &[&str]) -> Running {
    let mut child = pyralog(cwd, args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains(" ready") {
        line.clear();
        if stdout.read_line(&mut line).unwrap() == 0 {
            let output = child.wait_with_output().unwrap();
            panic!("pyralog {args:?} did not start: {}", String::from_utf8_lossy(&output.stderr));
        }
    }
    std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
    Running(Some(child))
}

/// Starts a node that must refuse to run; returns what it printed on stderr.
fn refused(cwd: &Path, args: &[&str]) -> String {
    let output = pyralog(cwd, args).output().unwrap();
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    String::from_utf8(output.stderr).unwrap()
}

/// A GET of `path`, the whole answer as text.
fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = TcpStream::connect(addr).expect("the metrics listener");
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    answer
}

/// Produces `values` to partition 0 of `topic` in one batch, acknowledged once durable.
fn produce(client: &Client, topic: &str, values: &[String]) {
    let mut builder = BatchBuilder::new(1_700_000_000_000, 1024);
    for value in values {
        builder.append(1_700_000_000_000, None, value.as_bytes());
    }
    client.produce(topic, 0, builder.finish(), Acks::Durable).expect("produce");
}

/// Every value of partition 0 of `topic`, in offset order.
fn read_all(client: &Client, topic: &str) -> Vec<String> {
    let mut values = Vec::new();
    let mut offset = 0;
    loop {
        let fetched = client.fetch(topic, 0, offset, 1 << 20, 0).expect("fetch");
        if fetched.records.is_empty() {
            return values;
        }
        for record in fetched.reader() {
            let record = record.expect("fetched batches pass their CRC");
            if record.offset >= offset {
                values.push(String::from_utf8(record.value.to_vec()).unwrap());
                offset = record.offset + 1;
            }
        }
    }
}

#[test]
fn the_readme_by_hand_start_runs_from_a_working_directory_and_restarts_at_once_after_kill9() {
    let cwd = checkout();
    let dir = cwd.path();
    // The README's first line, then plain `pyralog` (whose default is the same directory).
    let node = start(dir, &["--data-dir", "./pyralog-data"]);
    let client = Client::connect("127.0.0.1:7070").expect("the native listener at its default port");
    let health = http_get("127.0.0.1:9644", "/health");
    assert!(health.starts_with("HTTP/1.1 200 OK\r\n") && health.contains("\r\n\r\nready: "), "{health}");
    client.create_topic("orders", 1).expect("create");
    let first: Vec<String> = (0..100).map(|i| format!("first-{i}")).collect();
    produce(&client, "orders", &first);
    // Clients stay connected to every default port through the kill: the node's side of
    // these connections outlives it (FIN_WAIT2), which once held the ports for a minute.
    let held: Vec<TcpStream> = [7070, 7071, 9092, 9093]
        .iter()
        .map(|port| TcpStream::connect(("127.0.0.1", *port)).expect("a default port"))
        .collect();
    let mut killed = node.kill9();

    // At once, as a shell user types it: the killed node may still be exiting.
    let restarted_at = Instant::now();
    let node = start(dir, &[]);
    killed.wait().unwrap();
    assert!(
        restarted_at.elapsed() < Duration::from_secs(10),
        "the restart took {:?}",
        restarted_at.elapsed()
    );
    let client = Client::connect("127.0.0.1:7070").expect("the restarted node");
    assert_eq!(read_all(&client, "orders"), first, "every acknowledged record survives the kill");
    let second: Vec<String> = (0..100).map(|i| format!("second-{i}")).collect();
    produce(&client, "orders", &second);

    // A second node on the same ports is refused and named, while the first serves on.
    let message = refused(dir, &["--data-dir", "elsewhere"]);
    let pid = node.id().to_string();
    assert!(message.contains("--listen 127.0.0.1:7070 is already in use by process"), "{message}");
    assert!(message.contains(&pid) && message.contains("pyralog"), "{message}");
    assert!(!dir.join("elsewhere").exists(), "a refused start creates no data directory");
    drop(held);

    // A clean stop, and a restart on the same ports with a connected client.
    let _connected = Client::connect("127.0.0.1:9092").ok();
    let _held = TcpStream::connect("127.0.0.1:7071").unwrap();
    assert!(node.terminate().success());
    let node = start(dir, &["--data-dir", "pyralog-data"]);
    let client = Client::connect("127.0.0.1:7070").expect("the node after SIGTERM");
    let mut expected = first;
    expected.extend(second);
    assert_eq!(read_all(&client, "orders"), expected);
    assert!(node.terminate().success());
    let left: Vec<String> = std::fs::read_dir(dir.join("pyralog-data"))
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with('.'))
        .collect();
    assert!(left.is_empty(), "a stopped node leaves no lock or probe files: {left:?}");
}

#[test]
fn a_start_that_fails_in_a_shard_leaves_no_lock_or_probe_files() {
    let cwd = checkout();
    let data_dir = cwd.path().join("pyralog-data");
    std::fs::create_dir_all(&data_dir).unwrap();
    std::fs::write(data_dir.join("topics.meta"), b"not a topic table\n").unwrap();
    // A probe file of a process killed while it probed the disk.
    std::fs::write(data_dir.join(".pyralog-device-probe-99999-0"), [0u8; 4096]).unwrap();
    let port = |p: u16| format!("127.0.0.1:{p}");
    let free = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let (listen, kafka) = (port(free()), port(free()));
    let args = [
        "--listen",
        &listen,
        "--kafka-listen",
        &kafka,
        "--shard-port-base",
        "0",
        "--kafka-shard-port-base",
        "0",
        "--metrics-listen",
        "127.0.0.1:0",
    ];
    let message = refused(cwd.path(), &args);
    assert!(message.contains("topics.meta"), "{message}");
    let mut left: Vec<String> = std::fs::read_dir(&data_dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["topics.meta"], "only what was there before the start stays");
    assert_eq!(std::fs::read(data_dir.join("topics.meta")).unwrap(), b"not a topic table\n");
}
