//! The blocking Pyralog client: std threads and `std::net`, no async runtime, no server crate.
//!
//! - [`Client`]: metadata-aware requests. It keeps one pipelined [`Connection`] per address
//!   and sends each partition's requests straight to its leader's node and the shard that owns
//!   the partition there (the host and port in the metadata; an empty host or port 0 means the
//!   node that answered the metadata). A closed connection is replaced on the next request
//!   that needs it. Metadata is asked of the node that answered last, else the bootstrap
//!   address, else each node the last metadata named, so a client bootstrapped from any node
//!   of a cluster keeps working when that node goes away.
//! - [`failover`]: when a partition's leader moves (`NotLeader`, or its node went away), the
//!   client reads the metadata again and retries on the new leader, within a bounded budget
//!   with backoff; an idempotent [`Producer`]'s batches are stored once, a bare produce's at
//!   least once (see there).
//! - [`pipeline::Pipeline`]: the pipelined connection both protocols' connections are, a
//!   [`Connection`] (responses matched by correlation id) or a [`KafkaPipeline`] (in order).
//! - [`Producer`]: batching per partition, asynchronous sends, in-order delivery reports.
//! - [`Consumer`]: fetches a set of partitions and tracks the next offset of each.
//! - [`batch`]: the client's own RecordBatch v2 builder and reader.
//! - [`Transport`]: what `Producer` and `Consumer` need of a broker, implemented by `Client`
//!   (native protocol) and by [`KafkaClient`] (Kafka wire protocol), so both protocols are
//!   driven by the same batching and fetching code.
//!
//! Invariants: every request waits at most the request timeout ([`ConnectOptions`]); a broker
//! that goes away turns every pending and later request into [`ClientError::Disconnected`] or
//! [`ClientError::Connect`], never a hang. Server-side failures surface as
//! [`ClientError::Server`] with the broker's code and message.
//!
//! `Client` is cheap to clone and safe to share between threads; clones share connections
//! and the metadata cache.

pub mod batch;
pub mod connection;
pub mod consumer;
pub mod failover;
#[cfg(any(test, feature = "fake-broker"))]
pub mod fake_broker;
pub mod kafka;
pub mod partitioner;
pub mod pipeline;
pub mod probe;
pub mod producer;
pub mod transport;

use std::collections::HashMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;

pub use self::batch::{BatchBuilder, BatchError, IdempotentProducer, Record, RecordReader};
pub use self::connection::{Connection, PendingResponse};
pub use self::consumer::{ConsumedRecord, Consumer, StartAt};
pub use self::failover::{LEADER_RETRY_BACKOFF_FIRST, LEADER_RETRY_BACKOFF_MAX, LEADER_RETRY_BUDGET_DEFAULT};
pub use self::kafka::{
    KafkaClient, KafkaClientError, KafkaConnection, KafkaFetchPending, KafkaPending, KafkaPipeline,
    KafkaProducePending,
};
pub use self::partitioner::{PartitionSelector, Partitioner};
pub use self::pipeline::ConnectOptions;
pub use self::probe::PROBE_CLIENT_ID;
pub use self::producer::{
    DeliveryReport, Producer, ProducerConfig, IDEMPOTENT_IN_FLIGHT_MAX, IN_FLIGHT_BATCHES_MAX_DEFAULT,
};
pub use self::transport::{Pending, Transport};
pub use crate::codec::{
    Acks, ErrorCode, MetadataResponse, NodeInfo, PartitionInfo, ShardInfo, OFFSET_EARLIEST, OFFSET_LATEST,
};
#[cfg(test)]
mod tests;

use crate::codec::{
    FetchPartition, FetchRequest, ListOffsetsPartition, ListOffsetsRequest, ProducePartition, ProduceRequest,
    Request, Response, ResponseFrame,
};

/// Offsets reported for a produce the broker does not acknowledge (`Acks::None`).
pub const OFFSET_UNACKNOWLEDGED: i64 = -1;
/// How long a metadata request waits for one node before the next is asked (or the request
/// timeout, if shorter). A node answers metadata from memory at once; one that does not is
/// paused or cut off, which is when a client following a leader needs another node's view.
pub const METADATA_TIMEOUT_MAX: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot resolve broker address '{addr}': {reason}")]
    Resolve { addr: String, reason: String },
    /// The I/O error is part of the message, not a `source`: a report that prints the chain
    /// would show the cause twice.
    #[error("{}", connect_text(*.addr, .error))]
    Connect { addr: SocketAddr, error: std::io::Error },
    /// The port answered, but in the other protocol (see [`probe`]).
    #[error("{}", wrong_protocol_text(*.addr, *.found))]
    WrongProtocol { addr: SocketAddr, found: Protocol },
    #[error("connection to broker {addr} lost: {reason}")]
    Disconnected { addr: SocketAddr, reason: String },
    #[error("{op} request to {addr} got no response within {} ms", .waited.as_millis())]
    Timeout { addr: SocketAddr, op: &'static str, waited: Duration },
    /// The broker's message when it sent one (a sentence naming what failed), else what the
    /// code means.
    #[error("{}", if .message.is_empty() { .code.to_string() } else { .message.clone() })]
    Server { code: ErrorCode, message: String },
    /// A Kafka error code with no native [`ErrorCode`] counterpart (those that have one are
    /// reported as [`ClientError::Server`], so callers handle both protocols alike).
    #[error("{message} (Kafka error {code})")]
    Kafka { code: i16, message: String },
    #[error("{op}: the broker answered with {got}")]
    UnexpectedResponse { op: &'static str, got: String },
    #[error("topic '{topic}' has {partitions} partitions, there is no partition {partition}")]
    UnknownPartition { topic: String, partition: u32, partitions: u32 },
    /// The batch error is part of the message, not a `source`, as for `Connect`.
    #[error("records fetched from {topic}/{partition} are corrupt: {error}")]
    CorruptBatch { topic: String, partition: u32, error: BatchError },
    #[error("a record of {bytes} bytes exceeds the {max}-byte batch limit")]
    RecordTooLarge { bytes: usize, max: usize },
    #[error("{failed_batches} batches failed since the last flush; the first: {first}")]
    DeliveryFailed { failed_batches: u64, first: String },
    /// A request the partition's leader left unanswered for `waited` while the other nodes
    /// named a leader of a later epoch ([`failover`]): given up, to be sent to that one.
    #[error(
        "{topic}/{partition}: no answer from its leader in {} ms, and the other nodes name a new \
         one: {leader}",
        .waited.as_millis()
    )]
    LeaderReplaced { topic: String, partition: u32, waited: Duration, leader: String },
    /// A partition's leader moved and no node took the request within the retry budget
    /// ([`failover`]). The last failure is part of the message, not a `source`.
    #[error(
        "{topic}/{partition}: no leader took the request in {} ms ({retries} retries after leader \
         changes; its leader as last known: {leader}); the last error: {last}",
        .waited.as_millis()
    )]
    LeaderUnavailable {
        topic: String,
        partition: u32,
        leader: String,
        retries: u32,
        waited: Duration,
        last: Box<ClientError>,
    },
}

/// The two protocols a Pyralog node listens for, each on its own port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// Pyralog's own protocol: the node's `--listen` port, 127.0.0.1:7070 by default.
    Native,
    /// The Kafka wire protocol: the node's `--kafka-listen` port, 127.0.0.1:9092 by default.
    Kafka,
}

impl Protocol {
    /// The node's default address for this protocol.
    pub fn default_addr(self) -> &'static str {
        match self {
            Protocol::Native => "127.0.0.1:7070",
            Protocol::Kafka => "127.0.0.1:9092",
        }
    }

    /// The listener's name and the node's flag that sets its address.
    fn listener(self) -> (&'static str, &'static str) {
        match self {
            Protocol::Native => ("native listener", "--listen"),
            Protocol::Kafka => ("Kafka listener", "--kafka-listen"),
        }
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Protocol::Native => "Pyralog's native protocol",
            Protocol::Kafka => "the Kafka protocol",
        })
    }
}

fn connect_text(addr: SocketAddr, error: &std::io::Error) -> String {
    match error.kind() {
        std::io::ErrorKind::ConnectionRefused => format!(
            "no pyralog node is listening on {addr} (connection refused): is it running? \
             start it with `target/release/pyralog`"
        ),
        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => format!(
            "cannot connect to {addr}: no answer within the connect timeout; \
             is the address right and the host reachable?"
        ),
        _ => format!("cannot connect to {addr}: {error}"),
    }
}

fn wrong_protocol_text(addr: SocketAddr, found: Protocol) -> String {
    let (wanted, client) = match found {
        Protocol::Native => (Protocol::Kafka, "a native Pyralog client"),
        Protocol::Kafka => (Protocol::Native, "a Kafka client"),
    };
    let ((found_name, found_flag), (wanted_name, wanted_flag)) = (found.listener(), wanted.listener());
    format!(
        "{addr} speaks {found}, not {wanted}: it is a node's {found_name} ({found_flag}). Connect \
         to the node's {wanted_name} ({wanted_flag}, default {}) instead, or use {client} with \
         this port",
        wanted.default_addr(),
    )
}

impl ClientError {
    /// Whether the request got no answer within its timeout.
    pub fn is_timeout(&self) -> bool {
        matches!(self, ClientError::Timeout { .. })
    }

    /// True when the broker is unreachable or went away (as opposed to refusing a request).
    pub fn is_disconnect(&self) -> bool {
        match self {
            ClientError::Connect { .. } | ClientError::Disconnected { .. } => true,
            // The leader could not be found because the nodes went away.
            ClientError::LeaderUnavailable { last, .. } => last.is_disconnect(),
            _ => false,
        }
    }
}

/// An I/O error is cloned as its kind and message, which is all a report needs of it.
impl Clone for ClientError {
    fn clone(&self) -> ClientError {
        match self {
            ClientError::Connect { addr, error } => ClientError::Connect {
                addr: *addr,
                error: std::io::Error::new(error.kind(), error.to_string()),
            },
            ClientError::WrongProtocol { addr, found } => {
                ClientError::WrongProtocol { addr: *addr, found: *found }
            }
            ClientError::Resolve { addr, reason } => {
                ClientError::Resolve { addr: addr.clone(), reason: reason.clone() }
            }
            ClientError::Disconnected { addr, reason } => {
                ClientError::Disconnected { addr: *addr, reason: reason.clone() }
            }
            ClientError::Timeout { addr, op, waited } => {
                ClientError::Timeout { addr: *addr, op, waited: *waited }
            }
            ClientError::Server { code, message } => {
                ClientError::Server { code: *code, message: message.clone() }
            }
            ClientError::Kafka { code, message } => {
                ClientError::Kafka { code: *code, message: message.clone() }
            }
            ClientError::UnexpectedResponse { op, got } => {
                ClientError::UnexpectedResponse { op, got: got.clone() }
            }
            ClientError::UnknownPartition { topic, partition, partitions } => ClientError::UnknownPartition {
                topic: topic.clone(),
                partition: *partition,
                partitions: *partitions,
            },
            ClientError::CorruptBatch { topic, partition, error } => ClientError::CorruptBatch {
                topic: topic.clone(),
                partition: *partition,
                error: error.clone(),
            },
            ClientError::RecordTooLarge { bytes, max } => {
                ClientError::RecordTooLarge { bytes: *bytes, max: *max }
            }
            ClientError::DeliveryFailed { failed_batches, first } => {
                ClientError::DeliveryFailed { failed_batches: *failed_batches, first: first.clone() }
            }
            ClientError::LeaderReplaced { topic, partition, waited, leader } => ClientError::LeaderReplaced {
                topic: topic.clone(),
                partition: *partition,
                waited: *waited,
                leader: leader.clone(),
            },
            ClientError::LeaderUnavailable { topic, partition, leader, retries, waited, last } => {
                ClientError::LeaderUnavailable {
                    topic: topic.clone(),
                    partition: *partition,
                    leader: leader.clone(),
                    retries: *retries,
                    waited: *waited,
                    last: last.clone(),
                }
            }
        }
    }
}

pub type Result<T, E = ClientError> = std::result::Result<T, E>;

/// Where the broker put a produced batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProduceAck {
    /// Offset of the batch's first record; [`OFFSET_UNACKNOWLEDGED`] under `Acks::None`.
    pub base_offset: i64,
    /// Offset after the batch's last record; [`OFFSET_UNACKNOWLEDGED`] under `Acks::None`.
    pub next_offset: i64,
    /// When the acknowledgement was read off the socket; `None` under `Acks::None`.
    pub acknowledged_at: Option<std::time::Instant>,
}

/// One partition's fetched data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchResult {
    pub partition: u32,
    pub high_watermark: i64,
    pub log_start_offset: i64,
    /// Whole record batches back to back (the last may be cut short by `max_bytes`). The first
    /// batch may start before the requested offset.
    pub records: Bytes,
}

impl FetchResult {
    pub fn reader(&self) -> RecordReader {
        RecordReader::new(self.records.clone())
    }
}

/// A produce on its way.
#[derive(Debug)]
pub struct PendingProduce {
    partition: u32,
    /// `None` under `Acks::None`: there is nothing to wait for.
    response: Option<PendingResponse>,
}

impl PendingProduce {
    pub fn partition(&self) -> u32 {
        self.partition
    }

    pub fn wait(self) -> Result<ProduceAck> {
        match self.response {
            None => Ok(UNACKNOWLEDGED),
            Some(response) => {
                let (at, frame) = response.wait_timed()?;
                produce_ack(self.partition, frame, at)
            }
        }
    }

    /// The outcome if it is known, without blocking.
    pub fn try_wait(&mut self, now: Instant) -> Option<Result<ProduceAck>> {
        match &mut self.response {
            None => Some(Ok(UNACKNOWLEDGED)),
            Some(response) => Some(
                response.try_wait_timed(now)?.and_then(|(at, frame)| produce_ack(self.partition, frame, at)),
            ),
        }
    }

    /// The outcome if it is known within `limit` (never past the request timeout).
    pub fn wait_within(&mut self, limit: Duration) -> Option<Result<ProduceAck>> {
        match &mut self.response {
            None => Some(Ok(UNACKNOWLEDGED)),
            Some(response) => Some(
                response
                    .wait_timed_within(limit)?
                    .and_then(|(at, frame)| produce_ack(self.partition, frame, at)),
            ),
        }
    }
}

/// A fetch on its way.
#[derive(Debug)]
pub struct PendingFetch {
    partition: u32,
    response: PendingResponse,
}

impl PendingFetch {
    pub fn partition(&self) -> u32 {
        self.partition
    }

    pub fn wait(self) -> Result<FetchResult> {
        fetch_result(self.partition, self.response.wait()?)
    }

    /// The outcome if it is known, without blocking.
    pub fn try_wait(&mut self, now: Instant) -> Option<Result<FetchResult>> {
        Some(self.response.try_wait(now)?.and_then(|frame| fetch_result(self.partition, frame)))
    }

    /// The outcome if it is known within `limit` (never past the request timeout).
    pub fn wait_within(&mut self, limit: Duration) -> Option<Result<FetchResult>> {
        let outcome = self.response.wait_timed_within(limit)?;
        Some(outcome.and_then(|(_, frame)| fetch_result(self.partition, frame)))
    }
}

fn fetch_result(partition: u32, frame: ResponseFrame) -> Result<FetchResult> {
    let Response::Fetch(results) = response_body("fetch", frame)? else {
        unreachable!("response_body checks the kind");
    };
    let result = results
        .into_iter()
        .find(|r| r.partition == partition)
        .ok_or_else(|| missing_partition("fetch", partition))?;
    server_error(result.error, &result.message)?;
    Ok(FetchResult {
        partition,
        high_watermark: result.high_watermark,
        log_start_offset: result.log_start_offset,
        records: crate::kafka::wire::Records(result.records).into_bytes(),
    })
}

/// A metadata-aware, shard-aware client. See the module docs.
#[derive(Debug, Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    bootstrap: SocketAddr,
    options: ConnectOptions,
    /// By address: shards' own ports and nodes' shared ports, on any node of the cluster.
    connections: Mutex<HashMap<SocketAddr, Arc<Connection>>>,
    /// Partitions of the topics seen so far, indexed by partition id.
    topics: RwLock<HashMap<String, Vec<Route>>>,
    shards: RwLock<Vec<ShardInfo>>,
    /// The id and shared native address of every node the last metadata named.
    nodes: RwLock<Vec<(u32, SocketAddr)>>,
    /// The node whose metadata answered last: asked first the next time.
    metadata_addr: Mutex<SocketAddr>,
}

/// A partition as the metadata described it, and the address its requests go to.
#[derive(Debug, Clone)]
struct Route {
    info: PartitionInfo,
    leader: SocketAddr,
}

impl Client {
    /// Connects to `bootstrap` ("host:port") with default options and fetches the metadata.
    pub fn connect(bootstrap: &str) -> Result<Client> {
        Client::connect_with(bootstrap, ConnectOptions::default())
    }

    pub fn connect_with(bootstrap: &str, options: ConnectOptions) -> Result<Client> {
        let addr = resolve(bootstrap)?;
        let client = Client {
            inner: Arc::new(Inner {
                bootstrap: addr,
                options,
                connections: Mutex::new(HashMap::new()),
                topics: RwLock::new(HashMap::new()),
                shards: RwLock::new(Vec::new()),
                nodes: RwLock::new(Vec::new()),
                metadata_addr: Mutex::new(addr),
            }),
        };
        // A client pointed at a Kafka listener fails here: say so, rather than "closed".
        client.refresh_metadata().map_err(|error| {
            probe::explain(error, addr, Protocol::Native, client.inner.options.connect_timeout)
        })?;
        Ok(client)
    }

    pub fn bootstrap_addr(&self) -> SocketAddr {
        self.inner.bootstrap
    }

    /// Ports on the bootstrap host with an open connection, ascending: shows which shards the
    /// client has been talking to directly.
    pub fn connection_ports(&self) -> Vec<u16> {
        let bootstrap = self.inner.bootstrap.ip();
        let mut ports: Vec<u16> =
            self.connection_addrs().into_iter().filter(|a| a.ip() == bootstrap).map(|a| a.port()).collect();
        ports.dedup();
        ports
    }

    /// Addresses with an open connection, ascending: shows which nodes and shards the client
    /// has been talking to.
    pub fn connection_addrs(&self) -> Vec<SocketAddr> {
        let connections = self.inner.connections.lock().unwrap_or_else(|p| p.into_inner());
        let mut addrs: Vec<SocketAddr> =
            connections.iter().filter(|(_, c)| !c.is_closed()).map(|(addr, _)| *addr).collect();
        addrs.sort_unstable();
        addrs
    }

    /// The shards of the node that answered the last metadata request.
    pub fn shards(&self) -> Vec<ShardInfo> {
        self.inner.shards.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Asks any node for the metadata of `topics` (all topics when empty) and caches what it
    /// learns.
    pub fn metadata(&self, topics: &[&str]) -> Result<MetadataResponse> {
        let request = Request::Metadata { topics: topics.iter().map(|t| (*t).to_owned()).collect() };
        let (answered, frame) = self.call_any_node(&request, true)?;
        let metadata = metadata_body(frame)?;
        self.keep_metadata(answered, topics.is_empty(), &metadata);
        Ok(metadata)
    }

    /// Caches what node `answered` said: its shards, the nodes, and the topics it was asked
    /// of (`all`: every topic, so those it does not name are dropped).
    fn keep_metadata(&self, answered: SocketAddr, all: bool, metadata: &MetadataResponse) {
        *self.inner.shards.write().unwrap_or_else(|p| p.into_inner()) = metadata.shards.clone();
        let nodes: Vec<(u32, SocketAddr)> =
            metadata.nodes.iter().map(|node| (node.id, node_addr(&node.host, node.port, answered))).collect();
        if !nodes.is_empty() {
            *self.inner.nodes.write().unwrap_or_else(|p| p.into_inner()) = nodes;
        }
        let mut cache = self.inner.topics.write().unwrap_or_else(|p| p.into_inner());
        if all {
            cache.clear();
        }
        for topic in &metadata.topics {
            if topic.error == ErrorCode::None {
                let mut routes: Vec<Route> = topic
                    .partitions
                    .iter()
                    .map(|info| Route {
                        info: info.clone(),
                        leader: node_addr(&info.host, info.port, answered),
                    })
                    .collect();
                routes.sort_by_key(|r| r.info.partition);
                cache.insert(topic.name.clone(), routes);
            } else {
                cache.remove(&topic.name);
            }
        }
    }

    /// See [`Transport::leader_replaced`]. The other nodes are asked in turn, each for at
    /// most [`METADATA_TIMEOUT_MAX`]; the first to answer decides.
    pub fn leader_replaced(&self, topic: &str, partition: u32) -> Option<String> {
        let silent = self.cached_route(topic, partition)?.info;
        if silent.replicas.len() < 2 {
            return None;
        }
        let others: Vec<SocketAddr> = {
            let nodes = self.inner.nodes.read().unwrap_or_else(|p| p.into_inner());
            nodes.iter().filter(|(id, _)| *id != silent.leader_node).map(|(_, addr)| *addr).collect()
        };
        let request = Request::Metadata { topics: vec![topic.to_owned()] };
        let (answered, metadata) = others.into_iter().find_map(|addr| {
            let frame = self.connection(addr).ok()?.call_within(&request, METADATA_TIMEOUT_MAX).ok()?;
            Some((addr, metadata_body(frame).ok()?))
        })?;
        // The silent node is not asked first the next time either.
        *self.inner.metadata_addr.lock().unwrap_or_else(|p| p.into_inner()) = answered;
        let named = metadata
            .topics
            .iter()
            .filter(|t| t.name == topic && t.error == ErrorCode::None)
            .flat_map(|t| &t.partitions)
            .find(|p| p.partition == partition)?;
        if named.leader_epoch <= silent.leader_epoch || named.leader_node == silent.leader_node {
            return None;
        }
        self.keep_metadata(answered, false, &metadata);
        Some(self.leader_name(topic, partition))
    }

    /// An id and epoch for an idempotent producer, from any node; `None` from a node that
    /// predates them (it answers `UnsupportedRequest`).
    pub fn init_producer_id(&self) -> Result<Option<(i64, i16)>> {
        let frame = match self.call_any_node(&Request::InitProducerId, false)?.1 {
            frame if frame.error == ErrorCode::UnsupportedRequest => return Ok(None),
            frame => frame,
        };
        match response_body("init_producer_id", frame)? {
            Response::InitProducerId { producer_id, producer_epoch } => {
                Ok(Some((producer_id, producer_epoch)))
            }
            _ => unreachable!("response_body checks the kind"),
        }
    }

    /// Re-reads the metadata of every topic.
    pub fn refresh_metadata(&self) -> Result<()> {
        self.metadata(&[]).map(drop)
    }

    pub fn create_topic(&self, name: &str, partitions: u32) -> Result<()> {
        self.create_replicated_topic(name, partitions, 0, 0)
    }

    /// Creates a topic with `replication_factor` replicas per partition and a write quorum
    /// of `min_insync_replicas` (0 for either: the node's default, a majority). A factor above
    /// 1 needs a cluster.
    pub fn create_replicated_topic(
        &self,
        name: &str,
        partitions: u32,
        replication_factor: u32,
        min_insync_replicas: u32,
    ) -> Result<()> {
        let request = Request::CreateTopic {
            name: name.to_owned(),
            partitions,
            replication_factor,
            min_insync_replicas,
        };
        response_body("create_topic", self.call_any_node(&request, false)?.1)?;
        self.metadata(&[name]).map(drop)
    }

    pub fn delete_topic(&self, name: &str) -> Result<()> {
        let request = Request::DeleteTopic { name: name.to_owned() };
        response_body("delete_topic", self.call_any_node(&request, false)?.1)?;
        self.inner.topics.write().unwrap_or_else(|p| p.into_inner()).remove(name);
        Ok(())
    }

    /// The topic's partitions, from the cache or, for a topic not seen yet, from the broker.
    pub fn partitions(&self, topic: &str) -> Result<Vec<PartitionInfo>> {
        self.with_routes(topic, |routes| routes.iter().map(|route| route.info.clone()).collect())
    }

    /// `look` at the topic's routes, from the cache or, for a topic not seen yet, from the
    /// broker; under the cache's read lock, so the hot path copies nothing.
    fn with_routes<T>(&self, topic: &str, look: impl FnOnce(&[Route]) -> T) -> Result<T> {
        {
            let cache = self.inner.topics.read().unwrap_or_else(|p| p.into_inner());
            if let Some(routes) = cache.get(topic) {
                return Ok(look(routes));
            }
        }
        let metadata = self.metadata(&[topic])?;
        let info = metadata
            .topics
            .into_iter()
            .find(|t| t.name == topic)
            .ok_or_else(|| topic_error(ErrorCode::UnknownTopic, topic))?;
        if info.error != ErrorCode::None {
            return Err(topic_error(info.error, topic));
        }
        let cache = self.inner.topics.read().unwrap_or_else(|p| p.into_inner());
        let routes = cache.get(topic).ok_or_else(|| topic_error(ErrorCode::UnknownTopic, topic))?;
        Ok(look(routes))
    }

    pub fn partition_count(&self, topic: &str) -> Result<u32> {
        self.with_routes(topic, |routes| u32::try_from(routes.len()).expect("partition ids are u32"))
    }

    /// The offset for `spec`: [`OFFSET_EARLIEST`], [`OFFSET_LATEST`] or a timestamp in ms.
    /// Follows the partition's leader when it moves ([`failover`]).
    pub fn list_offsets(&self, topic: &str, partition: u32, spec: i64) -> Result<i64> {
        self.following_leader(topic, partition, || self.list_offsets_once(topic, partition, spec))
    }

    fn list_offsets_once(&self, topic: &str, partition: u32, spec: i64) -> Result<i64> {
        let request = Request::ListOffsets(ListOffsetsRequest {
            topic: topic.to_owned(),
            partitions: vec![ListOffsetsPartition { partition, timestamp: spec }],
        });
        let frame = self.partition_connection(topic, partition)?.call(&request)?;
        let Response::ListOffsets(results) = response_body("list_offsets", frame)? else {
            unreachable!("response_body checks the kind");
        };
        let result = results
            .into_iter()
            .find(|r| r.partition == partition)
            .ok_or_else(|| missing_partition("list_offsets", partition))?;
        server_error(result.error, &result.message)?;
        Ok(result.offset)
    }

    /// Produces `records` (one or more whole batches) and waits for the acknowledgement,
    /// following the partition's leader when it moves: at least once, as `records` carry no
    /// producer id unless the caller stamped one ([`failover`]).
    pub fn produce(&self, topic: &str, partition: u32, records: Bytes, acks: Acks) -> Result<ProduceAck> {
        self.following_leader(topic, partition, || {
            self.produce_async(topic, partition, records.clone(), acks)?.wait()
        })
    }

    /// Sends a produce and returns at once. Requests to one partition are written in call
    /// order on one connection, so the broker appends them in that order. Not retried: a
    /// [`Producer`] retries its batches after a leader change, in order.
    pub fn produce_async(
        &self,
        topic: &str,
        partition: u32,
        records: Bytes,
        acks: Acks,
    ) -> Result<PendingProduce> {
        let connection = self.partition_connection(topic, partition)?;
        let request = Request::Produce(ProduceRequest {
            topic: topic.to_owned(),
            acks,
            partitions: vec![ProducePartition { partition, records }],
        });
        if acks == Acks::None {
            connection.send_no_response(&request)?;
            return Ok(PendingProduce { partition, response: None });
        }
        Ok(PendingProduce { partition, response: Some(connection.send(&request)?) })
    }

    /// Fetches from `offset`, waiting up to `max_wait_ms` for data to arrive, following the
    /// partition's leader when it moves.
    pub fn fetch(
        &self,
        topic: &str,
        partition: u32,
        offset: i64,
        max_bytes: u32,
        max_wait_ms: u32,
    ) -> Result<FetchResult> {
        self.following_leader(topic, partition, || {
            self.fetch_async(topic, partition, offset, max_bytes, max_wait_ms)?.wait()
        })
    }

    pub fn fetch_async(
        &self,
        topic: &str,
        partition: u32,
        offset: i64,
        max_bytes: u32,
        max_wait_ms: u32,
    ) -> Result<PendingFetch> {
        let connection = self.partition_connection(topic, partition)?;
        let request = Request::Fetch(FetchRequest {
            topic: topic.to_owned(),
            max_wait_ms,
            min_bytes: 1,
            max_bytes,
            partitions: vec![FetchPartition { partition, offset, max_bytes }],
        });
        Ok(PendingFetch { partition, response: connection.send(&request)? })
    }

    /// Whether `error`, from a request for `topic`/`partition`, may succeed on the
    /// partition's leader once the metadata is read again: the node does not lead it, it
    /// went away (or is stopping), or did not answer within the request timeout (paused or
    /// cut off: no reset connection says so), and the partition has replicas on other nodes;
    /// it leads but has too few in-sync replicas for a durable produce (nothing was
    /// appended); its storage failed and the partition has replicas on other nodes (the
    /// failed replica stops, nothing it failed to write was acknowledged, and the others
    /// elect a leader); or it does not know a topic the metadata named (a new topic it has
    /// not applied yet).
    pub fn leader_moved(&self, topic: &str, partition: u32, error: &ClientError) -> bool {
        match error {
            ClientError::Server { code: ErrorCode::NotLeader, .. } => true,
            // Nothing was appended; a follower may be back in sync by the next try.
            ClientError::Server { code: ErrorCode::NotEnoughReplicas, .. } => true,
            // The metadata (another node's) named the topic: this node has not applied its
            // creation yet, and will (the next metadata read drops a topic really gone).
            ClientError::Server { code: ErrorCode::UnknownTopic, .. } => {
                self.cached_route(topic, partition).is_some()
            }
            ClientError::Server { code: ErrorCode::ShuttingDown | ErrorCode::StorageError, .. } => {
                self.replicated(topic, partition)
            }
            error if error.is_disconnect() => self.replicated(topic, partition),
            // The others elect a new leader once their election timeout passes without the
            // silent node's heartbeats; a node of its own has no one to fail over to.
            error if error.is_timeout() => self.replicated(topic, partition),
            ClientError::LeaderReplaced { .. } => true,
            _ => false,
        }
    }

    /// The partition's leader as the cached metadata names it, for error messages.
    pub fn leader_name(&self, topic: &str, partition: u32) -> String {
        match self.cached_route(topic, partition) {
            Some(Route { info, leader }) => {
                format!("node {} at {leader}, epoch {}", info.leader_node, info.leader_epoch)
            }
            None => "unknown".to_owned(),
        }
    }

    fn cached_route(&self, topic: &str, partition: u32) -> Option<Route> {
        let cache = self.inner.topics.read().unwrap_or_else(|p| p.into_inner());
        cache.get(topic)?.iter().find(|r| r.info.partition == partition).cloned()
    }

    /// Whether the partition has replicas on other nodes, as the cached metadata says.
    fn replicated(&self, topic: &str, partition: u32) -> bool {
        self.cached_route(topic, partition).is_some_and(|route| route.info.replicas.len() > 1)
    }

    /// Runs `op` until it succeeds, fails for another reason than a moved leader, or the
    /// retry budget is spent, reading the metadata again before each retry.
    fn following_leader<T>(&self, topic: &str, partition: u32, op: impl FnMut() -> Result<T>) -> Result<T> {
        failover::following_leader(self, topic, partition, op)
    }

    /// Sends `request` to the node whose metadata answered last, else the bootstrap address,
    /// else each node the last metadata named, until one answers; returns who answered and
    /// what. A node that cannot be reached is skipped; if none can, the first failure is
    /// returned.
    ///
    /// A metadata request (`metadata`) waits at most [`METADATA_TIMEOUT_MAX`] for each node
    /// and then asks the next: a node that does not answer it (paused, cut off) is the likely
    /// reason the caller needs the metadata; if none answers that fast, the first is asked
    /// once more with the whole request timeout. Any other request is not sent twice: its
    /// timeout is returned.
    fn call_any_node(&self, request: &Request, metadata: bool) -> Result<(SocketAddr, ResponseFrame)> {
        let last = *self.inner.metadata_addr.lock().unwrap_or_else(|p| p.into_inner());
        let nodes = self.inner.nodes.read().unwrap_or_else(|p| p.into_inner()).clone();
        let mut candidates: Vec<SocketAddr> = Vec::new();
        for addr in [last, self.inner.bootstrap].into_iter().chain(nodes.into_iter().map(|(_, addr)| addr)) {
            if !candidates.contains(&addr) {
                candidates.push(addr);
            }
        }
        let short = metadata.then_some(METADATA_TIMEOUT_MAX);
        let (addr, frame) = failover::ask_in_turn(&candidates, short, |addr, wait| {
            let connection = self.connection(addr)?;
            match wait {
                Some(wait) => connection.call_within(request, wait),
                None => connection.call(request),
            }
        })?;
        *self.inner.metadata_addr.lock().unwrap_or_else(|p| p.into_inner()) = addr;
        Ok((addr, frame))
    }

    /// The connection to the leader of `topic`/`partition`, on the shard owning it there.
    /// A shard port that refuses connections may be stale (a restarted node with
    /// `--shard-port-base 0` picks new ports, another node took over): the metadata is re-read
    /// once and the new address tried.
    fn partition_connection(&self, topic: &str, partition: u32) -> Result<Arc<Connection>> {
        let addr = self.partition_addr(topic, partition)?;
        match self.connection(addr) {
            Err(ClientError::Connect { .. }) if addr != self.inner.bootstrap => {
                self.metadata(&[topic])?;
                self.connection(self.partition_addr(topic, partition)?)
            }
            connected => connected,
        }
    }

    /// Where the requests for `topic`/`partition` go.
    fn partition_addr(&self, topic: &str, partition: u32) -> Result<SocketAddr> {
        self.with_routes(topic, |routes| {
            let route = routes.iter().find(|r| r.info.partition == partition);
            route.map(|route| route.leader).ok_or_else(|| {
                let partitions = u32::try_from(routes.len()).expect("partition ids are u32");
                ClientError::UnknownPartition { topic: topic.to_owned(), partition, partitions }
            })
        })?
    }

    /// The open connection to `addr`, opening one if needed.
    fn connection(&self, addr: SocketAddr) -> Result<Arc<Connection>> {
        let mut connections = self.inner.connections.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(connection) = connections.get(&addr).filter(|c| !c.is_closed()) {
            return Ok(Arc::clone(connection));
        }
        let connection = Arc::new(Connection::connect(addr, self.inner.options)?);
        connections.insert(addr, Arc::clone(&connection));
        Ok(connection)
    }
}

/// The address of `host`:`port` as metadata gave it: an empty host, one that does not resolve
/// or one that means every address (a node listening on 0.0.0.0) is the host of the node
/// that answered (`answered`), as is port 0 its port.
fn node_addr(host: &str, port: u16, answered: SocketAddr) -> SocketAddr {
    let port = if port == 0 { answered.port() } else { port };
    let ip = match host.parse::<std::net::IpAddr>() {
        Ok(ip) if !ip.is_unspecified() => Some(ip),
        Ok(_) => None,
        Err(_) if host.is_empty() => None,
        Err(_) => resolve(&format!("{host}:{port}")).ok().map(|addr| addr.ip()),
    };
    SocketAddr::new(ip.unwrap_or(answered.ip()), port)
}

/// The first address "host:port" resolves to.
fn resolve(bootstrap: &str) -> Result<SocketAddr> {
    let resolve_error = |reason: String| ClientError::Resolve { addr: bootstrap.to_owned(), reason };
    bootstrap
        .to_socket_addrs()
        .map_err(|error| resolve_error(error.to_string()))?
        .next()
        .ok_or_else(|| resolve_error("resolved to no address".to_owned()))
}

fn server_error(code: ErrorCode, message: &str) -> Result<()> {
    if code == ErrorCode::None {
        return Ok(());
    }
    Err(ClientError::Server { code, message: message.to_owned() })
}

/// A topic's error in the metadata, as a sentence naming the topic.
/// A topic's error code as a person reads it: `topic 'x' does not exist`.
pub fn topic_error(code: ErrorCode, topic: &str) -> ClientError {
    let message = match code {
        ErrorCode::UnknownTopic => format!("topic '{topic}' does not exist"),
        code => format!("topic '{topic}': {code}"),
    };
    ClientError::Server { code, message }
}

fn missing_partition(op: &'static str, partition: u32) -> ClientError {
    ClientError::UnexpectedResponse { op, got: format!("no result for partition {partition}") }
}

/// The body of a successful metadata response.
fn metadata_body(frame: ResponseFrame) -> Result<MetadataResponse> {
    match response_body("metadata", frame)? {
        Response::Metadata(metadata) => Ok(metadata),
        _ => unreachable!("response_body checks the kind"),
    }
}

/// The body of a successful response of the kind `op` expects.
fn response_body(op: &'static str, frame: ResponseFrame) -> Result<Response> {
    server_error(frame.error, &frame.message)?;
    match frame.body {
        Some(body) if body.kind() == op => Ok(body),
        other => Err(ClientError::UnexpectedResponse {
            op,
            got: other.map_or_else(|| "no body".to_owned(), |body| format!("a {} response", body.kind())),
        }),
    }
}

/// The outcome of a produce sent with `Acks::None`.
pub(crate) const UNACKNOWLEDGED: ProduceAck = ProduceAck {
    base_offset: OFFSET_UNACKNOWLEDGED,
    next_offset: OFFSET_UNACKNOWLEDGED,
    acknowledged_at: None,
};

fn produce_ack(partition: u32, frame: ResponseFrame, at: std::time::Instant) -> Result<ProduceAck> {
    let Response::Produce(results) = response_body("produce", frame)? else {
        unreachable!("response_body checks the kind");
    };
    let result = results
        .into_iter()
        .find(|r| r.partition == partition)
        .ok_or_else(|| missing_partition("produce", partition))?;
    server_error(result.error, &result.message)?;
    Ok(ProduceAck {
        base_offset: result.base_offset,
        next_offset: result.next_offset,
        acknowledged_at: Some(at),
    })
}
