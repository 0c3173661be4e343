use std::future::Future;

use glommio::net::TcpStream;
use pyralog_replication::epoch::EpochStart;
use pyralog_replication::{Append, AppendResponse};

use super::*;
use crate::cluster::frame::Welcome;
use crate::cluster::identity::{query_cluster_id, IdentityError};

const ID: ClusterId = [0x5a; 16];
const OTHER_ID: ClusterId = [0xc3; 16];
/// How long a test waits for something that takes milliseconds.
const PATIENCE: Duration = Duration::from_secs(5);

fn run<T>(future: impl Future<Output = T>) -> T {
    glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .io_memory(256 << 10)
        .make()
        .expect("executor")
        .run(future)
}

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().expect("an address")
}

fn start(node: u32, cluster_id: Option<ClusterId>) -> Rc<ClusterTransport> {
    start_with(ClusterConfig::new(node, 0, loopback(), Rc::new(Cell::new(cluster_id))))
}

fn start_with(config: ClusterConfig) -> Rc<ClusterTransport> {
    ClusterTransport::start(config).expect("a transport listens on loopback")
}

fn address(node: u32, transport: &ClusterTransport) -> PeerAddress {
    PeerAddress { node, shard: 0, addr: transport.local_addr() }
}

fn key(partition: u32) -> GroupKey {
    GroupKey { topic_id: [1; 16], partition }
}

/// A message whose term is its sequence number, so that order can be checked.
fn numbered(sequence: u32) -> Message {
    let body = match sequence % 5 {
        0 => Body::Append(Append {
            prev_end: 0,
            prev_epoch: -1,
            commit_end: i64::from(sequence),
            batches: vec![],
        }),
        1 => {
            let value = vec![sequence as u8; (sequence as usize * 37) % 6000];
            let batches = (0..1 + sequence % 3)
                .map(|_| Bytes::from(pyralog_replication::batch::build(&[(Some(b"key"), &value)], 0, 1)))
                .collect();
            Body::Append(Append { prev_end: 10, prev_epoch: 2, commit_end: 9, batches })
        }
        2 => Body::AppendResponse(AppendResponse {
            accepted: false,
            match_end: 0,
            acked_end: 0,
            log_end: 7,
            epochs: vec![EpochStart { epoch: 2, start_offset: 3 }],
            recovering: false,
        }),
        3 => Body::Vote { last_epoch: 2, log_end: 10, transfer: false },
        _ => Body::TimeoutNow,
    };
    Message { from: 1, to: 2, term: sequence as i32, body }
}

async fn recv_within(transport: &ClusterTransport) -> Received {
    futures_lite::future::or(async { transport.recv().await.expect("the transport is open") }, async {
        glommio::timer::sleep(PATIENCE).await;
        panic!("no message within {PATIENCE:?}")
    })
    .await
}

/// Waits for a condition that no event announces (a refusal, a count), checking it often.
async fn eventually(what: &str, condition: impl Fn() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        glommio::timer::sleep(Duration::from_millis(2)).await;
    }
}

/// Why shard 0 of `node` refused `transport`'s handshake, once it has.
async fn refusal(transport: &ClusterTransport, node: u32) -> String {
    eventually("the refusal", || transport.last_refusal(node, 0).is_some()).await;
    transport.last_refusal(node, 0).expect("refused")
}

#[test]
fn thousands_of_messages_arrive_in_order_in_few_frames() {
    run(async {
        let (a, b) = (start(1, Some(ID)), start(2, Some(ID)));
        const COUNT: u32 = 5000;
        // Sent in one turn of the executor: the writer coalesces them.
        for sequence in 0..COUNT {
            a.send(address(2, &b), key(sequence % 7), numbered(sequence));
            b.send(address(1, &a), key(sequence % 7), numbered(sequence));
        }
        for (from, to) in [(&a, &b), (&b, &a)] {
            for sequence in 0..COUNT {
                let received = recv_within(to).await;
                assert_eq!(received.message, numbered(sequence));
                assert_eq!(received.key, key(sequence % 7));
                assert_eq!((received.from_node, received.from_shard), (from.shared.node, 0));
            }
            let (sent, got) = (from.counts(), to.counts());
            assert_eq!((sent.messages_sent, got.messages_received), (u64::from(COUNT), u64::from(COUNT)));
            assert!(sent.frames_sent <= 3, "one tick's messages coalesce: {sent:?}");
            assert_eq!((sent.bytes_sent, sent.frames_sent), (got.bytes_received, got.frames_received));
            assert_eq!(sent.messages_dropped + sent.connection_errors, 0, "{sent:?}");
        }
        a.close().await;
        b.close().await;
    });
}

#[test]
fn large_appends_are_split_at_the_frame_limit_and_arrive_whole() {
    run(async {
        let (a, b) = (start(1, Some(ID)), start(2, Some(ID)));
        let value: Vec<u8> = (0..4 << 20).map(|i: u32| (i % 251) as u8).collect();
        let batch = Bytes::from(pyralog_replication::batch::build(&[(None, &value)], 0, 1));
        let append = |prev_end| Message {
            from: 1,
            to: 2,
            term: 1,
            body: Body::Append(Append {
                prev_end,
                prev_epoch: 1,
                commit_end: 0,
                batches: vec![batch.clone()],
            }),
        };
        // 24 MiB in one turn: two frames (16 MiB at most each), far more than a socket buffer.
        for prev_end in 0..6 {
            a.send(address(2, &b), key(0), append(prev_end));
        }
        for prev_end in 0..6 {
            assert_eq!(recv_within(&b).await.message, append(prev_end));
        }
        assert_eq!(a.counts().frames_sent, 2, "{:?}", a.counts());
        a.close().await;
        b.close().await;
    });
}

#[test]
fn a_peer_of_another_cluster_is_refused_and_nothing_is_delivered() {
    run(async {
        let (a, b) = (start(1, Some(ID)), start(2, Some(OTHER_ID)));
        a.send(address(2, &b), key(0), numbered(0));
        let reason = refusal(&a, 2).await;
        let expected = format!(
            "node 1 belongs to cluster {}, this node to cluster {}",
            identity::cluster_id_hex(&ID),
            identity::cluster_id_hex(&OTHER_ID)
        );
        assert!(reason.starts_with(&expected), "{reason}");
        assert!(reason.contains("wipe its data directory"), "{reason}");
        assert!(!a.is_connected(2, 0));
        assert_eq!(a.counts().refused_by_peers, 1);
        assert_eq!((b.counts().refused_peers, b.counts().messages_received), (1, 0));
        a.close().await;
        b.close().await;
    });
}

#[test]
fn a_hello_for_another_node_is_refused() {
    run(async {
        let (a, b) = (start(1, Some(ID)), start(2, Some(ID)));
        a.send(PeerAddress { node: 3, shard: 0, addr: b.local_addr() }, key(0), numbered(0));
        let reason = refusal(&a, 3).await;
        assert_eq!(reason, "this is node 2, not node 3: check --seeds of node 1");
        assert_eq!(b.counts().messages_received, 0);
        a.close().await;
        b.close().await;
    });
}

#[test]
fn a_restarted_peer_is_reconnected_and_messages_flow_again() {
    run(async {
        let (a, b) = (start(1, Some(ID)), start(2, Some(ID)));
        let at = address(2, &b);
        a.send(at, key(0), numbered(0));
        assert_eq!(recv_within(&b).await.message, numbered(0));
        b.close().await;
        drop(b);
        let b = start_with(ClusterConfig::new(2, 0, at.addr, Rc::new(Cell::new(Some(ID)))));
        // Raft resends on every tick; so does this sender, until the new peer hears it.
        let ticking = glommio::spawn_local({
            let a = Rc::clone(&a);
            async move {
                for sequence in 1.. {
                    a.send(at, key(0), numbered(sequence));
                    glommio::timer::sleep(Duration::from_millis(10)).await;
                }
            }
        });
        let received = recv_within(&b).await;
        assert!(received.message.term >= 1, "{received:?}");
        drop(ticking);
        assert!(a.counts().connection_errors >= 1, "the lost connection is counted");
        a.close().await;
        b.close().await;
    });
}

#[test]
fn a_full_queue_drops_and_counts_instead_of_growing() {
    run(async {
        let a = start(1, Some(ID));
        // Nothing is written while this task does not yield: the queues only fill.
        let nowhere = PeerAddress { node: 2, shard: 0, addr: "127.0.0.1:9".parse().unwrap() };
        for sequence in 0..CLUSTER_QUEUE_MESSAGES_MAX as u32 + 100 {
            a.send(nowhere, key(0), Message { term: sequence as i32, ..numbered(3) });
        }
        assert_eq!(a.queued(2, 0), CLUSTER_QUEUE_MESSAGES_MAX);
        assert_eq!(a.counts().messages_dropped, 100);

        let batch = Bytes::from(pyralog_replication::batch::build(&[(None, &vec![7; 1 << 20])], 0, 1));
        let append = Message {
            from: 1,
            to: 2,
            term: 1,
            body: Body::Append(Append { prev_end: 0, prev_epoch: -1, commit_end: 0, batches: vec![batch] }),
        };
        let elsewhere = PeerAddress { shard: 1, ..nowhere };
        for _ in 0..40 {
            a.send(elsewhere, key(0), append.clone());
        }
        let fits = CLUSTER_QUEUE_BYTES_MAX / queued_bytes(&append);
        assert_eq!(a.queued(2, 1), fits);
        assert_eq!(a.counts().messages_dropped, 100 + 40 - fits as u64);
        a.close().await;
    });
}

#[test]
fn a_full_inbox_holds_back_the_connection_instead_of_growing() {
    run(async {
        let a = start(1, Some(ID));
        let mut config = ClusterConfig::new(2, 0, loopback(), Rc::new(Cell::new(Some(ID))));
        config.inbox_messages_max = 16;
        let b = start_with(config);
        for sequence in 0..1000 {
            a.send(address(2, &b), key(0), numbered(sequence));
        }
        eventually("a full inbox", || b.counts().messages_received == 16).await;
        glommio::timer::sleep(Duration::from_millis(50)).await;
        assert_eq!(b.counts().messages_received, 16, "the reader waits for room");
        for sequence in 0..1000 {
            assert_eq!(recv_within(&b).await.message, numbered(sequence));
        }
        a.close().await;
        b.close().await;
    });
}

/// Runs a blocking cluster query off the executor (which must answer it).
async fn query(addr: SocketAddr, to_node: u32) -> Result<Option<ClusterId>, IdentityError> {
    glommio::executor().spawn_blocking(move || query_cluster_id(addr, 9, to_node, PATIENCE)).await
}

#[test]
fn a_query_learns_the_cluster_id_or_that_there_is_none() {
    run(async {
        let cluster_id = Rc::new(Cell::new(None));
        let b = start_with(ClusterConfig::new(2, 0, loopback(), Rc::clone(&cluster_id)));
        assert_eq!(query(b.local_addr(), 2).await.expect("answered"), None);
        cluster_id.set(Some(ID));
        assert_eq!(query(b.local_addr(), 2).await.expect("answered"), Some(ID));
        let error = query(b.local_addr(), 5).await.expect_err("another node is refused");
        assert!(error.to_string().contains("this is node 2, not node 5"), "{error}");
        assert_eq!(b.counts().messages_received, 0);
        b.close().await;
    });
}

#[test]
fn a_peer_without_a_cluster_id_is_answered_but_not_heard() {
    run(async {
        let (a, b) = (start(1, None), start(2, Some(ID)));
        a.send(address(2, &b), key(0), numbered(0));
        let unidentified = || {
            let peers = a.peers.borrow();
            peers.get(&(2, 0)).is_some_and(|peer| *peer.state.borrow() == PeerState::Unidentified)
        };
        eventually("the handshake", unidentified).await;
        assert!(!a.is_connected(2, 0));
        assert_eq!(b.counts().messages_received, 0);
        a.close().await;
        b.close().await;
    });
}

/// Connects to `transport` and shakes hands as node 7 of cluster `ID`.
async fn raw_connection(transport: &ClusterTransport) -> TcpStream {
    let mut stream = TcpStream::connect(transport.local_addr()).await.expect("connects");
    let hello = Hello { cluster_id: Some(ID), from_node: 7, from_shard: 0, to_node: 2, to_shard: 0 };
    stream.write_all(&frame::encode_to_bytes(&Frame::Hello(hello))).await.unwrap();
    let welcome = frame::encode_to_bytes(&Frame::Welcome(Welcome { cluster_id: Some(ID), node: 2 }));
    let mut answer = vec![0; welcome.len()];
    stream.read_exact(&mut answer).await.unwrap();
    assert_eq!(answer, welcome);
    stream
}

/// Whether the peer closes `stream` (rather than leaving it open) within [`PATIENCE`].
async fn closed_by_peer(stream: &mut TcpStream) -> bool {
    let mut rest = Vec::new();
    let read = futures_lite::future::or(async { Some(stream.read_to_end(&mut rest).await) }, async {
        glommio::timer::sleep(PATIENCE).await;
        None
    });
    matches!(read.await, Some(Ok(_)) | Some(Err(_)))
}

#[test]
fn a_garbage_frame_closes_its_connection_and_no_other() {
    run(async {
        let (a, b) = (start(1, Some(ID)), start(2, Some(ID)));
        a.send(address(2, &b), key(0), numbered(0));
        assert_eq!(recv_within(&b).await.message, numbered(0));

        let mut damaged = raw_connection(&b).await;
        let mut frame = frame::encode_to_bytes(&Frame::Messages(vec![(key(1), numbered(3))])).to_vec();
        let last = frame.len() - 1;
        frame[last] ^= 1;
        damaged.write_all(&frame).await.unwrap();
        assert!(closed_by_peer(&mut damaged).await, "a wrong CRC closes the connection");

        let mut oversized = raw_connection(&b).await;
        oversized.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
        assert!(closed_by_peer(&mut oversized).await, "an oversized length closes the connection");

        let mut stranger = TcpStream::connect(b.local_addr()).await.unwrap();
        stranger.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        assert!(closed_by_peer(&mut stranger).await, "a stranger's bytes close the connection");

        assert!(b.counts().frames_rejected >= 2, "{:?}", b.counts());
        a.send(address(2, &b), key(0), numbered(1));
        assert_eq!(recv_within(&b).await.message, numbered(1), "the other connection still works");
        assert!(a.is_connected(2, 0));
        assert_eq!(a.counts().connection_errors, 0);
        a.close().await;
        b.close().await;
    });
}

#[test]
fn close_frees_the_port_and_stops_delivery() {
    run(async {
        let b = start(2, Some(ID));
        let addr = b.local_addr();
        b.close().await;
        assert!(b.recv().await.is_none(), "a closed transport delivers nothing");
        let again = start_with(ClusterConfig::new(2, 0, addr, Rc::new(Cell::new(Some(ID)))));
        again.close().await;
    });
}
