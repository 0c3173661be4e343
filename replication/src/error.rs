//! The replication crate's one error type: refusals of configurations, proposals and batches.
//! Messages from peers are never errors: a bad one is ignored or answered with a rejection,
//! as Raft says, and counted by the caller if it wants to.

/// What the replication core refuses, with the context a person needs to act on it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplicationError {
    /// A quorum or group configuration that would be unsafe or cannot work.
    #[error("replication config refused: {reason}")]
    Config { reason: String },
    /// Batch bytes whose length, magic or CRC-32C are wrong.
    #[error("corrupt record batch: {reason}")]
    CorruptBatch { reason: String },
    /// A proposal to a replica that is not the leader (or is handing leadership over).
    #[error("replica {replica} is not the leader of term {term}; leader is {leader:?}")]
    NotLeader { replica: u32, term: i32, leader: Option<u32> },
    /// A proposal larger than a named limit.
    #[error("{what} of {bytes} bytes exceeds the limit of {limit} bytes")]
    TooLarge { what: &'static str, bytes: u64, limit: u64 },
}

pub type Result<T, E = ReplicationError> = std::result::Result<T, E>;
