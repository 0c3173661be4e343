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
//!   five fields it needs plus the CRC check); the core reads the leader's log through the
//!   small [`LogRead`] trait to fill appends, and changes logs only through the
//!   `Append`/`Truncate` actions it returns. The leader stamps offsets and epochs itself
//!   (outside the CRC), so the shell appends replicated batches as they are.
//! - **Epoch-start batches take a Kafka offset.** A new leader appends one control batch
//!   (attribute bit 5) holding a LEADER_CHANGE control record, as KRaft does; consumers skip
//!   control batches as they skip transaction markers. It is what lets the commit point move
//!   in a new term (Raft commits by counting only entries of the leader's own term).
//! - **Durability:** the commit point is the largest offset durable on W replicas, leader
//!   included; followers acknowledge only what their log reported durable, and a `Durable`
//!   notice carries the log's truncation count so that a flush overtaken by a truncation
//!   counts for nothing.
//! - **Divergence** is found from epoch histories in one round trip (KIP-101/279): a rejection
//!   carries the follower's last epochs and the leader answers from the common one.
//! - **A lost disk** (the replica was a member and came back empty) sets `recovering` in the
//!   persisted hard state: no votes, no campaign, no write-quorum count until the replica
//!   holds durably a commit point a leader reached in its own term (KIP-966).
//! - **Not yet here:** membership change and learners; the log start (retention) is 0.

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
pub use group::{Action, Config, LogNotice, LogRead, RaftGroup, Restore, Role};
pub use membership::{Membership, VoterSet};
pub use message::{Append, AppendResponse, Body, HardState, Message, ReplicaId};
pub use quorum::{Preset, Quorum};
