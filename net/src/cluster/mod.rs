//! Node to node: how replicas of one Raft group on different nodes (pyralog processes) talk.
//!
//! - [`frame`]: the wire format (Hello, Welcome, Refused, Messages, Request, Response),
//!   encoded without copying batch or body bytes and decoded strictly. No runtime.
//! - [`identity`]: the handshake's rule (who is accepted) and the blocking cluster-identity
//!   helpers the daemon uses before its shards start. No runtime.
//! - `transport` (feature `server`): one [`transport::ClusterTransport`] per shard, on that
//!   shard's glommio executor: a listener, a writer task and a bounded queue per peer shard.
//!
//! What this module is not: it does not know what a Raft group is beyond its [`GroupKey`],
//! which peer holds which replica, or what messages mean. The shard owns the groups and tells
//! the transport where to send; Raft tolerates the loss, duplication and reordering between
//! connections that a transport which drops rather than blocks implies.

pub mod frame;
pub mod identity;
#[cfg(feature = "server")]
pub mod transport;

pub use frame::{ClusterFrameError, ClusterId, GroupKey};
