//! Pyralog's storage: the RecordBatch v2 format and the per-partition log on O_DIRECT segment
//! files, with sparse offset and time indexes, crash recovery, truncation and retention.
//!
//! What it is not: it knows nothing of topics, shards, caches or clients. A [`Log`] is one
//! partition's files, used from the one shard (thread) that owns the partition.
//!
//! Invariants owned here:
//! - only batches whose length, magic and CRC-32C were checked are ever appended;
//! - offsets are contiguous and only grow; `log_start <= durable <= next`;
//! - an acknowledged flush means written and fdatasync'ed, with any new segment's directory
//!   entry synced too;
//! - after any write or fdatasync error (but a full disk refusing the zeros a small flush
//!   writes ahead of the batches), or an error of a truncation that changed the log, the log
//!   takes no more writes (fsyncgate);
//! - recovery cuts only the last segment (a torn tail); damage in a sealed segment fails the
//!   open and no file is changed.
//!
//! This crate and `net` are the only ones that touch files and sockets respectively.

pub mod batch;
mod device;
mod error;
pub mod huge;
mod index;
mod log;
pub mod replica_state;
mod segment;

pub use device::{settle_device_probe, PROBE_FILE_PREFIX};
pub use error::{LogError, Result};
pub use log::{Appended, Log, LogConfig, INDEX_INTERVAL_BYTES};
pub use replica_state::{ReplicaState, ReplicaStateFile};
pub use segment::{StampedBatch, BLOCK_BYTES, READAHEAD_BYTES, SEGMENT_BYTES_MAX};
