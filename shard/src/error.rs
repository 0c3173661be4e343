//! The shard crate's error type: what a client can be told about a failed operation.

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ShardError {
    #[error("unknown topic '{0}'")]
    UnknownTopic(String),
    #[error("topic '{topic}' has no partition {partition} (it has {count})")]
    UnknownPartition { topic: String, partition: u32, count: u32 },
    #[error("topic '{0}' already exists")]
    TopicAlreadyExists(String),
    #[error("invalid topic: {0}")]
    InvalidTopic(String),
    #[error("{0}")]
    CorruptBatch(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("{0}")]
    OffsetOutOfRange(String),
    /// A disk error; for writes it is permanent until the node restarts (fsyncgate).
    #[error("storage error: {0}")]
    Storage(String),
    #[error("invalid config: {0}")]
    InvalidConfig(String),
    #[error("invalid partitions: {0}")]
    InvalidPartitions(String),
    #[error("invalid replication factor: {0}")]
    InvalidReplicationFactor(String),
    #[error("out of order sequence: {0}")]
    OutOfOrderSequence(String),
    #[error("fenced producer: {0}")]
    InvalidProducerEpoch(String),
    /// An idempotent producer's batch behind one of its own that was refused (for
    /// `refusal`, nothing appended) and not yet sent again: answered as that refusal, so the
    /// client retries both in order rather than renumbering them (see `producers`).
    #[error("{reason}")]
    AfterRefusal { refusal: crate::producers::Refusal, reason: String },
    #[error("the node is shutting down")]
    ShuttingDown,
    /// A produce or fetch for a replicated partition this replica does not lead.
    #[error("this node does not lead {topic}/{partition} (term {term}; leader {})", leader.map_or("unknown".to_owned(), |l| format!("node {l}")))]
    NotLeader { topic: String, partition: u32, leader: Option<u32>, term: i32 },
    /// A request naming an epoch older than the partition's (KIP-320): the client's metadata
    /// is stale.
    #[error("{topic}/{partition} is in leader epoch {current}, the request names {requested}: refresh the metadata")]
    FencedLeaderEpoch { topic: String, partition: u32, requested: i32, current: i32 },
    /// A request naming an epoch newer than this replica knows (KIP-320): it has not heard of
    /// the new leader yet.
    #[error("{topic}/{partition} is in leader epoch {current} here, the request names {requested}, which this node has not seen yet")]
    UnknownLeaderEpoch { topic: String, partition: u32, requested: i32, current: i32 },
    /// An acks=all (native durable) produce to a replicated partition whose in-sync replicas
    /// are fewer than its write quorum: refused before it is appended (Kafka's
    /// min.insync.replicas). Retriable: a follower may catch up.
    #[error("{topic}/{partition} has {in_sync} in-sync replicas, fewer than its write quorum of {required}")]
    NotEnoughReplicas { topic: String, partition: u32, in_sync: u32, required: u32 },
    /// A metadata change sent to a node that does not lead the controller.
    #[error("this node does not lead the cluster's controller (term {term}; leader {})", leader.map_or("unknown".to_owned(), |l| format!("node {l}")))]
    NotController { leader: Option<u32>, term: i32 },
    /// The cluster cannot make the change now (no controller leader for too long).
    #[error("unavailable: {0}")]
    Unavailable(String),
}

impl ShardError {
    /// A name for the kind of error, stable and in snake_case, for metrics' labels. A batch
    /// answered as an earlier refusal (`AfterRefusal`) is named as that refusal, as the
    /// client is told.
    pub fn kind(&self) -> &'static str {
        use crate::producers::Refusal;
        match self {
            ShardError::UnknownTopic(_) => "unknown_topic",
            ShardError::UnknownPartition { .. } => "unknown_partition",
            ShardError::TopicAlreadyExists(_) => "topic_already_exists",
            ShardError::InvalidTopic(_) => "invalid_topic",
            ShardError::CorruptBatch(_) => "corrupt_batch",
            ShardError::TooLarge(_) => "too_large",
            ShardError::OffsetOutOfRange(_) => "offset_out_of_range",
            ShardError::Storage(_) | ShardError::AfterRefusal { refusal: Refusal::Storage, .. } => "storage",
            ShardError::InvalidConfig(_) => "invalid_config",
            ShardError::InvalidPartitions(_) => "invalid_partitions",
            ShardError::InvalidReplicationFactor(_) => "invalid_replication_factor",
            ShardError::OutOfOrderSequence(_) => "out_of_order_sequence",
            ShardError::InvalidProducerEpoch(_) => "invalid_producer_epoch",
            ShardError::ShuttingDown => "shutting_down",
            ShardError::NotLeader { .. } | ShardError::AfterRefusal { refusal: Refusal::NotLeader, .. } => {
                "not_leader"
            }
            ShardError::FencedLeaderEpoch { .. } => "fenced_leader_epoch",
            ShardError::UnknownLeaderEpoch { .. } => "unknown_leader_epoch",
            ShardError::NotEnoughReplicas { .. }
            | ShardError::AfterRefusal { refusal: Refusal::NotEnoughReplicas, .. } => "not_enough_replicas",
            ShardError::NotController { .. } => "not_controller",
            ShardError::Unavailable(_) => "unavailable",
        }
    }
}

impl From<pyralog_dma::LogError> for ShardError {
    fn from(error: pyralog_dma::LogError) -> ShardError {
        use pyralog_dma::LogError;
        match &error {
            LogError::CorruptBatch { .. } => ShardError::CorruptBatch(error.to_string()),
            LogError::TooLarge { .. } => ShardError::TooLarge(error.to_string()),
            LogError::OffsetOutOfRange { .. } => ShardError::OffsetOutOfRange(error.to_string()),
            LogError::Io { .. } | LogError::Stopped { .. } | LogError::Closed { .. } => {
                ShardError::Storage(error.to_string())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::ShardError;
    use crate::producers::Refusal;

    /// Metrics' labels: a batch answered as an earlier refusal counts as that refusal, as
    /// its client is told; every kind is snake case.
    #[test]
    fn a_batch_answered_as_an_earlier_refusal_is_named_as_that_refusal() {
        let not_enough =
            ShardError::NotEnoughReplicas { topic: "t".into(), partition: 0, in_sync: 1, required: 2 };
        let after = |refusal| ShardError::AfterRefusal { refusal, reason: "behind a refused batch".into() };
        assert_eq!(not_enough.kind(), "not_enough_replicas");
        assert_eq!(after(Refusal::NotEnoughReplicas).kind(), "not_enough_replicas");
        let not_leader = ShardError::NotLeader { topic: "t".into(), partition: 0, leader: None, term: 1 };
        assert_eq!(not_leader.kind(), "not_leader");
        assert_eq!(after(Refusal::NotLeader).kind(), "not_leader");
        assert_eq!(ShardError::Storage("disk".into()).kind(), "storage");
        assert_eq!(after(Refusal::Storage).kind(), "storage");
        for error in [ShardError::ShuttingDown, ShardError::OutOfOrderSequence("5".into()), not_enough] {
            assert!(error.kind().chars().all(|c| c.is_ascii_lowercase() || c == '_'), "{}", error.kind());
        }
    }
}
