//! A shard's part of a cluster: the controller replica (on shard 0), the replicas of the
//! replicated partitions this shard owns on this node, their clock, and the messages between
//! replicas.
//!
//! The daemon gives each shard a send hook (the cluster transport) and hands it the messages
//! that arrive for its replicas ([`Shard::deliver`]). Shard 0 applies the controller's
//! committed records to the cluster metadata, persists it (`cluster.meta`), and sends every
//! shard the new metadata ([`Op::ApplyCluster`]); each shard then opens the replicas of the
//! partitions it owns that are placed on this node and closes those of deleted topics.
//!
//! A node that is not a seed holds no controller replica: its shard 0 follows the metadata
//! from the seeds instead ([`MetadataHook`], long-polled like KRaft's observers fetching the
//! metadata log), applying each newer snapshot a seed answers with exactly as it would apply
//! its own controller's records, and forwards its controller requests to the leader a seed
//! named (or to each seed in turn while none is known).
//!
//! A seed's stored metadata is the snapshot of its controller log: every retention pass
//! deletes the log's segments that `cluster.meta` covers (`Replica::apply_retention`), and a
//! node replays the log from there at its start. A seed whose log starts past the metadata it
//! has (it was away while the others deleted what it lacks, and was told to start its log at
//! the leader's start; or its `cluster.meta` is gone) takes a copy from another seed through
//! the same hook, then applies its own log from where that copy ends.
//!
//! Liveness. Shard 0 of every node tells every seed it is up every
//! [`NODE_HEARTBEAT_INTERVAL`] (the daemon carries it); a seed counts a registered node as
//! down once it has heard nothing from it for [`NODE_SESSION_TIMEOUT`], from that long after
//! its own start on. Soft state, not in the log: placement on the controller's leader leaves
//! down nodes out while enough others are up (`cluster::place`), and `/cluster` shows them.
//! Every shard of every node knows them too ([`ShardCluster::down`]: a seed's shard 0 tells
//! its other shards when they change; a node that is not a seed hears them with the metadata
//! it follows), so that Kafka metadata lists only the brokers of nodes that are up, as
//! Kafka's does.
//!
//! Invariants: a replicated partition is open on exactly the shard `topics::owner_shard`
//! names, on exactly the nodes its placement names; metadata is applied in the controller's
//! log order, and only below its commit point; a produce acknowledged with acks=all is below
//! the commit point of its term's leader; a seed's controller log loses only what its stored
//! metadata covers.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use pyralog_dma::{batch, Log, LogConfig};
use pyralog_replication::{Message, Quorum, Role};

use crate::cluster::{ClusterMeta, MetaRecord, NodeInfo, TopicPlacement};
use crate::event::Event;
use crate::partition::{Durability, Partition};
use crate::replica::{
    RecoveryBudget, Replica, ReplicaAddress, ReplicaRole, ReplicaSettings, ReplicaStatus, SendHook, Snapshot,
};
use crate::shard::{Op, OpResult, Shard};
use crate::topics::{self, TopicMeta};
use crate::ShardError;

/// The controller's group: the all-zero topic id, partition 0.
pub const CONTROLLER_TOPIC_ID: [u8; 16] = [0; 16];
/// The controller's name in messages (no topic can take it: '_' names are reserved for it).
pub const CONTROLLER_NAME: &str = "__cluster";
/// How often a leader that is not its partition's preferred leader hands leadership back
/// to it (when that replica has caught up).
pub const PREFERRED_LEADER_CHECK_INTERVAL: Duration = Duration::from_secs(5);
/// How long a leader must hear from a follower it went unheard from (its node down,
/// restarting or cut off) before it hands leadership to it by choice, and how long a
/// restarted node's replicas let the others campaign first: as long as clients may back off
/// from a node they failed to reach (librdkafka's `reconnect.backoff.max.ms`, 10 s; see
/// `Replica::settled`, `RaftGroup::set_campaign_last`).
pub const RETURNED_FOLLOWER_SETTLE: Duration = Duration::from_secs(10);
/// Bytes of controller records read at once when applying.
const APPLY_READ_BYTES: usize = 1 << 20;
/// How long a seed holds a follower's metadata request when it has nothing newer: the
/// follower hears of a change within a round trip of the seed applying it.
pub const METADATA_WAIT: Duration = Duration::from_millis(500);
/// How long a node that follows the metadata waits before asking the next seed after one
/// failed.
const METADATA_RETRY: Duration = Duration::from_millis(100);
/// How often every node tells the seeds it is up.
pub const NODE_HEARTBEAT_INTERVAL: Duration = Duration::from_millis(500);
/// A seed counts a node it has not heard from for this long as down (six heartbeats).
pub const NODE_SESSION_TIMEOUT: Duration = Duration::from_secs(3);

/// A replica group across the cluster: (topic id, partition).
pub type GroupId = ([u8; 16], u32);

/// How this node takes part in its cluster.
#[derive(Debug, Clone)]
pub struct ClusterSettings {
    pub node_id: u32,
    /// The controller's voters (the seeds' node ids). A node not among them follows the
    /// metadata from them (see the module docs).
    pub seeds: Vec<u32>,
    /// One tick of every replica's clock.
    pub tick: Duration,
    pub heartbeat_ticks: u32,
    pub election_ticks: u32,
    /// Replicas of a topic created without a factor. Default: 3, or the node count if fewer.
    pub default_replication_factor: Option<u32>,
    /// Replicas of the offsets topic, if set (`--offsets-topic-replication-factor`; see
    /// `Shard::ensure_offsets_topic`).
    pub offsets_replication_factor: Option<u32>,
    /// A follower whose acknowledged offset has not moved for this long while behind its
    /// leader is out of the in-sync replicas (Kafka's replica.lag.time.max.ms).
    pub replica_lag_time_max: Duration,
    /// This node's data directory's incarnation (see `cluster::NodeInfo::incarnation`).
    pub incarnation: u64,
    /// This node is a seed that came back without its data to a cluster whose controller
    /// ran meanwhile: its controller replica recovers before it votes (KIP-966).
    pub controller_disk_lost: bool,
    /// Bytes per second a shard's leaders may read from disk for followers behind the cache
    /// (see `RecoveryBudget`); 0: unbounded.
    pub recovery_bytes_per_sec: u64,
    /// Segment size of the controller's log: a seed deletes its segments below what its
    /// stored metadata (`cluster.meta`) covers.
    pub controller_segment_bytes: u64,
}

/// Whether a replica of `partition` placed on this node predates this node's disk: the node
/// registered another incarnation since (or this one not yet), or this incarnation registered
/// after the partition was placed. Such a replica found no files: its data was lost with a
/// disk, and it must recover before it votes.
fn placed_before_this_disk(
    meta: &ClusterMeta,
    topic: &TopicPlacement,
    partition: u32,
    settings: &ClusterSettings,
) -> bool {
    let created_at = topic.created_at.get(partition as usize).copied().unwrap_or(0);
    match meta.nodes.get(&settings.node_id) {
        Some(node) if node.incarnation == settings.incarnation => created_at < node.registered_at,
        _ => true,
    }
}

/// The replicas of a partition in sync with its leader (`status` is the leader's): the
/// leader, and every follower that is not recovering a lost disk, was heard from within
/// `lag_max`, and has either caught up with the leader's log or made progress within it.
pub fn in_sync_replicas(status: &ReplicaStatus, tick: Duration, lag_max: Duration) -> Vec<u32> {
    assert!(status.leads, "only a leader knows its followers");
    let mut in_sync: Vec<u32> = status.leader.into_iter().collect();
    for follower in &status.followers {
        if follower_in_sync(follower, status.log_end, tick, lag_max) && status.voters.contains(&follower.id) {
            in_sync.push(follower.id);
        }
    }
    in_sync.sort_unstable();
    in_sync
}

/// Whether a follower, as its leader (whose log ends at `log_end`) sees it, is in sync: not
/// recovering a lost disk, heard from within `lag_max`, and holding durably, within
/// `lag_max`, all the leader held at some moment (Kafka's rule for replica.lag.time.max.ms:
/// a follower that streams far behind is out, however fast it moves, until it has caught up).
pub(crate) fn follower_in_sync(
    follower: &pyralog_replication::FollowerStatus,
    log_end: i64,
    tick: Duration,
    lag_max: Duration,
) -> bool {
    let span = |ticks: u64| tick.saturating_mul(u32::try_from(ticks).unwrap_or(u32::MAX));
    let heard = span(follower.silent_ticks) <= lag_max;
    let caught_up = follower.acked_end >= log_end || span(follower.behind_ticks) <= lag_max;
    !follower.recovering && heard && caught_up
}

/// Whether a leader (`leader`, whose log ends at `log_end`, seeing its followers as
/// `followers`) counts as many in-sync replicas, itself among them, as the write quorum of
/// every voter set of `membership` (both while joint). None when it does; else (in sync,
/// needed) of the first set short of it: Kafka's NOT_ENOUGH_REPLICAS for acks=all.
pub(crate) fn write_quorum_shortfall(
    membership: &pyralog_replication::Membership,
    leader: u32,
    followers: &[pyralog_replication::FollowerStatus],
    log_end: i64,
    tick: Duration,
    lag_max: Duration,
) -> Option<(u32, u32)> {
    let in_sync = |id: u32| {
        id == leader || followers.iter().any(|f| f.id == id && follower_in_sync(f, log_end, tick, lag_max))
    };
    membership.sets.iter().find_map(|set| {
        let count = set.voters.iter().filter(|&&v| in_sync(v)).count() as u32;
        let needed = set.quorum.write_quorum();
        (count < needed).then_some((count, needed))
    })
}

/// A topic change or a node's registration, for the controller's leader to decide. A node
/// that does not lead the controller forwards it there (the daemon carries it over the cluster
/// transport) and waits until the change is applied locally too.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ControllerRequest {
    RegisterNode(NodeInfo),
    CreateTopic {
        name: String,
        partitions: u32,
        config: topics::TopicConfig,
    },
    CreatePartitions {
        name: String,
        partitions: u32,
    },
    DeleteTopic {
        name: String,
    },
    /// Reserve the next block of producer ids for `node` (see `producer_ids`).
    AllocateProducerIds {
        node: u32,
    },
}

/// Sends a request to the controller's leader on `node` and returns its answer: the controller
/// log's offset after the change. Set by the daemon (the cluster transport).
pub type ForwardHook = Rc<
    dyn Fn(
        u32,
        ControllerRequest,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<i64, ShardError>>>>,
>;

/// What a seed answers a node that follows the metadata: the controller's leader and term as
/// the seed knows them, and its metadata if it is newer than the follower's.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct MetadataAnswer {
    pub leader: Option<u32>,
    pub term: i32,
    pub meta: Option<ClusterMeta>,
    /// The nodes the seed counts as down (see the module docs).
    #[serde(default)]
    pub down: Vec<u32>,
}

/// Asks seed `node` for metadata newer than `applied_end` (it holds the request up to
/// [`METADATA_WAIT`] when it has none). Set by the daemon on shard 0 (the cluster
/// transport): a node that is not a seed follows the metadata through it, and a seed whose
/// controller log starts past the metadata it applied takes a copy through it.
pub type MetadataHook = Rc<
    dyn Fn(
        u32,
        i64,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<MetadataAnswer, ShardError>>>>,
>;

/// How long a controller request keeps trying while the controller has no leader.
pub const CONTROLLER_REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// What a shard keeps of the cluster.
pub(crate) struct ShardCluster {
    pub settings: ClusterSettings,
    pub meta: RefCell<ClusterMeta>,
    /// The replicas open here, by (topic id, partition); the controller's on shard 0.
    pub replicas: RefCell<HashMap<GroupId, Rc<Replica>>>,
    /// Set by the daemon once its transport runs; messages before that are dropped (Raft
    /// sends them again).
    pub send: Rc<RefCell<Option<SendHook>>>,
    /// Set by the daemon on shard 0 (see [`ForwardHook`]).
    pub forward: RefCell<Option<ForwardHook>>,
    /// Set by the daemon on shard 0 (see [`MetadataHook`]).
    pub metadata_source: RefCell<Option<MetadataHook>>,
    /// New metadata was applied here.
    pub applied: Event,
    /// The last role each replica of this node reported, whichever shard holds it: shared
    /// over the mesh ([`Op::Role`]) so any shard can name a partition's leader. Each with the
    /// number its shard gave the report ([`ShardCluster::role_reports`]): a report reaches
    /// the other shards from a task of its own, so two of one term may arrive out of order.
    pub roles: RefCell<HashMap<GroupId, (ReplicaRole, u64)>>,
    /// Reports this shard made to the others so far (roles, the nodes down): numbers them, in
    /// the order they were made ([`ShardCluster::next_report`]).
    pub role_reports: Cell<u64>,
    /// Shard 0 of a seed: when each node last said it is up (see the module docs).
    pub heard: RefCell<HashMap<u32, Instant>>,
    /// When this shard started: before a session timeout has passed, no node counts as down.
    pub started: Instant,
    /// The nodes this node counts as down, on every shard, with the number of the report
    /// that said so (see the module docs; reports may arrive out of order, as roles do).
    pub down: RefCell<(Vec<u32>, u64)>,
    /// Nodes no longer counted down, and when they stopped being, for
    /// [`RETURNED_FOLLOWER_SETTLE`]: their replicas campaign last (`Replica::set_nodes_back`).
    pub back: RefCell<Vec<(u32, Instant)>>,
    /// When this shard's transport last lost its connection to each node (a kill -9 resets
    /// them all at once): for an election timeout after, metadata names no leader there
    /// ([`Shard::partition_leader`]).
    pub lost: RefCell<HashMap<u32, Instant>>,
    /// One application of metadata at a time: opening a replica awaits, and a second one
    /// (the stored metadata at start and the controller's, say) must not open it again.
    pub applying: glommio::sync::Semaphore,
    /// Bounds the catch-up reads of every replica of this shard.
    pub recovery: Rc<RecoveryBudget>,
    /// The offsets partitions this shard coordinates, or loads a coordinator for, with the
    /// term of the leadership they were loaded for (see `offsets`).
    pub coordination: RefCell<HashMap<usize, i32>>,
    /// Shard 0: this node's blocks of producer ids (see `producer_ids`).
    pub producer_ids: crate::producer_ids::ProducerIdBlocks,
    /// When this shard last said why the offsets topic cannot be created (said at most every
    /// `OFFSETS_TOPIC_WARNING_INTERVAL`: clients ask again many times a second).
    pub offsets_topic_warned: Cell<Option<Instant>>,
}

impl ShardCluster {
    /// The number of this shard's next report to the others: later reports get larger
    /// numbers, so a receiver drops one that arrives after a later one.
    pub(crate) fn next_report(&self) -> u64 {
        let report = self.role_reports.get() + 1;
        self.role_reports.set(report);
        report
    }

    pub fn new(settings: ClusterSettings) -> ShardCluster {
        let recovery = Rc::new(RecoveryBudget::new(settings.recovery_bytes_per_sec));
        ShardCluster {
            recovery,
            settings,
            meta: RefCell::new(ClusterMeta::default()),
            replicas: RefCell::new(HashMap::new()),
            send: Rc::new(RefCell::new(None)),
            forward: RefCell::new(None),
            metadata_source: RefCell::new(None),
            applied: Event::default(),
            roles: RefCell::new(HashMap::new()),
            role_reports: Cell::new(0),
            heard: RefCell::new(HashMap::new()),
            started: Instant::now(),
            down: RefCell::new((Vec::new(), 0)),
            back: RefCell::new(Vec::new()),
            lost: RefCell::new(HashMap::new()),
            applying: glommio::sync::Semaphore::new(1),
            coordination: RefCell::new(HashMap::new()),
            producer_ids: crate::producer_ids::ProducerIdBlocks::new(),
            offsets_topic_warned: Cell::new(None),
        }
    }

    /// The hook every replica of this shard sends through: whatever the daemon set.
    fn send_hook(&self) -> SendHook {
        let send = Rc::clone(&self.send);
        Rc::new(move |address, message| {
            if let Some(hook) = send.borrow().as_ref() {
                hook(address, message);
            }
        })
    }

    /// Whether this node is one of the controller's voters.
    pub fn is_seed(&self) -> bool {
        self.settings.seeds.contains(&self.settings.node_id)
    }

    fn replica_settings(&self, voters: Vec<u32>, quorum: Quorum, disk_lost: bool) -> ReplicaSettings {
        ReplicaSettings {
            disk_lost,
            node_id: self.settings.node_id,
            voters,
            quorum,
            heartbeat_ticks: self.settings.heartbeat_ticks,
            election_ticks: self.settings.election_ticks,
            seed: random_seed(),
            tick: self.settings.tick,
            recovery: Rc::clone(&self.recovery),
            settle: RETURNED_FOLLOWER_SETTLE,
        }
    }
}

fn random_seed() -> u64 {
    use std::io::Read;
    let mut seed = [0u8; 8];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut seed))
        .expect("reading /dev/urandom");
    u64::from_le_bytes(seed)
}

impl Shard {
    pub(crate) fn cluster(&self) -> Option<&ShardCluster> {
        self.cluster.as_ref()
    }

    /// Hands the leadership of every partition this shard leads (the controller's too) to an
    /// in-sync follower, all at once, before the node stops: clients then retry on the new
    /// leader at once instead of waiting out an election. Returns how many it handed over and
    /// how many it could not (no follower caught up within an election timeout).
    pub async fn hand_over_leaderships(&self) -> (usize, usize) {
        let Some(cluster) = self.cluster() else { return (0, 0) };
        let leading: Vec<Rc<Replica>> =
            cluster.replicas.borrow().values().filter(|r| r.role().role == Role::Leader).cloned().collect();
        let handovers: Vec<_> = leading
            .into_iter()
            .map(|replica| glommio::spawn_local(async move { replica.hand_over().await }))
            .collect();
        let (mut handed, mut kept) = (0, 0);
        for handover in handovers {
            if handover.await {
                handed += 1;
            } else {
                kept += 1;
            }
        }
        (handed, kept)
    }

    /// The in-sync replicas of a partition this node leads (see [`in_sync_replicas`]).
    pub fn in_sync_of(&self, status: &ReplicaStatus) -> Vec<u32> {
        let settings = &self.cluster().expect("replicas live in a cluster").settings;
        in_sync_replicas(status, settings.tick, settings.replica_lag_time_max)
    }

    /// Every replica of this node (the controller's too), from every shard, by topic and
    /// partition.
    pub async fn replica_statuses(&self) -> Result<Vec<ReplicaStatus>, ShardError> {
        let mut all = Vec::new();
        for target in 0..self.count {
            match self.call(target, Op::ReplicaStatus).await? {
                OpResult::Replicas(statuses) => all.extend(statuses),
                other => unreachable!("a status request answered with {other:?}"),
            }
        }
        all.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
        Ok(all)
    }

    /// A CRC-32C over the stored batches of this node's replica of a partition from the one
    /// holding `from` (at or above the log's start: retention may have removed what is
    /// below) to those that end at or below `end` (all of them must be durable here): what
    /// `pyralog cluster verify` compares across replicas. Returns (checksum, batches, the
    /// offset the batches end at).
    pub async fn replica_checksum(
        &self,
        topic: &str,
        partition: u32,
        from: i64,
        end: i64,
    ) -> Result<(u32, u64, i64), ShardError> {
        let owner = self.route(topic, partition)?;
        match self.call(owner, Op::Checksum { topic: topic.to_owned(), partition, from, end }).await? {
            OpResult::Checksum(result) => result,
            other => unreachable!("a checksum answered with {other:?}"),
        }
    }

    pub(crate) async fn local_checksum(
        &self,
        topic: &str,
        partition: u32,
        from: i64,
        end: i64,
    ) -> Result<(u32, u64, i64), ShardError> {
        let replica = self.local_replica(topic, partition).ok_or_else(|| ShardError::UnknownPartition {
            topic: topic.to_owned(),
            partition,
            count: 0,
        })?;
        let log = &replica.partition.log;
        if end > log.durable_offset() {
            return Err(ShardError::OffsetOutOfRange(format!(
                "{topic}/{partition} is durable here up to {}, not {end}",
                log.durable_offset()
            )));
        }
        if from < log.log_start_offset() {
            return Err(ShardError::OffsetOutOfRange(format!(
                "{topic}/{partition} starts here at offset {} (retention), not {from}",
                log.log_start_offset()
            )));
        }
        let (mut crc, mut batches, mut offset) = (0u32, 0u64, from);
        while offset < end {
            let Some(chunk) = log.read(offset, 1 << 20).await? else { break };
            let mut at = 0;
            while let Some(header) = batch::stored_header(&chunk[at..]) {
                let bytes = chunk.get(at..at + header.total_bytes as usize).ok_or_else(|| {
                    ShardError::Storage(format!(
                        "{topic}/{partition}: a batch at offset {offset} runs past its read"
                    ))
                })?;
                if header.next_offset() > end {
                    return Ok((crc, batches, offset));
                }
                crc = crc32c::crc32c_append(crc, bytes);
                batches += 1;
                offset = header.next_offset();
                at += header.total_bytes as usize;
            }
            if at == 0 {
                break;
            }
        }
        Ok((crc, batches, offset))
    }

    pub(crate) fn local_replica_statuses(&self) -> Vec<ReplicaStatus> {
        self.cluster().map_or(Vec::new(), |c| c.replicas.borrow().values().map(|r| r.status()).collect())
    }

    /// Sets where this shard's replicas send their messages (the daemon's transport).
    pub fn set_cluster_send(&self, hook: SendHook) {
        if let Some(cluster) = self.cluster() {
            *cluster.send.borrow_mut() = Some(hook);
        }
    }

    /// The transport lost its connection to node `node`: the replicas here that follow it
    /// start an election soon (see `RaftGroup::peer_unreachable`).
    pub fn cluster_peer_lost(&self, node: u32) {
        let Some(cluster) = self.cluster() else { return };
        cluster.lost.borrow_mut().insert(node, Instant::now());
        let replicas: Vec<Rc<Replica>> = cluster.replicas.borrow().values().cloned().collect();
        for replica in replicas {
            replica.peer_unreachable(node);
        }
    }

    /// Sets how shard 0 reaches the controller's leader on another node (the daemon's transport).
    pub fn set_cluster_forward(&self, hook: ForwardHook) {
        if let Some(cluster) = self.cluster() {
            *cluster.forward.borrow_mut() = Some(hook);
        }
    }

    /// Sets how shard 0 of a node that is not a seed asks the seeds for the metadata.
    pub fn set_metadata_source(&self, hook: MetadataHook) {
        if let Some(cluster) = self.cluster() {
            *cluster.metadata_source.borrow_mut() = Some(hook);
        }
    }

    /// Shard 0 of a seed: `node` said it is up.
    pub fn note_node_heard(&self, node: u32) {
        if let Some(cluster) = self.cluster() {
            cluster.heard.borrow_mut().insert(node, Instant::now());
        }
    }

    /// Shard 0 of a seed: the registered nodes it has not heard from for
    /// [`NODE_SESSION_TIMEOUT`] (none before it has run that long, and none while its
    /// controller replica knows no leader: a seed cut off from the others hears no one, and
    /// must not have its metadata drop the nodes that are up). None elsewhere: only seeds are
    /// told.
    pub fn nodes_not_heard(&self) -> Option<Vec<u32>> {
        let cluster = self.cluster().filter(|cluster| cluster.is_seed() && self.id == 0)?;
        let led = self.controller().is_some_and(|controller| controller.role().leader.is_some());
        if cluster.started.elapsed() < NODE_SESSION_TIMEOUT || !led {
            return Some(Vec::new());
        }
        let heard = cluster.heard.borrow();
        let meta = cluster.meta.borrow();
        let down = meta
            .nodes
            .keys()
            .filter(|id| heard.get(id).is_none_or(|at| at.elapsed() >= NODE_SESSION_TIMEOUT));
        Some(down.copied().collect())
    }

    /// The nodes this node counts as down, as every shard knows them.
    pub fn nodes_down(&self) -> Vec<u32> {
        self.cluster().map_or_else(Vec::new, |cluster| cluster.down.borrow().0.clone())
    }

    /// The nodes just back from being counted down (see `ShardCluster::back`).
    fn nodes_back(&self) -> Vec<u32> {
        self.cluster()
            .map_or_else(Vec::new, |cluster| cluster.back.borrow().iter().map(|&(node, _)| node).collect())
    }

    /// Shard 0: records the nodes counted as down, if they changed, and tells the other shards.
    fn share_down(self: &Rc<Self>, down: Vec<u32>) {
        let Some(cluster) = self.cluster() else { return };
        if cluster.down.borrow().0 == down {
            return;
        }
        let report = cluster.next_report();
        self.note_down(down.clone(), report);
        self.tell_other_shards(move || Op::Down { nodes: down.clone(), report });
    }

    /// Sends `op()` to every other shard of this node, in order, from a task of its own.
    fn tell_other_shards(self: &Rc<Self>, op: impl Fn() -> Op + 'static) {
        let shard = Rc::clone(self);
        glommio::spawn_local(async move {
            for target in (0..shard.count).filter(|t| *t != shard.id) {
                let _ = shard.call(target, op()).await;
            }
        })
        .detach();
    }

    /// Records the nodes counted as down, unless a later report already came.
    pub(crate) fn note_down(&self, down: Vec<u32>, report: u64) {
        let Some(cluster) = self.cluster() else { return };
        let mut known = cluster.down.borrow_mut();
        if known.1 >= report {
            return;
        }
        note_returns(&mut cluster.back.borrow_mut(), &known.0, &down, Instant::now());
        *known = (down, report);
        drop(known);
        self.tell_nodes_back();
    }

    /// Tells every replica of this shard which nodes are just back (see `ShardCluster::back`).
    fn tell_nodes_back(&self) {
        let Some(cluster) = self.cluster() else { return };
        let nodes = self.nodes_back();
        let replicas: Vec<Rc<Replica>> = cluster.replicas.borrow().values().cloned().collect();
        for replica in replicas {
            replica.set_nodes_back(&nodes);
        }
    }

    /// Shard 0 of a seed: keeps every shard's view of the nodes that are down current.
    async fn run_liveness(self: Rc<Self>) {
        while !self.shutting_down.get() {
            if let Some(down) = self.nodes_not_heard() {
                self.share_down(down);
            }
            glommio::timer::sleep(NODE_HEARTBEAT_INTERVAL).await;
        }
    }

    /// Registers this node (its addresses, shards and rack) with the controller, so that
    /// placement may use it; again after a restart, with its new addresses. Shard 0 only.
    pub async fn register_node(&self, node: NodeInfo) -> Result<(), ShardError> {
        self.controller_request(ControllerRequest::RegisterNode(node)).await
    }

    /// Shard 0: has the controller's leader make `request`, here or on the node that leads
    /// it, retrying while no leader is known; then waits until the change is applied here.
    pub(crate) async fn controller_request(&self, request: ControllerRequest) -> Result<(), ShardError> {
        assert_eq!(self.id, 0, "shard 0 talks to the controller");
        let deadline = std::time::Instant::now() + CONTROLLER_REQUEST_TIMEOUT;
        let mut backoff = Duration::from_millis(10);
        // Not a seed: the leader the last refusal named, else each seed in turn.
        let (mut attempt, mut named) = (0, None);
        loop {
            let role = match named.take() {
                Some(leader) => ReplicaRole { term: -1, role: Role::Follower, leader: Some(leader) },
                None => self.controller_role(attempt),
            };
            attempt += 1;
            let result = match role.leader {
                Some(leader) if leader == self.cluster().expect("a cluster").settings.node_id => {
                    self.execute_controller_request(request.clone()).await
                }
                Some(leader) => {
                    let forward = self.cluster().expect("a cluster").forward.borrow().clone();
                    match forward {
                        Some(forward) => forward(leader, request.clone()).await,
                        None => Err(ShardError::NotController { leader: Some(leader), term: role.term }),
                    }
                }
                None => Err(ShardError::NotController { leader: None, term: role.term }),
            };
            if let Err(ShardError::NotController { leader: Some(leader), term }) = &result {
                if !self.cluster().expect("a cluster").is_seed() {
                    self.note_controller_leader(*leader, *term);
                    named = Some(*leader);
                }
            }
            match result {
                Ok(end) => return self.wait_applied(end).await,
                Err(ShardError::NotController { .. }) if std::time::Instant::now() < deadline => {
                    glommio::timer::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(200));
                }
                Err(ShardError::NotController { .. }) => {
                    return Err(ShardError::Unavailable(format!(
                        "the cluster's controller has had no reachable leader for {CONTROLLER_REQUEST_TIMEOUT:?}: \
                         a majority of the seeds must be up"
                    )))
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// Who leads the controller as shard 0 knows it: its own replica's view on a seed; on
    /// another node the leader a seed last named (first try), else (the `attempt`th) each seed
    /// in turn, which makes the request if it leads or names the leader if it knows one.
    fn controller_role(&self, attempt: usize) -> ReplicaRole {
        if let Some(controller) = self.controller() {
            return controller.role();
        }
        let cluster = self.cluster().expect("a cluster");
        let heard = cluster.roles.borrow().get(&(CONTROLLER_TOPIC_ID, 0)).map(|(role, _)| *role);
        match heard {
            Some(role) if role.leader.is_some() && attempt == 0 => role,
            _ => {
                let seeds = &cluster.settings.seeds;
                let seed = seeds[attempt % seeds.len()];
                ReplicaRole { term: heard.map_or(-1, |r| r.term), role: Role::Follower, leader: Some(seed) }
            }
        }
    }

    /// A node that is not a seed heard who leads the controller: remembered on every shard,
    /// where metadata responses name the controller.
    fn note_controller_leader(&self, leader: u32, term: i32) {
        let cluster = self.cluster().expect("a cluster");
        if cluster.is_seed() {
            return;
        }
        let role = ReplicaRole { term, role: Role::Follower, leader: Some(leader) };
        if let Some(shard) = self.me.upgrade() {
            shard.share_role((CONTROLLER_TOPIC_ID, 0), role);
        }
    }

    /// A seed's shard 0: its metadata if newer than `applied_end` (waiting up to `wait` for
    /// some), with the controller's leader as it knows it. For nodes that follow the metadata.
    pub async fn read_metadata(
        &self,
        applied_end: i64,
        wait: Duration,
    ) -> Result<MetadataAnswer, ShardError> {
        let cluster = self.cluster().ok_or_else(|| ShardError::InvalidConfig("not a cluster node".into()))?;
        let Some(controller) = self.controller() else {
            return Err(ShardError::InvalidConfig(format!(
                "node {} is not a seed: ask a seed for the cluster's metadata",
                cluster.settings.node_id
            )));
        };
        if cluster.meta.borrow().applied_end <= applied_end {
            let newer = async {
                while cluster.meta.borrow().applied_end <= applied_end && !self.shutting_down.get() {
                    cluster.applied.listen().await;
                }
            };
            futures_lite::future::or(newer, glommio::timer::sleep(wait)).await;
        }
        let role = controller.role();
        let meta = cluster.meta.borrow();
        let newer = meta.applied_end > applied_end;
        let down = self.nodes_not_heard().unwrap_or_default();
        Ok(MetadataAnswer { leader: role.leader, term: role.term, meta: newer.then(|| meta.clone()), down })
    }

    /// Shard 0 of a node that is not a seed: follows the metadata from the seeds, asking the
    /// controller's leader when one is known (its view is the newest) and each seed in turn
    /// while none answers.
    async fn run_metadata_follow(self: Rc<Self>) {
        let seeds = self.cluster().expect("a cluster").settings.seeds.clone();
        // The seed asked next while no leader is known; the leader the last answer named.
        let (mut next, mut leader) = (0, None);
        let mut failing_since: Option<std::time::Instant> = None;
        let mut said: Option<std::time::Instant> = None;
        while !self.shutting_down.get() {
            let cluster = self.cluster().expect("a cluster");
            let hook = cluster.metadata_source.borrow().clone();
            let Some(hook) = hook else {
                glommio::timer::sleep(METADATA_RETRY).await;
                continue;
            };
            let source = match leader {
                Some(leader) if seeds.contains(&leader) => leader,
                _ => seeds[next % seeds.len()],
            };
            let applied = cluster.meta.borrow().applied_end;
            match hook(source, applied).await {
                Ok(answer) => {
                    failing_since = None;
                    leader = answer.leader;
                    self.share_down(answer.down.clone());
                    if let Some(leader) = answer.leader {
                        self.note_controller_leader(leader, answer.term);
                    }
                    if let Some(meta) = answer.meta.filter(|m| m.applied_end > applied) {
                        if let Err(error) = self.install_cluster_meta(meta).await {
                            eprintln!("pyralog: applying the cluster's metadata from node {source}: {error}");
                            glommio::timer::sleep(METADATA_RETRY).await;
                        }
                    }
                }
                Err(error) => {
                    (leader, next) = (None, next + 1);
                    let since = *failing_since.get_or_insert_with(std::time::Instant::now);
                    if said.is_none_or(|said| said.elapsed() >= Duration::from_secs(5)) {
                        said = Some(std::time::Instant::now());
                        eprintln!(
                            "pyralog: following the cluster's metadata: seed {source} did not answer ({error}); \
                             asking the next seed (no answer for {:?})",
                            since.elapsed()
                        );
                    }
                    glommio::timer::sleep(METADATA_RETRY).await;
                }
            }
        }
    }

    /// A controller request forwarded by another node: made here if this node leads the
    /// controller, else refused with the leader this node knows.
    pub async fn handle_controller_request(&self, request: ControllerRequest) -> Result<i64, ShardError> {
        match self.call(0, Op::Controller { request }).await? {
            OpResult::Offset(result) => result,
            other => unreachable!("a controller request answered with {other:?}"),
        }
    }

    pub(crate) async fn execute_controller_request(
        &self,
        request: ControllerRequest,
    ) -> Result<i64, ShardError> {
        assert_eq!(self.id, 0, "the controller lives on shard 0");
        match request {
            ControllerRequest::RegisterNode(node) => {
                self.propose_metadata(MetaRecord::RegisterNode(node)).await
            }
            ControllerRequest::CreateTopic { name, partitions, config } => {
                self.create_replicated_topic(&name, partitions, config).await
            }
            ControllerRequest::CreatePartitions { name, partitions } => {
                self.create_replicated_partitions(&name, partitions).await
            }
            ControllerRequest::DeleteTopic { name } => self.delete_replicated_topic(&name).await,
            ControllerRequest::AllocateProducerIds { node } => {
                self.propose_metadata(MetaRecord::AllocateProducerIds { node }).await
            }
        }
    }

    /// Waits until this node applied the controller's log up to `end`.
    async fn wait_applied(&self, end: i64) -> Result<(), ShardError> {
        let cluster = self.cluster().expect("a cluster");
        while cluster.meta.borrow().applied_end < end {
            if self.shutting_down.get() {
                return Err(ShardError::ShuttingDown);
            }
            cluster.applied.listen().await;
        }
        Ok(())
    }

    /// A message from a peer for the replica of `(topic_id, partition)`: handed to it here,
    /// or to the shard that owns it. Messages for replicas this node does not hold are dropped.
    pub async fn deliver(&self, topic_id: [u8; 16], partition: u32, message: Message) {
        let Some(cluster) = self.cluster() else { return };
        let local = cluster.replicas.borrow().get(&(topic_id, partition)).cloned();
        if let Some(replica) = local {
            replica.receive(message);
            return;
        }
        let owner = if topic_id == CONTROLLER_TOPIC_ID {
            0
        } else {
            let meta = cluster.meta.borrow();
            let Some((name, _)) = meta.topics.iter().find(|(_, t)| t.id == topic_id) else { return };
            self.owner_of(name, partition)
        };
        if owner != self.id {
            let _ = self.call(owner, Op::Deliver { topic_id, partition, message }).await;
        }
    }

    /// A registered node, as this shard last applied the metadata.
    pub fn cluster_node(&self, id: u32) -> Option<NodeInfo> {
        self.cluster()?.meta.borrow().nodes.get(&id).cloned()
    }

    /// The controller log's offset this shard's metadata reflects: it changes whenever the
    /// metadata does, so a caller may cache what it derived from it.
    pub fn cluster_version(&self) -> i64 {
        self.cluster().map_or(0, |c| c.meta.borrow().applied_end)
    }

    /// The cluster's metadata as this shard last applied it (None without a cluster).
    pub fn cluster_meta(&self) -> Option<ClusterMeta> {
        Some(self.cluster()?.meta.borrow().clone())
    }

    /// The last role this node's replica of a partition reported (any shard's), if this
    /// node holds one.
    pub fn replica_role(&self, topic_id: [u8; 16], partition: u32) -> Option<ReplicaRole> {
        self.cluster()?.roles.borrow().get(&(topic_id, partition)).map(|(role, _)| *role)
    }

    /// The leader of a replicated partition as this node last heard it from its own replica
    /// (any shard's) and its epoch; else a guess with epoch -1 (none): the preferred leader
    /// (the first replica) or, if it is counted down, the first replica that is not, which
    /// answers NotLeader if it does not lead. What both protocols' metadata name.
    ///
    /// A guess never carries the replica's term: clients keep the leader of the newest epoch
    /// they were told (KIP-320), so a replica campaigning in a term nobody won would otherwise
    /// pin them to the guessed node, away from the leader other nodes name in an older epoch.
    ///
    /// A leader whose node this shard lost its connection to within the longest election
    /// timeout is named as none (`ShardCluster::lost`): the replicas here are electing
    /// another. Kafka clients then ask again within a few hundred milliseconds (librdkafka's
    /// query for a leaderless partition starts at `retry.backoff.ms`, 100 ms), where a dead
    /// leader named would keep them on it, re-asking once a second.
    pub fn partition_leader(&self, placement: &TopicPlacement, partition: u32) -> (Option<u32>, i32) {
        let replicas = placement.replicas.get(partition as usize).map_or(&[][..], Vec::as_slice);
        let lost_lately = |node: u32| {
            self.cluster().is_some_and(|cluster| {
                let window = cluster.settings.tick * cluster.settings.election_ticks * 2;
                cluster.lost.borrow().get(&node).is_some_and(|at| at.elapsed() < window)
            })
        };
        named_leader(self.replica_role(placement.id, partition), replicas, &self.nodes_down(), lost_lately)
    }

    /// The in-sync replicas of every partition this node leads (see [`in_sync_replicas`]).
    pub async fn in_sync_led_here(&self) -> Result<HashMap<GroupId, Vec<u32>>, ShardError> {
        let statuses = self.replica_statuses().await?;
        Ok(statuses
            .iter()
            .filter(|status| status.leads)
            .map(|status| ((status.topic_id, status.partition), self.in_sync_of(status)))
            .collect())
    }

    /// Records a role of one of this shard's replicas and tells the node's other shards.
    fn share_role(self: &Rc<Self>, group: GroupId, role: ReplicaRole) {
        let Some(cluster) = self.cluster() else { return };
        let report = cluster.next_report();
        self.note_role(group, role, report);
        self.tell_other_shards(move || Op::Role { group, role, report });
    }

    /// Records a replica's role, numbered `report` by the shard holding the replica (see
    /// [`ShardCluster::roles`]): a newer term wins; within a term, the later report.
    pub(crate) fn note_role(&self, group: GroupId, role: ReplicaRole, report: u64) {
        let Some(cluster) = self.cluster() else { return };
        let mut roles = cluster.roles.borrow_mut();
        if supersedes((role, report), roles.get(&group)) {
            roles.insert(group, (role, report));
        }
    }

    pub(crate) fn local_replica(&self, topic: &str, partition: u32) -> Option<Rc<Replica>> {
        let cluster = self.cluster()?;
        let id = cluster.meta.borrow().topics.get(topic)?.id;
        cluster.replicas.borrow().get(&(id, partition)).cloned()
    }

    /// The controller's replica (shard 0 only).
    pub(crate) fn controller(&self) -> Option<Rc<Replica>> {
        self.cluster()?.replicas.borrow().get(&(CONTROLLER_TOPIC_ID, 0)).cloned()
    }

    /// Opens the controller's replica and this shard's replicas from the stored metadata, and
    /// starts the clock (and, on shard 0, the loop applying the controller's log).
    pub(crate) async fn start_cluster(self: &Rc<Self>) -> Result<(), ShardError> {
        let Some(cluster) = self.cluster() else { return Ok(()) };
        let stored = ClusterMeta::load(&self.config.data_dir)?.unwrap_or_default();
        if self.id == 0 && !cluster.is_seed() {
            glommio::spawn_local(Rc::clone(self).run_metadata_follow()).detach();
        }
        if self.id == 0 && cluster.is_seed() {
            let voters = cluster.settings.seeds.clone();
            let majority = voters.len() as u32 / 2 + 1;
            let quorum = Quorum::new(voters.len() as u32, majority)
                .map_err(|e| ShardError::InvalidConfig(format!("the controller's quorum: {e}")))?;
            let dir = self.config.data_dir.join("cluster").join("controller");
            let address = ReplicaAddress {
                topic_id: CONTROLLER_TOPIC_ID,
                topic: CONTROLLER_NAME.to_owned(),
                partition: 0,
            };
            // The controller's records are few and small: always acknowledged after fdatasync.
            let settings = cluster.replica_settings(voters, quorum, cluster.settings.controller_disk_lost);
            let replica = self.open_replica(address, &dir, settings, Durability::Sync).await?;
            if stored.applied_end > 0 {
                replica.note_snapshot(Snapshot { start: stored.applied_end, marker_end: stored.applied_end });
            }
            cluster.replicas.borrow_mut().insert((CONTROLLER_TOPIC_ID, 0), replica);
            glommio::spawn_local(Rc::clone(self).run_controller_apply()).detach();
            glommio::spawn_local(Rc::clone(self).run_liveness()).detach();
        }
        self.apply_cluster(stored).await?;
        glommio::spawn_local(Rc::clone(self).run_cluster_clock()).detach();
        Ok(())
    }

    async fn open_replica(
        &self,
        address: ReplicaAddress,
        dir: &std::path::Path,
        settings: ReplicaSettings,
        durability: Durability,
    ) -> Result<Rc<Replica>, ShardError> {
        let cluster = self.cluster().expect("replicas live in a cluster");
        // The compacted logs (see `Replica::apply_retention`) are cut below their snapshots,
        // never by the node's retention, in segments small enough that a cut frees whole ones.
        let compacted_segment_bytes = if address.topic_id == CONTROLLER_TOPIC_ID {
            Some(cluster.settings.controller_segment_bytes)
        } else if crate::offsets::is_internal_topic(&address.topic) {
            Some(self.config.groups.offsets_segment_bytes)
        } else {
            None
        };
        let log_config = match compacted_segment_bytes {
            Some(segment_bytes) => LogConfig {
                segment_bytes,
                retention_bytes: None,
                retention_ms: None,
                ..self.config.log.clone()
            },
            None => self.config.log.clone(),
        };
        let log = Log::open(dir, log_config).await?;
        let producers = crate::shard::rebuild_producers(&log).await?;
        let key = self.next_partition_key.get();
        self.next_partition_key.set(key + 1);
        let partition = Rc::new(Partition::new(&address.topic, address.partition, key, log, durability));
        *partition.producers.borrow_mut() = producers;
        let replica = Replica::open(
            address,
            Rc::clone(&partition),
            &settings,
            Rc::clone(&self.cache),
            cluster.send_hook(),
        )
        .await?;
        let shard = self.me.clone();
        replica.set_nodes_back(&self.nodes_back());
        replica.set_role_hook(Rc::new(move |address, role| {
            if let Some(shard) = shard.upgrade() {
                shard.share_role((address.topic_id, address.partition), role);
                if crate::offsets::is_internal_topic(&address.topic) {
                    shard.offsets_role_changed(address.partition, role);
                }
            }
        }));
        partition.flusher_running.set(true);
        let cache = Rc::clone(&self.cache);
        let hook = Rc::downgrade(&replica);
        let flusher = Rc::clone(&partition).run_flusher(Rc::clone(&self.metrics), move |p| {
            let mut cache = cache.borrow_mut();
            cache.mark_durable(p.key, p.log.durable_offset());
            if p.log.stopped().is_some() {
                cache.drop_undurable(p.key);
            }
            drop(cache);
            if let Some(replica) = hook.upgrade() {
                replica.after_flush();
            }
        });
        glommio::spawn_local(flusher).detach();
        Ok(replica)
    }

    /// Ticks every replica of this shard, and now and then gives leaderships back to the
    /// partitions' preferred leaders.
    async fn run_cluster_clock(self: Rc<Self>) {
        let tick = self.cluster().expect("a cluster").settings.tick;
        let mut next_balance = std::time::Instant::now() + PREFERRED_LEADER_CHECK_INTERVAL;
        while !self.shutting_down.get() {
            glommio::timer::sleep(tick).await;
            let cluster = self.cluster().expect("a cluster");
            let replicas: Vec<Rc<Replica>> = cluster.replicas.borrow().values().cloned().collect();
            let now = std::time::Instant::now();
            for replica in &replicas {
                replica.tick();
                replica.sample_replication_lag(now, |lag| {
                    self.metrics.replication_lag.observe(lag.as_secs_f64())
                });
            }
            let settled = |&(_, at): &(u32, Instant)| now.duration_since(at) >= RETURNED_FOLLOWER_SETTLE;
            let expired = cluster.back.borrow().iter().any(settled);
            if expired {
                cluster.back.borrow_mut().retain(|entry| !settled(entry));
                self.tell_nodes_back();
            }
            if std::time::Instant::now() >= next_balance {
                next_balance = std::time::Instant::now() + PREFERRED_LEADER_CHECK_INTERVAL;
                for replica in &replicas {
                    replica.restore_preferred_leader();
                }
            }
        }
    }

    /// Shard 0: applies the controller's committed records as the commit point moves.
    async fn run_controller_apply(self: Rc<Self>) {
        while !self.shutting_down.get() {
            let Some(controller) = self.controller() else { return };
            let applied = self.cluster().expect("a cluster").meta.borrow().applied_end;
            let log_start = controller.partition.log.log_start_offset();
            if applied < log_start {
                self.copy_metadata_from_a_seed(log_start).await;
                continue;
            }
            if controller.high_watermark() <= applied {
                controller.changed.listen().await;
                continue;
            }
            if let Err(error) = self.apply_controller_records(&controller, applied).await {
                eprintln!("pyralog: applying the cluster's metadata: {error}");
                controller.changed.listen().await;
            }
        }
    }

    async fn apply_controller_records(&self, controller: &Replica, from: i64) -> Result<(), ShardError> {
        let commit = controller.high_watermark();
        let partition = &controller.partition;
        let cached = self.cache.borrow().read(partition.key, from, commit, APPLY_READ_BYTES, true);
        let chunks: Vec<Bytes> = match cached.filter(|c| !c.is_empty()) {
            Some(chunks) => chunks,
            None if partition.log.durable_offset() > from => {
                partition.log.read(from, APPLY_READ_BYTES).await?.into_iter().collect()
            }
            // Committed but not yet durable here: the next flush wakes the loop.
            None => {
                partition.flushed.listen().await;
                return Ok(());
            }
        };
        let mut meta = self.cluster().expect("a cluster").meta.borrow().clone();
        for chunk in chunks {
            let mut at = 0;
            while let Some(header) = batch::stored_header(&chunk[at..]) {
                let bytes = &chunk[at..at + header.total_bytes as usize];
                at += header.total_bytes as usize;
                if header.next_offset() > commit || header.next_offset() <= meta.applied_end {
                    continue;
                }
                let control = header.attributes & 0x20 != 0;
                let record = if control {
                    None
                } else {
                    let decoded = pyralog_replication::batch::first_record(bytes).ok_or_else(|| {
                        ShardError::Storage(format!(
                            "the controller's batch at offset {} holds no readable record",
                            header.base_offset
                        ))
                    })?;
                    Some(MetaRecord::decode(decoded.1))
                };
                match record {
                    Some(Ok(record)) => {
                        if let Err(refused) = meta.apply(record, header.next_offset()) {
                            eprintln!("pyralog: a metadata change did not apply: {refused}");
                        }
                    }
                    Some(Err(error)) => return Err(error),
                    None => meta.applied_end = header.next_offset(),
                }
            }
        }
        self.install_cluster_meta(meta).await
    }

    /// Shard 0 of a seed whose controller log starts at `log_start`, past the metadata this
    /// node applied: its log was started afresh at its leader's start (it was away while the
    /// other seeds deleted what it lacks), or its `cluster.meta` is older than the log's
    /// start (lost, or a crash). The records it lacks are only in the other seeds' metadata:
    /// it takes a copy that reaches `log_start` from one of them (the controller's leader
    /// first), then applies its own log from where that copy ends.
    async fn copy_metadata_from_a_seed(&self, log_start: i64) {
        let cluster = self.cluster().expect("a cluster");
        let node = cluster.settings.node_id;
        let others: Vec<u32> = cluster.settings.seeds.iter().copied().filter(|&s| s != node).collect();
        let applied = cluster.meta.borrow().applied_end;
        let hook = cluster.metadata_source.borrow().clone();
        let (Some(hook), false) = (hook, others.is_empty()) else {
            eprintln!(
                "pyralog: the controller's log here starts at offset {log_start}, past the cluster metadata this \
                 node has (through offset {applied}), and no other seed can give it a copy: restore cluster.meta \
                 from a backup"
            );
            glommio::timer::sleep(METADATA_RETRY * 10).await;
            return;
        };
        let leader = self.controller().and_then(|c| c.role().leader).filter(|l| others.contains(l));
        for source in leader.into_iter().chain(others.iter().copied().filter(|&s| Some(s) != leader)) {
            match hook(source, applied).await {
                Ok(MetadataAnswer { meta: Some(meta), .. }) if meta.applied_end >= log_start => {
                    eprintln!(
                        "pyralog: the controller's log here starts at offset {log_start}, past this node's cluster \
                         metadata (through offset {applied}): took node {source}'s, through offset {}",
                        meta.applied_end
                    );
                    if let Err(error) = self.install_cluster_meta(meta).await {
                        eprintln!("pyralog: applying the cluster's metadata from node {source}: {error}");
                    }
                    return;
                }
                // Behind too, or away: the next seed.
                Ok(_) | Err(_) => {}
            }
        }
        glommio::timer::sleep(METADATA_RETRY).await;
    }

    /// Shard 0: persists newer metadata and has every shard apply it, shard 0 last: a change
    /// this node waits for (`wait_applied`, on shard 0) is then known to every shard, so a
    /// client told a topic was created finds it on whichever shard it asks next.
    ///
    /// The stored copy is a head start for the next start, not the truth: a copy that cannot
    /// be written (a full disk) leaves the older one (written whole or not at all) and this
    /// node applies the metadata anyway, catching up from the controller's log or a seed at
    /// its next start, rather than serving a view that no longer moves.
    async fn install_cluster_meta(&self, meta: ClusterMeta) -> Result<(), ShardError> {
        assert_eq!(self.id, 0, "shard 0 applies the cluster's metadata");
        match meta.persist(&self.config.data_dir) {
            Ok(()) => {
                // What the stored copy covers, the controller's log need not keep.
                if let Some(controller) = self.controller() {
                    controller
                        .note_snapshot(Snapshot { start: meta.applied_end, marker_end: meta.applied_end });
                }
            }
            Err(error) => eprintln!(
                "pyralog: the cluster's metadata (through controller offset {}) applies but its copy on disk \
                 stays older: {error}",
                meta.applied_end
            ),
        }
        for target in (1..self.count).chain([0]) {
            match self.call(target, Op::ApplyCluster { meta: meta.clone() }).await? {
                OpResult::Done(result) => result?,
                other => unreachable!("applying metadata answered with {other:?}"),
            }
        }
        Ok(())
    }

    /// Makes `meta` this shard's view: opens the replicas it now owns on this node, closes
    /// those of topics that are gone.
    pub(crate) async fn apply_cluster(&self, meta: ClusterMeta) -> Result<(), ShardError> {
        let cluster = self.cluster().expect("a cluster");
        let _turn = cluster.applying.acquire_permit(1).await.map_err(|_| ShardError::ShuttingDown)?;
        // An older view than the one applied (a stored snapshot behind the controller's) is
        // not applied over it.
        if meta.applied_end < cluster.meta.borrow().applied_end {
            return Ok(());
        }
        let node = cluster.settings.node_id;
        for (name, topic) in &meta.topics {
            for (partition, voters) in topic.replicas.iter().enumerate() {
                let partition = partition as u32;
                let open = cluster.replicas.borrow().contains_key(&(topic.id, partition));
                if open || !voters.contains(&node) || self.owner_of(name, partition) != self.id {
                    continue;
                }
                let quorum = Quorum::new(topic.replication_factor, topic.write_quorum)
                    .map_err(|e| ShardError::InvalidConfig(format!("topic '{name}': {e}")))?;
                let address = ReplicaAddress { topic_id: topic.id, topic: name.clone(), partition };
                let dir = topics::partition_dir(&self.config.data_dir, name, partition);
                let lost =
                    !dir.exists() && placed_before_this_disk(&meta, topic, partition, &cluster.settings);
                let settings = cluster.replica_settings(voters.clone(), quorum, lost);
                let replica = self.open_replica(address, &dir, settings, self.config.durability).await?;
                self.partitions.borrow_mut().insert((name.clone(), partition), Rc::clone(&replica.partition));
                cluster.replicas.borrow_mut().insert((topic.id, partition), replica);
            }
            let table_meta =
                TopicMeta { partitions: topic.replicas.len() as u32, id: topic.id, config: topic.config() };
            self.topics.borrow_mut().insert(name, table_meta);
        }
        let gone: Vec<String> = self
            .topics
            .borrow()
            .iter()
            .map(|(n, _)| n.to_owned())
            .filter(|n| !meta.topics.contains_key(n))
            .collect();
        for name in gone {
            self.close_replicas_of(&name).await;
        }
        *cluster.meta.borrow_mut() = meta;
        cluster.applied.notify();
        Ok(())
    }

    async fn close_replicas_of(&self, name: &str) {
        let cluster = self.cluster().expect("a cluster");
        let id = self.topics.borrow().meta(name).map(|m| m.id);
        self.topics.borrow_mut().remove(name);
        let doomed: Vec<Rc<Replica>> = {
            let mut replicas = cluster.replicas.borrow_mut();
            let keys: Vec<_> = replicas.keys().filter(|(t, _)| Some(*t) == id).copied().collect();
            keys.iter().filter_map(|k| replicas.remove(k)).collect()
        };
        for replica in doomed {
            self.partitions.borrow_mut().remove(&(name.to_owned(), replica.address.partition));
            replica.close().await;
            replica.partition.stop_flusher().await;
            self.cache.borrow_mut().forget(replica.partition.key);
            replica.partition.data_arrived.notify();
            let _ = replica.partition.log.close().await;
        }
        let _ = std::fs::remove_dir_all(topics::topic_dir(&self.config.data_dir, name));
    }

    /// Proposes a metadata change on the controller (this node must lead it) and waits until
    /// it is committed and applied here. Returns the controller log's offset after it.
    pub(crate) async fn propose_metadata(&self, record: MetaRecord) -> Result<i64, ShardError> {
        assert_eq!(self.id, 0, "the controller lives on shard 0");
        let controller = self.controller().expect("shard 0 of a cluster has the controller");
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        // Keyed: the record reader takes no null key.
        let bytes = pyralog_replication::batch::build(&[(Some(b"meta"), &record.encode())], 0, now_ms);
        let headers = batch::parse_all(&bytes)?;
        let (_, end, term) = controller.propose(&bytes, &headers).map_err(|error| match error {
            ShardError::NotLeader { leader, term, .. } => ShardError::NotController { leader, term },
            other => other,
        })?;
        controller.wait_committed(end, term).await.map_err(|error| match error {
            ShardError::NotLeader { leader, term, .. } => ShardError::NotController { leader, term },
            other => other,
        })?;
        self.wait_applied(end).await?;
        Ok(end)
    }

    /// Creates a replicated topic through the controller (shard 0 of its leader).
    pub(crate) async fn create_replicated_topic(
        &self,
        name: &str,
        partitions: u32,
        config: topics::TopicConfig,
    ) -> Result<i64, ShardError> {
        let cluster = self.cluster().expect("a cluster");
        let (placement, quorum) = {
            let meta = cluster.meta.borrow();
            if meta.topics.contains_key(name) {
                return Err(ShardError::TopicAlreadyExists(name.to_owned()));
            }
            let nodes = meta.nodes.len().max(1) as u32;
            let default = cluster.settings.default_replication_factor.unwrap_or(3).min(nodes);
            let replication_factor = config.replication_factor.unwrap_or(default);
            let write_quorum = config.min_insync_replicas.unwrap_or(replication_factor / 2 + 1);
            let quorum = Quorum::new(replication_factor, write_quorum)
                .map_err(|e| ShardError::InvalidConfig(format!("topic '{name}': {e}")))?;
            (
                crate::cluster::place(
                    &meta,
                    partitions,
                    replication_factor,
                    &self.nodes_not_heard().unwrap_or_default(),
                )?,
                quorum,
            )
        };
        let (replication_factor, write_quorum) = (quorum.replication_factor(), quorum.write_quorum());
        let topic = TopicPlacement {
            created_at: Vec::new(),
            id: topics::TopicMeta::new(partitions, config).id,
            replication_factor,
            write_quorum,
            max_message_bytes: config.max_message_bytes,
            replicas: placement,
        };
        let id = topic.id;
        let end = self.propose_metadata(MetaRecord::CreateTopic { name: name.to_owned(), topic }).await?;
        // Two creates of one name may race: the first committed wins, on every node.
        match self.cluster().expect("a cluster").meta.borrow().topics.get(name) {
            Some(created) if created.id == id => Ok(end),
            _ => Err(ShardError::TopicAlreadyExists(name.to_owned())),
        }
    }

    /// Grows a replicated topic through the controller.
    pub(crate) async fn create_replicated_partitions(
        &self,
        name: &str,
        partitions: u32,
    ) -> Result<i64, ShardError> {
        let replicas = {
            let meta = self.cluster().expect("a cluster").meta.borrow();
            let topic = meta.topics.get(name).ok_or_else(|| ShardError::UnknownTopic(name.to_owned()))?;
            let count = topic.replicas.len() as u32;
            if partitions <= count {
                return Err(ShardError::InvalidPartitions(format!(
                    "topic '{name}' has {count} partitions; it can only grow, not to {partitions}"
                )));
            }
            crate::cluster::place(
                &meta,
                partitions - count,
                topic.replication_factor,
                &self.nodes_not_heard().unwrap_or_default(),
            )?
        };
        self.propose_metadata(MetaRecord::CreatePartitions { name: name.to_owned(), replicas }).await
    }

    pub(crate) async fn delete_replicated_topic(&self, name: &str) -> Result<i64, ShardError> {
        if !self.cluster().expect("a cluster").meta.borrow().topics.contains_key(name) {
            return Err(ShardError::UnknownTopic(name.to_owned()));
        }
        self.propose_metadata(MetaRecord::DeleteTopic { name: name.to_owned() }).await
    }

    /// Kafka's min.insync.replicas for acks=all: refused before anything is appended while the
    /// leader counts fewer in-sync replicas than the write quorum (an append then could not
    /// commit until a follower returned, and the producer would wait out its timeout).
    pub(crate) fn check_in_sync(&self, replica: &Replica) -> Result<(), ShardError> {
        let settings = &self.cluster().expect("replicas live in a cluster").settings;
        match replica.in_sync_shortfall(settings.tick, settings.replica_lag_time_max) {
            None => Ok(()),
            Some((in_sync, required)) => Err(ShardError::NotEnoughReplicas {
                topic: replica.address.topic.clone(),
                partition: replica.address.partition,
                in_sync,
                required,
            }),
        }
    }

    /// Appends to a replicated partition this node leads and waits as `acks` asks. Called
    /// with the partition's append turn, after the caller checked the in-sync replicas for
    /// `Acks::All` (`check_in_sync`) and then its idempotent producers (`retried`: the batch
    /// is a retry of one already in the log).
    pub(crate) async fn produce_replicated(
        &self,
        replica: &Replica,
        turn: glommio::sync::Permit<'_>,
        records: &Bytes,
        headers: &[batch::BatchHeader],
        retried: Option<crate::Produced>,
        acks: crate::Acks,
    ) -> Result<crate::Produced, ShardError> {
        let role = replica.role();
        if role.role != Role::Leader {
            return Err(replica.not_leader(role.leader, role.term));
        }
        let (produced, term) = match retried {
            Some(done) => (done, role.term),
            None => {
                let (base, end, term) = replica.propose(records, headers)?;
                // Recorded now, before the next produce's check: the replica's worker appends later.
                let mut producers = replica.partition.producers.borrow_mut();
                let mut offset = base;
                for header in headers {
                    let mut stamped = *header;
                    stamped.base_offset = offset;
                    offset = stamped.next_offset();
                    producers.record(&stamped);
                }
                (crate::Produced { base_offset: base, next_offset: end }, term)
            }
        };
        drop(turn);
        match acks {
            crate::Acks::None => {}
            crate::Acks::Leader => replica.partition.wait_durable(produced.next_offset).await?,
            crate::Acks::All => replica.wait_committed(produced.next_offset, term).await?,
        }
        Ok(produced)
    }
}

/// Updates `back` (nodes just back, and since when: [`ShardCluster::back`]) for the nodes
/// counted down going from `before` to `after` at `now`: one counted down again is not back.
fn note_returns(back: &mut Vec<(u32, Instant)>, before: &[u32], after: &[u32], now: Instant) {
    back.retain(|(node, _)| !after.contains(node));
    for &node in before.iter().filter(|node| !after.contains(node)) {
        back.push((node, now));
    }
}

/// What metadata names as a partition's leader (see [`Shard::partition_leader`]): the
/// leader this node's replica heard of (`role`) and its epoch, none if its node's connection
/// was `lost_lately`; else `guessed_leader`, with epoch -1, passing over the nodes lost
/// lately as it does those down, and none if it still falls on one. (A replica campaigning
/// after its leader's connection reset knows no leader: the guess, the preferred replica,
/// was then the dead node.)
fn named_leader(
    role: Option<ReplicaRole>,
    replicas: &[u32],
    down: &[u32],
    lost_lately: impl Fn(u32) -> bool,
) -> (Option<u32>, i32) {
    match role {
        Some(ReplicaRole { leader: Some(leader), term, .. }) if !lost_lately(leader) => (Some(leader), term),
        Some(ReplicaRole { leader: Some(_), .. }) => (None, -1),
        _ => {
            let unreachable: Vec<u32> =
                replicas.iter().copied().filter(|&id| down.contains(&id) || lost_lately(id)).collect();
            (guessed_leader(replicas, &unreachable).filter(|&id| !lost_lately(id)), -1)
        }
    }
}

/// The leader metadata names for a partition whose leader this node has not heard of: its
/// preferred replica (the first), or the first not counted down: a client sent to a down node
/// cannot even be told NotLeader, and Kafka metadata leaves down nodes' brokers out.
fn guessed_leader(replicas: &[u32], down: &[u32]) -> Option<u32> {
    replicas.iter().find(|id| !down.contains(id)).or(replicas.first()).copied()
}

/// Whether a replica's role report replaces the one known (see [`ShardCluster::roles`]).
fn supersedes((role, report): (ReplicaRole, u64), known: Option<&(ReplicaRole, u64)>) -> bool {
    known.is_none_or(|(known, known_report)| (known.term, *known_report) < (role.term, report))
}

#[cfg(test)]
mod tests {
    use super::*;
    use pyralog_replication::{FollowerStatus, Membership, VoterSet};

    const TICK: Duration = Duration::from_millis(10);
    const LAG_MAX: Duration = Duration::from_millis(500);

    #[test]
    fn a_node_no_longer_counted_down_is_back_until_counted_down_again() {
        let (t0, t1) = (Instant::now(), Instant::now() + Duration::from_secs(1));
        let mut back = Vec::new();
        note_returns(&mut back, &[], &[2, 3], t0);
        assert!(back.is_empty(), "going down is no return");
        note_returns(&mut back, &[2, 3], &[3], t0);
        assert_eq!(back, [(2, t0)]);
        note_returns(&mut back, &[3], &[], t1);
        assert_eq!(back, [(2, t0), (3, t1)]);
        note_returns(&mut back, &[], &[2], t1);
        assert_eq!(back, [(3, t1)], "down again: no longer back");
    }

    #[test]
    fn metadata_never_names_a_node_whose_connection_was_just_lost() {
        let role = |leader| Some(ReplicaRole { term: 4, role: Role::Follower, leader });
        let never = |_| false;
        assert_eq!(named_leader(role(Some(2)), &[1, 2, 3], &[], never), (Some(2), 4));
        assert_eq!(named_leader(role(Some(2)), &[1, 2, 3], &[], |node| node == 2), (None, -1));
        assert_eq!(named_leader(role(Some(2)), &[1, 2, 3], &[], |node| node == 3), (Some(2), 4));
        // No leader heard of: the guess, past the nodes down and those lost lately.
        assert_eq!(named_leader(None, &[1, 2, 3], &[], never), (Some(1), -1));
        assert_eq!(named_leader(role(None), &[1, 2, 3], &[1], never), (Some(2), -1));
        assert_eq!(named_leader(role(None), &[1, 2, 3], &[], |node| node == 1), (Some(2), -1));
        assert_eq!(named_leader(role(None), &[1, 2, 3], &[2], |node| node != 2), (None, -1));
        // Every replica down and none lost: still the preferred one (it may be back first).
        assert_eq!(named_leader(role(None), &[1, 2, 3], &[1, 2, 3], never), (Some(1), -1));
    }

    #[test]
    fn a_guessed_leader_is_the_first_replica_not_down() {
        assert_eq!(guessed_leader(&[2, 3, 1], &[]), Some(2));
        assert_eq!(guessed_leader(&[2, 3, 1], &[2]), Some(3));
        assert_eq!(guessed_leader(&[2, 3, 1], &[2, 3]), Some(1));
        // Every replica down: still the preferred one (it may be back first).
        assert_eq!(guessed_leader(&[2, 3, 1], &[1, 2, 3]), Some(2));
        assert_eq!(guessed_leader(&[], &[]), None);
    }

    fn membership(write_quorum: u32) -> Membership {
        let quorum = Quorum::new(3, write_quorum).expect("a valid quorum");
        Membership { sets: vec![VoterSet { voters: vec![1, 2, 3], quorum }], learners: Vec::new() }
    }

    fn follower(id: u32, acked_end: i64, silent_ticks: u64) -> FollowerStatus {
        FollowerStatus {
            id,
            match_end: acked_end,
            acked_end,
            silent_ticks,
            stalled_ticks: silent_ticks,
            behind_ticks: silent_ticks,
            recovering: false,
        }
    }

    #[test]
    fn a_role_report_overtaken_by_a_later_one_of_its_term_is_ignored() {
        let leading = ReplicaRole { term: 4, role: Role::Leader, leader: Some(1) };
        let stepped_down = ReplicaRole { term: 4, role: Role::Follower, leader: None };
        // Reported as 7, then 8: in that order the later one replaces the earlier; arriving
        // in the other order, the earlier one is ignored.
        assert!(supersedes((stepped_down, 8), Some(&(leading, 7))));
        assert!(!supersedes((leading, 7), Some(&(stepped_down, 8))));
        // A newer term wins whatever its number; an older one never does.
        let next = ReplicaRole { term: 5, role: Role::Follower, leader: Some(2) };
        assert!(supersedes((next, 9), Some(&(stepped_down, 8))));
        assert!(!supersedes((leading, 10), Some(&(next, 9))));
        assert!(supersedes((leading, 1), None));
    }

    #[test]
    fn a_follower_streaming_far_behind_is_out_of_sync_however_fast_it_moves() {
        // Heard every tick and moving every tick, but last caught up 51 ticks (510 ms) ago.
        let streaming = FollowerStatus { stalled_ticks: 0, behind_ticks: 51, ..follower(3, 10, 0) };
        assert!(!follower_in_sync(&streaming, 100_000, TICK, LAG_MAX));
        let followers = [follower(2, 100_000, 0), streaming];
        assert_eq!(in_sync_of(&followers), vec![1, 2]);
        // Caught up as of 50 ticks ago (it holds what the leader held then): still in.
        let keeping = FollowerStatus { behind_ticks: 50, ..streaming };
        assert!(follower_in_sync(&keeping, 100_000, TICK, LAG_MAX));
        // Holding the whole log counts now, whatever it said before.
        let whole = FollowerStatus { acked_end: 100_000, behind_ticks: u64::MAX, ..streaming };
        assert!(follower_in_sync(&whole, 100_000, TICK, LAG_MAX));
    }

    fn in_sync_of(followers: &[FollowerStatus]) -> Vec<u32> {
        let status = ReplicaStatus {
            topic_id: [1; 16],
            topic: "t".into(),
            partition: 0,
            voters: vec![1, 2, 3],
            term: 1,
            leader: Some(1),
            leads: true,
            log_start: 0,
            log_end: 100_000,
            durable_end: 100_000,
            high_watermark: 100_000,
            followers: followers.to_vec(),
            failure: None,
            core: crate::CoreStatus {
                role: Role::Leader,
                term: 1,
                leader: Some(1),
                log_end: 100_000,
                durable_end: 100_000,
                recovering: false,
                campaign_last: Vec::new(),
            },
            queued_actions: 0,
            performing: None,
        };
        in_sync_replicas(&status, TICK, LAG_MAX)
    }

    #[test]
    fn a_follower_unheard_past_the_lag_leaves_the_write_quorum_short() {
        let both = [follower(2, 100, 0), follower(3, 100, 1)];
        assert_eq!(write_quorum_shortfall(&membership(3), 1, &both, 100, TICK, LAG_MAX), None);
        // Node 3 unheard for 51 ticks of 10 ms: past 500 ms.
        let one_gone = [follower(2, 100, 0), follower(3, 90, 51)];
        assert_eq!(write_quorum_shortfall(&membership(3), 1, &one_gone, 100, TICK, LAG_MAX), Some((2, 3)));
        // A majority write quorum still has two of three.
        assert_eq!(write_quorum_shortfall(&membership(2), 1, &one_gone, 100, TICK, LAG_MAX), None);
        // Within the lag it still counts, caught up or not.
        let lagging = [follower(2, 100, 0), follower(3, 90, 50)];
        assert_eq!(write_quorum_shortfall(&membership(3), 1, &lagging, 100, TICK, LAG_MAX), None);
    }

    #[test]
    fn a_recovering_follower_is_not_in_sync() {
        let mut recovering = follower(3, 100, 0);
        recovering.recovering = true;
        let followers = [follower(2, 100, 0), recovering];
        assert_eq!(write_quorum_shortfall(&membership(3), 1, &followers, 100, TICK, LAG_MAX), Some((2, 3)));
        // Without any follower the leader alone is one.
        assert_eq!(write_quorum_shortfall(&membership(2), 1, &[], 100, TICK, LAG_MAX), Some((1, 2)));
    }
}
