//! The node-to-node transport of one shard: Raft messages to and from the replicas of its
//! groups on other nodes, and requests with their responses (the daemon's small RPC: a node
//! forwards topic changes and node registrations to the controller's leader), over TCP.
//!
//! One [`ClusterTransport`] per shard, on that shard's glommio executor (`Rc`, never sent
//! across cores). It listens on the shard's own cluster address, and keeps one outgoing
//! connection per peer shard it sends to, each written by a task of its own from a queue of
//! its own. Connections are one-way: a shard sends on the connections it opened and receives
//! on those it accepted, so the answer to a message (or to a request) travels on another
//! connection than the message did.
//!
//! What it is not: it knows neither groups (a [`GroupKey`] is opaque), nor which peer holds
//! which replica (the shard says where each message goes), nor what a message or a request's
//! body means.
//!
//! # Delivery
//! Best effort, in order per connection, never blocking the caller: Raft tolerates lost,
//! duplicated and reordered messages and resends what matters (heartbeats, appends from the
//! follower's acknowledged end, votes on the next timeout), so the transport drops rather
//! than waits or grows. [`ClusterTransport::send`] only queues; a message is dropped (and
//! counted in [`ClusterCounts::messages_dropped`]) when its peer's queue is full
//! ([`CLUSTER_QUEUE_MESSAGES_MAX`], [`CLUSTER_QUEUE_BYTES_MAX`]), when it waited longer than
//! [`CLUSTER_QUEUE_AGE_MAX`] while its peer was unreachable, or when a connection fails with
//! it written but not yet read by the peer (TCP says nothing of those).
//!
//! **A tick is one frame per peer.** The writer task of a peer runs only when the shard's
//! task that calls `send` yields, and then takes everything queued at that moment into one
//! Messages frame (more only past [`CLUSTER_FRAME_BYTES_MAX`]): the heartbeats that every
//! group sends during one tick of the shard's loop leave as one frame, usually in one system call.
//! Batch bytes are never copied: they leave from the buffers the caller's `Bytes` share
//! (a vectored `sendmsg`), and arrive as slices of the received frame.
//!
//! # Receiving
//! Accepted connections read Hello, answer by `identity::answer_hello` (Refused with a
//! reason and a close for another node, cluster or shard; a Welcome and a close for a query
//! or a peer without a cluster id), then read Messages frames and put every message in the
//! shard's inbox ([`ClusterTransport::recv`]), bounded by [`ClusterConfig::inbox_messages_max`]:
//! when it is full, the connections' readers wait, and TCP pushes back on the senders.
//! A frame that does not decode (damaged, oversized, unknown) closes its connection alone.
//! The shard must drain its inbox every tick: a reader held back longer than the sender's
//! [`WRITE_TIMEOUT`] makes the sender give the connection up (and what it had written is lost).
//! Order holds per connection only: after a reconnection, messages of the old connection still
//! being read may arrive after some of the new one's, which Raft tolerates as reordering.
//!
//! # Requests
//! [`ClusterTransport::request`] queues a Request frame (an id, an opaque body of at most
//! [`REQUEST_BODY_BYTES_MAX`](super::frame::REQUEST_BODY_BYTES_MAX), and this shard's cluster address to reply to) for the peer
//! shard like a message, and waits for the Response of the same id. The peer takes it from a
//! queue of its own ([`ClusterTransport::recv_request`]) and answers with
//! [`ClusterTransport::respond`], which queues the Response for the requester's shard, at
//! the address the request named (its IP taken from the connection when that address is
//! unspecified), over the peer's own outgoing connection, made then if there was none.
//!
//! **Why the answer takes the responder's connection**, not the one the request came on:
//! connections stay one-way, so each has one writer and one reader and nothing new to
//! order. A bidirectional connection would need its acceptor to write while it reads and
//! its opener to read while it writes, or two shards each writing a large frame to the other
//! while neither reads would stall until [`WRITE_TIMEOUT`]. This way responses reuse the
//! queues, writers, handshake and backoff that Raft's answers already use, and a responder
//! that never sent Raft messages to the requester simply starts a writer for it. The cost:
//! a request carries its reply address (a few bytes), a responder opens a connection back
//! (once; it stays for later ones and for Raft), and a requester the responder cannot reach
//! gets no answers: the reachability Raft needs between the two anyway.
//!
//! Bounds and failures. At most [`REQUESTS_IN_FLIGHT_MAX`] requests of a transport wait for
//! answers (more are refused at once), and each waits at most its caller's timeout, which
//! ends it whatever happens; the table of waiting requests drops each one when its call ends,
//! however it ends. A request fails before its timeout when its peer's connection cannot be
//! made, is refused (with the peer's reason) or is lost (the request may or may not have
//! been carried out), and when the transport closes. A request whose call ended before it
//! left is not sent. Received requests go to a queue of their own, bounded by
//! [`ClusterConfig::incoming_requests_max`], without waiting: when it is full the request is
//! dropped, counted and logged (once per run of drops), and its requester times out. So
//! requests never wait on the Raft inbox, nor Raft messages on requests, beyond the order of
//! frames on one connection: a request or response read after a Messages frame waits for
//! that frame's messages to enter the inbox, which is why a shard must not await a request
//! on the task that drains its inbox. A Response goes to the request of its id only if it
//! comes from the shard the request went to; otherwise (the request timed out or failed)
//! it is dropped and counted ([`ClusterCounts::responses_unknown`]). Ids start at a random
//! value per transport and grow, so an answer queued for an earlier run of a shard matches
//! nothing in the next. A response waits in its peer's queue like a message (bounded, and
//! dropped after [`CLUSTER_QUEUE_AGE_MAX`] while the peer is unreachable).
//!
//! # Connections and failures
//! A peer's writer connects (within [`CONNECT_TIMEOUT`]), sends Hello and waits for the
//! answer (within [`HANDSHAKE_TIMEOUT`]); on any failure or refusal it closes, waits a
//! backoff ([`RECONNECT_BACKOFF_MIN`] doubling to [`RECONNECT_BACKOFF_MAX`]) and tries again.
//! A connection's state changes (connected, lost, refused with its reason, peer without a
//! cluster id) are logged once each, not per retry. A write that cannot progress for
//! [`WRITE_TIMEOUT`] (a peer that stopped reading) fails the connection, and so do bytes left
//! unacknowledged that long (a peer whose host is gone, which sends no FIN).
//!
//! Invariants: every queue is bounded (per peer in messages and bytes, the inbox in
//! messages, received requests in requests); connections accepted at once are at most
//! [`CLUSTER_CONNECTIONS_MAX`] and peers written to at most [`CLUSTER_PEERS_MAX`]; messages
//! and requests are delivered only from a peer whose cluster id is known and equal to ours;
//! at most one outgoing connection per peer shard; requests waiting for answers are at most
//! [`REQUESTS_IN_FLIGHT_MAX`], and each waits no longer than its timeout.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, RawFd};
use std::rc::Rc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::channels::local_channel::{self, LocalReceiver, LocalSender};
use glommio::net::{TcpListener, TcpStream};
use pyralog_replication::{Body, Message};

use super::frame::{
    self, ClusterFrameError, ClusterId, Frame, GroupKey, Hello, MessagesEncoder, CLUSTER_FRAME_BYTES_MAX,
    HANDSHAKE_FRAME_BYTES_MAX, LENGTH_PREFIX_BYTES,
};
use super::identity::{self, HelloAnswer};
use crate::ports::Sharing;

mod requests;

use requests::Requests;
pub use requests::{IncomingRequest, RequestError, INCOMING_REQUESTS_MAX, REQUESTS_IN_FLIGHT_MAX};

/// Messages queued for one peer shard.
pub const CLUSTER_QUEUE_MESSAGES_MAX: usize = 1 << 16;
/// Bytes queued for one peer shard (batches and epochs, plus 64 a message for the rest): a few appends' pipelining window
/// ([`APPEND_IN_FLIGHT_BYTES_MAX`](pyralog_replication::group::APPEND_IN_FLIGHT_BYTES_MAX),
/// 4 MiB) for each of several groups.
pub const CLUSTER_QUEUE_BYTES_MAX: usize = 32 << 20;
/// A message queued for an unreachable peer is dropped after this: by then Raft has sent a
/// newer one (a heartbeat, a retried append or vote).
pub const CLUSTER_QUEUE_AGE_MAX: Duration = Duration::from_secs(1);
/// Peer shards one shard sends to (one outgoing connection each).
pub const CLUSTER_PEERS_MAX: usize = 1024;
/// Connections one shard's listener serves at once; more are closed on accept.
pub const CLUSTER_CONNECTIONS_MAX: usize = 1024;
/// The default bound of a shard's inbox.
pub const INBOX_MESSAGES_MAX: usize = 4096;
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long either side waits for the other's handshake frame.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a write may wait for room in the socket before the connection is given up.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
pub const RECONNECT_BACKOFF_MIN: Duration = Duration::from_millis(20);
pub const RECONNECT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Chunks one `sendmsg` takes (far below the kernel's IOV_MAX of 1024).
const IOVECS_MAX: usize = 64;

/// What a shard's transport is.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// This node's id.
    pub node: u32,
    /// This shard's index on its node.
    pub shard: u16,
    /// This shard's own cluster address (port 0: any free one, see
    /// [`ClusterTransport::local_addr`]).
    pub listen: SocketAddr,
    /// The cluster's id, shared by the node's components: None until the node has one. It
    /// may be set while the transport runs; each connection uses the value its handshake saw.
    pub cluster_id: Rc<Cell<Option<ClusterId>>>,
    /// The term of this node's controller replica, told in every Welcome (0 by default; the
    /// daemon keeps it current on shard 0, which answers the seeds' queries).
    pub controller_term: Rc<Cell<i32>>,
    /// Messages received and not yet taken by [`ClusterTransport::recv`].
    pub inbox_messages_max: usize,
    /// Requests received and not yet taken by [`ClusterTransport::recv_request`].
    pub incoming_requests_max: usize,
}

impl ClusterConfig {
    pub fn new(node: u32, shard: u16, listen: SocketAddr, cluster_id: Rc<Cell<Option<ClusterId>>>) -> Self {
        ClusterConfig {
            node,
            shard,
            listen,
            cluster_id,
            controller_term: Rc::new(Cell::new(0)),
            inbox_messages_max: INBOX_MESSAGES_MAX,
            incoming_requests_max: INCOMING_REQUESTS_MAX,
        }
    }
}

/// Where a peer shard listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerAddress {
    pub node: u32,
    pub shard: u16,
    pub addr: SocketAddr,
}

/// A message from a peer, as the shard takes it from its inbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub from_node: u32,
    pub from_shard: u16,
    pub key: GroupKey,
    pub message: Message,
}

/// What a shard's transport has done since it started, for the shard's metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClusterCounts {
    pub frames_sent: u64,
    pub bytes_sent: u64,
    pub messages_sent: u64,
    pub frames_received: u64,
    pub bytes_received: u64,
    pub messages_received: u64,
    /// Queue full, too old while the peer was unreachable, or too large for a frame.
    pub messages_dropped: u64,
    /// Failed connects and handshakes, lost connections, and incoming connections closed for
    /// an error (one that sent a frame that does not decode, or too many at once).
    pub connection_errors: u64,
    /// Incoming frames that did not decode (their connection was closed).
    pub frames_rejected: u64,
    /// Our handshakes that peers refused.
    pub refused_by_peers: u64,
    /// Handshakes we refused.
    pub refused_peers: u64,
    /// Request frames written (a request whose requester gave up before it left is not).
    pub requests_sent: u64,
    /// Requests received and queued for [`ClusterTransport::recv_request`].
    pub requests_received: u64,
    /// Requests received and dropped: their queue was full.
    pub requests_dropped: u64,
    /// Response frames written.
    pub responses_sent: u64,
    /// Responses received and handed to their waiting request.
    pub responses_received: u64,
    /// Responses received that no request waited for (it had timed out or failed): dropped.
    pub responses_unknown: u64,
    /// Responses not queued (their queue was full) or dropped from it (too old while their
    /// peer was unreachable).
    pub responses_dropped: u64,
}

/// One shard's node-to-node transport. See the module doc.
pub struct ClusterTransport {
    shared: Rc<Shared>,
    local_addr: SocketAddr,
    inbox: LocalReceiver<Received>,
    incoming: LocalReceiver<IncomingRequest>,
    peers: RefCell<HashMap<(u32, u16), Rc<Peer>>>,
    acceptor: RefCell<Option<glommio::Task<()>>>,
    writers: RefCell<Vec<glommio::Task<()>>>,
}

/// What the transport's tasks share.
struct Shared {
    node: u32,
    shard: u16,
    /// The listener's address: where peers send their responses to our requests.
    local_addr: SocketAddr,
    cluster_id: Rc<Cell<Option<ClusterId>>>,
    controller_term: Rc<Cell<i32>>,
    inbox: LocalSender<Received>,
    requests: Requests,
    counts: Cell<ClusterCounts>,
    /// Never has permits: `close` closes it, which wakes every task waiting on it.
    closed: glommio::sync::Semaphore,
    is_closed: Cell<bool>,
    connections: Cell<usize>,
    /// The last error an incoming connection was closed for, logged when it changes.
    last_incoming_error: RefCell<String>,
    /// Told the node of every established connection that ends (see
    /// [`ClusterTransport::set_peer_lost_hook`]).
    peer_lost: RefCell<Option<PeerLostHook>>,
}

/// Told the node id of a peer whose established connection ended.
pub type PeerLostHook = Rc<dyn Fn(u32)>;

impl Shared {
    fn count(&self, change: impl FnOnce(&mut ClusterCounts)) {
        let mut counts = self.counts.get();
        change(&mut counts);
        self.counts.set(counts);
    }

    fn is_closed(&self) -> bool {
        self.is_closed.get()
    }

    fn close(&self) {
        self.is_closed.set(true);
        self.closed.close();
        self.requests.fail_all();
    }

    /// Resolves once the transport is closed.
    async fn until_closed(&self) {
        let _ = self.closed.acquire(1).await;
    }
}

impl ClusterTransport {
    /// Binds the shard's cluster address and starts accepting connections.
    pub fn start(config: ClusterConfig) -> io::Result<Rc<ClusterTransport>> {
        assert!(config.inbox_messages_max > 0, "an inbox holds at least one message");
        assert!(config.incoming_requests_max > 0, "the request queue holds at least one request");
        let listener = crate::ports::bind(config.listen, Sharing::Exclusive)?;
        let local_addr = listener.local_addr()?;
        // SAFETY: the fd is a bound, listening TCP socket whose ownership moves to glommio.
        let listener = unsafe { TcpListener::from_raw_fd(listener.into_raw_fd()) };
        let (sender, inbox) = local_channel::new_bounded(config.inbox_messages_max);
        let (requests, incoming) = local_channel::new_bounded(config.incoming_requests_max);
        let shared = Rc::new(Shared {
            node: config.node,
            shard: config.shard,
            local_addr,
            cluster_id: config.cluster_id,
            controller_term: config.controller_term,
            inbox: sender,
            requests: Requests::new(requests),
            counts: Cell::new(ClusterCounts::default()),
            closed: glommio::sync::Semaphore::new(0),
            is_closed: Cell::new(false),
            connections: Cell::new(0),
            last_incoming_error: RefCell::new(String::new()),
            peer_lost: RefCell::new(None),
        });
        let acceptor = glommio::spawn_local(accept(Rc::clone(&shared), listener));
        Ok(Rc::new(ClusterTransport {
            shared,
            local_addr,
            inbox,
            incoming,
            peers: RefCell::new(HashMap::new()),
            acceptor: RefCell::new(Some(acceptor)),
            writers: RefCell::new(Vec::new()),
        }))
    }

    /// Sets what is told the peer's node id whenever an established connection to one of its
    /// shards ends (closed, reset, or timed out by TCP_USER_TIMEOUT): the daemon lets the
    /// replicas following that node start an election without waiting out their timeout.
    pub fn set_peer_lost_hook(&self, hook: PeerLostHook) {
        *self.shared.peer_lost.borrow_mut() = Some(hook);
    }

    /// The address the listener is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Queues `message` of group `key` for the peer shard at `peer`. Never waits: the message
    /// is dropped and counted when the peer's queue is full (Raft resends; see the module
    /// doc). Messages sent before the calling task yields leave together in one frame. The
    /// first message to a peer starts its writer; a changed address is used from the next
    /// connection on.
    pub fn send(&self, peer: PeerAddress, key: GroupKey, message: Message) {
        if !self.enqueue(peer, Outgoing::Message(key, message)) && !self.shared.is_closed() {
            self.shared.count(|counts| counts.messages_dropped += 1);
        }
    }

    /// Queues `item` for the peer shard at `address`; false, queueing nothing, when the
    /// transport is closed, the peers are at [`CLUSTER_PEERS_MAX`] or the peer's queue is full.
    fn enqueue(&self, address: PeerAddress, item: Outgoing) -> bool {
        if self.shared.is_closed() {
            return false;
        }
        let Some(to) = self.peer(address) else { return false };
        let now = Instant::now();
        if !to.connected.get() {
            to.drop_older_than(&self.shared, now);
        }
        let bytes = item.queued_bytes();
        let mut queue = to.queue.borrow_mut();
        if queue.len() >= CLUSTER_QUEUE_MESSAGES_MAX
            || to.queued_bytes.get() + bytes > CLUSTER_QUEUE_BYTES_MAX
        {
            return false;
        }
        queue.push_back(Queued { item, bytes, at: now });
        to.queued_bytes.set(to.queued_bytes.get() + bytes);
        assert!(queue.len() <= CLUSTER_QUEUE_MESSAGES_MAX, "the queue is bounded in messages");
        assert!(to.queued_bytes.get() <= CLUSTER_QUEUE_BYTES_MAX, "the queue is bounded in bytes");
        to.doorbell.ring();
        true
    }

    /// The peer's state, made (and its writer started) on first use; None past
    /// [`CLUSTER_PEERS_MAX`].
    fn peer(&self, address: PeerAddress) -> Option<Rc<Peer>> {
        let mut peers = self.peers.borrow_mut();
        if let Some(peer) = peers.get(&(address.node, address.shard)) {
            peer.addr.set(address.addr);
            return Some(Rc::clone(peer));
        }
        if peers.len() >= CLUSTER_PEERS_MAX {
            return None;
        }
        let peer = Rc::new(Peer::new(address));
        peers.insert((address.node, address.shard), Rc::clone(&peer));
        let writer = glommio::spawn_local(write_to_peer(Rc::clone(&self.shared), Rc::clone(&peer)));
        self.writers.borrow_mut().push(writer);
        Some(peer)
    }

    /// The next message received, waiting for one; None once the transport is closed.
    pub async fn recv(&self) -> Option<Received> {
        futures_lite::future::or(self.inbox.recv(), async {
            self.shared.until_closed().await;
            None
        })
        .await
    }

    /// Everything the transport has counted since it started.
    pub fn counts(&self) -> ClusterCounts {
        self.shared.counts.get()
    }

    /// Why the peer shard last refused our handshake, if it ever did.
    pub fn last_refusal(&self, node: u32, shard: u16) -> Option<String> {
        self.peers.borrow().get(&(node, shard)).and_then(|peer| peer.last_refusal.borrow().clone())
    }

    /// Whether the connection to the peer shard is up (its handshake succeeded).
    pub fn is_connected(&self, node: u32, shard: u16) -> bool {
        self.peers.borrow().get(&(node, shard)).is_some_and(|peer| peer.connected.get())
    }

    /// Messages queued for the peer shard and not yet written.
    pub fn queued(&self, node: u32, shard: u16) -> usize {
        self.peers.borrow().get(&(node, shard)).map_or(0, |peer| peer.queue.borrow().len())
    }

    /// Stops listening, writing and delivering: the listener is closed (its port free again)
    /// when this returns; connections close as their tasks see it, on the executor's next
    /// turns. Queued messages are dropped. Dropping the transport without `close` stops it
    /// too, but leaves the listener to the kernel until its pending accept is cancelled.
    pub async fn close(&self) {
        if self.shared.is_closed() {
            return;
        }
        self.shared.close();
        let acceptor = self.acceptor.borrow_mut().take();
        if let Some(acceptor) = acceptor {
            // The acceptor sees the close once its pending accept completes: complete it with
            // a connection of our own, so that no accept is left to the kernel.
            let mut own = self.local_addr;
            if own.ip().is_unspecified() {
                own.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
            }
            match TcpStream::connect_timeout(own, CONNECT_TIMEOUT).await {
                Ok(_) => acceptor.await,
                Err(_) => drop(acceptor),
            }
        }
        let writers = std::mem::take(&mut *self.writers.borrow_mut());
        for writer in writers {
            writer.await;
        }
        self.peers.borrow_mut().clear();
    }
}

impl Drop for ClusterTransport {
    fn drop(&mut self) {
        self.shared.close();
    }
}

/// What a queued message counts against its peer's [`CLUSTER_QUEUE_BYTES_MAX`]: its batches
/// and epochs, and a fixed allowance for its other fields (a close upper bound of its
/// encoding, cheaper to compute than the encoding itself).
pub(crate) fn queued_bytes(message: &Message) -> usize {
    const FIELDS_BYTES: usize = 64;
    match &message.body {
        Body::Append(append) => {
            FIELDS_BYTES + append.batches.iter().map(|batch| 4 + batch.len()).sum::<usize>()
        }
        Body::AppendResponse(response) => FIELDS_BYTES + 12 * response.epochs.len(),
        _ => FIELDS_BYTES,
    }
}

// ---------------------------------------------------------------------------------------------
// Sending

struct Queued {
    item: Outgoing,
    bytes: usize,
    at: Instant,
}

/// What a peer's queue holds, in the order it leaves.
enum Outgoing {
    Message(GroupKey, Message),
    /// Ours, waiting for its answer in `Shared::requests` (it leaves only while it does).
    Request {
        id: u64,
        body: Bytes,
    },
    /// Our answer to the peer's request `id`.
    Response {
        id: u64,
        body: Bytes,
    },
}

impl Outgoing {
    /// What it counts against its peer's [`CLUSTER_QUEUE_BYTES_MAX`].
    fn queued_bytes(&self) -> usize {
        const FIELDS_BYTES: usize = 64;
        match self {
            Outgoing::Message(_, message) => queued_bytes(message),
            Outgoing::Request { body, .. } | Outgoing::Response { body, .. } => FIELDS_BYTES + body.len(),
        }
    }
}

/// What one frame taken from a peer's queue holds.
#[derive(Debug, Default)]
struct Taken {
    frames: u64,
    bytes: u64,
    messages: u64,
    requests: u64,
    responses: u64,
}

/// One peer shard we send to: its queue and its connection's state.
struct Peer {
    node: u32,
    shard: u16,
    addr: Cell<SocketAddr>,
    queue: RefCell<VecDeque<Queued>>,
    queued_bytes: Cell<usize>,
    doorbell: Doorbell,
    connected: Cell<bool>,
    /// The connection's state, as last logged.
    state: RefCell<PeerState>,
    last_refusal: RefCell<Option<String>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum PeerState {
    Starting,
    Connected,
    /// Connecting failed, or the connection was lost.
    Down(String),
    Refused(String),
    /// The handshake found one side without a cluster id.
    Unidentified,
}

impl Peer {
    fn new(address: PeerAddress) -> Peer {
        Peer {
            node: address.node,
            shard: address.shard,
            addr: Cell::new(address.addr),
            queue: RefCell::new(VecDeque::new()),
            queued_bytes: Cell::new(0),
            doorbell: Doorbell::default(),
            connected: Cell::new(false),
            state: RefCell::new(PeerState::Starting),
            last_refusal: RefCell::new(None),
        }
    }

    /// Records the connection's new state, logging it if it is a change: a retry that fails
    /// as the last one did says nothing.
    fn set_state(&self, shared: &Shared, new: PeerState) {
        self.connected.set(new == PeerState::Connected);
        if let PeerState::Refused(reason) = &new {
            *self.last_refusal.borrow_mut() = Some(reason.clone());
        }
        let mut state = self.state.borrow_mut();
        let same_kind = std::mem::discriminant(&*state) == std::mem::discriminant(&new);
        let unchanged = match (&*state, &new) {
            (PeerState::Refused(before), PeerState::Refused(now)) => before == now,
            _ => same_kind,
        };
        if unchanged {
            return;
        }
        let what = match (&*state, &new) {
            (_, PeerState::Connected) => "connected".to_owned(),
            (PeerState::Connected, PeerState::Down(error)) => {
                format!("connection lost ({error}); reconnecting")
            }
            (_, PeerState::Down(error)) => format!("cannot connect ({error}); retrying"),
            (_, PeerState::Refused(reason)) => format!("refused: {reason}"),
            (_, PeerState::Unidentified) => {
                "the handshake found a side without a cluster id; retrying until both have one".to_owned()
            }
            (_, PeerState::Starting) => unreachable!("no connection goes back to starting"),
        };
        eprintln!(
            "pyralog: cluster: node {} shard {} -> node {} shard {} ({}): {what}",
            shared.node,
            shared.shard,
            self.node,
            self.shard,
            self.addr.get()
        );
        *state = new;
    }

    /// Drops what was queued before `now - CLUSTER_QUEUE_AGE_MAX` (the queue is in arrival
    /// order). A dropped request fails at once: it will not leave.
    fn drop_older_than(&self, shared: &Shared, now: Instant) {
        let mut queue = self.queue.borrow_mut();
        while queue.front().is_some_and(|queued| now.duration_since(queued.at) > CLUSTER_QUEUE_AGE_MAX) {
            let queued = queue.pop_front().expect("front checked");
            self.queued_bytes.set(self.queued_bytes.get() - queued.bytes);
            match queued.item {
                Outgoing::Message(..) => shared.count(|counts| counts.messages_dropped += 1),
                Outgoing::Response { .. } => shared.count(|counts| counts.responses_dropped += 1),
                Outgoing::Request { id, .. } => shared.requests.fail(
                    id,
                    RequestError::Unreachable {
                        node: self.node,
                        shard: self.shard,
                        addr: self.addr.get(),
                        error: format!("no connection within {CLUSTER_QUEUE_AGE_MAX:?}"),
                    },
                ),
            }
        }
    }

    /// Moves what is queued into one frame's chunks: the messages at the queue's front, up to
    /// a Messages frame's limits, or else the request or response there, a frame of its own.
    /// A request whose requester gave up is dropped instead. Returns what the frame holds
    /// (nothing, when only such requests were queued).
    fn take_frame(&self, shared: &Shared, chunks: &mut Vec<Bytes>) -> Taken {
        let mut encoder = MessagesEncoder::new();
        let mut single = None;
        let mut queue = self.queue.borrow_mut();
        while let Some(queued) = queue.front() {
            let alone = match &queued.item {
                Outgoing::Message(key, message) => {
                    let fits = encoder.push(key, message);
                    if !fits && !encoder.is_empty() {
                        break;
                    }
                    if !fits {
                        // Alone over the frame's limit: it can never be sent.
                        shared.count(|counts| counts.messages_dropped += 1);
                    }
                    false
                }
                _ if !encoder.is_empty() => break,
                Outgoing::Request { id, .. } => shared.requests.is_pending(*id),
                Outgoing::Response { .. } => true,
            };
            let queued = queue.pop_front().expect("front checked");
            self.queued_bytes.set(self.queued_bytes.get() - queued.bytes);
            if alone {
                single = Some(queued.item);
                break;
            }
        }
        assert!(encoder.frame_bytes() <= LENGTH_PREFIX_BYTES + CLUSTER_FRAME_BYTES_MAX, "frames are bounded");
        assert!(!queue.is_empty() || self.queued_bytes.get() == 0, "queued bytes are counted exactly");
        let chunks_before = chunks.len();
        let mut taken = Taken { frames: 1, ..Taken::default() };
        match single {
            Some(Outgoing::Request { id, body }) => {
                frame::encode(&Frame::Request { id, reply_to: shared.local_addr, body }, chunks);
                taken.requests = 1;
            }
            Some(Outgoing::Response { id, body }) => {
                frame::encode(&Frame::Response { id, body }, chunks);
                taken.responses = 1;
            }
            Some(Outgoing::Message(..)) => unreachable!("messages go into the Messages frame"),
            None if encoder.is_empty() => return Taken::default(),
            None => {
                taken.messages = encoder.len() as u64;
                encoder.finish(chunks);
            }
        }
        taken.bytes = chunks[chunks_before..].iter().map(|chunk| chunk.len() as u64).sum();
        taken
    }
}

/// Wakes one waiting task; a ring with no one waiting is kept for the next wait.
#[derive(Default)]
struct Doorbell {
    rung: Cell<bool>,
    waiter: Cell<Option<Waker>>,
}

impl Doorbell {
    fn ring(&self) {
        self.rung.set(true);
        if let Some(waker) = self.waiter.take() {
            waker.wake();
        }
    }

    fn wait(&self) -> impl Future<Output = ()> + '_ {
        futures_lite::future::poll_fn(|cx| {
            if self.rung.replace(false) {
                return Poll::Ready(());
            }
            self.waiter.set(Some(cx.waker().clone()));
            Poll::Pending
        })
    }
}

/// A peer's writer: connects, shakes hands, writes what is queued, and reconnects after any
/// failure, until the transport closes.
async fn write_to_peer(shared: Rc<Shared>, peer: Rc<Peer>) {
    let run = async {
        let mut backoff = RECONNECT_BACKOFF_MIN;
        loop {
            match connect(&shared, &peer).await {
                Ok(stream) => {
                    peer.set_state(&shared, PeerState::Connected);
                    backoff = RECONNECT_BACKOFF_MIN;
                    let lost = pump(&shared, &peer, stream).await;
                    shared.count(|counts| counts.connection_errors += 1);
                    let hook = shared.peer_lost.borrow().clone();
                    if let Some(hook) = hook.filter(|_| !shared.is_closed()) {
                        hook(peer.node);
                    }
                    let (node, shard, addr) = (peer.node, peer.shard, peer.addr.get());
                    let error = RequestError::ConnectionLost { node, shard, addr, error: lost.clone() };
                    shared.requests.fail_to(&peer, error);
                    peer.set_state(&shared, PeerState::Down(lost));
                }
                Err(Handshake::Refused(reason)) => {
                    shared.count(|counts| counts.refused_by_peers += 1);
                    let error =
                        RequestError::Refused { node: peer.node, shard: peer.shard, reason: reason.clone() };
                    shared.requests.fail_to(&peer, error);
                    peer.set_state(&shared, PeerState::Refused(reason));
                }
                Err(Handshake::Unidentified) => {
                    let error = RequestError::Unidentified { node: peer.node, shard: peer.shard };
                    shared.requests.fail_to(&peer, error);
                    peer.set_state(&shared, PeerState::Unidentified);
                }
                Err(Handshake::Failed(error)) => {
                    shared.count(|counts| counts.connection_errors += 1);
                    let (node, shard, addr) = (peer.node, peer.shard, peer.addr.get());
                    let failed = RequestError::Unreachable { node, shard, addr, error: error.clone() };
                    shared.requests.fail_to(&peer, failed);
                    peer.set_state(&shared, PeerState::Down(error));
                }
            }
            peer.drop_older_than(&shared, Instant::now());
            glommio::timer::sleep(backoff).await;
            backoff = (backoff * 2).min(RECONNECT_BACKOFF_MAX);
        }
    };
    futures_lite::future::or(run, shared.until_closed()).await;
}

enum Handshake {
    Refused(String),
    Unidentified,
    Failed(String),
}

impl From<Fault> for Handshake {
    fn from(fault: Fault) -> Self {
        Handshake::Failed(fault.to_string())
    }
}

/// How often a connection made from a given source address is looked at while it connects.
const CONNECT_POLL_INTERVAL: Duration = Duration::from_millis(1);

/// Connects to `to`, from this node's own address when its listener has one (not the
/// unspecified address): peers then see node-to-node traffic come from the address the node
/// is known by, as firewalls (and the fault tests' iptables rules) expect. glommio connects
/// only from the default address, so such a connection is made non-blocking here and looked
/// at until it is up, within [`CONNECT_TIMEOUT`].
async fn connect_from(local: SocketAddr, to: SocketAddr) -> io::Result<TcpStream> {
    if local.ip().is_unspecified() || local.is_ipv4() != to.is_ipv4() {
        return TcpStream::connect_timeout(to, CONNECT_TIMEOUT).await.map_err(io::Error::from);
    }
    let socket = socket2::Socket::new(socket2::Domain::for_address(to), socket2::Type::STREAM, None)?;
    socket.bind(&SocketAddr::new(local.ip(), 0).into())?;
    socket.set_nonblocking(true)?;
    match socket.connect(&to.into()) {
        Ok(()) => {}
        Err(error) if error.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(error) => return Err(error),
    }
    let deadline = Instant::now() + CONNECT_TIMEOUT;
    loop {
        if let Some(error) = socket.take_error()? {
            return Err(error);
        }
        if socket.peer_addr().is_ok() {
            break;
        }
        if Instant::now() >= deadline {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "connection timed out"));
        }
        glommio::timer::sleep(CONNECT_POLL_INTERVAL).await;
    }
    socket.set_nonblocking(false)?;
    // SAFETY: the descriptor is ours: taken out of the socket, which forgets it.
    Ok(unsafe { TcpStream::from_raw_fd(socket.into_raw_fd()) })
}

async fn connect(shared: &Shared, peer: &Peer) -> Result<TcpStream, Handshake> {
    let io = |error: glommio::GlommioError<()>| Handshake::Failed(io::Error::from(error).to_string());
    let mut stream = connect_from(shared.local_addr, peer.addr.get())
        .await
        .map_err(|error| Handshake::Failed(error.to_string()))?;
    stream.set_nodelay(true).map_err(io)?;
    stream.set_write_timeout(Some(WRITE_TIMEOUT)).map_err(io)?;
    give_up_unacknowledged(&stream).map_err(|error| Handshake::Failed(error.to_string()))?;
    let ours = shared.cluster_id.get();
    let hello = Hello {
        cluster_id: ours,
        from_node: shared.node,
        from_shard: shared.shard,
        to_node: peer.node,
        to_shard: peer.shard,
    };
    let hello = frame::encode_to_bytes(&Frame::Hello(hello));
    stream.write_all(&hello).await.map_err(|error| Handshake::Failed(error.to_string()))?;
    let fd = stream.as_raw_fd();
    let mut buffer = BytesMut::new();
    let answer =
        within(HANDSHAKE_TIMEOUT, read_frame(&mut stream, fd, &mut buffer, Limit::HANDSHAKE)).await?;
    let Some(answer) = answer else { return Err(Handshake::Failed("closed during the handshake".into())) };
    match frame::decode_body(answer).map_err(Fault::Frame)? {
        Frame::Welcome(welcome) if welcome.node != peer.node => {
            Err(Handshake::Failed(format!("the peer answered as node {}", welcome.node)))
        }
        Frame::Welcome(welcome) => match (ours, welcome.cluster_id) {
            (Some(ours), Some(theirs)) if ours == theirs => Ok(stream),
            (Some(ours), Some(theirs)) => Err(Handshake::Refused(format!(
                "node {} answered for cluster {}, this node belongs to cluster {}",
                peer.node,
                identity::cluster_id_hex(&theirs),
                identity::cluster_id_hex(&ours)
            ))),
            _ => Err(Handshake::Unidentified),
        },
        Frame::Refused { reason } => Err(Handshake::Refused(reason)),
        other => Err(Handshake::Failed(format!("expected Welcome or Refused, got {}", other.kind_name()))),
    }
}

/// Makes the kernel fail the connection when what it sent stays unacknowledged for
/// [`WRITE_TIMEOUT`] (TCP_USER_TIMEOUT): a peer whose host died or dropped off the network
/// sends no FIN, and its socket would otherwise take our writes for minutes (the
/// retransmission timeout) before anything failed.
fn give_up_unacknowledged(stream: &TcpStream) -> io::Result<()> {
    // SAFETY: the fd is the stream's, open while `stream` lives, which outlives this call.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(stream.as_raw_fd()) };
    socket2::SockRef::from(&fd).set_tcp_user_timeout(Some(WRITE_TIMEOUT))
}

/// Writes what the peer's queue holds, a frame at a time, until the connection fails.
/// Returns why it failed.
async fn pump(shared: &Shared, peer: &Peer, mut stream: TcpStream) -> String {
    let fd = stream.as_raw_fd();
    let mut chunks = Vec::new();
    loop {
        if peer.queue.borrow().is_empty() {
            // Wait for messages, watching the connection meanwhile: the acceptor sends
            // nothing after its Welcome, so a read ending is the peer closing or failing.
            let mut byte = [0; 1];
            let read = futures_lite::future::or(
                async {
                    peer.doorbell.wait().await;
                    None
                },
                async { Some(stream.read(&mut byte).await) },
            )
            .await;
            match read {
                None => continue,
                Some(Ok(0)) => return "closed by the peer".to_owned(),
                Some(Ok(_)) => return "the peer sent bytes after its Welcome".to_owned(),
                Some(Err(error)) => return error.to_string(),
            }
        }
        let taken = peer.take_frame(shared, &mut chunks);
        if let Err(error) = write_chunks(&mut stream, fd, &chunks).await {
            return error.to_string();
        }
        chunks.clear();
        shared.count(|counts| {
            counts.frames_sent += taken.frames;
            counts.bytes_sent += taken.bytes;
            counts.messages_sent += taken.messages;
            counts.requests_sent += taken.requests;
            counts.responses_sent += taken.responses;
        });
    }
}

/// Writes `chunks` in order: as many as the socket takes at once in one `sendmsg`, waiting
/// (through glommio, bounded by the stream's write timeout) only when it takes nothing.
async fn write_chunks(stream: &mut TcpStream, fd: RawFd, chunks: &[Bytes]) -> io::Result<()> {
    let (mut index, mut offset) = (0, 0);
    while index < chunks.len() {
        let sent = match send_now(fd, &chunks[index..], offset)? {
            Some(sent) => sent,
            None => stream.write(&chunks[index][offset..]).await?,
        };
        if sent == 0 && chunks[index].len() > offset {
            return Err(io::ErrorKind::WriteZero.into());
        }
        let mut left = sent;
        while index < chunks.len() && left >= chunks[index].len() - offset {
            left -= chunks[index].len() - offset;
            (index, offset) = (index + 1, 0);
        }
        offset += left;
    }
    assert_eq!((index, offset), (chunks.len(), 0), "every chunk was written whole");
    Ok(())
}

/// One non-blocking `sendmsg` of up to [`IOVECS_MAX`] chunks, the first from `offset`.
/// `Ok(None)`: the socket has no room now.
fn send_now(fd: RawFd, chunks: &[Bytes], offset: usize) -> io::Result<Option<usize>> {
    let mut iovecs = [libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; IOVECS_MAX];
    let count = chunks.len().min(IOVECS_MAX);
    for (iovec, (i, chunk)) in iovecs.iter_mut().zip(chunks.iter().enumerate()) {
        let bytes = if i == 0 { &chunk[offset..] } else { &chunk[..] };
        *iovec = libc::iovec { iov_base: bytes.as_ptr() as *mut libc::c_void, iov_len: bytes.len() };
    }
    // SAFETY: msghdr is plain data; all-zero is a valid empty header.
    let mut header: libc::msghdr = unsafe { std::mem::zeroed() };
    header.msg_iov = iovecs.as_mut_ptr();
    header.msg_iovlen = count as _;
    loop {
        // SAFETY: the iovecs point into `chunks`, which outlive the call; the kernel only
        // reads them.
        let sent = unsafe { libc::sendmsg(fd, &header, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
        if let Ok(sent) = usize::try_from(sent) {
            return Ok(Some(sent));
        }
        let error = io::Error::last_os_error();
        match error.kind() {
            io::ErrorKind::WouldBlock => return Ok(None),
            io::ErrorKind::Interrupted => continue,
            _ => return Err(error),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Receiving

/// Accepts connections until the transport closes.
///
/// There is no timer or close racing the accept: a dropped in-flight io_uring accept keeps
/// the listener open in the kernel until its cancellation completes, so `close` completes the
/// last accept with a connection of its own instead.
async fn accept(shared: Rc<Shared>, listener: TcpListener) {
    loop {
        let accepted = listener.accept().await;
        if shared.is_closed() {
            return;
        }
        let stream = match accepted {
            Ok(stream) => stream,
            Err(error) => {
                eprintln!(
                    "pyralog: cluster: node {} shard {}: accept failed: {error}",
                    shared.node, shared.shard
                );
                glommio::timer::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        if shared.connections.get() >= CLUSTER_CONNECTIONS_MAX {
            shared.count(|counts| counts.connection_errors += 1);
            continue;
        }
        shared.connections.set(shared.connections.get() + 1);
        let shared = Rc::clone(&shared);
        glommio::spawn_local(async move {
            let served = futures_lite::future::or(serve(&shared, stream), async {
                shared.until_closed().await;
                Ok(())
            })
            .await;
            if let Err(fault) = served {
                incoming_failed(&shared, fault);
            }
            shared.connections.set(shared.connections.get() - 1);
        })
        .detach();
    }
}

/// Counts an incoming connection's failure, and logs it unless it is the same as the last.
fn incoming_failed(shared: &Shared, fault: Fault) {
    shared.count(|counts| {
        counts.connection_errors += 1;
        counts.frames_rejected += u64::from(matches!(fault, Fault::Frame(_)));
    });
    let line = fault.to_string();
    let mut last = shared.last_incoming_error.borrow_mut();
    if *last != line {
        eprintln!(
            "pyralog: cluster: node {} shard {}: closed an incoming connection: {line}",
            shared.node, shared.shard
        );
        *last = line;
    }
}

/// Why a connection stopped.
#[derive(Debug, thiserror::Error)]
enum Fault {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("{0}")]
    Frame(#[from] ClusterFrameError),
    #[error("{0}")]
    Protocol(String),
}

/// Serves one accepted connection: its handshake, then its messages.
async fn serve(shared: &Shared, mut stream: TcpStream) -> Result<(), Fault> {
    stream.set_nodelay(true).map_err(io::Error::from)?;
    stream.set_write_timeout(Some(HANDSHAKE_TIMEOUT)).map_err(io::Error::from)?;
    let fd = stream.as_raw_fd();
    let mut buffer = BytesMut::new();
    let Some(hello) =
        within(HANDSHAKE_TIMEOUT, read_frame(&mut stream, fd, &mut buffer, Limit::HANDSHAKE)).await?
    else {
        return Ok(());
    };
    let hello = match frame::decode_body(hello)? {
        Frame::Hello(hello) => hello,
        other => return Err(Fault::Protocol(format!("expected Hello, got {}", other.kind_name()))),
    };
    let answer = identity::answer_hello(&hello, shared.node, shared.shard, shared.cluster_id.get());
    let (answer, take_messages) = match answer {
        HelloAnswer::Refuse(reason) => {
            shared.count(|counts| counts.refused_peers += 1);
            (Frame::Refused { reason }, false)
        }
        HelloAnswer::Welcome { mut welcome, take_messages } => {
            welcome.controller_term = shared.controller_term.get();
            (Frame::Welcome(welcome), take_messages)
        }
    };
    stream.write_all(&frame::encode_to_bytes(&answer)).await?;
    if !take_messages {
        return Ok(());
    }
    while let Some(body) = read_frame(&mut stream, fd, &mut buffer, Limit::MESSAGES).await? {
        let bytes = (LENGTH_PREFIX_BYTES + body.len()) as u64;
        shared.count(|counts| {
            counts.frames_received += 1;
            counts.bytes_received += bytes;
        });
        let (from_node, from_shard) = (hello.from_node, hello.from_shard);
        match frame::decode_body(body)? {
            Frame::Messages(entries) => {
                for (key, message) in entries {
                    let received = Received { from_node, from_shard, key, message };
                    if shared.inbox.send(received).await.is_err() {
                        return Ok(()); // the transport is gone
                    }
                    shared.count(|counts| counts.messages_received += 1);
                }
            }
            Frame::Request { id, mut reply_to, body } => {
                if reply_to.ip().is_unspecified() {
                    // The requester listens on every address: answer the one it came from.
                    reply_to.set_ip(stream.peer_addr().map_err(io::Error::from)?.ip());
                }
                let request = IncomingRequest { from_node, from_shard, id, body, reply_to };
                requests::take_request(shared, request);
            }
            Frame::Response { id, body } => {
                requests::take_response(shared, (from_node, from_shard), id, body);
            }
            other => {
                let kind = other.kind_name();
                return Err(Fault::Protocol(format!("expected Messages, Request or Response, got {kind}")));
            }
        }
    }
    Ok(())
}

/// A frame length limit, named in its error.
struct Limit {
    name: &'static str,
    bytes: usize,
}

impl Limit {
    const HANDSHAKE: Limit = Limit { name: "HANDSHAKE_FRAME_BYTES_MAX", bytes: HANDSHAKE_FRAME_BYTES_MAX };
    const MESSAGES: Limit = Limit { name: "CLUSTER_FRAME_BYTES_MAX", bytes: CLUSTER_FRAME_BYTES_MAX };
}

/// Reads the next frame (what follows its length), refusing one over `limit` by its length
/// alone; None when the peer closed between frames.
async fn read_frame(
    stream: &mut TcpStream,
    fd: RawFd,
    buffer: &mut BytesMut,
    limit: Limit,
) -> Result<Option<Bytes>, Fault> {
    loop {
        if let Some(prefix) = buffer.get(..LENGTH_PREFIX_BYTES) {
            let length = frame::frame_length(prefix.try_into().expect("length checked"));
            frame::check_frame_length(length, limit.name, limit.bytes)?;
            if let Some(body) = crate::server::cut_frame(buffer, LENGTH_PREFIX_BYTES, length) {
                return Ok(Some(body));
            }
        }
        if crate::server::read_more(stream, fd, buffer).await? == 0 {
            return match buffer.is_empty() {
                true => Ok(None),
                false => {
                    Err(Fault::Protocol(format!("closed in the middle of a frame ({} bytes)", buffer.len())))
                }
            };
        }
    }
}

/// `future`, or a timeout error after `timeout`.
async fn within<T>(timeout: Duration, future: impl Future<Output = Result<T, Fault>>) -> Result<T, Fault> {
    futures_lite::future::or(future, async {
        glommio::timer::sleep(timeout).await;
        Err(Fault::Io(io::Error::new(io::ErrorKind::TimedOut, format!("no handshake within {timeout:?}"))))
    })
    .await
}

#[cfg(test)]
mod tests;
