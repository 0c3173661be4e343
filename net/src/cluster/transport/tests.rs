use std::future::Future;

use glommio::net::TcpStream;
use pyralog_replication::epoch::EpochStart;
use pyralog_replication::{Append, AppendResponse};

use super::*;
use crate::cluster::frame::{Welcome, REQUEST_BODY_BYTES_MAX};
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
            log_start: 0,
            seq: 5,
            batches: vec![],
        }),
        1 => {
            let value = vec![sequence as u8; (sequence as usize * 37) % 6000];
            let batches = (0..1 + sequence % 3)
                .map(|_| Bytes::from(pyralog_replication::batch::build(&[(Some(b"key"), &value)], 0, 1)))
                .collect();
            Body::Append(Append { prev_end: 10, prev_epoch: 2, commit_end: 9, log_start: 3, seq: 5, batches })
        }
        2 => Body::AppendResponse(AppendResponse {
            accepted: false,
            match_end: 0,
            acked_end: 0,
            log_end: 7,
            epochs: vec![EpochStart { epoch: 2, start_offset: 3 }],
            recovering: false,
            seq: 5,
            disk_id: 3,
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
                log_start: 0,
                seq: 5,
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
            body: Body::Append(Append {
                prev_end: 0,
                prev_epoch: -1,
                commit_end: 0,
                log_start: 0,
                seq: 5,
                batches: vec![batch],
            }),
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
    glommio::executor()
        .spawn_blocking(move || query_cluster_id(addr, 9, to_node, PATIENCE).map(|(id, _)| id))
        .await
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
    let welcome = frame::encode_to_bytes(&Frame::Welcome(Welcome {
        cluster_id: Some(ID),
        node: 2,
        controller_term: 0,
    }));
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

// ---------------------------------------------------------------------------------------------
// Requests

/// Answers every request `transport` receives with its own body, until the task is dropped.
fn echo(transport: &Rc<ClusterTransport>) -> glommio::Task<()> {
    let transport = Rc::clone(transport);
    glommio::spawn_local(async move {
        while let Some(request) = transport.recv_request().await {
            transport.respond(&request, request.body.clone()).expect("the echo is queued");
        }
    })
}

/// A task that sends `body` from `from` to `to` as a request, with the answer as its output.
fn ask(
    from: &Rc<ClusterTransport>,
    to: PeerAddress,
    body: impl Into<Bytes>,
    timeout: Duration,
) -> glommio::Task<Result<Bytes, RequestError>> {
    let (from, body) = (Rc::clone(from), body.into());
    glommio::spawn_local(async move { from.request(to, body, timeout).await })
}

async fn recv_request_within(transport: &ClusterTransport) -> IncomingRequest {
    let request = async { transport.recv_request().await.expect("the transport is open") };
    futures_lite::future::or(request, async {
        glommio::timer::sleep(PATIENCE).await;
        panic!("no request within {PATIENCE:?}")
    })
    .await
}

/// A port nothing listens on (bound, then freed).
fn unused_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

#[test]
fn a_request_is_answered_with_its_echo_by_a_peer_that_never_sent_to_us() {
    run(async {
        let (a, b) = (start(1, Some(ID)), start(2, Some(ID)));
        let answering = echo(&b);
        let body = Bytes::from_static(b"{\"create_topic\":\"orders\"}");
        assert_eq!(a.request(address(2, &b), body.clone(), PATIENCE).await, Ok(body));
        let largest = Bytes::from(vec![0x6a; REQUEST_BODY_BYTES_MAX]);
        assert_eq!(a.request(address(2, &b), largest.clone(), PATIENCE).await, Ok(largest));
        let (sent, got) = (a.counts(), b.counts());
        assert_eq!((sent.requests_sent, got.requests_received, got.responses_sent), (2, 2, 2), "{got:?}");
        assert_eq!((sent.responses_received, sent.responses_unknown), (2, 0), "{sent:?}");
        assert_eq!(a.requests_in_flight(), 0);
        drop(answering);

        let too_large = Bytes::from(vec![0; REQUEST_BODY_BYTES_MAX + 1]);
        let error = a.request(address(2, &b), too_large.clone(), PATIENCE).await.unwrap_err();
        assert_eq!(
            error,
            RequestError::BodyTooLarge { bytes: REQUEST_BODY_BYTES_MAX + 1, max: REQUEST_BODY_BYTES_MAX }
        );
        assert!(error.to_string().contains("REQUEST_BODY_BYTES_MAX"), "{error}");
        let asking = ask(&a, address(2, &b), Bytes::from_static(b"?"), PATIENCE);
        let request = recv_request_within(&b).await;
        assert_eq!((request.from_node, request.from_shard, request.reply_to), (1, 0, a.local_addr()));
        assert!(matches!(b.respond(&request, too_large), Err(RequestError::BodyTooLarge { .. })));
        b.respond(&request, Bytes::from_static(b"!")).expect("queued");
        assert_eq!(asking.await, Ok(Bytes::from_static(b"!")));
        a.close().await;
        b.close().await;
    });
}

#[test]
fn concurrent_requests_are_matched_to_their_own_answers() {
    run(async {
        let (a, b) = (start(1, Some(ID)), start(2, Some(ID)));
        const COUNT: usize = 50;
        let asking: Vec<_> = (0..COUNT).map(|i| ask(&a, address(2, &b), format!("{i}"), PATIENCE)).collect();
        let mut requests = Vec::new();
        for _ in 0..COUNT {
            requests.push(recv_request_within(&b).await);
        }
        let mut ids: Vec<u64> = requests.iter().map(|request| request.id).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), COUNT, "every request has an id of its own");
        // Answered in the reverse order: only the ids match answers to requests.
        for request in requests.iter().rev() {
            let answer = format!("answer to {}", std::str::from_utf8(&request.body).unwrap());
            b.respond(request, Bytes::from(answer)).expect("queued");
        }
        for (i, asking) in asking.into_iter().enumerate() {
            assert_eq!(asking.await, Ok(Bytes::from(format!("answer to {i}"))));
        }
        assert_eq!(a.counts().responses_unknown, 0);
        a.close().await;
        b.close().await;
    });
}

#[test]
fn an_unanswered_request_times_out_and_its_late_answer_is_dropped_and_counted() {
    run(async {
        let (a, b) = (start(1, Some(ID)), start(2, Some(ID)));
        let timeout = Duration::from_millis(200);
        let started = Instant::now();
        let asking = ask(&a, address(2, &b), Bytes::from_static(b"anyone?"), timeout);
        let request = recv_request_within(&b).await;
        let error = asking.await.unwrap_err();
        let elapsed = started.elapsed();
        assert_eq!(error, RequestError::TimedOut { node: 2, shard: 0, timeout });
        assert!(error.to_string().contains("did not answer within 200ms"), "{error}");
        assert!(elapsed >= timeout && elapsed < timeout + Duration::from_secs(1), "{elapsed:?}");
        assert_eq!(a.requests_in_flight(), 0, "a timed-out request leaves nothing behind");

        b.respond(&request, Bytes::from_static(b"too late")).expect("queued");
        eventually("the late answer", || a.counts().responses_unknown == 1).await;
        assert_eq!(a.counts().responses_received, 0);
        a.close().await;
        b.close().await;
    });
}

#[test]
fn a_request_to_a_port_nobody_listens_on_fails_without_waiting_for_its_timeout() {
    run(async {
        let a = start(1, Some(ID));
        let nowhere = PeerAddress { node: 2, shard: 0, addr: unused_port() };
        let started = Instant::now();
        let error = a.request(nowhere, Bytes::from_static(b"hello"), PATIENCE).await.unwrap_err();
        assert!(started.elapsed() < PATIENCE / 2, "{:?}", started.elapsed());
        assert!(matches!(&error, RequestError::Unreachable { node: 2, shard: 0, .. }), "{error}");
        let text = error.to_string();
        assert!(text.starts_with(&format!("cannot connect to node 2 shard 0 at {}", nowhere.addr)), "{text}");
        a.close().await;
    });
}

#[test]
fn a_request_to_a_peer_of_another_cluster_fails_with_the_refusal_reason() {
    run(async {
        let (a, b) = (start(1, Some(ID)), start(2, Some(OTHER_ID)));
        let answering = echo(&b);
        let error = a.request(address(2, &b), Bytes::from_static(b"hello"), PATIENCE).await.unwrap_err();
        let RequestError::Refused { node: 2, shard: 0, reason } = &error else { panic!("refused: {error}") };
        assert!(reason.starts_with(&format!("node 1 belongs to cluster {}", identity::cluster_id_hex(&ID))));
        assert!(
            error.to_string().starts_with("node 2 shard 0 refused this node's connection: node 1"),
            "{error}"
        );
        assert_eq!(b.counts().requests_received, 0);
        drop(answering);
        a.close().await;
        b.close().await;
    });
}

#[test]
fn requests_in_flight_are_bounded_and_refused_beyond() {
    run(async {
        let (a, b) = (start(1, Some(ID)), start(2, Some(ID)));
        let waiting: Vec<_> =
            (0..REQUESTS_IN_FLIGHT_MAX).map(|i| ask(&a, address(2, &b), vec![i as u8], PATIENCE)).collect();
        eventually("every request in flight", || a.requests_in_flight() == REQUESTS_IN_FLIGHT_MAX).await;
        let error = a.request(address(2, &b), Bytes::new(), PATIENCE).await.unwrap_err();
        assert_eq!(error, RequestError::TooManyInFlight { max: REQUESTS_IN_FLIGHT_MAX });
        assert!(error.to_string().contains("REQUESTS_IN_FLIGHT_MAX"), "{error}");
        let answering = echo(&b);
        for (i, waiting) in waiting.into_iter().enumerate() {
            assert_eq!(waiting.await, Ok(Bytes::from(vec![i as u8])));
        }
        assert_eq!(a.requests_in_flight(), 0);
        assert_eq!(a.request(address(2, &b), Bytes::new(), PATIENCE).await, Ok(Bytes::new()), "room again");
        drop(answering);
        a.close().await;
        b.close().await;
    });
}

#[test]
fn a_full_request_queue_drops_and_counts_and_its_requesters_time_out() {
    run(async {
        let a = start(1, Some(ID));
        let mut config = ClusterConfig::new(2, 0, loopback(), Rc::new(Cell::new(Some(ID))));
        config.incoming_requests_max = 4;
        let b = start_with(config);
        let timeout = Duration::from_secs(1);
        let asking: Vec<_> = (0..10u8).map(|i| ask(&a, address(2, &b), vec![i], timeout)).collect();
        eventually("a full queue", || b.counts().requests_dropped == 6).await;
        assert_eq!(b.counts().requests_received, 4);
        let answering = echo(&b);
        let mut outcomes = Vec::new();
        for asking in asking {
            outcomes.push(asking.await);
        }
        let answered = outcomes.iter().filter(|outcome| outcome.is_ok()).count();
        let timed_out =
            outcomes.iter().filter(|outcome| matches!(outcome, Err(RequestError::TimedOut { .. }))).count();
        assert_eq!((answered, timed_out), (4, 6), "{outcomes:?}");
        drop(answering);
        a.close().await;
        b.close().await;
    });
}

#[test]
fn waiting_requests_fail_when_their_connection_is_lost_or_the_transport_closes() {
    run(async {
        let (a, b) = (start(1, Some(ID)), start(2, Some(ID)));
        let asking = ask(&a, address(2, &b), Bytes::from_static(b"?"), PATIENCE);
        recv_request_within(&b).await;
        b.close().await;
        let error = asking.await.unwrap_err();
        assert!(matches!(&error, RequestError::ConnectionLost { node: 2, shard: 0, .. }), "{error}");
        assert!(error.to_string().contains("may or may not have been carried out"), "{error}");

        let c = start(3, Some(ID));
        let asking = ask(&a, address(3, &c), Bytes::from_static(b"?"), PATIENCE);
        recv_request_within(&c).await;
        a.close().await;
        assert_eq!(asking.await, Err(RequestError::Closed));
        assert_eq!(a.request(address(3, &c), Bytes::new(), PATIENCE).await, Err(RequestError::Closed));
        c.close().await;
    });
}

#[test]
fn requests_and_raft_messages_flow_on_the_same_transports_at_once() {
    run(async {
        let (a, b) = (start(1, Some(ID)), start(2, Some(ID)));
        let answering = echo(&b);
        let asking = glommio::spawn_local({
            let (a, to) = (Rc::clone(&a), address(2, &b));
            async move {
                for i in 0..50 {
                    let body = Bytes::from(format!("request {i}"));
                    assert_eq!(a.request(to, body.clone(), PATIENCE).await, Ok(body));
                }
            }
        });
        const COUNT: u32 = 3000;
        for sequence in 0..COUNT {
            a.send(address(2, &b), key(sequence % 7), numbered(sequence));
            b.send(address(1, &a), key(sequence % 7), numbered(sequence));
            if sequence % 50 == 0 {
                futures_lite::future::yield_now().await;
            }
        }
        for sequence in 0..COUNT {
            assert_eq!(recv_within(&b).await.message, numbered(sequence));
            assert_eq!(recv_within(&a).await.message, numbered(sequence));
        }
        asking.await;
        for counts in [a.counts(), b.counts()] {
            assert_eq!(counts.messages_sent, u64::from(COUNT), "{counts:?}");
            assert_eq!(counts.messages_dropped + counts.connection_errors, 0, "{counts:?}");
        }
        assert_eq!((a.counts().responses_received, b.counts().responses_sent), (50, 50));
        drop(answering);
        a.close().await;
        b.close().await;
    });
}

#[test]
fn a_request_abandoned_before_it_leaves_is_not_sent() {
    run(async {
        let (a, b) = (start(1, Some(ID)), start(2, Some(ID)));
        let answering = echo(&b);
        // Queued and waiting, then dropped before the writer ran (this task has not yielded).
        let abandoned = futures_lite::future::poll_once(a.request(address(2, &b), Bytes::new(), PATIENCE));
        assert!(abandoned.await.is_none(), "the first poll queues the request and waits");
        assert_eq!(a.requests_in_flight(), 0, "dropping the call forgets the request");
        let body = Bytes::from_static(b"after");
        assert_eq!(a.request(address(2, &b), body.clone(), PATIENCE).await, Ok(body));
        // The later request left after the abandoned one would have, on the same connection.
        assert_eq!((a.counts().requests_sent, b.counts().requests_received), (1, 1));
        drop(answering);
        a.close().await;
        b.close().await;
    });
}

#[test]
fn a_response_from_another_peer_than_the_one_asked_is_dropped_and_counted() {
    run(async {
        let (b, c) = (start(2, Some(ID)), start(3, Some(ID)));
        let asking = ask(&b, address(3, &c), Bytes::from_static(b"?"), PATIENCE);
        let request = recv_request_within(&c).await;
        // Node 7 answers in node 3's place.
        let mut impostor = raw_connection(&b).await;
        let response = Frame::Response { id: request.id, body: Bytes::from_static(b"forged") };
        impostor.write_all(&frame::encode_to_bytes(&response)).await.unwrap();
        eventually("the forged answer", || b.counts().responses_unknown == 1).await;
        assert_eq!(b.requests_in_flight(), 1, "the request still waits for node 3");
        c.respond(&request, Bytes::from_static(b"real")).expect("queued");
        assert_eq!(asking.await, Ok(Bytes::from_static(b"real")));
        b.close().await;
        c.close().await;
    });
}
