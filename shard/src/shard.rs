//! A shard: one core's partitions, cache and topic table, and its link to the other shards.
//!
//! Every operation enters through a public method of [`Shard`] on whichever shard received the
//! request. The topic table says which shard owns the partition; the work runs there, either
//! directly or after one hop over glommio's channel mesh ([`Message`]). Topic changes are
//! decided by shard 0, made durable in `topics.meta`, then applied on every shard before the
//! client hears back.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use glommio::channels::channel_mesh::{Full, MeshBuilder, Receivers, Senders};
use glommio::channels::local_channel;
use pyralog_dma::{batch, Log, LogConfig};

use crate::cache::ShardCache;
use crate::cluster::ClusterMeta;
use crate::epochs;
use crate::group::{GroupConfig, GroupCoordinator, GroupError, GroupOp, GroupReply};
use crate::metrics::{PartitionStats, ShardMetrics, ShardScrape};
use crate::offsets;
use crate::partition::{Durability, Partition};
use crate::producers::{self, ProducerStates, Refusal, Verdict};
use crate::replicated::{ClusterSettings, ControllerRequest, GroupId, ShardCluster};
use crate::topics::{self, TopicConfig, TopicMeta, TopicTable};
use crate::ShardError;

/// Messages in flight between two shards, per direction.
pub const MESH_CHANNEL_CAPACITY: usize = 1024;
/// Bytes a partition may hold appended but not yet durable before produce waits for a flush.
pub const UNFLUSHED_BYTES_MAX: u64 = 64 << 20;
/// Longest long-poll a fetch may ask for.
pub const FETCH_WAIT_MAX: Duration = Duration::from_secs(30);
/// Most bytes one partition's read returns, whatever a fetch asks (a larger batch still comes
/// whole): it bounds the memory a fetch takes, and the log's read ahead takes as much again.
/// Kafka clients ask 1 MiB per partition by default.
pub const FETCH_PARTITION_BYTES_MAX: u32 = 16 << 20;
/// Most bytes of records one fetch response carries over all its partitions, whatever the
/// request asks (a larger first batch still comes whole): half the native client's 64 MiB
/// response frame limit. Kafka clients ask 50 MiB by default and are simply given less.
pub const FETCH_RESPONSE_BYTES_MAX: u32 = 32 << 20;
/// Consumer groups are spread over this many offsets logs (`<data-dir>/groups/<n>/`), each
/// with its coordinator on shard `n % shards`. Fixed for the life of a data directory, like
/// Kafka's offsets.topic.num.partitions: it decides which log holds a group's offsets, so the
/// shard count can change between runs without losing them.
pub const GROUP_LOGS: usize = 8;

/// The offsets log (and so the coordinator) of a consumer group.
pub fn group_log_of(group_id: &str) -> usize {
    (topics::fnv1a(topics::FNV1A_BASIS, group_id) % GROUP_LOGS as u64) as usize
}

pub type ShardMesh = MeshBuilder<Message, Full>;

pub fn new_mesh(shard_count: usize) -> ShardMesh {
    MeshBuilder::full(shard_count, MESH_CHANNEL_CAPACITY)
}

#[derive(Debug, Clone)]
pub struct ShardConfig {
    pub data_dir: PathBuf,
    pub durability: Durability,
    pub log: LogConfig,
    /// How often retention runs (when the log config asks for it).
    pub retention_check_interval: Duration,
    pub cache_bytes: u64,
    pub groups: GroupConfig,
    /// Set when the node is part of a cluster: its topics are replicated (see `replicated`).
    pub cluster: Option<ClusterSettings>,
}

/// When a produce is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acks {
    /// Not at all (Kafka's acks=0).
    None,
    /// Once the batch is durable on the partition's leader (Kafka's acks=1): a replicated
    /// batch may then be lost if the leader fails before a follower holds it.
    Leader,
    /// Once the batch is durable on the write quorum (Kafka's acks=all). Without replication,
    /// the same as `Leader`.
    All,
}

/// An offset a lookup found, and the leader epoch of the batch holding it (the partition's
/// current epoch for the latest offset).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listed {
    pub offset: i64,
    pub leader_epoch: i32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Produced {
    pub base_offset: i64,
    pub next_offset: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    pub high_watermark: i64,
    pub log_start_offset: i64,
    pub records: Vec<Bytes>,
}

impl Fetched {
    pub fn bytes(&self) -> usize {
        self.records.iter().map(Bytes::len).sum()
    }
}

/// Trims part of a fetch response, in request order, to `room` bytes of records: each
/// partition keeps the chunks (whole batches) that still fit; when `first` (nothing was kept
/// before these), the first chunk is kept whatever its size, so a batch larger than the budget
/// is still delivered. A partition past the budget keeps its offsets and high watermark with
/// no records, and the client asks again from where it is. Returns the bytes kept.
pub fn keep_within<'a>(
    fetches: impl IntoIterator<Item = &'a mut Fetched>,
    room: usize,
    first: bool,
) -> usize {
    let mut left = room;
    let mut kept_any = !first;
    let mut kept = 0;
    for fetched in fetches {
        let keep = fetched
            .records
            .iter()
            .take_while(|chunk| {
                let fits = chunk.len() <= left || !kept_any;
                if fits {
                    left = left.saturating_sub(chunk.len());
                    kept += chunk.len();
                    kept_any = true;
                }
                fits
            })
            .count();
        fetched.records.truncate(keep);
    }
    kept
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FetchLimits {
    /// 0: no records, only the partition's offsets (checked against the offset asked).
    pub max_bytes: u32,
    /// Return the first batch even when it is larger than `max_bytes` (Kafka's rule for the
    /// first partition of a response). Without it, nothing larger than `max_bytes` is read.
    pub min_one_batch: bool,
    pub min_bytes: u32,
    pub max_wait: Duration,
    /// The leader epoch the client knows (Kafka's current_leader_epoch, KIP-320): checked
    /// against the partition's (see `epochs::fence`); -1 for no check.
    pub current_leader_epoch: i32,
}

/// Work one shard asks of another.
#[derive(Debug)]
pub enum Op {
    Produce {
        topic: String,
        partition: u32,
        records: Bytes,
        acks: Acks,
    },
    Fetch {
        topic: String,
        partition: u32,
        offset: i64,
        limits: FetchLimits,
    },
    ListOffsets {
        topic: String,
        partition: u32,
        timestamp: i64,
        current_leader_epoch: Option<i32>,
    },
    /// OffsetForLeaderEpoch (see `Shard::end_of_epoch`).
    EpochEnd {
        topic: String,
        partition: u32,
        current_leader_epoch: i32,
        leader_epoch: i32,
    },
    CreateTopic {
        name: String,
        partitions: u32,
        config: TopicConfig,
    },
    /// Grow a topic to `partitions`.
    CreatePartitions {
        name: String,
        partitions: u32,
    },
    DeleteTopic {
        name: String,
    },
    /// From shard 0 to every shard: the topic now exists (or has more partitions), open your
    /// partitions of it.
    ApplyCreate {
        name: String,
        meta: TopicMeta,
    },
    /// From shard 0 to every shard: the topic is gone, close and delete your partitions.
    ApplyDelete {
        name: String,
    },
    /// A request for the coordinator of offsets log `log`.
    Group {
        log: usize,
        op: GroupOp,
    },
    /// This shard's part of a scrape of the node's metrics.
    Scrape,
    /// A peer's message for a replica this shard owns.
    Deliver {
        topic_id: [u8; 16],
        partition: u32,
        message: pyralog_replication::Message,
    },
    /// From shard 0 to every shard: the cluster's metadata, as the controller's log now says.
    ApplyCluster {
        meta: ClusterMeta,
    },
    /// To shard 0: a controller request forwarded by another node.
    Controller {
        request: ControllerRequest,
    },
    /// This shard's replicas, as operators see them.
    ReplicaStatus,
    /// A checksum of a replica's batches in `[from, end)` (see `Shard::replica_checksum`).
    Checksum {
        topic: String,
        partition: u32,
        from: i64,
        end: i64,
    },
    /// To shard 0: the next producer id of this node's blocks (see `producer_ids`).
    NextProducerId,
    /// A replica of this node reported a new role (see `replicated`).
    Role {
        group: GroupId,
        role: crate::ReplicaRole,
        /// The holding shard's number for this report (see `ShardCluster::roles`).
        report: u64,
    },
    /// From shard 0: the nodes this node counts as down changed (see `replicated`).
    Down {
        nodes: Vec<u32>,
        report: u64,
    },
}

#[derive(Debug)]
pub enum OpResult {
    Produced(Result<Produced, ShardError>),
    Fetched(Result<Fetched, ShardError>),
    Offset(Result<i64, ShardError>),
    Listed(Result<Listed, ShardError>),
    EpochEnd(Result<Option<(i32, i64)>, ShardError>),
    Done(Result<(), ShardError>),
    Group(Result<GroupReply, GroupError>),
    Scraped(ShardScrape),
    Replicas(Vec<crate::ReplicaStatus>),
    Checksum(Result<(u32, u64, i64), ShardError>),
}

#[derive(Debug)]
pub enum Message {
    Request { id: u64, from: usize, op: Op },
    Reply { id: u64, result: OpResult },
}

pub struct Shard {
    /// This shard itself, for the tasks and hooks it hands out.
    pub(crate) me: std::rc::Weak<Shard>,
    pub id: usize,
    pub count: usize,
    pub(crate) config: ShardConfig,
    pub(crate) topics: RefCell<TopicTable>,
    pub(crate) partitions: RefCell<HashMap<(String, u32), Rc<Partition>>>,
    pub(crate) cache: Rc<RefCell<ShardCache>>,
    pub(crate) next_partition_key: Cell<u64>,
    senders: Senders<Message>,
    next_request_id: Cell<u64>,
    /// Calls to other shards awaiting their answer: the shard asked, and where to answer.
    replies: RefCell<HashMap<u64, (usize, local_channel::LocalSender<OpResult>)>>,
    /// The coordinators of the offsets logs this shard owns, by log number; in a cluster, of
    /// the offsets topic's partitions this shard owns and this node leads (see `offsets`).
    pub(crate) groups: RefCell<HashMap<usize, Rc<GroupCoordinator>>>,
    /// Shard 0 decides topic changes one at a time: each reads the table, awaits (opening
    /// logs, asking every shard) and persists the table it read plus its change.
    topic_changes: glommio::sync::Semaphore,
    pub(crate) shutting_down: Cell<bool>,
    pub(crate) metrics: Rc<ShardMetrics>,
    /// This node's cluster, when it is part of one (see `replicated`).
    pub(crate) cluster: Option<ShardCluster>,
    /// Writes this shard's registry as Prometheus text for a scrape (set by the daemon).
    scrape_hook: RefCell<Option<ScrapeHook>>,
}

/// See [`Shard::set_scrape_hook`].
pub type ScrapeHook = Box<dyn Fn() -> String>;

impl Shard {
    /// Joins the mesh, loads the topic table and opens this shard's partitions.
    pub async fn start(mesh: ShardMesh, config: ShardConfig) -> Result<Rc<Shard>, ShardError> {
        let (senders, receivers) =
            mesh.join().await.map_err(|e| ShardError::Storage(format!("joining the shard mesh: {e}")))?;
        let id = senders.peer_id();
        let count = senders.nr_consumers();
        pyralog_dma::settle_device_probe(&config.data_dir).await?;
        let table = TopicTable::load(&config.data_dir)?;
        let config_cluster = config.cluster.clone();
        let shard = Rc::new_cyclic(|me| Shard {
            me: me.clone(),
            id,
            count,
            cache: Rc::new(RefCell::new(ShardCache::new(config.cache_bytes))),
            config,
            topics: RefCell::new(TopicTable::default()),
            partitions: RefCell::new(HashMap::new()),
            next_partition_key: Cell::new(0),
            senders,
            next_request_id: Cell::new(0),
            replies: RefCell::new(HashMap::new()),
            groups: RefCell::new(HashMap::new()),
            topic_changes: glommio::sync::Semaphore::new(1),
            shutting_down: Cell::new(false),
            metrics: Rc::new(ShardMetrics::default()),
            scrape_hook: RefCell::new(None),
            cluster: config_cluster.map(ShardCluster::new),
        });
        // In a cluster, offsets live in the replicated offsets topic (see `offsets`): the
        // node's own offsets logs are not opened.
        let local_logs = if shard.cluster.is_none() { GROUP_LOGS } else { 0 };
        for log in (0..local_logs).filter(|log| log % count == id) {
            let dir = shard.config.data_dir.join("groups").join(log.to_string());
            let coordinator =
                GroupCoordinator::open_with(dir, shard.config.log.clone(), shard.config.groups.clone())
                    .await?;
            shard.groups.borrow_mut().insert(log, coordinator);
        }
        // A cluster's topics come from its controller (`start_cluster`), not from topics.meta.
        if shard.cluster.is_none() {
            for (name, meta) in table.iter_meta() {
                shard.apply_create(name, *meta).await?;
            }
        }
        shard.spawn_mesh_receivers(receivers);
        shard.start_cluster().await?;
        glommio::spawn_local(Rc::clone(&shard).run_retention()).detach();
        Ok(shard)
    }

    pub fn topics(&self) -> TopicTable {
        self.topics.borrow().clone()
    }

    /// The name of the topic whose id is `id` (Kafka's topic ids, Fetch v13+).
    pub fn topic_named(&self, id: &[u8; 16]) -> Option<String> {
        self.topics.borrow().name_of(id).map(str::to_owned)
    }

    /// The metrics this shard updates itself, for the daemon to register.
    pub fn metrics(&self) -> &ShardMetrics {
        &self.metrics
    }

    /// Sets what writes this shard's part of a scrape: the daemon's registry of this shard,
    /// encoded on this shard's core (see `metrics`).
    pub fn set_scrape_hook(&self, hook: ScrapeHook) {
        *self.scrape_hook.borrow_mut() = Some(hook);
    }

    /// Every shard's report, in shard order: each written on its own core.
    pub async fn scrape(&self) -> Result<Vec<ShardScrape>, ShardError> {
        let mut scrapes = Vec::with_capacity(self.count);
        for target in 0..self.count {
            match self.call(target, Op::Scrape).await? {
                OpResult::Scraped(scrape) => scrapes.push(scrape),
                other => unreachable!("a scrape answered with {other:?}"),
            }
        }
        Ok(scrapes)
    }

    /// This shard's part of a scrape.
    fn scrape_local(&self) -> ShardScrape {
        let text = self.scrape_hook.borrow().as_ref().map(|hook| hook()).unwrap_or_default();
        let mut partitions: Vec<PartitionStats> = self
            .partitions
            .borrow()
            .values()
            .map(|p| PartitionStats {
                topic: p.topic.clone(),
                partition: p.partition,
                log_start_offset: p.log.log_start_offset(),
                log_end_offset: p.log.next_offset(),
                durable_offset: p.log.durable_offset(),
                high_watermark: p.high_watermark(),
                size_bytes: p.log.size_bytes(),
                stopped: p.log.stopped().is_some(),
            })
            .collect();
        partitions.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
        let committed =
            self.groups.borrow().values().flat_map(|coordinator| coordinator.committed_offsets()).collect();
        ShardScrape { shard: self.id, text, partitions, committed }
    }

    pub fn owner_of(&self, topic: &str, partition: u32) -> usize {
        topics::owner_shard(topic, partition, self.count)
    }

    pub(crate) fn route(&self, topic: &str, partition: u32) -> Result<usize, ShardError> {
        let count =
            self.topics.borrow().get(topic).ok_or_else(|| ShardError::UnknownTopic(topic.to_owned()))?;
        if partition >= count {
            return Err(ShardError::UnknownPartition { topic: topic.to_owned(), partition, count });
        }
        Ok(self.owner_of(topic, partition))
    }

    pub async fn produce(
        &self,
        topic: &str,
        partition: u32,
        records: Bytes,
        acks: Acks,
    ) -> Result<Produced, ShardError> {
        offsets::refuse_internal(topic)?;
        let owner = self.route(topic, partition)?;
        if owner == self.id {
            return self.produce_local(topic, partition, records, acks).await;
        }
        let op = Op::Produce { topic: topic.to_owned(), partition, records, acks };
        match self.call(owner, op).await? {
            OpResult::Produced(result) => result,
            other => unreachable!("produce answered with {other:?}"),
        }
    }

    pub async fn fetch(
        &self,
        topic: &str,
        partition: u32,
        offset: i64,
        limits: FetchLimits,
    ) -> Result<Fetched, ShardError> {
        let owner = self.route(topic, partition)?;
        if owner == self.id {
            return self.fetch_local(topic, partition, offset, limits).await;
        }
        match self.call(owner, Op::Fetch { topic: topic.to_owned(), partition, offset, limits }).await? {
            OpResult::Fetched(result) => result,
            other => unreachable!("fetch answered with {other:?}"),
        }
    }

    /// `timestamp`: -2 earliest, -1 latest, -3 the first batch holding the largest timestamp,
    /// else the first batch whose max timestamp is at or after it (-1 if none).
    /// `current_leader_epoch`: a Kafka client's lookup, which a replicated partition answers
    /// from its leader only, after the epoch check (-1 in it: none); `None`, a native one,
    /// answered by any replica.
    pub async fn list_offsets(
        &self,
        topic: &str,
        partition: u32,
        timestamp: i64,
        current_leader_epoch: Option<i32>,
    ) -> Result<Listed, ShardError> {
        let owner = self.route(topic, partition)?;
        if owner == self.id {
            return self.list_offsets_local(topic, partition, timestamp, current_leader_epoch).await;
        }
        let op = Op::ListOffsets { topic: topic.to_owned(), partition, timestamp, current_leader_epoch };
        match self.call(owner, op).await? {
            OpResult::Listed(result) => result,
            other => unreachable!("list offsets answered with {other:?}"),
        }
    }

    /// OffsetForLeaderEpoch, answered by the partition's leader after the epoch check of
    /// `current_leader_epoch` (-1: none): the largest epoch at or below `leader_epoch` the log
    /// holds and where it ends; `None` for an epoch unknown here (see `epochs::end_of_epoch`).
    pub async fn end_of_epoch(
        &self,
        topic: &str,
        partition: u32,
        current_leader_epoch: i32,
        leader_epoch: i32,
    ) -> Result<Option<(i32, i64)>, ShardError> {
        let owner = self.route(topic, partition)?;
        if owner == self.id {
            return self.end_of_epoch_local(topic, partition, current_leader_epoch, leader_epoch);
        }
        let op = Op::EpochEnd { topic: topic.to_owned(), partition, current_leader_epoch, leader_epoch };
        match self.call(owner, op).await? {
            OpResult::EpochEnd(result) => result,
            other => unreachable!("an epoch's end answered with {other:?}"),
        }
    }

    pub async fn create_topic(
        &self,
        name: &str,
        partitions: u32,
        config: TopicConfig,
    ) -> Result<(), ShardError> {
        topics::validate_topic_name(name)?;
        offsets::refuse_internal(name)?;
        check_partition_count(partitions)?;
        match self.call(0, Op::CreateTopic { name: name.to_owned(), partitions, config }).await? {
            OpResult::Done(result) => result,
            other => unreachable!("create topic answered with {other:?}"),
        }
    }

    /// Grows `name` to `partitions` partitions (never shrinks: Kafka cannot either).
    pub async fn create_partitions(&self, name: &str, partitions: u32) -> Result<(), ShardError> {
        offsets::refuse_internal(name)?;
        check_partition_count(partitions)?;
        match self.call(0, Op::CreatePartitions { name: name.to_owned(), partitions }).await? {
            OpResult::Done(result) => result,
            other => unreachable!("create partitions answered with {other:?}"),
        }
    }

    pub async fn delete_topic(&self, name: &str) -> Result<(), ShardError> {
        offsets::refuse_internal(name)?;
        match self.call(0, Op::DeleteTopic { name: name.to_owned() }).await? {
            OpResult::Done(result) => result,
            other => unreachable!("delete topic answered with {other:?}"),
        }
    }

    /// Runs a consumer-group request on the group's coordinator: the shard of its offsets log,
    /// or in a cluster the shard owning its offsets partition, which answers `NotCoordinator`
    /// unless this node leads that partition.
    pub async fn group(&self, group_id: &str, op: GroupOp) -> Result<GroupReply, GroupError> {
        self.group_on(group_log_of(group_id), op).await
    }

    /// The consumer groups this shard coordinates, those of its own offsets logs: (group id,
    /// protocol type, state), by group id. Each shard is a Kafka broker, and a Kafka broker lists
    /// only the groups it coordinates: a client that asks every broker for its groups and joins
    /// the answers (as admin clients do) then sees each group once, not once per shard.
    pub async fn list_groups(&self) -> Result<Vec<(String, String, String)>, ShardError> {
        let mut all = Vec::new();
        let mine = |log: &usize| match self.cluster() {
            None => log % self.count == self.id,
            Some(_) => self.offsets_shard(*log) == Ok(self.id),
        };
        for log in (0..GROUP_LOGS).filter(mine) {
            match self.group_on(log, GroupOp::List).await {
                Ok(GroupReply::Groups(groups)) => all.extend(groups),
                Ok(other) => unreachable!("list groups answered with {other:?}"),
                // In a cluster: an offsets partition this node does not lead.
                Err(_) if self.cluster().is_some() => {}
                Err(_) => return Err(ShardError::ShuttingDown),
            }
        }
        assert!(
            all.iter().all(|(group_id, _, _)| mine(&group_log_of(group_id))),
            "shard {} listed a group another shard coordinates",
            self.id
        );
        all.sort();
        Ok(all)
    }

    async fn group_on(&self, log: usize, op: GroupOp) -> Result<GroupReply, GroupError> {
        let target = match self.cluster() {
            None => log % self.count,
            Some(_) => self.offsets_shard(log)?,
        };
        match self.call(target, Op::Group { log, op }).await {
            Ok(OpResult::Group(reply)) => reply,
            Ok(other) => unreachable!("a group request answered with {other:?}"),
            Err(_) => Err(GroupError::CoordinatorNotAvailable),
        }
    }

    /// Runs `op` on shard `target`: here, or over the mesh.
    pub(crate) async fn call(&self, target: usize, op: Op) -> Result<OpResult, ShardError> {
        if self.shutting_down.get() {
            return Err(ShardError::ShuttingDown);
        }
        if target == self.id {
            return Ok(Box::pin(self.execute(op)).await);
        }
        let id = self.next_request_id.get();
        self.next_request_id.set(id + 1);
        let (sender, receiver) = local_channel::new_bounded(1);
        self.replies.borrow_mut().insert(id, (target, sender));
        let sent = self.senders.send_to(target, Message::Request { id, from: self.id, op }).await;
        if sent.is_err() {
            self.replies.borrow_mut().remove(&id);
            return Err(ShardError::ShuttingDown);
        }
        receiver.recv().await.ok_or(ShardError::ShuttingDown)
    }

    async fn execute(&self, op: Op) -> OpResult {
        match op {
            Op::Produce { topic, partition, records, acks } => {
                OpResult::Produced(self.produce_local(&topic, partition, records, acks).await)
            }
            Op::Fetch { topic, partition, offset, limits } => {
                OpResult::Fetched(self.fetch_local(&topic, partition, offset, limits).await)
            }
            Op::ListOffsets { topic, partition, timestamp, current_leader_epoch } => OpResult::Listed(
                self.list_offsets_local(&topic, partition, timestamp, current_leader_epoch).await,
            ),
            Op::EpochEnd { topic, partition, current_leader_epoch, leader_epoch } => OpResult::EpochEnd(
                self.end_of_epoch_local(&topic, partition, current_leader_epoch, leader_epoch),
            ),
            Op::CreateTopic { name, partitions, config } => {
                OpResult::Done(match self.topic_change_turn().await {
                    Ok(_turn) => self.create_topic_as_leader(&name, partitions, config).await,
                    Err(error) => Err(error),
                })
            }
            Op::CreatePartitions { name, partitions } => {
                OpResult::Done(match self.topic_change_turn().await {
                    Ok(_turn) => self.create_partitions_as_leader(&name, partitions).await,
                    Err(error) => Err(error),
                })
            }
            Op::DeleteTopic { name } => OpResult::Done(match self.topic_change_turn().await {
                Ok(_turn) => self.delete_topic_as_leader(&name).await,
                Err(error) => Err(error),
            }),
            Op::ApplyCreate { name, meta } => OpResult::Done(self.apply_create(&name, meta).await),
            Op::ApplyDelete { name } => OpResult::Done(self.apply_delete(&name).await),
            Op::Group { log, op } => {
                let coordinator = self.groups.borrow().get(&log).cloned();
                OpResult::Group(match coordinator {
                    Some(coordinator) => Ok(coordinator.execute(op).await),
                    None if self.cluster().is_some() => Err(self.no_coordinator(log)),
                    None => panic!("offsets log {log} is not on shard {}", self.id),
                })
            }
            Op::Scrape => OpResult::Scraped(self.scrape_local()),
            Op::Deliver { topic_id, partition, message } => {
                // Sent to the owner by `deliver`: it holds the replica or drops the message.
                let replica =
                    self.cluster().and_then(|c| c.replicas.borrow().get(&(topic_id, partition)).cloned());
                if let Some(replica) = replica {
                    replica.receive(message);
                }
                OpResult::Done(Ok(()))
            }
            Op::ApplyCluster { meta } => OpResult::Done(self.apply_cluster(meta).await),
            Op::ReplicaStatus => OpResult::Replicas(self.local_replica_statuses()),
            Op::Checksum { topic, partition, from, end } => {
                OpResult::Checksum(self.local_checksum(&topic, partition, from, end).await)
            }
            Op::NextProducerId => OpResult::Offset(self.take_producer_id().await),
            Op::Down { nodes, report } => {
                self.note_down(nodes, report);
                OpResult::Done(Ok(()))
            }
            Op::Role { group, role, report } => {
                self.note_role(group, role, report);
                OpResult::Done(Ok(()))
            }
            Op::Controller { request } => {
                let Some(controller) = self.controller() else {
                    // Not a seed: name the leader it heard of, so the asker goes there.
                    let heard = self.replica_role(crate::CONTROLLER_TOPIC_ID, 0);
                    return OpResult::Offset(Err(ShardError::NotController {
                        leader: heard.and_then(|r| r.leader),
                        term: heard.map_or(-1, |r| r.term),
                    }));
                };
                let role = controller.role();
                let node = self.cluster().expect("a cluster").settings.node_id;
                OpResult::Offset(
                    if role.leader == Some(node) && role.role == pyralog_replication::Role::Leader {
                        self.execute_controller_request(request).await
                    } else {
                        Err(ShardError::NotController { leader: role.leader, term: role.term })
                    },
                )
            }
        }
    }

    fn spawn_mesh_receivers(self: &Rc<Self>, mut receivers: Receivers<Message>) {
        for (peer, receiver) in receivers.streams() {
            let shard = Rc::clone(self);
            glommio::spawn_local(async move {
                while let Some(message) = receiver.recv().await {
                    match message {
                        Message::Request { id, from, op } => {
                            let shard = Rc::clone(&shard);
                            glommio::spawn_local(async move {
                                let result = shard.execute(op).await;
                                // A peer that is gone no longer waits for the answer.
                                let _ = shard.senders.send_to(from, Message::Reply { id, result }).await;
                            })
                            .detach();
                        }
                        Message::Reply { id, result } => {
                            if let Some((_, sender)) = shard.replies.borrow_mut().remove(&id) {
                                let _ = sender.try_send(result);
                            }
                        }
                    }
                }
                // The peer closed its side (it stopped): an answer it still owed will not come.
                // Dropping the reply senders ends those calls with ShuttingDown.
                shard.replies.borrow_mut().retain(|_, (target, _)| *target != peer);
            })
            .detach();
        }
    }

    fn local_partition(&self, topic: &str, partition: u32) -> Result<Rc<Partition>, ShardError> {
        if self.shutting_down.get() {
            return Err(ShardError::ShuttingDown);
        }
        self.partitions.borrow().get(&(topic.to_owned(), partition)).cloned().ok_or_else(|| {
            match self.topics.borrow().get(topic) {
                None => ShardError::UnknownTopic(topic.to_owned()),
                Some(count) => ShardError::UnknownPartition { topic: topic.to_owned(), partition, count },
            }
        })
    }

    /// A produce on the shard that owns the partition: counted by kind when it fails.
    async fn produce_local(
        &self,
        topic: &str,
        partition: u32,
        records: Bytes,
        acks: Acks,
    ) -> Result<Produced, ShardError> {
        let produced = self.produce_owned(topic, partition, records, acks).await;
        if let Err(error) = &produced {
            self.metrics().note_produce_error(error);
        }
        produced
    }

    async fn produce_owned(
        &self,
        topic: &str,
        partition: u32,
        records: Bytes,
        acks: Acks,
    ) -> Result<Produced, ShardError> {
        let wait_durable = acks != Acks::None;
        let max_message_bytes = self.topics.borrow().meta(topic).and_then(|m| m.config.max_message_bytes);
        let partition = self.local_partition(topic, partition)?;
        let headers = batch::parse_all(&records)?;
        if let Some(limit) = max_message_bytes {
            if let Some(big) = headers.iter().find(|h| h.total_bytes > limit) {
                return Err(ShardError::TooLarge(format!(
                    "a batch of {} bytes exceeds max.message.bytes={limit} of topic {topic}",
                    big.total_bytes
                )));
            }
        }
        let turn = partition.append_turn.acquire_permit(1).await.map_err(|_| ShardError::ShuttingDown)?;
        loop {
            // The partition may have closed while this produce waited (topic deleted).
            if partition.closing.get() {
                return Err(ShardError::UnknownTopic(topic.to_owned()));
            }
            if partition.log.unflushed_bytes() <= UNFLUSHED_BYTES_MAX || partition.log.stopped().is_some() {
                break;
            }
            partition.flushed.listen().await;
        }
        // No await between this check and the append: no other produce can slip in between.
        let replica = self.local_replica(topic, partition.partition);
        let retried = self
            .check_produce(replica.as_deref(), &partition, &headers, acks)
            .map_err(|error| note_refusal(&partition, &headers, error))?;
        if let Some(replica) = replica {
            return self.produce_replicated(&replica, turn, &records, &headers, retried, acks).await;
        }
        if let Some(done) = retried {
            drop(turn);
            if partition.durability == Durability::Sync && wait_durable {
                partition.wait_durable(done.next_offset).await?;
            }
            return Ok(done);
        }
        // The log takes the request's buffer (stamping offsets in place when nothing else
        // shares it), so it is not held beyond the append while this produce waits for a flush.
        let appended = partition
            .log
            .append(records, &headers)
            .map_err(|error| note_refusal(&partition, &headers, error.into()))?;
        {
            let mut producers = partition.producers.borrow_mut();
            for stamped in &appended.batches {
                producers.record(&stamped.header);
            }
        }
        drop(turn);
        {
            let mut cache = self.cache.borrow_mut();
            for stamped in &appended.batches {
                cache.insert(
                    partition.key,
                    stamped.header.base_offset,
                    stamped.header.next_offset(),
                    stamped.bytes.clone(),
                );
            }
        }
        partition.flusher_wake.notify();
        if partition.durability != Durability::Sync {
            partition.data_arrived.notify();
        } else if wait_durable {
            partition.wait_durable(appended.next_offset).await?;
        }
        Ok(Produced { base_offset: appended.base_offset, next_offset: appended.next_offset })
    }

    /// Whether a produce of `headers` may be appended now: `Some` when it is a retry of a
    /// batch already appended. Every refusal the client retries comes before the sequence
    /// check, so a batch refused for one does not make the next one in flight out of order.
    fn check_produce(
        &self,
        replica: Option<&crate::replica::Replica>,
        partition: &Partition,
        headers: &[batch::BatchHeader],
        acks: Acks,
    ) -> Result<Option<Produced>, ShardError> {
        if let Some(replica) = replica {
            // A replica that does not lead says so before anything else: its producer state
            // may lag the leader's, and a sequence error from it would be taken as the
            // leader's.
            let role = replica.role();
            if role.role != pyralog_replication::Role::Leader {
                return Err(replica.not_leader(role.leader, role.term));
            }
            // Then min.insync.replicas, as Kafka orders them.
            if acks == Acks::All {
                self.check_in_sync(replica)?;
            }
            // Then what would refuse the proposal itself (a handover under way, the core no
            // longer leading, a failed replica).
            replica.check_can_propose()?;
        }
        check_producers(&partition.producers.borrow(), headers)
    }

    async fn fetch_local(
        &self,
        topic: &str,
        partition: u32,
        offset: i64,
        limits: FetchLimits,
    ) -> Result<Fetched, ShardError> {
        let partition = self.local_partition(topic, partition)?;
        // A replicated partition is read from its leader: a follower's commit point lags.
        self.check_epoch_and_leader(topic, partition.partition, limits.current_leader_epoch)?;
        let deadline = Instant::now() + limits.max_wait.min(FETCH_WAIT_MAX);
        // No bytes: the partition's offsets only (a fetch whose budget is spent).
        let offsets_only = limits.max_bytes == 0;
        let max_bytes = limits.max_bytes.clamp(1, FETCH_PARTITION_BYTES_MAX) as usize;
        loop {
            // A long-poll can outlive its partition (topic deleted, node stopping).
            if partition.closing.get() {
                return Err(if self.shutting_down.get() {
                    ShardError::ShuttingDown
                } else {
                    ShardError::UnknownTopic(topic.to_owned())
                });
            }
            let high_watermark = partition.high_watermark();
            let log_start_offset = partition.log.log_start_offset();
            if offset < log_start_offset || offset > high_watermark {
                return Err(ShardError::OffsetOutOfRange(format!(
                    "offset {offset} is outside [{log_start_offset}, {high_watermark}] of {topic}/{}",
                    partition.partition
                )));
            }
            let mut records = Vec::new();
            if offsets_only {
                return Ok(Fetched { high_watermark, log_start_offset, records });
            }
            let mut from_cache = false;
            if offset < high_watermark {
                let min_one = limits.min_one_batch;
                let cached =
                    self.cache.borrow().read(partition.key, offset, high_watermark, max_bytes, min_one);
                from_cache = cached.is_some();
                records = match cached {
                    Some(chunks) => chunks,
                    None if min_one => partition.log.read(offset, max_bytes).await?.into_iter().collect(),
                    None => partition.log.read_within(offset, max_bytes).await?.into_iter().collect(),
                };
            }
            let bytes: usize = records.iter().map(Bytes::len).sum();
            let now = Instant::now();
            if bytes >= limits.min_bytes.max(1) as usize || now >= deadline || self.shutting_down.get() {
                // One count per read that returns records: not per wake-up of a long poll.
                match (bytes, from_cache) {
                    (0, _) => {}
                    (_, true) => {
                        self.metrics.cache_hits.inc();
                    }
                    (_, false) => {
                        self.metrics.cache_misses.inc();
                    }
                }
                return Ok(Fetched { high_watermark, log_start_offset, records });
            }
            futures_lite::future::or(partition.data_arrived.listen(), glommio::timer::sleep(deadline - now))
                .await;
        }
    }

    /// Kafka's checks of a request naming `current_leader_epoch` (-1: none), in Kafka's order:
    /// the epoch (`epochs::fence`), then, for a replicated partition, that this replica leads.
    /// Returns the replica, if the partition is replicated.
    fn check_epoch_and_leader(
        &self,
        topic: &str,
        partition: u32,
        current_leader_epoch: i32,
    ) -> Result<Option<Rc<crate::replica::Replica>>, ShardError> {
        let replica = self.local_replica(topic, partition);
        let role = replica.as_ref().map(|r| r.role());
        let known = role.map_or(epochs::SINGLE_NODE_EPOCH, |r| r.term);
        epochs::fence(topic, partition, known, current_leader_epoch)?;
        if let (Some(replica), Some(role)) = (&replica, role) {
            if role.role != pyralog_replication::Role::Leader {
                return Err(replica.not_leader(role.leader, role.term));
            }
        }
        Ok(replica)
    }

    fn end_of_epoch_local(
        &self,
        topic: &str,
        partition: u32,
        current_leader_epoch: i32,
        leader_epoch: i32,
    ) -> Result<Option<(i32, i64)>, ShardError> {
        let local = self.local_partition(topic, partition)?;
        Ok(match self.check_epoch_and_leader(topic, partition, current_leader_epoch)? {
            Some(replica) => replica.end_of_epoch(leader_epoch),
            None => epochs::end_of_epoch_single(leader_epoch, local.log.next_offset()),
        })
    }

    async fn list_offsets_local(
        &self,
        topic: &str,
        partition_index: u32,
        timestamp: i64,
        current_leader_epoch: Option<i32>,
    ) -> Result<Listed, ShardError> {
        let partition = self.local_partition(topic, partition_index)?;
        let replica = match current_leader_epoch {
            Some(epoch) => self.check_epoch_and_leader(topic, partition_index, epoch)?,
            None => self.local_replica(topic, partition_index),
        };
        let offset = self.offset_of(&partition, timestamp).await?;
        let leader_epoch = match replica {
            None => epochs::SINGLE_NODE_EPOCH,
            Some(replica) if timestamp == -1 || offset < 0 => replica.role().term,
            Some(replica) => replica.epoch_at(offset),
        };
        Ok(Listed { offset, leader_epoch })
    }

    async fn offset_of(&self, partition: &Partition, timestamp: i64) -> Result<i64, ShardError> {
        Ok(match timestamp {
            -2 => partition.log.log_start_offset(),
            -1 => partition.high_watermark(),
            -3 => match partition.log.max_timestamp() {
                Some(max) => partition.log.offset_for_timestamp(max).await?.unwrap_or(-1),
                None => -1,
            },
            t if t < 0 => {
                return Err(ShardError::InvalidTopic(format!(
                    "timestamp {t} is neither -3, -2, -1 nor a time"
                )))
            }
            t => partition.log.offset_for_timestamp(t).await?.unwrap_or(-1),
        })
    }

    /// Waits for this shard's turn to change the topic table (see `topic_changes`).
    async fn topic_change_turn(&self) -> Result<glommio::sync::Permit<'_>, ShardError> {
        self.topic_changes.acquire_permit(1).await.map_err(|_| ShardError::ShuttingDown)
    }

    async fn create_topic_as_leader(
        &self,
        name: &str,
        partitions: u32,
        config: TopicConfig,
    ) -> Result<(), ShardError> {
        assert_eq!(self.id, 0, "shard 0 decides topic changes");
        if self.cluster().is_some() {
            let request = ControllerRequest::CreateTopic { name: name.to_owned(), partitions, config };
            return self.controller_request(request).await;
        }
        if self.topics.borrow().get(name).is_some() {
            return Err(ShardError::TopicAlreadyExists(name.to_owned()));
        }
        // Files left by a delete that a crash interrupted must not come back as the new topic's.
        let dir = topics::topic_dir(&self.config.data_dir, name);
        match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(ShardError::Storage(format!("removing leftover {}: {e}", dir.display())))
            }
            _ => {}
        }
        let meta = TopicMeta::new(partitions, config);
        let mut table = self.topics.borrow().clone();
        table.insert(name, meta);
        table.persist(&self.config.data_dir)?;
        self.broadcast(|| Op::ApplyCreate { name: name.to_owned(), meta }).await
    }

    async fn create_partitions_as_leader(&self, name: &str, partitions: u32) -> Result<(), ShardError> {
        assert_eq!(self.id, 0, "shard 0 decides topic changes");
        if self.cluster().is_some() {
            let request = ControllerRequest::CreatePartitions { name: name.to_owned(), partitions };
            return self.controller_request(request).await;
        }
        let mut meta =
            self.topics.borrow().meta(name).ok_or_else(|| ShardError::UnknownTopic(name.to_owned()))?;
        if partitions <= meta.partitions {
            return Err(ShardError::InvalidPartitions(format!(
                "topic '{name}' has {} partitions; it can only grow, not to {partitions}",
                meta.partitions
            )));
        }
        meta.partitions = partitions;
        let mut table = self.topics.borrow().clone();
        table.insert(name, meta);
        table.persist(&self.config.data_dir)?;
        self.broadcast(|| Op::ApplyCreate { name: name.to_owned(), meta }).await
    }

    async fn delete_topic_as_leader(&self, name: &str) -> Result<(), ShardError> {
        assert_eq!(self.id, 0, "shard 0 decides topic changes");
        if self.cluster().is_some() {
            return self.controller_request(ControllerRequest::DeleteTopic { name: name.to_owned() }).await;
        }
        let mut table = self.topics.borrow().clone();
        if !table.remove(name) {
            return Err(ShardError::UnknownTopic(name.to_owned()));
        }
        table.persist(&self.config.data_dir)?;
        self.broadcast(|| Op::ApplyDelete { name: name.to_owned() }).await?;
        let dir = topics::topic_dir(&self.config.data_dir, name);
        match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(ShardError::Storage(format!("deleting {}: {e}", dir.display())))
            }
            _ => Ok(()),
        }
    }

    async fn broadcast(&self, op: impl Fn() -> Op) -> Result<(), ShardError> {
        for target in 0..self.count {
            match self.call(target, op()).await? {
                OpResult::Done(result) => result?,
                other => unreachable!("topic change answered with {other:?}"),
            }
        }
        Ok(())
    }

    /// Opens this shard's partitions of the topic, then makes the topic visible here, so a
    /// request routed by this shard's table never finds a partition still opening.
    async fn apply_create(&self, name: &str, meta: TopicMeta) -> Result<(), ShardError> {
        for partition in (0..meta.partitions).filter(|p| self.owner_of(name, *p) == self.id) {
            if self.partitions.borrow().contains_key(&(name.to_owned(), partition)) {
                continue;
            }
            let dir = topics::partition_dir(&self.config.data_dir, name, partition);
            let log = Log::open(&dir, self.config.log.clone()).await?;
            let producers = rebuild_producers(&log).await?;
            let key = self.next_partition_key.get();
            self.next_partition_key.set(key + 1);
            let partition = Rc::new(Partition::new(name, partition, key, log, self.config.durability));
            *partition.producers.borrow_mut() = producers;
            partition.flusher_running.set(true);
            let cache = Rc::clone(&self.cache);
            let flusher = Rc::clone(&partition).run_flusher(Rc::clone(&self.metrics), move |p| {
                let mut cache = cache.borrow_mut();
                cache.mark_durable(p.key, p.log.durable_offset());
                if p.log.stopped().is_some() {
                    cache.drop_undurable(p.key);
                }
            });
            glommio::spawn_local(flusher).detach();
            self.partitions.borrow_mut().insert((name.to_owned(), partition.partition), partition);
        }
        self.topics.borrow_mut().insert(name, meta);
        Ok(())
    }

    async fn apply_delete(&self, name: &str) -> Result<(), ShardError> {
        self.topics.borrow_mut().remove(name);
        let doomed: Vec<Rc<Partition>> = {
            let mut partitions = self.partitions.borrow_mut();
            let keys: Vec<_> = partitions.keys().filter(|(t, _)| t == name).cloned().collect();
            keys.iter().filter_map(|k| partitions.remove(k)).collect()
        };
        for partition in doomed {
            partition.stop_flusher().await;
            self.cache.borrow_mut().forget(partition.key);
            partition.data_arrived.notify();
            // The files are deleted with the topic directory; a flush error here changes nothing.
            let _ = partition.log.close().await;
        }
        Ok(())
    }

    async fn run_retention(self: Rc<Self>) {
        let retention = self.config.log.retention_bytes.is_some() || self.config.log.retention_ms.is_some();
        // In a cluster, also for the offsets topic's and the controller's replicas (cut below
        // their snapshots).
        if !retention && self.cluster().is_none() {
            return;
        }
        while !self.shutting_down.get() {
            glommio::timer::sleep(self.config.retention_check_interval).await;
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64);
            // The offsets topic holds every group's offsets, however old: replayed whole by each
            // new coordinator, it is never cut by the node's retention. A replicated partition
            // is cut below, through its replica: its core must learn its log's new start
            // first, or it would send followers what is gone.
            let partitions: Vec<Rc<Partition>> = self
                .partitions
                .borrow()
                .values()
                .filter(|p| retention && !offsets::is_internal_topic(&p.topic))
                .filter(|p| self.local_replica(&p.topic, p.partition).is_none())
                .cloned()
                .collect();
            for partition in partitions {
                if let Err(error) = partition.log.apply_retention(now_ms) {
                    eprintln!("pyralog: retention of {}/{}: {error}", partition.topic, partition.partition);
                }
            }
            // Every replicated partition too, each below what it knows committed and durable
            // (by the node's retention, and a follower where its leader's log starts, whatever
            // this node's own retention), and the offsets topic's and the controller's below
            // their snapshots (see `Replica::apply_retention`).
            let replicas: Vec<Rc<crate::replica::Replica>> = self
                .cluster()
                .map_or(Vec::new(), |cluster| cluster.replicas.borrow().values().cloned().collect());
            for replica in replicas {
                if let Err(error) = replica.apply_retention(now_ms) {
                    eprintln!("pyralog: {error}");
                }
            }
        }
    }

    /// Refuses new work, flushes every partition and closes its files.
    pub async fn shutdown(&self) -> Result<(), ShardError> {
        self.shutting_down.set(true);
        let mut partitions: Vec<Rc<Partition>> =
            self.partitions.borrow_mut().drain().map(|(_, p)| p).collect();
        if let Some(cluster) = self.cluster() {
            let replicas: Vec<_> = cluster.replicas.borrow_mut().drain().map(|(_, r)| r).collect();
            for replica in replicas {
                replica.close().await;
                // The controller's partition is in no topic's table.
                if !partitions.iter().any(|p| Rc::ptr_eq(p, &replica.partition)) {
                    partitions.push(Rc::clone(&replica.partition));
                }
            }
        }
        let coordinators: Vec<Rc<GroupCoordinator>> = self.groups.borrow().values().cloned().collect();
        for coordinator in coordinators {
            coordinator.close().await;
        }
        let mut first_error = None;
        for partition in partitions {
            partition.stop_flusher().await;
            partition.data_arrived.notify();
            if let Err(error) = partition.log.close().await {
                first_error.get_or_insert(ShardError::from(error));
            }
        }
        self.senders.close();
        first_error.map_or(Ok(()), Err)
    }

    pub fn partition_count(&self) -> usize {
        self.partitions.borrow().len()
    }
}

fn check_partition_count(partitions: u32) -> Result<(), ShardError> {
    if partitions == 0 || partitions > topics::PARTITIONS_PER_TOPIC_MAX {
        return Err(ShardError::InvalidPartitions(format!(
            "a topic has 1 to {} partitions, not {partitions}",
            topics::PARTITIONS_PER_TOPIC_MAX
        )));
    }
    Ok(())
}

/// Remembers a produce refused for a reason its client retries, so that its producers' batches
/// behind it wait for it (see `producers`), and passes the error on.
fn note_refusal(partition: &Partition, headers: &[batch::BatchHeader], error: ShardError) -> ShardError {
    if let Some(refusal) = Refusal::of(&error) {
        partition.producers.borrow_mut().note_refused(headers, refusal);
    }
    error
}

/// Checks idempotent producers' sequences: `Some` when the payload is a retry of a batch
/// already appended (answered with its first offsets, nothing appended again).
pub(crate) fn check_producers(
    states: &ProducerStates,
    headers: &[batch::BatchHeader],
) -> Result<Option<Produced>, ShardError> {
    if headers.iter().all(|h| h.producer_id < 0) {
        return Ok(None);
    }
    if let [header] = headers {
        return Ok(match states.check(header)? {
            Verdict::Append => None,
            Verdict::Duplicate { base_offset, next_offset } => Some(Produced { base_offset, next_offset }),
        });
    }
    // Several batches: each must follow the one before it; a retry must come alone.
    let mut simulated = states.of(headers);
    for header in headers {
        if let Verdict::Duplicate { .. } = simulated.check(header)? {
            return Err(ShardError::OutOfOrderSequence(format!(
                "a retried batch of producer {} arrived together with other batches",
                header.producer_id
            )));
        }
        simulated.record(header);
    }
    Ok(None)
}

/// Rebuilds idempotent producer state from the headers of the log's newest batches.
pub(crate) async fn rebuild_producers(log: &Log) -> Result<ProducerStates, ShardError> {
    let mut states = ProducerStates::default();
    let mut offset = log.recent_start_offset(producers::REBUILD_SCAN_BYTES);
    while offset < log.next_offset() {
        let Some(bytes) = log.read(offset, 1 << 20).await? else { break };
        let mut at = 0;
        while let Some(header) = batch::stored_header(&bytes[at..]) {
            if at + header.total_bytes as usize > bytes.len() {
                break;
            }
            states.record(&header);
            offset = header.next_offset();
            at += header.total_bytes as usize;
        }
        if at == 0 {
            break;
        }
    }
    Ok(states)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fetched(chunks: &[usize]) -> Fetched {
        let records = chunks.iter().map(|&len| Bytes::from(vec![0u8; len])).collect();
        Fetched { high_watermark: 100, log_start_offset: 0, records }
    }

    fn lens(fetches: &[Fetched]) -> Vec<Vec<usize>> {
        fetches.iter().map(|f| f.records.iter().map(Bytes::len).collect()).collect()
    }

    #[test]
    fn trimming_keeps_chunks_in_request_order_within_the_budget() {
        let mut fetches = vec![fetched(&[]), fetched(&[40, 40, 40]), fetched(&[30]), fetched(&[10])];
        assert_eq!(keep_within(&mut fetches, 100, true), 90);
        // The second partition stops at the chunk that no longer fits; a later, smaller one
        // may still fit.
        assert_eq!(lens(&fetches), vec![vec![], vec![40, 40], vec![], vec![10]]);
        assert!(fetches.iter().all(|f| f.high_watermark == 100), "offsets stay");
    }

    #[test]
    fn trimming_always_keeps_the_first_chunk_whatever_its_size() {
        let mut fetches = vec![fetched(&[500, 10]), fetched(&[1])];
        keep_within(&mut fetches, 100, true);
        assert_eq!(lens(&fetches), vec![vec![500], vec![]]);
        // Not the response's first chunks: nothing larger than the room.
        let mut fetches = vec![fetched(&[500, 10]), fetched(&[1])];
        keep_within(&mut fetches, 100, false);
        assert_eq!(lens(&fetches), vec![vec![], vec![1]]);
    }
}
