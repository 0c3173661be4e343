//! An in-memory broker speaking the native protocol and (on a second port) the Kafka wire
//! protocol, for testing clients without the daemon. Both listeners serve the same logs, so
//! what one protocol produces the other consumes.
//!
//! Built for this crate's tests and, with the `fake-broker` feature, for other crates' tests
//! (the bench). It is not Pyralog: one listener, one lock around every partition, batches kept
//! in a `Vec`, no durability, no shards (the metadata advertises the listener's own port for
//! even partitions and port 0, "use the bootstrap connection", for odd ones, so both client
//! paths run).
//!
//! What it does keep of the real protocol: it answers each connection's requests in order,
//! sends nothing for `Acks::None`, assigns offsets per partition, returns whole batches from
//! the one holding the requested offset (so clients must skip records below it), long-polls
//! fetches up to `max_wait_ms`, and validates produced batches with [`RecordReader`].
//! [`FakeBroker::shutdown`] closes the listeners and every connection, as a crashed broker would.
//!
//! [`FakeBroker::start_cluster`] adds native listeners, one per further node, that serve the
//! same logs as the first: a partition is led by one node at a time (at first node
//! `partition % nodes`), the others answer its produces, fetches and offset lists with
//! `NotLeader`, and metadata from any node names every node and each partition's leader, epoch
//! and replicas, as a Pyralog cluster's does. [`FakeBroker::move_leader`] moves a leadership,
//! [`FakeBroker::stop_node`] takes a node down (its leaderships move to the next node up) and
//! [`FakeBroker::refuse_leadership`] makes every node answer `NotLeader`. Its replicas share
//! one log, so nothing is lost or copied in a move; a batch appended whose answer a stopped
//! node never sent is in the log, as it would be on a real leader that replicated it first.
//!
//! Its Kafka listener answers ApiVersions, Metadata (no auto-creation), CreateTopics, Produce
//! (nothing for acks 0), Fetch and ListOffsets through the generated codecs, in order, and
//! closes the connection on anything else.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use super::batch::{RecordReader, BATCH_LOG_OVERHEAD_BYTES};
use crate::codec::{
    self, Acks, ErrorCode, FetchPartitionResult, ListOffsetsPartitionResult, MetadataResponse, NodeInfo,
    PartitionInfo, ProducePartitionResult, Request, Response, ResponseFrame, ShardInfo, TopicInfo,
    OFFSET_EARLIEST, OFFSET_LATEST,
};
use crate::kafka::messages::{
    api_versions_response, create_topics_response, fetch_response, init_producer_id_response,
    list_offsets_response, metadata_response, produce_response,
};
use crate::kafka::wire::Records;
use crate::kafka::{self, RequestBody, ResponseBody};

/// Largest request frame the fake accepts.
const REQUEST_FRAME_BYTES_MAX: usize = 64 << 20;

#[derive(Debug, Default)]
struct PartitionLog {
    /// (base offset, batch with that base offset written in), in offset order.
    batches: Vec<(i64, Bytes)>,
    next_offset: i64,
    /// Idempotent producers' next sequence, by producer id: a producer seen before must
    /// send the sequence after its last batch (or repeat a batch), as a broker checks.
    next_sequences: HashMap<i64, i32>,
}

/// The nodes of a fake cluster ([`FakeBroker::start_cluster`]).
#[derive(Debug, Default)]
struct Nodes {
    /// Each node's native port, by node id.
    ports: Vec<u16>,
    down: Vec<bool>,
    /// Leaders moved from the first ones (`partition % nodes`, epoch 1): (node, epoch).
    leaders: HashMap<(String, u32), (u32, i32)>,
    /// Every node answers `NotLeader`.
    refuse_all: bool,
}

impl Nodes {
    fn leader(&self, topic: &str, partition: u32) -> (u32, i32) {
        let first = partition % u32::try_from(self.ports.len()).expect("few nodes");
        self.leaders.get(&(topic.to_owned(), partition)).copied().unwrap_or((first, 1))
    }

    /// Why `node` refuses a request for `topic`/`partition`, if it does.
    fn refusal(&self, node: u32, topic: &str, partition: u32) -> Option<String> {
        let (leader, epoch) = self.leader(topic, partition);
        (leader != node || self.refuse_all).then(|| {
            format!(
                "this node ({node}) does not lead {topic}/{partition} (term {epoch}; leader node {leader})"
            )
        })
    }
}

#[derive(Debug, Default)]
struct State {
    topics: HashMap<String, Vec<PartitionLog>>,
    /// Each open connection and the node it reached.
    connections: Vec<(u32, TcpStream)>,
    /// `None` for a broker of one node.
    nodes: Option<Nodes>,
    /// Native produce responses wait (the batches are appended) while this is set.
    produce_responses_held: bool,
    /// A paused node: its produce and fetch responses wait (the batches are appended), and
    /// so, as a connection's requests are served in turn, does everything after them.
    paused: Option<u32>,
    /// Producer ids handed out so far.
    producer_ids_issued: i64,
    /// A node and how many more produce requests it takes before it refuses one (once) with
    /// `NotLeader`, as a node does that is elected a moment later.
    refused_produce: Option<(u32, usize)>,
}

#[derive(Debug)]
struct Shared {
    port: u16,
    kafka_port: u16,
    state: Mutex<State>,
    /// Signalled on every append, for long-polling fetches.
    appended: Condvar,
    /// Signalled when held produce responses may go.
    released: Condvar,
    stopped: AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn node_down(&self, node: u32) -> bool {
        self.lock().nodes.as_ref().is_some_and(|nodes| nodes.down[node as usize])
    }
}

/// A running fake broker; dropping it shuts it down.
#[derive(Debug)]
pub struct FakeBroker {
    addr: SocketAddr,
    kafka_addr: SocketAddr,
    shared: Arc<Shared>,
    acceptors: Vec<JoinHandle<()>>,
    /// The native listeners of the further nodes of a cluster, by node id - 1.
    node_acceptors: Vec<(SocketAddr, Option<JoinHandle<()>>)>,
}

impl FakeBroker {
    /// Listens on two ephemeral loopback ports: native and Kafka.
    pub fn start() -> std::io::Result<FakeBroker> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let kafka_listener = TcpListener::bind("127.0.0.1:0")?;
        let kafka_addr = kafka_listener.local_addr()?;
        let shared = Arc::new(Shared {
            port: addr.port(),
            kafka_port: kafka_addr.port(),
            state: Mutex::new(State::default()),
            appended: Condvar::new(),
            released: Condvar::new(),
            stopped: AtomicBool::new(false),
        });
        let mut acceptors = Vec::new();
        let accept_shared = Arc::clone(&shared);
        acceptors.push(
            std::thread::Builder::new()
                .name("fake-broker-accept".into())
                .spawn(move || accept_loop(&listener, &accept_shared, 0, serve))?,
        );
        let accept_shared = Arc::clone(&shared);
        acceptors.push(std::thread::Builder::new().name("fake-broker-accept-kafka".into()).spawn(
            move || accept_loop(&kafka_listener, &accept_shared, 0, |s, shared, _| serve_kafka(s, shared)),
        )?);
        Ok(FakeBroker { addr, kafka_addr, shared, acceptors, node_acceptors: Vec::new() })
    }

    /// A cluster of `nodes` nodes (see the module docs): node 0 is [`FakeBroker::addr`], the
    /// others listen on ports of their own on 127.0.0.1.
    pub fn start_cluster(nodes: u32) -> std::io::Result<FakeBroker> {
        assert!(nodes >= 2, "a cluster has two nodes or more");
        let mut broker = FakeBroker::start()?;
        let mut ports = vec![broker.addr.port()];
        for node in 1..nodes {
            let listener = TcpListener::bind("127.0.0.1:0")?;
            let addr = listener.local_addr()?;
            ports.push(addr.port());
            let accept_shared = Arc::clone(&broker.shared);
            let acceptor = std::thread::Builder::new()
                .name(format!("fake-broker-accept-{node}"))
                .spawn(move || accept_loop(&listener, &accept_shared, node, serve))?;
            broker.node_acceptors.push((addr, Some(acceptor)));
        }
        let down = vec![false; ports.len()];
        broker.shared.lock().nodes = Some(Nodes { ports, down, ..Nodes::default() });
        Ok(broker)
    }

    /// Node `node`'s native address.
    pub fn node_addr(&self, node: u32) -> SocketAddr {
        match node {
            0 => self.addr,
            node => self.node_acceptors[node as usize - 1].0,
        }
    }

    /// The leader of `topic`/`partition` and its epoch (node 0, epoch 0, without a cluster).
    pub fn leader(&self, topic: &str, partition: u32) -> (u32, i32) {
        self.shared.lock().nodes.as_ref().map_or((0, 0), |nodes| nodes.leader(topic, partition))
    }

    /// Makes `node` the leader of `topic`/`partition` in a new epoch.
    pub fn move_leader(&self, topic: &str, partition: u32, node: u32) {
        let mut state = self.shared.lock();
        let nodes = state.nodes.as_mut().expect("a cluster");
        let (_, epoch) = nodes.leader(topic, partition);
        nodes.leaders.insert((topic.to_owned(), partition), (node, epoch + 1));
    }

    /// While set, every node answers `NotLeader` (metadata still names the leaders).
    pub fn refuse_leadership(&self, refuse: bool) {
        self.shared.lock().nodes.as_mut().expect("a cluster").refuse_all = refuse;
    }

    /// Takes `node` down as a crash would: its listener closes (connections are refused), its
    /// connections close, and its leaderships move to the next node that is up.
    pub fn stop_node(&mut self, node: u32) {
        let mut state = self.shared.lock();
        let nodes = state.nodes.as_mut().expect("a cluster");
        let count = nodes.ports.len() as u32;
        nodes.down[node as usize] = true;
        let next = (1..count).map(|step| (node + step) % count).find(|n| !nodes.down[*n as usize]);
        let next = next.expect("a node stays up");
        let led: Vec<(String, u32)> = state
            .topics
            .iter()
            .flat_map(|(topic, logs)| (0..logs.len() as u32).map(move |p| (topic.clone(), p)))
            .collect();
        let nodes = state.nodes.as_mut().expect("a cluster");
        for (topic, partition) in led {
            let (leader, epoch) = nodes.leader(&topic, partition);
            if leader == node {
                nodes.leaders.insert((topic, partition), (next, epoch + 1));
            }
        }
        state.connections.retain(|(reached, connection)| {
            if *reached == node {
                let _ = connection.shutdown(Shutdown::Both);
            }
            *reached != node
        });
        drop(state);
        self.shared.released.notify_all();
        self.shared.appended.notify_all();
        let addr = self.node_addr(node);
        let acceptor = match node {
            0 => self.acceptors.remove(0),
            node => self.node_acceptors[node as usize - 1].1.take().expect("stopped once"),
        };
        // Wake the acceptor, which sees its node down and drops its listener.
        let _ = TcpStream::connect_timeout(&addr, Duration::from_secs(1));
        let _ = acceptor.join();
    }

    /// The native protocol's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The Kafka protocol's address.
    pub fn kafka_addr(&self) -> SocketAddr {
        self.kafka_addr
    }

    /// Records stored in `topic`/`partition` so far (its next offset).
    pub fn next_offset(&self, topic: &str, partition: u32) -> Option<i64> {
        let state = self.shared.lock();
        state.topics.get(topic)?.get(partition as usize).map(|log| log.next_offset)
    }

    /// Holds back (true) or lets go (false) the responses to native produce requests, as a
    /// slow disk would: batches are appended, their acknowledgements wait.
    pub fn hold_produce_responses(&self, hold: bool) {
        self.shared.lock().produce_responses_held = hold;
        self.shared.released.notify_all();
    }

    /// Holds back the responses to native produce requests for `duration`, then lets them go
    /// (from a thread of its own, so the caller goes on meanwhile).
    pub fn hold_produce_responses_for(&self, duration: Duration) {
        self.hold_produce_responses(true);
        let shared = Arc::clone(&self.shared);
        std::thread::spawn(move || {
            std::thread::sleep(duration);
            shared.lock().produce_responses_held = false;
            shared.released.notify_all();
        });
    }

    /// Has `node` refuse the produce request after the next `taken` ones it gets with
    /// `NotLeader`, once, and take those after it, as a node does whose election completes
    /// while a client's requests are on their way.
    pub fn refuse_one_produce(&self, node: u32, taken: usize) {
        self.shared.lock().refused_produce = Some((node, taken));
    }

    /// Pauses node `node` (`None`: resumes the paused one), as SIGSTOP would: its connections
    /// stay open and silent (see `State::paused`).
    pub fn pause_node(&self, node: Option<u32>) {
        self.shared.lock().paused = node;
        self.shared.released.notify_all();
    }

    /// Stops accepting and closes every connection.
    pub fn shutdown(&mut self) {
        if self.shared.stopped.swap(true, Ordering::SeqCst) {
            return;
        }
        // Wake the acceptors with connections of our own.
        let node_addrs = self.node_acceptors.iter().map(|(addr, _)| *addr);
        for addr in [self.addr, self.kafka_addr].into_iter().chain(node_addrs) {
            let _ = TcpStream::connect_timeout(&addr, Duration::from_secs(1));
        }
        let node_acceptors = self.node_acceptors.iter_mut().filter_map(|(_, acceptor)| acceptor.take());
        for acceptor in self.acceptors.drain(..).chain(node_acceptors) {
            let _ = acceptor.join();
        }
        let mut state = self.shared.lock();
        for (_, connection) in state.connections.drain(..) {
            let _ = connection.shutdown(Shutdown::Both);
        }
        drop(state);
        self.shared.appended.notify_all();
        self.shared.released.notify_all();
    }
}

impl Drop for FakeBroker {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Serves `node`'s connections until the broker or the node stops.
fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>, node: u32, serve: fn(TcpStream, &Shared, u32)) {
    for stream in listener.incoming() {
        if shared.stopped.load(Ordering::SeqCst) || shared.node_down(node) {
            return;
        }
        let Ok(stream) = stream else { continue };
        let Ok(registered) = stream.try_clone() else { continue };
        shared.lock().connections.push((node, registered));
        let shared = Arc::clone(shared);
        let _ = std::thread::Builder::new()
            .name("fake-broker-conn".into())
            .spawn(move || serve(stream, &shared, node));
    }
}

fn serve(stream: TcpStream, shared: &Shared, node: u32) {
    serve_requests(&stream, shared, node);
    // The acceptor keeps a clone of the stream: close it so the client sees the end, as it
    // does when the node closes a connection whose frame it cannot read.
    let _ = stream.shutdown(Shutdown::Both);
}

fn serve_requests(mut stream: &TcpStream, shared: &Shared, node: u32) {
    let _ = stream.set_nodelay(true);
    let mut out = BytesMut::new();
    loop {
        let mut prefix = [0u8; codec::FRAME_PREFIX_BYTES];
        if stream.read_exact(&mut prefix).is_err() {
            return;
        }
        let body_bytes = codec::frame_body_bytes(prefix);
        if body_bytes > REQUEST_FRAME_BYTES_MAX {
            return;
        }
        let mut body = Vec::new();
        match (&mut stream).take(body_bytes as u64).read_to_end(&mut body) {
            Ok(n) if n == body_bytes => {}
            _ => return,
        }
        let response = match codec::decode_request(&Bytes::from(body)) {
            Ok((correlation_id, request)) => handle(shared, node, correlation_id, request),
            Err((Some(correlation_id), error)) => {
                Some(ResponseFrame::error(correlation_id, ErrorCode::InvalidRequest, error.to_string()))
            }
            Err((None, _)) => return,
        };
        if let Some(response) = response {
            out.clear();
            codec::encode_response(&response, &mut out);
            if stream.write_all(&out).is_err() {
                return;
            }
        }
    }
}

fn handle(shared: &Shared, node: u32, correlation_id: u64, request: Request) -> Option<ResponseFrame> {
    let body = match request {
        Request::Metadata { topics } => Response::Metadata(metadata(shared, node, &topics)),
        Request::CreateTopic { name, partitions, .. } => {
            let mut state = shared.lock();
            if state.topics.contains_key(&name) {
                let message = format!("topic '{name}' already exists");
                return Some(ResponseFrame::error(correlation_id, ErrorCode::TopicAlreadyExists, message));
            }
            if name.is_empty() || partitions == 0 {
                let message = format!("invalid topic: '{name}' with {partitions} partitions");
                return Some(ResponseFrame::error(correlation_id, ErrorCode::InvalidTopic, message));
            }
            state.topics.insert(name, (0..partitions).map(|_| PartitionLog::default()).collect());
            Response::CreateTopic
        }
        Request::InitProducerId => {
            let mut state = shared.lock();
            state.producer_ids_issued += 1;
            Response::InitProducerId { producer_id: 1000 + state.producer_ids_issued, producer_epoch: 0 }
        }
        Request::DeleteTopic { name } => {
            if shared.lock().topics.remove(&name).is_none() {
                let message = format!("unknown topic '{name}'");
                return Some(ResponseFrame::error(correlation_id, ErrorCode::UnknownTopic, message));
            }
            Response::DeleteTopic
        }
        Request::Produce(produce) => {
            let refused_once = {
                let mut state = shared.lock();
                match &mut state.refused_produce {
                    Some((refusing, 0)) if *refusing == node => {
                        state.refused_produce = None;
                        true
                    }
                    Some((refusing, taken)) if *refusing == node => {
                        *taken -= 1;
                        false
                    }
                    _ => false,
                }
            };
            let results = produce
                .partitions
                .into_iter()
                .map(|p| match refusal(shared, node, &produce.topic, p.partition) {
                    _ if refused_once => ProducePartitionResult {
                        partition: p.partition,
                        error: ErrorCode::NotLeader,
                        message: format!("node {node} does not lead {}/{} yet", produce.topic, p.partition),
                        base_offset: -1,
                        next_offset: -1,
                    },
                    Some(message) => ProducePartitionResult {
                        partition: p.partition,
                        error: ErrorCode::NotLeader,
                        message,
                        base_offset: -1,
                        next_offset: -1,
                    },
                    None => append(shared, &produce.topic, p.partition, &p.records),
                })
                .collect();
            if produce.acks == Acks::None {
                return None;
            }
            hold_while(shared, |state| state.produce_responses_held || state.paused == Some(node), node);
            Response::Produce(results)
        }
        Request::Fetch(fetch) => {
            let deadline = Instant::now() + Duration::from_millis(u64::from(fetch.max_wait_ms));
            let results =
                fetch.partitions.iter().map(|p| match refusal(shared, node, &fetch.topic, p.partition) {
                    Some(message) => FetchPartitionResult {
                        partition: p.partition,
                        error: ErrorCode::NotLeader,
                        message,
                        high_watermark: -1,
                        log_start_offset: -1,
                        records: Vec::new(),
                    },
                    None => read(shared, &fetch.topic, p.partition, p.offset, p.max_bytes, deadline),
                });
            let results = results.collect();
            hold_while(shared, |state| state.paused == Some(node), node);
            Response::Fetch(results)
        }
        Request::ListOffsets(list) => {
            let state = shared.lock();
            let results = list
                .partitions
                .iter()
                .map(|p| {
                    let log = state.topics.get(&list.topic).and_then(|t| t.get(p.partition as usize));
                    let refused =
                        state.nodes.as_ref().and_then(|n| n.refusal(node, &list.topic, p.partition));
                    let (error, offset) = match (log, p.timestamp) {
                        _ if refused.is_some() => (ErrorCode::NotLeader, -1),
                        (None, _) => (ErrorCode::UnknownPartition, -1),
                        (Some(_), OFFSET_EARLIEST) => (ErrorCode::None, 0),
                        (Some(log), OFFSET_LATEST) => (ErrorCode::None, log.next_offset),
                        (Some(_), _) => (ErrorCode::None, 0),
                    };
                    ListOffsetsPartitionResult {
                        partition: p.partition,
                        error,
                        message: String::new(),
                        offset,
                    }
                })
                .collect();
            Response::ListOffsets(results)
        }
    };
    Some(ResponseFrame::ok(correlation_id, body))
}

/// Waits while `held` says so, unless the broker stops or `node` goes down.
fn hold_while(shared: &Shared, held: impl Fn(&State) -> bool, node: u32) {
    let mut state = shared.lock();
    while held(&state)
        && !shared.stopped.load(Ordering::SeqCst)
        && !state.nodes.as_ref().is_some_and(|nodes| nodes.down[node as usize])
    {
        state = shared.released.wait(state).unwrap_or_else(|p| p.into_inner());
    }
}

/// Why `node` refuses a request for `topic`/`partition`: it does not lead it.
fn refusal(shared: &Shared, node: u32, topic: &str, partition: u32) -> Option<String> {
    shared.lock().nodes.as_ref()?.refusal(node, topic, partition)
}

fn metadata(shared: &Shared, node: u32, topics: &[String]) -> MetadataResponse {
    let state = shared.lock();
    let names: Vec<String> =
        if topics.is_empty() { state.topics.keys().cloned().collect() } else { topics.to_vec() };
    let describe = |name: &str, partition: u32| match &state.nodes {
        // One node: even partitions name the listener's port, odd ones port 0 ("the port asked").
        None => PartitionInfo::single_node(
            partition,
            0,
            if partition.is_multiple_of(2) { shared.port } else { 0 },
            0,
        ),
        Some(nodes) => {
            let (leader, epoch) = nodes.leader(name, partition);
            PartitionInfo {
                partition,
                shard: 0,
                port: nodes.ports[leader as usize],
                host: "127.0.0.1".to_owned(),
                leader_node: leader,
                leader_epoch: epoch,
                replicas: (0..nodes.ports.len() as u32).collect(),
            }
        }
    };
    let topics = names
        .into_iter()
        .map(|name| match state.topics.get(&name) {
            Some(logs) => {
                let partitions = (0..logs.len() as u32).map(|partition| describe(&name, partition)).collect();
                TopicInfo { name, error: ErrorCode::None, partitions }
            }
            None => TopicInfo { name, error: ErrorCode::UnknownTopic, partitions: Vec::new() },
        })
        .collect();
    let nodes = state.nodes.as_ref().map_or_else(Vec::new, |nodes| {
        (0..nodes.ports.len())
            .map(|id| NodeInfo {
                id: id as u32,
                host: "127.0.0.1".to_owned(),
                port: nodes.ports[id],
                shard_ports: vec![nodes.ports[id]],
            })
            .collect()
    });
    let port = state.nodes.as_ref().map_or(shared.port, |nodes| nodes.ports[node as usize]);
    MetadataResponse { shards: vec![ShardInfo { shard: 0, cpu: 0, port }], topics, nodes, node_id: node }
}

fn append(shared: &Shared, topic: &str, partition: u32, records: &Bytes) -> ProducePartitionResult {
    let result = |error, message: String, base_offset, next_offset| ProducePartitionResult {
        partition,
        error,
        message,
        base_offset,
        next_offset,
    };
    if let Some(Err(error)) = RecordReader::new(records.clone()).find(Result::is_err) {
        return result(ErrorCode::CorruptBatch, error.to_string(), -1, -1);
    }
    let mut state = shared.lock();
    let Some(log) = state.topics.get_mut(topic).and_then(|t| t.get_mut(partition as usize)) else {
        return result(ErrorCode::UnknownPartition, format!("{topic}/{partition}"), -1, -1);
    };
    let base_offset = log.next_offset;
    let mut at = 0;
    while at < records.len() {
        // The reader above checked every length.
        let length = i32::from_be_bytes(records[at + 8..at + 12].try_into().expect("checked")) as usize;
        let end = at + BATCH_LOG_OVERHEAD_BYTES + length;
        // An idempotent producer's batch already stored (same producer id and base sequence) is
        // answered with its first offsets, as a broker does; the fake keeps every batch.
        fn identity(batch: &[u8]) -> (i64, &[u8]) {
            (i64::from_be_bytes(batch[43..51].try_into().expect("checked")), &batch[53..57])
        }
        let (producer_id, base_sequence) = identity(&records[at..end]);
        if producer_id >= 0 && records.len() == end && at == 0 {
            let stored =
                log.batches.iter().position(|(_, batch)| identity(batch) == identity(&records[..end]));
            if let Some(index) = stored {
                let first = log.batches[index].0;
                let next = log.batches.get(index + 1).map_or(log.next_offset, |(offset, _)| *offset);
                return result(ErrorCode::None, String::new(), first, next);
            }
        }
        let last_offset_delta = i32::from_be_bytes(records[at + 23..at + 27].try_into().expect("checked"));
        if producer_id >= 0 {
            let base_sequence = i32::from_be_bytes(base_sequence.try_into().expect("four bytes"));
            let expected = log.next_sequences.insert(producer_id, base_sequence + last_offset_delta + 1);
            if let Some(expected) = expected.filter(|expected| *expected != base_sequence) {
                log.next_sequences.insert(producer_id, expected);
                let message =
                    format!("producer {producer_id} sent sequence {base_sequence}, expected {expected}");
                return result(ErrorCode::OutOfOrderSequence, message, -1, -1);
            }
        }
        let mut batch = BytesMut::from(&records[at..end]);
        batch[..8].copy_from_slice(&log.next_offset.to_be_bytes());
        log.batches.push((log.next_offset, batch.freeze()));
        log.next_offset += i64::from(last_offset_delta) + 1;
        at = end;
    }
    let next_offset = log.next_offset;
    drop(state);
    shared.appended.notify_all();
    result(ErrorCode::None, String::new(), base_offset, next_offset)
}

fn read(
    shared: &Shared,
    topic: &str,
    partition: u32,
    offset: i64,
    max_bytes: u32,
    deadline: Instant,
) -> FetchPartitionResult {
    let mut result = FetchPartitionResult {
        partition,
        error: ErrorCode::None,
        message: String::new(),
        high_watermark: -1,
        log_start_offset: 0,
        records: Vec::new(),
    };
    let mut state = shared.lock();
    loop {
        let Some(log) = state.topics.get(topic).and_then(|t| t.get(partition as usize)) else {
            result.error = ErrorCode::UnknownPartition;
            return result;
        };
        result.high_watermark = log.next_offset;
        if offset > log.next_offset || offset < 0 {
            result.error = ErrorCode::OffsetOutOfRange;
            return result;
        }
        let now = Instant::now();
        if offset < log.next_offset || now >= deadline || shared.stopped.load(Ordering::SeqCst) {
            // The batch holding `offset` and those after it, whole, at least one.
            let first = log.batches.partition_point(|(base, _)| *base <= offset).saturating_sub(1);
            let mut bytes = 0usize;
            for (_, batch) in &log.batches[first..] {
                if !result.records.is_empty() && bytes + batch.len() > max_bytes as usize {
                    break;
                }
                bytes += batch.len();
                result.records.push(batch.clone());
            }
            return result;
        }
        state = shared.appended.wait_timeout(state, deadline - now).unwrap_or_else(|p| p.into_inner()).0;
    }
}

fn serve_kafka(stream: TcpStream, shared: &Shared) {
    serve_kafka_requests(&stream, shared);
    // The acceptor keeps a clone of the stream: close it so the client sees the end.
    let _ = stream.shutdown(Shutdown::Both);
}

fn serve_kafka_requests(mut stream: &TcpStream, shared: &Shared) {
    let _ = stream.set_nodelay(true);
    let mut out = Vec::new();
    loop {
        let mut prefix = [0u8; kafka::FRAME_PREFIX_BYTES];
        if stream.read_exact(&mut prefix).is_err() {
            return;
        }
        let Some(size) =
            usize::try_from(i32::from_be_bytes(prefix)).ok().filter(|s| *s <= REQUEST_FRAME_BYTES_MAX)
        else {
            return;
        };
        let mut frame = Vec::new();
        match stream.take(size as u64).read_to_end(&mut frame) {
            Ok(n) if n == size => {}
            _ => return,
        }
        let Ok(request) = kafka::decode_request(Bytes::from(frame)) else { return };
        let (api_key, version, correlation_id) = (
            request.header.request_api_key,
            request.header.request_api_version,
            request.header.correlation_id,
        );
        let response = match handle_kafka(shared, request.body) {
            Ok(Some(body)) => body,
            Ok(None) => continue,
            Err(()) => return,
        };
        let Ok(chunks) = kafka::encode_response(api_key, version, correlation_id, &response) else { return };
        out.clear();
        chunks.iter().for_each(|chunk| out.extend_from_slice(chunk));
        if stream.write_all(&out).is_err() {
            return;
        }
    }
}

/// The Kafka code for a native one.
fn kafka_code(error: ErrorCode) -> i16 {
    match error {
        ErrorCode::None => kafka::error::NONE,
        ErrorCode::UnknownTopic | ErrorCode::UnknownPartition => kafka::error::UNKNOWN_TOPIC_OR_PARTITION,
        ErrorCode::CorruptBatch => kafka::error::CORRUPT_MESSAGE,
        ErrorCode::OffsetOutOfRange => kafka::error::OFFSET_OUT_OF_RANGE,
        ErrorCode::TopicAlreadyExists => kafka::error::TOPIC_ALREADY_EXISTS,
        ErrorCode::InvalidTopic => kafka::error::INVALID_TOPIC_EXCEPTION,
        _ => kafka::error::UNKNOWN_SERVER_ERROR,
    }
}

/// Answers one Kafka request: `Ok(None)` for a produce with acks 0, `Err` to close.
fn handle_kafka(shared: &Shared, body: RequestBody) -> Result<Option<ResponseBody>, ()> {
    Ok(Some(match body {
        RequestBody::ApiVersions(_) => {
            use api_versions_response::{ApiVersion, ApiVersionsResponse};
            ResponseBody::ApiVersions(ApiVersionsResponse {
                api_keys: kafka::SUPPORTED
                    .iter()
                    .map(|&(api_key, min_version, max_version)| ApiVersion {
                        api_key,
                        min_version,
                        max_version,
                    })
                    .collect(),
                ..Default::default()
            })
        }
        RequestBody::Metadata(request) => {
            use metadata_response::*;
            let state = shared.lock();
            let names: Vec<String> = match request.topics {
                None => state.topics.keys().cloned().collect(),
                Some(topics) => topics.into_iter().filter_map(|t| t.name).collect(),
            };
            let topics = names
                .into_iter()
                .map(|name| match state.topics.get(&name) {
                    Some(logs) => MetadataResponseTopic {
                        name: Some(name),
                        partitions: (0..logs.len() as i32)
                            .map(|partition_index| MetadataResponsePartition {
                                partition_index,
                                leader_id: 0,
                                replica_nodes: vec![0],
                                isr_nodes: vec![0],
                                ..Default::default()
                            })
                            .collect(),
                        ..Default::default()
                    },
                    None => MetadataResponseTopic {
                        error_code: kafka::error::UNKNOWN_TOPIC_OR_PARTITION,
                        name: Some(name),
                        ..Default::default()
                    },
                })
                .collect();
            let broker = MetadataResponseBroker {
                node_id: 0,
                host: "127.0.0.1".to_owned(),
                port: i32::from(shared.kafka_port),
                rack: None,
            };
            ResponseBody::Metadata(MetadataResponse {
                brokers: vec![broker],
                controller_id: 0,
                topics,
                ..Default::default()
            })
        }
        RequestBody::CreateTopics(request) => {
            use create_topics_response::*;
            let mut state = shared.lock();
            let topics = request
                .topics
                .into_iter()
                .map(|topic| {
                    let error_code = if state.topics.contains_key(&topic.name) {
                        kafka::error::TOPIC_ALREADY_EXISTS
                    } else if topic.name.is_empty() || topic.num_partitions <= 0 {
                        kafka::error::INVALID_TOPIC_EXCEPTION
                    } else {
                        let logs = (0..topic.num_partitions).map(|_| PartitionLog::default()).collect();
                        state.topics.insert(topic.name.clone(), logs);
                        kafka::error::NONE
                    };
                    CreatableTopicResult {
                        name: topic.name,
                        error_code,
                        num_partitions: topic.num_partitions,
                        replication_factor: 1,
                        ..Default::default()
                    }
                })
                .collect();
            ResponseBody::CreateTopics(CreateTopicsResponse { topics, ..Default::default() })
        }
        RequestBody::Produce(request) => {
            use produce_response::*;
            let responses = request
                .topic_data
                .into_iter()
                .map(|topic| TopicProduceResponse {
                    partition_responses: topic
                        .partition_data
                        .iter()
                        .map(|p| {
                            let records = p.records.as_ref().map(Records::to_bytes).unwrap_or_default();
                            let partition = u32::try_from(p.index).unwrap_or(u32::MAX);
                            let result = append(shared, &topic.name, partition, &records);
                            PartitionProduceResponse {
                                index: p.index,
                                error_code: kafka_code(result.error),
                                base_offset: result.base_offset,
                                error_message: Some(result.message),
                                ..Default::default()
                            }
                        })
                        .collect(),
                    name: topic.name,
                })
                .collect();
            if request.acks == 0 {
                return Ok(None);
            }
            ResponseBody::Produce(ProduceResponse { responses, ..Default::default() })
        }
        RequestBody::Fetch(request) => {
            use fetch_response::*;
            let max_wait = Duration::from_millis(u64::try_from(request.max_wait_ms).unwrap_or(0));
            let deadline = Instant::now() + max_wait;
            let responses = request
                .topics
                .into_iter()
                .map(|topic| FetchableTopicResponse {
                    partitions: topic
                        .partitions
                        .iter()
                        .map(|p| {
                            let partition = u32::try_from(p.partition).unwrap_or(u32::MAX);
                            let max_bytes = u32::try_from(p.partition_max_bytes).unwrap_or(0);
                            let result =
                                read(shared, &topic.topic, partition, p.fetch_offset, max_bytes, deadline);
                            PartitionData {
                                partition_index: p.partition,
                                error_code: kafka_code(result.error),
                                high_watermark: result.high_watermark,
                                last_stable_offset: result.high_watermark,
                                log_start_offset: result.log_start_offset,
                                records: Some(Records(result.records)),
                                ..Default::default()
                            }
                        })
                        .collect(),
                    topic: topic.topic,
                    ..Default::default()
                })
                .collect();
            ResponseBody::Fetch(FetchResponse { responses, ..Default::default() })
        }
        RequestBody::ListOffsets(request) => {
            use list_offsets_response::*;
            let state = shared.lock();
            let topics = request
                .topics
                .into_iter()
                .map(|topic| ListOffsetsTopicResponse {
                    partitions: topic
                        .partitions
                        .iter()
                        .map(|p| {
                            let log = usize::try_from(p.partition_index)
                                .ok()
                                .and_then(|index| state.topics.get(&topic.name)?.get(index));
                            let (error_code, offset) = match (log, p.timestamp) {
                                (None, _) => (kafka::error::UNKNOWN_TOPIC_OR_PARTITION, -1),
                                (Some(log), OFFSET_LATEST) => (kafka::error::NONE, log.next_offset),
                                (Some(_), _) => (kafka::error::NONE, 0),
                            };
                            ListOffsetsPartitionResponse {
                                partition_index: p.partition_index,
                                error_code,
                                timestamp: -1,
                                offset,
                                ..Default::default()
                            }
                        })
                        .collect(),
                    name: topic.name,
                })
                .collect();
            ResponseBody::ListOffsets(ListOffsetsResponse { topics, ..Default::default() })
        }
        RequestBody::InitProducerId(_) => {
            let mut state = shared.lock();
            state.producer_ids_issued += 1;
            ResponseBody::InitProducerId(init_producer_id_response::InitProducerIdResponse {
                producer_id: 1000 + state.producer_ids_issued,
                producer_epoch: 0,
                ..Default::default()
            })
        }
        _ => return Err(()),
    }))
}
