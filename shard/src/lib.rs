//! Pyralog's shards: one per core, each owning its partitions outright.
//!
//! A shard holds the [`Log`](pyralog_dma::Log) of every partition placed on it, a cache of
//! their recent batches, a copy of the topic table, and a flusher task per partition that does
//! group commit. Shards share nothing: work for a partition owned elsewhere crosses one hop of
//! glommio's channel mesh.
//!
//! What it is not: it knows no protocol and opens no socket. `net` decodes requests and the
//! daemon (`engine`) calls the [`Shard`] methods.
//!
//! Invariants owned here:
//! - a partition is open on exactly one shard, the one [`topics::owner_shard`] names;
//! - only shard 0 writes `topics.meta`, and a topic change is durable before any shard applies it;
//! - a produce acknowledged in sync mode is below the partition's durable offset;
//! - consumers never read past the high watermark (the durable offset in sync mode).

mod cache;
pub mod cluster;
pub mod epochs;
mod error;
mod event;
pub mod group;
pub mod metrics;
mod offsets;
mod partition;
mod producer_ids;
pub mod producers;
mod replica;
mod replicated;
mod shard;
pub mod topics;

pub use cache::ShardCache;
pub use error::ShardError;
pub use group::{
    CommitRequest, GroupConfig, GroupCoordinator, GroupDescription, GroupError, GroupOp, GroupReply,
    JoinRequest, JoinResult, Joined, MemberDescription, SyncRequest, SyncResult, Synced,
};
pub use offsets::{is_internal_topic, OFFSETS_TOPIC};
pub use partition::Durability;
pub use replica::{
    CoreStatus, RecoveryBudget, ReplicaAddress, ReplicaRole, ReplicaSettings, ReplicaStatus, SendHook,
};
pub use replicated::{
    in_sync_replicas, ClusterSettings, ControllerRequest, ForwardHook, GroupId, MetadataAnswer, MetadataHook,
    CONTROLLER_NAME, CONTROLLER_TOPIC_ID, METADATA_WAIT, NODE_HEARTBEAT_INTERVAL,
};
pub use shard::{
    group_log_of, keep_within, new_mesh, Acks, FetchLimits, Fetched, Listed, Message, Op, OpResult, Produced,
    ScrapeHook, Shard, ShardConfig, ShardMesh, FETCH_PARTITION_BYTES_MAX, FETCH_RESPONSE_BYTES_MAX,
    FETCH_WAIT_MAX, GROUP_LOGS, UNFLUSHED_BYTES_MAX,
};
