//! Pyralog's protocols and client library.
//!
//! - [`codec`]: the native protocol's typed requests and responses and their frames (a
//!   flatbuffers envelope followed by raw RecordBatch v2 bytes).
//! - [`cluster`]: node to node: the cluster wire format, the handshake's rule and cluster
//!   identity queries, and (feature `server`) the per-shard transport between Raft replicas.
//! - [`client`]: a blocking, thread-backed client: connections with pipelined requests, a
//!   metadata-aware client that goes straight to the shard owning a partition, a batching
//!   producer and a consumer. It depends on no server crate and no async runtime.
//! - `server` (feature `server`): the per-shard glommio listener. It knows frames and
//!   connections, not partitions: a [`server::Handler`] supplied by the daemon answers requests.
//!
//! This crate is the only one that touches sockets.

pub mod client;
pub mod cluster;
pub mod codec;
#[cfg(feature = "server")]
pub mod http;
pub mod kafka;
#[cfg(feature = "server")]
mod listener_metrics;
#[cfg(feature = "server")]
pub mod ports;
#[cfg(feature = "server")]
pub mod server;

#[allow(clippy::all, unsafe_op_in_unsafe_fn, non_snake_case, mismatched_lifetime_syntaxes)]
#[rustfmt::skip]
mod wire_generated;
