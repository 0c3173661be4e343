//! What replicas of one group say to each other, and what the core asks of its caller.
//!
//! Messages are plain data: the network layer (a later issue) encodes them, and the simulator
//! moves them as they are. Every field read from a peer is checked by the core before it acts
//! on it: a message is never trusted to be well formed.

use bytes::Bytes;

use crate::epoch::EpochStart;
use crate::membership::Membership;

/// A replica's id within its group.
pub type ReplicaId = u32;

/// What must survive a crash before the core answers a vote or an append: the current term,
/// the vote cast in it, whether the replica is still recovering from a lost disk, and which
/// disk this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HardState {
    pub term: i32,
    pub voted_for: Option<ReplicaId>,
    /// Set when the replica came back without its data (KIP-966): it neither votes nor counts
    /// toward a write quorum until it holds everything a leader of the current term committed.
    pub recovering: bool,
    /// The disk's incarnation (KIP-853's directory id): 0 for the disk a replica started
    /// with, a random non-zero id drawn when it comes back from a lost disk (persisted with
    /// `recovering`). Appends' answers and term queries carry it, so that a leader tells what
    /// a lost disk said from what its replacement says.
    pub disk_id: u64,
}

/// One message between two replicas of a group. `term` is the sender's term, except in
/// `PreVote` (the term the sender would campaign in) and a granted `PreVoteResponse` (echoing it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub from: ReplicaId,
    pub to: ReplicaId,
    pub term: i32,
    pub body: Body,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    PreVote {
        last_epoch: i32,
        log_end: i64,
    },
    PreVoteResponse {
        granted: bool,
    },
    Vote {
        last_epoch: i32,
        log_end: i64,
        transfer: bool,
    },
    VoteResponse {
        granted: bool,
    },
    Append(Append),
    /// From the leader to a follower that needs offsets below the leader's log start: see
    /// [`StartAt`]. Answered with an [`AppendResponse`].
    StartAt(StartAt),
    AppendResponse(AppendResponse),
    /// From the leader to the replica it hands leadership to: campaign now, skipping pre-vote.
    TimeoutNow,
    /// From a replica recovering a lost disk: what is your term? (It forgot its own.)
    /// `disk_id` is the asker's new disk.
    TermQuery {
        disk_id: u64,
    },
    /// The answer: the sender's term is the message's term. `disk_id` echoes the query's, so
    /// that an answer to a query from before a later loss is not taken for a new one.
    TermAnswer {
        disk_id: u64,
    },
}

/// AppendEntries: stored batches, exactly as the leader stored them, from offset `prev_end`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Append {
    /// The offset the first batch starts at; the sender's log up to here matches the
    /// receiver's if the receiver's entry before it has epoch `prev_epoch`.
    pub prev_end: i64,
    /// The epoch of the entry holding `prev_end - 1`, or -1 when `prev_end` is 0.
    pub prev_epoch: i32,
    /// The leader's commit point (high watermark, exclusive).
    pub commit_end: i64,
    /// The leader's log start: everything below it is committed, and the leader no longer
    /// holds it. A follower may drop it too (as Kafka's followers take the log start offset
    /// of their fetch responses), so that replicas keep the same offsets.
    pub log_start: i64,
    /// Numbers the leader's appends in its term (it grows by one per append sent); the
    /// answer echoes it, so the leader can tell an answer to an append it sent before it
    /// last reset its view of the follower.
    pub seq: u64,
    pub batches: Vec<Bytes>,
}

/// The leader's log starts at `start` (retention removed what was below: every offset of it
/// committed), and the follower's log does not reach it with the same entry at `start - 1`:
/// the follower drops its log and starts it, empty, at `start`, as a Raft snapshot install
/// does for a state machine that is the log itself. Appends from `start` follow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartAt {
    /// The leader's log start, above 0.
    pub start: i64,
    /// The epoch of the entry holding `start - 1`.
    pub prev_epoch: i32,
    /// The leader's commit point (at least `start`).
    pub commit_end: i64,
    /// As an [`Append`]'s: answers echo it.
    pub seq: u64,
    /// The configurations of the leader's log from the follower's match point up to `start`
    /// (offset, membership), oldest first, at most [`crate::group::MEMBERSHIPS_SENT_MAX`]:
    /// those the follower's log may lack once it starts at `start`.
    pub memberships: Vec<(i64, Membership)>,
}

/// The answer to an [`Append`], or an unsolicited acknowledgement after a flush.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppendResponse {
    pub accepted: bool,
    /// Accepted: the receiver's log matches the leader's up to here.
    pub match_end: i64,
    /// Accepted: matches the leader's log and is durable (fdatasync'ed) up to here.
    pub acked_end: i64,
    /// Rejected: the offset up to which `epochs` describes the receiver's log.
    pub log_end: i64,
    /// Rejected: the last epochs of the receiver's log below `log_end` (at most
    /// [`crate::group::EPOCH_HINTS_MAX`]), so the leader finds the divergence in one round trip.
    pub epochs: Vec<EpochStart>,
    pub recovering: bool,
    /// The `seq` of the latest append from this leader the sender had received when it
    /// answered (the one answered, or for an acknowledgement after a flush, the last one).
    pub seq: u64,
    /// The sender's disk ([`HardState::disk_id`]).
    pub disk_id: u64,
}
