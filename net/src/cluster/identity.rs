//! Which cluster a node belongs to, and who a node accepts: the handshake's rule, and the
//! blocking helpers the daemon uses at start-up, before its shards run.
//!
//! A cluster is named by a random 16-byte id, stored by each node once it has one. A node
//! without one asks the seeds ([`query_cluster_id`]: a Hello without a cluster id, answered by
//! a Welcome carrying the seed's id, or None, and a close); the daemon adopts the id it is
//! told, and the lowest seed creates one only when every other seed answers None (that
//! decision is the daemon's, not this module's).
//!
//! The rule ([`answer_hello`]), applied by the shards' listeners and by [`answer_queries`]:
//! - a Hello for another node is refused (the sender's seed list is wrong);
//! - a Hello of another cluster is refused (a node of another cluster, or one that was wiped
//!   and formed a cluster of its own, must not join: its log would be taken for ours);
//! - a Hello for another shard of this node is refused (the sender's routing is wrong);
//! - otherwise the answer is Welcome with our cluster id, and messages are taken only when
//!   both sides know their cluster id and it is the same. Otherwise the Welcome is all: a
//!   query, or a peer that is not identified yet, is answered and the connection closed.
//!
//! What this is not: authentication. The cluster id keeps honest nodes of different clusters
//! apart; it is not a secret.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;

use super::frame::{self, ClusterFrameError, ClusterId, Frame, Hello, Welcome, HANDSHAKE_FRAME_BYTES_MAX};

/// What an acceptor answers to a Hello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HelloAnswer {
    /// Send Refused with this reason and close.
    Refuse(String),
    /// Send this Welcome; then read messages if `take_messages`, else close.
    Welcome { welcome: Welcome, take_messages: bool },
}

/// The acceptance rule (see the module doc). `shard` is the shard the listener serves; a
/// Hello without a cluster id (a query) is answered whatever shard it names.
pub fn answer_hello(hello: &Hello, node: u32, shard: u16, ours: Option<ClusterId>) -> HelloAnswer {
    if hello.to_node != node {
        return HelloAnswer::Refuse(format!(
            "this is node {node}, not node {}: check --seeds of node {}",
            hello.to_node, hello.from_node
        ));
    }
    if let (Some(theirs), Some(ours)) = (hello.cluster_id, ours) {
        if theirs != ours {
            return HelloAnswer::Refuse(format!(
                "node {} belongs to cluster {}, this node to cluster {}: a node of another cluster \
                 is refused; wipe its data directory to add it to this cluster",
                hello.from_node,
                cluster_id_hex(&theirs),
                cluster_id_hex(&ours)
            ));
        }
    }
    if hello.cluster_id.is_some() && hello.to_shard != shard {
        return HelloAnswer::Refuse(format!(
            "this is shard {shard} of node {node}, not shard {}: the sender's routing is wrong",
            hello.to_shard
        ));
    }
    let take_messages = hello.cluster_id.is_some() && ours.is_some();
    HelloAnswer::Welcome { welcome: Welcome { cluster_id: ours, node, controller_term: 0 }, take_messages }
}

/// A cluster id as 32 lowercase hex digits.
pub fn cluster_id_hex(id: &ClusterId) -> String {
    id.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// Why a query for a peer's cluster id failed.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cluster query to {addr}: {source}")]
    Io { addr: SocketAddr, source: std::io::Error },
    #[error("cluster query to {addr}: {source}")]
    Frame { addr: SocketAddr, source: ClusterFrameError },
    #[error("cluster query to {addr} refused: {reason}")]
    Refused { addr: SocketAddr, reason: String },
    #[error("cluster query to {addr}: expected Welcome or Refused, got {kind}")]
    Unexpected { addr: SocketAddr, kind: &'static str },
}

/// Asks the node at `addr` for its cluster id (None while it has none) and its controller
/// replica's term. Blocking, for the daemon's start-up; each step (connect, write, read) waits
/// at most `timeout`.
pub fn query_cluster_id(
    addr: SocketAddr,
    from_node: u32,
    to_node: u32,
    timeout: Duration,
) -> Result<(Option<ClusterId>, i32), IdentityError> {
    let io = |source| IdentityError::Io { addr, source };
    let mut stream = TcpStream::connect_timeout(&addr, timeout).map_err(io)?;
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    let hello = Hello { cluster_id: None, from_node, from_shard: 0, to_node, to_shard: 0 };
    stream.write_all(&frame::encode_to_bytes(&Frame::Hello(hello))).map_err(io)?;
    match read_handshake_frame(&mut stream).map_err(|error| error.at(addr))? {
        Frame::Welcome(welcome) => Ok((welcome.cluster_id, welcome.controller_term)),
        Frame::Refused { reason } => Err(IdentityError::Refused { addr, reason }),
        other => Err(IdentityError::Unexpected { addr, kind: other.kind_name() }),
    }
}

/// How long [`answer_queries`] gives one connection to send its Hello and take the answer.
pub const QUERY_ANSWER_TIMEOUT: Duration = Duration::from_secs(1);
/// How often [`answer_queries`] looks at its `stop` flag while no connection comes.
const QUERY_STOP_POLL: Duration = Duration::from_millis(20);

/// Answers cluster queries on `listener` until `stop` is set: for a daemon that must answer
/// its peers' queries before its shards (and their listeners) run. One connection at a time,
/// each bounded by [`QUERY_ANSWER_TIMEOUT`]; it never takes messages (a peer that sends a
/// Hello with a cluster id is refused: the node is starting). Returns the listener's errors.
pub fn answer_queries(
    listener: TcpListener,
    node: u32,
    cluster_id: Option<ClusterId>,
    stop: &AtomicBool,
) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, _)) => {
                // One peer's failure (a reset, garbage, a timeout) is that peer's concern.
                let _ = answer_query(stream, node, cluster_id);
            }
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(QUERY_STOP_POLL)
            }
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
            Err(error) if error.kind() == std::io::ErrorKind::ConnectionAborted => {}
            Err(error) => return Err(error),
        }
    }
    Ok(())
}

fn answer_query(mut stream: TcpStream, node: u32, cluster_id: Option<ClusterId>) -> Result<(), ReadError> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(QUERY_ANSWER_TIMEOUT))?;
    stream.set_write_timeout(Some(QUERY_ANSWER_TIMEOUT))?;
    let Frame::Hello(hello) = read_handshake_frame(&mut stream)? else { return Ok(()) };
    // The shard number does not matter to a query; a Hello with a cluster id is refused below.
    let answer = match answer_hello(&hello, node, hello.to_shard, cluster_id) {
        HelloAnswer::Welcome { take_messages: true, .. } => {
            Frame::Refused { reason: format!("node {node} is starting: it takes no messages yet") }
        }
        HelloAnswer::Welcome { welcome, .. } => Frame::Welcome(welcome),
        HelloAnswer::Refuse(reason) => Frame::Refused { reason },
    };
    stream.write_all(&frame::encode_to_bytes(&answer))?;
    Ok(())
}

#[derive(Debug)]
enum ReadError {
    Io(std::io::Error),
    Frame(ClusterFrameError),
}

impl From<std::io::Error> for ReadError {
    fn from(error: std::io::Error) -> Self {
        ReadError::Io(error)
    }
}

impl ReadError {
    fn at(self, addr: SocketAddr) -> IdentityError {
        match self {
            ReadError::Io(source) => IdentityError::Io { addr, source },
            ReadError::Frame(source) => IdentityError::Frame { addr, source },
        }
    }
}

/// Reads one handshake frame, refusing by its length alone one over
/// [`HANDSHAKE_FRAME_BYTES_MAX`].
fn read_handshake_frame(stream: &mut TcpStream) -> Result<Frame, ReadError> {
    let mut prefix = [0; frame::LENGTH_PREFIX_BYTES];
    stream.read_exact(&mut prefix)?;
    let length = frame::frame_length(prefix);
    frame::check_frame_length(length, "HANDSHAKE_FRAME_BYTES_MAX", HANDSHAKE_FRAME_BYTES_MAX)
        .map_err(ReadError::Frame)?;
    let mut body = vec![0; length];
    stream.read_exact(&mut body)?;
    frame::decode_body(Bytes::from(body)).map_err(ReadError::Frame)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    const OURS: ClusterId = [0xab; 16];

    fn hello(cluster_id: Option<ClusterId>, to_node: u32, to_shard: u16) -> Hello {
        Hello { cluster_id, from_node: 4, from_shard: 0, to_node, to_shard }
    }

    #[test]
    fn the_rule_refuses_other_nodes_clusters_and_shards_with_a_reason() {
        let HelloAnswer::Refuse(reason) = answer_hello(&hello(Some(OURS), 3, 1), 2, 1, Some(OURS)) else {
            panic!("another node is refused")
        };
        assert_eq!(reason, "this is node 2, not node 3: check --seeds of node 4");
        let theirs = [0x01; 16];
        let HelloAnswer::Refuse(reason) = answer_hello(&hello(Some(theirs), 2, 1), 2, 1, Some(OURS)) else {
            panic!("another cluster is refused")
        };
        assert!(reason.starts_with(&format!("node 4 belongs to cluster {}", "01".repeat(16))), "{reason}");
        assert!(reason.contains(&format!("this node to cluster {}", "ab".repeat(16))), "{reason}");
        assert!(reason.contains("wipe its data directory"), "{reason}");
        let refused = answer_hello(&hello(Some(OURS), 2, 0), 2, 1, Some(OURS));
        assert!(matches!(refused, HelloAnswer::Refuse(reason) if reason.contains("not shard 0")));
    }

    #[test]
    fn messages_are_taken_only_when_both_sides_know_the_same_cluster() {
        let welcome = |ours| Welcome { cluster_id: ours, node: 2, controller_term: 0 };
        let cases = [
            (Some(OURS), Some(OURS), true),
            (None, Some(OURS), false),
            (Some(OURS), None, false),
            (None, None, false),
        ];
        for (theirs, ours, take_messages) in cases {
            let answer = answer_hello(&hello(theirs, 2, 1), 2, 1, ours);
            assert_eq!(answer, HelloAnswer::Welcome { welcome: welcome(ours), take_messages });
        }
        // A query names no particular shard.
        assert!(matches!(answer_hello(&hello(None, 2, 9), 2, 1, Some(OURS)), HelloAnswer::Welcome { .. }));
    }

    fn responder(
        cluster_id: Option<ClusterId>,
    ) -> (SocketAddr, Arc<AtomicBool>, std::thread::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || answer_queries(listener, 2, cluster_id, &flag).unwrap());
        (addr, stop, thread)
    }

    #[test]
    fn the_blocking_responder_answers_queries_and_refuses_the_rest() {
        let timeout = Duration::from_secs(2);
        for cluster_id in [None, Some(OURS)] {
            let (addr, stop, thread) = responder(cluster_id);
            assert_eq!(
                query_cluster_id(addr, 4, 2, timeout).unwrap(),
                (cluster_id, 0),
                "a starting node has no controller term"
            );
            let error = query_cluster_id(addr, 4, 3, timeout).unwrap_err();
            assert!(error.to_string().contains("this is node 2, not node 3"), "{error}");
            stop.store(true, Ordering::Relaxed);
            thread.join().unwrap();
        }
    }

    #[test]
    fn a_query_to_a_closed_port_fails_with_the_address() {
        let addr = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let error = query_cluster_id(addr, 1, 2, Duration::from_secs(1)).unwrap_err();
        assert!(matches!(error, IdentityError::Io { .. }), "{error}");
        assert!(error.to_string().contains(&addr.to_string()), "{error}");
    }
}
