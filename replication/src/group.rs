//! `RaftGroup`: the sans-IO Raft core of one partition replica.
//!
//! It takes inputs (messages from peers, ticks of a logical clock, notices from its log, and
//! proposals) and pushes actions onto a caller's `Vec<Action>`: messages to send, batches to
//! append, a truncation, a hard state to persist, the commit point, role changes. The caller
//! performs them in order. It reads the leader's own log through [`LogRead`] to fill appends.
//! It owns no clock, socket, file, thread or global random source: the election jitter comes
//! from the `XorShiftRng` the caller seeds.
//!
//! Invariants this module owns:
//! - the term and vote are persisted before any message leaves: while a `PersistHardState`
//!   is not confirmed by a matching `HardStatePersisted` notice, sends are held, in order;
//! - a leader counts replicas only for offsets above the start of its own epoch (its
//!   epoch-start batch), and only durable offsets: its own `durable_end`, and a follower's
//!   `acked_end`, which the follower bounds by its own durable offset;
//! - the commit point (`high_watermark`) never moves back, and the log is never truncated at
//!   or below it: an append that would do so is ignored, whoever sent it; nor inside one of
//!   its batches: an append whose previous point or first conflict falls inside a held batch
//!   is refused when the log can read that batch now (`is_batch_boundary`; otherwise the
//!   epoch check stands alone, enough for sound leaders, and the storage refuses a cut inside
//!   a batch anyway), as is a message over its limits (`within_limits`);
//! - the current term only grows; the epochs of the log only grow along it;
//! - a replica that lost its disk (`recovering`) neither votes, campaigns nor counts toward a
//!   write quorum until it has learned the term of every voter it knows of (among them any
//!   candidate its lost disk voted for: see `terms_known`) and holds, durably, its leader's
//!   epoch-start batch and commit point; its vote in that term is that leader, so it votes
//!   again only in later terms, which its lost disk never reached;
//! - a leader raises a follower's `acked_end`, or clears its `recovering` mark, only on an
//!   answer from the disk it last adopted for it (`disk_id`, new on every lost disk) to an
//!   append sent since it last reset its view of it (`reset_seq`: a new disk, a rejection),
//!   never on an answer that may predate the follower's last loss of data;
//! - while a membership change is joint, every quorum (commit, election, check-quorum) is
//!   met in both voter sets; learners never campaign and never count; one change at a time,
//!   and only once the leader has committed in its own term;
//! - a vote's log check binds every replica that is or was a voter of a configuration its
//!   log holds (`log_is_behind`).

use std::collections::VecDeque;

use bytes::Bytes;
use rand_core::Rng;
use rand_xorshift::XorShiftRng;

use crate::batch;
use crate::epoch::EpochHistory;
use crate::error::{ReplicationError, Result};
use crate::membership::{Membership, VoterSet};
use crate::message::{Append, AppendResponse, Body, HardState, Message, ReplicaId, StartAt};
use crate::quorum::Quorum;

/// Bytes of batches in one AppendEntries message (at least one batch is always sent).
pub const APPEND_BYTES_MAX: usize = 1 << 20;
/// Bytes of batches in flight, unacknowledged, to one follower: the pipelining window.
pub const APPEND_IN_FLIGHT_BYTES_MAX: usize = 4 << 20;
/// AppendEntries messages in flight to one follower.
pub const APPEND_IN_FLIGHT_MESSAGES_MAX: usize = 8;
/// Batches in one received AppendEntries message: a sound leader sends at most
/// `APPEND_BYTES_MAX` bytes of batches, each at least a header long.
pub const APPEND_BATCHES_MAX: usize = APPEND_BYTES_MAX / batch::HEADER_BYTES;
/// Epochs a follower reports when it rejects an append (see `EpochHistory::common_end`); a
/// rejection carrying more is ignored.
pub const EPOCH_HINTS_MAX: usize = 8;
/// Bytes one proposal may carry.
pub const PROPOSAL_BYTES_MAX: usize = 8 << 20;
/// Configurations a [`StartAt`] carries at most: a leader whose log holds more below its
/// start does not send one (the follower stays behind; no group of the daemon changes its
/// membership yet), rather than hand a follower part of the history its votes rest on.
pub const MEMBERSHIPS_SENT_MAX: usize = 64;

/// Reads the leader's own stored batches to fill AppendEntries.
pub trait LogRead {
    /// Pushes onto `batches` whole stored batches starting with the one holding
    /// `from_offset`, at most `bytes_max` bytes in all but at least one batch when the log
    /// holds `from_offset`. Pushes nothing when it cannot (the follower is retried later).
    fn read(&self, from_offset: i64, bytes_max: usize, batches: &mut Vec<Bytes>);
}

/// The leader's log with a proposal it just stamped, which the shell has not stored yet.
struct WithProposal<'a> {
    log: &'a dyn LogRead,
    base: i64,
    batches: &'a [Bytes],
}

impl LogRead for WithProposal<'_> {
    fn read(&self, from_offset: i64, bytes_max: usize, batches: &mut Vec<Bytes>) {
        if from_offset < self.base {
            self.log.read(from_offset, bytes_max, batches);
            return;
        }
        let mut bytes = 0;
        for b in self.batches {
            let view = batch::parse(b).expect("stamped from a checked batch");
            if view.end_offset() <= from_offset {
                continue;
            }
            if !batches.is_empty() && bytes + b.len() > bytes_max {
                return;
            }
            bytes += b.len();
            batches.push(b.clone());
        }
    }
}

/// The role of a replica in its current term.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Follower,
    PreCandidate,
    Candidate,
    Leader,
}

/// What the caller must do, in the order given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Send(Message),
    /// Append these stamped batches at the log's end, then flush them and report `Durable`.
    Append {
        batches: Vec<Bytes>,
    },
    /// Cut the log at `end_offset` (a batch boundary). `truncations` counts cuts so far:
    /// `Durable` notices of flushes that started before this one must carry the old count.
    Truncate {
        end_offset: i64,
        truncations: u64,
    },
    /// Drop the whole log and start it, empty, at `start` (the leader's log starts there;
    /// every offset below is committed and held by the others): then report `Durable` with
    /// `end_offset: start` and these `truncations` once that is on disk. Until then a crash
    /// may bring back the old log, which is as good as before.
    StartLog {
        start: i64,
        truncations: u64,
    },
    /// Persist this hard state (fdatasync) and report `HardStatePersisted` with it.
    PersistHardState(HardState),
    /// The commit point moved: consumers may read below `high_watermark`.
    Commit {
        high_watermark: i64,
    },
    /// The replica's role or known leader changed.
    Role {
        term: i32,
        role: Role,
        leader: Option<ReplicaId>,
    },
}

/// What the log tells the core.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogNotice {
    /// Everything below `end_offset` is fdatasync'ed; the flush started after `truncations`
    /// truncations (a stale count is ignored: it may describe cut-off data).
    Durable {
        end_offset: i64,
        truncations: u64,
    },
    HardStatePersisted(HardState),
}

/// Bugs the simulator must catch, compiled only for tests and the `sim` feature.
#[cfg(any(test, feature = "sim"))]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlantedBug {
    /// Commit an entry of an earlier term by counting replicas (Raft's figure 8).
    CommitEarlierTerm,
    /// A follower acknowledges offsets it has not flushed.
    AckBeforeDurable,
    /// A membership change swaps a voter in one step, without the joint configuration.
    SkipJointConsensus,
    /// A replica not a voter of its newest configuration votes without the log check,
    /// though it may be a demoted voter holding committed entries (see `log_is_behind`).
    LearnerVotesBlind,
    /// The log may be trimmed past the commit point (retention cutting what is not
    /// committed yet), so a follower may be told to start its log past it.
    TrimPastCommit,
}

/// The configuration of one replica of a group.
#[derive(Debug, Clone)]
pub struct Config {
    pub id: ReplicaId,
    /// The initial voters; their count is the replication factor. Configuration batches in
    /// the log (see [`crate::membership`]) override them.
    pub voters: Vec<ReplicaId>,
    pub quorum: Quorum,
    /// The initial learners: they receive the log but do not vote or count.
    pub learners: Vec<ReplicaId>,
    pub heartbeat_ticks: u32,
    /// The election timeout is drawn from `[election_ticks, 2 * election_ticks)`.
    pub election_ticks: u32,
    #[cfg(any(test, feature = "sim"))]
    pub planted_bug: Option<PlantedBug>,
}

impl Config {
    /// A configuration with these voters and no learners (no planted bug in test builds).
    pub fn new(
        id: ReplicaId,
        voters: Vec<ReplicaId>,
        quorum: Quorum,
        heartbeat_ticks: u32,
        election_ticks: u32,
    ) -> Config {
        Config {
            id,
            voters,
            quorum,
            learners: Vec::new(),
            heartbeat_ticks,
            election_ticks,
            #[cfg(any(test, feature = "sim"))]
            planted_bug: None,
        }
    }

    fn validate(&self) -> Result<()> {
        let refuse = |reason: String| Err(ReplicationError::Config { reason });
        let membership = self.membership();
        membership.validate()?;
        if !membership.is_member(self.id) {
            return refuse(format!("replica {} is neither a voter nor a learner: {membership:?}", self.id));
        }
        if self.heartbeat_ticks == 0 || self.election_ticks <= self.heartbeat_ticks {
            return refuse(format!(
                "election timeout {} ticks must exceed the heartbeat interval {} ticks (> 0)",
                self.election_ticks, self.heartbeat_ticks
            ));
        }
        Ok(())
    }

    fn membership(&self) -> Membership {
        let set = VoterSet { voters: self.voters.clone(), quorum: self.quorum };
        Membership { sets: vec![set], learners: self.learners.clone() }
    }
}

/// What the replica recovered from its disk at start.
#[derive(Debug, Clone, Default)]
pub struct Restore {
    pub hard_state: HardState,
    /// The epochs of the whole log, below its start too (the history is kept whole when the
    /// log is trimmed; after a [`Action::StartLog`], the epochs below the commit point then
    /// known and the one holding the new start's previous offset).
    pub epochs: EpochHistory,
    /// The recovered log's first offset (retention removed what was below it, or the log was
    /// started there): every offset below it is committed.
    pub log_start: i64,
    /// The recovered log's end; everything below it is durable.
    pub log_end: i64,
    /// The replica was a member but found no data: it recovers before voting (KIP-966).
    pub disk_lost: bool,
    /// The configuration batches of the log: (offset, membership), oldest first; below the
    /// log's start too (the shell keeps those it trims, and those a `StartAt` carried).
    pub memberships: Vec<(i64, Membership)>,
    /// A commit point the replica knew before it stopped (0 if it kept none), at most
    /// `log_end`: the shell may checkpoint the `Commit` actions it carried out, as Kafka's
    /// high-watermark checkpoint does, and clamp the value to the recovered log, whose
    /// batches below it are the committed ones. Nothing below it is cut again.
    pub high_watermark: i64,
}

/// The leader's view of one follower.
#[derive(Debug, Clone)]
struct Progress {
    id: ReplicaId,
    /// The next offset to send.
    next: i64,
    /// The follower's log matches ours up to here.
    match_end: i64,
    /// ... and is durable up to here.
    acked_end: i64,
    /// Its answers are not counted yet: it says it recovers a lost disk, or its view was
    /// just started on a disk (`adopt_disk`) and no later answer confirmed it.
    recovering: bool,
    /// Whether its last answer said it recovers a lost disk (false before any answer: a
    /// replica recovering one neither votes nor campaigns). What operators and the in-sync
    /// replicas see; `recovering` is what the commit point counts.
    says_recovering: bool,
    /// The follower's disk, as its answers last said; None until one answer counted.
    disk_id: Option<u64>,
    /// Answers to appends numbered below this were sent before the view above was last
    /// reset (a rejection, a new disk): they may describe data the follower no longer has.
    reset_seq: u64,
    /// Sent and unanswered: (end offset, bytes).
    in_flight: VecDeque<(i64, usize)>,
    in_flight_bytes: usize,
    /// After a rejection: one append at a time until one is accepted.
    probing: bool,
    /// Where the probe started (our log's end for a new view, else where a refusal's epochs
    /// or a new disk's answer said to look): while probing, heartbeats ask there and a stall
    /// sends again from there, not from `match_end`, which is 0 for a follower never heard
    /// in this term (a heartbeat at 0 always matches, and the answer then sent it the whole
    /// log again: a restarted old leader caught up from offset 0).
    probe_from: i64,
    last_heard_tick: u64,
    last_progress_tick: u64,
    /// The last tick as of which the follower's durable log held all of ours (Kafka's
    /// lastCaughtUpTime): none since this view of it started.
    caught_up_tick: Option<u64>,
    /// Our log's end at a tick: once the follower's durable log reaches it, it was caught up
    /// as of that tick, and the mark moves to our log's end now. A follower that streams
    /// behind a steady load reaches each mark a round trip after it was set; one far behind
    /// reaches none for as long as it is far behind.
    caught_up_mark: (i64, u64),
    /// When the last append (heartbeat or not) left for this follower: a heartbeat is
    /// skipped when one went out within the interval, as Redpanda's heartbeat manager does.
    /// A commit point that moved after the last append reaches the follower with the next
    /// append or heartbeat, at most two intervals later.
    sent_tick: u64,
}

/// The Raft core of one partition replica. See the module docs.
#[derive(Debug)]
pub struct RaftGroup {
    config: Config,
    rng: XorShiftRng,
    hard: HardState,
    persist_pending: bool,
    held: Vec<Message>,
    role: Role,
    leader: Option<ReplicaId>,
    epochs: EpochHistory,
    /// The log's first offset: every offset below it is committed, and held by no read.
    log_start: i64,
    log_end: i64,
    durable_end: i64,
    truncations: u64,
    high_watermark: i64,
    /// Follower: our log matches the current leader's up to here.
    verified_end: i64,
    /// The log start the leader last said it has (see [`Append::log_start`]); 0 until one
    /// did.
    leader_log_start: i64,
    ticks: u64,
    election_deadline_tick: u64,
    heartbeat_deadline_tick: u64,
    check_quorum_deadline_tick: u64,
    last_leader_contact_tick: Option<u64>,
    /// Follower: the shell lost its connection to this leader (`peer_unreachable`); until the
    /// tick given, its messages neither renew our lease nor put our election off.
    leader_unreachable: Option<(ReplicaId, u64)>,
    /// The voters the shell says are just back, this replica perhaps among them (see
    /// [`RaftGroup::set_campaign_last`]).
    campaign_last: Vec<ReplicaId>,
    votes: Vec<(ReplicaId, bool)>,
    progress: Vec<Progress>,
    /// Leader: handing over to this replica until the tick given; the TimeoutNow was sent.
    transfer: Option<(ReplicaId, u64, bool)>,
    /// Recovering: the voters whose term we learned since start.
    terms_heard: Vec<ReplicaId>,
    /// Recovering: the largest term those answers carried.
    term_learned_max: i32,
    /// Leader: the `seq` of the next append sent.
    append_seq: u64,
    /// Follower: the largest `seq` received from the current leader in this term.
    leader_seq: u64,
    /// (offset of its configuration batch, membership), oldest first; the initial one from
    /// the config sits at offset -1. The last one applies.
    memberships: Vec<(i64, Membership)>,
}

impl RaftGroup {
    /// A replica from what it recovered. Pushes the hard-state persist a lost disk needs.
    pub fn new(
        config: Config,
        restore: Restore,
        rng: XorShiftRng,
        out: &mut Vec<Action>,
    ) -> Result<RaftGroup> {
        config.validate()?;
        if restore.log_end < 0
            || restore.epochs.starts().last().is_some_and(|s| s.start_offset >= restore.log_end)
            || !(0..=restore.log_end).contains(&restore.high_watermark)
            || !(0..=restore.log_end).contains(&restore.log_start)
            || restore.log_start > 0
                && restore.epochs.epoch_at(restore.log_start - 1, restore.log_end).is_none()
            || restore.disk_lost && (restore.high_watermark > 0 || restore.log_start > 0)
        {
            return Err(ReplicationError::Config {
                reason: format!(
                    "recovered epochs {:?}, log start {} or commit point {} do not fit log end {}",
                    restore.epochs, restore.log_start, restore.high_watermark, restore.log_end
                ),
            });
        }
        let mut memberships = vec![(-1, config.membership())];
        for (offset, membership) in restore.memberships {
            let grows =
                memberships.last().is_some_and(|(last, _)| *last < offset) && offset < restore.log_end;
            if !grows || membership.validate().is_err() {
                return Err(ReplicationError::Config {
                    reason: format!("recovered membership at {offset} refused"),
                });
            }
            memberships.push((offset, membership));
        }
        let mut group = RaftGroup {
            config,
            rng,
            hard: restore.hard_state,
            persist_pending: false,
            held: Vec::new(),
            role: Role::Follower,
            leader: None,
            epochs: restore.epochs,
            log_start: restore.log_start,
            leader_log_start: 0,
            log_end: restore.log_end,
            durable_end: restore.log_end,
            truncations: 0,
            // Everything below the log's start was committed.
            high_watermark: restore.high_watermark.max(restore.log_start),
            verified_end: 0,
            ticks: 0,
            election_deadline_tick: 0,
            heartbeat_deadline_tick: 0,
            check_quorum_deadline_tick: 0,
            last_leader_contact_tick: None,
            leader_unreachable: None,
            campaign_last: Vec::new(),
            votes: Vec::new(),
            progress: Vec::new(),
            transfer: None,
            terms_heard: Vec::new(),
            term_learned_max: 0,
            append_seq: 0,
            leader_seq: 0,
            memberships,
        };
        if restore.disk_lost && !group.hard.recovering {
            // A new disk: a new incarnation, so that what the lost one said is told apart.
            group.hard.recovering = true;
            group.hard.disk_id = group.rng.next_u64().max(1);
            group.persist(out);
        }
        group.reset_election_deadline();
        Ok(group)
    }

    pub fn id(&self) -> ReplicaId {
        self.config.id
    }
    pub fn role(&self) -> Role {
        self.role
    }
    pub fn term(&self) -> i32 {
        self.hard.term
    }
    pub fn hard_state(&self) -> HardState {
        self.hard
    }
    pub fn leader(&self) -> Option<ReplicaId> {
        self.leader
    }
    pub fn high_watermark(&self) -> i64 {
        self.high_watermark
    }
    /// The log start the leader this replica last heard from last said it has: below it,
    /// every offset is committed, and the shell may cut this replica's log there once it is
    /// committed and durable here too ([`RaftGroup::trim`]). 0 until a leader said one.
    pub fn leader_log_start(&self) -> i64 {
        self.leader_log_start
    }

    pub fn log_start(&self) -> i64 {
        self.log_start
    }
    pub fn log_end(&self) -> i64 {
        self.log_end
    }
    pub fn durable_end(&self) -> i64 {
        self.durable_end
    }
    pub fn epochs(&self) -> &EpochHistory {
        &self.epochs
    }
    pub fn recovering(&self) -> bool {
        self.hard.recovering
    }

    fn reset_election_deadline(&mut self) {
        let span = u64::from(self.config.election_ticks);
        self.election_deadline_tick = self.ticks + span + self.rng.next_u64() % span;
    }

    fn persist(&mut self, out: &mut Vec<Action>) {
        self.persist_pending = true;
        out.push(Action::PersistHardState(self.hard));
    }

    fn send_with_term(&mut self, to: ReplicaId, term: i32, body: Body, out: &mut Vec<Action>) {
        debug_assert!(to != self.config.id, "a replica never messages itself");
        let message = Message { from: self.config.id, to, term, body };
        if self.persist_pending {
            self.held.push(message);
        } else {
            out.push(Action::Send(message));
        }
    }

    fn send(&mut self, to: ReplicaId, body: Body, out: &mut Vec<Action>) {
        self.send_with_term(to, self.hard.term, body, out);
    }

    /// The membership in force: the last configuration in the log.
    pub fn membership(&self) -> &Membership {
        &self.memberships.last().expect("the initial membership is never removed").1
    }

    /// Every other member, learners included.
    fn peers(&self) -> Vec<ReplicaId> {
        self.membership().members().into_iter().filter(|m| *m != self.config.id).collect()
    }

    fn voter_peers(&self) -> Vec<ReplicaId> {
        self.membership().voters().into_iter().filter(|m| *m != self.config.id).collect()
    }

    fn set_role(&mut self, role: Role, leader: Option<ReplicaId>, out: &mut Vec<Action>) {
        if self.role != role || self.leader != leader {
            self.role = role;
            self.leader = leader;
            out.push(Action::Role { term: self.hard.term, role, leader });
        }
    }

    /// Moves to `term` (not below ours) as a follower of `leader`, if known.
    fn become_follower(&mut self, term: i32, leader: Option<ReplicaId>, out: &mut Vec<Action>) {
        assert!(term >= self.hard.term, "terms only grow: {} to {term}", self.hard.term);
        if term > self.hard.term {
            self.hard.term = term;
            self.hard.voted_for = None;
            self.verified_end = 0;
            self.leader_seq = 0;
            self.leader_unreachable = None;
            self.persist(out);
        }
        self.progress.clear();
        self.votes.clear();
        self.transfer = None;
        self.set_role(Role::Follower, leader, out);
        self.reset_election_deadline();
    }

    /// The shell lost its connection to `peer` (its process died, or the network reset it). A
    /// follower of `peer` stops counting on it at once instead of after an election timeout:
    /// it drops its leader's lease and brings its election forward, staggered by its rank
    /// among the other voters (a quarter of an election timeout apart, so followers that lost
    /// the leader together do not split the vote: the first asks, the others grant, having
    /// dropped their leases too). Safety is untouched (pre-vote and vote run as always), and so
    /// is a live leader: a replica that still hears it refuses the pre-vote (its own lease).
    ///
    /// For an election timeout from now, messages from `peer` neither restore the lease nor
    /// put the election off: what a dead leader sent before it died may still be on its way
    /// (read from the socket, in the shell's inbox), and one restoring the lease would make
    /// this follower refuse the pre-vote of the one whose turn came first, so both waited a
    /// whole timeout (a kill -9 failover took 170-250 ms in one round of 30, not ~20). A leader
    /// that is alive is heard as usual after that; its appends are taken meanwhile.
    pub fn peer_unreachable(&mut self, peer: ReplicaId) {
        if self.role != Role::Follower || self.leader != Some(peer) {
            return;
        }
        self.last_leader_contact_tick = None;
        self.leader_unreachable = Some((peer, self.ticks + u64::from(self.config.election_ticks)));
        self.campaign_soon(peer, true);
    }

    /// The shell names the voters that are just back (their nodes restarted, or were counted
    /// down, a moment ago), this replica among them if its node is: when replicas bring an
    /// election forward (`campaign_soon`), those go after the others, so that a failover
    /// lands, where it can, on a node clients have been reaching (clients that failed to
    /// reach a node while it was down may back off for seconds before trying it again). Only
    /// when an election happens moves, never whether one is safe.
    pub fn set_campaign_last(&mut self, voters: Vec<ReplicaId>) {
        self.campaign_last = voters;
    }

    /// What the shell last named with [`RaftGroup::set_campaign_last`].
    pub fn campaign_last(&self) -> &[ReplicaId] {
        &self.campaign_last
    }

    /// Brings our election forward to the next tick, staggered by our rank (a quarter of an
    /// election timeout apart) so that replicas doing it at once do not split the vote: our
    /// position among the voters but `absent`. With `by_return` (the leader is lost: any of
    /// us may take over), the rank counts only the voters ahead of us not named just back
    /// (`set_campaign_last`), and if we are named it comes after every other voter's whatever
    /// their view (our position plus their number), so views that differ on who is back
    /// never give two replicas one rank unless they differ on a replica's own restart.
    /// Without (we refused a shorter log: we are the better candidate), position alone.
    fn campaign_soon(&mut self, absent: ReplicaId, by_return: bool) {
        let mut voters = self.membership().voters();
        voters.retain(|v| *v != absent);
        let me = self.config.id;
        let last = |v: &ReplicaId| by_return && self.campaign_last.contains(v);
        let rank = match voters.iter().position(|v| *v == me) {
            None => voters.len(),
            Some(position) if last(&me) => voters.len() + position,
            Some(position) => voters[..position].iter().filter(|v| !last(v)).count(),
        } as u64;
        let soon = 1 + rank * u64::from((self.config.election_ticks / 4).max(1));
        self.election_deadline_tick = self.election_deadline_tick.min(self.ticks + soon);
    }

    /// The shell removed the log below `start` (retention): it may, once every offset below
    /// it is committed and durable here. `start` must be a batch boundary (a closed segment's
    /// end is one). A follower that needs offsets below it is then told to start its log
    /// there ([`StartAt`]). Refused, changing nothing, past the commit point or the durable
    /// end, or below the log's start.
    pub fn trim(&mut self, start: i64) -> Result<()> {
        #[allow(unused_mut)]
        let mut bound = self.high_watermark.min(self.durable_end);
        #[cfg(any(test, feature = "sim"))]
        if self.config.planted_bug == Some(PlantedBug::TrimPastCommit) {
            bound = self.durable_end;
        }
        if start < self.log_start || start > bound {
            return Err(ReplicationError::Config {
                reason: format!(
                    "the log cannot start at {start}: it starts at {}, and only offsets committed and \
                     durable here (below {bound}) may be removed",
                    self.log_start
                ),
            });
        }
        self.log_start = start;
        Ok(())
    }

    /// Advances the logical clock by one tick.
    pub fn tick(&mut self, log: &dyn LogRead, out: &mut Vec<Action>) {
        self.ticks += 1;
        if self.hard.recovering && self.ticks.is_multiple_of(u64::from(self.config.heartbeat_ticks)) {
            self.query_terms(out);
        }
        if self.role != Role::Leader {
            if self.ticks >= self.election_deadline_tick {
                self.start_pre_vote(log, out);
            }
            return;
        }
        if let Some((_, deadline, _)) = self.transfer {
            if self.ticks >= deadline {
                self.transfer = None;
            }
        }
        if self.ticks >= self.check_quorum_deadline_tick {
            self.check_quorum_deadline_tick = self.ticks + u64::from(self.config.election_ticks);
            if !self.heard_from_election_quorum() {
                let term = self.hard.term;
                self.become_follower(term, None, out);
                return;
            }
        }
        if self.ticks >= self.heartbeat_deadline_tick {
            self.heartbeat_deadline_tick = self.ticks + u64::from(self.config.heartbeat_ticks);
            self.heartbeat(log, out);
        }
    }

    /// A replica that lost its disk forgot its term and its votes: until it has learned the
    /// terms of every voter it knows of (`terms_known`), it could follow, and acknowledge
    /// for, a stale leader, or vote twice in a term.
    fn query_terms(&mut self, out: &mut Vec<Action>) {
        let disk_id = self.hard.disk_id;
        for to in self.known_voter_peers() {
            if !self.terms_heard.contains(&to) {
                self.send(to, Body::TermQuery { disk_id }, out);
            }
        }
    }

    /// Every voter of every membership this replica knows (the initial one and those in its
    /// log, joint ones included), but us.
    fn known_voter_peers(&self) -> Vec<ReplicaId> {
        let mut voters: Vec<ReplicaId> = self.memberships.iter().flat_map(|(_, m)| m.voters()).collect();
        voters.sort_unstable();
        voters.dedup();
        voters.retain(|v| *v != self.config.id);
        voters
    }

    /// Whether a replica recovering a lost disk has learned enough terms to vote, and to
    /// acknowledge for a leader, without breaking a promise its lost disk made.
    ///
    /// The lost disk may have voted in some term T for a candidate C, its answer still in
    /// flight, and C may win T with it; so, in every term up to the largest it voted in, the
    /// replica must grant nothing and follow nobody but the leader that won it. What it can
    /// learn: C persisted T before it asked for the vote, and terms only grow, so C answers a
    /// later query with a term of at least T. No one else need: any other voter of C's
    /// election quorum may answer with an older term and only then vote for C (its vote
    /// request delayed). So a quorum of answers proves nothing: with RF 5 and E 3, C and one
    /// more voter elect C with the lost vote while the replica hears three older terms and
    /// votes with the two others for someone else in T. Hence it hears every voter it knows
    /// of, the only set sure to hold C: afterwards its term is at least T (a higher term
    /// answered is adopted), it finishes recovery only under a leader of its current term
    /// (`maybe_finish_recovery`), records its vote in that term for that leader, and votes
    /// only in later terms, which the lost disk never reached. The same holds for a forgotten
    /// vote for a newer leader than the one it would acknowledge for: that leader's term is
    /// learned and the stale one's appends are refused. The cost: a replica that lost its
    /// disk waits for every voter, so one more voter down delays its recovery (not the
    /// group's writes, which W others carry), and so does a retired voter whose configuration
    /// is still known (configurations are kept whole when the log is trimmed, and a
    /// `StartAt` carries them). KIP-853 instead gives the new disk a new
    /// directory id that voters must be reconfigured to accept; this core keeps the id for
    /// the leader's bookkeeping (`Progress::disk_id`) and needs no reconfiguration.
    /// Not covered: a candidate voter only of a configuration the recovered log no longer
    /// holds (uncommitted and cut off), which the replica cannot know to ask.
    fn terms_known(&self) -> bool {
        self.known_voter_peers().iter().all(|v| self.terms_heard.contains(v))
    }

    fn heard_from_election_quorum(&self) -> bool {
        let since = self.ticks.saturating_sub(u64::from(self.config.election_ticks));
        let heard = |v: ReplicaId| {
            v == self.config.id || self.progress.iter().any(|p| p.id == v && p.last_heard_tick >= since)
        };
        self.membership().every_set(Quorum::election_quorum, heard)
    }

    fn heartbeat(&mut self, log: &dyn LogRead, out: &mut Vec<Action>) {
        let stall_ticks = u64::from(self.config.election_ticks / 2).max(1);
        for i in 0..self.progress.len() {
            let p = &mut self.progress[i];
            if !p.in_flight.is_empty() && self.ticks >= p.last_progress_tick + stall_ticks {
                // Lost or stuck appends: send again from what is known to match (or probe
                // again where the probe started).
                p.next = if p.probing { p.probe_from.max(p.match_end) } else { p.match_end };
                p.in_flight.clear();
                p.in_flight_bytes = 0;
                p.last_progress_tick = self.ticks;
            }
            let just_sent =
                p.sent_tick > 0 && self.ticks < p.sent_tick + u64::from(self.config.heartbeat_ticks);
            if !just_sent {
                let probe = p.probing && p.in_flight.is_empty();
                let prev_end = if probe { p.probe_from.max(p.match_end) } else { p.match_end };
                // Never below our log's start: nothing there can be read to send after it.
                let (to, prev_end) = (p.id, prev_end.max(self.log_start));
                let prev_epoch = self.prev_epoch(prev_end);
                let body = Body::Append(Append {
                    prev_end,
                    prev_epoch,
                    commit_end: self.high_watermark,
                    log_start: self.log_start,
                    seq: self.next_append_seq(),
                    batches: Vec::new(),
                });
                self.note_append_sent(i);
                self.send(to, body, out);
            }
            self.send_appends(i, log, out);
        }
    }

    fn note_append_sent(&mut self, i: usize) {
        self.progress[i].sent_tick = self.ticks;
    }

    fn next_append_seq(&mut self) -> u64 {
        self.append_seq += 1;
        self.append_seq - 1
    }

    fn prev_epoch(&self, prev_end: i64) -> i32 {
        if prev_end == 0 {
            return -1;
        }
        self.epochs.epoch_at(prev_end - 1, self.log_end).expect("prev_end is within the leader's log")
    }

    fn start_pre_vote(&mut self, log: &dyn LogRead, out: &mut Vec<Action>) {
        self.reset_election_deadline();
        if self.hard.recovering || !self.may_campaign() {
            return;
        }
        self.votes.clear();
        self.votes.push((self.config.id, true));
        self.set_role(Role::PreCandidate, None, out);
        if self.votes_won() {
            self.campaign(false, log, out);
            return;
        }
        let (term, last_epoch, log_end) = (self.hard.term + 1, self.epochs.last_epoch(), self.log_end);
        for to in self.voter_peers() {
            self.send_with_term(to, term, Body::PreVote { last_epoch, log_end }, out);
        }
    }

    /// A voter of the membership in force may campaign; so may a voter of the one before
    /// while the last, which leaves it out, is not known to be committed: a leader that
    /// appended it and lost its quorum (check-quorum) may hold the longest log, and without
    /// it the others could not win. As leader it commits the new membership and steps down,
    /// as Raft's leader outside the new configuration does.
    fn may_campaign(&self) -> bool {
        let id = self.config.id;
        let count = self.memberships.len();
        let (offset, last) = &self.memberships[count - 1];
        last.is_voter(id)
            || *offset >= self.high_watermark && count >= 2 && self.memberships[count - 2].1.is_voter(id)
    }

    fn campaign(&mut self, transfer: bool, log: &dyn LogRead, out: &mut Vec<Action>) {
        assert!(!self.hard.recovering, "a recovering replica never campaigns");
        self.hard.term += 1;
        self.hard.voted_for = Some(self.config.id);
        self.verified_end = 0;
        self.leader_seq = 0;
        self.persist(out);
        self.progress.clear();
        self.votes.clear();
        self.votes.push((self.config.id, true));
        self.role = Role::Follower; // so that set_role reports the change with the new term
        self.set_role(Role::Candidate, None, out);
        self.reset_election_deadline();
        if self.votes_won() {
            self.become_leader(log, out);
            return;
        }
        let (last_epoch, log_end) = (self.epochs.last_epoch(), self.log_end);
        for to in self.voter_peers() {
            self.send(to, Body::Vote { last_epoch, log_end, transfer }, out);
        }
    }

    fn record_vote(&mut self, from: ReplicaId, granted: bool) -> bool {
        if !self.votes.iter().any(|(id, _)| *id == from) {
            self.votes.push((from, granted));
        }
        self.votes_won()
    }

    /// E granted votes in every voter set (both while joint).
    fn votes_won(&self) -> bool {
        self.membership().every_set(Quorum::election_quorum, |v| self.votes.contains(&(v, true)))
    }

    fn new_progress(&self, id: ReplicaId) -> Progress {
        Progress {
            id,
            next: self.log_end,
            match_end: 0,
            acked_end: 0,
            recovering: false,
            says_recovering: false,
            disk_id: None,
            reset_seq: 0,
            in_flight: VecDeque::new(),
            in_flight_bytes: 0,
            probing: true,
            probe_from: self.log_end,
            last_heard_tick: self.ticks,
            last_progress_tick: self.ticks,
            caught_up_tick: None,
            caught_up_mark: (self.log_end, self.ticks),
            sent_tick: 0,
        }
    }

    /// Leader: one progress per member but us, after the membership changed.
    fn sync_progress(&mut self) {
        let peers = self.peers();
        self.progress.retain(|p| peers.contains(&p.id));
        for id in peers {
            if !self.progress.iter().any(|p| p.id == id) {
                let progress = self.new_progress(id);
                self.progress.push(progress);
            }
        }
    }

    fn become_leader(&mut self, log: &dyn LogRead, out: &mut Vec<Action>) {
        assert_eq!(self.role, Role::Candidate, "only a candidate becomes leader");
        assert_eq!(self.hard.voted_for, Some(self.config.id), "a leader voted for itself");
        self.progress.clear();
        self.sync_progress();
        // A follower that voted for us is alive and its log is no longer than ours: it
        // counts in sync (Kafka's new leader keeps the in-sync replicas it was given) until
        // its first answer says where its durable log ends (`adopt_disk`). Otherwise an
        // acks=all produce in the leadership's first round trips is refused for too few
        // in-sync replicas, and its producer backs off. Only the in-sync replicas see this:
        // the commit point counts answers alone.
        let ticks = self.ticks;
        for p in &mut self.progress {
            if self.votes.contains(&(p.id, true)) {
                p.caught_up_tick = Some(ticks);
            }
        }
        self.set_role(Role::Leader, Some(self.config.id), out);
        self.append_seq = 0;
        let start = batch::epoch_start(self.config.id, &self.membership().voters());
        let base = self.log_end;
        let stamped = self.append_own(start);
        // The first heartbeat (and the epoch's first batch) goes now, not at the next tick
        // (10 ms by default): the followers learn who leads, and answer, that much sooner,
        // and the first commit of this term waits for their answers.
        self.heartbeat_deadline_tick = self.ticks + u64::from(self.config.heartbeat_ticks);
        self.heartbeat(&WithProposal { log, base, batches: std::slice::from_ref(&stamped) }, out);
        out.push(Action::Append { batches: vec![stamped] });
        self.check_quorum_deadline_tick = self.ticks + u64::from(self.config.election_ticks);
        self.maybe_commit(out);
    }

    /// Stamps a checked batch with the next offset and our term and records it in the log.
    fn append_own(&mut self, mut bytes: Vec<u8>) -> Bytes {
        assert_eq!(self.role, Role::Leader, "only a leader stamps batches");
        batch::stamp(&mut bytes, self.log_end, self.hard.term);
        let view = batch::parse(&bytes).expect("stamping a checked batch keeps it valid");
        self.epochs.appended(self.hard.term, self.log_end);
        self.log_end = view.end_offset();
        Bytes::from(bytes)
    }

    /// Appends client batches (checked here, stamped with offsets and our term). Returns the
    /// offsets they took, `[base, end)`; they are committed once the commit point passes `end`.
    pub fn propose(
        &mut self,
        batches: Vec<Vec<u8>>,
        log: &dyn LogRead,
        out: &mut Vec<Action>,
    ) -> Result<(i64, i64)> {
        if !self.accepts_proposals() {
            return Err(ReplicationError::NotLeader {
                replica: self.config.id,
                term: self.hard.term,
                leader: self.leader,
            });
        }
        let bytes: usize = batches.iter().map(Vec::len).sum();
        if bytes > PROPOSAL_BYTES_MAX {
            return Err(ReplicationError::TooLarge {
                what: "proposal",
                bytes: bytes as u64,
                limit: PROPOSAL_BYTES_MAX as u64,
            });
        }
        for bytes in &batches {
            let view = batch::parse(bytes)?;
            if view.total_bytes != bytes.len() {
                return Err(ReplicationError::CorruptBatch { reason: "bytes after the batch".into() });
            }
        }
        let base = self.log_end;
        let stamped: Vec<Bytes> = batches.into_iter().map(|b| self.append_own(b)).collect();
        // The shell stores the batches after this returns: caught-up followers get them from
        // here, now, not from the next answer or heartbeat.
        let log = WithProposal { log, base, batches: &stamped };
        for i in 0..self.progress.len() {
            self.send_appends(i, &log, out);
        }
        out.push(Action::Append { batches: stamped });
        self.maybe_commit(out);
        Ok((base, self.log_end))
    }

    /// Sends appends to follower `i` while its window has room.
    fn send_appends(&mut self, i: usize, log: &dyn LogRead, out: &mut Vec<Action>) {
        let mut batches = Vec::new();
        loop {
            let p = &self.progress[i];
            let window_full = p.in_flight_bytes >= APPEND_IN_FLIGHT_BYTES_MAX
                || p.in_flight.len() >= APPEND_IN_FLIGHT_MESSAGES_MAX
                || (p.probing && !p.in_flight.is_empty());
            if p.next >= self.log_end || window_full {
                return;
            }
            if p.next < self.log_start {
                self.send_start_at(i, out);
                return;
            }
            let bytes_max = APPEND_BYTES_MAX.min(APPEND_IN_FLIGHT_BYTES_MAX - p.in_flight_bytes);
            batches.clear();
            log.read(p.next, bytes_max, &mut batches);
            let Some((prev_end, end, bytes)) = self.span_of(&batches) else { return };
            if end <= p.next || prev_end > p.next || end > self.log_end {
                return; // the log answered something other than asked: retry at the next heartbeat
            }
            let to = p.id;
            let body = Body::Append(Append {
                prev_end,
                prev_epoch: self.prev_epoch(prev_end),
                commit_end: self.high_watermark,
                log_start: self.log_start,
                seq: self.next_append_seq(),
                batches: std::mem::take(&mut batches),
            });
            let p = &mut self.progress[i];
            p.in_flight.push_back((end, bytes));
            p.in_flight_bytes += bytes;
            p.next = end;
            self.note_append_sent(i);
            self.send(to, body, out);
        }
    }

    /// Follower `i` needs offsets below our log's start: it is told to start its log there,
    /// with the configurations below it (not if there are more than it may carry).
    fn send_start_at(&mut self, i: usize, out: &mut Vec<Action>) {
        let start = self.log_start;
        let memberships: Vec<(i64, Membership)> =
            self.memberships.iter().filter(|(offset, _)| *offset < start).cloned().collect();
        if memberships.len() > MEMBERSHIPS_SENT_MAX {
            return;
        }
        let body = Body::StartAt(StartAt {
            start,
            prev_epoch: self.prev_epoch(start),
            commit_end: self.high_watermark,
            seq: self.next_append_seq(),
            memberships,
        });
        let p = &mut self.progress[i];
        let to = p.id;
        p.in_flight.push_back((start, 0));
        p.next = start;
        p.probing = true;
        p.probe_from = start;
        self.note_append_sent(i);
        self.send(to, body, out);
    }

    /// The first offset, end offset and bytes of contiguous checked batches.
    fn span_of(&self, batches: &[Bytes]) -> Option<(i64, i64, usize)> {
        let first = batch::parse(batches.first()?).ok()?;
        let mut end = first.base_offset;
        let mut bytes = 0;
        for b in batches {
            let view = batch::parse(b).ok()?;
            if view.base_offset != end {
                return None;
            }
            end = view.end_offset();
            bytes += view.total_bytes;
        }
        Some((first.base_offset, end, bytes))
    }

    fn maybe_commit(&mut self, out: &mut Vec<Action>) {
        debug_assert_eq!(self.role, Role::Leader);
        let candidate = self.membership().sets.iter().map(|set| self.durable_on_write_quorum(set)).min();
        let candidate = candidate.expect("a membership has a voter set");
        let own_start =
            self.epochs.start_of(self.hard.term).expect("a leader's log holds its epoch-start batch");
        #[allow(unused_mut)]
        let mut eligible = candidate > own_start;
        #[cfg(any(test, feature = "sim"))]
        if self.config.planted_bug == Some(PlantedBug::CommitEarlierTerm) {
            eligible = true;
        }
        if eligible && candidate > self.high_watermark {
            assert!(candidate > 0, "a commit covers at least one offset");
            assert!(
                candidate <= self.log_end,
                "the commit point {candidate} is past the log end {}",
                self.log_end
            );
            self.high_watermark = candidate;
            out.push(Action::Commit { high_watermark: candidate });
            self.advance_membership(out);
        }
    }

    /// The largest offset durable on W voters of `set` (ours counted if we are one of them).
    fn durable_on_write_quorum(&self, set: &VoterSet) -> i64 {
        let mut acked = [0i64; crate::quorum::REPLICATION_FACTOR_MAX as usize];
        for (slot, voter) in acked.iter_mut().zip(&set.voters) {
            *slot = if *voter == self.config.id {
                self.durable_end
            } else {
                let p = self.progress.iter().find(|p| p.id == *voter);
                p.filter(|p| !p.recovering).map_or(0, |p| p.acked_end)
            };
        }
        let acked = &mut acked[..set.voters.len()];
        acked.sort_unstable_by(|a, b| b.cmp(a));
        acked[set.quorum.write_quorum() as usize - 1]
    }

    /// Starts a membership change to `voters` (with `quorum`) and `learners`: appends the
    /// joint configuration; once it commits, the leader appends the new one alone. Refused
    /// while a change is under way or before the leader committed in its own term (the fix
    /// Raft's single-server changes need, kept here for the same reason: an uncommitted
    /// configuration of an earlier leader may still be in flight).
    pub fn change_membership(
        &mut self,
        voters: Vec<ReplicaId>,
        quorum: Quorum,
        learners: Vec<ReplicaId>,
        log: &dyn LogRead,
        out: &mut Vec<Action>,
    ) -> Result<()> {
        if !self.accepts_proposals() {
            return Err(ReplicationError::NotLeader {
                replica: self.config.id,
                term: self.hard.term,
                leader: self.leader,
            });
        }
        let (offset, current) = self.memberships.last().expect("never empty");
        let own_start =
            self.epochs.start_of(self.hard.term).expect("a leader's log holds its epoch-start batch");
        if current.is_joint() || *offset >= self.high_watermark || own_start >= self.high_watermark {
            return Err(ReplicationError::Config {
                reason: "a membership change is under way or this leader has not committed yet: retry".into(),
            });
        }
        let next = VoterSet { voters, quorum };
        #[allow(unused_mut)]
        let mut joint = Membership { sets: vec![current.sets[0].clone(), next], learners };
        #[cfg(any(test, feature = "sim"))]
        if self.config.planted_bug == Some(PlantedBug::SkipJointConsensus) {
            joint.sets.remove(0);
        }
        joint.validate()?;
        self.append_membership(joint, out);
        for i in 0..self.progress.len() {
            self.send_appends(i, log, out);
        }
        Ok(())
    }

    fn append_membership(&mut self, membership: Membership, out: &mut Vec<Action>) {
        let offset = self.log_end;
        let stamped = self.append_own(membership.to_batch());
        self.memberships.push((offset, membership));
        out.push(Action::Append { batches: vec![stamped] });
        self.sync_progress();
    }

    /// Leader, after a commit: a committed joint configuration is followed by the new one
    /// alone; a committed configuration that leaves us out ends our leadership.
    fn advance_membership(&mut self, out: &mut Vec<Action>) {
        let (offset, current) = self.memberships.last().expect("never empty");
        if *offset >= self.high_watermark {
            return;
        }
        if current.is_joint() {
            let next = Membership { sets: vec![current.sets[1].clone()], learners: current.learners.clone() };
            self.append_membership(next, out);
        } else if !current.is_voter(self.config.id) {
            let term = self.hard.term;
            self.become_follower(term, None, out);
        }
    }
}

impl RaftGroup {
    /// Takes one message from a peer. A message for another replica, malformed or over its
    /// limits is ignored; an answer (to a vote, a pre-vote, an append, a term query) is
    /// ignored unless it comes from a replica of the membership it would count in; one of a
    /// stale term is answered with a refusal.
    ///
    /// Requests (PreVote, Vote, Append, TimeoutNow, TermQuery) are taken from any replica,
    /// member of the membership we know or not: our log may lag the configuration that made
    /// it a voter or a leader (we missed a change, or lost our disk and restarted with the
    /// initial one), and ignoring it could leave us deaf to the group for good. That lets no
    /// outsider lead: a candidate counts only votes of the voters of its own membership and
    /// campaigns only as one of them (`may_campaign`), and a voter grants a vote only to a log
    /// at least as up to date as its own, as Raft always required.
    pub fn receive(&mut self, message: Message, log: &dyn LogRead, out: &mut Vec<Action>) {
        let from = message.from;
        if message.to != self.config.id || from == self.config.id || !within_limits(&message.body) {
            return;
        }
        let counts = match &message.body {
            Body::VoteResponse { .. } | Body::PreVoteResponse { .. } => self.membership().is_voter(from),
            // A leader keeps a progress for each member but itself (`sync_progress`): the
            // same answer, without reading the membership's vectors for every heartbeat's.
            Body::AppendResponse(_) if self.role == Role::Leader => {
                self.progress.iter().any(|p| p.id == from)
            }
            Body::AppendResponse(_) => self.membership().is_member(from),
            // A voter of a membership we knew may have been removed since: its term counts.
            Body::TermAnswer { .. } => self.known_voter_peers().contains(&from),
            _ => true,
        };
        if !counts {
            return;
        }
        // Only answers to this disk's queries count: other messages may have left before the
        // loss, and so may answers to the queries of a disk lost since.
        if let Body::TermAnswer { disk_id } = message.body {
            if self.hard.recovering && disk_id == self.hard.disk_id && !self.terms_heard.contains(&from) {
                self.terms_heard.push(from);
                self.term_learned_max = self.term_learned_max.max(message.term);
            }
        }
        if message.term > self.hard.term {
            match &message.body {
                Body::PreVote { .. } | Body::PreVoteResponse { granted: true } => {}
                Body::Vote { transfer: false, .. } if self.in_lease() => return,
                Body::Append(_) | Body::StartAt(_) | Body::TimeoutNow => {
                    self.become_follower(message.term, Some(from), out)
                }
                _ => self.become_follower(message.term, None, out),
            }
        } else if message.term < self.hard.term {
            self.refuse_stale(from, &message.body, out);
            return;
        }
        match message.body {
            Body::PreVote { last_epoch, log_end } => {
                self.on_pre_vote(from, message.term, last_epoch, log_end, out)
            }
            Body::PreVoteResponse { .. } if self.role != Role::PreCandidate => {}
            Body::PreVoteResponse { granted } => {
                if message.term == self.hard.term + 1 && self.record_vote(from, granted) {
                    self.campaign(false, log, out);
                } else if !granted && self.leader_unreachable.is_some_and(|(_, until)| self.ticks < until) {
                    // Refused (a refusal carries the voter's term, ours) soon after our
                    // leader's connection was lost: the voter may not have seen the loss yet
                    // (its lease). Ask again in a quarter of an election timeout, not a whole
                    // one, or one ranked after us (just back, say) campaigns first and wins.
                    // Only within that window.
                    let soon = u64::from((self.config.election_ticks / 4).max(1));
                    self.election_deadline_tick = self.election_deadline_tick.min(self.ticks + soon);
                }
            }
            Body::Vote { last_epoch, log_end, transfer: _ } => self.on_vote(from, last_epoch, log_end, out),
            Body::VoteResponse { granted } => {
                if self.role == Role::Candidate && self.record_vote(from, granted) {
                    self.become_leader(log, out);
                }
            }
            Body::Append(append) => self.on_append(from, append, log, out),
            Body::StartAt(start_at) => self.on_start_at(from, start_at, out),
            Body::AppendResponse(response) => self.on_append_response(from, response, log, out),
            Body::TermQuery { disk_id } => self.send(from, Body::TermAnswer { disk_id }, out),
            Body::TermAnswer { .. } => {}
            Body::TimeoutNow => {
                if self.role == Role::Follower
                    && self.leader == Some(from)
                    && !self.hard.recovering
                    && self.may_campaign()
                {
                    self.campaign(true, log, out);
                }
            }
        }
    }

    fn refuse_stale(&mut self, from: ReplicaId, body: &Body, out: &mut Vec<Action>) {
        let refusal = match body {
            Body::Append(append) => Body::AppendResponse(self.rejection(0, append.seq)),
            Body::StartAt(start_at) => Body::AppendResponse(self.rejection(0, start_at.seq)),
            Body::TimeoutNow => Body::AppendResponse(self.rejection(0, 0)),
            Body::PreVote { .. } => Body::PreVoteResponse { granted: false },
            Body::Vote { .. } => Body::VoteResponse { granted: false },
            // A replica that lost its disk asks from term 0: the answer carries our term.
            Body::TermQuery { disk_id } => Body::TermAnswer { disk_id: *disk_id },
            _ => return,
        };
        self.send(from, refusal, out);
    }

    /// A leader was heard from within the minimum election timeout (or we lead).
    fn in_lease(&self) -> bool {
        if self.role == Role::Leader {
            return true;
        }
        let lease = u64::from(self.config.election_ticks);
        self.leader.is_some() && self.last_leader_contact_tick.is_some_and(|t| self.ticks < t + lease)
    }

    /// Whether a candidate's log lacks entries ours may hold committed: the log check of a
    /// vote. A replica that is a voter of no configuration its log holds (nor of its initial
    /// one) skips it: no commit ever needed its copies. Why: our copy of an entry N counted
    /// toward committing N only under a leader whose configuration C made us a voter.
    /// - C at or below N: our log holds C (Log Matching), so we were a voter. Excluded.
    /// - C above N: C is not committed yet (N is not). A lone new set is appended only once
    ///   the joint configuration before it is committed, so below N, and that joint one
    ///   names us in its new set: excluded as above. So C is a joint (A, B) appended while
    ///   A was committed, below N: we are not in A, and A's own write quorum carried N,
    ///   whose voters check their logs when they vote.
    ///
    /// Without the skip a group can stall for good: a learner holding the only copies of an
    /// uncommitted newer epoch refuses the one voter of a joint configuration naming it that
    /// could win (simulator seed 1401956, `--membership`, with a voter recovering a lost
    /// disk). A demoted voter keeps its check: the configuration that made it a voter is in
    /// its log. `memberships` holds every configuration since offset 0: a trim keeps them,
    /// and a `StartAt` carries the leader's below its start (all of them, or none is sent).
    fn log_is_behind(&self, last_epoch: i32, log_end: i64) -> bool {
        let id = self.config.id;
        #[allow(unused_mut)]
        let mut ever_a_voter = self.memberships.iter().any(|(_, m)| m.is_voter(id));
        #[cfg(any(test, feature = "sim"))]
        if self.config.planted_bug == Some(PlantedBug::LearnerVotesBlind) {
            ever_a_voter = self.membership().is_voter(id);
        }
        ever_a_voter && (last_epoch, log_end) < (self.epochs.last_epoch(), self.log_end)
    }

    /// A pre-vote is granted to a term above ours, while no leader holds our lease, for a log
    /// at least as up to date as ours. Refused only for its log, with no leader to count on,
    /// we campaign soon (`campaign_soon`): the group has no leader and we are the better
    /// candidate, which would otherwise wait out its election timeout while the one refused
    /// waits out its own (a follower that saw the leader's loss a moment after the other
    /// refuses the other's first ask, for its lease; see the unit test
    /// `a_replica_refusing_a_shorter_log_with_no_leader_campaigns_soon`). A vote refused for
    /// the log does the same.
    fn on_pre_vote(
        &mut self,
        from: ReplicaId,
        term: i32,
        last_epoch: i32,
        log_end: i64,
        out: &mut Vec<Action>,
    ) {
        let electable = !self.hard.recovering && term > self.hard.term && !self.in_lease();
        let behind = self.log_is_behind(last_epoch, log_end);
        let granted = electable && !behind;
        if electable && behind && self.may_campaign() {
            self.campaign_soon(from, false);
        }
        let term = if granted { term } else { self.hard.term };
        self.send_with_term(from, term, Body::PreVoteResponse { granted }, out);
    }

    fn on_vote(&mut self, from: ReplicaId, last_epoch: i32, log_end: i64, out: &mut Vec<Action>) {
        let free = self.hard.voted_for.is_none() || self.hard.voted_for == Some(from);
        // Whoever asks gets an answer, member of our configuration or not (our log may lag
        // the one that made them a voter): a candidate counts only the voters of its own.
        let behind = self.log_is_behind(last_epoch, log_end);
        let granted = free && !self.hard.recovering && !behind;
        if behind && !self.hard.recovering && !self.in_lease() && self.may_campaign() {
            self.campaign_soon(from, false);
        }
        if granted && self.hard.voted_for.is_none() {
            assert!(!self.hard.recovering, "a replica recovering a lost disk votes in no term");
            self.hard.voted_for = Some(from);
            self.persist(out);
        }
        if granted {
            self.reset_election_deadline();
        }
        self.send(from, Body::VoteResponse { granted }, out);
    }

    /// The refusal of the append numbered `seq`.
    fn rejection(&self, probe_end: i64, seq: u64) -> AppendResponse {
        AppendResponse {
            accepted: false,
            match_end: 0,
            acked_end: 0,
            log_end: probe_end,
            epochs: self.epochs.tail_below(probe_end, EPOCH_HINTS_MAX),
            recovering: self.hard.recovering,
            seq,
            disk_id: self.hard.disk_id,
        }
    }

    /// What our log holds of the current leader's, after its append numbered `leader_seq`.
    fn acknowledgement(&self, match_end: i64) -> AppendResponse {
        #[allow(unused_mut)]
        let mut acked_end = self.durable_end.min(self.verified_end);
        #[cfg(any(test, feature = "sim"))]
        if self.config.planted_bug == Some(PlantedBug::AckBeforeDurable) {
            acked_end = self.verified_end;
        }
        AppendResponse {
            accepted: true,
            match_end,
            acked_end,
            log_end: self.log_end,
            epochs: Vec::new(),
            recovering: self.hard.recovering,
            seq: self.leader_seq,
            disk_id: self.hard.disk_id,
        }
    }

    /// A message of the leader `from` of our term: we follow it and its lease starts again
    /// (not while the shell says it is unreachable: see `peer_unreachable`).
    fn heard_leader(&mut self, from: ReplicaId, seq: u64, out: &mut Vec<Action>) {
        if self.role != Role::Follower || self.leader != Some(from) {
            let term = self.hard.term;
            self.become_follower(term, Some(from), out);
        }
        self.leader_seq = self.leader_seq.max(seq);
        if self.leader_unreachable.is_some_and(|(peer, until)| peer == from && self.ticks < until) {
            return;
        }
        self.leader_unreachable = None;
        self.last_leader_contact_tick = Some(self.ticks);
        self.reset_election_deadline();
    }

    fn on_append(&mut self, from: ReplicaId, append: Append, log: &dyn LogRead, out: &mut Vec<Action>) {
        if self.role == Role::Leader {
            return; // two leaders in one term: impossible from honest peers, so ignore it
        }
        self.heard_leader(from, append.seq, out);
        // A leader's start is below its commit point; one that is not is no fact to act on.
        if (0..=append.commit_end).contains(&append.log_start) {
            self.leader_log_start = append.log_start;
        }
        // Below our log's start every offset is committed, and so the leader's too.
        let below_start = self.log_start > 0 && append.prev_end <= self.log_start;
        // A point inside one of our batches is no point the leader's log and ours share: the
        // same epoch at the same offsets is the same batch, so a sound leader never sends it.
        let epoch_matches = append.prev_end > 0
            && self.epochs.epoch_at(append.prev_end - 1, self.log_end) == Some(append.prev_epoch);
        let prev_matches = below_start
            || append.prev_end == 0 && append.prev_epoch == -1
            || epoch_matches && self.is_batch_boundary(append.prev_end, log);
        if !prev_matches {
            let probe_end = append.prev_end.clamp(0, self.log_end);
            let body = Body::AppendResponse(self.rejection(probe_end, append.seq));
            self.send(from, body, out);
            return;
        }
        let Some(end) = self.append_batches(&append, log, out) else { return };
        self.verified_end = self.verified_end.max(end).max(if below_start { self.log_start } else { 0 });
        let commit = append.commit_end.min(self.verified_end);
        if commit > self.high_watermark {
            self.high_watermark = commit;
            out.push(Action::Commit { high_watermark: commit });
        }
        self.maybe_finish_recovery(from, append.commit_end, out);
        let mut acknowledgement = self.acknowledgement(self.verified_end);
        acknowledgement.seq = append.seq;
        self.send(from, Body::AppendResponse(acknowledgement), out);
    }

    /// The leader's log starts at `start_at.start`. If ours holds the entry before it (or
    /// starts there or later), it matches the leader's up to there and nothing changes;
    /// else our log is dropped and started, empty, at `start` (`Action::StartLog`). Either
    /// way the answer is an acknowledgement, as to an append.
    ///
    /// Why dropping is safe: everything we may have acknowledged, in this term or before,
    /// matches the leader's log, and so would hold the entry before `start`; and what we
    /// know to be committed (below our commit point) is the leader's too, so a log that
    /// lacks that entry holds nothing committed past our commit point, which is then below
    /// `start`. Below the commit point our epochs and configurations stay, as they are the
    /// leader's; above it they come from the message.
    fn on_start_at(&mut self, from: ReplicaId, start_at: StartAt, out: &mut Vec<Action>) {
        if self.role == Role::Leader {
            return; // two leaders in one term: impossible from honest peers, so ignore it
        }
        self.heard_leader(from, start_at.seq, out);
        let StartAt { start, prev_epoch, commit_end, seq, memberships } = start_at;
        let sound = start > 0
            && (0..=self.hard.term).contains(&prev_epoch)
            && commit_end >= start
            && memberships.first().is_some_and(|(offset, _)| *offset == -1)
            && memberships.windows(2).all(|w| w[0].0 < w[1].0)
            && memberships.iter().all(|(offset, m)| *offset < start && m.validate().is_ok());
        if !sound {
            return;
        }
        let holds_start =
            start <= self.log_start || self.epochs.epoch_at(start - 1, self.log_end) == Some(prev_epoch);
        if !holds_start {
            let kept_epoch = self.epochs.epoch_at(self.high_watermark - 1, self.log_end).unwrap_or(-1);
            if start <= self.high_watermark || prev_epoch < kept_epoch {
                return; // our committed entries would be the leader's: not from a sound leader
            }
            self.start_log_at(start, prev_epoch, memberships, out);
        }
        self.verified_end = self.verified_end.max(start.max(self.log_start));
        let commit = commit_end.min(self.verified_end);
        if commit > self.high_watermark {
            self.high_watermark = commit;
            out.push(Action::Commit { high_watermark: commit });
        }
        assert!(self.log_start <= self.high_watermark, "everything below a log's start is committed");
        self.maybe_finish_recovery(from, commit_end, out);
        let mut acknowledgement = self.acknowledgement(self.verified_end);
        acknowledgement.seq = seq;
        self.send(from, Body::AppendResponse(acknowledgement), out);
    }

    /// Drops our log and starts it, empty, at `start`, the entry before it of `prev_epoch`
    /// (see `on_start_at`, which checked that nothing committed here is lost).
    fn start_log_at(
        &mut self,
        start: i64,
        prev_epoch: i32,
        memberships: Vec<(i64, Membership)>,
        out: &mut Vec<Action>,
    ) {
        let committed = self.high_watermark;
        assert!(committed < start, "a log is started afresh only past its commit point");
        self.epochs.truncate(committed);
        if self.epochs.last_epoch() != prev_epoch {
            // Where in the leader's log this epoch starts we need not know: no offset below
            // our log's start is looked up, and the one before it is of this epoch.
            self.epochs.appended(prev_epoch, start - 1);
        }
        self.memberships = memberships;
        self.log_start = start;
        self.log_end = start;
        self.durable_end = self.durable_end.min(committed);
        self.verified_end = start;
        self.truncations += 1;
        out.push(Action::StartLog { start, truncations: self.truncations });
    }

    /// Whether our log has a batch boundary at `offset` (its start and end included).
    /// Whether a batch of our log starts at `offset`, as far as the log can tell now. A shell's
    /// reader may serve only what it holds in memory (reading the rest meanwhile): then the
    /// epoch check stands alone, as Raft's log matching makes it enough for sound leaders (the
    /// same epoch at the same offset is the same batch, so its boundaries are the leader's).
    /// Refusing instead stalled a follower back from a restart, whose log is not in memory:
    /// every probe dropped until a read came in, and the leader walked it from 0.
    fn is_batch_boundary(&self, offset: i64, log: &dyn LogRead) -> bool {
        if offset == 0 || offset == self.log_end {
            return true;
        }
        let mut held = Vec::new();
        log.read(offset, 1, &mut held);
        // Our own stored batch, checked when it was appended: its base offset (the first 8
        // bytes) is all this needs, not a second CRC pass on every heartbeat.
        held.first().is_none_or(|b| b.get(..8).is_some_and(|base| base == offset.to_be_bytes()))
    }

    /// Appends what the log lacks of `append`'s batches, cutting a conflicting tail first.
    /// Returns where the checked batches end, or None to ignore the message (it would cut
    /// committed data). A batch that fails its checks ends the message there.
    fn append_batches(&mut self, append: &Append, log: &dyn LogRead, out: &mut Vec<Action>) -> Option<i64> {
        let (mut end, mut last_epoch) = (append.prev_end, append.prev_epoch);
        let mut fresh = Vec::new();
        for bytes in &append.batches {
            let Ok(view) = batch::parse(bytes) else { break };
            let bad = view.total_bytes != bytes.len()
                || view.base_offset != end
                || view.leader_epoch < last_epoch.max(0)
                || view.leader_epoch > self.hard.term;
            if bad {
                break;
            }
            if view.end_offset() <= self.log_start {
                (end, last_epoch) = (view.end_offset(), view.leader_epoch);
                continue; // below our log's start: committed, so held by the leader as we held it
            }
            if view.base_offset < self.log_start {
                break; // across our log's start, a batch boundary of the committed log: a lie
            }
            if fresh.is_empty() && view.base_offset < self.log_end {
                let held_epoch = |offset| self.epochs.epoch_at(offset, self.log_end);
                if held_epoch(view.base_offset) == Some(view.leader_epoch) {
                    // The same epoch at the same offset is the same batch: its last offset must
                    // be ours in that epoch too (offsets and epoch are outside the CRC).
                    let same_span = view.end_offset() <= self.log_end
                        && held_epoch(view.end_offset() - 1) == Some(view.leader_epoch);
                    if !same_span {
                        break; // not the batch we hold at this offset: a lie or corruption
                    }
                    (end, last_epoch) = (view.end_offset(), view.leader_epoch);
                    continue; // already held: same epoch, same offset, same batch
                }
                if view.base_offset < self.high_watermark {
                    return None;
                }
                if !self.is_batch_boundary(view.base_offset, log) {
                    break; // a cut inside one of our batches: not from a sound leader
                }
                self.truncate(view.base_offset, out);
            }
            if view.leader_epoch < self.epochs.last_epoch() {
                break; // an epoch older than our log's last: not from a sound leader
            }
            assert_eq!(view.base_offset, self.log_end, "appends are contiguous");
            if let Some(membership) = Membership::from_batch(bytes, &view) {
                self.memberships.push((view.base_offset, membership));
            }
            self.epochs.appended(view.leader_epoch, view.base_offset);
            self.log_end = view.end_offset();
            (end, last_epoch) = (view.end_offset(), view.leader_epoch);
            fresh.push(bytes.clone());
        }
        if !fresh.is_empty() {
            out.push(Action::Append { batches: fresh });
        }
        Some(end)
    }

    fn truncate(&mut self, end_offset: i64, out: &mut Vec<Action>) {
        assert!(end_offset >= self.high_watermark, "never truncate committed data");
        assert!(end_offset < self.log_end, "a truncation removes something");
        self.epochs.truncate(end_offset);
        self.memberships.retain(|(offset, _)| *offset < end_offset);
        self.log_end = end_offset;
        self.durable_end = self.durable_end.min(end_offset);
        self.verified_end = self.verified_end.min(end_offset);
        self.truncations += 1;
        out.push(Action::Truncate { end_offset, truncations: self.truncations });
    }

    /// A recovering replica that knows the current term (`terms_known`) holds, durably, its
    /// leader's epoch-start batch and commit point: everything committed so far. It may vote
    /// again, but not twice in this term.
    fn maybe_finish_recovery(&mut self, leader: ReplicaId, commit_end: i64, out: &mut Vec<Action>) {
        // Everything committed in earlier terms lies below the leader's epoch-start batch
        // (leader completeness); everything committed in this one, below its commit point.
        if !self.hard.recovering {
            return; // the common case, on every append: no allocation for `terms_known`
        }
        let Some(start) = self.epochs.start_of(self.hard.term) else { return };
        let needed_end = commit_end.max(start + 1);
        let caught_up =
            self.verified_end >= needed_end && self.durable_end >= needed_end && self.terms_known();
        if caught_up {
            // See `terms_known`: every term the lost disk voted in is at most the largest
            // term learned, and so at most this one, in which we take `leader` as our vote.
            assert!(self.hard.term >= self.term_learned_max, "a learned term was adopted");
            assert!(
                self.hard.voted_for.is_none_or(|v| v == leader),
                "a recovering replica voted for no one in its term"
            );
            self.hard.recovering = false;
            self.hard.voted_for = Some(leader);
            self.persist(out);
        }
    }

    fn on_append_response(
        &mut self,
        from: ReplicaId,
        response: AppendResponse,
        log: &dyn LogRead,
        out: &mut Vec<Action>,
    ) {
        if self.role != Role::Leader {
            return;
        }
        let Some(mut i) = self.progress.iter().position(|p| p.id == from) else { return };
        if response.match_end > self.log_end || response.log_end < 0 || response.seq >= self.append_seq {
            return; // claims more than we hold, or answers an append never sent: not ours
        }
        if self.progress[i].disk_id != Some(response.disk_id) {
            self.adopt_disk(i, &response);
            self.send_appends(i, log, out);
            return;
        }
        if response.seq < self.progress[i].reset_seq {
            // It answers an append sent before we last reset our view of this follower (a
            // rejection, another disk): what it says may be gone, so it counts for nothing.
            return;
        }
        let (ticks, log_end) = (self.ticks, self.log_end);
        let p = &mut self.progress[i];
        p.last_heard_tick = ticks;
        // What the commit point counts changed (a heartbeat's answer usually changes nothing,
        // and for thousands of groups the count is worth skipping).
        let mut counted_changed = p.recovering != response.recovering;
        p.recovering = response.recovering;
        p.says_recovering = response.recovering;
        if response.accepted {
            if response.match_end > p.match_end {
                p.match_end = response.match_end;
                p.last_progress_tick = ticks;
            }
            let acked = response.acked_end.min(p.match_end);
            if acked > p.acked_end {
                p.acked_end = acked;
                p.last_progress_tick = ticks;
                counted_changed = true;
            }
            if p.acked_end >= log_end {
                (p.caught_up_tick, p.caught_up_mark) = (Some(ticks), (log_end, ticks));
            } else if p.acked_end >= p.caught_up_mark.0 {
                (p.caught_up_tick, p.caught_up_mark) = (Some(p.caught_up_mark.1), (log_end, ticks));
            }
            while p.in_flight.front().is_some_and(|(end, _)| *end <= p.match_end) {
                let (_, bytes) = p.in_flight.pop_front().expect("front checked");
                p.in_flight_bytes -= bytes;
            }
            p.probing = false;
            p.next = p.next.max(p.match_end);
            if p.in_flight.is_empty() {
                p.next = p.match_end; // nothing in flight explains a gap: send from what matches
            }
            if counted_changed {
                self.maybe_commit(out);
                // A commit may have changed the membership (or ended our leadership).
                let Some(j) = self.progress.iter().position(|p| p.id == from) else { return };
                i = j;
            }
        } else {
            let tail_end = response.log_end.min(self.log_end);
            if !honest_tail(&response.epochs, tail_end) {
                return; // epochs out of order or outside the log: no answer from a sound replica
            }
            let common =
                self.epochs.common_end(self.log_end, &response.epochs, tail_end).clamp(0, self.log_end);
            let reset_seq = self.append_seq;
            let p = &mut self.progress[i];
            // A follower that crashed lost its unflushed tail: what it matched may be gone,
            // and so may what answers to appends sent before this rejection said.
            p.match_end = p.match_end.min(common);
            p.next = common.min(self.log_end);
            p.probe_from = p.next;
            p.in_flight.clear();
            p.in_flight_bytes = 0;
            p.probing = true;
            p.reset_seq = reset_seq;
        }
        self.send_appends(i, log, out);
        self.maybe_send_timeout_now(out);
    }

    /// Starts the view of follower `i` afresh on the disk `response` names (the first answer
    /// of this term, or one from another disk than the last: a disk that was lost and its
    /// replacement, whichever answer comes last). Nothing the answer says is counted, and
    /// answers to appends sent before now are ignored from here on: they may come from the
    /// other disk, whose data may be gone, and must neither raise `acked_end` nor clear
    /// `recovering`. The answer's match point only says where to send from. A stale answer
    /// of a lost disk may flip the view back to it, but only once: every answer that disk
    /// ever sent answers an append sent before this reset.
    fn adopt_disk(&mut self, i: usize, response: &AppendResponse) {
        let (reset_seq, log_end, ticks) = (self.append_seq, self.log_end, self.ticks);
        // Where to probe next: where the follower's log ends (a follower back from a restart
        // holds most of the log; the probe's epoch check finds out whether it matches), or,
        // refused, where its epochs say the logs part; never from 0 when it holds more.
        let next = if response.accepted {
            response.log_end.max(response.match_end)
        } else if honest_tail(&response.epochs, response.log_end.min(log_end)) {
            self.epochs.common_end(log_end, &response.epochs, response.log_end.min(log_end))
        } else {
            0
        };
        let p = &mut self.progress[i];
        p.disk_id = Some(response.disk_id);
        p.recovering = true; // until an answer to a later append says otherwise
        p.says_recovering = response.recovering;
        p.match_end = 0;
        p.acked_end = 0;
        // Whether it is in sync (not what the commit point counts): caught up as of the
        // mark if this answer says its durable log holds what ours did then.
        let held_mark = response.accepted
            && !response.recovering
            && response.acked_end.min(response.match_end) >= p.caught_up_mark.0;
        p.caught_up_tick = held_mark.then_some(p.caught_up_mark.1);
        p.caught_up_mark = (log_end, ticks);
        p.next = next.clamp(0, log_end);
        p.probe_from = p.next;
        p.in_flight.clear();
        p.in_flight_bytes = 0;
        p.probing = true;
        p.reset_seq = reset_seq;
        debug_assert!(p.next <= log_end, "the next offset to send is within the log");
    }

    /// The leader's view of follower `id`: (acknowledged durable end, recovering), for the
    /// simulator's checks.
    #[cfg(any(test, feature = "sim"))]
    pub fn follower_view(&self, id: ReplicaId) -> Option<(i64, bool)> {
        let p = self.progress.iter().find(|p| p.id == id)?;
        (self.role == Role::Leader).then_some((p.acked_end, p.recovering))
    }

    /// Takes a notice from the log.
    pub fn notice(&mut self, notice: LogNotice, out: &mut Vec<Action>) {
        match notice {
            LogNotice::HardStatePersisted(state) => {
                if self.persist_pending && state == self.hard {
                    self.persist_pending = false;
                    out.extend(self.held.drain(..).map(Action::Send));
                }
            }
            LogNotice::Durable { end_offset, truncations } => {
                if truncations != self.truncations {
                    return;
                }
                let durable = end_offset.min(self.log_end);
                if durable <= self.durable_end {
                    return;
                }
                self.durable_end = durable;
                match (self.role, self.leader) {
                    (Role::Leader, _) => self.maybe_commit(out),
                    (Role::Follower, Some(leader)) if self.verified_end > 0 => {
                        let body = Body::AppendResponse(self.acknowledgement(self.verified_end));
                        self.send(leader, body, out);
                    }
                    _ => {}
                }
            }
        }
    }

    /// Whether [`RaftGroup::propose`] takes proposals now: this replica leads and is not
    /// handing leadership over.
    pub fn accepts_proposals(&self) -> bool {
        self.role == Role::Leader && self.transfer.is_none()
    }

    /// Hands leadership to `to` once it holds our whole log (TimeoutNow). Proposals are
    /// refused meanwhile; the handover is dropped after an election timeout.
    pub fn transfer_leadership(&mut self, to: ReplicaId, out: &mut Vec<Action>) -> Result<()> {
        if self.role != Role::Leader {
            return Err(ReplicationError::NotLeader {
                replica: self.config.id,
                term: self.hard.term,
                leader: self.leader,
            });
        }
        if !self.progress.iter().any(|p| p.id == to) || !self.membership().is_voter(to) {
            return Err(ReplicationError::Config {
                reason: format!("replica {to} is not a voter of this group"),
            });
        }
        self.transfer = Some((to, self.ticks + u64::from(self.config.election_ticks), false));
        self.maybe_send_timeout_now(out);
        Ok(())
    }

    fn maybe_send_timeout_now(&mut self, out: &mut Vec<Action>) {
        let Some((to, deadline, false)) = self.transfer else { return };
        let caught_up =
            self.progress.iter().any(|p| p.id == to && p.match_end == self.log_end && !p.recovering);
        if caught_up {
            self.transfer = Some((to, deadline, true));
            self.send(to, Body::TimeoutNow, out);
        }
    }
}

/// What a leader knows of one follower, for operators (in-sync replicas, lag).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FollowerStatus {
    pub id: ReplicaId,
    /// The follower's log matches the leader's up to here.
    pub match_end: i64,
    /// ... and is durable up to here (what counts toward the write quorum).
    pub acked_end: i64,
    /// Ticks since the leader last heard from it.
    pub silent_ticks: u64,
    /// Ticks since its acknowledged offset last moved.
    pub stalled_ticks: u64,
    /// Ticks since its durable log last held all of the leader's as of then (`u64::MAX`:
    /// not since this leader's view of it started): what decides whether it is in sync.
    pub behind_ticks: u64,
    pub recovering: bool,
}

impl RaftGroup {
    /// The leader's view of each follower, learners included; empty unless this replica leads.
    pub fn followers(&self) -> Vec<FollowerStatus> {
        if self.role != Role::Leader {
            return Vec::new();
        }
        self.progress
            .iter()
            .map(|p| FollowerStatus {
                id: p.id,
                match_end: p.match_end,
                acked_end: p.acked_end,
                silent_ticks: self.ticks.saturating_sub(p.last_heard_tick),
                stalled_ticks: self.ticks.saturating_sub(p.last_progress_tick),
                behind_ticks: p.caught_up_tick.map_or(u64::MAX, |t| self.ticks.saturating_sub(t)),
                recovering: p.says_recovering,
            })
            .collect()
    }
}

/// Whether a message is within the limits a sound peer keeps: an append of at most
/// `APPEND_BATCHES_MAX` batches and `APPEND_BYTES_MAX` bytes (or one batch of a proposal's
/// size: the leader always sends at least one), a rejection of at most `EPOCH_HINTS_MAX`
/// epochs. Raft drops what it cannot parse; so is this.
fn within_limits(body: &Body) -> bool {
    match body {
        Body::Append(append) => {
            let bytes: usize = append.batches.iter().map(Bytes::len).sum();
            let one_proposal = append.batches.len() == 1 && bytes <= PROPOSAL_BYTES_MAX;
            append.batches.len() <= APPEND_BATCHES_MAX && (bytes <= APPEND_BYTES_MAX || one_proposal)
        }
        Body::AppendResponse(response) => response.epochs.len() <= EPOCH_HINTS_MAX,
        Body::StartAt(start_at) => start_at.memberships.len() <= MEMBERSHIPS_SENT_MAX,
        _ => true,
    }
}

/// Whether a follower's epoch tail can be true: epochs and start offsets strictly growing,
/// every start within `[0, tail_end]`.
fn honest_tail(tail: &[crate::epoch::EpochStart], tail_end: i64) -> bool {
    let in_log = tail.iter().all(|s| (0..=tail_end).contains(&s.start_offset) && s.epoch >= 0);
    let growing = tail.windows(2).all(|w| w[0].epoch < w[1].epoch && w[0].start_offset < w[1].start_offset);
    in_log && growing
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_core::SeedableRng;

    struct NoLog;
    impl LogRead for NoLog {
        fn read(&self, _: i64, _: usize, _: &mut Vec<Bytes>) {}
    }

    fn config(id: ReplicaId, voters: &[ReplicaId]) -> Config {
        Config {
            id,
            voters: voters.to_vec(),
            quorum: Quorum::new(voters.len() as u32, voters.len() as u32 / 2 + 1).expect("valid"),
            heartbeat_ticks: 2,
            election_ticks: 10,
            learners: Vec::new(),
            planted_bug: None,
        }
    }

    fn group(id: ReplicaId, voters: &[ReplicaId]) -> RaftGroup {
        let rng = XorShiftRng::seed_from_u64(u64::from(id));
        RaftGroup::new(config(id, voters), Restore::default(), rng, &mut Vec::new()).expect("valid config")
    }

    fn persisted(g: &mut RaftGroup, out: &mut Vec<Action>) {
        let state = g.hard_state();
        g.notice(LogNotice::HardStatePersisted(state), out);
    }

    #[test]
    fn a_single_voter_elects_itself_and_commits_only_what_is_durable() {
        let mut g = group(1, &[1]);
        let mut out = Vec::new();
        for _ in 0..30 {
            g.tick(&NoLog, &mut out);
        }
        assert_eq!(g.role(), Role::Leader);
        assert_eq!(g.log_end(), 1, "the epoch-start batch took offset 0");
        assert_eq!(g.high_watermark(), 0, "nothing is durable yet");
        let (base, end) = g
            .propose(vec![batch::build(&[(None, b"x"), (None, b"y")], 0, 0)], &NoLog, &mut out)
            .expect("leader");
        assert_eq!((base, end), (1, 3));
        g.notice(LogNotice::Durable { end_offset: 2, truncations: 0 }, &mut out);
        assert_eq!(g.high_watermark(), 2);
        g.notice(LogNotice::Durable { end_offset: 3, truncations: 7 }, &mut out);
        assert_eq!(g.high_watermark(), 2, "a stale truncation count is ignored");
        assert!(g.propose(vec![vec![0; 70]], &NoLog, &mut out).is_err(), "a bad batch is refused");
    }

    #[test]
    fn a_vote_leaves_only_after_the_hard_state_is_persisted() {
        let mut g = group(2, &[1, 2, 3]);
        let mut out = Vec::new();
        let vote = Message {
            from: 1,
            to: 2,
            term: 1,
            body: Body::Vote { last_epoch: -1, log_end: 0, transfer: false },
        };
        g.receive(vote, &NoLog, &mut out);
        assert!(out.iter().any(|a| matches!(a, Action::PersistHardState(h) if h.voted_for == Some(1))));
        assert!(!out.iter().any(|a| matches!(a, Action::Send(_))), "held until persisted: {out:?}");
        out.clear();
        persisted(&mut g, &mut out);
        assert!(matches!(
            &out[..],
            [Action::Send(Message { body: Body::VoteResponse { granted: true }, .. })]
        ));
        // A second candidate of the same term is refused.
        out.clear();
        let other = Message {
            from: 3,
            to: 2,
            term: 1,
            body: Body::Vote { last_epoch: -1, log_end: 0, transfer: false },
        };
        g.receive(other, &NoLog, &mut out);
        assert!(matches!(
            &out[..],
            [Action::Send(Message { body: Body::VoteResponse { granted: false }, .. })]
        ));
    }

    /// The log check of a vote binds a replica that is or was a voter; one that never was (a
    /// learner being added) votes whatever the candidate's log: its copies never counted.
    #[test]
    fn only_a_replica_ever_a_voter_refuses_a_vote_for_its_log() {
        let vote_after_holding_epoch_3 = |mut g: RaftGroup| {
            let mut out = Vec::new();
            let id = g.config.id;
            let from_leader = Message { to: id, ..append(3, 0, -1, 0, vec![stamped(0, 3)]) };
            g.receive(from_leader, &NoLog, &mut out);
            persisted(&mut g, &mut out);
            assert_eq!((g.epochs.last_epoch(), g.log_end()), (3, 1));
            for _ in 0..25 {
                g.tick(&NoLog, &mut out); // past the leader's lease, which ignores votes
            }
            out.clear();
            let body = Body::Vote { last_epoch: 2, log_end: 5, transfer: false };
            g.receive(Message { from: 2, to: id, term: 4, body }, &NoLog, &mut out);
            persisted(&mut g, &mut out);
            out.iter().any(|a| {
                matches!(a, Action::Send(Message { body: Body::VoteResponse { granted: true }, .. }))
            })
        };
        let learner = {
            let config = Config { learners: vec![4], ..config(4, &[1, 2, 3]) };
            RaftGroup::new(config, Restore::default(), XorShiftRng::seed_from_u64(4), &mut Vec::new())
                .expect("valid config")
        };
        assert!(vote_after_holding_epoch_3(learner), "a learner never a voter grants");
        assert!(!vote_after_holding_epoch_3(group(3, &[1, 2, 3])), "a voter with a newer log refuses");
    }

    fn append(term: i32, prev_end: i64, prev_epoch: i32, commit_end: i64, batches: Vec<Bytes>) -> Message {
        Message {
            from: 1,
            to: 2,
            term,
            body: Body::Append(Append { prev_end, prev_epoch, commit_end, log_start: 0, seq: 0, batches }),
        }
    }

    fn stamped(base: i64, epoch: i32) -> Bytes {
        let mut b = batch::build(&[(None, b"v")], 0, 0);
        batch::stamp(&mut b, base, epoch);
        Bytes::from(b)
    }

    /// A batch of `records` one-byte records at `base`, stamped with `epoch`.
    fn stamped_records(base: i64, epoch: i32, records: usize) -> Bytes {
        let values: Vec<(Option<&[u8]>, &[u8])> = (0..records).map(|_| (None, &b"v"[..])).collect();
        let mut b = batch::build(&values, 0, 0);
        batch::stamp(&mut b, base, epoch);
        Bytes::from(b)
    }

    #[test]
    fn a_batch_claiming_a_span_held_in_another_epoch_is_refused_not_a_panic() {
        // The follower holds offset 0 in epoch 1 and offset 1 in epoch 3.
        let mut g = group(2, &[1, 2, 3]);
        let mut out = Vec::new();
        g.receive(append(3, 0, -1, 0, vec![stamped(0, 1), stamped(1, 3)]), &NoLog, &mut out);
        persisted(&mut g, &mut out);
        assert_eq!(g.log_end(), 2);
        // A batch of epoch 1 claiming offsets 0..=1 (offsets and epoch are outside the CRC),
        // then one of epoch 2: taken as held, it let epoch 2 follow epoch 3 and panicked.
        out.clear();
        let forged = vec![stamped_records(0, 1, 2), stamped(2, 2)];
        g.receive(append(3, 0, -1, 0, forged), &NoLog, &mut out);
        assert_eq!(g.log_end(), 2, "nothing appended: {out:?}");
        // An epoch older than the log's last is refused even right after what we hold.
        g.receive(append(3, 2, 3, 0, vec![stamped(2, 2)]), &NoLog, &mut out);
        assert_eq!(g.log_end(), 2);
    }

    #[test]
    fn a_rejection_with_impossible_epochs_is_ignored_by_the_leader() {
        let tail = |pairs: &[(i32, i64)]| -> Vec<crate::epoch::EpochStart> {
            pairs
                .iter()
                .map(|&(epoch, start_offset)| crate::epoch::EpochStart { epoch, start_offset })
                .collect()
        };
        assert!(honest_tail(&tail(&[(1, 0), (3, 4)]), 5));
        assert!(!honest_tail(&tail(&[(1, -7)]), 5), "a start below 0");
        assert!(!honest_tail(&tail(&[(1, 0), (3, 9)]), 5), "a start past the follower's end");
        assert!(!honest_tail(&tail(&[(3, 0), (1, 4)]), 5), "epochs out of order");
        assert!(!honest_tail(&tail(&[(1, 4), (3, 2)]), 5), "starts out of order");
    }

    #[test]
    fn a_term_query_from_an_older_term_is_answered_with_ours() {
        let mut g = group(2, &[1, 2, 3]);
        let mut out = Vec::new();
        g.receive(append(3, 0, -1, 0, vec![]), &NoLog, &mut out);
        persisted(&mut g, &mut out);
        out.clear();
        // A replica that lost its disk starts again from term 0 and asks.
        g.receive(
            Message { from: 1, to: 2, term: 0, body: Body::TermQuery { disk_id: 7 } },
            &NoLog,
            &mut out,
        );
        let answered = out.iter().any(|a| {
            matches!(a, Action::Send(Message { to: 1, term: 3, body: Body::TermAnswer { disk_id: 7 }, .. }))
        });
        assert!(answered, "{out:?}");
    }

    #[test]
    fn a_follower_refuses_bad_input_and_never_cuts_committed_data() {
        let mut g = group(2, &[1, 2, 3]);
        let mut out = Vec::new();
        g.receive(append(1, 0, -1, 0, vec![stamped(0, 1), stamped(1, 1)]), &NoLog, &mut out);
        persisted(&mut g, &mut out);
        assert_eq!(g.log_end(), 2);
        g.notice(LogNotice::Durable { end_offset: 2, truncations: 0 }, &mut out);
        g.receive(append(1, 2, 1, 2, vec![]), &NoLog, &mut out);
        assert_eq!(g.high_watermark(), 2);
        // Wrong addressee: nothing changes.
        let mut elsewhere = append(5, 0, -1, 0, vec![stamped(0, 5)]);
        elsewhere.to = 3;
        g.receive(elsewhere, &NoLog, &mut out);
        assert_eq!(g.term(), 1);
        // A corrupt batch ends the message; nothing after it is appended.
        let mut corrupt = stamped(2, 1).to_vec();
        *corrupt.last_mut().expect("non-empty") ^= 0xff;
        g.receive(append(1, 2, 1, 2, vec![Bytes::from(corrupt), stamped(3, 1)]), &NoLog, &mut out);
        assert_eq!(g.log_end(), 2);
        // A newer leader whose batches conflict below the commit point is ignored, not obeyed.
        out.clear();
        g.receive(append(2, 0, -1, 0, vec![stamped(0, 2)]), &NoLog, &mut out);
        assert!(!out.iter().any(|a| matches!(a, Action::Truncate { .. })), "{out:?}");
        assert_eq!(g.log_end(), 2);
        // An offset past the log is refused with where the log ends.
        out.clear();
        g.receive(append(2, 10, 2, 0, vec![]), &NoLog, &mut out);
        persisted(&mut g, &mut out);
        let refusal = out.iter().find_map(|a| match a {
            Action::Send(Message { body: Body::AppendResponse(r), .. }) => Some(r.clone()),
            _ => None,
        });
        let refusal = refusal.expect("an answer");
        assert!(!refusal.accepted);
        assert_eq!(refusal.log_end, 2);
    }

    use crate::sim::log::SimLog;

    /// Carries out `out` as a shell would, at once: appends and truncations on `log`, hard
    /// states confirmed persisted (which releases held messages). Returns the messages sent.
    fn carry(g: &mut RaftGroup, log: &mut SimLog, out: &mut Vec<Action>) -> Vec<Message> {
        let mut sent = Vec::new();
        while !out.is_empty() {
            for action in std::mem::take(out) {
                match action {
                    Action::Send(m) => sent.push(m),
                    Action::Append { batches } => batches.into_iter().for_each(|b| {
                        log.append(b);
                    }),
                    Action::Truncate { end_offset, .. } => log.truncate(end_offset),
                    Action::StartLog { .. } => unreachable!("no log is trimmed here"),
                    Action::PersistHardState(h) => g.notice(LogNotice::HardStatePersisted(h), out),
                    Action::Commit { .. } | Action::Role { .. } => {}
                }
            }
        }
        sent
    }

    fn deliver(g: &mut RaftGroup, log: &mut SimLog, m: Message) -> Vec<Message> {
        let mut out = Vec::new();
        g.receive(m, log, &mut out);
        carry(g, log, &mut out)
    }

    fn message(from: ReplicaId, to: ReplicaId, term: i32, body: Body) -> Message {
        Message { from, to, term, body }
    }

    /// Ticks `g` until it pre-votes, and has `voters` grant its pre-vote and vote.
    fn elect(g: &mut RaftGroup, log: &mut SimLog, voters: &[ReplicaId]) -> Vec<Message> {
        let mut out = Vec::new();
        while g.role() != Role::PreCandidate {
            g.tick(log, &mut out);
        }
        let mut sent = carry(g, log, &mut out);
        let term = g.term() + 1;
        for &v in voters {
            sent.extend(deliver(g, log, message(v, g.id(), term, Body::PreVoteResponse { granted: true })));
        }
        for &v in voters {
            sent.extend(deliver(g, log, message(v, g.id(), term, Body::VoteResponse { granted: true })));
        }
        assert_eq!(g.role(), Role::Leader);
        g.tick(log, &mut out); // the first heartbeat
        sent.extend(carry(g, log, &mut out));
        sent
    }

    /// Three replicas wired together: messages delivered at once, appends made durable
    /// at once (followers acknowledge only what is durable).
    struct Trio {
        groups: Vec<RaftGroup>,
        logs: Vec<SimLog>,
        /// A replica whose messages are dropped (its process died).
        down: Option<ReplicaId>,
    }

    impl Trio {
        fn new() -> Trio {
            Trio {
                groups: (1..=3).map(|id| group(id, &[1, 2, 3])).collect(),
                logs: vec![SimLog::default(); 3],
                down: None,
            }
        }

        /// Carries out `out` for replica `id`; returns what it sent.
        fn carry(&mut self, id: ReplicaId, out: &mut Vec<Action>) -> Vec<Message> {
            let i = id as usize - 1;
            let mut sent = Vec::new();
            while !out.is_empty() {
                let mut appended = false;
                for action in std::mem::take(out) {
                    match action {
                        Action::Send(m) => sent.push(m),
                        Action::Append { batches } => {
                            batches.into_iter().for_each(|b| {
                                self.logs[i].append(b);
                            });
                            appended = true;
                        }
                        Action::Truncate { end_offset, .. } => self.logs[i].truncate(end_offset),
                        Action::StartLog { start, truncations } => {
                            // Replica 1 leads wherever this test trims: its batches below
                            // `start` are the committed ones.
                            let count = self.logs[0].index_of(start);
                            let committed = self.logs[0].batches[..count].to_vec();
                            self.logs[i].start_at(start, &committed);
                            let notice = LogNotice::Durable { end_offset: start, truncations };
                            self.groups[i].notice(notice, out);
                        }
                        Action::PersistHardState(h) => {
                            self.groups[i].notice(LogNotice::HardStatePersisted(h), out)
                        }
                        Action::Commit { .. } | Action::Role { .. } => {}
                    }
                }
                if appended {
                    let end_offset = self.logs[i].end();
                    self.groups[i].notice(LogNotice::Durable { end_offset, truncations: 0 }, out);
                }
            }
            sent
        }

        /// Delivers `queue` and every answer until none is left; returns all delivered.
        fn settle(&mut self, mut queue: Vec<Message>) -> Vec<Message> {
            let mut delivered = Vec::new();
            while !queue.is_empty() {
                for m in std::mem::take(&mut queue) {
                    if self.down == Some(m.to) {
                        continue;
                    }
                    let (i, mut out) = (m.to as usize - 1, Vec::new());
                    self.groups[i].receive(m.clone(), &self.logs[i], &mut out);
                    queue.extend(self.carry(m.to, &mut out));
                    delivered.push(m);
                }
            }
            delivered
        }

        fn tick(&mut self, id: ReplicaId) -> Vec<Message> {
            let (i, mut out) = (id as usize - 1, Vec::new());
            self.groups[i].tick(&self.logs[i], &mut out);
            self.carry(id, &mut out)
        }

        /// Replica 1 dies: its messages are dropped, and replicas 2 and 3 see its connection
        /// reset.
        fn replica_1_dies(&mut self) {
            self.down = Some(1);
            for g in &mut self.groups[1..] {
                g.peer_unreachable(1);
            }
        }

        /// Ticks replicas 2 and 3 (1 is down) until one of them leads, within `ticks` ticks
        /// (an election timeout of the tests' configuration is 10); returns the ticks taken.
        fn followers_elect_within(&mut self, ticks: u32) -> u32 {
            let mut ticked = 0;
            while !self.groups[1..].iter().any(|g| g.role() == Role::Leader) {
                ticked += 1;
                assert!(ticked <= ticks, "no leader within {ticks} ticks of the loss");
                let mut sent = self.tick(2);
                sent.extend(self.tick(3));
                self.settle(sent);
            }
            ticked
        }

        /// Ticks replica 1 until it leads.
        fn elect_first(&mut self) {
            while self.groups[0].role() != Role::Leader {
                let sent = self.tick(1);
                self.settle(sent);
            }
        }

        /// Replica 1 (the leader) proposes one batch and ticks; returns all delivered.
        fn propose_and_tick(&mut self) -> Vec<Message> {
            let mut out = Vec::new();
            let proposal = vec![batch::build(&[(None, b"x")], 0, 0)];
            self.groups[0].propose(proposal, &self.logs[0], &mut out).expect("leader");
            let mut sent = self.carry(1, &mut out);
            sent.extend(self.tick(1));
            self.settle(sent)
        }
    }

    /// Redpanda's heartbeat manager's rule: no heartbeat to a follower that got an append
    /// within the interval; idle, one per interval, carrying the commit point.
    #[test]
    fn a_follower_that_just_got_an_append_gets_no_heartbeat() {
        let mut trio = Trio::new();
        trio.elect_first();
        let heartbeats = |sent: &[Message]| {
            let is_heartbeat = |m: &Message| matches!(&m.body, Body::Append(a) if a.batches.is_empty());
            sent.iter().filter(|m| m.from == 1 && is_heartbeat(m)).count()
        };
        let mut busy = Vec::new();
        for _ in 0..8 {
            busy.extend(trio.propose_and_tick());
        }
        let leader_hw = trio.groups[0].high_watermark();
        assert_eq!(leader_hw, trio.logs[0].end(), "every proposal committed at once");
        assert!(busy.iter().any(|m| matches!(&m.body, Body::Append(a) if !a.batches.is_empty())));
        assert_eq!(heartbeats(&busy), 0, "an append every tick: {busy:?}");
        let mut idle = Vec::new();
        for _ in 0..4 {
            let sent = trio.tick(1);
            idle.extend(trio.settle(sent));
        }
        assert!(heartbeats(&idle) >= 2, "idle, one per follower and interval: {idle:?}");
        for follower in &trio.groups[1..] {
            assert_eq!(follower.high_watermark(), leader_hw, "the commit point reached the followers");
        }
    }

    /// Kafka's lastCaughtUpTime: a follower that answers every append stays caught up as of
    /// the last round trip; one that holds less than the leader had is behind by the ticks
    /// since it last held all of it, and caught up again once it does.
    #[test]
    fn a_follower_is_behind_by_the_ticks_since_it_last_held_the_leaders_log() {
        let mut trio = Trio::new();
        trio.elect_first();
        let behind = |trio: &Trio, id: ReplicaId| {
            let followers = trio.groups[0].followers();
            followers.iter().find(|f| f.id == id).expect("a follower").behind_ticks
        };
        trio.propose_and_tick();
        assert!(behind(&trio, 3) <= 1, "caught up: {:?}", trio.groups[0].followers());
        trio.down = Some(3);
        for _ in 0..20 {
            trio.propose_and_tick();
        }
        assert!(behind(&trio, 2) <= 1, "answers every append: {:?}", trio.groups[0].followers());
        assert!(
            behind(&trio, 3) >= 20,
            "held none of the last 20 proposals: {:?}",
            trio.groups[0].followers()
        );
        trio.down = None;
        // Its next answers (to the heartbeat and the appends resent) catch it up.
        for _ in 0..(trio.groups[0].config.election_ticks * 2) {
            trio.propose_and_tick();
        }
        assert!(behind(&trio, 3) <= 1, "caught up again: {:?}", trio.groups[0].followers());
    }

    /// The followers replica `leader` (1-based) sees in sync: heard of lately as holding
    /// its log, not recovering.
    fn in_sync_of(trio: &Trio, leader: ReplicaId) -> Vec<ReplicaId> {
        let followers = trio.groups[leader as usize - 1].followers();
        followers.iter().filter(|f| f.behind_ticks <= 1 && !f.recovering).map(|f| f.id).collect()
    }

    /// Replica 1 leads three proposals, all in sync; it dies, replica 2 campaigns and
    /// replica 3 votes for it. Only election messages are delivered: returns replica 2's
    /// first messages as leader to replica 3, undelivered.
    fn replica_2_wins_and_has_heard_no_answer() -> (Trio, Vec<Message>) {
        let mut trio = Trio::new();
        trio.elect_first();
        for _ in 0..3 {
            trio.propose_and_tick();
        }
        assert_eq!(in_sync_of(&trio, 1), vec![2, 3]);
        trio.replica_1_dies();
        let mut held = Vec::new();
        while trio.groups[1].role() != Role::Leader {
            let mut queue = trio.tick(2);
            while let Some(m) = queue.pop() {
                let election = matches!(
                    m.body,
                    Body::PreVote { .. }
                        | Body::PreVoteResponse { .. }
                        | Body::Vote { .. }
                        | Body::VoteResponse { .. }
                );
                if !election {
                    held.push(m);
                } else if m.to != 1 {
                    let (i, mut out) = (m.to as usize - 1, Vec::new());
                    trio.groups[i].receive(m.clone(), &trio.logs[i], &mut out);
                    queue.extend(trio.carry(m.to, &mut out));
                }
            }
        }
        held.retain(|m| m.from == 2 && m.to == 3);
        (trio, held)
    }

    /// A new leader counts the followers that voted for it in sync from the start (Kafka's
    /// new leader keeps the in-sync replicas it is given), not one that did not vote (the
    /// dead leader), and keeps a voter whose first answer says its durable log holds what
    /// the leader's did at the election. The first heartbeat goes out with the win.
    #[test]
    fn a_new_leader_counts_its_voters_in_sync_from_the_start() {
        let (mut trio, held) = replica_2_wins_and_has_heard_no_answer();
        assert_eq!(in_sync_of(&trio, 2), vec![3], "the voter, before any answer; not the dead leader");
        let heartbeat = |m: &Message| matches!(&m.body, Body::Append(a) if a.batches.is_empty());
        assert!(held.iter().any(heartbeat), "the first heartbeat left with the win: {held:?}");
        // The first answer alone (to the heartbeat): caught up as of the election.
        let first = held.iter().position(heartbeat).expect("checked");
        let mut out = Vec::new();
        trio.groups[2].receive(held[first].clone(), &trio.logs[2], &mut out);
        let answer = trio.carry(3, &mut out).into_iter().find(|m| m.to == 2).expect("an answer");
        let mut out = Vec::new();
        trio.groups[1].receive(answer, &trio.logs[1], &mut out);
        assert_eq!(in_sync_of(&trio, 2), vec![3], "its first answer says it held the log");
        assert_eq!(trio.groups[1].followers()[0].acked_end, 0, "but the commit point counts none of it yet");
    }

    /// A voter whose first answer shows its durable log short of the leader's as of the
    /// election is out of sync until it catches up.
    #[test]
    fn a_voter_whose_first_answer_is_short_of_the_new_leaders_log_is_out_of_sync() {
        let (mut trio, held) = replica_2_wins_and_has_heard_no_answer();
        let end = trio.groups[1].log_end();
        // As a shell answers that has not made its last append durable.
        let short = AppendResponse {
            accepted: true,
            match_end: end - 1,
            acked_end: end - 2,
            log_end: end - 1,
            epochs: Vec::new(),
            recovering: false,
            seq: 1,
            disk_id: trio.groups[2].hard_state().disk_id,
        };
        let (term, mut out) = (trio.groups[1].term(), Vec::new());
        trio.groups[1].receive(message(3, 2, term, Body::AppendResponse(short)), &trio.logs[1], &mut out);
        let resent = trio.carry(2, &mut out);
        assert_eq!(in_sync_of(&trio, 2), Vec::<ReplicaId>::new(), "short of the election's log");
        // Its next answers (to what the leader sent) catch it up.
        trio.settle(resent.into_iter().chain(held).collect());
        assert_eq!(in_sync_of(&trio, 2), vec![3], "caught up");
    }

    /// A new leader that never heard from a follower (it was down at the election) knows no
    /// match point for it: its heartbeats and a stalled probe must not fall back to offset 0,
    /// where every log matches, or the follower back from its restart is sent the whole log
    /// again (it was: a restarted old leader took up to 107 s to catch up).
    #[test]
    fn a_follower_back_under_a_new_leader_is_not_sent_the_whole_log_again() {
        let mut trio = Trio::new();
        trio.elect_first();
        for _ in 0..20 {
            trio.propose_and_tick();
        }
        trio.down = Some(3);
        let mut out = Vec::new();
        trio.groups[0].transfer_leadership(2, &mut out).expect("2 is caught up");
        let sent = trio.carry(1, &mut out);
        trio.settle(sent);
        for _ in 0..4 {
            let sent = trio.tick(1);
            trio.settle(sent);
        }
        assert_eq!(trio.groups[1].role(), Role::Leader, "the handover made 2 the leader");
        // Long enough for the probe to 3 to stall and be sent again, several times.
        for _ in 0..(trio.groups[1].config.election_ticks * 4) {
            let sent = trio.tick(2);
            trio.settle(sent);
        }
        trio.down = None;
        let mut to_three = Vec::new();
        for _ in 0..(trio.groups[1].config.election_ticks * 2) {
            let sent = trio.tick(2);
            to_three.extend(trio.settle(sent).into_iter().filter(|m| m.from == 2 && m.to == 3));
        }
        let resent_from_zero = to_three
            .iter()
            .filter(|m| matches!(&m.body, Body::Append(a) if a.prev_end == 0 && !a.batches.is_empty()))
            .count();
        assert_eq!(resent_from_zero, 0, "3 holds the log up to the handover: {to_three:?}");
        assert_eq!(trio.logs[2].end(), trio.logs[1].end(), "3 caught up");
    }

    /// A leader's appends and heartbeats carry its log start: its followers learn where it
    /// cut its log (their shell cuts theirs there), and may trim there; a start past the
    /// commit point an append carries is no fact and is not taken.
    #[test]
    fn followers_learn_the_leaders_log_start() {
        let mut trio = Trio::new();
        trio.elect_first();
        for _ in 0..10 {
            trio.propose_and_tick();
        }
        assert_eq!(trio.groups[1].leader_log_start(), 0);
        let start = trio.groups[0].high_watermark();
        trio.groups[0].trim(start).expect("committed and durable");
        trio.logs[0].start = start;
        for _ in 0..4 {
            let sent = trio.tick(1); // idle: heartbeats alone
            trio.settle(sent);
        }
        for follower in [1, 2] {
            let group = &mut trio.groups[follower];
            assert_eq!(group.leader_log_start(), start);
            group.trim(group.leader_log_start()).expect("committed and durable here too");
            trio.logs[follower].start = start;
        }
        trio.propose_and_tick();

        let mut log = SimLog::default();
        let mut follower = group(2, &[1, 2, 3]);
        let told = |log_start| Append {
            prev_end: 0,
            prev_epoch: -1,
            commit_end: 0,
            log_start,
            seq: 0,
            batches: vec![],
        };
        deliver(&mut follower, &mut log, message(1, 2, 1, Body::Append(told(5))));
        assert_eq!(follower.leader_log_start(), 0, "a start past the commit point is not taken");
    }

    /// A follower down while the leader's log was trimmed past its end (retention) is told to
    /// start its log at the leader's start, then catches up from there; no read below the
    /// start is asked for (the log asserts it).
    #[test]
    fn a_follower_behind_the_leaders_log_start_starts_there_and_catches_up() {
        let mut trio = Trio::new();
        trio.elect_first();
        trio.propose_and_tick();
        trio.down = Some(3);
        for _ in 0..20 {
            trio.propose_and_tick();
        }
        let start = trio.groups[0].high_watermark();
        assert!(start > trio.logs[2].end(), "3 missed what is trimmed");
        assert!(trio.groups[0].trim(start + 1).is_err(), "nothing past the commit point");
        trio.groups[0].trim(start).expect("committed and durable");
        trio.logs[0].start = start;
        trio.down = None;
        let mut to_three = Vec::new();
        for _ in 0..(trio.groups[0].config.election_ticks * 2) {
            to_three.extend(trio.propose_and_tick().into_iter().filter(|m| m.to == 3));
        }
        let told: Vec<i64> = to_three
            .iter()
            .filter_map(|m| match &m.body {
                Body::StartAt(s) => Some(s.start),
                _ => None,
            })
            .collect();
        assert!(!told.is_empty() && told.iter().all(|s| *s == start), "{told:?}");
        for _ in 0..4 {
            let sent = trio.tick(1); // idle: the heartbeats carry the last commit point
            trio.settle(sent);
        }
        let three = &trio.groups[2];
        assert_eq!((three.log_start(), three.log_end()), (start, trio.groups[0].log_end()));
        assert_eq!(three.high_watermark(), trio.groups[0].high_watermark());
        assert_eq!(trio.logs[2].batches, trio.logs[0].batches, "the same log, start included");
        assert_eq!(three.epochs().epoch_at(start - 1, three.log_end()), Some(trio.groups[0].term()));
    }

    /// A follower whose log starts past where an append starts (it trimmed its own log below
    /// its commit point): everything below its start is committed, so it matches; the
    /// batches below its start are skipped, never read, and the rest appended.
    #[test]
    fn an_append_from_below_a_followers_start_matches_and_skips_what_is_below() {
        let mut trio = Trio::new();
        trio.elect_first();
        for _ in 0..10 {
            trio.propose_and_tick();
        }
        let start = trio.groups[1].high_watermark();
        trio.groups[1].trim(start).expect("committed and durable on 2");
        trio.logs[1].start = start;
        // The leader's log from well below 2's start (a point both hold, as far as epochs
        // tell), plus one batch more than 2 holds.
        trio.down = Some(2);
        trio.propose_and_tick();
        trio.down = None;
        let prev_end = trio.logs[0].ends[2];
        assert!(prev_end < start);
        let mut batches = Vec::new();
        trio.logs[0].read(prev_end, usize::MAX, &mut batches);
        let (term, prev_epoch) = (trio.groups[0].term(), trio.groups[0].prev_epoch(prev_end));
        let append = Append { prev_end, prev_epoch, commit_end: start, log_start: 0, seq: 1_000, batches };
        let sent = trio.settle(vec![message(1, 2, term, Body::Append(append))]);
        let answer = sent.iter().rev().find_map(|m| match &m.body {
            Body::AppendResponse(r) if m.from == 2 && r.seq == 1_000 => Some(r.clone()),
            _ => None,
        });
        let answer = answer.expect("2 answered");
        assert!(answer.accepted && answer.match_end == trio.groups[0].log_end(), "{answer:?}");
        assert_eq!(trio.logs[1].batches, trio.logs[0].batches, "the batch past its end appended");
        assert_eq!(trio.groups[1].log_start(), start);
    }

    /// A `StartAt` to a follower that holds the entry before the start changes nothing in its
    /// log: it is acknowledged as an append would be.
    #[test]
    fn a_start_at_a_follower_already_holds_keeps_its_log() {
        let mut trio = Trio::new();
        trio.elect_first();
        for _ in 0..10 {
            trio.propose_and_tick();
        }
        let start = trio.groups[0].high_watermark();
        let before = trio.logs[2].batches.clone();
        let term = trio.groups[0].term();
        let start_at = StartAt {
            start,
            prev_epoch: term,
            commit_end: start,
            seq: 1_000,
            memberships: vec![(-1, trio.groups[0].membership().clone())],
        };
        let sent = trio.settle(vec![message(1, 3, term, Body::StartAt(start_at))]);
        assert!(sent.iter().any(|m| m.from == 3 && matches!(&m.body, Body::AppendResponse(r) if r.accepted)));
        assert_eq!(trio.logs[2].batches, before);
        assert_eq!(trio.groups[2].log_start(), 0);
    }

    /// A follower that lost its connection to the leader campaigns within half an election
    /// timeout; one whose peer still hears the leader does not get it replaced.
    #[test]
    fn a_lost_leader_connection_starts_an_election_early_but_never_against_a_live_leader() {
        let mut trio = Trio::new();
        trio.elect_first();
        let term = trio.groups[0].term();
        // Only replica 2 lost the connection; 3 still hears the leader: no new leader.
        trio.groups[1].peer_unreachable(1);
        for _ in 0..30 {
            let mut sent = trio.tick(1);
            sent.extend(trio.tick(2));
            sent.extend(trio.tick(3));
            trio.settle(sent);
        }
        assert_eq!((trio.groups[0].role(), trio.groups[0].term()), (Role::Leader, term));
        // The leader dies: both followers see its connection reset and elect one of them
        // within an election timeout (10 ticks), not after one.
        trio.replica_1_dies();
        trio.followers_elect_within(10);
    }

    /// Replica 2 would campaign first when the leader dies (its rank), but is just back: it
    /// lets replica 3 go first, which wins, whether or not replica 3 knows that 2 is back
    /// (knowing, 3 goes at the next tick).
    #[test]
    fn a_replica_just_back_lets_the_others_campaign_first() {
        for (two_says, three_says) in [(vec![], vec![]), (vec![2], vec![]), (vec![2], vec![2])] {
            let case = format!("2 says {two_says:?} is back, 3 says {three_says:?}");
            let mut trio = Trio::new();
            trio.elect_first();
            let last = !two_says.is_empty();
            trio.groups[1].set_campaign_last(two_says);
            trio.groups[2].set_campaign_last(three_says.clone());
            trio.replica_1_dies();
            let ticks = trio.followers_elect_within(10);
            let expected = if last { [Role::Follower, Role::Leader] } else { [Role::Leader, Role::Follower] };
            assert_eq!([trio.groups[1].role(), trio.groups[2].role()], expected, "{case}");
            if !three_says.is_empty() {
                assert!(ticks <= 2, "{case}: replica 3 went at once, elected after {ticks} ticks");
            }
        }
    }

    /// Replica 2 saw the leader's connection end and asks at once; replica 3, which has not
    /// yet, refuses for its lease, then sees it too, but is just back and ranks last. Replica
    /// 2 asks again a quarter of an election timeout later and wins, before 3's turn.
    #[test]
    fn a_pre_vote_refused_for_a_lease_after_the_leader_was_lost_is_asked_again_soon() {
        let mut trio = Trio::new();
        trio.elect_first();
        trio.groups[2].set_campaign_last(vec![3]);
        trio.down = Some(1);
        trio.groups[1].peer_unreachable(1);
        let sent = trio.tick(2);
        trio.settle(sent);
        assert_eq!(trio.groups[1].role(), Role::PreCandidate, "refused: 3 still counts on the leader");
        trio.groups[2].peer_unreachable(1);
        trio.followers_elect_within(10);
        assert_eq!(trio.groups[1].role(), Role::Leader, "replica 2 asked again before 3's turn");
    }

    /// Heartbeats a leader sent just before it died, handled after its followers saw its
    /// connection reset, neither renew their leases nor put their elections off: one of them
    /// still leads within an election timeout of the loss.
    #[test]
    fn what_a_dead_leader_sent_before_it_died_does_not_put_the_election_off() {
        let mut trio = Trio::new();
        trio.elect_first();
        for _ in 0..5 {
            let sent = trio.tick(1);
            trio.settle(sent);
        }
        let mut last_sent = Vec::new();
        while last_sent.is_empty() {
            last_sent = trio.tick(1).into_iter().filter(|m| matches!(m.body, Body::Append(_))).collect();
        }
        trio.replica_1_dies();
        trio.settle(last_sent);
        trio.followers_elect_within(10);
    }

    /// The follower whose turn comes first after the leader dies may hold the longer log and
    /// ask while the other still counts on the dead leader (it sees the loss a moment later):
    /// refused. When the other's turn comes, its shorter log is refused in turn; the replica
    /// with the longer log, refusing a pre-vote with no leader to count on, then campaigns
    /// soon instead of waiting out its election timeout (which made one kill -9 failover in
    /// thirty take 170-250 ms instead of ~20).
    #[test]
    fn a_replica_refusing_a_shorter_log_with_no_leader_campaigns_soon() {
        let mut trio = Trio::new();
        trio.elect_first();
        for _ in 0..3 {
            trio.propose_and_tick();
        }
        // Replica 1 appends a batch that reaches replica 2 only, and dies.
        let mut out = Vec::new();
        let proposal = vec![batch::build(&[(None, b"only 2 has it")], 0, 0)];
        trio.groups[0].propose(proposal, &trio.logs[0], &mut out).expect("leader");
        let mut sent = trio.carry(1, &mut out);
        sent.extend(trio.tick(1));
        sent.retain(|m| m.to == 2 && matches!(m.body, Body::Append(_)));
        assert!(!sent.is_empty(), "the leader sent replica 2 its append");
        trio.down = Some(1);
        trio.settle(sent);
        assert!(trio.logs[1].end() > trio.logs[2].end());
        // Replica 2 sees the loss first and asks at its next tick; 3 still counts on 1.
        trio.groups[1].peer_unreachable(1);
        let asked = trio.tick(2);
        let answers = trio.settle(asked);
        assert!(answers.iter().any(|m| m.from == 3 && m.body == Body::PreVoteResponse { granted: false }));
        trio.groups[2].peer_unreachable(1);
        // 3 asks at its turn (3 ticks on), is refused for its shorter log, and 2 asks again 3
        // ticks after that (its rank among 1 and 2): well within an election timeout (10).
        trio.followers_elect_within(8);
        assert_eq!(trio.groups[1].role(), Role::Leader);
    }

    fn granted_vote(sent: &[Message], to: ReplicaId, term: i32) -> bool {
        sent.iter().any(|m| m.to == to && m.term == term && m.body == Body::VoteResponse { granted: true })
    }

    fn vote(from: ReplicaId, to: ReplicaId, term: i32, last_epoch: i32, log_end: i64) -> Message {
        message(from, to, term, Body::Vote { last_epoch, log_end, transfer: true })
    }

    /// Fix for a lost disk with RF 5: answers from RF − E + 1 = 3 of the 4 peers do not show
    /// the term the lost disk voted in (the candidate's other voter answers before voting), so
    /// the replica waits for every voter before it votes or counts again.
    #[test]
    fn a_replica_that_lost_its_disk_never_votes_twice_in_a_term() {
        let voters = [1, 2, 3, 4, 5];
        let mut log = SimLog::default();
        let mut old = group(1, &voters);
        // Replica 2 campaigns in term 2 and gets our vote; the answer is still in flight
        // (with replica 3's vote and its own, it is leader of term 2) when the disk is lost.
        assert!(granted_vote(&deliver(&mut old, &mut log, vote(2, 1, 2, -1, 0)), 2, 2));
        let mut log = SimLog::default();
        let restore = Restore { disk_lost: true, ..Restore::default() };
        let mut out = Vec::new();
        let rng = XorShiftRng::seed_from_u64(9);
        let mut g = RaftGroup::new(config(1, &voters), restore, rng, &mut out).expect("valid");
        carry(&mut g, &mut log, &mut out);
        assert!(g.recovering());
        let disk_id = g.hard_state().disk_id;
        assert_ne!(disk_id, 0, "a new disk gets a new incarnation");
        for _ in 0..2 {
            g.tick(&log, &mut out);
        }
        let queried: Vec<ReplicaId> = carry(&mut g, &mut log, &mut out)
            .iter()
            .filter(|m| m.body == Body::TermQuery { disk_id })
            .map(|m| m.to)
            .collect();
        assert_eq!(queried, [2, 3, 4, 5]);
        // Replicas 3, 4 and 5 answer from term 1 (3 has not seen 2's vote request yet);
        // replica 4 leads term 1 and brings us its log and commit point.
        for from in [3, 4, 5] {
            deliver(&mut g, &mut log, message(from, 1, 1, Body::TermAnswer { disk_id }));
        }
        let start = Bytes::from({
            let mut b = batch::epoch_start(4, &voters);
            batch::stamp(&mut b, 0, 1);
            b
        });
        let from_4 = |prev_end, prev_epoch, batches| {
            let append = Append { prev_end, prev_epoch, commit_end: 1, log_start: 0, seq: 0, batches };
            Message { from: 4, to: 1, term: 1, body: Body::Append(append) }
        };
        deliver(&mut g, &mut log, from_4(0, -1, vec![start]));
        g.notice(LogNotice::Durable { end_offset: 1, truncations: 0 }, &mut out);
        carry(&mut g, &mut log, &mut out);
        deliver(&mut g, &mut log, from_4(1, 1, Vec::new()));
        assert!(g.recovering(), "replica 2 has not answered: it may hold a term we voted in");
        // Replica 5 campaigns in term 2 (4 handed over): granting would elect 5 with 3 and 4
        // while 2 leads term 2 with our lost vote.
        let sent = deliver(&mut g, &mut log, vote(5, 1, 2, 1, 1));
        assert!(!granted_vote(&sent, 5, 2), "voted twice in term 2: {sent:?}");
        // Replica 2 answers: we learn term 2, and still grant no vote in it.
        deliver(&mut g, &mut log, message(2, 1, 2, Body::TermAnswer { disk_id }));
        assert_eq!(g.term(), 2);
        let sent = deliver(&mut g, &mut log, vote(5, 1, 2, 1, 1));
        assert!(!granted_vote(&sent, 5, 2), "voted twice in term 2: {sent:?}");
    }

    /// Fix for a stale acknowledgement: an answer the follower sent before it lost its disk,
    /// delivered after the leader heard from the new disk, neither clears `recovering` nor
    /// raises `acked_end`, so the leader does not count the lost data toward W.
    #[test]
    fn a_stale_answer_from_a_lost_disk_neither_counts_nor_clears_recovering() {
        let mut log = SimLog::default();
        let mut g = group(1, &[1, 2, 3]);
        elect(&mut g, &mut log, &[2]);
        let mut out = Vec::new();
        g.propose(vec![batch::build(&[(None, b"x")], 0, 0)], &log, &mut out).expect("leader");
        carry(&mut g, &mut log, &mut out);
        g.notice(LogNotice::Durable { end_offset: 2, truncations: 0 }, &mut out);
        assert_eq!(g.high_watermark(), 0, "the leader alone is not W = 2");
        let term = g.term();
        let answer = |accepted: bool, end: i64, seq: u64, disk_id: u64, recovering: bool| {
            let response = AppendResponse {
                accepted,
                match_end: if accepted { end } else { 0 },
                acked_end: if accepted { end } else { 0 },
                log_end: end,
                epochs: Vec::new(),
                recovering,
                seq,
                disk_id,
            };
            message(2, 1, term, Body::AppendResponse(response))
        };
        // The old disk answers a first append (its disk is adopted, its word not yet taken).
        let sent = deliver(&mut g, &mut log, answer(true, 0, 0, 0, false));
        let seq_after = sent
            .iter()
            .filter_map(|m| match &m.body {
                Body::Append(a) if m.to == 2 => Some(a.seq),
                _ => None,
            })
            .max()
            .expect("the leader sends again to a newly adopted disk");
        // It holds and flushed everything, answers the next append, and loses its disk with
        // that answer in flight. The new disk answers first: recovering, holding nothing.
        let stale = answer(true, 2, seq_after, 0, false);
        deliver(&mut g, &mut log, answer(false, 0, seq_after, 77, true));
        assert_eq!(g.follower_view(2), Some((0, true)));
        deliver(&mut g, &mut log, stale);
        assert_eq!(g.follower_view(2), Some((0, true)), "a lost disk's answer counted");
        assert_eq!(g.high_watermark(), 0, "committed on the leader and a lost disk");
    }

    /// Fix for a replica that missed a membership change (or restarted from the initial
    /// one after losing its disk): it follows a leader it does not know as a member, and
    /// answers its term query, while answers from outsiders still count for nothing.
    #[test]
    fn a_replica_hears_a_leader_outside_the_membership_it_knows() {
        let mut log = SimLog::default();
        let mut g = group(3, &[1, 2, 3]);
        let append = Append {
            prev_end: 0,
            prev_epoch: -1,
            commit_end: 0,
            log_start: 0,
            seq: 4,
            batches: vec![stamped(0, 5)],
        };
        let sent = deliver(&mut g, &mut log, message(4, 3, 5, Body::Append(append)));
        assert_eq!((g.term(), g.leader()), (5, Some(4)));
        assert!(sent.iter().any(|m| m.to == 4 && matches!(&m.body, Body::AppendResponse(r) if r.accepted)));
        assert_eq!(g.log_end(), 1);
        let sent = deliver(&mut g, &mut log, message(6, 3, 0, Body::TermQuery { disk_id: 5 }));
        assert!(sent.iter().any(|m| m.to == 6 && m.term == 5 && m.body == Body::TermAnswer { disk_id: 5 }));
        // A candidate counts only its own voters' votes: 9 and the learner 4 elect no one.
        let mut config = config(1, &[1, 2, 3]);
        config.learners = vec![4];
        let rng = XorShiftRng::seed_from_u64(1);
        let mut c = RaftGroup::new(config, Restore::default(), rng, &mut Vec::new()).expect("valid");
        let mut log = SimLog::default();
        let mut out = Vec::new();
        while c.role() != Role::PreCandidate {
            c.tick(&log, &mut out);
        }
        carry(&mut c, &mut log, &mut out);
        for from in [9, 4] {
            deliver(&mut c, &mut log, message(from, 1, 1, Body::PreVoteResponse { granted: true }));
        }
        assert_eq!(c.role(), Role::PreCandidate, "pre-votes of outsiders counted");
        deliver(&mut c, &mut log, message(2, 1, 1, Body::PreVoteResponse { granted: true }));
        assert_eq!(c.role(), Role::Candidate);
        for from in [9, 4] {
            deliver(&mut c, &mut log, message(from, 1, 1, Body::VoteResponse { granted: true }));
        }
        assert_eq!(c.role(), Role::Candidate, "votes of outsiders counted");
        // A learner told to campaign by its leader does not.
        let mut learner_config = config_with_learner(4);
        learner_config.id = 4;
        let rng = XorShiftRng::seed_from_u64(4);
        let mut l = RaftGroup::new(learner_config, Restore::default(), rng, &mut Vec::new()).expect("valid");
        let mut log = SimLog::default();
        let heartbeat =
            Append { prev_end: 0, prev_epoch: -1, commit_end: 0, log_start: 0, seq: 0, batches: Vec::new() };
        deliver(&mut l, &mut log, message(1, 4, 3, Body::Append(heartbeat)));
        deliver(&mut l, &mut log, message(1, 4, 3, Body::TimeoutNow));
        assert_eq!((l.role(), l.term()), (Role::Follower, 3));
    }

    fn config_with_learner(learner: ReplicaId) -> Config {
        let mut c = config(1, &[1, 2, 3]);
        c.learners = vec![learner];
        c
    }

    /// Limits on what a peer sends: too many epoch hints, too many batch bytes.
    #[test]
    fn messages_over_their_limits_are_ignored() {
        let mut log = SimLog::default();
        let mut g = group(1, &[1, 2, 3]);
        elect(&mut g, &mut log, &[2]);
        let hint = |epoch| crate::epoch::EpochStart { epoch, start_offset: 0 };
        let rejection = |epochs: Vec<crate::epoch::EpochStart>, seq| AppendResponse {
            accepted: false,
            match_end: 0,
            acked_end: 0,
            log_end: 0,
            epochs,
            recovering: false,
            seq,
            disk_id: 0,
        };
        // Adopt replica 2's disk, then send it a rejection with one epoch hint too many.
        let sent = deliver(&mut g, &mut log, message(2, 1, 1, Body::AppendResponse(rejection(vec![], 0))));
        let seq =
            sent.iter().filter_map(|m| if let Body::Append(a) = &m.body { Some(a.seq) } else { None }).max();
        let seq = seq.expect("appends follow");
        let too_many = (0..=EPOCH_HINTS_MAX as i32).map(hint).collect();
        let sent =
            deliver(&mut g, &mut log, message(2, 1, 1, Body::AppendResponse(rejection(too_many, seq))));
        assert!(sent.is_empty(), "a rejection over the limit was taken: {sent:?}");
        let sent =
            deliver(&mut g, &mut log, message(2, 1, 1, Body::AppendResponse(rejection(vec![hint(0)], seq))));
        assert!(!sent.is_empty(), "a rejection within the limit is answered");
        // A follower refuses an append of more than APPEND_BYTES_MAX in several batches.
        let mut f = group(2, &[1, 2, 3]);
        let mut log = SimLog::default();
        let value = vec![7u8; APPEND_BYTES_MAX / 2 + 1];
        let big = |base| {
            let mut b = batch::build(&[(None, &value[..])], 0, 0);
            batch::stamp(&mut b, base, 1);
            Bytes::from(b)
        };
        let append = Append {
            prev_end: 0,
            prev_epoch: -1,
            commit_end: 0,
            log_start: 0,
            seq: 0,
            batches: vec![big(0), big(1)],
        };
        let sent = deliver(&mut f, &mut log, message(1, 2, 1, Body::Append(append)));
        assert!(sent.is_empty() && f.log_end() == 0 && f.term() == 0, "{sent:?}");
        // ... but takes one batch that size: a leader always sends at least one.
        let append = Append {
            prev_end: 0,
            prev_epoch: -1,
            commit_end: 0,
            log_start: 0,
            seq: 0,
            batches: vec![big(0)],
        };
        deliver(&mut f, &mut log, message(1, 2, 1, Body::Append(append)));
        assert_eq!(f.log_end(), 1);
    }

    /// An append whose previous point falls inside a batch the follower holds is refused,
    /// and no truncation ever cuts inside a batch.
    #[test]
    fn an_append_pointing_inside_a_held_batch_is_refused_without_a_cut() {
        let mut log = SimLog::default();
        let mut g = group(2, &[1, 2, 3]);
        let append = |term, prev_end, prev_epoch, batches| {
            let append = Append { prev_end, prev_epoch, commit_end: 0, log_start: 0, seq: 0, batches };
            message(1, 2, term, Body::Append(append))
        };
        // The follower holds offsets 0..=2 in one batch of epoch 1.
        deliver(&mut g, &mut log, append(1, 0, -1, vec![stamped_records(0, 1, 3)]));
        assert_eq!(g.log_end(), 3);
        // A leader of term 2 claims a match at offset 1, inside that batch.
        let sent = deliver(&mut g, &mut log, append(2, 1, 1, vec![stamped(1, 2)]));
        let refused = sent.iter().any(|m| matches!(&m.body, Body::AppendResponse(r) if !r.accepted));
        assert!(refused, "{sent:?}");
        assert_eq!((g.log_end(), log.end()), (3, 3));
        // The same through a forged span: a batch of epoch 1 at 0 claiming 0..=1 is "held",
        // then a batch of epoch 2 at offset 2 would cut at 2, inside the held batch.
        let forged = vec![stamped_records(0, 1, 2), stamped(2, 2)];
        deliver(&mut g, &mut log, append(2, 0, -1, forged));
        assert_eq!((g.log_end(), log.end()), (3, 3), "cut inside a batch");
    }

    /// A commit point recovered at restart (`Restore::high_watermark`) keeps an append that
    /// conflicts below it from cutting committed data; without it the same append cuts.
    #[test]
    fn a_recovered_commit_point_is_never_cut() {
        let restored = |high_watermark: i64| {
            let mut log = SimLog::default();
            log.append(stamped(0, 1));
            log.append(stamped(1, 1));
            let epochs = crate::epoch::EpochHistory::from_starts(vec![crate::epoch::EpochStart {
                epoch: 1,
                start_offset: 0,
            }])
            .expect("grows");
            let restore = Restore { epochs, log_end: 2, high_watermark, ..Restore::default() };
            let rng = XorShiftRng::seed_from_u64(2);
            let g = RaftGroup::new(config(2, &[1, 2, 3]), restore, rng, &mut Vec::new());
            (g, log)
        };
        let (g, mut log) = restored(2);
        let mut g = g.expect("a commit point within the log");
        assert_eq!(g.high_watermark(), 2);
        deliver(&mut g, &mut log, append(3, 1, 1, 0, vec![stamped(1, 3)]));
        assert_eq!((g.log_end(), log.end()), (2, 2), "committed offset 1 was cut");
        let (g, mut log) = restored(0);
        let mut g = g.expect("no commit point");
        deliver(&mut g, &mut log, append(3, 1, 1, 0, vec![stamped(1, 3)]));
        assert_eq!(g.log_end(), 2);
        assert_eq!(g.epochs().last_epoch(), 3, "without it, offset 1 is replaced");
        assert!(restored(3).0.is_err(), "a commit point past the log is refused");
        let lost = Restore { disk_lost: true, high_watermark: 1, log_end: 1, ..Restore::default() };
        let rng = XorShiftRng::seed_from_u64(2);
        assert!(RaftGroup::new(config(2, &[1, 2, 3]), lost, rng, &mut Vec::new()).is_err());
    }
}
