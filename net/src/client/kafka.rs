//! Kafka protocol clients over the generated codecs.
//!
//! - [`KafkaConnection`]: one blocking connection, requests pipelined, responses read in order
//!   (as Kafka brokers answer) by the caller. For tests of the listener, bad input included.
//! - [`KafkaPipeline`]: the same, thread-backed and shared: the native [`super::Connection`]'s
//!   [`Pipeline`] with [`KafkaFraming`]. A reader thread completes requests in order, waits are
//!   bounded by the request timeout, a lost broker is [`ClientError::Disconnected`].
//! - [`KafkaClient`]: a [`Transport`] over a `KafkaPipeline`, so the library's
//!   [`super::Producer`] and [`super::Consumer`] (and so the load generator's
//!   `--protocol kafka`) run over the Kafka listener exactly as over the native protocol.
//!
//! Applications should use a full Kafka client library.

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};

use super::pipeline::{ConnectOptions, Doorbell, Framing, Matching, PendingResponse, Pipeline};
use super::transport::{Pending, Transport};
use super::{
    batch, probe, Acks, ClientError, ErrorCode, FetchResult, ProduceAck, Protocol, Result,
    METADATA_TIMEOUT_MAX, UNACKNOWLEDGED,
};
use crate::kafka::messages::api_versions_request::ApiVersionsRequest;
use crate::kafka::messages::create_topics_request::{CreatableTopic, CreateTopicsRequest};
use crate::kafka::messages::fetch_request::{FetchPartition, FetchRequest, FetchTopic};
use crate::kafka::messages::init_producer_id_request::InitProducerIdRequest;
use crate::kafka::messages::list_offsets_request::{
    ListOffsetsPartition, ListOffsetsRequest, ListOffsetsTopic,
};
use crate::kafka::messages::metadata_request::{MetadataRequest, MetadataRequestTopic};
use crate::kafka::messages::metadata_response::MetadataResponse;
use crate::kafka::messages::produce_request::{PartitionProduceData, ProduceRequest, TopicProduceData};
use crate::kafka::messages::request_header::RequestHeader;
use crate::kafka::wire::{DecodeError, EncodeError, Records, Uuid, Writer};
use crate::kafka::{self, api, error, RequestBody, ResponseBody};

/// Each cause is part of its variant's message and not also a `source`, so a report that
/// prints the chain shows it once.
#[derive(Debug, thiserror::Error)]
pub enum KafkaClientError {
    #[error("connection: {0}")]
    Io(std::io::Error),
    #[error("encoding the request: {0}")]
    Encode(EncodeError),
    #[error("decoding the response: {0}")]
    Decode(DecodeError),
    #[error("response {got} arrived while {expected} was expected")]
    OutOfOrder { expected: i32, got: i32 },
    #[error("response frame of {0} bytes is not a frame")]
    BadFrame(i32),
}

impl From<std::io::Error> for KafkaClientError {
    fn from(error: std::io::Error) -> KafkaClientError {
        KafkaClientError::Io(error)
    }
}

impl From<EncodeError> for KafkaClientError {
    fn from(error: EncodeError) -> KafkaClientError {
        KafkaClientError::Encode(error)
    }
}

impl From<DecodeError> for KafkaClientError {
    fn from(error: DecodeError) -> KafkaClientError {
        KafkaClientError::Decode(error)
    }
}

/// Largest response accepted.
const RESPONSE_BYTES_MAX: i32 = 256 << 20;

pub struct KafkaConnection {
    stream: TcpStream,
    client_id: String,
    next_correlation_id: i32,
    /// Requests sent and not answered yet: (correlation id, API key, version).
    in_flight: VecDeque<(i32, i16, i16)>,
}

impl KafkaConnection {
    pub fn connect(addr: &str, client_id: &str) -> Result<KafkaConnection, KafkaClientError> {
        let stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        Ok(KafkaConnection {
            stream,
            client_id: client_id.to_owned(),
            next_correlation_id: 0,
            in_flight: Default::default(),
        })
    }

    /// Sends a request without waiting for its response.
    pub fn send(&mut self, version: i16, body: &RequestBody) -> Result<i32, KafkaClientError> {
        let correlation_id = self.next_correlation_id;
        self.next_correlation_id = self.next_correlation_id.wrapping_add(1);
        let header = RequestHeader {
            request_api_key: body.api_key(),
            request_api_version: version,
            correlation_id,
            client_id: Some(self.client_id.clone()),
        };
        let frame = kafka::encode_request(&header, body)?;
        self.stream.write_all(&frame)?;
        self.in_flight.push_back((correlation_id, body.api_key(), version));
        Ok(correlation_id)
    }

    /// Requests sent and not answered yet.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Reads the response to the oldest request in flight.
    pub fn receive(&mut self) -> Result<ResponseBody, KafkaClientError> {
        let (expected, api_key, version) =
            self.in_flight.pop_front().expect("receive is called with a request in flight");
        let mut prefix = [0u8; 4];
        self.stream.read_exact(&mut prefix)?;
        let size = i32::from_be_bytes(prefix);
        if !(0..=RESPONSE_BYTES_MAX).contains(&size) {
            return Err(KafkaClientError::BadFrame(size));
        }
        let mut frame = vec![0u8; size as usize];
        self.stream.read_exact(&mut frame)?;
        let (got, body) = kafka::decode_response(api_key, version, Bytes::from(frame))?;
        if got != expected {
            return Err(KafkaClientError::OutOfOrder { expected, got });
        }
        Ok(body)
    }

    /// Sends a request and waits for its response.
    pub fn call(&mut self, version: i16, body: RequestBody) -> Result<ResponseBody, KafkaClientError> {
        assert_eq!(self.in_flight.len(), 0, "call is not mixed with pipelined requests");
        self.send(version, &body)?;
        self.receive()
    }

    /// Sends raw bytes, for tests of bad input.
    pub fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Whether the broker closed the connection within `timeout`.
    pub fn closed_within(&mut self, timeout: Duration) -> bool {
        let _ = self.stream.set_read_timeout(Some(timeout));
        let mut byte = [0u8; 1];
        let closed = matches!(self.stream.read(&mut byte), Ok(0));
        let _ = self.stream.set_read_timeout(Some(Duration::from_secs(60)));
        closed
    }
}

// ---------------------------------------------------------------------------------------------
// The pipelined connection and the client the producer, the consumer and the bench use.
// ---------------------------------------------------------------------------------------------

/// A pipelined Kafka connection that threads share: the thread-backed counterpart of
/// [`KafkaConnection`], a [`Pipeline`] with [`KafkaFraming`], so it keeps the native
/// [`super::Connection`]'s promises (bounded waits, a bounded window, a lost broker is
/// [`ClientError::Disconnected`]). A Kafka broker answers a connection's requests in order, so
/// each response is read as the answer to the oldest request in flight
/// ([`Matching::InOrder`]); one with another correlation id closes the connection. Requests
/// that get no response (a produce with acks 0) are written with
/// [`KafkaPipeline::send_no_response`] and never expected.
pub type KafkaPipeline = Pipeline<KafkaFraming>;

/// A Kafka request on its way; [`KafkaPending::wait`] blocks for its response.
pub type KafkaPending = PendingResponse<KafkaFraming>;

/// A request as a [`KafkaPipeline`] sends it: the API version and the body.
pub type KafkaRequest<'a> = (i16, &'a RequestBody);

/// Kafka's framing: a size prefix, a request header naming the client, the body of the API
/// version asked for.
#[derive(Debug)]
pub struct KafkaFraming {
    client_id: String,
}

/// What a [`KafkaPipeline`]'s reader must know of a request to read its response: a Kafka
/// response names neither its API nor its version.
#[derive(Debug)]
pub struct KafkaExpected {
    correlation_id: i32,
    api_key: i16,
    version: i16,
}

impl Framing for KafkaFraming {
    type Request<'a> = KafkaRequest<'a>;
    type Response = ResponseBody;
    type Expected = KafkaExpected;

    const MATCHING: Matching<KafkaFraming> = Matching::InOrder(decode_response);
    const READER_NAME: &'static str = "pyralog-kafka";
    const CORRELATION_ID_FIRST: u64 = 0;

    fn op((_, body): KafkaRequest<'_>) -> &'static str {
        api_name(body.api_key())
    }

    /// Encodes the frame, size prefix included: one copy of the record batches, as on the
    /// native path.
    fn encode(
        &self,
        correlation_id: u64,
        (version, body): KafkaRequest<'_>,
        buf: &mut BytesMut,
    ) -> Result<KafkaExpected> {
        // Kafka's correlation ids are 32-bit and wrap around, as other Kafka clients' do.
        let correlation_id = correlation_id as i32;
        let header = RequestHeader {
            request_api_key: body.api_key(),
            request_api_version: version,
            correlation_id,
            client_id: Some(self.client_id.clone()),
        };
        let mut w = Writer::new();
        let encoded = header
            .encode(&mut w, kafka::request_header_version(body.api_key(), version))
            .and_then(|()| body.encode(&mut w, version));
        if let Err(error) = encoded {
            let op = api_name(body.api_key());
            return Err(ClientError::UnexpectedResponse {
                op,
                got: format!("a request it cannot encode: {error}"),
            });
        }
        let size = i32::try_from(w.len()).expect("requests are far below 2 GiB");
        buf.reserve(kafka::FRAME_PREFIX_BYTES + w.len());
        buf.put_i32(size);
        for chunk in w.finish() {
            buf.extend_from_slice(&chunk);
        }
        Ok(KafkaExpected { correlation_id, api_key: body.api_key(), version })
    }
}

impl KafkaPipeline {
    pub fn connect(addr: SocketAddr, options: ConnectOptions, client_id: &str) -> Result<KafkaPipeline> {
        Pipeline::open(addr, options, KafkaFraming { client_id: client_id.to_owned() })
    }
}

/// Reads a response frame as the answer to `expected`, the oldest request in flight.
fn decode_response(frame: Bytes, expected: &KafkaExpected) -> Result<ResponseBody, String> {
    let op = api_name(expected.api_key);
    match kafka::decode_response(expected.api_key, expected.version, frame) {
        Ok((got, body)) if got == expected.correlation_id => Ok(body),
        Ok((got, _)) => {
            Err(format!("response {got} arrived while {} ({op}) was expected", expected.correlation_id))
        }
        Err(error) => Err(format!("undecodable {op} response: {error}")),
    }
}

fn api_name(api_key: i16) -> &'static str {
    match api_key {
        api::PRODUCE => "produce",
        api::FETCH => "fetch",
        api::LIST_OFFSETS => "list_offsets",
        api::METADATA => "metadata",
        api::CREATE_TOPICS => "create_topics",
        api::API_VERSIONS => "api_versions",
        api::INIT_PRODUCER_ID => "init_producer_id",
        _ => "kafka",
    }
}

/// The API versions a [`KafkaClient`] uses, agreed with the broker by ApiVersions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Versions {
    pub metadata: i16,
    pub create_topics: i16,
    pub produce: i16,
    pub fetch: i16,
    pub list_offsets: i16,
    /// `None` from a broker that does not offer InitProducerId: the producer then sends no
    /// producer id (at least once across failovers).
    pub init_producer_id: Option<i16>,
}

impl Versions {
    /// Per API used: (key, the oldest version with what the client needs, the version it
    /// prefers). The oldest: Metadata v4 has allow_auto_topic_creation, Produce v3 and Fetch v4
    /// carry RecordBatch v2 and the isolation level, ListOffsets v1 answers one offset.
    const WANTED: [(i16, i16, i16); 5] = [
        (api::METADATA, 4, 12),
        (api::CREATE_TOPICS, 0, 7),
        (api::PRODUCE, 3, 9),
        (api::FETCH, 4, 12),
        (api::LIST_OFFSETS, 1, 7),
    ];

    /// The newest version of each API that both sides speak, up to the preferred one.
    fn agree(offered: &[(i16, i16, i16)]) -> Result<Versions> {
        let mut agreed = [0i16; 5];
        for (slot, (key, oldest, preferred)) in agreed.iter_mut().zip(Versions::WANTED) {
            let (low, high) = offered
                .iter()
                .find(|(k, _, _)| *k == key)
                .map(|&(_, low, high)| (low, high))
                .unwrap_or((0, -1));
            let version = preferred.min(high);
            if version < oldest.max(low) {
                return Err(ClientError::Server {
                    code: ErrorCode::UnsupportedRequest,
                    message: format!(
                        "the broker offers {} versions {low}..={high}, \
                         this client needs {oldest}..={preferred}",
                        api_name(key)
                    ),
                });
            }
            *slot = version;
        }
        let [metadata, create_topics, produce, fetch, list_offsets] = agreed;
        // Optional: v0 has everything a producer without transactions needs; v4 is the newest
        // the broker side here serves.
        let init_producer_id = offered
            .iter()
            .find(|(key, _, _)| *key == api::INIT_PRODUCER_ID)
            .map(|&(_, low, high)| (low, high.min(4)))
            .filter(|(low, high)| low <= high)
            .map(|(_, high)| high);
        Ok(Versions { metadata, create_topics, produce, fetch, list_offsets, init_producer_id })
    }
}

/// A partition's leader as a metadata answer names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct KafkaRoute {
    /// The leader's broker id; -1 when none is known.
    leader: i32,
    leader_epoch: i32,
    /// Brokers holding a replica: more than one means another node can take over.
    replicas: usize,
}

/// Client id sent in every request header.
pub const CLIENT_ID: &str = "pyralog-client";

/// A client of a broker's Kafka listener, with the native [`super::Client`]'s promises (see
/// [`Transport`]): Metadata v12 for partition counts and leaders (without auto-creation: a
/// missing topic is reported, as the native client does, so the caller chooses its partition
/// count), CreateTopics v7, Produce v9 with acks -1 (durable) or 0 (no response), Fetch v12
/// with max_wait and min_bytes 1, and ListOffsets v7 for the earliest and latest offsets; each
/// capped by what the broker's ApiVersions answer offers (see [`Versions`]). Each partition's
/// requests go to the broker metadata names as its leader.
///
/// It follows leaders as the native client does ([`super::failover`]): a request to a
/// replicated partition refused with NOT_LEADER_OR_FOLLOWER, LEADER_NOT_AVAILABLE,
/// NOT_ENOUGH_REPLICAS or KAFKA_STORAGE_ERROR, or lost with its broker's connection, is sent again after the metadata
/// is read again (from the bootstrap address, else any broker it names), with the same backoff
/// and budget. A partition of a single node is not retried: its broker has no one to hand over
/// to, and NOT_LEADER_OR_FOLLOWER from it means it is stopping.
///
/// Clones share the connection and the metadata cache; [`Transport::session`] shares only the
/// cache. A closed connection is replaced on the next request.
#[derive(Debug, Clone)]
pub struct KafkaClient {
    shared: Arc<KafkaShared>,
    /// This handle's connections: to the bootstrap address (`None`) and to brokers by node id.
    connections: Arc<Mutex<HashMap<Option<i32>, Arc<KafkaPipeline>>>>,
}

#[derive(Debug)]
struct KafkaShared {
    addr: SocketAddr,
    options: ConnectOptions,
    versions: Versions,
    /// Partition counts of the topics seen so far.
    partitions: RwLock<HashMap<String, u32>>,
    /// Each partition's leader, by topic, as the last metadata said.
    leaders: RwLock<HashMap<String, Vec<KafkaRoute>>>,
    /// The brokers' addresses by node id, as the last metadata said.
    brokers: RwLock<HashMap<i32, SocketAddr>>,
    /// The broker whose metadata answered last (`None`: the bootstrap address): asked first
    /// the next time.
    metadata_from: Mutex<Option<i32>>,
}

impl KafkaClient {
    /// Connects to `bootstrap` ("host:port") with default options.
    pub fn connect(bootstrap: &str) -> Result<KafkaClient> {
        KafkaClient::connect_with(bootstrap, ConnectOptions::default())
    }

    /// Connects and agrees on API versions with ApiVersions (v3), so a broker that does not
    /// speak Kafka there, or not the versions this client needs, fails here.
    pub fn connect_with(bootstrap: &str, options: ConnectOptions) -> Result<KafkaClient> {
        let addr = super::resolve(bootstrap)?;
        let connection = Arc::new(KafkaPipeline::connect(addr, options, CLIENT_ID)?);
        let request = ApiVersionsRequest {
            client_software_name: CLIENT_ID.to_owned(),
            client_software_version: env!("CARGO_PKG_VERSION").to_owned(),
        };
        // A client pointed at a native listener fails here: say so, rather than "closed".
        let body = connection
            .call((3, &RequestBody::ApiVersions(request)))
            .map_err(|error| probe::explain(error, addr, Protocol::Kafka, options.connect_timeout))?;
        let ResponseBody::ApiVersions(response) = body else { return Err(unexpected("api_versions")) };
        if response.error_code != error::NONE {
            return Err(kafka_error(response.error_code, "the broker's ApiVersions v3 answer", None));
        }
        let offered: Vec<_> =
            response.api_keys.iter().map(|k| (k.api_key, k.min_version, k.max_version)).collect();
        Ok(KafkaClient {
            shared: Arc::new(KafkaShared {
                addr,
                options,
                versions: Versions::agree(&offered)?,
                partitions: RwLock::new(HashMap::new()),
                leaders: RwLock::new(HashMap::new()),
                brokers: RwLock::new(HashMap::new()),
                metadata_from: Mutex::new(None),
            }),
            connections: Arc::new(Mutex::new(HashMap::from([(None, connection)]))),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// The API versions agreed with the broker.
    pub fn versions(&self) -> Versions {
        self.shared.versions
    }

    /// This handle's connection to the bootstrap address, opening one if needed.
    pub fn connection(&self) -> Result<Arc<KafkaPipeline>> {
        self.connection_to(None)
    }

    /// This handle's connection to broker `node` (the bootstrap address for `None`, or for a
    /// broker the metadata did not name), opening one if needed.
    fn connection_to(&self, node: Option<i32>) -> Result<Arc<KafkaPipeline>> {
        let addr = node
            .and_then(|node| {
                self.shared.brokers.read().unwrap_or_else(|p| p.into_inner()).get(&node).copied()
            })
            .unwrap_or(self.shared.addr);
        let mut connections = self.connections.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(open) = connections.get(&node).filter(|c| !c.is_closed()) {
            return Ok(Arc::clone(open));
        }
        let open = Arc::new(KafkaPipeline::connect(addr, self.shared.options, CLIENT_ID)?);
        connections.insert(node, Arc::clone(&open));
        Ok(open)
    }

    /// Sends `request` (at `version`) to the broker that answered the last such request, else
    /// the bootstrap address, else each broker the last metadata named in turn while they are
    /// unreachable, or (`short`, for metadata: [`METADATA_TIMEOUT_MAX`]) silent past it: a node
    /// that went away or is paused (the bootstrap node among them) does not keep the others'
    /// answers from the client.
    fn call_any_broker(
        &self,
        version: i16,
        request: &RequestBody,
        short: Option<Duration>,
    ) -> Result<ResponseBody> {
        let mut brokers: Vec<i32> =
            self.shared.brokers.read().unwrap_or_else(|p| p.into_inner()).keys().copied().collect();
        brokers.sort_unstable();
        let last = *self.shared.metadata_from.lock().unwrap_or_else(|p| p.into_inner());
        let mut candidates: Vec<Option<i32>> = Vec::new();
        for candidate in [last, None].into_iter().chain(brokers.into_iter().map(Some)) {
            if !candidates.contains(&candidate) {
                candidates.push(candidate);
            }
        }
        let (answered, body) = super::failover::ask_in_turn(&candidates, short, |node, wait| {
            let connection = self.connection_to(node)?;
            match wait {
                Some(wait) => connection.call_within((version, request), wait),
                None => connection.call((version, request)),
            }
        })?;
        *self.shared.metadata_from.lock().unwrap_or_else(|p| p.into_inner()) = answered;
        Ok(body)
    }

    /// Asks the broker for the topic's partition count and leaders and caches them.
    pub fn refresh_partitions(&self, topic: &str) -> Result<u32> {
        let body = self.call_any_broker(
            self.shared.versions.metadata,
            &metadata_request(topic),
            Some(METADATA_TIMEOUT_MAX),
        )?;
        let ResponseBody::Metadata(metadata) = body else { return Err(unexpected("metadata")) };
        self.keep_partitions(topic, metadata)
    }

    /// Caches the topic's partition count and leaders, and the brokers, as `metadata` says.
    fn keep_partitions(&self, topic: &str, metadata: MetadataResponse) -> Result<u32> {
        let info = metadata
            .topics
            .into_iter()
            .find(|t| t.name.as_deref() == Some(topic))
            .ok_or_else(|| super::topic_error(ErrorCode::UnknownTopic, topic))?;
        let mut cache = self.shared.partitions.write().unwrap_or_else(|p| p.into_inner());
        if info.error_code == error::UNKNOWN_TOPIC_OR_PARTITION {
            cache.remove(topic);
            return Err(super::topic_error(ErrorCode::UnknownTopic, topic));
        }
        if info.error_code != error::NONE {
            cache.remove(topic);
            return Err(kafka_error(info.error_code, &format!("topic '{topic}'"), None));
        }
        let count = u32::try_from(info.partitions.len()).expect("partition ids are i32");
        cache.insert(topic.to_owned(), count);
        let unknown = KafkaRoute { leader: -1, leader_epoch: -1, replicas: 1 };
        let mut leaders = vec![unknown; info.partitions.len()];
        for partition in &info.partitions {
            if let Some(route) =
                usize::try_from(partition.partition_index).ok().and_then(|i| leaders.get_mut(i))
            {
                *route = KafkaRoute {
                    leader: partition.leader_id,
                    leader_epoch: partition.leader_epoch,
                    replicas: partition.replica_nodes.len(),
                };
            }
        }
        self.shared.leaders.write().unwrap_or_else(|p| p.into_inner()).insert(topic.to_owned(), leaders);
        let mut brokers = self.shared.brokers.write().unwrap_or_else(|p| p.into_inner());
        for broker in &metadata.brokers {
            if let Ok(addr) = super::resolve(&format!("{}:{}", broker.host, broker.port)) {
                brokers.insert(broker.node_id, addr);
            }
        }
        Ok(count)
    }

    /// See [`Transport::leader_replaced`]. The brokers other than the silent one are asked in
    /// turn, those on other hosts first (the silent broker's node serves its other shards'
    /// brokers too), each for at most [`METADATA_TIMEOUT_MAX`]; the first to answer decides.
    fn leader_replaced(&self, topic: &str, partition: u32) -> Option<String> {
        let silent = self.route(topic, partition).filter(|route| route.replicas > 1)?;
        let silent_host = self.leader_addr(topic, partition)?.ip();
        let mut others: Vec<(i32, SocketAddr)> = {
            let brokers = self.shared.brokers.read().unwrap_or_else(|p| p.into_inner());
            brokers.iter().filter(|(id, _)| **id != silent.leader).map(|(id, addr)| (*id, *addr)).collect()
        };
        others.sort_by_key(|(id, addr)| (addr.ip() == silent_host, *id));
        let request = metadata_request(topic);
        let version = self.shared.versions.metadata;
        let (answered, metadata) = others.into_iter().find_map(|(id, _)| {
            let body =
                self.connection_to(Some(id)).ok()?.call_within((version, &request), METADATA_TIMEOUT_MAX);
            match body.ok()? {
                ResponseBody::Metadata(metadata) => Some((id, metadata)),
                _ => None,
            }
        })?;
        // The silent broker is not asked first the next time either.
        *self.shared.metadata_from.lock().unwrap_or_else(|p| p.into_inner()) = Some(answered);
        let named = metadata
            .topics
            .iter()
            .filter(|t| t.name.as_deref() == Some(topic) && t.error_code == error::NONE)
            .flat_map(|t| &t.partitions)
            .find(|p| p.partition_index == partition_index(partition))?;
        if named.leader_epoch <= silent.leader_epoch || named.leader_id == silent.leader {
            return None;
        }
        self.keep_partitions(topic, metadata).ok()?;
        Some(self.leader_name(topic, partition))
    }

    /// The connection to the partition's leader (as Kafka clients do: with a broker that is a
    /// shard, no request crosses cores), once `partition` is known to exist in `topic`.
    fn partition_connection(&self, topic: &str, partition: u32) -> Result<Arc<KafkaPipeline>> {
        let partitions = Transport::partition_count(self, topic)?;
        if partition >= partitions {
            return Err(ClientError::UnknownPartition { topic: topic.to_owned(), partition, partitions });
        }
        let leader = self.route(topic, partition).map(|route| route.leader).filter(|leader| *leader >= 0);
        self.connection_to(leader)
    }

    /// The partition's leader as the last metadata named it.
    fn route(&self, topic: &str, partition: u32) -> Option<KafkaRoute> {
        let leaders = self.shared.leaders.read().unwrap_or_else(|p| p.into_inner());
        leaders.get(topic)?.get(partition as usize).copied()
    }

    /// Whether the partition has replicas on other nodes, as the last metadata said.
    fn replicated(&self, topic: &str, partition: u32) -> bool {
        self.route(topic, partition).is_some_and(|route| route.replicas > 1)
    }

    fn timeout_ms(&self) -> i32 {
        i32::try_from(self.shared.options.request_timeout.as_millis()).unwrap_or(i32::MAX)
    }

    fn list_offsets_once(&self, topic: &str, partition: u32, spec: i64) -> Result<i64> {
        let request = ListOffsetsRequest {
            replica_id: -1,
            isolation_level: 0,
            topics: vec![ListOffsetsTopic {
                name: topic.to_owned(),
                partitions: vec![ListOffsetsPartition {
                    partition_index: partition_index(partition),
                    timestamp: spec,
                    ..Default::default()
                }],
            }],
            ..Default::default()
        };
        let connection = self.partition_connection(topic, partition)?;
        let body =
            connection.call((self.shared.versions.list_offsets, &RequestBody::ListOffsets(request)))?;
        let ResponseBody::ListOffsets(response) = body else { return Err(unexpected("list_offsets")) };
        let result = response
            .topics
            .into_iter()
            .flat_map(|t| t.partitions)
            .find(|p| p.partition_index == partition_index(partition))
            .ok_or_else(|| super::missing_partition("list_offsets", partition))?;
        if result.error_code != error::NONE {
            return Err(kafka_error(result.error_code, &format!("{topic}/{partition}"), None));
        }
        Ok(result.offset)
    }
}

impl Transport for KafkaClient {
    type PendingProduce = KafkaProducePending;
    type PendingFetch = KafkaFetchPending;

    fn session(&self) -> KafkaClient {
        KafkaClient { shared: Arc::clone(&self.shared), connections: Arc::new(Mutex::new(HashMap::new())) }
    }

    fn partition_count(&self, topic: &str) -> Result<u32> {
        let cached = self.shared.partitions.read().unwrap_or_else(|p| p.into_inner()).get(topic).copied();
        match cached {
            Some(count) => Ok(count),
            None => self.refresh_partitions(topic),
        }
    }

    fn create_topic(&self, topic: &str, partitions: u32) -> Result<()> {
        let request = CreateTopicsRequest {
            topics: vec![CreatableTopic {
                name: topic.to_owned(),
                num_partitions: i32::try_from(partitions).unwrap_or(i32::MAX),
                replication_factor: -1,
                ..Default::default()
            }],
            timeout_ms: self.timeout_ms(),
            validate_only: false,
        };
        let body = self
            .connection()?
            .call((self.shared.versions.create_topics, &RequestBody::CreateTopics(request)))?;
        let ResponseBody::CreateTopics(response) = body else { return Err(unexpected("create_topics")) };
        let result = response.topics.into_iter().find(|t| t.name == topic).ok_or_else(|| {
            ClientError::UnexpectedResponse { op: "create_topics", got: "no result".into() }
        })?;
        if result.error_code != error::NONE {
            let context = format!("creating topic '{topic}'");
            return Err(kafka_error(result.error_code, &context, result.error_message.as_deref()));
        }
        self.refresh_partitions(topic).map(drop)
    }

    /// Follows the partition's leader, as the native client's lookup does.
    fn list_offsets(&self, topic: &str, partition: u32, spec: i64) -> Result<i64> {
        super::failover::following_leader(self, topic, partition, || {
            self.list_offsets_once(topic, partition, spec)
        })
    }

    fn produce_async(
        &self,
        topic: &str,
        partition: u32,
        records: Bytes,
        acks: Acks,
    ) -> Result<KafkaProducePending> {
        let connection = self.partition_connection(topic, partition)?;
        let offsets = batch::offset_count(&records);
        let request = RequestBody::Produce(ProduceRequest {
            transactional_id: None,
            acks: if acks == Acks::None { 0 } else { -1 },
            timeout_ms: self.timeout_ms(),
            topic_data: vec![TopicProduceData {
                name: topic.to_owned(),
                partition_data: vec![PartitionProduceData {
                    index: partition_index(partition),
                    records: Some(Records::from_bytes(records)),
                }],
            }],
        });
        if acks == Acks::None {
            connection.send_no_response((self.shared.versions.produce, &request))?;
            return Ok(KafkaProducePending { partition, offsets, response: None });
        }
        let response = Some(connection.send((self.shared.versions.produce, &request))?);
        Ok(KafkaProducePending { partition, offsets, response })
    }

    fn fetch_async(
        &self,
        topic: &str,
        partition: u32,
        offset: i64,
        max_bytes: u32,
        max_wait_ms: u32,
    ) -> Result<KafkaFetchPending> {
        let connection = self.partition_connection(topic, partition)?;
        let max_bytes = i32::try_from(max_bytes).unwrap_or(i32::MAX);
        let request = RequestBody::Fetch(FetchRequest {
            max_wait_ms: i32::try_from(max_wait_ms).unwrap_or(i32::MAX),
            min_bytes: 1,
            max_bytes,
            topics: vec![FetchTopic {
                topic: topic.to_owned(),
                partitions: vec![FetchPartition {
                    partition: partition_index(partition),
                    fetch_offset: offset,
                    partition_max_bytes: max_bytes,
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        });
        Ok(KafkaFetchPending {
            partition,
            response: connection.send((self.shared.versions.fetch, &request))?,
        })
    }

    /// See [`KafkaClient`]: what the broker's errors mean for a replicated partition.
    fn leader_moved(&self, topic: &str, partition: u32, error: &ClientError) -> bool {
        match error {
            // Only a replicated partition's leader refuses so: nothing was appended.
            ClientError::Server { code: ErrorCode::NotEnoughReplicas, .. } => true,
            ClientError::Server { code: ErrorCode::NotLeader | ErrorCode::StorageError, .. } => {
                self.replicated(topic, partition)
            }
            error if error.is_disconnect() => self.replicated(topic, partition),
            // A silent leader (paused, cut off): see `Client::leader_moved`.
            error if error.is_timeout() => self.replicated(topic, partition),
            ClientError::LeaderReplaced { .. } => true,
            _ => false,
        }
    }

    fn leader_replaced(&self, topic: &str, partition: u32) -> Option<String> {
        KafkaClient::leader_replaced(self, topic, partition)
    }

    /// InitProducerId without a transactional id, as a Kafka client with
    /// `enable.idempotence` asks it.
    fn init_producer_id(&self) -> Result<Option<(i64, i16)>> {
        let Some(version) = self.shared.versions.init_producer_id else { return Ok(None) };
        let request = InitProducerIdRequest {
            transactional_id: None,
            transaction_timeout_ms: -1,
            producer_id: -1,
            producer_epoch: -1,
        };
        let body = self.call_any_broker(version, &RequestBody::InitProducerId(request), None)?;
        let ResponseBody::InitProducerId(response) = body else { return Err(unexpected("init_producer_id")) };
        if response.error_code != error::NONE {
            return Err(kafka_error(response.error_code, "InitProducerId", None));
        }
        Ok(Some((response.producer_id, response.producer_epoch)))
    }

    fn refresh_leaders(&self, topic: &str) -> Result<()> {
        self.refresh_partitions(topic).map(drop)
    }

    fn leader_addr(&self, topic: &str, partition: u32) -> Option<SocketAddr> {
        let leader = self.route(topic, partition)?.leader;
        self.shared.brokers.read().unwrap_or_else(|p| p.into_inner()).get(&leader).copied()
    }

    fn leader_name(&self, topic: &str, partition: u32) -> String {
        match (self.route(topic, partition), self.leader_addr(topic, partition)) {
            (Some(route), Some(addr)) => {
                format!("broker {} at {addr}, epoch {}", route.leader, route.leader_epoch)
            }
            _ => "unknown".to_owned(),
        }
    }

    fn leader_retry_budget(&self) -> Duration {
        self.shared.options.leader_retry_budget
    }
}

/// A Kafka produce on its way.
#[derive(Debug)]
pub struct KafkaProducePending {
    partition: u32,
    /// Offsets the sent batches take, for [`ProduceAck::next_offset`].
    offsets: i64,
    /// `None` under acks 0: there is nothing to wait for.
    response: Option<KafkaPending>,
}

impl KafkaProducePending {
    fn ack(&self, (at, body): (Instant, ResponseBody)) -> Result<ProduceAck> {
        let ResponseBody::Produce(response) = body else { return Err(unexpected("produce")) };
        let result = response
            .responses
            .into_iter()
            .flat_map(|t| t.partition_responses)
            .find(|p| p.index == partition_index(self.partition))
            .ok_or_else(|| super::missing_partition("produce", self.partition))?;
        if result.error_code != error::NONE {
            let context = format!("producing to partition {}", self.partition);
            return Err(kafka_error(result.error_code, &context, result.error_message.as_deref()));
        }
        Ok(ProduceAck {
            base_offset: result.base_offset,
            next_offset: result.base_offset + self.offsets,
            acknowledged_at: Some(at),
        })
    }
}

impl Pending<ProduceAck> for KafkaProducePending {
    fn wait(mut self) -> Result<ProduceAck> {
        match self.response.take() {
            None => Ok(UNACKNOWLEDGED),
            Some(response) => self.ack(response.wait_timed()?),
        }
    }

    fn try_wait(&mut self, now: Instant) -> Option<Result<ProduceAck>> {
        match &mut self.response {
            None => Some(Ok(UNACKNOWLEDGED)),
            Some(response) => Some(response.try_wait_timed(now)?.and_then(|timed| self.ack(timed))),
        }
    }

    fn ring_on_completion(&self, doorbell: &Arc<Doorbell>) {
        match &self.response {
            Some(response) => response.ring_on_completion(doorbell),
            None => doorbell.ring(),
        }
    }

    fn wait_within(&mut self, limit: Duration) -> Option<Result<ProduceAck>> {
        match &mut self.response {
            None => Some(Ok(UNACKNOWLEDGED)),
            Some(response) => Some(response.wait_timed_within(limit)?.and_then(|timed| self.ack(timed))),
        }
    }

    fn abandon(self) {
        if let Some(response) = self.response {
            response.abandon();
        }
    }
}

/// A Kafka fetch on its way.
#[derive(Debug)]
pub struct KafkaFetchPending {
    partition: u32,
    response: KafkaPending,
}

impl KafkaFetchPending {
    fn result(partition: u32, body: ResponseBody) -> Result<FetchResult> {
        let ResponseBody::Fetch(response) = body else { return Err(unexpected("fetch")) };
        if response.error_code != error::NONE {
            return Err(kafka_error(response.error_code, "fetch", None));
        }
        let result = response
            .responses
            .into_iter()
            .flat_map(|t| t.partitions)
            .find(|p| p.partition_index == partition_index(partition))
            .ok_or_else(|| super::missing_partition("fetch", partition))?;
        if result.error_code != error::NONE {
            return Err(kafka_error(
                result.error_code,
                &format!("fetching from partition {partition}"),
                None,
            ));
        }
        Ok(FetchResult {
            partition,
            high_watermark: result.high_watermark,
            log_start_offset: result.log_start_offset,
            records: result.records.map(Records::into_bytes).unwrap_or_default(),
        })
    }
}

impl Pending<FetchResult> for KafkaFetchPending {
    fn wait(self) -> Result<FetchResult> {
        KafkaFetchPending::result(self.partition, self.response.wait()?)
    }

    fn try_wait(&mut self, now: Instant) -> Option<Result<FetchResult>> {
        let partition = self.partition;
        Some(self.response.try_wait(now)?.and_then(|body| KafkaFetchPending::result(partition, body)))
    }

    fn ring_on_completion(&self, doorbell: &Arc<Doorbell>) {
        self.response.ring_on_completion(doorbell);
    }

    fn wait_within(&mut self, limit: Duration) -> Option<Result<FetchResult>> {
        let partition = self.partition;
        let outcome = self.response.wait_timed_within(limit)?;
        Some(outcome.and_then(|(_, body)| KafkaFetchPending::result(partition, body)))
    }

    fn abandon(self) {
        self.response.abandon();
    }
}

/// A Metadata request for `topic` alone, which must exist (no auto-creation).
fn metadata_request(topic: &str) -> RequestBody {
    RequestBody::Metadata(MetadataRequest {
        topics: Some(vec![MetadataRequestTopic { topic_id: Uuid::ZERO, name: Some(topic.to_owned()) }]),
        allow_auto_topic_creation: false,
        ..Default::default()
    })
}

fn partition_index(partition: u32) -> i32 {
    i32::try_from(partition).unwrap_or(i32::MAX)
}

fn unexpected(op: &'static str) -> ClientError {
    ClientError::UnexpectedResponse { op, got: "a response of another API".to_owned() }
}

/// A Kafka error code as a [`ClientError`]: as the native [`ErrorCode`] with the same meaning
/// where there is one, so callers handle both protocols alike, as [`ClientError::Kafka`]
/// otherwise. The message is the broker's own when it sent one, else `context` and what the
/// code means.
pub fn kafka_error(code: i16, context: &str, broker_message: Option<&str>) -> ClientError {
    let native = match code {
        error::UNKNOWN_TOPIC_OR_PARTITION => ErrorCode::UnknownTopic,
        error::TOPIC_ALREADY_EXISTS => ErrorCode::TopicAlreadyExists,
        error::INVALID_TOPIC_EXCEPTION => ErrorCode::InvalidTopic,
        error::CORRUPT_MESSAGE | error::INVALID_RECORD => ErrorCode::CorruptBatch,
        error::MESSAGE_TOO_LARGE | error::RECORD_LIST_TOO_LARGE => ErrorCode::MessageTooLarge,
        error::OFFSET_OUT_OF_RANGE => ErrorCode::OffsetOutOfRange,
        error::KAFKA_STORAGE_ERROR => ErrorCode::StorageError,
        error::INVALID_REQUEST => ErrorCode::InvalidRequest,
        error::UNSUPPORTED_VERSION => ErrorCode::UnsupportedRequest,
        // A leader moved (or, on a single node, the broker is stopping); FENCED and UNKNOWN
        // leader epochs mean the same to a client that names epochs: read the metadata again.
        error::NOT_LEADER_OR_FOLLOWER
        | error::LEADER_NOT_AVAILABLE
        | error::FENCED_LEADER_EPOCH
        | error::UNKNOWN_LEADER_EPOCH => ErrorCode::NotLeader,
        error::NOT_ENOUGH_REPLICAS => ErrorCode::NotEnoughReplicas,
        error::OUT_OF_ORDER_SEQUENCE_NUMBER => ErrorCode::OutOfOrderSequence,
        error::INVALID_PRODUCER_EPOCH => ErrorCode::InvalidProducerEpoch,
        _ => ErrorCode::None,
    };
    let broker_message = broker_message.filter(|message| !message.is_empty());
    if native == ErrorCode::None {
        let message = broker_message.map_or_else(|| context.to_owned(), |m| format!("{context}: {m}"));
        return ClientError::Kafka { code, message };
    }
    let meaning = broker_message.map_or_else(|| native.to_string(), str::to_owned);
    ClientError::Server { code: native, message: format!("{context}: {meaning} (Kafka error {code})") }
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;
    use std::thread::JoinHandle;

    use super::*;

    /// A Kafka broker that reads ApiVersions requests and hands each one's correlation id to
    /// `on_request`, which answers (or not) with [`answer`].
    fn in_order_broker<F>(on_request: F) -> (SocketAddr, JoinHandle<()>)
    where
        F: FnMut(i32, &mut TcpStream) + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let mut on_request = on_request;
        let broker = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut prefix = [0u8; kafka::FRAME_PREFIX_BYTES];
            while stream.read_exact(&mut prefix).is_ok() {
                let mut frame = vec![0u8; usize::try_from(i32::from_be_bytes(prefix)).unwrap()];
                stream.read_exact(&mut frame).unwrap();
                let request = kafka::decode_request(Bytes::from(frame)).unwrap();
                on_request(request.header.correlation_id, &mut stream);
            }
        });
        (addr, broker)
    }

    fn answer(stream: &mut TcpStream, correlation_id: i32) {
        let body = ResponseBody::ApiVersions(Default::default());
        for chunk in kafka::encode_response(api::API_VERSIONS, 3, correlation_id, &body).unwrap() {
            stream.write_all(&chunk).unwrap();
        }
    }

    fn pipeline(addr: SocketAddr, request_timeout: Duration, max_in_flight: usize) -> KafkaPipeline {
        let options = ConnectOptions { request_timeout, max_in_flight, ..ConnectOptions::default() };
        KafkaPipeline::connect(addr, options, "test").unwrap()
    }

    const API_VERSIONS: RequestBody = RequestBody::ApiVersions(ApiVersionsRequest {
        client_software_name: String::new(),
        client_software_version: String::new(),
    });

    #[test]
    fn a_response_out_of_turn_closes_the_connection() {
        let (addr, broker) = in_order_broker(|correlation_id, stream| answer(stream, correlation_id + 1));
        let connection = pipeline(addr, Duration::from_secs(10), 8);
        let error = connection.call((3, &API_VERSIONS)).unwrap_err();
        assert!(matches!(error, ClientError::Disconnected { .. }), "{error}");
        assert!(
            error.to_string().contains("response 1 arrived while 0 (api_versions) was expected"),
            "{error}"
        );
        assert!(connection.is_closed());
        let error = connection.send_no_response((3, &API_VERSIONS)).unwrap_err();
        assert!(error.is_disconnect(), "{error}");
        drop(connection);
        broker.join().unwrap();
    }

    #[test]
    fn a_timed_out_request_holds_its_slot_until_its_response_is_read() {
        // Request 0 is answered only when request 1 (sent without expecting a response)
        // arrives; request 2 at once.
        let (addr, broker) = in_order_broker(|correlation_id, stream| match correlation_id {
            0 => {}
            1 => answer(stream, 0),
            _ => answer(stream, correlation_id),
        });
        let connection = pipeline(addr, Duration::from_millis(300), 1);
        let error = connection.call((3, &API_VERSIONS)).unwrap_err();
        assert!(matches!(error, ClientError::Timeout { op: "api_versions", .. }), "{error}");
        assert_eq!(connection.in_flight(), 1, "its response is still due, ahead of any other");
        connection.send_no_response((3, &API_VERSIONS)).unwrap();
        // With max_in_flight 1 this goes through only once the late response was read (and
        // dropped); had it been taken for this request's, the ids would differ.
        let body = connection.call((3, &API_VERSIONS)).unwrap();
        assert!(matches!(body, ResponseBody::ApiVersions(_)), "{body:?}");
        assert_eq!(connection.in_flight(), 0);
        drop(connection);
        broker.join().unwrap();
    }

    #[test]
    fn leader_errors_become_the_native_codes_the_retries_know() {
        let code_of = |kafka_code| match kafka_error(kafka_code, "p", None) {
            ClientError::Server { code, .. } => code,
            other => panic!("{other}"),
        };
        for moved in [
            error::NOT_LEADER_OR_FOLLOWER,
            error::LEADER_NOT_AVAILABLE,
            error::FENCED_LEADER_EPOCH,
            error::UNKNOWN_LEADER_EPOCH,
        ] {
            assert_eq!(code_of(moved), ErrorCode::NotLeader, "Kafka error {moved}");
        }
        assert_eq!(code_of(error::NOT_ENOUGH_REPLICAS), ErrorCode::NotEnoughReplicas);
        let refused =
            kafka_error(error::NOT_ENOUGH_REPLICAS, "producing to partition 0", Some("2 of 3 in sync"));
        assert!(refused.to_string().contains("2 of 3 in sync (Kafka error 19)"), "{refused}");
    }

    #[test]
    fn versions_are_the_preferred_ones_capped_by_the_broker() {
        let agreed = Versions::agree(kafka::SUPPORTED).unwrap();
        let (_, _, list_offsets_max) =
            *kafka::SUPPORTED.iter().find(|s| s.0 == api::LIST_OFFSETS).expect("ListOffsets is served");
        assert_eq!(agreed.list_offsets, list_offsets_max.min(7));
        assert_eq!((agreed.metadata, agreed.produce, agreed.fetch), (12, 9, 12));
        assert_eq!(agreed.init_producer_id, Some(4));

        let old_broker = [
            (api::METADATA, 0, 9),
            (api::CREATE_TOPICS, 0, 4),
            (api::PRODUCE, 0, 8),
            (api::FETCH, 0, 11),
            (api::LIST_OFFSETS, 0, 5),
        ];
        let agreed = Versions::agree(&old_broker).unwrap();
        assert_eq!(
            agreed,
            Versions {
                metadata: 9,
                create_topics: 4,
                produce: 8,
                fetch: 11,
                list_offsets: 5,
                init_producer_id: None
            }
        );
        // Produce before v3 cannot carry RecordBatch v2.
        let mut no_record_batches = old_broker;
        no_record_batches[2] = (api::PRODUCE, 0, 2);
        let error = Versions::agree(&no_record_batches).unwrap_err();
        assert!(error.to_string().contains("produce versions 0..=2, this client needs 3..=9"), "{error}");
        let error = Versions::agree(&[(api::METADATA, 0, 12)]).unwrap_err();
        assert!(matches!(error, ClientError::Server { code: ErrorCode::UnsupportedRequest, .. }), "{error}");
    }
}
