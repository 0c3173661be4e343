//! The cluster wire format: the frames nodes exchange on their node-to-node connections, and
//! their encoding and strict decoding.
//!
//! What it is: plain functions over bytes (no sockets, no runtime), so the transport, the
//! blocking identity helpers and the fuzzers share one codec. What it is not: it does not
//! check what messages say (a batch's own bytes, a term's sign, who may send what): the Raft
//! core checks every field it acts on. It checks only that a frame is whole, undamaged and
//! within the limits below.
//!
//! # Layout
//! Every integer is big-endian.
//!
//! ```text
//! frame    = length:u32  crc:u32  version:u8  kind:u8  body
//!            length counts every byte after itself; crc is the CRC-32C of everything after
//!            itself (version, kind and body, batch bytes included)
//! Hello    = cluster_id  from_node:u32  from_shard:u16  to_node:u32  to_shard:u16
//! Welcome  = cluster_id  node:u32
//! Refused  = reason_bytes:u16  reason (UTF-8)
//! Messages = count:u32  entry*count
//! Request  = id:u64  reply_to  body_bytes:u32  body
//! Response = id:u64  body_bytes:u32  body
//! cluster_id = 0:u8  |  1:u8  id:[u8;16]
//! entry    = topic_id:[u8;16]  partition:u32  from:u32  to:u32  term:i32  tag:u8  fields
//! Append fields = prev_end:i64  prev_epoch:i32  commit_end:i64  log_start:i64  seq:u64
//!            count:u32  batch_bytes:u32*count  batch*count
//! StartAt fields = start:i64  prev_epoch:i32  commit_end:i64  seq:u64  count:u32
//!            (offset:i64  batch_bytes:u32  batch)*count
//!            each batch a configuration batch carrying one membership, as the log holds it
//! reply_to = 4:u8  ip:[u8;4]  port:u16  |  6:u8  ip:[u8;16]  port:u16
//! ```
//!
//! A Request and its Response carry an opaque body of at most [`REQUEST_BODY_BYTES_MAX`]
//! (the daemon's, this module never looks inside) and the requester's id for matching them;
//! a Request also carries the address its Response is to be sent to (see
//! `cluster::transport`). A body, like a batch, is its own chunk when encoded and a slice of
//! the frame when decoded.
//!
//! Each message body has its tag and one encode and one decode function (`encode_vote`,
//! `decode_vote`, ...): adding a field to a body is a change to those two and to its test.
//! An Append puts its fixed fields first, then the length of every batch, then the batch
//! bytes back to back: decoding slices the batches out of the received frame
//! ([`Bytes::slice`], no copy), and encoding hands them over as chunks of their own
//! ([`encode`] appends a frame's chunks to a list for a vectored write), so batch bytes are
//! never copied on either side.
//!
//! # Invariants
//! - Decoding never panics and never reserves room from a count read off the wire before
//!   checking that the bytes left can hold that many items of their smallest encoding; what
//!   a decoded frame holds in memory is bounded by a small multiple of its length.
//! - A frame decodes only whole: a damaged CRC, an unknown version, kind or tag, a count or
//!   length over its limit or over the bytes left, a flag that is neither 0 nor 1, a reason
//!   that is not UTF-8, an address family other than 4 or 6 and bytes left over after the
//!   last field are all errors.
//! - `decode(encode(frame)) == frame` for every frame the encoder accepts.
//!
//! The [`GroupKey`] is opaque here: a topic's id and a partition, naming one Raft group
//! (the controller's group uses an all-zero topic id; this module gives no key a meaning).

use std::net::{IpAddr, SocketAddr};

use bytes::{BufMut, Bytes, BytesMut};
use pyralog_replication::batch::HEADER_BYTES as BATCH_HEADER_BYTES;
use pyralog_replication::epoch::EpochStart;
use pyralog_replication::group::{EPOCH_HINTS_MAX, MEMBERSHIPS_SENT_MAX, PROPOSAL_BYTES_MAX};
use pyralog_replication::message::StartAt;
use pyralog_replication::{Append, AppendResponse, Body, Membership, Message};

/// The only version this node speaks.
pub const FRAME_VERSION: u8 = 2;
/// The length field before every frame.
pub const LENGTH_PREFIX_BYTES: usize = 4;
/// What follows the length before the body: CRC, version, kind.
pub const FRAME_HEADER_BYTES: usize = 4 + 1 + 1;
/// Largest value of a frame's length field (what follows it). A writer splits what it has
/// queued into frames of at most this; the largest single message (an append of one batch
/// of [`PROPOSAL_BYTES_MAX`]) fits with room to spare.
pub const CLUSTER_FRAME_BYTES_MAX: usize = 16 << 20;
/// Largest length of a handshake frame (Hello, Welcome, Refused): what a connection reads
/// before it knows its peer, so a stranger cannot make it reserve more.
pub const HANDSHAKE_FRAME_BYTES_MAX: usize = FRAME_HEADER_BYTES + 2 + REFUSED_REASON_BYTES_MAX;
/// Messages in one frame: all groups' heartbeats between two shards travel in one frame per
/// tick, so this bounds the groups two shards share before a tick takes two frames.
pub const FRAME_ENTRIES_MAX: usize = 1 << 16;
/// Batches in one Append. The core fills an append with at most
/// [`APPEND_BYTES_MAX`](pyralog_replication::group::APPEND_BYTES_MAX) of batches of at least a
/// header each (1 MiB / 61 bytes: 17,190), or a single larger batch.
pub const APPEND_BATCHES_MAX: usize = 1 << 15;
/// Epochs in one AppendResponse: the core sends at most this many hints.
pub const EPOCHS_MAX: usize = EPOCH_HINTS_MAX;
/// Configurations in one StartAt: the core sends at most this many.
pub const MEMBERSHIPS_MAX: usize = MEMBERSHIPS_SENT_MAX;
/// Bytes of one configuration batch in a StartAt: two voter sets of the largest replication
/// factor and the most learners take about 160.
pub const MEMBERSHIP_BATCH_BYTES_MAX: usize = 1024;
/// Bytes of a refusal's reason.
pub const REFUSED_REASON_BYTES_MAX: usize = 1024;
/// Bytes of a Request's or a Response's body: node registrations and topic changes, a few
/// KiB of JSON, with room to spare.
pub const REQUEST_BODY_BYTES_MAX: usize = 1 << 20;

const _: () = assert!(PROPOSAL_BYTES_MAX + 1024 < CLUSTER_FRAME_BYTES_MAX, "one proposal fits a frame");
const _: () = assert!(REQUEST_BODY_BYTES_MAX + 1024 < CLUSTER_FRAME_BYTES_MAX, "one request fits a frame");
const _: () = assert!(
    pyralog_replication::group::APPEND_BYTES_MAX / BATCH_HEADER_BYTES < APPEND_BATCHES_MAX,
    "a full append's batch count fits"
);

/// A cluster's identity: random, chosen once when the cluster is formed.
pub type ClusterId = [u8; 16];

/// The Raft group a message belongs to: a topic's id and a partition. Opaque to the transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GroupKey {
    pub topic_id: [u8; 16],
    pub partition: u32,
}

/// The first frame on every connection, from the side that connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    /// The sender's cluster, or None while it has none (a query: see `cluster::identity`).
    pub cluster_id: Option<ClusterId>,
    pub from_node: u32,
    pub from_shard: u16,
    /// Who the sender believes it is talking to: checked by the acceptor.
    pub to_node: u32,
    pub to_shard: u16,
}

/// The acceptor's answer to a [`Hello`] it accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Welcome {
    pub cluster_id: Option<ClusterId>,
    pub node: u32,
    /// The term of the node's replica of the cluster's controller (0: it never saw one). A
    /// seed that comes back without its data learns from it that the cluster ran without it.
    pub controller_term: i32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Hello(Hello),
    Welcome(Welcome),
    /// The acceptor refuses the connection and closes it.
    Refused {
        reason: String,
    },
    /// Everything one side had queued for the other, of many groups.
    Messages(Vec<(GroupKey, Message)>),
    /// A question for the receiving shard, answered by a [`Frame::Response`] of the same
    /// `id` sent to `reply_to` (the requester's own cluster address).
    Request {
        id: u64,
        reply_to: SocketAddr,
        body: Bytes,
    },
    /// The answer to the Request `id` of the shard that receives it.
    Response {
        id: u64,
        body: Bytes,
    },
}

impl Frame {
    pub fn kind_name(&self) -> &'static str {
        match self {
            Frame::Hello(_) => "Hello",
            Frame::Welcome(_) => "Welcome",
            Frame::Refused { .. } => "Refused",
            Frame::Messages(_) => "Messages",
            Frame::Request { .. } => "Request",
            Frame::Response { .. } => "Response",
        }
    }
}

/// Why bytes are not a cluster frame. Each names what was wrong and where to look.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClusterFrameError {
    #[error(
        "cluster frame of {bytes} bytes exceeds {limit} ({max} bytes): the peer is not a pyralog \
         node speaking this version, or the stream is out of step"
    )]
    TooLarge { limit: &'static str, bytes: usize, max: usize },
    #[error("cluster frame length says {declared} bytes follow, but {actual} do")]
    LengthMismatch { declared: usize, actual: usize },
    #[error(
        "cluster frame CRC-32C mismatch: the frame says {expected:#010x}, its bytes give \
         {actual:#010x}; the bytes were damaged on the way, or the stream is out of step"
    )]
    Crc { expected: u32, actual: u32 },
    #[error(
        "cluster frame version {0} is not understood (this node speaks version {FRAME_VERSION}): \
         run the same pyralog version on every node"
    )]
    Version(u8),
    #[error(
        "cluster frame kind {0} is unknown (1 Hello, 2 Welcome, 3 Refused, 4 Messages, 5 Request, \
         6 Response)"
    )]
    Kind(u8),
    #[error("message body tag {0} is unknown (1 to 10)")]
    BodyTag(u8),
    #[error("a StartAt's configuration batch at offset {0} is not the encoding of a valid membership")]
    Membership(i64),
    #[error("cluster frame truncated in {what}: {needed} bytes needed, {left} left")]
    Truncated { what: &'static str, needed: usize, left: usize },
    #[error("{what} is {value}, over {limit} ({max})")]
    OverLimit { what: &'static str, limit: &'static str, value: u64, max: u64 },
    #[error("{what} counts {count} items of at least {each_bytes} bytes, but only {left} bytes are left")]
    CountOverBytes { what: &'static str, count: usize, each_bytes: usize, left: usize },
    #[error("{what} is {value} bytes, shorter than a record batch header ({BATCH_HEADER_BYTES})")]
    BatchTooShort { what: &'static str, value: usize },
    #[error("{what} must be 0 or 1, not {value}")]
    Flag { what: &'static str, value: u8 },
    #[error("the refusal's reason is not UTF-8")]
    ReasonNotUtf8,
    #[error("a Request's reply address family is {0}, neither 4 (IPv4) nor 6 (IPv6)")]
    AddressFamily(u8),
    #[error("{0} bytes left over after the cluster frame's last field")]
    Trailing(usize),
}

type Result<T> = std::result::Result<T, ClusterFrameError>;

const KIND_HELLO: u8 = 1;
const KIND_WELCOME: u8 = 2;
const KIND_REFUSED: u8 = 3;
const KIND_MESSAGES: u8 = 4;
const KIND_REQUEST: u8 = 5;
const KIND_RESPONSE: u8 = 6;

const TAG_PRE_VOTE: u8 = 1;
const TAG_PRE_VOTE_RESPONSE: u8 = 2;
const TAG_VOTE: u8 = 3;
const TAG_VOTE_RESPONSE: u8 = 4;
const TAG_APPEND: u8 = 5;
const TAG_APPEND_RESPONSE: u8 = 6;
const TAG_TIMEOUT_NOW: u8 = 7;
const TAG_TERM_QUERY: u8 = 8;
const TAG_TERM_ANSWER: u8 = 9;
const TAG_START_AT: u8 = 10;

/// The smallest entry: group key, from, to, term, tag (a body without fields).
const ENTRY_BYTES_MIN: usize = 16 + 4 + 4 + 4 + 4 + 1;
/// One epoch hint: epoch, start offset.
const EPOCH_BYTES: usize = 4 + 8;
/// Where the Messages count sits in a frame.
const MESSAGES_COUNT_AT: usize = LENGTH_PREFIX_BYTES + FRAME_HEADER_BYTES;

// ---------------------------------------------------------------------------------------------
// Encoding

/// Appends the chunks of `frame` to `out`, ready to be written in order.
///
/// ```
/// use pyralog_net::cluster::frame::{self, Frame, Welcome};
///
/// let welcome = Frame::Welcome(Welcome { cluster_id: Some([7; 16]), node: 2, controller_term: 1 });
/// let mut chunks = Vec::new();
/// frame::encode(&welcome, &mut chunks);
/// let bytes: Vec<u8> = chunks.concat();
/// assert_eq!(frame::decode(bytes.into()).unwrap(), welcome);
/// ```
///
/// Panics if the frame breaks a limit the decoder enforces (a reason over
/// [`REFUSED_REASON_BYTES_MAX`], a Messages frame over [`CLUSTER_FRAME_BYTES_MAX`] or
/// [`FRAME_ENTRIES_MAX`], a batch shorter than a header, a body over
/// [`REQUEST_BODY_BYTES_MAX`]): those are the caller's bugs. To fill
/// a Messages frame up to its limits, use [`MessagesEncoder`].
pub fn encode(frame: &Frame, out: &mut Vec<Bytes>) {
    let mut encoder = Encoder::new(frame_kind(frame));
    match frame {
        Frame::Hello(hello) => encode_hello(hello, &mut encoder.head),
        Frame::Welcome(welcome) => encode_welcome(welcome, &mut encoder.head),
        Frame::Refused { reason } => {
            assert!(reason.len() <= REFUSED_REASON_BYTES_MAX, "a refusal's reason is bounded");
            encoder.head.put_u16(reason.len() as u16);
            encoder.head.put_slice(reason.as_bytes());
        }
        Frame::Request { id, reply_to, body } => {
            encoder.head.put_u64(*id);
            put_address(&mut encoder.head, *reply_to);
            put_body(body, &mut encoder);
        }
        Frame::Response { id, body } => {
            encoder.head.put_u64(*id);
            put_body(body, &mut encoder);
        }
        Frame::Messages(entries) => {
            let mut messages = MessagesEncoder::new();
            for (key, message) in entries {
                assert!(messages.push(key, message), "the Messages frame fits its limits");
            }
            return messages.finish(out);
        }
    }
    encoder.finish(out);
}

/// The frame as one buffer (copies the chunks): for handshakes and tests.
pub fn encode_to_bytes(frame: &Frame) -> Bytes {
    let mut chunks = Vec::new();
    encode(frame, &mut chunks);
    let mut whole = BytesMut::with_capacity(chunks.iter().map(Bytes::len).sum());
    chunks.iter().for_each(|chunk| whole.put_slice(chunk));
    whole.freeze()
}

fn frame_kind(frame: &Frame) -> u8 {
    match frame {
        Frame::Hello(_) => KIND_HELLO,
        Frame::Welcome(_) => KIND_WELCOME,
        Frame::Refused { .. } => KIND_REFUSED,
        Frame::Messages(_) => KIND_MESSAGES,
        Frame::Request { .. } => KIND_REQUEST,
        Frame::Response { .. } => KIND_RESPONSE,
    }
}

/// Builds one Messages frame entry by entry, up to the frame's limits.
pub struct MessagesEncoder {
    encoder: Encoder,
    count: usize,
}

impl Default for MessagesEncoder {
    fn default() -> Self {
        MessagesEncoder::new()
    }
}

impl MessagesEncoder {
    pub fn new() -> MessagesEncoder {
        let mut encoder = Encoder::new(KIND_MESSAGES);
        encoder.head.put_u32(0); // the count, written by `finish`
        MessagesEncoder { encoder, count: 0 }
    }

    /// Adds one message, unless the frame would then be over [`CLUSTER_FRAME_BYTES_MAX`] or
    /// [`FRAME_ENTRIES_MAX`]: false means it was not added (send this frame, then start
    /// another; a message refused by an empty encoder can never be sent).
    pub fn push(&mut self, key: &GroupKey, message: &Message) -> bool {
        if self.count == FRAME_ENTRIES_MAX {
            return false;
        }
        let (head_before, splices_before, spliced_before) =
            (self.encoder.head.len(), self.encoder.splices.len(), self.encoder.spliced_bytes);
        encode_entry(key, message, &mut self.encoder);
        if self.encoder.length() > CLUSTER_FRAME_BYTES_MAX {
            self.encoder.head.truncate(head_before);
            self.encoder.splices.truncate(splices_before);
            self.encoder.spliced_bytes = spliced_before;
            return false;
        }
        self.count += 1;
        true
    }

    /// Messages added so far.
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The frame's bytes so far, length prefix included.
    pub fn frame_bytes(&self) -> usize {
        LENGTH_PREFIX_BYTES + self.encoder.length()
    }

    /// Appends the frame's chunks to `out`.
    pub fn finish(mut self, out: &mut Vec<Bytes>) {
        let count = u32::try_from(self.count).expect("at most FRAME_ENTRIES_MAX entries");
        self.encoder.head[MESSAGES_COUNT_AT..MESSAGES_COUNT_AT + 4].copy_from_slice(&count.to_be_bytes());
        self.encoder.finish(out);
    }
}

/// The fields of a frame in one buffer (`head`), with the batches to splice in at given
/// positions of it: the batches are written from their own buffers, never copied.
struct Encoder {
    head: BytesMut,
    /// (position in `head`, chunk): the chunk goes right before that position's byte.
    splices: Vec<(usize, Bytes)>,
    spliced_bytes: usize,
}

impl Encoder {
    fn new(kind: u8) -> Encoder {
        let mut head = BytesMut::with_capacity(256);
        head.put_u32(0); // length, written by `finish`
        head.put_u32(0); // CRC, written by `finish`
        head.put_u8(FRAME_VERSION);
        head.put_u8(kind);
        Encoder { head, splices: Vec::new(), spliced_bytes: 0 }
    }

    /// What the length field will say.
    fn length(&self) -> usize {
        self.head.len() - LENGTH_PREFIX_BYTES + self.spliced_bytes
    }

    fn splice(&mut self, chunk: Bytes) {
        self.spliced_bytes += chunk.len();
        self.splices.push((self.head.len(), chunk));
    }

    fn finish(mut self, out: &mut Vec<Bytes>) {
        let length = u32::try_from(self.length()).expect("frames are bounded far below 4 GiB");
        self.head[..4].copy_from_slice(&length.to_be_bytes());
        let mut crc = 0;
        let mut from = 2 * 4;
        for (at, chunk) in &self.splices {
            crc = crc32c::crc32c_append(crc, &self.head[from..*at]);
            crc = crc32c::crc32c_append(crc, chunk);
            from = *at;
        }
        crc = crc32c::crc32c_append(crc, &self.head[from..]);
        self.head[4..8].copy_from_slice(&crc.to_be_bytes());
        let head = self.head.freeze();
        let chunks_before = out.len();
        let mut from = 0;
        for (at, chunk) in self.splices {
            if at > from {
                out.push(head.slice(from..at));
            }
            out.push(chunk);
            from = at;
        }
        out.push(head.slice(from..));
        let written: usize = out[chunks_before..].iter().map(Bytes::len).sum();
        assert_eq!(written, LENGTH_PREFIX_BYTES + length as usize, "the length field counts every byte");
    }
}

fn put_cluster_id(head: &mut BytesMut, cluster_id: Option<ClusterId>) {
    match cluster_id {
        None => head.put_u8(0),
        Some(id) => {
            head.put_u8(1);
            head.put_slice(&id);
        }
    }
}

/// The address's IP and port; an IPv6 address's flow label and scope are not carried.
fn put_address(head: &mut BytesMut, address: SocketAddr) {
    match address.ip() {
        IpAddr::V4(ip) => {
            head.put_u8(4);
            head.put_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            head.put_u8(6);
            head.put_slice(&ip.octets());
        }
    }
    head.put_u16(address.port());
}

/// A Request's or Response's body: its length, then the body as a chunk of its own.
fn put_body(body: &Bytes, encoder: &mut Encoder) {
    assert!(body.len() <= REQUEST_BODY_BYTES_MAX, "the transport checks a body's length first");
    encoder.head.put_u32(body.len() as u32);
    if !body.is_empty() {
        encoder.splice(body.clone());
    }
}

fn encode_hello(hello: &Hello, head: &mut BytesMut) {
    put_cluster_id(head, hello.cluster_id);
    head.put_u32(hello.from_node);
    head.put_u16(hello.from_shard);
    head.put_u32(hello.to_node);
    head.put_u16(hello.to_shard);
}

fn encode_welcome(welcome: &Welcome, head: &mut BytesMut) {
    put_cluster_id(head, welcome.cluster_id);
    head.put_u32(welcome.node);
    head.put_i32(welcome.controller_term);
}

fn encode_entry(key: &GroupKey, message: &Message, encoder: &mut Encoder) {
    let head = &mut encoder.head;
    head.put_slice(&key.topic_id);
    head.put_u32(key.partition);
    head.put_u32(message.from);
    head.put_u32(message.to);
    head.put_i32(message.term);
    match &message.body {
        Body::PreVote { last_epoch, log_end } => encode_pre_vote(*last_epoch, *log_end, head),
        Body::PreVoteResponse { granted } => encode_pre_vote_response(*granted, head),
        Body::Vote { last_epoch, log_end, transfer } => encode_vote(*last_epoch, *log_end, *transfer, head),
        Body::VoteResponse { granted } => encode_vote_response(*granted, head),
        Body::Append(append) => encode_append(append, encoder),
        Body::AppendResponse(response) => encode_append_response(response, head),
        Body::StartAt(start_at) => encode_start_at(start_at, head),
        // Bodies without fields are their tag alone.
        Body::TimeoutNow => head.put_u8(TAG_TIMEOUT_NOW),
        Body::TermQuery { disk_id } => {
            head.put_u8(TAG_TERM_QUERY);
            head.put_u64(*disk_id);
        }
        Body::TermAnswer { disk_id } => {
            head.put_u8(TAG_TERM_ANSWER);
            head.put_u64(*disk_id);
        }
    }
}

fn encode_pre_vote(last_epoch: i32, log_end: i64, head: &mut BytesMut) {
    head.put_u8(TAG_PRE_VOTE);
    head.put_i32(last_epoch);
    head.put_i64(log_end);
}

fn encode_pre_vote_response(granted: bool, head: &mut BytesMut) {
    head.put_u8(TAG_PRE_VOTE_RESPONSE);
    head.put_u8(u8::from(granted));
}

fn encode_vote(last_epoch: i32, log_end: i64, transfer: bool, head: &mut BytesMut) {
    head.put_u8(TAG_VOTE);
    head.put_i32(last_epoch);
    head.put_i64(log_end);
    head.put_u8(u8::from(transfer));
}

fn encode_vote_response(granted: bool, head: &mut BytesMut) {
    head.put_u8(TAG_VOTE_RESPONSE);
    head.put_u8(u8::from(granted));
}

/// Fixed fields, the batches' lengths, then the batches themselves, spliced in uncopied.
fn encode_append(append: &Append, encoder: &mut Encoder) {
    let head = &mut encoder.head;
    head.put_u8(TAG_APPEND);
    head.put_i64(append.prev_end);
    head.put_i32(append.prev_epoch);
    head.put_i64(append.commit_end);
    head.put_i64(append.log_start);
    head.put_u64(append.seq);
    assert!(append.batches.len() <= APPEND_BATCHES_MAX, "the core bounds an append's batches");
    head.put_u32(append.batches.len() as u32);
    for batch in &append.batches {
        assert!(batch.len() >= BATCH_HEADER_BYTES, "the core sends only whole stored batches");
        head.put_u32(u32::try_from(batch.len()).expect("a batch is far below 4 GiB"));
    }
    for batch in &append.batches {
        encoder.splice(batch.clone());
    }
}

fn encode_start_at(start_at: &StartAt, head: &mut BytesMut) {
    head.put_u8(TAG_START_AT);
    head.put_i64(start_at.start);
    head.put_i32(start_at.prev_epoch);
    head.put_i64(start_at.commit_end);
    head.put_u64(start_at.seq);
    assert!(start_at.memberships.len() <= MEMBERSHIPS_MAX, "the core bounds a StartAt's configurations");
    head.put_u32(start_at.memberships.len() as u32);
    for (offset, membership) in &start_at.memberships {
        let batch = membership.to_batch();
        assert!(batch.len() <= MEMBERSHIP_BATCH_BYTES_MAX, "a membership's batch is small");
        head.put_i64(*offset);
        head.put_u32(batch.len() as u32);
        head.put_slice(&batch);
    }
}

fn encode_append_response(response: &AppendResponse, head: &mut BytesMut) {
    head.put_u8(TAG_APPEND_RESPONSE);
    head.put_u8(u8::from(response.accepted));
    head.put_i64(response.match_end);
    head.put_i64(response.acked_end);
    head.put_i64(response.log_end);
    head.put_u8(u8::from(response.recovering));
    head.put_u64(response.seq);
    head.put_u64(response.disk_id);
    assert!(response.epochs.len() <= EPOCHS_MAX, "the core sends at most EPOCH_HINTS_MAX epochs");
    head.put_u32(response.epochs.len() as u32);
    for start in &response.epochs {
        head.put_i32(start.epoch);
        head.put_i64(start.start_offset);
    }
}

// ---------------------------------------------------------------------------------------------
// Decoding

/// What a length prefix says follows it.
pub fn frame_length(prefix: [u8; LENGTH_PREFIX_BYTES]) -> usize {
    u32::from_be_bytes(prefix) as usize
}

/// Checks a length prefix against a limit (named in the error) before anything is read.
pub fn check_frame_length(length: usize, limit: &'static str, max: usize) -> Result<()> {
    if length > max {
        return Err(ClusterFrameError::TooLarge { limit, bytes: length, max });
    }
    Ok(())
}

/// Decodes one whole frame, length prefix included.
pub fn decode(frame: Bytes) -> Result<Frame> {
    let prefix: [u8; LENGTH_PREFIX_BYTES] = frame
        .get(..LENGTH_PREFIX_BYTES)
        .ok_or(ClusterFrameError::Truncated {
            what: "length",
            needed: LENGTH_PREFIX_BYTES,
            left: frame.len(),
        })?
        .try_into()
        .expect("length checked");
    let declared = frame_length(prefix);
    check_frame_length(declared, "CLUSTER_FRAME_BYTES_MAX", CLUSTER_FRAME_BYTES_MAX)?;
    let actual = frame.len() - LENGTH_PREFIX_BYTES;
    if declared != actual {
        return Err(ClusterFrameError::LengthMismatch { declared, actual });
    }
    decode_body(frame.slice(LENGTH_PREFIX_BYTES..))
}

/// Decodes what follows a frame's length prefix (the caller checked the length against its
/// limit and cut exactly that many bytes). Batches are slices of `body`.
pub fn decode_body(body: Bytes) -> Result<Frame> {
    let mut reader = Reader { frame: body, at: 0 };
    let expected = reader.u32("CRC")?;
    let actual = crc32c::crc32c(&reader.frame[reader.at..]);
    if expected != actual {
        return Err(ClusterFrameError::Crc { expected, actual });
    }
    let version = reader.u8("version")?;
    if version != FRAME_VERSION {
        return Err(ClusterFrameError::Version(version));
    }
    let frame = match reader.u8("kind")? {
        KIND_HELLO => Frame::Hello(decode_hello(&mut reader)?),
        KIND_WELCOME => Frame::Welcome(decode_welcome(&mut reader)?),
        KIND_REFUSED => Frame::Refused { reason: decode_reason(&mut reader)? },
        KIND_MESSAGES => Frame::Messages(decode_messages(&mut reader)?),
        KIND_REQUEST => Frame::Request {
            id: reader.u64("Request id")?,
            reply_to: reader.address()?,
            body: reader.body("the Request's body length")?,
        },
        KIND_RESPONSE => Frame::Response {
            id: reader.u64("Response id")?,
            body: reader.body("the Response's body length")?,
        },
        kind => return Err(ClusterFrameError::Kind(kind)),
    };
    match reader.left() {
        0 => Ok(frame),
        left => Err(ClusterFrameError::Trailing(left)),
    }
}

/// A cursor over a frame: every read checks the bytes left.
struct Reader {
    frame: Bytes,
    at: usize,
}

impl Reader {
    fn left(&self) -> usize {
        self.frame.len() - self.at
    }

    fn take<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N]> {
        let left = self.left();
        let bytes = self.frame.get(self.at..self.at + N).ok_or(ClusterFrameError::Truncated {
            what,
            needed: N,
            left,
        })?;
        self.at += N;
        Ok(bytes.try_into().expect("N bytes taken"))
    }

    fn u8(&mut self, what: &'static str) -> Result<u8> {
        self.take::<1>(what).map(|[byte]| byte)
    }

    fn u16(&mut self, what: &'static str) -> Result<u16> {
        self.take(what).map(u16::from_be_bytes)
    }

    fn u32(&mut self, what: &'static str) -> Result<u32> {
        self.take(what).map(u32::from_be_bytes)
    }

    fn i32(&mut self, what: &'static str) -> Result<i32> {
        self.take(what).map(i32::from_be_bytes)
    }

    fn i64(&mut self, what: &'static str) -> Result<i64> {
        self.take(what).map(i64::from_be_bytes)
    }

    fn u64(&mut self, what: &'static str) -> Result<u64> {
        self.take(what).map(u64::from_be_bytes)
    }

    fn flag(&mut self, what: &'static str) -> Result<bool> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            value => Err(ClusterFrameError::Flag { what, value }),
        }
    }

    fn slice(&mut self, bytes: usize, what: &'static str) -> Result<Bytes> {
        if bytes > self.left() {
            return Err(ClusterFrameError::Truncated { what, needed: bytes, left: self.left() });
        }
        self.at += bytes;
        Ok(self.frame.slice(self.at - bytes..self.at))
    }

    /// A u32 count, checked against its named limit and against the bytes left, so that
    /// room reserved for that many items is bounded by the frame's own length.
    fn count(
        &mut self,
        what: &'static str,
        limit: &'static str,
        max: usize,
        each_bytes: usize,
    ) -> Result<usize> {
        let count = self.u32(what)? as usize;
        if count > max {
            return Err(ClusterFrameError::OverLimit { what, limit, value: count as u64, max: max as u64 });
        }
        let left = self.left();
        if count.saturating_mul(each_bytes) > left {
            return Err(ClusterFrameError::CountOverBytes { what, count, each_bytes, left });
        }
        Ok(count)
    }

    fn address(&mut self) -> Result<SocketAddr> {
        let ip = match self.u8("reply address family")? {
            4 => IpAddr::from(self.take::<4>("IPv4 reply address")?),
            6 => IpAddr::from(self.take::<16>("IPv6 reply address")?),
            family => return Err(ClusterFrameError::AddressFamily(family)),
        };
        Ok(SocketAddr::new(ip, self.u16("reply port")?))
    }

    /// A u32 length over [`REQUEST_BODY_BYTES_MAX`] or the bytes left is an error; the
    /// body is a slice of the frame.
    fn body(&mut self, what: &'static str) -> Result<Bytes> {
        let bytes = self.u32(what)? as usize;
        if bytes > REQUEST_BODY_BYTES_MAX {
            return Err(ClusterFrameError::OverLimit {
                what,
                limit: "REQUEST_BODY_BYTES_MAX",
                value: bytes as u64,
                max: REQUEST_BODY_BYTES_MAX as u64,
            });
        }
        self.slice(bytes, "body")
    }

    fn cluster_id(&mut self) -> Result<Option<ClusterId>> {
        match self.flag("cluster id flag")? {
            false => Ok(None),
            true => self.take("cluster id").map(Some),
        }
    }
}

fn decode_hello(reader: &mut Reader) -> Result<Hello> {
    Ok(Hello {
        cluster_id: reader.cluster_id()?,
        from_node: reader.u32("Hello from_node")?,
        from_shard: reader.u16("Hello from_shard")?,
        to_node: reader.u32("Hello to_node")?,
        to_shard: reader.u16("Hello to_shard")?,
    })
}

fn decode_welcome(reader: &mut Reader) -> Result<Welcome> {
    Ok(Welcome {
        cluster_id: reader.cluster_id()?,
        node: reader.u32("Welcome node")?,
        controller_term: reader.i32("Welcome controller_term")?,
    })
}

fn decode_reason(reader: &mut Reader) -> Result<String> {
    let bytes = reader.u16("reason length")? as usize;
    if bytes > REFUSED_REASON_BYTES_MAX {
        return Err(ClusterFrameError::OverLimit {
            what: "the refusal's reason length",
            limit: "REFUSED_REASON_BYTES_MAX",
            value: bytes as u64,
            max: REFUSED_REASON_BYTES_MAX as u64,
        });
    }
    let reason = reader.slice(bytes, "reason")?;
    String::from_utf8(reason.to_vec()).map_err(|_| ClusterFrameError::ReasonNotUtf8)
}

fn decode_messages(reader: &mut Reader) -> Result<Vec<(GroupKey, Message)>> {
    let count = reader.count("the message count", "FRAME_ENTRIES_MAX", FRAME_ENTRIES_MAX, ENTRY_BYTES_MIN)?;
    let mut entries = Vec::with_capacity(count);
    for _ in 0..count {
        entries.push(decode_entry(reader)?);
    }
    Ok(entries)
}

fn decode_entry(reader: &mut Reader) -> Result<(GroupKey, Message)> {
    let key = GroupKey { topic_id: reader.take("topic id")?, partition: reader.u32("partition")? };
    let (from, to, term) = (reader.u32("from")?, reader.u32("to")?, reader.i32("term")?);
    let body = match reader.u8("body tag")? {
        TAG_PRE_VOTE => decode_pre_vote(reader)?,
        TAG_PRE_VOTE_RESPONSE => decode_pre_vote_response(reader)?,
        TAG_VOTE => decode_vote(reader)?,
        TAG_VOTE_RESPONSE => decode_vote_response(reader)?,
        TAG_APPEND => Body::Append(decode_append(reader)?),
        TAG_APPEND_RESPONSE => Body::AppendResponse(decode_append_response(reader)?),
        TAG_START_AT => Body::StartAt(decode_start_at(reader)?),
        TAG_TIMEOUT_NOW => Body::TimeoutNow,
        TAG_TERM_QUERY => Body::TermQuery { disk_id: reader.u64("TermQuery disk_id")? },
        TAG_TERM_ANSWER => Body::TermAnswer { disk_id: reader.u64("TermAnswer disk_id")? },
        tag => return Err(ClusterFrameError::BodyTag(tag)),
    };
    Ok((key, Message { from, to, term, body }))
}

fn decode_pre_vote(reader: &mut Reader) -> Result<Body> {
    Ok(Body::PreVote {
        last_epoch: reader.i32("PreVote last_epoch")?,
        log_end: reader.i64("PreVote log_end")?,
    })
}

fn decode_pre_vote_response(reader: &mut Reader) -> Result<Body> {
    Ok(Body::PreVoteResponse { granted: reader.flag("PreVoteResponse granted")? })
}

fn decode_vote(reader: &mut Reader) -> Result<Body> {
    Ok(Body::Vote {
        last_epoch: reader.i32("Vote last_epoch")?,
        log_end: reader.i64("Vote log_end")?,
        transfer: reader.flag("Vote transfer")?,
    })
}

fn decode_vote_response(reader: &mut Reader) -> Result<Body> {
    Ok(Body::VoteResponse { granted: reader.flag("VoteResponse granted")? })
}

fn decode_append(reader: &mut Reader) -> Result<Append> {
    let prev_end = reader.i64("Append prev_end")?;
    let prev_epoch = reader.i32("Append prev_epoch")?;
    let commit_end = reader.i64("Append commit_end")?;
    let log_start = reader.i64("Append log_start")?;
    let seq = reader.u64("Append seq")?;
    // A batch takes its length (4 bytes) and at least a header.
    let count = reader.count(
        "the Append's batch count",
        "APPEND_BATCHES_MAX",
        APPEND_BATCHES_MAX,
        4 + BATCH_HEADER_BYTES,
    )?;
    let lengths = reader.slice(4 * count, "batch lengths")?;
    let mut batches = Vec::with_capacity(count);
    for length in lengths.chunks_exact(4) {
        let length = u32::from_be_bytes(length.try_into().expect("4 bytes")) as usize;
        if length < BATCH_HEADER_BYTES {
            return Err(ClusterFrameError::BatchTooShort { what: "an Append's batch", value: length });
        }
        batches.push(reader.slice(length, "batch")?);
    }
    Ok(Append { prev_end, prev_epoch, commit_end, log_start, seq, batches })
}

fn decode_start_at(reader: &mut Reader) -> Result<StartAt> {
    let start = reader.i64("StartAt start")?;
    let prev_epoch = reader.i32("StartAt prev_epoch")?;
    let commit_end = reader.i64("StartAt commit_end")?;
    let seq = reader.u64("StartAt seq")?;
    // A configuration takes its offset, its length and at least a batch header.
    let count = reader.count(
        "the StartAt's configuration count",
        "MEMBERSHIPS_MAX",
        MEMBERSHIPS_MAX,
        8 + 4 + BATCH_HEADER_BYTES,
    )?;
    let mut memberships = Vec::with_capacity(count);
    for _ in 0..count {
        let offset = reader.i64("configuration offset")?;
        let length = reader.u32("configuration batch length")? as usize;
        if length > MEMBERSHIP_BATCH_BYTES_MAX {
            return Err(ClusterFrameError::OverLimit {
                what: "a StartAt's configuration batch",
                limit: "MEMBERSHIP_BATCH_BYTES_MAX",
                value: length as u64,
                max: MEMBERSHIP_BATCH_BYTES_MAX as u64,
            });
        }
        let bytes = reader.slice(length, "configuration batch")?;
        let view =
            pyralog_replication::batch::parse(&bytes).map_err(|_| ClusterFrameError::Membership(offset))?;
        let membership =
            Membership::from_batch(&bytes, &view).ok_or(ClusterFrameError::Membership(offset))?;
        // One encoding per frame: the batch must be the one this membership encodes to, not
        // another that decodes alike (a field the decoding skips, a timestamp).
        if membership.to_batch() != bytes {
            return Err(ClusterFrameError::Membership(offset));
        }
        memberships.push((offset, membership));
    }
    Ok(StartAt { start, prev_epoch, commit_end, seq, memberships })
}

fn decode_append_response(reader: &mut Reader) -> Result<AppendResponse> {
    let accepted = reader.flag("AppendResponse accepted")?;
    let match_end = reader.i64("AppendResponse match_end")?;
    let acked_end = reader.i64("AppendResponse acked_end")?;
    let log_end = reader.i64("AppendResponse log_end")?;
    let recovering = reader.flag("AppendResponse recovering")?;
    let seq = reader.u64("AppendResponse seq")?;
    let disk_id = reader.u64("AppendResponse disk_id")?;
    let count = reader.count("the AppendResponse's epoch count", "EPOCHS_MAX", EPOCHS_MAX, EPOCH_BYTES)?;
    let mut epochs = Vec::with_capacity(count);
    for _ in 0..count {
        epochs.push(EpochStart { epoch: reader.i32("epoch")?, start_offset: reader.i64("epoch start")? });
    }
    Ok(AppendResponse { accepted, match_end, acked_end, log_end, epochs, recovering, seq, disk_id })
}

#[cfg(test)]
mod tests;
