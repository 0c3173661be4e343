//! Pyralog replication: a sans-IO Raft per partition with flexible quorums.
//!
//! What it is: the consensus core of one partition replica ([`RaftGroup`]), its quorum rules
//! ([`quorum`]), the epoch history that finds where two logs diverge ([`epoch`]), and a
//! deterministic simulator that drives several cores through faults (`sim`, for this crate's
//! tests and the `sim` feature). What it is not: it opens no file or socket, spawns nothing,
//! reads no clock and no global random source; the daemon's shell (a later issue) carries its
//! actions out on glommio.
//!
//! Design decisions (to fold into ARCHITECTURE.md):
//! - **The Raft log is the partition log.** An entry is one stored Kafka RecordBatch v2: its
//!   index is the batch's offset range `base..=base+lastOffsetDelta`, its term the batch's
//!   `partitionLeaderEpoch`. AppendEntries carries the stored bytes; the follower checks each
//!   batch's length and CRC-32C before appending and never re-encodes it.
//! - **How the core sees batches without `dma`:** [`batch`] is a header view of its own (the
//!   fields it needs plus the CRC check); the core reads the leader's log through the small
//!   [`LogRead`] trait to fill appends (the shell serves it from the shard's cache of recent
//!   batches) and changes logs only through the `Append`/`Truncate` actions it returns. The
//!   leader stamps offsets and epochs itself (outside the CRC), so the shell appends
//!   replicated batches as they are: `dma::Log` needs an append that keeps given offsets.
//! - **Epoch-start and configuration batches take Kafka offsets**, as Kafka's control batches
//!   do and consumers skip: a new leader appends a control batch with a LEADER_CHANGE record
//!   (what lets the commit point move in a new term: Raft commits by counting only entries of
//!   the leader's own term); a membership change appends control batches with a VOTERS record
//!   ([`membership`]).
//! - **Durability:** the commit point is the largest offset durable on W replicas, leader
//!   included; followers acknowledge only what their log reported durable, and a `Durable`
//!   notice carries the log's truncation count so that a flush overtaken by a truncation
//!   counts for nothing. Term and vote are persisted before any message leaves.
//! - **Divergence** is found from epoch histories in one round trip (KIP-101/279): a rejection
//!   carries the follower's last epochs and the leader answers from the common one.
//! - **A lost disk** (the replica was a member and came back empty: the shell must detect it
//!   and pass `Restore::disk_lost`) sets `recovering` in the persisted hard state, with a new
//!   random `disk_id` (KIP-853's directory id): no votes, no campaign, no write-quorum count
//!   until the replica has learned the term of every voter it knows of (TermQuery: a quorum
//!   of answers is not enough, since only the candidate its lost disk voted for is sure to
//!   show that term) and holds durably its leader's epoch-start batch and commit point
//!   (KIP-966, Protocol-Aware Recovery); it then votes only in later terms. A leader counts
//!   a follower's acknowledgement only from the disk it last heard from and only for an
//!   append it sent after it last reset its view of that follower (appends carry a `seq`
//!   that answers echo), so an answer from a lost disk never counts toward W.
//! - **Membership** changes by joint consensus: W and E of each set while joint; learners
//!   receive the log and count for nothing.
//! - **A log start** (retention): the shell may remove a replica's log below what that
//!   replica knows committed and durable (`RaftGroup::trim`); every offset below a log's start
//!   is committed, so an append whose previous offset lies below ours matches. A follower that
//!   needs offsets below its leader's start gets a `StartAt` instead of an append (Raft's
//!   snapshot install, for a state machine that is the log itself): it keeps its log if it
//!   holds the entry before the start, else drops it and starts it there, empty, with the
//!   leader's configurations (`Action::StartLog`). Epoch histories and configurations are kept
//!   whole across trims, so no offset below a log's start is ever looked up or read.
//!
//! What the core does not know: the wall clock (ticks are the caller's), files, sockets,
//! topics and shards; why a log is trimmed (retention is the shell's policy); whether a batch
//! is compressed. It trusts peers not to be
//! byzantine: it checks every message's shape and limits (batches and bytes of an append,
//! epochs of a rejection, batch boundaries of a cut), never its honesty beyond Raft's rules.
//! Requests (votes, pre-votes, appends, TimeoutNow, term queries) are taken from any replica,
//! member of the membership this one knows or not, since that may lag (a missed change, or a
//! lost disk that restarts from the initial configuration); answers count only from the
//! replicas of the membership they count in, votes only from its voters, and a replica
//! campaigns only as a voter of its own membership, so no outsider can lead.
//!
//! Testing: the simulator (`sim`) stands in for a model checker. `cargo test` runs 10,000
//! random seeds (3 or 5 replicas, every preset, all faults, a quarter with membership
//! changes, logs trimmed by retention in all of them), 2,000 more with membership changes,
//! scripted scenarios (Raft's figure 8, isolated follower, isolated leader, transfer, leader
//! crash), six planted bugs that it must catch, and a proptest of arbitrary message
//! sequences. A lost disk's messages stay in
//! flight, and a check fails a leader that counts one of its answers after hearing its
//! replacement. Unit tests beside the core drive `RaftGroup` through the histories the
//! random mix reaches too rarely (a lost disk's forgotten vote with RF 5, a lagging replica
//! and an unknown leader, forged spans). `tests/model.rs` model-checks three replicas
//! exhaustively within small bounds (stateright).
pub mod batch;
pub mod epoch;
mod error;
pub mod group;
pub mod membership;
pub mod message;
pub mod quorum;
#[cfg(any(test, feature = "sim"))]
pub mod sim;

pub use error::{ReplicationError, Result};
pub use group::{Action, Config, FollowerStatus, LogNotice, LogRead, RaftGroup, Restore, Role};
pub use membership::{Membership, VoterSet};
pub use message::{Append, AppendResponse, Body, HardState, Message, ReplicaId};
pub use quorum::{Preset, Quorum};
