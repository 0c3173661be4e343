//! Requests between shards of different nodes, over the cluster transport: the requester's
//! table of requests waiting for their answers, the responder's queue of requests received,
//! and the calls the daemon makes ([`ClusterTransport::request`], `recv_request`, `respond`).
//! The design (which connection carries what, what bounds what) is in the parent's module doc,
//! under "Requests".
//!
//! Lives on the transport's shard, like the rest of it: nothing here is shared across cores.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::task::{Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use glommio::channels::local_channel::LocalSender;

use super::{ClusterTransport, Outgoing, Peer, PeerAddress, Shared};
use crate::cluster::frame::REQUEST_BODY_BYTES_MAX;

/// Requests of one transport waiting for their answers; more are refused
/// ([`RequestError::TooManyInFlight`]). The daemon forwards an operator's changes one or a few
/// at a time: this bounds the memory of answers on their way and the ids to match.
pub const REQUESTS_IN_FLIGHT_MAX: usize = 64;
/// The default bound of a shard's queue of received requests not yet taken by
/// [`ClusterTransport::recv_request`]; past it, a request is dropped (and counted) and its
/// requester times out.
pub const INCOMING_REQUESTS_MAX: usize = 256;

/// A request received from a peer shard, as the shard takes it from its queue. It is plain
/// data: answering it is [`ClusterTransport::respond`]; dropping it unanswered leaves nothing
/// behind here (the requester times out).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IncomingRequest {
    pub from_node: u32,
    pub from_shard: u16,
    /// The requester's id for it, which its response carries back.
    pub id: u64,
    pub body: Bytes,
    /// The requester's cluster address, where the response goes (its IP taken from the
    /// connection when the requester listens on an unspecified address).
    pub reply_to: SocketAddr,
}

/// Why a request got no answer, or a response could not be queued.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error(
        "node {node} shard {shard} did not answer within {timeout:?}: it may be down, overloaded, or \
         unable to connect back to this node's cluster address; retry, or look at that node's log"
    )]
    TimedOut { node: u32, shard: u16, timeout: Duration },
    #[error(
        "cannot connect to node {node} shard {shard} at {addr}: {error}; check that the node runs and \
         that this is its cluster address"
    )]
    Unreachable { node: u32, shard: u16, addr: SocketAddr, error: String },
    #[error(
        "the connection to node {node} shard {shard} at {addr} was lost ({error}) before the answer \
         came: the request may or may not have been carried out"
    )]
    ConnectionLost { node: u32, shard: u16, addr: SocketAddr, error: String },
    #[error("node {node} shard {shard} refused this node's connection: {reason}")]
    Refused { node: u32, shard: u16, reason: String },
    #[error(
        "node {node} shard {shard} or this node has no cluster id yet: requests flow only between \
         nodes that know they are of one cluster; retry once both have joined it"
    )]
    Unidentified { node: u32, shard: u16 },
    #[error(
        "{max} requests are already waiting for answers (REQUESTS_IN_FLIGHT_MAX): retry once some \
         are answered"
    )]
    TooManyInFlight { max: usize },
    #[error("a body of {bytes} bytes exceeds REQUEST_BODY_BYTES_MAX ({max} bytes): send less")]
    BodyTooLarge { bytes: usize, max: usize },
    #[error(
        "the queue to node {node} shard {shard} is full (or this shard already sends to \
         CLUSTER_PEERS_MAX peers): the peer is slow or unreachable; retry later"
    )]
    QueueFull { node: u32, shard: u16 },
    #[error("this shard's cluster transport is closed: the node is stopping")]
    Closed,
}

/// The requests of one transport: those waiting for answers and the sender of the queue of
/// those received.
pub(super) struct Requests {
    pending: RefCell<HashMap<u64, Rc<Pending>>>,
    next_id: Cell<u64>,
    incoming: LocalSender<IncomingRequest>,
    /// Whether the last request received was dropped: a run of drops is logged once.
    incoming_full: Cell<bool>,
}

/// A request waiting for its answer (or for the failure that means none will come).
struct Pending {
    peer: (u32, u16),
    outcome: Cell<Option<Result<Bytes, RequestError>>>,
    waker: Cell<Option<Waker>>,
}

impl Pending {
    fn settle(&self, outcome: Result<Bytes, RequestError>) {
        self.outcome.set(Some(outcome));
        if let Some(waker) = self.waker.take() {
            waker.wake();
        }
    }

    async fn outcome(&self) -> Result<Bytes, RequestError> {
        futures_lite::future::poll_fn(|cx| match self.outcome.take() {
            Some(outcome) => Poll::Ready(outcome),
            None => {
                self.waker.set(Some(cx.waker().clone()));
                Poll::Pending
            }
        })
        .await
    }
}

/// Takes a request out of the table when its `request` call ends, however it ends (answered,
/// failed, timed out, or its future dropped): nothing waits in the table for an answer that
/// no one will take.
struct InFlight<'a> {
    requests: &'a Requests,
    id: u64,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.requests.pending.borrow_mut().remove(&self.id);
    }
}

impl Requests {
    pub(super) fn new(incoming: LocalSender<IncomingRequest>) -> Requests {
        // A random first id: a response queued for an earlier run of this shard (the
        // responder keeps it while it reconnects) must not match a request of this one.
        let first_id = std::hash::BuildHasher::hash_one(&std::collections::hash_map::RandomState::new(), 0u8);
        Requests {
            pending: RefCell::new(HashMap::new()),
            next_id: Cell::new(first_id),
            incoming,
            incoming_full: Cell::new(false),
        }
    }

    /// Whether the request `id` still waits for its answer (one whose requester gave up is
    /// not sent).
    pub(super) fn is_pending(&self, id: u64) -> bool {
        self.pending.borrow().contains_key(&id)
    }

    pub(super) fn in_flight(&self) -> usize {
        self.pending.borrow().len()
    }

    /// Fails the request `id`, if it still waits.
    pub(super) fn fail(&self, id: u64, error: RequestError) {
        let pending = self.pending.borrow_mut().remove(&id);
        if let Some(pending) = pending {
            pending.settle(Err(error));
        }
    }

    /// Fails every request waiting for an answer from `peer`: its connection failed, so the
    /// answer may never come (see the parent's module doc).
    pub(super) fn fail_to(&self, peer: &Peer, error: RequestError) {
        let mut pending = self.pending.borrow_mut();
        let ids: Vec<u64> =
            pending.iter().filter(|(_, p)| p.peer == (peer.node, peer.shard)).map(|(id, _)| *id).collect();
        for id in ids {
            pending.remove(&id).expect("listed above").settle(Err(error.clone()));
        }
    }

    /// Fails every request: the transport closes.
    pub(super) fn fail_all(&self) {
        let pending = std::mem::take(&mut *self.pending.borrow_mut());
        for pending in pending.into_values() {
            pending.settle(Err(RequestError::Closed));
        }
    }
}

/// Hands a received response to its request. When no request of that id from that peer waits
/// for one (it timed out or failed, or the peer is confused), the response is dropped and
/// counted.
pub(super) fn take_response(shared: &Shared, from: (u32, u16), id: u64, body: Bytes) {
    let mut pending = shared.requests.pending.borrow_mut();
    if pending.get(&id).is_none_or(|pending| pending.peer != from) {
        shared.count(|counts| counts.responses_unknown += 1);
        return;
    }
    pending.remove(&id).expect("checked above").settle(Ok(body));
    shared.count(|counts| counts.responses_received += 1);
}

/// Puts a received request in the queue `recv_request` takes from; when the queue is full,
/// drops it (counted, and logged once per run of drops): the requester times out.
pub(super) fn take_request(shared: &Shared, request: IncomingRequest) {
    let requests = &shared.requests;
    let (from_node, from_shard) = (request.from_node, request.from_shard);
    if requests.incoming.try_send(request).is_ok() {
        requests.incoming_full.set(false);
        shared.count(|counts| counts.requests_received += 1);
        return;
    }
    shared.count(|counts| counts.requests_dropped += 1);
    if !requests.incoming_full.replace(true) {
        eprintln!(
            "pyralog: cluster: node {} shard {}: dropped a request from node {from_node} shard \
             {from_shard}: {} received requests wait to be taken (the shard is not answering \
             requests, or not fast enough); its requester will time out",
            shared.node,
            shared.shard,
            requests.incoming.len()
        );
    }
}

impl ClusterTransport {
    /// Sends `body` to the peer shard at `peer` as a request and waits for its answer's body.
    ///
    /// Fails, never waiting past `timeout` (which counts queueing, connecting and the round
    /// trip), when: no answer comes in time; the connection to the peer cannot be made, is
    /// refused (the error says why), or is lost before the answer comes (the request may then
    /// have been carried out: the caller decides whether to retry); [`REQUESTS_IN_FLIGHT_MAX`]
    /// requests already wait; the body exceeds [`REQUEST_BODY_BYTES_MAX`]; the peer's queue
    /// is full; or the transport closes. Dropping the future forgets the request: an answer
    /// that comes later is dropped and counted.
    ///
    /// Do not await it on the task that drains [`recv`](Self::recv): the answer arrives on a
    /// connection that may also carry Raft messages, read only as the inbox takes them.
    pub async fn request(
        &self,
        peer: PeerAddress,
        body: Bytes,
        timeout: Duration,
    ) -> Result<Bytes, RequestError> {
        if self.shared.is_closed() {
            return Err(RequestError::Closed);
        }
        if body.len() > REQUEST_BODY_BYTES_MAX {
            return Err(RequestError::BodyTooLarge { bytes: body.len(), max: REQUEST_BODY_BYTES_MAX });
        }
        let requests = &self.shared.requests;
        if requests.in_flight() >= REQUESTS_IN_FLIGHT_MAX {
            return Err(RequestError::TooManyInFlight { max: REQUESTS_IN_FLIGHT_MAX });
        }
        let id = requests.next_id.get();
        requests.next_id.set(id.wrapping_add(1));
        let pending = Rc::new(Pending {
            peer: (peer.node, peer.shard),
            outcome: Cell::new(None),
            waker: Cell::new(None),
        });
        let previous = requests.pending.borrow_mut().insert(id, Rc::clone(&pending));
        assert!(previous.is_none(), "request ids are unique: they only grow (modulo 2^64)");
        assert!(requests.in_flight() <= REQUESTS_IN_FLIGHT_MAX, "requests in flight are bounded");
        let _in_flight = InFlight { requests, id };
        if !self.enqueue(peer, Outgoing::Request { id, body }) {
            return Err(RequestError::QueueFull { node: peer.node, shard: peer.shard });
        }
        futures_lite::future::or(pending.outcome(), async {
            glommio::timer::sleep(timeout).await;
            Err(RequestError::TimedOut { node: peer.node, shard: peer.shard, timeout })
        })
        .await
    }

    /// The next request received, waiting for one; None once the transport is closed. The
    /// shard answers it with [`respond`](Self::respond), or not at all (its requester times
    /// out). Requests have a queue of their own, bounded by
    /// [`ClusterConfig::incoming_requests_max`](super::ClusterConfig::incoming_requests_max):
    /// taking Raft messages and taking requests do not wait on each other.
    pub async fn recv_request(&self) -> Option<IncomingRequest> {
        futures_lite::future::or(self.incoming.recv(), async {
            self.shared.until_closed().await;
            None
        })
        .await
    }

    /// Queues `body` as the answer to `request`, for its requester's shard: over the
    /// connection this shard opens to it, as for Raft messages (made if there is none yet).
    /// Never waits. Best effort, like [`send`](Self::send): an answer lost on the way (its
    /// connection fails, or it waited longer than the queue's age limit for one) leaves the
    /// requester to time out. Fails, queueing nothing, when the body exceeds
    /// [`REQUEST_BODY_BYTES_MAX`] (answer with a short error instead), the requester's queue
    /// is full (counted in `responses_dropped`), or the transport is closed.
    ///
    /// The reply address the request named becomes the address this shard uses for the
    /// requester's shard from its next connection on (as any address passed to `send` does).
    pub fn respond(&self, request: &IncomingRequest, body: Bytes) -> Result<(), RequestError> {
        if self.shared.is_closed() {
            return Err(RequestError::Closed);
        }
        if body.len() > REQUEST_BODY_BYTES_MAX {
            return Err(RequestError::BodyTooLarge { bytes: body.len(), max: REQUEST_BODY_BYTES_MAX });
        }
        let to = PeerAddress { node: request.from_node, shard: request.from_shard, addr: request.reply_to };
        if !self.enqueue(to, Outgoing::Response { id: request.id, body }) {
            self.shared.count(|counts| counts.responses_dropped += 1);
            return Err(RequestError::QueueFull { node: to.node, shard: to.shard });
        }
        Ok(())
    }

    /// Requests sent and waiting for their answers (at most [`REQUESTS_IN_FLIGHT_MAX`]).
    pub fn requests_in_flight(&self) -> usize {
        self.shared.requests.in_flight()
    }
}
