//! The blocking Pyralog client: std threads and `std::net`, no async runtime, no server crate.
//!
//! - [`Client`]: metadata-aware requests. It keeps one pipelined [`Connection`] per shard port
//!   on the bootstrap host and sends each partition's requests straight to the shard that owns
//!   the partition (the port in the metadata), falling back to the bootstrap port when the
//!   metadata says port 0. A closed connection is replaced on the next request that needs it.
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
pub use self::kafka::{
    KafkaClient, KafkaClientError, KafkaConnection, KafkaFetchPending, KafkaPending, KafkaPipeline,
    KafkaProducePending,
};
pub use self::partitioner::{PartitionSelector, Partitioner};
pub use self::pipeline::ConnectOptions;
pub use self::probe::PROBE_CLIENT_ID;
pub use self::producer::{DeliveryReport, Producer, ProducerConfig, IN_FLIGHT_BATCHES_MAX_DEFAULT};
pub use self::transport::{Pending, Transport};
pub use crate::codec::{
    Acks, ErrorCode, MetadataResponse, PartitionInfo, ShardInfo, OFFSET_EARLIEST, OFFSET_LATEST,
};
#[cfg(test)]
mod tests;

use crate::codec::{
    FetchPartition, FetchRequest, ListOffsetsPartition, ListOffsetsRequest, ProducePartition, ProduceRequest,
    Request, Response, ResponseFrame,
};

/// Offsets reported for a produce the broker does not acknowledge (`Acks::None`).
pub const OFFSET_UNACKNOWLEDGED: i64 = -1;

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
    /// True when the broker is unreachable or went away (as opposed to refusing a request).
    pub fn is_disconnect(&self) -> bool {
        matches!(self, ClientError::Connect { .. } | ClientError::Disconnected { .. })
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
    /// By port on the bootstrap host; the bootstrap port is one of them.
    connections: Mutex<HashMap<u16, Arc<Connection>>>,
    /// Partitions of the topics seen so far, indexed by partition id.
    topics: RwLock<HashMap<String, Vec<PartitionInfo>>>,
    shards: RwLock<Vec<ShardInfo>>,
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
        let connections = self.inner.connections.lock().unwrap_or_else(|p| p.into_inner());
        let mut ports: Vec<u16> =
            connections.iter().filter(|(_, c)| !c.is_closed()).map(|(port, _)| *port).collect();
        ports.sort_unstable();
        ports
    }

    /// The shards of the last metadata response.
    pub fn shards(&self) -> Vec<ShardInfo> {
        self.inner.shards.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Asks for the metadata of `topics` (all topics when empty) and caches what it learns.
    pub fn metadata(&self, topics: &[&str]) -> Result<MetadataResponse> {
        let request = Request::Metadata { topics: topics.iter().map(|t| (*t).to_owned()).collect() };
        let frame = self.bootstrap_connection()?.call(&request)?;
        let Response::Metadata(metadata) = response_body("metadata", frame)? else {
            unreachable!("response_body checks the kind");
        };
        *self.inner.shards.write().unwrap_or_else(|p| p.into_inner()) = metadata.shards.clone();
        let mut cache = self.inner.topics.write().unwrap_or_else(|p| p.into_inner());
        if topics.is_empty() {
            cache.clear();
        }
        for topic in &metadata.topics {
            if topic.error == ErrorCode::None {
                let mut partitions = topic.partitions.clone();
                partitions.sort_by_key(|p| p.partition);
                cache.insert(topic.name.clone(), partitions);
            } else {
                cache.remove(&topic.name);
            }
        }
        Ok(metadata)
    }

    /// Re-reads the metadata of every topic.
    pub fn refresh_metadata(&self) -> Result<()> {
        self.metadata(&[]).map(drop)
    }

    pub fn create_topic(&self, name: &str, partitions: u32) -> Result<()> {
        let request = Request::CreateTopic { name: name.to_owned(), partitions };
        response_body("create_topic", self.bootstrap_connection()?.call(&request)?)?;
        self.metadata(&[name]).map(drop)
    }

    pub fn delete_topic(&self, name: &str) -> Result<()> {
        let request = Request::DeleteTopic { name: name.to_owned() };
        response_body("delete_topic", self.bootstrap_connection()?.call(&request)?)?;
        self.inner.topics.write().unwrap_or_else(|p| p.into_inner()).remove(name);
        Ok(())
    }

    /// The topic's partitions, from the cache or, for a topic not seen yet, from the broker.
    pub fn partitions(&self, topic: &str) -> Result<Vec<PartitionInfo>> {
        if let Some(partitions) = self.inner.topics.read().unwrap_or_else(|p| p.into_inner()).get(topic) {
            return Ok(partitions.clone());
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
        let mut partitions = info.partitions;
        partitions.sort_by_key(|p| p.partition);
        Ok(partitions)
    }

    pub fn partition_count(&self, topic: &str) -> Result<u32> {
        Ok(u32::try_from(self.partitions(topic)?.len()).expect("partition ids are u32"))
    }

    /// The offset for `spec`: [`OFFSET_EARLIEST`], [`OFFSET_LATEST`] or a timestamp in ms.
    pub fn list_offsets(&self, topic: &str, partition: u32, spec: i64) -> Result<i64> {
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

    /// Produces `records` (one or more whole batches) and waits for the acknowledgement.
    pub fn produce(&self, topic: &str, partition: u32, records: Bytes, acks: Acks) -> Result<ProduceAck> {
        self.produce_async(topic, partition, records, acks)?.wait()
    }

    /// Sends a produce and returns at once. Requests to one partition are written in call
    /// order on one connection, so the broker appends them in that order.
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

    /// Fetches from `offset`, waiting up to `max_wait_ms` for data to arrive.
    pub fn fetch(
        &self,
        topic: &str,
        partition: u32,
        offset: i64,
        max_bytes: u32,
        max_wait_ms: u32,
    ) -> Result<FetchResult> {
        self.fetch_async(topic, partition, offset, max_bytes, max_wait_ms)?.wait()
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

    fn bootstrap_connection(&self) -> Result<Arc<Connection>> {
        self.connection(self.inner.bootstrap.port())
    }

    /// The connection to the shard owning `topic`/`partition`.
    /// A shard port that refuses connections may be stale (a restarted node with
    /// `--shard-port-base 0` picks new ports): the metadata is re-read once and the new port
    /// tried.
    fn partition_connection(&self, topic: &str, partition: u32) -> Result<Arc<Connection>> {
        match self.partition_port(topic, partition)? {
            0 => self.bootstrap_connection(),
            port => match self.connection(port) {
                Err(ClientError::Connect { .. }) if port != self.inner.bootstrap.port() => {
                    self.metadata(&[topic])?;
                    match self.partition_port(topic, partition)? {
                        0 => self.bootstrap_connection(),
                        port => self.connection(port),
                    }
                }
                connected => connected,
            },
        }
    }

    /// The port of the shard owning `topic`/`partition`; 0 means the bootstrap port.
    fn partition_port(&self, topic: &str, partition: u32) -> Result<u16> {
        let partitions = self.partitions(topic)?;
        let info = partitions.iter().find(|p| p.partition == partition).ok_or_else(|| {
            let partitions = u32::try_from(partitions.len()).expect("partition ids are u32");
            ClientError::UnknownPartition { topic: topic.to_owned(), partition, partitions }
        })?;
        Ok(info.port)
    }

    /// The open connection to `port` on the bootstrap host, opening one if needed.
    fn connection(&self, port: u16) -> Result<Arc<Connection>> {
        let mut connections = self.inner.connections.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(connection) = connections.get(&port).filter(|c| !c.is_closed()) {
            return Ok(Arc::clone(connection));
        }
        let addr = SocketAddr::new(self.inner.bootstrap.ip(), port);
        let connection = Arc::new(Connection::connect(addr, self.inner.options)?);
        connections.insert(port, Arc::clone(&connection));
        Ok(connection)
    }
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
