//! What the daemon tests share: a `pyralog` node on loopback ports of its own.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use pyralog_net::client::Client;

pub struct Node {
    pub child: Child,
    /// The native listener.
    pub addr: String,
    /// The Kafka listener.
    pub kafka_addr: String,
    /// The metrics endpoints' address, as the start-up summary names it.
    pub metrics_addr: String,
}

impl Node {
    /// Starts a node on a free port; a port taken between the probe and the bind (by a node of
    /// a test running in parallel) makes the node refuse to start, so that is tried again.
    pub fn start(data_dir: &Path, extra: &[&str]) -> Node {
        for _ in 0..5 {
            if let Some(node) = Node::try_start(data_dir, extra) {
                return node;
            }
        }
        panic!("pyralog did not start in 5 attempts");
    }

    pub fn try_start(data_dir: &Path, extra: &[&str]) -> Option<Node> {
        let addr = format!("127.0.0.1:{}", free_port());
        let kafka_addr = format!("127.0.0.1:{}", free_port());
        let mut child = Command::new(env!("CARGO_BIN_EXE_pyralog"))
            .args(["--data-dir", data_dir.to_str().unwrap(), "--listen", &addr, "--shard-port-base", "0"])
            .args(["--kafka-listen", &kafka_addr, "--kafka-shard-port-base", "0"])
            .args(["--shards", "2", "--cache-bytes", "1048576", "--metrics-listen", "127.0.0.1:0"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the pyralog binary starts");
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        let mut metrics_addr = String::new();
        loop {
            line.clear();
            if stdout.read_line(&mut line).unwrap() == 0 {
                child.wait().unwrap();
                return None;
            }
            if let Some(rest) = line.trim().strip_prefix("metrics     http://") {
                metrics_addr = rest.split('/').next().unwrap_or_default().to_owned();
            }
            if line.contains(" ready") {
                break;
            }
        }
        std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
        Some(Node { child, addr, kafka_addr, metrics_addr })
    }

    pub fn client(&self) -> Client {
        Client::connect(&self.addr).expect("connect")
    }

    pub fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    pub fn terminate(mut self) -> std::process::ExitStatus {
        // SAFETY: sending SIGTERM to our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.child.wait().unwrap()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}
