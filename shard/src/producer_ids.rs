//! Idempotent producers' ids in a cluster: blocks reserved through the controller.
//!
//! Shard 0 of a node holds the node's blocks; every shard's InitProducerId takes the next id
//! from it (one hop over the mesh: InitProducerId is rare). A block is
//! [`PRODUCER_IDS_PER_BLOCK`] ids reserved by a committed `MetaRecord::AllocateProducerIds`,
//! so no two nodes, and no two runs of one node, hand out the same id: the controller's
//! `next_producer_id` only grows, a node takes each block it reserved once, and it forgets
//! its unused ids when it stops. Once half of the current block is handed out the next one
//! is reserved in the background, so an InitProducerId waits for the controller only when
//! ids go faster than a reservation.
//!
//! A node without a cluster does not come here: its ids are `start time in ms × 1024 +
//! shard + shards × n` (see the daemon), unique on that node as long as fewer than 1024 are
//! handed out per millisecond of its uptime.
//!
//! Lives on shard 0; `!Send`.

use std::cell::Cell;

use crate::cluster::PRODUCER_IDS_PER_BLOCK;
use crate::replicated::ControllerRequest;
use crate::shard::{Op, OpResult, Shard};
use crate::ShardError;

/// The ids a node holds: the block it hands out from and the one reserved after it.
pub(crate) struct ProducerIdBlocks {
    /// `[next, end)` of the block being handed out (empty before the first reservation).
    current: Cell<(i64, i64)>,
    /// The block reserved ahead, if any.
    spare: Cell<Option<(i64, i64)>>,
    /// One reservation at a time.
    reserving: glommio::sync::Semaphore,
    /// A reservation ahead runs in the background.
    prefetching: Cell<bool>,
    /// The first id of the last block taken: every block taken starts after it.
    last_first: Cell<Option<i64>>,
}

impl ProducerIdBlocks {
    pub fn new() -> ProducerIdBlocks {
        ProducerIdBlocks {
            current: Cell::new((0, 0)),
            spare: Cell::new(None),
            reserving: glommio::sync::Semaphore::new(1),
            prefetching: Cell::new(false),
            last_first: Cell::new(None),
        }
    }

    /// The next id, from the current block or else from the spare one.
    fn take(&self) -> Option<i64> {
        let (mut next, mut end) = self.current.get();
        if next >= end {
            (next, end) = self.spare.take()?;
        }
        assert!(next < end, "a block holds ids");
        self.current.set((next + 1, end));
        Some(next)
    }

    /// Whether the next block should be reserved now: half the current one is handed out
    /// and none is reserved or being reserved.
    fn wants_more(&self) -> bool {
        let (next, end) = self.current.get();
        self.spare.get().is_none() && !self.prefetching.get() && end - next < PRODUCER_IDS_PER_BLOCK / 2
    }

    /// Takes a block the controller reserved for this node.
    fn add(&self, block: (i64, i64)) -> Result<(), ShardError> {
        if self.last_first.get().is_some_and(|last| block.0 <= last) || block.0 >= block.1 {
            return Err(ShardError::Unavailable(format!(
                "the controller's last producer id block for this node, {block:?}, is not a new one"
            )));
        }
        self.last_first.set(Some(block.0));
        let (next, end) = self.current.get();
        if next >= end {
            self.current.set(block);
        } else {
            assert!(self.spare.get().is_none(), "one block is reserved ahead at most");
            self.spare.set(Some(block));
        }
        Ok(())
    }
}

impl Shard {
    /// A producer id unique across the cluster (and across this node's restarts), for an
    /// idempotent producer's InitProducerId. In a cluster only.
    pub async fn next_producer_id(&self) -> Result<i64, ShardError> {
        assert!(self.cluster().is_some(), "a node without a cluster numbers its producers itself");
        match self.call(0, Op::NextProducerId).await? {
            OpResult::Offset(result) => result,
            other => unreachable!("a producer id request answered with {other:?}"),
        }
    }

    /// Shard 0: the next id of this node's blocks, reserving one when none is left.
    pub(crate) async fn take_producer_id(&self) -> Result<i64, ShardError> {
        assert_eq!(self.id, 0, "shard 0 holds the node's producer ids");
        let blocks = &self.cluster().expect("a cluster").producer_ids;
        loop {
            if let Some(id) = blocks.take() {
                if blocks.wants_more() {
                    self.reserve_ahead();
                }
                return Ok(id);
            }
            self.reserve_producer_ids(false).await?;
        }
    }

    /// Reserves the next block in the background (its failure is logged: the next
    /// InitProducerId that finds no id left tries again and reports it).
    fn reserve_ahead(&self) {
        let Some(shard) = self.me.upgrade() else { return };
        let blocks = &self.cluster().expect("a cluster").producer_ids;
        blocks.prefetching.set(true);
        glommio::spawn_local(async move {
            if let Err(error) = shard.reserve_producer_ids(true).await {
                eprintln!("pyralog: reserving the next block of producer ids: {error}");
            }
            shard.cluster().expect("a cluster").producer_ids.prefetching.set(false);
        })
        .detach();
    }

    /// Has the controller reserve a block for this node and takes it, unless a reservation
    /// made while this one waited its turn already did (`ahead`: a spare is wanted, else an
    /// id to hand out now).
    async fn reserve_producer_ids(&self, ahead: bool) -> Result<(), ShardError> {
        let cluster = self.cluster().expect("a cluster");
        let blocks = &cluster.producer_ids;
        let _turn = blocks.reserving.acquire_permit(1).await.map_err(|_| ShardError::ShuttingDown)?;
        let (next, end) = blocks.current.get();
        let done =
            if ahead { blocks.spare.get().is_some() } else { next < end || blocks.spare.get().is_some() };
        if done {
            return Ok(());
        }
        let node = cluster.settings.node_id;
        self.controller_request(ControllerRequest::AllocateProducerIds { node }).await?;
        let block = cluster.meta.borrow().producer_id_blocks.get(&node).copied();
        let block = block.ok_or_else(|| {
            ShardError::Unavailable(format!("the controller reserved no producer ids for node {node}"))
        })?;
        blocks.add(block)
    }
}
