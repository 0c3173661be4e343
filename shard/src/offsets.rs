//! Consumer groups in a cluster: the offsets topic and its coordinators.
//!
//! A node of a cluster keeps no offsets log of its own. Committed offsets live in the
//! internal topic [`OFFSETS_TOPIC`], [`GROUP_LOGS`] partitions replicated like any other
//! (replication factor `--default-replication-factor`, at most the seed count, 3 by default),
//! created through the controller the first time a client looks for a coordinator (as Kafka
//! creates `__consumer_offsets`). A group belongs to partition [`group_log_of`] of it, and its
//! coordinator is a [`GroupCoordinator`] on the shard owning that partition on the node
//! **leading** it:
//! - when this node's replica of an offsets partition becomes leader, its shard waits until
//!   everything its log holds is committed and durable here (a new leader's log holds every
//!   committed commit), replays it, and only then coordinates; meanwhile group requests get
//!   `CoordinatorLoadInProgress`;
//! - an OffsetCommit is one batch proposed through the partition's replica with acks=all and
//!   answered once committed (durable on W replicas), then applied to the coordinator's memory;
//! - when the replica stops leading, the coordinator is dropped at once: parked and later
//!   requests get `NotCoordinator`, and clients find the new coordinator, where members rejoin
//!   (membership is not replicated, as in Kafka).
//!
//! The node's retention settings do not apply to the offsets partitions (a retention cut would
//! lose the offsets of groups that have not committed since): their coordinators compact them
//! (`GroupCoordinator::compact_replicated`: a snapshot of every committed offset, then a
//! marker), and each replica deletes its segments below the latest snapshot whose marker it
//! holds committed and durable (`Replica::apply_retention`), so a new coordinator's replay is
//! bounded by `--offsets-compact-bytes` plus the snapshot.
//!
//! FindCoordinator names the leader this node last heard from its own replica of the
//! partition; a node holding none names the partition's preferred leader, as metadata does
//! (a wrong guess costs the client a NOT_COORDINATOR and another FindCoordinator).
//!
//! A node without a cluster keeps its per-node offsets logs (`<data-dir>/groups/<n>`), with
//! coordinators on shard `n % shards` (see `Shard::start`).
//!
//! Invariants: at most one coordinator per offsets partition on a node, and only while its
//! replica leads in the term the coordinator was loaded for; a commit is appended only in that
//! term (checked under the partition's append turn), so a coordinator of an old term never
//! writes after a newer one loaded; offsets a coordinator serves were committed.

use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use pyralog_dma::batch;
use pyralog_replication::Role;

use crate::group::{GroupCoordinator, GroupError, ReplicatedAppend};
use crate::replica::ReplicaRole;
use crate::shard::{group_log_of, Op, OpResult, Shard, GROUP_LOGS};
use crate::topics::{self, TopicConfig};
use crate::ShardError;

/// The internal topic holding consumer groups' committed offsets in a cluster.
pub const OFFSETS_TOPIC: &str = "__consumer_offsets";
/// Replicas of the offsets topic's partitions unless `--default-replication-factor` says
/// fewer or `--offsets-topic-replication-factor` sets them (Kafka's
/// offsets.topic.replication.factor).
pub const OFFSETS_REPLICATION_FACTOR_DEFAULT: u32 = 3;
/// A shard says why the offsets topic cannot be created at most this often.
const OFFSETS_TOPIC_WARNING_INTERVAL: Duration = Duration::from_secs(10);
/// How often a replica that became leader looks again whether its log is committed, besides
/// the replica's own wake-ups.
const LOAD_POLL_INTERVAL: Duration = Duration::from_millis(10);

/// Topics clients may read but not create, delete, grow or write: the node writes them.
pub fn is_internal_topic(name: &str) -> bool {
    name == OFFSETS_TOPIC
}

pub(crate) fn refuse_internal(name: &str) -> Result<(), ShardError> {
    if is_internal_topic(name) {
        return Err(ShardError::InvalidTopic(format!(
            "'{name}' is an internal topic: only the group coordinators write it"
        )));
    }
    Ok(())
}

impl Shard {
    /// Creates the offsets topic through the controller if this node does not know it yet.
    /// Its replication factor is `--offsets-topic-replication-factor` if set (the creation
    /// fails until that many nodes are registered). Else it is 3 (or
    /// `--default-replication-factor`), at most the nodes registered when it is created, and
    /// at most the seeds unless more nodes are registered: a cluster of seeds alone always
    /// gets the same factor (until the seeds are all registered the creation fails, and the
    /// caller answers `CoordinatorNotAvailable`; clients retry), and brokers that joined first
    /// count too (Kafka's rule, min(3, brokers)), so a single seed with two brokers keeps its
    /// offsets on three nodes.
    pub async fn ensure_offsets_topic(&self) -> Result<(), ShardError> {
        let Some(cluster) = self.cluster() else { return Ok(()) };
        if self.topics.borrow().get(OFFSETS_TOPIC).is_some() {
            return Ok(());
        }
        let seeds = cluster.settings.seeds.len().max(1);
        let registered = self.cluster_meta().map_or(0, |meta| meta.nodes.len());
        let factor = match cluster.settings.offsets_replication_factor {
            Some(factor) if registered < factor as usize => {
                return Err(ShardError::InvalidReplicationFactor(format!(
                    "--offsets-topic-replication-factor {factor} needs {factor} nodes registered, and \
                     {registered} are"
                )))
            }
            Some(factor) => factor,
            None => cluster
                .settings
                .default_replication_factor
                .unwrap_or(OFFSETS_REPLICATION_FACTOR_DEFAULT)
                .min(seeds.max(registered) as u32),
        };
        let config = TopicConfig { replication_factor: Some(factor), ..TopicConfig::default() };
        let op = Op::CreateTopic { name: OFFSETS_TOPIC.to_owned(), partitions: GROUP_LOGS as u32, config };
        match self.call(0, op).await? {
            OpResult::Done(Ok(())) | OpResult::Done(Err(ShardError::TopicAlreadyExists(_))) => Ok(()),
            OpResult::Done(Err(error)) => Err(error),
            other => unreachable!("create topic answered with {other:?}"),
        }
    }

    /// The coordinator of `group_id` in this cluster, as this node knows it: (node, shard) of
    /// the leader of the group's offsets partition. Creates the offsets topic if needed.
    pub async fn offsets_coordinator(&self, group_id: &str) -> Result<(u32, usize), GroupError> {
        assert!(self.cluster().is_some(), "a node without a cluster coordinates its own groups");
        if let Err(error) = self.ensure_offsets_topic().await {
            let reason = format!("the offsets topic {OFFSETS_TOPIC} is not there yet: {error}");
            let cluster = self.cluster().expect("a cluster");
            let now = Instant::now();
            let last = cluster.offsets_topic_warned.get();
            if last.is_none_or(|last| now.duration_since(last) >= OFFSETS_TOPIC_WARNING_INTERVAL) {
                cluster.offsets_topic_warned.set(Some(now));
                eprintln!("pyralog: {reason}");
            }
            return Err(GroupError::OffsetsTopicUnavailable(reason));
        }
        let meta = self.cluster_meta().ok_or(GroupError::CoordinatorNotAvailable)?;
        let placement = meta.topics.get(OFFSETS_TOPIC).ok_or(GroupError::CoordinatorNotAvailable)?;
        let partition = group_log_of(group_id) as u32;
        let (leader, _) = self.partition_leader(placement, partition);
        let leader = leader.ok_or(GroupError::CoordinatorNotAvailable)?;
        let shards = meta.nodes.get(&leader).map_or(0, |n| n.shards as usize);
        if shards == 0 {
            return Err(GroupError::CoordinatorNotAvailable);
        }
        Ok((leader, topics::owner_shard(OFFSETS_TOPIC, partition, shards)))
    }

    /// The shard of this node that would coordinate offsets partition `log` (the one owning
    /// the partition), once the offsets topic exists.
    pub(crate) fn offsets_shard(&self, log: usize) -> Result<usize, GroupError> {
        if self.topics.borrow().get(OFFSETS_TOPIC).is_none() {
            return Err(GroupError::CoordinatorNotAvailable);
        }
        Ok(self.owner_of(OFFSETS_TOPIC, log as u32))
    }

    /// Why this shard has no coordinator for offsets partition `log` (cluster only).
    pub(crate) fn no_coordinator(&self, log: usize) -> GroupError {
        let cluster = self.cluster().expect("a cluster");
        if cluster.coordination.borrow().contains_key(&log) {
            GroupError::CoordinatorLoadInProgress
        } else {
            GroupError::NotCoordinator
        }
    }

    /// The role hook of this shard's replicas of the offsets topic: a new leadership loads a
    /// coordinator, a lost one drops it (see the module docs).
    pub(crate) fn offsets_role_changed(self: &Rc<Self>, partition: u32, role: ReplicaRole) {
        let log = partition as usize;
        let cluster = self.cluster().expect("replicas live in a cluster");
        let leads = role.role == Role::Leader;
        if leads && cluster.coordination.borrow().get(&log) == Some(&role.term) {
            return;
        }
        let old = self.groups.borrow_mut().remove(&log);
        if let Some(old) = old {
            glommio::spawn_local(async move { old.close_as(GroupError::NotCoordinator).await }).detach();
        }
        if leads {
            cluster.coordination.borrow_mut().insert(log, role.term);
            glommio::spawn_local(Rc::clone(self).load_coordinator(partition, role.term)).detach();
        } else {
            cluster.coordination.borrow_mut().remove(&log);
        }
    }

    /// Whether this shard still coordinates (or loads) offsets partition `log` in `term`.
    fn coordinates(&self, log: usize, term: i32) -> bool {
        !self.shutting_down.get()
            && self.cluster().is_some_and(|c| c.coordination.borrow().get(&log) == Some(&term))
    }

    /// Waits until the replica's whole log (as it was when it became leader) is committed and
    /// durable here, replays it and starts coordinating, unless leadership moved meanwhile.
    async fn load_coordinator(self: Rc<Self>, partition: u32, term: i32) {
        let log = partition as usize;
        let Some(replica) = self.local_replica(OFFSETS_TOPIC, partition) else { return };
        let target = replica.partition.log.next_offset();
        let end = loop {
            if !self.coordinates(log, term) {
                return;
            }
            let committed = replica.high_watermark();
            if committed >= target && replica.partition.log.durable_offset() >= committed {
                break committed;
            }
            futures_lite::future::or(replica.changed.listen(), glommio::timer::sleep(LOAD_POLL_INTERVAL))
                .await;
        };
        let shard = self.me.clone();
        let append: ReplicatedAppend = Rc::new(move |bytes| {
            let shard = shard.clone();
            Box::pin(async move {
                let shard = shard.upgrade().ok_or(GroupError::NotCoordinator)?;
                shard.append_offsets(partition, term, bytes).await
            })
        });
        let config = self.config.groups.clone();
        match GroupCoordinator::open_replicated(&replica.partition.log, end, config, append).await {
            Ok((coordinator, snapshot)) if self.coordinates(log, term) => {
                assert!(!self.groups.borrow().contains_key(&log), "one coordinator per offsets partition");
                self.groups.borrow_mut().insert(log, coordinator);
                // A replica restarted since that marker was appended knows it from here on.
                if let Some(snapshot) = snapshot {
                    replica.note_snapshot(snapshot);
                }
            }
            Ok((coordinator, _)) => coordinator.close_as(GroupError::NotCoordinator).await,
            Err(error) => {
                eprintln!(
                    "pyralog: {OFFSETS_TOPIC}/{partition}: replaying the committed offsets failed: {error}"
                );
                if self.coordinates(log, term) {
                    self.cluster().expect("a cluster").coordination.borrow_mut().remove(&log);
                }
            }
        }
    }

    /// Appends one batch to offsets partition `partition` through its replica, in `term` only,
    /// and waits until it is committed. Returns its first offset and the offset after it.
    async fn append_offsets(
        &self,
        partition: u32,
        term: i32,
        bytes: Bytes,
    ) -> Result<(i64, i64), GroupError> {
        let not_coordinator = |error: ShardError| match error {
            ShardError::NotLeader { .. } | ShardError::ShuttingDown => GroupError::NotCoordinator,
            ShardError::Storage(reason) => GroupError::Storage(reason),
            other => {
                eprintln!("pyralog: a commit to {OFFSETS_TOPIC}/{partition} failed: {other}");
                GroupError::CoordinatorNotAvailable
            }
        };
        let replica = self.local_replica(OFFSETS_TOPIC, partition).ok_or(GroupError::NotCoordinator)?;
        // Checked before it is proposed, as every batch a log takes.
        let headers = batch::parse_all(&bytes).map_err(|e| GroupError::Storage(e.to_string()))?;
        let partition_state = Rc::clone(&replica.partition);
        let turn =
            partition_state.append_turn.acquire_permit(1).await.map_err(|_| GroupError::NotCoordinator)?;
        let role = replica.role();
        if role.role != Role::Leader || role.term != term {
            return Err(GroupError::NotCoordinator);
        }
        self.check_in_sync(&replica).map_err(not_coordinator)?;
        let produced = self
            .produce_replicated(&replica, turn, &bytes, &headers, None, crate::Acks::All)
            .await
            .map_err(not_coordinator)?;
        Ok((produced.base_offset, produced.next_offset))
    }
}
