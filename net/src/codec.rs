//! Typed requests and responses of the native protocol, and their frames.
//!
//! The flatbuffer envelope (`wire_generated.rs`) is an encoding detail of this module: the rest
//! of the code speaks [`Request`] and [`Response`]. Record batches are never copied into the
//! envelope; they ride in the frame's payload and decode as zero-copy [`Bytes`] slices of it.
//!
//! Decoding never trusts the peer. The flatbuffers verifier bounds every offset and vector by the
//! envelope's length, and payload lengths are checked against the bytes actually present, so a
//! malformed frame is a [`DecodeError`], never a panic or an allocation sized from the wire.

use bytes::{BufMut, Bytes, BytesMut};
use flatbuffers::{FlatBufferBuilder, WIPOffset};

use crate::wire_generated::pyralog::wire as fb;

pub use fb::{Acks, ErrorCode};

/// Bytes of the frame's length prefix.
pub const FRAME_PREFIX_BYTES: usize = 4;
/// Bytes of the envelope length that opens every frame body.
const ENVELOPE_PREFIX_BYTES: usize = 4;
/// The timestamp spec of [`ListOffsetsPartition`] that asks for the log start.
pub const OFFSET_EARLIEST: i64 = -2;
/// The timestamp spec of [`ListOffsetsPartition`] that asks for the log end.
pub const OFFSET_LATEST: i64 = -1;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("frame of {frame_bytes} bytes is shorter than its {ENVELOPE_PREFIX_BYTES}-byte envelope length")]
    Truncated { frame_bytes: usize },
    #[error("envelope length {envelope_bytes} exceeds the {frame_bytes}-byte frame")]
    EnvelopeOverrun { envelope_bytes: usize, frame_bytes: usize },
    #[error("envelope is not a valid flatbuffer: {0}")]
    Envelope(String),
    #[error("request body type {0} is not supported")]
    UnsupportedBody(u8),
    #[error("field {0} is missing")]
    MissingField(&'static str),
    #[error("partitions claim {claimed} payload bytes but the frame carries {present}")]
    PayloadMismatch { claimed: u64, present: usize },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Metadata {
        topics: Vec<String>,
    },
    CreateTopic {
        name: String,
        partitions: u32,
        /// Replicas per partition in a cluster; 0: the node's default.
        replication_factor: u32,
        /// The write quorum W in a cluster; 0: a majority of the replicas.
        min_insync_replicas: u32,
    },
    DeleteTopic {
        name: String,
    },
    Produce(ProduceRequest),
    Fetch(FetchRequest),
    ListOffsets(ListOffsetsRequest),
    /// An id for an idempotent producer.
    InitProducerId,
}

impl Request {
    /// The kinds of request, numbered for metrics (`kind_index`).
    const KINDS: [&'static str; 7] =
        ["metadata", "create_topic", "delete_topic", "produce", "fetch", "list_offsets", "init_producer_id"];

    /// The request's kind as a number below [`Request::KINDS`]'s length.
    pub fn kind_index(&self) -> u8 {
        match self {
            Request::Metadata { .. } => 0,
            Request::CreateTopic { .. } => 1,
            Request::DeleteTopic { .. } => 2,
            Request::Produce(_) => 3,
            Request::Fetch(_) => 4,
            Request::ListOffsets(_) => 5,
            Request::InitProducerId => 6,
        }
    }

    /// The kind numbered `index` by `kind_index`.
    pub fn kind_of_index(index: u8) -> &'static str {
        Self::KINDS.get(usize::from(index)).copied().unwrap_or("unknown")
    }

    pub fn kind(&self) -> &'static str {
        Self::KINDS[usize::from(self.kind_index())]
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProduceRequest {
    pub topic: String,
    pub acks: Acks,
    pub partitions: Vec<ProducePartition>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProducePartition {
    pub partition: u32,
    /// One or more whole RecordBatch v2, back to back.
    pub records: Bytes,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchRequest {
    pub topic: String,
    pub max_wait_ms: u32,
    pub min_bytes: u32,
    pub max_bytes: u32,
    pub partitions: Vec<FetchPartition>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FetchPartition {
    pub partition: u32,
    pub offset: i64,
    pub max_bytes: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListOffsetsRequest {
    pub topic: String,
    pub partitions: Vec<ListOffsetsPartition>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListOffsetsPartition {
    pub partition: u32,
    /// [`OFFSET_EARLIEST`], [`OFFSET_LATEST`], or a timestamp in milliseconds.
    pub timestamp: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    Metadata(MetadataResponse),
    CreateTopic,
    DeleteTopic,
    Produce(Vec<ProducePartitionResult>),
    Fetch(Vec<FetchPartitionResult>),
    ListOffsets(Vec<ListOffsetsPartitionResult>),
    InitProducerId { producer_id: i64, producer_epoch: i16 },
}

impl Response {
    /// The request kind this answers, as [`Request::kind`] names it.
    pub fn kind(&self) -> &'static str {
        match self {
            Response::Metadata(_) => "metadata",
            Response::CreateTopic => "create_topic",
            Response::DeleteTopic => "delete_topic",
            Response::Produce(_) => "produce",
            Response::Fetch(_) => "fetch",
            Response::ListOffsets(_) => "list_offsets",
            Response::InitProducerId { .. } => "init_producer_id",
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MetadataResponse {
    /// The answering node's shards.
    pub shards: Vec<ShardInfo>,
    pub topics: Vec<TopicInfo>,
    /// Every node the answering node knows, itself included; empty from a node that predates
    /// clusters.
    pub nodes: Vec<NodeInfo>,
    /// The answering node's id.
    pub node_id: u32,
}

/// A node as metadata describes it, so a client can ask another node when one goes away.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeInfo {
    pub id: u32,
    /// The node's native host; empty: the host the client asked.
    pub host: String,
    /// The node's shared native port.
    pub port: u16,
    /// Each shard's own native port, by shard id.
    pub shard_ports: Vec<u16>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardInfo {
    pub shard: u32,
    pub cpu: u32,
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicInfo {
    pub name: String,
    pub error: ErrorCode,
    pub partitions: Vec<PartitionInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionInfo {
    pub partition: u32,
    /// The shard owning the partition on its leader's node.
    pub shard: u32,
    /// That shard's own native port; 0: the port the client asked.
    pub port: u16,
    /// The leader's native host; empty: the host the client asked.
    pub host: String,
    /// The leader's node id (as the answering node last heard, else the preferred leader).
    pub leader_node: u32,
    /// The leader's epoch (Raft term); -1 when unknown, 0 for a partition of one replica.
    pub leader_epoch: i32,
    /// The replicas' node ids, the preferred leader first.
    pub replicas: Vec<u32>,
}

impl PartitionInfo {
    /// A partition of a node of its own: it leads it, on `shard`, at the host the client asked.
    pub fn single_node(partition: u32, shard: u32, port: u16, node: u32) -> PartitionInfo {
        PartitionInfo {
            partition,
            shard,
            port,
            host: String::new(),
            leader_node: node,
            leader_epoch: 0,
            replicas: vec![node],
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProducePartitionResult {
    pub partition: u32,
    pub error: ErrorCode,
    pub message: String,
    pub base_offset: i64,
    pub next_offset: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchPartitionResult {
    pub partition: u32,
    pub error: ErrorCode,
    pub message: String,
    pub high_watermark: i64,
    pub log_start_offset: i64,
    /// Whole record batches. The server fills it with chunks borrowed from its cache or read
    /// from disk; the client receives one slice of the frame.
    pub records: Vec<Bytes>,
}

impl FetchPartitionResult {
    pub fn records_bytes(&self) -> usize {
        self.records.iter().map(Bytes::len).sum()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListOffsetsPartitionResult {
    pub partition: u32,
    pub error: ErrorCode,
    pub message: String,
    pub offset: i64,
}

/// A response, or a request-level error with no body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseFrame {
    pub correlation_id: u64,
    pub error: ErrorCode,
    pub message: String,
    pub body: Option<Response>,
}

impl ResponseFrame {
    pub fn ok(correlation_id: u64, body: Response) -> ResponseFrame {
        ResponseFrame { correlation_id, error: ErrorCode::None, message: String::new(), body: Some(body) }
    }

    pub fn error(correlation_id: u64, error: ErrorCode, message: impl Into<String>) -> ResponseFrame {
        ResponseFrame { correlation_id, error, message: message.into(), body: None }
    }
}

/// What a code means, in the words an error shown to a person uses ("the topic does not
/// exist"). The generated type's `Debug` gives the Rust name (`UnknownTopic`), for logs of tests.
impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let text = match *self {
            ErrorCode::None => "no error",
            ErrorCode::UnknownTopic => "the topic does not exist",
            ErrorCode::UnknownPartition => "the topic has no such partition",
            ErrorCode::CorruptBatch => "the record batch is corrupt",
            ErrorCode::InvalidRequest => "the request is invalid",
            ErrorCode::MessageTooLarge => "the message is larger than the node accepts",
            ErrorCode::TopicAlreadyExists => "the topic already exists",
            ErrorCode::StorageError => "the node's storage failed",
            ErrorCode::OffsetOutOfRange => "the offset is outside the partition's log",
            ErrorCode::UnsupportedRequest => "the node does not serve this request",
            ErrorCode::InvalidTopic => "the topic name is not valid",
            ErrorCode::ShuttingDown => "the node is shutting down",
            ErrorCode::Overloaded => "the node is overloaded; try again later",
            ErrorCode::NotLeader => "this node does not lead the partition; ask the metadata for its leader",
            ErrorCode::NotController => "this node does not lead the cluster's controller",
            ErrorCode::NotEnoughReplicas => {
                "the partition has fewer in-sync replicas than its write quorum; try again later"
            }
            ErrorCode::OutOfOrderSequence => "the batch's sequence does not follow its producer's last batch",
            ErrorCode::InvalidProducerEpoch => "the producer's epoch is older than the partition has seen",
            other => return write!(f, "error code {} (unknown to this client)", other.0),
        };
        f.write_str(text)
    }
}

/// Reads the length prefix of a frame: the bytes of the frame body that follow it.
pub fn frame_body_bytes(prefix: [u8; FRAME_PREFIX_BYTES]) -> usize {
    u32::from_be_bytes(prefix) as usize
}

/// Appends a whole frame (prefix, envelope, payload) for `request` to `out`.
pub fn encode_request(correlation_id: u64, request: &Request, out: &mut BytesMut) {
    let mut fbb = FlatBufferBuilder::with_capacity(256);
    let mut payload: Vec<&Bytes> = Vec::new();
    let (body_type, body) = match request {
        Request::Metadata { topics } => {
            let names: Vec<_> = topics.iter().map(|t| fbb.create_string(t)).collect();
            let topics = fbb.create_vector(&names);
            let body =
                fb::MetadataRequest::create(&mut fbb, &fb::MetadataRequestArgs { topics: Some(topics) });
            (fb::RequestBody::MetadataRequest, body.as_union_value())
        }
        Request::CreateTopic { name, partitions, replication_factor, min_insync_replicas } => {
            let name = fbb.create_string(name);
            let args = fb::CreateTopicRequestArgs {
                name: Some(name),
                partitions: *partitions,
                replication_factor: *replication_factor,
                min_insync_replicas: *min_insync_replicas,
            };
            let body = fb::CreateTopicRequest::create(&mut fbb, &args);
            (fb::RequestBody::CreateTopicRequest, body.as_union_value())
        }
        Request::DeleteTopic { name } => {
            let name = fbb.create_string(name);
            let body =
                fb::DeleteTopicRequest::create(&mut fbb, &fb::DeleteTopicRequestArgs { name: Some(name) });
            (fb::RequestBody::DeleteTopicRequest, body.as_union_value())
        }
        Request::InitProducerId => {
            let body = fb::InitProducerIdRequest::create(&mut fbb, &fb::InitProducerIdRequestArgs {});
            (fb::RequestBody::InitProducerIdRequest, body.as_union_value())
        }
        Request::Produce(produce) => {
            let topic = fbb.create_string(&produce.topic);
            let parts: Vec<_> = produce
                .partitions
                .iter()
                .map(|p| {
                    payload.push(&p.records);
                    let records_bytes = u32::try_from(p.records.len()).expect("frames are far below 4 GiB");
                    fb::ProducePartition::create(
                        &mut fbb,
                        &fb::ProducePartitionArgs { partition: p.partition, records_bytes },
                    )
                })
                .collect();
            let partitions = fbb.create_vector(&parts);
            let args = fb::ProduceRequestArgs {
                topic: Some(topic),
                acks: produce.acks,
                partitions: Some(partitions),
            };
            let body = fb::ProduceRequest::create(&mut fbb, &args);
            (fb::RequestBody::ProduceRequest, body.as_union_value())
        }
        Request::Fetch(fetch) => {
            let topic = fbb.create_string(&fetch.topic);
            let parts: Vec<_> = fetch
                .partitions
                .iter()
                .map(|p| {
                    let args = fb::FetchPartitionArgs {
                        partition: p.partition,
                        offset: p.offset,
                        max_bytes: p.max_bytes,
                    };
                    fb::FetchPartition::create(&mut fbb, &args)
                })
                .collect();
            let partitions = fbb.create_vector(&parts);
            let args = fb::FetchRequestArgs {
                topic: Some(topic),
                max_wait_ms: fetch.max_wait_ms,
                min_bytes: fetch.min_bytes,
                max_bytes: fetch.max_bytes,
                partitions: Some(partitions),
            };
            let body = fb::FetchRequest::create(&mut fbb, &args);
            (fb::RequestBody::FetchRequest, body.as_union_value())
        }
        Request::ListOffsets(list) => {
            let topic = fbb.create_string(&list.topic);
            let parts: Vec<_> = list
                .partitions
                .iter()
                .map(|p| {
                    let args =
                        fb::ListOffsetsPartitionArgs { partition: p.partition, timestamp: p.timestamp };
                    fb::ListOffsetsPartition::create(&mut fbb, &args)
                })
                .collect();
            let partitions = fbb.create_vector(&parts);
            let args = fb::ListOffsetsRequestArgs { topic: Some(topic), partitions: Some(partitions) };
            let body = fb::ListOffsetsRequest::create(&mut fbb, &args);
            (fb::RequestBody::ListOffsetsRequest, body.as_union_value())
        }
    };
    let root =
        fb::Request::create(&mut fbb, &fb::RequestArgs { correlation_id, body_type, body: Some(body) });
    fbb.finish(root, None);
    put_frame(out, fbb.finished_data(), payload.into_iter());
}

/// Appends a whole frame for `response` to `out`. Fetched batches are copied once, into `out`,
/// exactly as stored; [`encode_response_head`] leaves them out, to be sent from where they are.
pub fn encode_response(response: &ResponseFrame, out: &mut BytesMut) {
    for chunk in encode_response_head(response, out) {
        out.put_slice(&chunk);
    }
}

/// Appends a response frame's length prefix and envelope to `out` and returns its payload:
/// the record batches, as the shared buffers they are stored in, to be sent after it.
pub fn encode_response_head(response: &ResponseFrame, out: &mut BytesMut) -> Vec<Bytes> {
    let mut fbb = FlatBufferBuilder::with_capacity(256);
    let mut payload: Vec<&Bytes> = Vec::new();
    let body = response.body.as_ref().map(|body| encode_response_body(&mut fbb, body, &mut payload));
    let (body_type, body) = body.unwrap_or((fb::ResponseBody::NONE, None));
    let message = (!response.message.is_empty()).then(|| fbb.create_string(&response.message));
    let args = fb::ResponseArgs {
        correlation_id: response.correlation_id,
        error: response.error,
        message,
        body_type,
        body,
    };
    let root = fb::Response::create(&mut fbb, &args);
    fbb.finish(root, None);
    put_frame_head(out, fbb.finished_data(), payload.iter().copied());
    payload.into_iter().cloned().collect()
}

type UnionBody = (fb::ResponseBody, Option<WIPOffset<flatbuffers::UnionWIPOffset>>);

fn encode_response_body<'a>(
    fbb: &mut FlatBufferBuilder<'_>,
    body: &'a Response,
    payload: &mut Vec<&'a Bytes>,
) -> UnionBody {
    match body {
        Response::Metadata(metadata) => {
            let body = encode_metadata(fbb, metadata);
            (fb::ResponseBody::MetadataResponse, Some(body.as_union_value()))
        }
        Response::CreateTopic => {
            let body = fb::CreateTopicResponse::create(fbb, &fb::CreateTopicResponseArgs {});
            (fb::ResponseBody::CreateTopicResponse, Some(body.as_union_value()))
        }
        Response::DeleteTopic => {
            let body = fb::DeleteTopicResponse::create(fbb, &fb::DeleteTopicResponseArgs {});
            (fb::ResponseBody::DeleteTopicResponse, Some(body.as_union_value()))
        }
        Response::InitProducerId { producer_id, producer_epoch } => {
            let args =
                fb::InitProducerIdResponseArgs { producer_id: *producer_id, producer_epoch: *producer_epoch };
            let body = fb::InitProducerIdResponse::create(fbb, &args);
            (fb::ResponseBody::InitProducerIdResponse, Some(body.as_union_value()))
        }
        Response::Produce(results) => {
            let parts: Vec<_> = results
                .iter()
                .map(|r| {
                    let message = (!r.message.is_empty()).then(|| fbb.create_string(&r.message));
                    let args = fb::ProducePartitionResultArgs {
                        partition: r.partition,
                        error: r.error,
                        message,
                        base_offset: r.base_offset,
                        next_offset: r.next_offset,
                    };
                    fb::ProducePartitionResult::create(fbb, &args)
                })
                .collect();
            let partitions = fbb.create_vector(&parts);
            let body =
                fb::ProduceResponse::create(fbb, &fb::ProduceResponseArgs { partitions: Some(partitions) });
            (fb::ResponseBody::ProduceResponse, Some(body.as_union_value()))
        }
        Response::Fetch(results) => {
            let parts: Vec<_> = results
                .iter()
                .map(|r| {
                    payload.extend(r.records.iter());
                    let message = (!r.message.is_empty()).then(|| fbb.create_string(&r.message));
                    let records_bytes = u32::try_from(r.records_bytes()).expect("fetch bounded by max_bytes");
                    let args = fb::FetchPartitionResultArgs {
                        partition: r.partition,
                        error: r.error,
                        message,
                        high_watermark: r.high_watermark,
                        log_start_offset: r.log_start_offset,
                        records_bytes,
                    };
                    fb::FetchPartitionResult::create(fbb, &args)
                })
                .collect();
            let partitions = fbb.create_vector(&parts);
            let body =
                fb::FetchResponse::create(fbb, &fb::FetchResponseArgs { partitions: Some(partitions) });
            (fb::ResponseBody::FetchResponse, Some(body.as_union_value()))
        }
        Response::ListOffsets(results) => {
            let parts: Vec<_> = results
                .iter()
                .map(|r| {
                    let message = (!r.message.is_empty()).then(|| fbb.create_string(&r.message));
                    let args = fb::ListOffsetsPartitionResultArgs {
                        partition: r.partition,
                        error: r.error,
                        message,
                        offset: r.offset,
                    };
                    fb::ListOffsetsPartitionResult::create(fbb, &args)
                })
                .collect();
            let partitions = fbb.create_vector(&parts);
            let args = fb::ListOffsetsResponseArgs { partitions: Some(partitions) };
            let body = fb::ListOffsetsResponse::create(fbb, &args);
            (fb::ResponseBody::ListOffsetsResponse, Some(body.as_union_value()))
        }
    }
}

fn encode_metadata<'b>(
    fbb: &mut FlatBufferBuilder<'b>,
    metadata: &MetadataResponse,
) -> WIPOffset<fb::MetadataResponse<'b>> {
    let shards: Vec<_> = metadata
        .shards
        .iter()
        .map(|s| fb::ShardInfo::create(fbb, &fb::ShardInfoArgs { shard: s.shard, cpu: s.cpu, port: s.port }))
        .collect();
    let shards = fbb.create_vector(&shards);
    let mut topics = Vec::with_capacity(metadata.topics.len());
    for topic in &metadata.topics {
        let name = fbb.create_string(&topic.name);
        let parts: Vec<_> = topic.partitions.iter().map(|p| encode_partition_info(fbb, p)).collect();
        let partitions = fbb.create_vector(&parts);
        let args = fb::TopicInfoArgs { name: Some(name), error: topic.error, partitions: Some(partitions) };
        topics.push(fb::TopicInfo::create(fbb, &args));
    }
    let topics = fbb.create_vector(&topics);
    let nodes: Vec<_> = metadata
        .nodes
        .iter()
        .map(|node| {
            let host = (!node.host.is_empty()).then(|| fbb.create_string(&node.host));
            let shard_ports = fbb.create_vector(&node.shard_ports);
            let args =
                fb::NodeInfoArgs { id: node.id, host, port: node.port, shard_ports: Some(shard_ports) };
            fb::NodeInfo::create(fbb, &args)
        })
        .collect();
    let nodes = fbb.create_vector(&nodes);
    let args = fb::MetadataResponseArgs {
        shards: Some(shards),
        topics: Some(topics),
        nodes: Some(nodes),
        node_id: metadata.node_id,
    };
    fb::MetadataResponse::create(fbb, &args)
}

fn encode_partition_info<'b>(
    fbb: &mut FlatBufferBuilder<'b>,
    p: &PartitionInfo,
) -> WIPOffset<fb::PartitionInfo<'b>> {
    let host = (!p.host.is_empty()).then(|| fbb.create_string(&p.host));
    let replicas = fbb.create_vector(&p.replicas);
    let args = fb::PartitionInfoArgs {
        partition: p.partition,
        shard: p.shard,
        port: p.port,
        host,
        leader_node: p.leader_node,
        leader_epoch: p.leader_epoch,
        replicas: Some(replicas),
    };
    fb::PartitionInfo::create(fbb, &args)
}

fn decode_metadata(body: fb::MetadataResponse<'_>) -> MetadataResponse {
    let shards = body
        .shards()
        .map(|v| v.iter().map(|s| ShardInfo { shard: s.shard(), cpu: s.cpu(), port: s.port() }).collect())
        .unwrap_or_default();
    let topics = body
        .topics()
        .map(|v| {
            v.iter()
                .map(|t| TopicInfo {
                    name: t.name().unwrap_or_default().to_owned(),
                    error: t.error(),
                    partitions: t
                        .partitions()
                        .map(|p| p.iter().map(decode_partition_info).collect())
                        .unwrap_or_default(),
                })
                .collect()
        })
        .unwrap_or_default();
    let nodes = body
        .nodes()
        .map(|v| {
            v.iter()
                .map(|n| NodeInfo {
                    id: n.id(),
                    host: n.host().unwrap_or_default().to_owned(),
                    port: n.port(),
                    shard_ports: n.shard_ports().map(|ports| ports.iter().collect()).unwrap_or_default(),
                })
                .collect()
        })
        .unwrap_or_default();
    MetadataResponse { shards, topics, nodes, node_id: body.node_id() }
}

fn decode_partition_info(p: fb::PartitionInfo<'_>) -> PartitionInfo {
    PartitionInfo {
        partition: p.partition(),
        shard: p.shard(),
        port: p.port(),
        host: p.host().unwrap_or_default().to_owned(),
        leader_node: p.leader_node(),
        leader_epoch: p.leader_epoch(),
        replicas: p.replicas().map(|r| r.iter().collect()).unwrap_or_default(),
    }
}

fn put_frame<'a>(out: &mut BytesMut, envelope: &[u8], payload: impl Iterator<Item = &'a Bytes> + Clone) {
    put_frame_head(out, envelope, payload.clone());
    for chunk in payload {
        out.put_slice(chunk);
    }
}

/// The frame's length prefix, envelope length and envelope; the payload follows.
fn put_frame_head<'a>(out: &mut BytesMut, envelope: &[u8], payload: impl Iterator<Item = &'a Bytes>) {
    let payload_bytes: usize = payload.map(Bytes::len).sum();
    let body_bytes = ENVELOPE_PREFIX_BYTES + envelope.len() + payload_bytes;
    out.reserve(FRAME_PREFIX_BYTES + ENVELOPE_PREFIX_BYTES + envelope.len());
    out.put_u32(u32::try_from(body_bytes).expect("frames are far below 4 GiB"));
    out.put_u32(u32::try_from(envelope.len()).expect("envelopes are small"));
    out.put_slice(envelope);
}

/// Splits a frame body (after the length prefix) into its envelope and payload.
fn split_frame(body: &Bytes) -> Result<(Bytes, Bytes), DecodeError> {
    let frame_bytes = body.len();
    if frame_bytes < ENVELOPE_PREFIX_BYTES {
        return Err(DecodeError::Truncated { frame_bytes });
    }
    let envelope_bytes = u32::from_be_bytes(body[..4].try_into().expect("length checked")) as usize;
    if envelope_bytes > frame_bytes - ENVELOPE_PREFIX_BYTES {
        return Err(DecodeError::EnvelopeOverrun { envelope_bytes, frame_bytes });
    }
    let envelope_end = ENVELOPE_PREFIX_BYTES + envelope_bytes;
    Ok((body.slice(ENVELOPE_PREFIX_BYTES..envelope_end), body.slice(envelope_end..)))
}

/// Cuts `payload` into consecutive slices of the claimed lengths, which must cover it exactly.
fn slice_payload(payload: &Bytes, lengths: impl Iterator<Item = u32>) -> Result<Vec<Bytes>, DecodeError> {
    let mut at = 0usize;
    let mut claimed = 0u64;
    let mut slices = Vec::new();
    for len in lengths {
        claimed += u64::from(len);
        if claimed > payload.len() as u64 {
            return Err(DecodeError::PayloadMismatch { claimed, present: payload.len() });
        }
        slices.push(payload.slice(at..at + len as usize));
        at += len as usize;
    }
    if at != payload.len() {
        return Err(DecodeError::PayloadMismatch { claimed, present: payload.len() });
    }
    Ok(slices)
}

fn envelope_error(error: flatbuffers::InvalidFlatbuffer) -> DecodeError {
    DecodeError::Envelope(error.to_string())
}

/// Decodes a request frame body (the bytes after the length prefix).
/// Returns the correlation id when the envelope was readable, even if the body was not, so the
/// server can answer the failed request instead of dropping the connection.
pub fn decode_request(body: &Bytes) -> Result<(u64, Request), (Option<u64>, DecodeError)> {
    let (envelope, payload) = split_frame(body).map_err(|e| (None, e))?;
    let request = flatbuffers::root::<fb::Request>(&envelope).map_err(|e| (None, envelope_error(e)))?;
    let correlation_id = request.correlation_id();
    decode_request_body(&request, &payload)
        .map(|r| (correlation_id, r))
        .map_err(|e| (Some(correlation_id), e))
}

fn decode_request_body(request: &fb::Request<'_>, payload: &Bytes) -> Result<Request, DecodeError> {
    let body_type = request.body_type();
    let decoded = match body_type {
        fb::RequestBody::MetadataRequest => {
            let body = request.body_as_metadata_request().ok_or(DecodeError::MissingField("body"))?;
            let topics = body.topics().map(|t| t.iter().map(str::to_owned).collect()).unwrap_or_default();
            Request::Metadata { topics }
        }
        fb::RequestBody::CreateTopicRequest => {
            let body = request.body_as_create_topic_request().ok_or(DecodeError::MissingField("body"))?;
            let name = body.name().ok_or(DecodeError::MissingField("name"))?.to_owned();
            Request::CreateTopic {
                name,
                partitions: body.partitions(),
                replication_factor: body.replication_factor(),
                min_insync_replicas: body.min_insync_replicas(),
            }
        }
        fb::RequestBody::DeleteTopicRequest => {
            let body = request.body_as_delete_topic_request().ok_or(DecodeError::MissingField("body"))?;
            let name = body.name().ok_or(DecodeError::MissingField("name"))?.to_owned();
            Request::DeleteTopic { name }
        }
        fb::RequestBody::InitProducerIdRequest => {
            request.body_as_init_producer_id_request().ok_or(DecodeError::MissingField("body"))?;
            Request::InitProducerId
        }
        fb::RequestBody::ProduceRequest => {
            let body = request.body_as_produce_request().ok_or(DecodeError::MissingField("body"))?;
            let topic = body.topic().ok_or(DecodeError::MissingField("topic"))?.to_owned();
            let parts = body.partitions().ok_or(DecodeError::MissingField("partitions"))?;
            let records = slice_payload(payload, parts.iter().map(|p| p.records_bytes()))?;
            let partitions = parts
                .iter()
                .zip(records)
                .map(|(p, records)| ProducePartition { partition: p.partition(), records })
                .collect();
            Request::Produce(ProduceRequest { topic, acks: body.acks(), partitions })
        }
        fb::RequestBody::FetchRequest => {
            let body = request.body_as_fetch_request().ok_or(DecodeError::MissingField("body"))?;
            let topic = body.topic().ok_or(DecodeError::MissingField("topic"))?.to_owned();
            let parts = body.partitions().ok_or(DecodeError::MissingField("partitions"))?;
            let partitions = parts
                .iter()
                .map(|p| FetchPartition {
                    partition: p.partition(),
                    offset: p.offset(),
                    max_bytes: p.max_bytes(),
                })
                .collect();
            Request::Fetch(FetchRequest {
                topic,
                max_wait_ms: body.max_wait_ms(),
                min_bytes: body.min_bytes(),
                max_bytes: body.max_bytes(),
                partitions,
            })
        }
        fb::RequestBody::ListOffsetsRequest => {
            let body = request.body_as_list_offsets_request().ok_or(DecodeError::MissingField("body"))?;
            let topic = body.topic().ok_or(DecodeError::MissingField("topic"))?.to_owned();
            let parts = body.partitions().ok_or(DecodeError::MissingField("partitions"))?;
            let partitions = parts
                .iter()
                .map(|p| ListOffsetsPartition { partition: p.partition(), timestamp: p.timestamp() })
                .collect();
            Request::ListOffsets(ListOffsetsRequest { topic, partitions })
        }
        other => return Err(DecodeError::UnsupportedBody(other.0)),
    };
    if !matches!(decoded, Request::Produce(_)) && !payload.is_empty() {
        return Err(DecodeError::PayloadMismatch { claimed: 0, present: payload.len() });
    }
    Ok(decoded)
}

/// Decodes a response frame body (the bytes after the length prefix).
pub fn decode_response(body: &Bytes) -> Result<ResponseFrame, DecodeError> {
    let (envelope, payload) = split_frame(body)?;
    let response = flatbuffers::root::<fb::Response>(&envelope).map_err(envelope_error)?;
    let body = decode_response_body(&response, &payload)?;
    Ok(ResponseFrame {
        correlation_id: response.correlation_id(),
        error: response.error(),
        message: response.message().unwrap_or_default().to_owned(),
        body,
    })
}

fn decode_response_body(
    response: &fb::Response<'_>,
    payload: &Bytes,
) -> Result<Option<Response>, DecodeError> {
    let decoded = match response.body_type() {
        fb::ResponseBody::NONE => None,
        fb::ResponseBody::MetadataResponse => {
            let body = response.body_as_metadata_response().ok_or(DecodeError::MissingField("body"))?;
            Some(Response::Metadata(decode_metadata(body)))
        }
        fb::ResponseBody::CreateTopicResponse => Some(Response::CreateTopic),
        fb::ResponseBody::DeleteTopicResponse => Some(Response::DeleteTopic),
        fb::ResponseBody::InitProducerIdResponse => {
            let body =
                response.body_as_init_producer_id_response().ok_or(DecodeError::MissingField("body"))?;
            Some(Response::InitProducerId {
                producer_id: body.producer_id(),
                producer_epoch: body.producer_epoch(),
            })
        }
        fb::ResponseBody::ProduceResponse => {
            let body = response.body_as_produce_response().ok_or(DecodeError::MissingField("body"))?;
            let results = body
                .partitions()
                .map(|v| {
                    v.iter()
                        .map(|r| ProducePartitionResult {
                            partition: r.partition(),
                            error: r.error(),
                            message: r.message().unwrap_or_default().to_owned(),
                            base_offset: r.base_offset(),
                            next_offset: r.next_offset(),
                        })
                        .collect()
                })
                .unwrap_or_default();
            Some(Response::Produce(results))
        }
        fb::ResponseBody::FetchResponse => {
            let body = response.body_as_fetch_response().ok_or(DecodeError::MissingField("body"))?;
            let parts = body.partitions().ok_or(DecodeError::MissingField("partitions"))?;
            let records = slice_payload(payload, parts.iter().map(|p| p.records_bytes()))?;
            let results = parts
                .iter()
                .zip(records)
                .map(|(r, records)| FetchPartitionResult {
                    partition: r.partition(),
                    error: r.error(),
                    message: r.message().unwrap_or_default().to_owned(),
                    high_watermark: r.high_watermark(),
                    log_start_offset: r.log_start_offset(),
                    records: if records.is_empty() { Vec::new() } else { vec![records] },
                })
                .collect();
            Some(Response::Fetch(results))
        }
        fb::ResponseBody::ListOffsetsResponse => {
            let body = response.body_as_list_offsets_response().ok_or(DecodeError::MissingField("body"))?;
            let results = body
                .partitions()
                .map(|v| {
                    v.iter()
                        .map(|r| ListOffsetsPartitionResult {
                            partition: r.partition(),
                            error: r.error(),
                            message: r.message().unwrap_or_default().to_owned(),
                            offset: r.offset(),
                        })
                        .collect()
                })
                .unwrap_or_default();
            Some(Response::ListOffsets(results))
        }
        other => return Err(DecodeError::UnsupportedBody(other.0)),
    };
    Ok(decoded)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body_of(frame: BytesMut) -> Bytes {
        let frame = frame.freeze();
        let len = frame_body_bytes(frame[..4].try_into().unwrap());
        assert_eq!(len, frame.len() - 4);
        frame.slice(4..)
    }

    #[test]
    fn produce_request_round_trips_with_payload_slices() {
        let request = Request::Produce(ProduceRequest {
            topic: "orders".into(),
            acks: Acks::Durable,
            partitions: vec![
                ProducePartition { partition: 0, records: Bytes::from_static(b"first-batch") },
                ProducePartition { partition: 3, records: Bytes::from_static(b"second") },
            ],
        });
        let mut out = BytesMut::new();
        encode_request(42, &request, &mut out);
        let (correlation_id, decoded) = decode_request(&body_of(out)).unwrap();
        assert_eq!(correlation_id, 42);
        assert_eq!(decoded, request);
    }

    #[test]
    fn fetch_response_round_trips_and_joins_chunks() {
        let response = ResponseFrame::ok(
            7,
            Response::Fetch(vec![FetchPartitionResult {
                partition: 1,
                error: ErrorCode::None,
                message: String::new(),
                high_watermark: 10,
                log_start_offset: 0,
                records: vec![Bytes::from_static(b"ab"), Bytes::from_static(b"cd")],
            }]),
        );
        let mut out = BytesMut::new();
        encode_response(&response, &mut out);
        let decoded = decode_response(&body_of(out)).unwrap();
        let Some(Response::Fetch(results)) = decoded.body else { panic!("not a fetch: {decoded:?}") };
        assert_eq!(results[0].records, vec![Bytes::from_static(b"abcd")]);
        assert_eq!(results[0].high_watermark, 10);
    }

    #[test]
    fn metadata_round_trips_with_leaders_replicas_and_nodes() {
        let metadata = MetadataResponse {
            shards: vec![ShardInfo { shard: 0, cpu: 3, port: 7071 }],
            topics: vec![TopicInfo {
                name: "t".into(),
                error: ErrorCode::None,
                partitions: vec![
                    PartitionInfo {
                        partition: 0,
                        shard: 1,
                        port: 7072,
                        host: "127.0.0.2".into(),
                        leader_node: 2,
                        leader_epoch: 5,
                        replicas: vec![2, 3, 1],
                    },
                    PartitionInfo::single_node(1, 0, 7071, 1),
                ],
            }],
            nodes: vec![NodeInfo {
                id: 2,
                host: "127.0.0.2".into(),
                port: 7070,
                shard_ports: vec![7071, 7072],
            }],
            node_id: 1,
        };
        let mut out = BytesMut::new();
        encode_response(&ResponseFrame::ok(3, Response::Metadata(metadata.clone())), &mut out);
        let decoded = decode_response(&body_of(out)).unwrap();
        assert_eq!(decoded.body, Some(Response::Metadata(metadata)));
    }

    #[test]
    fn metadata_from_a_node_that_predates_clusters_reads_as_unknown_leaders() {
        // What an older node writes: PartitionInfo with its first three fields only.
        let mut fbb = FlatBufferBuilder::new();
        let partition = fb::PartitionInfo::create(
            &mut fbb,
            &fb::PartitionInfoArgs { partition: 4, shard: 1, port: 7072, ..Default::default() },
        );
        let partitions = fbb.create_vector(&[partition]);
        let name = fbb.create_string("old");
        let topic = fb::TopicInfo::create(
            &mut fbb,
            &fb::TopicInfoArgs { name: Some(name), error: ErrorCode::None, partitions: Some(partitions) },
        );
        let topics = fbb.create_vector(&[topic]);
        let body = fb::MetadataResponse::create(
            &mut fbb,
            &fb::MetadataResponseArgs { topics: Some(topics), ..Default::default() },
        );
        let args = fb::ResponseArgs {
            correlation_id: 9,
            body_type: fb::ResponseBody::MetadataResponse,
            body: Some(body.as_union_value()),
            ..Default::default()
        };
        let root = fb::Response::create(&mut fbb, &args);
        fbb.finish(root, None);
        let mut out = BytesMut::new();
        put_frame(&mut out, fbb.finished_data(), std::iter::empty());
        let Some(Response::Metadata(metadata)) = decode_response(&body_of(out)).unwrap().body else {
            panic!("not metadata")
        };
        let p = &metadata.topics[0].partitions[0];
        assert_eq!((p.partition, p.shard, p.port), (4, 1, 7072));
        assert_eq!((p.host.as_str(), p.leader_epoch, p.replicas.len()), ("", -1, 0));
        assert!(metadata.nodes.is_empty());
    }

    #[test]
    fn payload_lengths_that_overrun_the_frame_are_rejected() {
        let request = Request::Produce(ProduceRequest {
            topic: "t".into(),
            acks: Acks::Durable,
            partitions: vec![ProducePartition { partition: 0, records: Bytes::from_static(b"0123456789") }],
        });
        let mut out = BytesMut::new();
        encode_request(1, &request, &mut out);
        let body = body_of(out);
        let cut = body.slice(..body.len() - 3);
        let (correlation_id, error) = decode_request(&cut).unwrap_err();
        assert_eq!(correlation_id, Some(1));
        assert!(matches!(error, DecodeError::PayloadMismatch { claimed: 10, present: 7 }), "{error:?}");
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for garbage in [&b""[..], b"\x00\x00", b"\x00\x00\x00\x10abc", b"\x00\x00\x00\x04\xff\xff\xff\x7f"] {
            assert!(decode_request(&Bytes::copy_from_slice(garbage)).is_err());
            assert!(decode_response(&Bytes::copy_from_slice(garbage)).is_err());
        }
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_the_decoders(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let bytes = Bytes::from(bytes);
            let _ = decode_request(&bytes);
            let _ = decode_response(&bytes);
        }
    }
}
