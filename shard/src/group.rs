//! The group coordinator: Kafka's classic consumer group protocol (JoinGroup, SyncGroup,
//! Heartbeat, LeaveGroup) and committed offsets (OffsetCommit, OffsetFetch) for the groups one
//! shard coordinates.
//!
//! What it is not: it knows no wire format and opens no socket. The Kafka listener decodes
//! requests into the plain types here ([`JoinRequest`], [`SyncRequest`], [`CommitRequest`]) and
//! maps [`GroupError::kafka_code`] back onto the wire. It does not check that committed topics
//! exist, and it does not persist membership: after a restart every group is `Empty` with its
//! committed offsets, and members rejoin (their old member ids are unknown by then).
//!
//! Lives on one shard: a [`GroupCoordinator`] is `!Send` and is used from the executor that
//! opened it. Requests from other cores reach it over the channel mesh, which is why every
//! request and result type here is `Send + 'static`.
//!
//! # The state machine of one group
//! The states and transitions are Kafka's (`GroupCoordinator.scala` before KIP-848):
//! - `Empty`: no members. The first JoinGroup moves the group to `PreparingRebalance`, where
//!   it waits `initial_rebalance_delay` so that other consumers starting at the same time land
//!   in the same generation; each newcomer during that wait extends it by another delay, up to
//!   the rebalance timeout.
//! - `PreparingRebalance`: the join phase. Every JoinGroup parks until the phase ends: when every
//!   known member has rejoined (and no member that was told `MemberIdRequired` is still due),
//!   or when the rebalance timeout (the largest of the members') runs out. Dynamic members that
//!   did not rejoin are then removed; static ones stay (as in Kafka). The generation goes up by
//!   one, the protocol is chosen (supported by every member, by vote of each member's first
//!   preference) and every parked JoinGroup is answered; only the leader's answer carries the
//!   members and their metadata. With no member left, the group goes back to `Empty`.
//! - `CompletingRebalance`: waiting for the leader's SyncGroup with the assignment. Followers'
//!   SyncGroups park until then. Members that send no SyncGroup within the rebalance timeout
//!   are removed and a new rebalance starts.
//! - `Stable`: heartbeats answer without error and SyncGroup returns the member's assignment.
//! - `Dead`: only after [`GroupCoordinator::close`].
//!
//! A rebalance starts (from `Stable` or `CompletingRebalance`) when a member joins, leaves, or
//! its session expires, when a member changes its protocols, or when the leader rejoins. The
//! other members learn it from their heartbeats (`RebalanceInProgress`) and rejoin. Parked
//! SyncGroups of an interrupted `CompletingRebalance` are answered `RebalanceInProgress`.
//!
//! Sessions: a member that is not parked in a join or sync must send a heartbeat (or a join,
//! sync or commit) within its session timeout, or it is removed. A parked new member is removed
//! if its first join has not completed within `new_member_join_timeout`.
//!
//! Static membership (`group_instance_id`): a static member that joins again with an empty
//! member id gets a new member id that takes over the old member's place and assignment. In a
//! `Stable` group whose chosen protocol does not change this happens without a rebalance: the
//! join is answered at once with the current generation. Requests carrying the instance id with
//! the old member id are then refused with `FencedInstanceId`.
//!
//! Timers: one task per coordinator (the *sweeper*) sleeps until the earliest deadline of any
//! group (session, pending member, join phase, sync phase), expires what is due, and sleeps
//! again. Requests that create an earlier deadline wake it.
//!
//! # Committed offsets and their durability
//! Offsets are appended to an internal [`Log`] (the same O_DIRECT segment log a partition uses)
//! as RecordBatch v2 batches, one batch per OffsetCommit request and one record per partition.
//! A commit is answered only after its batch is fdatasync'ed, and it becomes visible to
//! OffsetFetch at the same moment, so a fetched offset never goes back after a crash. The
//! coordinator's flusher task is the only caller of `Log::flush`; commits that arrive during a
//! flush go into the next one (group commit). A commit whose request was dropped mid-way is
//! still flushed and applied, so memory never disagrees with the log. At open the whole log is
//! replayed, later records winning. A failed write or fdatasync stops the log for good
//! (fsyncgate); every later commit fails with [`GroupError::Storage`].
//!
//! In a cluster the offsets log is a partition of the replicated offsets topic (see
//! `offsets`), which the partition's replica owns: the coordinator runs no flusher, replays
//! the log below the commit point when it starts (`GroupCoordinator::open_replicated`), and
//! appends each commit through the replica's leader with acks=all, applying it once
//! committed. Commits complete in any order there, so every committed offset remembers where
//! in the log it was written, and of two commits of a partition the later in the log wins, as
//! at replay. It compacts through the leader too, deleting nothing itself: a snapshot, then a
//! marker batch naming where the snapshot starts; each replica deletes its own segments below
//! that once the marker is committed (see `compact_replicated`).
//!
//! Record format (all integers big-endian, strings UTF-8):
//! - key: `version: u8 = 0`, `group_id: u16 length + bytes`, `topic: u16 length + bytes`,
//!   `partition: i32`;
//! - value: `version: u8 = 0`, `offset: i64`, `leader_epoch: i32`, `metadata: i32 length
//!   (-1 for none) + bytes`, `commit_timestamp_ms: i64`;
//! - a snapshot marker (alone in its batch, after a compaction's snapshot): key `version: u8 =
//!   1`, value `version: u8 = 0`, `snapshot_start: i64` (-1: the snapshot is empty and starts
//!   at the marker). Replay drops every offset written before a marker's start.
//!
//! Invariants owned here:
//! - offsets visible to [`GroupCoordinator::fetch_offsets`] are durable in the offsets log
//!   (replicated: committed in the offsets partition);
//! - a member id is in at most one group's member map, and a static instance id maps to at most
//!   one member id;
//! - outside `PreparingRebalance` no member has a parked JoinGroup, and outside
//!   `CompletingRebalance` no member has a parked SyncGroup;
//! - a snapshot holds every commit proposed before it: none is in flight while it is taken,
//!   and none is proposed between it and its marker.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::future::Future;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use pyralog_dma::batch::{self, BatchHeader, HEADER_BYTES, LOG_OVERHEAD_BYTES, MAGIC_V2};
use pyralog_dma::{Log, LogConfig};

use crate::event::Event;
use crate::replica::Snapshot;
use crate::topics;
use crate::ShardError;

/// Longest group id, in bytes: the longest string Kafka's classic (non-compact) encoding carries.
pub const GROUP_ID_BYTES_MAX: usize = i16::MAX as usize;
/// Largest `offset_metadata_bytes_max` a [`GroupConfig`] may set.
pub const OFFSET_METADATA_BYTES_LIMIT: usize = 1 << 20;
/// Version byte that starts the key and the value of every offsets-log record.
const RECORD_VERSION: u8 = 0;
/// The key of a snapshot marker: this byte alone, the value `version: u8 = 0`,
/// `snapshot_start: i64` (see [`snapshot_start`]).
const SNAPSHOT_KEY_VERSION: u8 = 1;
/// A marker's `snapshot_start` for an empty snapshot: it starts at the marker itself.
const SNAPSHOT_AT_MARKER: i64 = -1;
/// Records in one batch of a compaction snapshot.
const SNAPSHOT_RECORDS_PER_BATCH: usize = 1000;
/// Bytes of metadata in one batch of a compaction snapshot, past which it takes no more
/// records: a replicated snapshot's batches then stay within one AppendEntries message
/// (`pyralog_replication::group::APPEND_BYTES_MAX`) like clients' commits.
const SNAPSHOT_METADATA_BYTES_PER_BATCH: usize = 512 << 10;
/// Bytes read from the offsets log at a time while replaying it.
const REPLAY_READ_BYTES: usize = 1 << 20;
/// Deadlines closer together than this are expired in one sweep.
const SWEEP_RESOLUTION: Duration = Duration::from_millis(5);
/// The sweeper runs at least this often, even with no deadline in sight.
const SWEEP_IDLE_MAX: Duration = Duration::from_secs(1);

/// Limits and timings of the coordinator; the defaults are Kafka 3.x's.
#[derive(Debug, Clone)]
pub struct GroupConfig {
    /// How long the first join of an empty group waits for more members
    /// (`group.initial.rebalance.delay.ms`).
    pub initial_rebalance_delay: Duration,
    /// Shortest session timeout a member may ask for (`group.min.session.timeout.ms`).
    pub session_timeout_min: Duration,
    /// Longest session timeout a member may ask for (`group.max.session.timeout.ms`).
    pub session_timeout_max: Duration,
    /// How long a new member's first JoinGroup may stay parked (Kafka's fixed 5 minutes).
    pub new_member_join_timeout: Duration,
    /// Most members of one group (`group.max.size`; Kafka has no limit by default).
    pub members_per_group_max: usize,
    /// Longest metadata string of a committed offset (`offset.metadata.max.bytes`).
    pub offset_metadata_bytes_max: usize,
    /// Segment size of the offsets log (small, so compaction can delete whole segments).
    pub offsets_segment_bytes: u64,
    /// The offsets log is compacted once it has grown this much since its last compaction:
    /// every committed offset is written again, and the segments before that are deleted.
    pub offsets_compact_growth_bytes: u64,
    /// A group without members for this long loses its offsets committed longer ago than
    /// this, at the next compaction (Kafka's offsets.retention.minutes, KIP-211).
    pub offsets_retention: Duration,
    /// How often the coordinator looks for offsets that retention lets go, and compacts at
    /// once if it finds any (Kafka's offsets.retention.check.interval.ms): a quiet log drops
    /// them too, not only one whose growth starts compactions.
    pub offsets_retention_check_interval: Duration,
}

impl Default for GroupConfig {
    fn default() -> GroupConfig {
        GroupConfig {
            initial_rebalance_delay: Duration::from_secs(3),
            session_timeout_min: Duration::from_secs(6),
            session_timeout_max: Duration::from_secs(1800),
            new_member_join_timeout: Duration::from_secs(300),
            members_per_group_max: 10_000,
            offset_metadata_bytes_max: 4096,
            offsets_segment_bytes: 16 << 20,
            offsets_compact_growth_bytes: 64 << 20,
            offsets_retention: Duration::from_secs(7 * 24 * 3600),
            offsets_retention_check_interval: Duration::from_secs(600),
        }
    }
}

/// Why a group request failed. Each variant maps to one Kafka error code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GroupError {
    #[error("the coordinator does not know this member id; rejoin with an empty member id")]
    UnknownMemberId,
    #[error("the generation id is not the group's current one; rejoin the group")]
    IllegalGeneration,
    #[error("the group is rebalancing; rejoin the group")]
    RebalanceInProgress,
    /// A new dynamic member must join again with this member id (KIP-394).
    #[error("join again with the member id '{0}' the coordinator assigned")]
    MemberIdRequired(String),
    #[error("another member with the same group.instance.id joined since; this one is fenced")]
    FencedInstanceId,
    #[error("the protocol type or protocols do not match those of the group's members")]
    InconsistentGroupProtocol,
    #[error("the session timeout is outside the coordinator's allowed range")]
    InvalidSessionTimeout,
    #[error("the group id is empty or too long")]
    InvalidGroupId,
    /// Reserved for requests about a group that must exist (DeleteGroups); not returned yet.
    #[error("the group does not exist")]
    GroupIdNotFound,
    #[error("the group has reached its maximum number of members")]
    GroupMaxSizeReached,
    #[error("the offset metadata is longer than the coordinator allows")]
    OffsetMetadataTooLarge,
    #[error("the topic name or partition number is not valid")]
    UnknownTopicOrPartition,
    /// The coordinator is closed (the node is shutting down).
    #[error("the group coordinator is not available")]
    CoordinatorNotAvailable,
    /// A cluster's offsets topic does not exist and cannot be created yet (too few nodes
    /// registered, say): why.
    #[error("the group coordinator is not available: {0}")]
    OffsetsTopicUnavailable(String),
    /// This node no longer (or not yet) leads the group's offsets partition: ask
    /// FindCoordinator again.
    #[error("this broker is not the group's coordinator; find the coordinator again")]
    NotCoordinator,
    /// This node just became the group's coordinator and is still reading its offsets log.
    #[error("the coordinator is loading the group's offsets; try again shortly")]
    CoordinatorLoadInProgress,
    /// The offsets log failed; it takes no more writes until the node restarts.
    #[error("storage error in the group offsets log: {0}")]
    Storage(String),
}

impl GroupError {
    /// Kafka's numeric error code (`org.apache.kafka.common.protocol.Errors`).
    pub fn kafka_code(&self) -> i16 {
        match self {
            GroupError::UnknownTopicOrPartition => 3,
            GroupError::OffsetMetadataTooLarge => 12,
            GroupError::CoordinatorLoadInProgress => 14,
            GroupError::CoordinatorNotAvailable | GroupError::OffsetsTopicUnavailable(_) => 15,
            GroupError::NotCoordinator => 16,
            GroupError::IllegalGeneration => 22,
            GroupError::InconsistentGroupProtocol => 23,
            GroupError::InvalidGroupId => 24,
            GroupError::UnknownMemberId => 25,
            GroupError::InvalidSessionTimeout => 26,
            GroupError::RebalanceInProgress => 27,
            GroupError::Storage(_) => 56,
            GroupError::GroupIdNotFound => 69,
            GroupError::MemberIdRequired(_) => 79,
            GroupError::GroupMaxSizeReached => 81,
            GroupError::FencedInstanceId => 82,
        }
    }
}

/// A JoinGroup request.
#[derive(Debug, Clone)]
pub struct JoinRequest {
    pub group_id: String,
    /// Empty for a member joining for the first time.
    pub member_id: String,
    /// Set by static members (`group.instance.id`).
    pub group_instance_id: Option<String>,
    pub client_id: String,
    pub client_host: String,
    /// `consumer` for consumers; every member of a group must use the same.
    pub protocol_type: String,
    /// (name, metadata) of each assignment protocol the member supports, preferred first.
    pub protocols: Vec<(String, Bytes)>,
    pub session_timeout: Duration,
    pub rebalance_timeout: Duration,
    /// JoinGroup v4+: a new dynamic member first gets [`GroupError::MemberIdRequired`].
    pub require_known_member_id: bool,
}

/// A successful JoinGroup answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Joined {
    pub generation_id: i32,
    pub protocol_type: String,
    pub protocol_name: String,
    pub leader_id: String,
    pub member_id: String,
    /// (member id, group instance id, metadata for the chosen protocol) of every member; only
    /// the leader gets them, the list is empty for the others.
    pub members: Vec<(String, Option<String>, Bytes)>,
}

pub type JoinResult = Result<Joined, GroupError>;

/// A SyncGroup request.
#[derive(Debug, Clone)]
pub struct SyncRequest {
    pub group_id: String,
    pub generation_id: i32,
    pub member_id: String,
    pub group_instance_id: Option<String>,
    /// SyncGroup v5+: checked against the group's when present.
    pub protocol_type: Option<String>,
    /// SyncGroup v5+: checked against the group's when present.
    pub protocol_name: Option<String>,
    /// (member id, assignment): sent by the leader only.
    pub assignments: Vec<(String, Bytes)>,
}

/// A successful SyncGroup answer: this member's assignment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Synced {
    pub protocol_type: String,
    pub protocol_name: String,
    pub assignment: Bytes,
}

pub type SyncResult = Result<Synced, GroupError>;

/// (topic, partition, offset, leader epoch, metadata) of one partition to commit.
pub type OffsetToCommit = (String, i32, i64, i32, Option<String>);

/// (topic, partition, offset or -1, leader epoch or -1, metadata) of one committed partition.
pub type CommittedPartition = (String, i32, i64, i32, Option<String>);

/// An OffsetCommit request.
#[derive(Debug, Clone)]
pub struct CommitRequest {
    pub group_id: String,
    /// -1 (with an empty member id) for a standalone commit, allowed while the group has no
    /// members.
    pub generation_id: i32,
    pub member_id: String,
    pub group_instance_id: Option<String>,
    pub offsets: Vec<OffsetToCommit>,
}

/// DescribeGroups' view of one group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupDescription {
    pub group_id: String,
    /// Kafka's name of the state: `Empty`, `PreparingRebalance`, `CompletingRebalance`,
    /// `Stable` or `Dead` (also for a group the coordinator does not know).
    pub state: String,
    pub protocol_type: String,
    /// Empty unless the group is `Stable`.
    pub protocol_name: String,
    pub members: Vec<MemberDescription>,
}

/// One member as DescribeGroups shows it; metadata and assignment only while `Stable`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberDescription {
    pub member_id: String,
    pub group_instance_id: Option<String>,
    pub client_id: String,
    pub client_host: String,
    pub metadata: Bytes,
    pub assignment: Bytes,
}

/// Appends one encoded batch to a replicated offsets partition through its leader (acks=all)
/// and resolves once the batch is committed, with its first offset and the offset after it.
pub type ReplicatedAppend =
    Rc<dyn Fn(Bytes) -> std::pin::Pin<Box<dyn Future<Output = Result<(i64, i64), GroupError>>>>>;

/// Where a coordinator's committed offsets are kept.
enum OffsetsStore {
    /// The node's own offsets log, flushed by the coordinator (a node without a cluster).
    Local(Box<Log>),
    /// A replicated partition of the offsets topic that this node leads: the replica owns the
    /// log; the coordinator only appends through its leader.
    Replicated(ReplicatedAppend),
}

/// The consumer groups of one shard and their committed offsets. See the module docs.
pub struct GroupCoordinator {
    me: std::rc::Weak<GroupCoordinator>,
    config: GroupConfig,
    store: OffsetsStore,
    groups: RefCell<HashMap<String, Group>>,
    /// Commits appended to the log and not durable yet, in log order; the flusher applies them.
    unflushed_commits: RefCell<VecDeque<UnflushedCommit>>,
    /// Random per process, so that member ids never repeat across restarts.
    member_id_nonce: u64,
    member_id_count: Cell<u64>,
    closing: Cell<bool>,
    /// What requests get once the coordinator closed.
    closed_error: RefCell<GroupError>,
    /// Work for the flusher: a commit was appended, or the coordinator closes.
    flusher_wake: Event,
    /// A flush finished or failed.
    flushed: Event,
    flusher_running: Cell<bool>,
    /// A deadline earlier than `next_sweep` appeared, or the coordinator closes.
    sweeper_wake: Event,
    sweeper_running: Cell<bool>,
    next_sweep: Cell<Instant>,
    /// The flusher or the sweeper stopped.
    task_stopped: Event,
    /// The offsets log's size after its last compaction (or at open).
    compacted_bytes: Cell<u64>,
    /// Replicated: bytes of commits written since this coordinator's last snapshot (at load:
    /// the bytes it replayed).
    written_since_snapshot: Cell<u64>,
    /// Replicated: commits proposed and not yet answered.
    commits_in_flight: Cell<usize>,
    /// Replicated: a compaction is under way and holds new commits back.
    compacting: Cell<bool>,
    /// Replicated: a commit was answered, or a compaction ended.
    commit_or_compaction_done: Event,
    /// Local: the retention check asks the flusher to compact now.
    compact_requested: Cell<bool>,
    /// When the sweeper next looks for offsets retention lets go.
    next_retention_check: Cell<Instant>,
}

struct UnflushedCommit {
    next_offset: i64,
    group_id: String,
    entries: Vec<(String, i32, CommittedOffset)>,
}

impl GroupCoordinator {
    /// Every committed offset of every group, for a scrape (lag is computed from them).
    pub fn committed_offsets(&self) -> Vec<crate::metrics::CommittedStats> {
        let groups = self.groups.borrow();
        let mut all = Vec::new();
        for (group, state) in groups.iter() {
            for ((topic, partition), committed) in &state.offsets {
                all.push(crate::metrics::CommittedStats {
                    group: group.clone(),
                    topic: topic.clone(),
                    partition: *partition,
                    offset: committed.offset,
                });
            }
        }
        all
    }

    /// Opens (or creates) the offsets log in `dir`, replays it, and starts the coordinator's
    /// tasks, with the default [`GroupConfig`]. Retention settings in `config` are ignored:
    /// nothing compacts the offsets log, so retention would lose committed offsets.
    pub async fn open(dir: PathBuf, config: LogConfig) -> Result<Rc<GroupCoordinator>, ShardError> {
        GroupCoordinator::open_with(dir, config, GroupConfig::default()).await
    }

    /// [`GroupCoordinator::open`] with explicit limits and timings.
    pub async fn open_with(
        dir: PathBuf,
        log_config: LogConfig,
        config: GroupConfig,
    ) -> Result<Rc<GroupCoordinator>, ShardError> {
        assert!(config.session_timeout_min <= config.session_timeout_max, "session timeout range is empty");
        assert!(config.members_per_group_max > 0, "a group must be able to have a member");
        assert!(config.offset_metadata_bytes_max <= OFFSET_METADATA_BYTES_LIMIT, "offset metadata limit");
        let log_config = LogConfig {
            segment_bytes: config.offsets_segment_bytes,
            retention_bytes: None,
            retention_ms: None,
            ..log_config
        };
        let log = Log::open(&dir, log_config).await?;
        let groups = match replay(&log, log.durable_offset(), false).await {
            Ok(replayed) => replayed.groups,
            Err(error) => {
                // The replay error is the one to report; a close error adds nothing to it.
                let _ = log.close().await;
                return Err(error);
            }
        };
        let compacted_bytes = log.size_bytes();
        let coordinator = GroupCoordinator::new(config, OffsetsStore::Local(Box::new(log)), groups);
        coordinator.compacted_bytes.set(compacted_bytes);
        coordinator.flusher_running.set(true);
        glommio::spawn_local(Rc::clone(&coordinator).run_flusher()).detach();
        Ok(coordinator)
    }

    /// A coordinator over a replicated partition of the offsets topic that this node now
    /// leads: replays `log` (the replica's) below `end`, which the caller waited to see
    /// committed and durable here, and from then on appends commits through `append`. The
    /// replica keeps the log; the coordinator compacts it with snapshots that every replica
    /// cuts its log below (see `compact_replicated`). Also returns the last snapshot the log
    /// marks complete, for the replica to cut below.
    pub(crate) async fn open_replicated(
        log: &Log,
        end: i64,
        config: GroupConfig,
        append: ReplicatedAppend,
    ) -> Result<(Rc<GroupCoordinator>, Option<Snapshot>), ShardError> {
        assert!(end <= log.durable_offset(), "replay reads only what is durable");
        let replayed = replay(log, end, true).await?;
        let coordinator = GroupCoordinator::new(config, OffsetsStore::Replicated(append), replayed.groups);
        coordinator.written_since_snapshot.set(replayed.bytes);
        Ok((coordinator, replayed.snapshot))
    }

    fn new(config: GroupConfig, store: OffsetsStore, groups: HashMap<String, Group>) -> Rc<GroupCoordinator> {
        assert!(config.session_timeout_min <= config.session_timeout_max, "session timeout range is empty");
        assert!(config.members_per_group_max > 0, "a group must be able to have a member");
        let first_retention_check = Instant::now() + config.offsets_retention_check_interval;
        let coordinator = Rc::new_cyclic(|me| GroupCoordinator {
            me: me.clone(),
            config,
            store,
            groups: RefCell::new(groups),
            unflushed_commits: RefCell::new(VecDeque::new()),
            member_id_nonce: member_id_nonce(),
            member_id_count: Cell::new(0),
            closing: Cell::new(false),
            closed_error: RefCell::new(GroupError::CoordinatorNotAvailable),
            flusher_wake: Event::default(),
            flushed: Event::default(),
            flusher_running: Cell::new(false),
            sweeper_wake: Event::default(),
            sweeper_running: Cell::new(true),
            next_sweep: Cell::new(Instant::now()),
            task_stopped: Event::default(),
            compacted_bytes: Cell::new(0),
            written_since_snapshot: Cell::new(0),
            commits_in_flight: Cell::new(0),
            compacting: Cell::new(false),
            commit_or_compaction_done: Event::default(),
            compact_requested: Cell::new(false),
            next_retention_check: Cell::new(first_retention_check),
        });
        glommio::spawn_local(Rc::clone(&coordinator).run_sweeper()).detach();
        coordinator
    }

    /// The node's own offsets log (only a local coordinator's flusher and compaction use it).
    fn local_log(&self) -> &Log {
        match &self.store {
            OffsetsStore::Local(log) => log,
            OffsetsStore::Replicated(_) => unreachable!("a replicated coordinator has no log of its own"),
        }
    }

    /// JoinGroup. Completes when the group's join phase ends (see the module docs), at once
    /// for errors and for members whose join needs no rebalance.
    pub async fn join(&self, request: JoinRequest) -> JoinResult {
        match self.join_now(&request)? {
            Step::Done(joined) => Ok(joined),
            Step::Wait(reply) => reply.wait().await,
        }
    }

    fn join_now(&self, request: &JoinRequest) -> Result<Step<Joined>, GroupError> {
        self.check_open()?;
        check_group_id(&request.group_id)?;
        if request.session_timeout < self.config.session_timeout_min
            || request.session_timeout > self.config.session_timeout_max
        {
            return Err(GroupError::InvalidSessionTimeout);
        }
        let now = Instant::now();
        let mut groups = self.groups.borrow_mut();
        let step = if request.member_id.is_empty() {
            let prefix = request.group_instance_id.as_deref().unwrap_or(&request.client_id);
            let new_member_id = self.new_member_id(prefix);
            let group = groups
                .entry(request.group_id.clone())
                .or_insert_with(|| Group::new(request.group_id.clone()));
            group.join(request, Some(new_member_id), now, &self.config)
        } else {
            match groups.get_mut(&request.group_id) {
                Some(group) => group.join(request, None, now, &self.config),
                None => Err(GroupError::UnknownMemberId),
            }
        };
        self.after_change(&mut groups, &request.group_id);
        step
    }

    /// SyncGroup. A follower's completes when the leader's arrives; everyone gets their own
    /// assignment.
    pub async fn sync(&self, request: SyncRequest) -> SyncResult {
        match self.sync_now(&request)? {
            Step::Done(synced) => Ok(synced),
            Step::Wait(reply) => reply.wait().await,
        }
    }

    fn sync_now(&self, request: &SyncRequest) -> Result<Step<Synced>, GroupError> {
        self.check_open()?;
        check_group_id(&request.group_id)?;
        let mut groups = self.groups.borrow_mut();
        let group = groups.get_mut(&request.group_id).ok_or(GroupError::UnknownMemberId)?;
        let step = group.sync(request, Instant::now());
        self.after_change(&mut groups, &request.group_id);
        step
    }

    /// Heartbeat: refreshes the member's session. `RebalanceInProgress` tells the member to
    /// rejoin.
    pub fn heartbeat(
        &self,
        group_id: &str,
        generation_id: i32,
        member_id: &str,
        group_instance_id: Option<&str>,
    ) -> Result<(), GroupError> {
        self.check_open()?;
        check_group_id(group_id)?;
        let mut groups = self.groups.borrow_mut();
        let group = groups.get_mut(group_id).ok_or(GroupError::UnknownMemberId)?;
        // A heartbeat only moves a deadline later: the sweeper needs no wake-up.
        group.heartbeat(generation_id, member_id, group_instance_id, Instant::now())
    }

    /// LeaveGroup for each (member id, group instance id): removes the members and starts a
    /// rebalance of the others. An empty member id with an instance id removes that static
    /// member (the admin form of the request). One result per member, in order.
    pub async fn leave(
        &self,
        group_id: &str,
        members: Vec<(String, Option<String>)>,
    ) -> Vec<Result<(), GroupError>> {
        if let Err(error) = self.check_open().and_then(|()| check_group_id(group_id)) {
            return vec![Err(error); members.len()];
        }
        let now = Instant::now();
        let mut groups = self.groups.borrow_mut();
        let Some(group) = groups.get_mut(group_id) else {
            return vec![Err(GroupError::UnknownMemberId); members.len()];
        };
        let results = members
            .iter()
            .map(|(member_id, instance_id)| group.leave(member_id, instance_id.as_deref(), now, &self.config))
            .collect();
        self.after_change(&mut groups, group_id);
        results
    }

    /// OffsetCommit. Returns one result per requested partition, in order; the accepted ones are
    /// durable in the offsets log when this returns `Ok` for them.
    pub async fn commit_offsets(
        &self,
        request: CommitRequest,
    ) -> Vec<((String, i32), Result<(), GroupError>)> {
        let group_check = self.check_commit(&request);
        let commit_timestamp_ms = unix_time_ms();
        let mut results = Vec::with_capacity(request.offsets.len());
        let mut accepted = Vec::new();
        let mut entries = Vec::new();
        for (topic, partition, offset, leader_epoch, metadata) in request.offsets {
            let check = group_check
                .clone()
                .and_then(|()| self.check_partition(&topic, partition, metadata.as_deref()));
            if check.is_ok() {
                accepted.push(results.len());
                let committed =
                    CommittedOffset { offset, leader_epoch, metadata, commit_timestamp_ms, log_end: 0 };
                entries.push((topic.clone(), partition, committed));
            }
            results.push(((topic, partition), check));
        }
        if entries.is_empty() {
            return results;
        }
        let outcome = self.append_commit(request.group_id, entries).await;
        for index in accepted {
            results[index].1 = outcome.clone();
        }
        results
    }

    fn check_commit(&self, request: &CommitRequest) -> Result<(), GroupError> {
        self.check_open()?;
        // Kafka accepts the empty group id for offsets, for old clients.
        if request.group_id.len() > GROUP_ID_BYTES_MAX {
            return Err(GroupError::InvalidGroupId);
        }
        let mut groups = self.groups.borrow_mut();
        let standalone = request.member_id.is_empty() && request.group_instance_id.is_none();
        match groups.get_mut(&request.group_id) {
            Some(group) => group.check_commit(request, Instant::now()),
            None if request.generation_id < 0 && standalone => Ok(()),
            None if request.generation_id < 0 => Err(GroupError::UnknownMemberId),
            None => Err(GroupError::IllegalGeneration),
        }
    }

    fn check_partition(&self, topic: &str, partition: i32, metadata: Option<&str>) -> Result<(), GroupError> {
        if partition < 0 || topics::validate_topic_name(topic).is_err() {
            return Err(GroupError::UnknownTopicOrPartition);
        }
        if metadata.is_some_and(|m| m.len() > self.config.offset_metadata_bytes_max) {
            return Err(GroupError::OffsetMetadataTooLarge);
        }
        Ok(())
    }

    /// Appends one batch with `entries` and waits until the flusher made it durable (and
    /// applied it), or, replicated, until the partition committed it (then applies it).
    async fn append_commit(
        &self,
        group_id: String,
        entries: Vec<(String, i32, CommittedOffset)>,
    ) -> Result<(), GroupError> {
        let bytes = encode_commit_batch(&group_id, &entries, unix_time_ms());
        let log = match &self.store {
            OffsetsStore::Local(log) => log,
            OffsetsStore::Replicated(_) => {
                // In a task of its own, so that a commit is applied once committed even if
                // the request waiting for it goes away.
                let me = self.me.upgrade().expect("a coordinator in use is alive");
                let commit = glommio::spawn_local(me.commit_replicated(group_id, entries, bytes)).detach();
                return commit.await.unwrap_or(Err(GroupError::CoordinatorNotAvailable));
            }
        };
        // Checked before it is written, as every batch a log takes.
        let headers = batch::parse_all(&bytes).expect("the batch this module built is well formed");
        let appended =
            log.append(Bytes::from(bytes), &headers).map_err(|e| GroupError::Storage(e.to_string()))?;
        let next_offset = appended.next_offset;
        self.unflushed_commits.borrow_mut().push_back(UnflushedCommit { next_offset, group_id, entries });
        self.flusher_wake.notify();
        loop {
            if log.durable_offset() >= next_offset {
                return Ok(());
            }
            if let Some(reason) = log.stopped() {
                return Err(GroupError::Storage(reason));
            }
            self.flushed.listen().await;
        }
    }

    /// Appends one commit batch through the replicated log's leader and applies it once
    /// committed; starts a compaction once enough was written since the last.
    async fn commit_replicated(
        self: Rc<Self>,
        group_id: String,
        entries: Vec<(String, i32, CommittedOffset)>,
        bytes: Vec<u8>,
    ) -> Result<(), GroupError> {
        let OffsetsStore::Replicated(append) = &self.store else { unreachable!("a replicated store") };
        // A snapshot under way must hold every commit the log has before it: commits wait.
        while self.compacting.get() {
            self.commit_or_compaction_done.listen().await;
        }
        self.check_open()?;
        let written = bytes.len() as u64;
        self.commits_in_flight.set(self.commits_in_flight.get() + 1);
        let appended = append(Bytes::from(bytes)).await;
        self.commits_in_flight.set(self.commits_in_flight.get() - 1);
        self.commit_or_compaction_done.notify();
        let (_, log_end) = appended?;
        {
            // Commits of one coordinator complete in any order; within a partition the later
            // one in the log wins, as at replay.
            let mut groups = self.groups.borrow_mut();
            let group = groups.entry(group_id.clone()).or_insert_with(|| Group::new(group_id));
            for (topic, partition, committed) in entries {
                group.apply_offset(topic, partition, CommittedOffset { log_end, ..committed });
            }
        }
        self.written_since_snapshot.set(self.written_since_snapshot.get() + written);
        if self.written_since_snapshot.get() >= self.config.offsets_compact_growth_bytes {
            self.start_compaction();
        }
        Ok(())
    }

    /// Starts a compaction unless one is under way: a local log's in its flusher, a
    /// replicated one's in a task of its own.
    fn start_compaction(&self) {
        match &self.store {
            OffsetsStore::Local(_) => {
                self.compact_requested.set(true);
                self.flusher_wake.notify();
            }
            OffsetsStore::Replicated(_) => {
                if !self.compacting.replace(true) {
                    let me = self.me.upgrade().expect("a coordinator's tasks hold it");
                    glommio::spawn_local(me.compact_replicated()).detach();
                }
            }
        }
    }

    /// Compaction of a replicated offsets log: with commits held back and none in flight,
    /// every committed offset is appended again (the snapshot, from offset S), then a marker
    /// batch saying the snapshot from S is complete. Once the marker is committed every
    /// replica may delete its segments below S (`Replica::apply_retention`): everything they
    /// hold is in the snapshot or after it. A leadership lost part way leaves the old
    /// records and part of a snapshot, or a snapshot without its marker: replay (later
    /// records win) gives the same offsets, and nothing is cut.
    async fn compact_replicated(self: Rc<Self>) {
        assert!(self.compacting.get(), "set by the commit that started it");
        let result = self.write_snapshot().await;
        self.compacting.set(false);
        self.commit_or_compaction_done.notify();
        match result {
            Ok(()) | Err(GroupError::NotCoordinator) => {}
            Err(error) => eprintln!("pyralog: compacting a replicated offsets log failed: {error}"),
        }
    }

    async fn write_snapshot(&self) -> Result<(), GroupError> {
        let OffsetsStore::Replicated(append) = &self.store else { unreachable!("a replicated store") };
        while self.commits_in_flight.get() > 0 {
            self.commit_or_compaction_done.listen().await;
        }
        self.check_open()?;
        self.expire_offsets();
        let now_ms = unix_time_ms();
        let mut snapshot_start = None;
        for bytes in snapshot_batches(self.committed_state(), now_ms) {
            let (first, _) = append(Bytes::from(bytes)).await?;
            snapshot_start.get_or_insert(first);
        }
        assert_eq!(
            self.commits_in_flight.get(),
            0,
            "no commit is proposed between a snapshot and its marker"
        );
        // An empty snapshot (every offset expired) starts at its marker.
        let marker = encode_snapshot_marker(snapshot_start.unwrap_or(SNAPSHOT_AT_MARKER), now_ms);
        append(Bytes::from(marker)).await?;
        self.written_since_snapshot.set(0);
        Ok(())
    }

    /// Drops the committed offsets retention lets go (Kafka's offsets.retention.minutes, as
    /// KIP-211 counts it): those of a group that has had no member for the retention period,
    /// committed longer ago than that. Groups left with nothing are forgotten. Runs before a
    /// compaction's snapshot, which then leaves them out.
    fn expire_offsets(&self) {
        let cutoff_ms = self.retention_cutoff_ms();
        let mut groups = self.groups.borrow_mut();
        for group in groups.values_mut().filter(|group| group.is_empty_since(cutoff_ms)) {
            group.offsets.retain(|_, committed| committed.commit_timestamp_ms >= cutoff_ms);
        }
        groups.retain(|_, group| !group.is_unused());
    }

    /// Whether [`GroupCoordinator::expire_offsets`] would drop any offset now.
    fn has_expiring_offsets(&self) -> bool {
        let cutoff_ms = self.retention_cutoff_ms();
        self.groups
            .borrow()
            .values()
            .filter(|group| group.is_empty_since(cutoff_ms))
            .any(|group| group.offsets.values().any(|committed| committed.commit_timestamp_ms < cutoff_ms))
    }

    /// The retention's cut-off, in ms since the epoch: a group empty since then loses the
    /// offsets committed before it.
    fn retention_cutoff_ms(&self) -> i64 {
        let retention = self.config.offsets_retention;
        unix_time_ms().saturating_sub(i64::try_from(retention.as_millis()).unwrap_or(i64::MAX))
    }

    /// Every group's applied committed offsets.
    fn committed_state(&self) -> BTreeMap<String, BTreeMap<(String, i32), CommittedOffset>> {
        let mut state: BTreeMap<String, BTreeMap<(String, i32), CommittedOffset>> = BTreeMap::new();
        for (group_id, group) in self.groups.borrow().iter() {
            let offsets = state.entry(group_id.clone()).or_default();
            for (key, committed) in &group.offsets {
                offsets.insert(key.clone(), committed.clone());
            }
        }
        state
    }

    /// OffsetFetch: the committed offsets of `partitions`, or of every partition the group
    /// committed when `None`. A partition without a commit gets offset -1 and leader epoch -1.
    pub fn fetch_offsets(
        &self,
        group_id: &str,
        partitions: Option<Vec<(String, i32)>>,
    ) -> Vec<CommittedPartition> {
        let groups = self.groups.borrow();
        let offsets = groups.get(group_id).map(|g| &g.offsets);
        let row = |topic: String, partition: i32, committed: Option<&CommittedOffset>| match committed {
            Some(c) => (topic, partition, c.offset, c.leader_epoch, c.metadata.clone()),
            None => (topic, partition, -1, -1, None),
        };
        match partitions {
            Some(partitions) => partitions
                .into_iter()
                .map(|(topic, partition)| {
                    let committed = offsets.and_then(|o| o.get(&(topic.clone(), partition)));
                    row(topic, partition, committed)
                })
                .collect(),
            None => offsets
                .into_iter()
                .flatten()
                .map(|((topic, partition), committed)| row(topic.clone(), *partition, Some(committed)))
                .collect(),
        }
    }

    /// ListGroups: (group id, protocol type, state) of every group, by group id.
    pub fn list_groups(&self) -> Vec<(String, String, String)> {
        let groups = self.groups.borrow();
        let mut list: Vec<(String, String, String)> = groups
            .values()
            .filter(|g| g.state != GroupState::Dead)
            .map(|g| {
                let protocol_type = g.protocol_type.clone().unwrap_or_default();
                (g.group_id.clone(), protocol_type, g.state.kafka_name().to_owned())
            })
            .collect();
        list.sort();
        list
    }

    /// DescribeGroups for one group; an unknown group is described as `Dead`, as Kafka does.
    pub fn describe_group(&self, group_id: &str) -> GroupDescription {
        match self.groups.borrow().get(group_id) {
            Some(group) => group.describe(),
            None => GroupDescription {
                group_id: group_id.to_owned(),
                state: GroupState::Dead.kafka_name().to_owned(),
                protocol_type: String::new(),
                protocol_name: String::new(),
                members: Vec::new(),
            },
        }
    }

    /// Stops the timers, answers every parked join and sync with `CoordinatorNotAvailable`,
    /// flushes what was committed and closes the offsets log. Later requests get
    /// `CoordinatorNotAvailable`; reads of committed offsets keep working.
    pub async fn close(&self) {
        self.close_as(GroupError::CoordinatorNotAvailable).await;
    }

    /// [`GroupCoordinator::close`], answering parked and later requests with `error`: a
    /// replicated coordinator whose node stopped leading says `NotCoordinator`, and its
    /// members rejoin at the new leader (membership is not replicated, as in Kafka).
    pub async fn close_as(&self, error: GroupError) {
        if self.closing.replace(true) {
            return;
        }
        *self.closed_error.borrow_mut() = error.clone();
        self.flusher_wake.notify();
        self.sweeper_wake.notify();
        while self.flusher_running.get() || self.sweeper_running.get() {
            self.task_stopped.listen().await;
        }
        for group in self.groups.borrow_mut().values_mut() {
            group.shut_down(error.clone());
        }
        if let OffsetsStore::Local(log) = &self.store {
            if let Err(error) = log.close().await {
                eprintln!("pyralog: closing the group offsets log {}: {error}", log.dir().display());
            }
        }
    }

    fn check_open(&self) -> Result<(), GroupError> {
        if self.closing.get() {
            return Err(self.closed_error.borrow().clone());
        }
        Ok(())
    }

    /// Kafka's form, `<client or instance id>-<uuid>`, from the process nonce and a counter.
    fn new_member_id(&self, prefix: &str) -> String {
        let count = self.member_id_count.get();
        self.member_id_count.set(count + 1);
        let nonce = self.member_id_nonce;
        format!(
            "{prefix}-{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
            nonce >> 32,
            (nonce >> 16) & 0xffff,
            nonce & 0xffff,
            (count >> 48) & 0xffff,
            count & 0xffff_ffff_ffff
        )
    }

    /// After a request changed a group: forget it if nothing is left of it, else make sure the
    /// sweeper wakes up for its next deadline.
    fn after_change(&self, groups: &mut HashMap<String, Group>, group_id: &str) {
        let Some(group) = groups.get(group_id) else { return };
        if group.is_unused() {
            groups.remove(group_id);
            return;
        }
        if let Some(deadline) = group.next_deadline(&self.config) {
            if deadline < self.next_sweep.get() {
                self.next_sweep.set(deadline);
                self.sweeper_wake.notify();
            }
        }
    }

    /// The only caller of `Log::flush`: flushes whatever commits are pending, applies them to
    /// the groups once durable, and wakes their requests.
    async fn run_flusher(self: Rc<Self>) {
        assert!(self.flusher_running.get(), "flusher_running is set before the flusher is spawned");
        loop {
            if !self.local_log().has_pending() && !self.compact_requested.get() {
                if self.closing.get() {
                    break;
                }
                self.flusher_wake.listen().await;
                continue;
            }
            match self.local_log().flush().await {
                Ok(durable) => {
                    self.apply_durable_commits(durable);
                    let grown = self.local_log().size_bytes()
                        >= self.compacted_bytes.get() + self.config.offsets_compact_growth_bytes;
                    if self.compact_requested.replace(false) || grown {
                        if let Err(error) = self.compact().await {
                            eprintln!(
                                "pyralog: the group offsets log {} stopped taking writes: {error}",
                                self.local_log().dir().display()
                            );
                            self.unflushed_commits.borrow_mut().clear();
                        }
                    }
                }
                Err(error) => {
                    eprintln!(
                        "pyralog: the group offsets log {} stopped taking writes: {error}",
                        self.local_log().dir().display()
                    );
                    self.unflushed_commits.borrow_mut().clear();
                }
            }
            self.flushed.notify();
        }
        self.flusher_running.set(false);
        self.task_stopped.notify();
    }

    /// Compaction, run by the flusher: appends every committed offset again (including the
    /// commits appended but not yet durable, so nothing before the snapshot is needed any
    /// more), makes it durable, then deletes the segments that end before it. A crash at any
    /// point leaves either the old records, or the old records and the snapshot: replay
    /// (later records win) gives the same offsets either way.
    async fn compact(&self) -> Result<(), pyralog_dma::LogError> {
        self.expire_offsets();
        let mut state = self.committed_state();
        for commit in self.unflushed_commits.borrow().iter() {
            let offsets = state.entry(commit.group_id.clone()).or_default();
            for (topic, partition, committed) in &commit.entries {
                offsets.insert((topic.clone(), *partition), committed.clone());
            }
        }
        let snapshot_start = self.local_log().next_offset();
        let now_ms = unix_time_ms();
        // The marker lets a replay after a crash before the deletion below drop what the
        // snapshot left out (expired offsets), as a replicated log's replay does.
        let marker = encode_snapshot_marker(snapshot_start, now_ms);
        for bytes in snapshot_batches(state, now_ms).into_iter().chain([marker]) {
            let headers = batch::parse_all(&bytes).expect("the batch this module built is well formed");
            self.local_log().append(Bytes::from(bytes), &headers)?;
        }
        let durable = self.local_log().flush().await?;
        self.apply_durable_commits(durable);
        self.local_log().remove_segments_before(snapshot_start)?;
        self.compacted_bytes.set(self.local_log().size_bytes());
        Ok(())
    }

    fn apply_durable_commits(&self, durable_offset: i64) {
        let mut unflushed = self.unflushed_commits.borrow_mut();
        let mut groups = self.groups.borrow_mut();
        while unflushed.front().is_some_and(|c| c.next_offset <= durable_offset) {
            let commit = unflushed.pop_front().expect("front checked above");
            let group =
                groups.entry(commit.group_id.clone()).or_insert_with(|| Group::new(commit.group_id.clone()));
            for (topic, partition, committed) in commit.entries {
                group.apply_offset(
                    topic,
                    partition,
                    CommittedOffset { log_end: commit.next_offset, ..committed },
                );
            }
        }
    }

    /// Sleeps until the earliest deadline of any group, expires what is due, and repeats;
    /// every `offsets_retention_check_interval`, starts a compaction if retention lets any
    /// offset go.
    async fn run_sweeper(self: Rc<Self>) {
        assert!(self.sweeper_running.get(), "sweeper_running is set before the sweeper is spawned");
        while !self.closing.get() {
            let now = Instant::now();
            let next = self.sweep(now);
            if now >= self.next_retention_check.get() {
                self.next_retention_check.set(now + self.config.offsets_retention_check_interval);
                if self.has_expiring_offsets() {
                    self.start_compaction();
                }
            }
            let next =
                next.map_or(self.next_retention_check.get(), |d| d.min(self.next_retention_check.get()));
            let wake_at = next.clamp(now + SWEEP_RESOLUTION, now + SWEEP_IDLE_MAX);
            self.next_sweep.set(wake_at);
            futures_lite::future::or(self.sweeper_wake.listen(), glommio::timer::sleep(wake_at - now)).await;
        }
        self.sweeper_running.set(false);
        self.task_stopped.notify();
    }

    /// Expires what is due at `now` in every group and returns the next deadline of any.
    fn sweep(&self, now: Instant) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        self.groups.borrow_mut().retain(|_, group| {
            group.expire(now, &self.config);
            // A deadline already due (a zero timeout) is taken up by the next sweep.
            if let Some(deadline) = group.next_deadline(&self.config) {
                next = Some(next.map_or(deadline, |n| n.min(deadline)));
            }
            !group.is_unused()
        });
        next
    }
}

fn check_group_id(group_id: &str) -> Result<(), GroupError> {
    if group_id.is_empty() || group_id.len() > GROUP_ID_BYTES_MAX {
        return Err(GroupError::InvalidGroupId);
    }
    Ok(())
}

fn unix_time_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

fn member_id_nonce() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    // RandomState's keys come from the OS's randomness: a new nonce in every process.
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
    hasher.finish()
}

/// An answer a parked request waits for, sent once by the state machine.
struct Reply<T> {
    value: RefCell<Option<T>>,
    ready: Event,
}

impl<T> Reply<T> {
    fn new() -> Rc<Reply<T>> {
        Rc::new(Reply { value: RefCell::new(None), ready: Event::default() })
    }

    fn send(&self, value: T) {
        let previous = self.value.borrow_mut().replace(value);
        assert!(previous.is_none(), "a reply is sent once");
        self.ready.notify();
    }

    async fn wait(&self) -> T {
        loop {
            if let Some(value) = self.value.borrow_mut().take() {
                return value;
            }
            self.ready.listen().await;
        }
    }
}

/// How a request that may park continues: answered now, or when the reply is sent.
enum Step<T> {
    Done(T),
    Wait(Rc<Reply<Result<T, GroupError>>>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GroupState {
    Empty,
    PreparingRebalance,
    CompletingRebalance,
    Stable,
    Dead,
}

impl GroupState {
    fn kafka_name(self) -> &'static str {
        match self {
            GroupState::Empty => "Empty",
            GroupState::PreparingRebalance => "PreparingRebalance",
            GroupState::CompletingRebalance => "CompletingRebalance",
            GroupState::Stable => "Stable",
            GroupState::Dead => "Dead",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct CommittedOffset {
    offset: i64,
    leader_epoch: i32,
    metadata: Option<String>,
    commit_timestamp_ms: i64,
    /// The offsets log's offset after the batch that holds it (memory only, never encoded):
    /// of two commits of one partition, the later in the log wins.
    log_end: i64,
}

struct Member {
    member_id: String,
    group_instance_id: Option<String>,
    client_id: String,
    client_host: String,
    protocol_type: String,
    protocols: Vec<(String, Bytes)>,
    session_timeout: Duration,
    rebalance_timeout: Duration,
    assignment: Bytes,
    last_heartbeat: Instant,
    /// Its first join has not completed yet.
    is_new: bool,
    /// Its JoinGroup is parked: it has (re)joined in this join phase.
    join_reply: Option<Rc<Reply<JoinResult>>>,
    /// Its SyncGroup is parked, waiting for the leader's.
    sync_reply: Option<Rc<Reply<SyncResult>>>,
}

impl Member {
    fn new(member_id: String, request: &JoinRequest, now: Instant) -> Member {
        Member {
            member_id,
            group_instance_id: request.group_instance_id.clone(),
            client_id: request.client_id.clone(),
            client_host: request.client_host.clone(),
            protocol_type: request.protocol_type.clone(),
            protocols: request.protocols.clone(),
            session_timeout: request.session_timeout,
            rebalance_timeout: request.rebalance_timeout,
            assignment: Bytes::new(),
            last_heartbeat: now,
            is_new: true,
            join_reply: None,
            sync_reply: None,
        }
    }

    /// Takes the join's protocols, timeouts and client, and parks a new JoinGroup.
    fn rejoin(&mut self, request: &JoinRequest, now: Instant) -> Rc<Reply<JoinResult>> {
        self.protocols = request.protocols.clone();
        self.session_timeout = request.session_timeout;
        self.rebalance_timeout = request.rebalance_timeout;
        self.client_id = request.client_id.clone();
        self.client_host = request.client_host.clone();
        self.last_heartbeat = now;
        let reply = Reply::new();
        // A client that sends a second JoinGroup has given up on the first.
        if let Some(superseded) = self.join_reply.replace(Rc::clone(&reply)) {
            superseded.send(Err(GroupError::RebalanceInProgress));
        }
        reply
    }

    fn metadata(&self, protocol: &str) -> Bytes {
        self.protocols.iter().find(|(name, _)| name == protocol).map(|(_, m)| m.clone()).unwrap_or_default()
    }

    fn supports(&self, protocol: &str) -> bool {
        self.protocols.iter().any(|(name, _)| name == protocol)
    }

    fn reply_join(&mut self, result: JoinResult) {
        if let Some(reply) = self.join_reply.take() {
            reply.send(result);
        }
    }

    fn reply_sync(&mut self, result: SyncResult) {
        if let Some(reply) = self.sync_reply.take() {
            reply.send(result);
        }
    }

    /// When the member is removed unless it is heard from; `None` while its session is not
    /// running (parked in a join after its first, or in a sync).
    fn expiry(&self, config: &GroupConfig) -> Option<Instant> {
        if self.join_reply.is_some() {
            self.is_new.then(|| self.last_heartbeat + config.new_member_join_timeout)
        } else if self.sync_reply.is_some() {
            None
        } else {
            Some(self.last_heartbeat + self.session_timeout)
        }
    }
}

struct Group {
    group_id: String,
    state: GroupState,
    generation_id: i32,
    protocol_type: Option<String>,
    protocol_name: Option<String>,
    leader_id: Option<String>,
    members: BTreeMap<String, Member>,
    /// group instance id → member id of the static members.
    static_members: HashMap<String, String>,
    /// Member ids handed out with `MemberIdRequired`, with the deadline of their second join.
    pending_members: HashMap<String, Instant>,
    /// Members that got the current generation's JoinGroup answer and owe a SyncGroup.
    pending_sync: HashSet<String>,
    join_deadline: Option<Instant>,
    sync_deadline: Option<Instant>,
    /// While an empty group's first join phase is delayed: how much the delay may still grow.
    initial_delay_left: Option<Duration>,
    new_member_added: bool,
    offsets: BTreeMap<(String, i32), CommittedOffset>,
    /// When its last member left, in ms since the epoch (a group created without members:
    /// its creation; one loaded from the log: its latest commit, which its members made or
    /// the group was already empty): offsets retention counts from here.
    emptied_at_ms: i64,
}

impl Group {
    fn new(group_id: String) -> Group {
        Group {
            group_id,
            state: GroupState::Empty,
            generation_id: 0,
            protocol_type: None,
            protocol_name: None,
            leader_id: None,
            members: BTreeMap::new(),
            static_members: HashMap::new(),
            pending_members: HashMap::new(),
            pending_sync: HashSet::new(),
            join_deadline: None,
            sync_deadline: None,
            initial_delay_left: None,
            new_member_added: false,
            offsets: BTreeMap::new(),
            emptied_at_ms: unix_time_ms(),
        }
    }

    /// Whether the group has had no member since `cutoff_ms` (ms since the epoch): offsets
    /// retention may drop its offsets committed before then.
    fn is_empty_since(&self, cutoff_ms: i64) -> bool {
        self.members.is_empty() && self.emptied_at_ms <= cutoff_ms
    }

    /// Nothing to remember: no members, no member ids handed out, no offsets.
    fn is_unused(&self) -> bool {
        self.state == GroupState::Empty
            && self.members.is_empty()
            && self.pending_members.is_empty()
            && self.offsets.is_empty()
    }

    fn next_deadline(&self, config: &GroupConfig) -> Option<Instant> {
        let join = self.join_deadline.filter(|_| self.state == GroupState::PreparingRebalance);
        self.pending_members
            .values()
            .copied()
            .chain(self.members.values().filter_map(|m| m.expiry(config)))
            .chain(join)
            .chain(self.sync_deadline)
            .min()
    }

    /// The largest rebalance timeout of the members: how long a join or sync phase may last.
    fn rebalance_timeout(&self) -> Duration {
        self.members.values().map(|m| m.rebalance_timeout).max().unwrap_or_default()
    }

    fn all_members_joined(&self) -> bool {
        self.pending_members.is_empty() && self.members.values().all(|m| m.join_reply.is_some())
    }

    /// Whether a member with these protocols may join: the same protocol type as the group, and
    /// at least one protocol every other member supports. `member_id` is left out of the count.
    fn supports_protocols(
        &self,
        member_id: &str,
        protocol_type: &str,
        protocols: &[(String, Bytes)],
    ) -> bool {
        let mut others = self.members.values().filter(|m| m.member_id != member_id).peekable();
        if others.peek().is_none() {
            return !protocol_type.is_empty() && !protocols.is_empty();
        }
        if self.protocol_type.as_deref() != Some(protocol_type) {
            return false;
        }
        let others: Vec<&Member> = others.collect();
        protocols.iter().any(|(name, _)| others.iter().all(|m| m.supports(name)))
    }

    /// The protocol every member supports that most members list first among those. Ties go
    /// to the one the leader prefers.
    fn select_protocol(&self) -> String {
        let leader = self.leader_id.as_ref().and_then(|id| self.members.get(id));
        let leader = leader.or_else(|| self.members.values().next()).expect("a group with members");
        let candidates: Vec<&str> = leader
            .protocols
            .iter()
            .map(|(name, _)| name.as_str())
            .filter(|name| self.members.values().all(|m| m.supports(name)))
            .collect();
        assert!(!candidates.is_empty(), "joins keep a protocol that every member supports");
        let mut votes = vec![0usize; candidates.len()];
        for member in self.members.values() {
            let choice =
                member.protocols.iter().find_map(|(name, _)| candidates.iter().position(|c| c == name));
            votes[choice.expect("every member supports every candidate")] += 1;
        }
        let most = *votes.iter().max().expect("candidates are not empty");
        let winner = votes.iter().position(|&v| v == most).expect("the maximum is in the list");
        candidates[winner].to_owned()
    }

    /// The answer to a completed join of `member_id` in the current generation.
    fn joined(&self, member_id: &str) -> Joined {
        let protocol_name = self.protocol_name.clone().unwrap_or_default();
        let is_leader = self.leader_id.as_deref() == Some(member_id);
        let members = if is_leader {
            let member_metadata =
                |m: &Member| (m.member_id.clone(), m.group_instance_id.clone(), m.metadata(&protocol_name));
            self.members.values().map(member_metadata).collect()
        } else {
            Vec::new()
        };
        Joined {
            generation_id: self.generation_id,
            protocol_type: self.protocol_type.clone().unwrap_or_default(),
            protocol_name,
            leader_id: self.leader_id.clone().unwrap_or_default(),
            member_id: member_id.to_owned(),
            members,
        }
    }

    /// Kafka's `validateCurrentMember`: the instance id, if any, must map to `member_id`, and
    /// `member_id` must be a member.
    fn check_member(&self, member_id: &str, group_instance_id: Option<&str>) -> Result<(), GroupError> {
        if let Some(instance_id) = group_instance_id {
            match self.static_members.get(instance_id) {
                Some(current) if current != member_id => return Err(GroupError::FencedInstanceId),
                Some(_) => {}
                None => return Err(GroupError::UnknownMemberId),
            }
        }
        if !self.members.contains_key(member_id) {
            return Err(GroupError::UnknownMemberId);
        }
        Ok(())
    }

    fn join(
        &mut self,
        request: &JoinRequest,
        new_member_id: Option<String>,
        now: Instant,
        config: &GroupConfig,
    ) -> Result<Step<Joined>, GroupError> {
        assert_ne!(self.state, GroupState::Dead, "a closed coordinator takes no joins");
        let step = match new_member_id {
            Some(member_id) => self.join_new_member(request, member_id, now, config),
            None => self.join_known_member(request, now, config),
        };
        self.try_complete_join(now);
        step
    }

    fn join_new_member(
        &mut self,
        request: &JoinRequest,
        new_member_id: String,
        now: Instant,
        config: &GroupConfig,
    ) -> Result<Step<Joined>, GroupError> {
        assert!(request.member_id.is_empty(), "a new member has no member id yet");
        let replaced = request.group_instance_id.as_ref().and_then(|i| self.static_members.get(i)).cloned();
        let excluded = replaced.as_deref().unwrap_or("");
        if !self.supports_protocols(excluded, &request.protocol_type, &request.protocols) {
            return Err(GroupError::InconsistentGroupProtocol);
        }
        if let Some(old_member_id) = replaced {
            return Ok(self.replace_static_member(&old_member_id, new_member_id, request, now, config));
        }
        if self.members.len() + self.pending_members.len() >= config.members_per_group_max {
            return Err(GroupError::GroupMaxSizeReached);
        }
        if request.group_instance_id.is_none() && request.require_known_member_id {
            self.pending_members.insert(new_member_id.clone(), now + request.session_timeout);
            return Err(GroupError::MemberIdRequired(new_member_id));
        }
        Ok(Step::Wait(self.add_member(Member::new(new_member_id, request, now), request, now, config)))
    }

    fn join_known_member(
        &mut self,
        request: &JoinRequest,
        now: Instant,
        config: &GroupConfig,
    ) -> Result<Step<Joined>, GroupError> {
        let member_id = &request.member_id;
        if !self.supports_protocols(member_id, &request.protocol_type, &request.protocols) {
            return Err(GroupError::InconsistentGroupProtocol);
        }
        if self.pending_members.contains_key(member_id) {
            if request.group_instance_id.is_some() {
                // Pending member ids are only handed to dynamic members.
                return Err(GroupError::UnknownMemberId);
            }
            let member = Member::new(member_id.clone(), request, now);
            return Ok(Step::Wait(self.add_member(member, request, now, config)));
        }
        self.check_member(member_id, request.group_instance_id.as_deref())?;
        let is_leader = self.leader_id.as_ref() == Some(member_id);
        let member = self.members.get_mut(member_id).expect("check_member found it");
        let unchanged = member.protocols == request.protocols;
        match self.state {
            // The member lost the answer to its join, or (a follower of a Stable group) only
            // wants to sync again: the current generation stands. A leader that rejoins a
            // Stable group may need a new assignment (its topics changed): that rebalances.
            GroupState::CompletingRebalance if unchanged => {
                member.last_heartbeat = now;
                Ok(Step::Done(self.joined(member_id)))
            }
            GroupState::Stable if unchanged && !is_leader => {
                member.last_heartbeat = now;
                Ok(Step::Done(self.joined(member_id)))
            }
            GroupState::PreparingRebalance | GroupState::CompletingRebalance | GroupState::Stable => {
                let reply = member.rejoin(request, now);
                self.maybe_prepare_rebalance(now, config);
                Ok(Step::Wait(reply))
            }
            GroupState::Empty | GroupState::Dead => Err(GroupError::UnknownMemberId),
        }
    }

    /// A static member came back with a new member id: it takes the old member's place. See
    /// the module docs.
    fn replace_static_member(
        &mut self,
        old_member_id: &str,
        new_member_id: String,
        request: &JoinRequest,
        now: Instant,
        config: &GroupConfig,
    ) -> Step<Joined> {
        let previous_leader = self.leader_id.clone().unwrap_or_default();
        let mut member = self.members.remove(old_member_id).expect("static members are members");
        member.reply_join(Err(GroupError::FencedInstanceId));
        member.reply_sync(Err(GroupError::FencedInstanceId));
        member.member_id = new_member_id.clone();
        let reply = member.rejoin(request, now);
        if self.leader_id.as_deref() == Some(old_member_id) {
            self.leader_id = Some(new_member_id.clone());
        }
        if self.pending_sync.remove(old_member_id) {
            self.pending_sync.insert(new_member_id.clone());
        }
        let instance_id = member.group_instance_id.clone().expect("a static member has an instance id");
        self.static_members.insert(instance_id, new_member_id.clone());
        self.members.insert(new_member_id.clone(), member);
        match self.state {
            GroupState::Stable if self.protocol_name.as_deref() == Some(self.select_protocol().as_str()) => {
                let member = self.members.get_mut(&new_member_id).expect("inserted above");
                member.join_reply = None;
                // The old leader id, so that the current leader does not assign again: a
                // Stable group would not hand out a new assignment anyway.
                let joined =
                    Joined { leader_id: previous_leader, members: Vec::new(), ..self.joined(&new_member_id) };
                return Step::Done(joined);
            }
            GroupState::Stable | GroupState::CompletingRebalance => self.maybe_prepare_rebalance(now, config),
            GroupState::PreparingRebalance => {}
            GroupState::Empty | GroupState::Dead => unreachable!("a group with a static member has members"),
        }
        Step::Wait(reply)
    }

    /// Adds a member that joins now and starts (or joins) a rebalance.
    fn add_member(
        &mut self,
        mut member: Member,
        request: &JoinRequest,
        now: Instant,
        config: &GroupConfig,
    ) -> Rc<Reply<JoinResult>> {
        assert!(!self.members.contains_key(&member.member_id), "member ids are unique");
        let reply = member.rejoin(request, now);
        let member_id = member.member_id.clone();
        if self.members.is_empty() {
            self.protocol_type = Some(member.protocol_type.clone());
        }
        if self.leader_id.is_none() {
            self.leader_id = Some(member_id.clone());
        }
        if let Some(instance_id) = &member.group_instance_id {
            self.static_members.insert(instance_id.clone(), member_id.clone());
        }
        self.pending_members.remove(&member_id);
        if self.state == GroupState::PreparingRebalance && self.generation_id == 0 {
            self.new_member_added = true;
        }
        self.members.insert(member_id, member);
        self.maybe_prepare_rebalance(now, config);
        reply
    }

    /// Removes a member, answering its parked requests with `error`. Starts no rebalance.
    fn remove_member(&mut self, member_id: &str, error: GroupError) -> bool {
        let Some(mut member) = self.members.remove(member_id) else { return false };
        member.reply_join(Err(error.clone()));
        member.reply_sync(Err(error));
        if let Some(instance_id) = &member.group_instance_id {
            if self.static_members.get(instance_id).map(String::as_str) == Some(member_id) {
                self.static_members.remove(instance_id);
            }
        }
        if self.pending_sync.remove(member_id) && self.pending_sync.is_empty() {
            self.sync_deadline = None;
        }
        if self.leader_id.as_deref() == Some(member_id) {
            self.leader_id = self.members.keys().next().cloned();
        }
        if self.members.is_empty() {
            self.emptied_at_ms = unix_time_ms();
        }
        true
    }

    /// Removes a member that left or expired, and rebalances the others.
    fn remove_member_and_rebalance(&mut self, member_id: &str, now: Instant, config: &GroupConfig) {
        if !self.remove_member(member_id, GroupError::UnknownMemberId) {
            return;
        }
        match self.state {
            GroupState::Stable | GroupState::CompletingRebalance => self.maybe_prepare_rebalance(now, config),
            GroupState::PreparingRebalance => self.try_complete_join(now),
            GroupState::Empty | GroupState::Dead => {}
        }
    }

    fn maybe_prepare_rebalance(&mut self, now: Instant, config: &GroupConfig) {
        if matches!(self.state, GroupState::Stable | GroupState::CompletingRebalance | GroupState::Empty) {
            self.prepare_rebalance(now, config);
        }
    }

    /// Starts a join phase.
    fn prepare_rebalance(&mut self, now: Instant, config: &GroupConfig) {
        assert_ne!(self.state, GroupState::PreparingRebalance, "one join phase at a time");
        if self.state == GroupState::CompletingRebalance {
            // Members waiting for the leader's assignment rejoin instead.
            for member in self.members.values_mut() {
                member.assignment = Bytes::new();
                member.reply_sync(Err(GroupError::RebalanceInProgress));
            }
        }
        self.pending_sync.clear();
        self.sync_deadline = None;
        if self.state == GroupState::Empty {
            let delay = config.initial_rebalance_delay;
            self.initial_delay_left = Some(self.rebalance_timeout().saturating_sub(delay));
            self.new_member_added = false;
            self.join_deadline = Some(now + delay);
        } else {
            self.initial_delay_left = None;
            self.join_deadline = Some(now + self.rebalance_timeout());
        }
        self.state = GroupState::PreparingRebalance;
        self.try_complete_join(now);
    }

    /// Ends the join phase once every member rejoined (never during an initial delay).
    fn try_complete_join(&mut self, now: Instant) {
        if self.state == GroupState::PreparingRebalance
            && self.initial_delay_left.is_none()
            && self.all_members_joined()
        {
            self.complete_join(now);
        }
    }

    /// The join phase's deadline passed: extend an initial delay that saw newcomers, or end it.
    fn on_join_deadline(&mut self, now: Instant, config: &GroupConfig) {
        if let Some(left) = self.initial_delay_left {
            if self.new_member_added && !left.is_zero() {
                self.new_member_added = false;
                let delay = config.initial_rebalance_delay.min(left);
                self.initial_delay_left = Some(left - delay);
                self.join_deadline = Some(now + delay);
                return;
            }
        }
        self.complete_join(now);
    }

    /// Ends the join phase: drops dynamic members that did not rejoin, starts the next
    /// generation and answers every parked JoinGroup.
    fn complete_join(&mut self, now: Instant) {
        assert_eq!(self.state, GroupState::PreparingRebalance, "only a join phase completes");
        self.join_deadline = None;
        self.initial_delay_left = None;
        self.new_member_added = false;
        let absent: Vec<String> = self
            .members
            .values()
            .filter(|m| m.join_reply.is_none() && m.group_instance_id.is_none())
            .map(|m| m.member_id.clone())
            .collect();
        for member_id in absent {
            self.remove_member(&member_id, GroupError::UnknownMemberId);
        }
        if !self.elect_joined_leader() {
            // Only absent static members are left: wait for them (or their session's end).
            self.join_deadline = Some(now + self.rebalance_timeout());
            return;
        }
        self.generation_id += 1;
        if self.members.is_empty() {
            self.protocol_name = None;
            self.state = GroupState::Empty;
            return;
        }
        self.protocol_name = Some(self.select_protocol());
        self.state = GroupState::CompletingRebalance;
        let answers: Vec<Joined> = self.members.keys().map(|id| self.joined(id)).collect();
        for (member, joined) in self.members.values_mut().zip(answers) {
            member.reply_join(Ok(joined));
            member.last_heartbeat = now;
            member.is_new = false;
        }
        self.pending_sync = self.members.keys().cloned().collect();
        self.sync_deadline = Some(now + self.rebalance_timeout());
        assert!(self.members.values().all(|m| m.join_reply.is_none()), "every join is answered");
    }

    /// Makes sure the leader is a member that rejoined; false if no member rejoined but some
    /// are left.
    fn elect_joined_leader(&mut self) -> bool {
        let joined = |m: &Member| m.join_reply.is_some();
        if self.leader_id.as_ref().and_then(|id| self.members.get(id)).is_some_and(joined) {
            return true;
        }
        match self.members.values().find(|m| joined(m)) {
            Some(member) => {
                self.leader_id = Some(member.member_id.clone());
                true
            }
            None => self.members.is_empty(),
        }
    }

    fn sync(&mut self, request: &SyncRequest, now: Instant) -> Result<Step<Synced>, GroupError> {
        let member_id = &request.member_id;
        self.check_member(member_id, request.group_instance_id.as_deref())?;
        if request.generation_id != self.generation_id {
            return Err(GroupError::IllegalGeneration);
        }
        let type_differs =
            request.protocol_type.as_ref().is_some_and(|t| self.protocol_type.as_ref() != Some(t));
        let name_differs =
            request.protocol_name.as_ref().is_some_and(|n| self.protocol_name.as_ref() != Some(n));
        if type_differs || name_differs {
            return Err(GroupError::InconsistentGroupProtocol);
        }
        if self.pending_sync.remove(member_id) && self.pending_sync.is_empty() {
            self.sync_deadline = None;
        }
        let synced = Synced {
            protocol_type: self.protocol_type.clone().unwrap_or_default(),
            protocol_name: self.protocol_name.clone().unwrap_or_default(),
            assignment: Bytes::new(),
        };
        let member = self.members.get_mut(member_id).expect("check_member found it");
        member.last_heartbeat = now;
        match self.state {
            GroupState::PreparingRebalance => Err(GroupError::RebalanceInProgress),
            GroupState::Stable => Ok(Step::Done(Synced { assignment: member.assignment.clone(), ..synced })),
            GroupState::CompletingRebalance => {
                let reply = Reply::new();
                if let Some(superseded) = member.sync_reply.replace(Rc::clone(&reply)) {
                    superseded.send(Err(GroupError::RebalanceInProgress));
                }
                if self.leader_id.as_ref() == Some(member_id) {
                    self.set_assignment(&request.assignments, &synced);
                }
                Ok(Step::Wait(reply))
            }
            GroupState::Empty | GroupState::Dead => Err(GroupError::UnknownMemberId),
        }
    }

    /// The leader's assignment arrived: every member gets its part (empty if the leader left it
    /// out), parked SyncGroups are answered, and the group is Stable.
    fn set_assignment(&mut self, assignments: &[(String, Bytes)], synced: &Synced) {
        assert_eq!(self.state, GroupState::CompletingRebalance, "assignments come in CompletingRebalance");
        let by_member: HashMap<&str, &Bytes> = assignments.iter().map(|(id, a)| (id.as_str(), a)).collect();
        for member in self.members.values_mut() {
            member.assignment =
                by_member.get(member.member_id.as_str()).map(|a| (*a).clone()).unwrap_or_default();
            let assignment = member.assignment.clone();
            member.reply_sync(Ok(Synced { assignment, ..synced.clone() }));
        }
        self.state = GroupState::Stable;
        assert!(self.members.values().all(|m| m.sync_reply.is_none()), "every sync is answered");
    }

    fn heartbeat(
        &mut self,
        generation_id: i32,
        member_id: &str,
        group_instance_id: Option<&str>,
        now: Instant,
    ) -> Result<(), GroupError> {
        self.check_member(member_id, group_instance_id)?;
        if generation_id != self.generation_id {
            return Err(GroupError::IllegalGeneration);
        }
        self.members.get_mut(member_id).expect("check_member found it").last_heartbeat = now;
        match self.state {
            GroupState::CompletingRebalance | GroupState::Stable => Ok(()),
            GroupState::PreparingRebalance => Err(GroupError::RebalanceInProgress),
            GroupState::Empty | GroupState::Dead => Err(GroupError::UnknownMemberId),
        }
    }

    fn leave(
        &mut self,
        member_id: &str,
        group_instance_id: Option<&str>,
        now: Instant,
        config: &GroupConfig,
    ) -> Result<(), GroupError> {
        if member_id.is_empty() {
            let current = group_instance_id.and_then(|i| self.static_members.get(i)).cloned();
            let current = current.ok_or(GroupError::UnknownMemberId)?;
            self.remove_member_and_rebalance(&current, now, config);
            return Ok(());
        }
        if self.pending_members.remove(member_id).is_some() {
            self.try_complete_join(now);
            return Ok(());
        }
        self.check_member(member_id, group_instance_id)?;
        self.remove_member_and_rebalance(member_id, now, config);
        Ok(())
    }

    /// Kafka's `validateOffsetCommit`: members commit with their generation; anyone may commit
    /// with generation -1 while the group has no members.
    fn check_commit(&mut self, request: &CommitRequest, now: Instant) -> Result<(), GroupError> {
        let standalone =
            request.generation_id < 0 && request.member_id.is_empty() && request.group_instance_id.is_none();
        if standalone {
            if self.state != GroupState::Empty {
                return Err(GroupError::UnknownMemberId);
            }
        } else {
            self.check_member(&request.member_id, request.group_instance_id.as_deref())?;
            if request.generation_id != self.generation_id {
                return Err(GroupError::IllegalGeneration);
            }
        }
        match self.state {
            GroupState::Empty => Ok(()),
            // Members of a group in its join phase still commit what they consumed; their next
            // heartbeat tells them to rejoin.
            GroupState::PreparingRebalance | GroupState::Stable => {
                if let Some(member) = self.members.get_mut(&request.member_id) {
                    member.last_heartbeat = now;
                }
                Ok(())
            }
            GroupState::CompletingRebalance => Err(GroupError::RebalanceInProgress),
            GroupState::Dead => Err(GroupError::CoordinatorNotAvailable),
        }
    }

    /// Expires what is due at `now`: member ids handed out and never used, silent members,
    /// members that owe a SyncGroup, and the join phase.
    fn expire(&mut self, now: Instant, config: &GroupConfig) {
        let before = self.pending_members.len();
        self.pending_members.retain(|_, deadline| *deadline > now);
        if self.pending_members.len() != before {
            self.try_complete_join(now);
        }
        let expired: Vec<String> = self
            .members
            .values()
            .filter(|m| m.expiry(config).is_some_and(|deadline| deadline <= now))
            .map(|m| m.member_id.clone())
            .collect();
        for member_id in expired {
            self.remove_member_and_rebalance(&member_id, now, config);
        }
        if self.sync_deadline.is_some_and(|deadline| deadline <= now) {
            self.sync_deadline = None;
            let missing: Vec<String> = self.pending_sync.drain().collect();
            for member_id in &missing {
                self.remove_member(member_id, GroupError::UnknownMemberId);
            }
            if !missing.is_empty() && self.state != GroupState::PreparingRebalance {
                self.prepare_rebalance(now, config);
            }
        }
        if self.state == GroupState::PreparingRebalance && self.join_deadline.is_some_and(|d| d <= now) {
            self.on_join_deadline(now, config);
        }
    }

    fn describe(&self) -> GroupDescription {
        let stable = self.state == GroupState::Stable;
        let protocol_name =
            if stable { self.protocol_name.clone().unwrap_or_default() } else { String::new() };
        let members = self
            .members
            .values()
            .map(|m| MemberDescription {
                member_id: m.member_id.clone(),
                group_instance_id: m.group_instance_id.clone(),
                client_id: m.client_id.clone(),
                client_host: m.client_host.clone(),
                metadata: if stable { m.metadata(&protocol_name) } else { Bytes::new() },
                assignment: if stable { m.assignment.clone() } else { Bytes::new() },
            })
            .collect();
        GroupDescription {
            group_id: self.group_id.clone(),
            state: self.state.kafka_name().to_owned(),
            protocol_type: self.protocol_type.clone().unwrap_or_default(),
            protocol_name,
            members,
        }
    }

    /// Records a committed offset unless the group holds one from later in the log.
    fn apply_offset(&mut self, topic: String, partition: i32, committed: CommittedOffset) {
        let key = (topic, partition);
        if self.offsets.get(&key).is_none_or(|known| known.log_end <= committed.log_end) {
            self.offsets.insert(key, committed);
        }
    }

    /// The coordinator closes: parked requests are answered with `error` and the group is Dead.
    fn shut_down(&mut self, error: GroupError) {
        let member_ids: Vec<String> = self.members.keys().cloned().collect();
        for member_id in member_ids {
            self.remove_member(&member_id, error.clone());
        }
        self.pending_members.clear();
        self.pending_sync.clear();
        self.join_deadline = None;
        self.sync_deadline = None;
        self.state = GroupState::Dead;
    }
}

/// What a replay found: every group's committed offsets, the bytes of the batches read, and
/// the last compaction snapshot marked complete.
struct Replayed {
    groups: HashMap<String, Group>,
    bytes: u64,
    snapshot: Option<Snapshot>,
}

/// Reads the offsets log below `end_offset` (durable), later commits of a partition replacing
/// earlier ones. A replicated log also holds its leaders' control batches: `skip_control`.
/// A snapshot marker drops every offset written before its snapshot's start: the snapshot
/// holds every offset it kept (those it left out expired).
async fn replay(log: &Log, end_offset: i64, skip_control: bool) -> Result<Replayed, ShardError> {
    assert!(end_offset <= log.durable_offset(), "replay reads durable batches only");
    let mut groups: HashMap<String, Group> = HashMap::new();
    let mut replayed_bytes = 0u64;
    let mut snapshot = None;
    let mut offset = log.log_start_offset();
    while offset < end_offset {
        let Some(bytes) = log.read(offset, REPLAY_READ_BYTES).await? else { break };
        // Checked after reading as it was before writing.
        let headers = batch::parse_all(&bytes)?;
        let mut at = 0;
        for header in &headers {
            let end = at + header.total_bytes as usize;
            if header.next_offset() > end_offset {
                break;
            }
            if skip_control && header.attributes & ATTRIBUTES_CONTROL != 0 {
                at = end;
                continue;
            }
            replayed_bytes += u64::from(header.total_bytes);
            let records = decode_commit_batch(&bytes[at..end], header).map_err(|reason| {
                ShardError::Storage(format!(
                    "group offsets log {}: batch at offset {}: {reason}",
                    log.dir().display(),
                    header.base_offset
                ))
            })?;
            for record in records {
                let record = match record {
                    LogRecord::Commit(record) => record,
                    LogRecord::SnapshotStart(start) => {
                        let start = marker_start(start, header);
                        for group in groups.values_mut() {
                            group.offsets.retain(|_, committed| committed.log_end > start);
                        }
                        groups.retain(|_, group| !group.offsets.is_empty());
                        snapshot = Some(Snapshot { start, marker_end: header.next_offset() });
                        continue;
                    }
                };
                let group = groups
                    .entry(record.group_id.clone())
                    .or_insert_with(|| Group::new(record.group_id.clone()));
                let committed = CommittedOffset { log_end: header.next_offset(), ..record.committed };
                group.apply_offset(record.topic, record.partition, committed);
            }
            at = end;
        }
        let next = headers
            .iter()
            .map(|h| h.next_offset())
            .take_while(|&next| next <= end_offset)
            .last()
            .unwrap_or(end_offset);
        assert!(next > offset, "replay moves forward");
        offset = next;
    }
    for group in groups.values_mut() {
        let latest_commit = group.offsets.values().map(|c| c.commit_timestamp_ms).max();
        group.emptied_at_ms = latest_commit.unwrap_or(group.emptied_at_ms);
    }
    Ok(Replayed { groups, bytes: replayed_bytes, snapshot })
}

// Positions in the RecordBatch v2 header (see `pyralog_dma::batch`).
const CRC_AT: usize = 17;
const ATTRIBUTES_AT: usize = 21;
/// Attribute bits for a compression codec or a control batch: never set in the offsets log's
/// commit batches.
const ATTRIBUTES_UNEXPECTED: i16 = 0x07 | 0x20;
/// The control-batch bit: a replicated offsets log holds its leaders' control batches too.
const ATTRIBUTES_CONTROL: i16 = 0x20;

/// A compaction snapshot of `state`: commit batches of one group each, of at most
/// [`SNAPSHOT_RECORDS_PER_BATCH`] records, closed once their metadata passes
/// [`SNAPSHOT_METADATA_BYTES_PER_BATCH`].
fn snapshot_batches(
    state: BTreeMap<String, BTreeMap<(String, i32), CommittedOffset>>,
    now_ms: i64,
) -> Vec<Vec<u8>> {
    let mut batches = Vec::new();
    for (group_id, offsets) in state {
        let mut entries = Vec::new();
        let mut metadata_bytes = 0;
        for ((topic, partition), committed) in offsets {
            metadata_bytes += committed.metadata.as_ref().map_or(0, String::len);
            entries.push((topic, partition, committed));
            if entries.len() == SNAPSHOT_RECORDS_PER_BATCH
                || metadata_bytes >= SNAPSHOT_METADATA_BYTES_PER_BATCH
            {
                batches.push(encode_commit_batch(&group_id, &entries, now_ms));
                (entries, metadata_bytes) = (Vec::new(), 0);
            }
        }
        if !entries.is_empty() {
            batches.push(encode_commit_batch(&group_id, &entries, now_ms));
        }
    }
    batches
}

/// One batch holding one record per committed partition.
fn encode_commit_batch(
    group_id: &str,
    entries: &[(String, i32, CommittedOffset)],
    timestamp_ms: i64,
) -> Vec<u8> {
    let records: Vec<(Vec<u8>, Vec<u8>)> = entries
        .iter()
        .map(|(topic, partition, committed)| {
            (encode_key(group_id, topic, *partition), encode_value(committed))
        })
        .collect();
    encode_batch(&records, timestamp_ms)
}

/// The batch that marks a compaction snapshot complete (replicated logs): its one record
/// says that the snapshot starts at `snapshot_start`, so nothing before that is needed.
fn encode_snapshot_marker(snapshot_start: i64, timestamp_ms: i64) -> Vec<u8> {
    let mut value = vec![RECORD_VERSION];
    value.extend_from_slice(&snapshot_start.to_be_bytes());
    encode_batch(&[(vec![SNAPSHOT_KEY_VERSION], value)], timestamp_ms)
}

/// One RecordBatch v2 of (key, value) records, uncompressed, its offset and epoch left for
/// the log to stamp.
fn encode_batch(entries: &[(Vec<u8>, Vec<u8>)], timestamp_ms: i64) -> Vec<u8> {
    assert!(!entries.is_empty(), "a batch holds at least one record");
    let mut records = Vec::new();
    for (delta, (key, value)) in entries.iter().enumerate() {
        let mut record = Vec::with_capacity(key.len() + value.len() + 16);
        record.push(0); // attributes
        put_varint(&mut record, 0); // timestamp delta
        put_varint(&mut record, delta as i64);
        put_varint(&mut record, key.len() as i64);
        record.extend_from_slice(key);
        put_varint(&mut record, value.len() as i64);
        record.extend_from_slice(value);
        put_varint(&mut record, 0); // headers
        put_varint(&mut records, record.len() as i64);
        records.extend_from_slice(&record);
    }
    let batch_length = i32::try_from(HEADER_BYTES - LOG_OVERHEAD_BYTES + records.len())
        .expect("a commit request is far smaller than 2 GiB");
    let count = i32::try_from(entries.len()).expect("bounded by the batch length");
    let mut batch = Vec::with_capacity(HEADER_BYTES + records.len());
    batch.extend_from_slice(&0i64.to_be_bytes()); // base offset: the log assigns it
    batch.extend_from_slice(&batch_length.to_be_bytes());
    batch.extend_from_slice(&(-1i32).to_be_bytes()); // partition leader epoch: the log stamps it
    batch.push(MAGIC_V2 as u8);
    batch.extend_from_slice(&[0; 4]); // CRC-32C, filled below
    batch.extend_from_slice(&0i16.to_be_bytes()); // attributes: no compression
    batch.extend_from_slice(&(count - 1).to_be_bytes()); // last offset delta
    batch.extend_from_slice(&timestamp_ms.to_be_bytes()); // base timestamp
    batch.extend_from_slice(&timestamp_ms.to_be_bytes()); // max timestamp
    batch.extend_from_slice(&(-1i64).to_be_bytes()); // producer id
    batch.extend_from_slice(&(-1i16).to_be_bytes()); // producer epoch
    batch.extend_from_slice(&(-1i32).to_be_bytes()); // base sequence
    batch.extend_from_slice(&count.to_be_bytes());
    assert_eq!(batch.len(), HEADER_BYTES, "the header is complete");
    batch.extend_from_slice(&records);
    let crc = crc32c::crc32c(&batch[ATTRIBUTES_AT..]);
    batch[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_be_bytes());
    batch
}

fn encode_key(group_id: &str, topic: &str, partition: i32) -> Vec<u8> {
    let mut key = Vec::with_capacity(9 + group_id.len() + topic.len());
    key.push(RECORD_VERSION);
    put_short_string(&mut key, group_id);
    put_short_string(&mut key, topic);
    key.extend_from_slice(&partition.to_be_bytes());
    key
}

fn encode_value(committed: &CommittedOffset) -> Vec<u8> {
    let metadata = committed.metadata.as_deref();
    let mut value = Vec::with_capacity(25 + metadata.map_or(0, str::len));
    value.push(RECORD_VERSION);
    value.extend_from_slice(&committed.offset.to_be_bytes());
    value.extend_from_slice(&committed.leader_epoch.to_be_bytes());
    match metadata {
        Some(metadata) => {
            let len = i32::try_from(metadata.len()).expect("bounded by offset_metadata_bytes_max");
            value.extend_from_slice(&len.to_be_bytes());
            value.extend_from_slice(metadata.as_bytes());
        }
        None => value.extend_from_slice(&(-1i32).to_be_bytes()),
    }
    value.extend_from_slice(&committed.commit_timestamp_ms.to_be_bytes());
    value
}

fn put_short_string(out: &mut Vec<u8>, text: &str) {
    let len = u16::try_from(text.len()).expect("group ids and topic names are checked to fit");
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(text.as_bytes());
}

/// Kafka's zigzag varint (as varlong: up to 10 bytes).
fn put_varint(out: &mut Vec<u8>, value: i64) {
    let mut zigzag = ((value << 1) ^ (value >> 63)) as u64;
    while zigzag >= 0x80 {
        out.push((zigzag as u8 & 0x7f) | 0x80);
        zigzag >>= 7;
    }
    out.push(zigzag as u8);
}

/// One record of the offsets log.
#[derive(Debug, Clone, PartialEq, Eq)]
enum LogRecord {
    /// A committed offset.
    Commit(OffsetRecord),
    /// A compaction snapshot that started at this offset is complete
    /// ([`SNAPSHOT_AT_MARKER`]: an empty one, at the marker).
    SnapshotStart(i64),
}

/// One committed offset as the log holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct OffsetRecord {
    group_id: String,
    topic: String,
    partition: i32,
    committed: CommittedOffset,
}

/// Where the compaction snapshot that `batch` (a stamped batch of a replicated offsets log)
/// marks complete starts, if it is such a marker: the log's batches before that offset are
/// superseded once the marker is committed. Any other batch, or one that does not decode,
/// is no marker.
pub(crate) fn snapshot_start(batch: &[u8], header: &BatchHeader) -> Option<i64> {
    if header.record_count != 1 || header.attributes & ATTRIBUTES_CONTROL != 0 {
        return None;
    }
    match decode_commit_batch(batch, header).ok()?.pop()? {
        LogRecord::SnapshotStart(start) => Some(marker_start(start, header)),
        LogRecord::Commit(_) => None,
    }
}

/// Where the snapshot a marker closes starts: as it says, or at the marker itself.
fn marker_start(start: i64, marker: &BatchHeader) -> i64 {
    if start == SNAPSHOT_AT_MARKER {
        marker.base_offset
    } else {
        start
    }
}

/// Decodes the records of one checked batch (`header` from `batch::parse_all`).
fn decode_commit_batch(batch: &[u8], header: &BatchHeader) -> Result<Vec<LogRecord>, String> {
    if header.attributes & ATTRIBUTES_UNEXPECTED != 0 {
        return Err(format!("unexpected batch attributes {:#06x}", header.attributes));
    }
    let mut reader = Reader { bytes: batch.get(HEADER_BYTES..).ok_or("batch shorter than its header")? };
    let count = usize::try_from(header.record_count).map_err(|_| "negative record count")?;
    // Every record takes at least one byte: the count cannot ask for more than is there.
    if count > reader.bytes.len() {
        return Err(format!("{count} records claimed in {} bytes", reader.bytes.len()));
    }
    let mut records = Vec::with_capacity(count);
    for _ in 0..count {
        let length = usize::try_from(reader.varint()?).map_err(|_| "negative record length")?;
        let mut record = Reader { bytes: reader.take(length)? };
        record.take(1)?; // attributes
        record.varint()?; // timestamp delta
        record.varint()?; // offset delta
        let key = record.varbytes()?.ok_or("record without a key")?;
        let value = record.varbytes()?.ok_or("record without a value")?;
        if record.varint()? != 0 || !record.bytes.is_empty() {
            return Err("record with headers or trailing bytes".to_owned());
        }
        records.push(decode_record(key, value)?);
    }
    if !reader.bytes.is_empty() {
        return Err(format!("{} bytes after the last record", reader.bytes.len()));
    }
    Ok(records)
}

fn decode_record(key: &[u8], value: &[u8]) -> Result<LogRecord, String> {
    let mut key = Reader { bytes: key };
    let mut value = Reader { bytes: value };
    let key_version = key.u8()?;
    let value_version = value.u8()?;
    if key_version == SNAPSHOT_KEY_VERSION && value_version == RECORD_VERSION {
        let start = value.i64()?;
        if !key.bytes.is_empty() || !value.bytes.is_empty() || start < SNAPSHOT_AT_MARKER {
            return Err("a snapshot marker with trailing bytes or a negative start".to_owned());
        }
        return Ok(LogRecord::SnapshotStart(start));
    }
    if key_version != RECORD_VERSION || value_version != RECORD_VERSION {
        return Err(format!(
            "record versions {key_version}/{value_version}, this build reads {RECORD_VERSION}"
        ));
    }
    let group_id = key.short_string()?;
    let topic = key.short_string()?;
    let partition = key.i32()?;
    let offset = value.i64()?;
    let leader_epoch = value.i32()?;
    let metadata = match value.i32()? {
        -1 => None,
        len => {
            let len = usize::try_from(len).map_err(|_| format!("metadata length {len}"))?;
            Some(utf8(value.take(len)?)?)
        }
    };
    let commit_timestamp_ms = value.i64()?;
    if !key.bytes.is_empty() || !value.bytes.is_empty() {
        return Err("trailing bytes in a key or value".to_owned());
    }
    let committed = CommittedOffset { offset, leader_epoch, metadata, commit_timestamp_ms, log_end: 0 };
    Ok(LogRecord::Commit(OffsetRecord { group_id, topic, partition, committed }))
}

fn utf8(bytes: &[u8]) -> Result<String, String> {
    String::from_utf8(bytes.to_vec()).map_err(|_| "a string is not UTF-8".to_owned())
}

/// Reads from bytes of the disk: every read is bounds-checked.
struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, len: usize) -> Result<&'a [u8], String> {
        if len > self.bytes.len() {
            return Err(format!("{len} bytes wanted, {} left", self.bytes.len()));
        }
        let (taken, rest) = self.bytes.split_at(len);
        self.bytes = rest;
        Ok(taken)
    }

    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn i32(&mut self) -> Result<i32, String> {
        Ok(i32::from_be_bytes(self.take(4)?.try_into().expect("took 4 bytes")))
    }

    fn i64(&mut self) -> Result<i64, String> {
        Ok(i64::from_be_bytes(self.take(8)?.try_into().expect("took 8 bytes")))
    }

    fn short_string(&mut self) -> Result<String, String> {
        let len = u16::from_be_bytes(self.take(2)?.try_into().expect("took 2 bytes"));
        utf8(self.take(usize::from(len))?)
    }

    fn varint(&mut self) -> Result<i64, String> {
        let mut zigzag = 0u64;
        for shift in (0..70).step_by(7) {
            let byte = self.u8()?;
            zigzag |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok((zigzag >> 1) as i64 ^ -((zigzag & 1) as i64));
            }
        }
        Err("varint longer than 10 bytes".to_owned())
    }

    /// A varint length and that many bytes; `None` for length -1.
    fn varbytes(&mut self) -> Result<Option<&'a [u8]>, String> {
        match self.varint()? {
            -1 => Ok(None),
            len => {
                let len = usize::try_from(len).map_err(|_| format!("length {len}"))?;
                self.take(len).map(Some)
            }
        }
    }
}

/// A group request carried to the shard that coordinates the group.
#[derive(Debug)]
pub enum GroupOp {
    Join(JoinRequest),
    Sync(SyncRequest),
    Heartbeat { group_id: String, generation_id: i32, member_id: String, group_instance_id: Option<String> },
    Leave { group_id: String, members: Vec<(String, Option<String>)> },
    Commit(CommitRequest),
    FetchOffsets { group_id: String, partitions: Option<Vec<(String, i32)>> },
    List,
    Describe { group_id: String },
}

/// The answer to a [`GroupOp`], in the same order of variants.
#[derive(Debug)]
pub enum GroupReply {
    Joined(JoinResult),
    Synced(SyncResult),
    Heartbeat(Result<(), GroupError>),
    Left(Vec<Result<(), GroupError>>),
    Committed(Vec<((String, i32), Result<(), GroupError>)>),
    Offsets(Vec<CommittedPartition>),
    Groups(Vec<(String, String, String)>),
    Described(GroupDescription),
}

impl GroupCoordinator {
    /// Runs one request on this coordinator.
    pub async fn execute(&self, op: GroupOp) -> GroupReply {
        match op {
            GroupOp::Join(request) => GroupReply::Joined(self.join(request).await),
            GroupOp::Sync(request) => GroupReply::Synced(self.sync(request).await),
            GroupOp::Heartbeat { group_id, generation_id, member_id, group_instance_id } => {
                GroupReply::Heartbeat(self.heartbeat(
                    &group_id,
                    generation_id,
                    &member_id,
                    group_instance_id.as_deref(),
                ))
            }
            GroupOp::Leave { group_id, members } => GroupReply::Left(self.leave(&group_id, members).await),
            GroupOp::Commit(request) => GroupReply::Committed(self.commit_offsets(request).await),
            GroupOp::FetchOffsets { group_id, partitions } => {
                GroupReply::Offsets(self.fetch_offsets(&group_id, partitions))
            }
            GroupOp::List => GroupReply::Groups(self.list_groups()),
            GroupOp::Describe { group_id } => GroupReply::Described(self.describe_group(&group_id)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_lite::future;
    use std::future::Future;
    use std::path::Path;
    use std::pin::pin;

    fn run<T>(future: impl Future<Output = T>) -> T {
        glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
            .io_memory(256 << 10)
            .make()
            .expect("executor")
            .run(future)
    }

    fn config() -> GroupConfig {
        GroupConfig {
            initial_rebalance_delay: Duration::from_millis(100),
            session_timeout_min: Duration::from_millis(10),
            offsets_segment_bytes: 64 << 10,
            ..GroupConfig::default()
        }
    }

    async fn open(dir: &Path) -> Rc<GroupCoordinator> {
        let log_config =
            LogConfig { segment_bytes: 64 << 10, index_interval_bytes: 1024, ..LogConfig::default() };
        GroupCoordinator::open_with(dir.join("groups"), log_config, config()).await.expect("open")
    }

    fn protocols(list: &[(&str, &str)]) -> Vec<(String, Bytes)> {
        list.iter().map(|(name, metadata)| (name.to_string(), Bytes::from(metadata.to_string()))).collect()
    }

    fn join_request(group: &str, member_id: &str, client_id: &str) -> JoinRequest {
        JoinRequest {
            group_id: group.to_owned(),
            member_id: member_id.to_owned(),
            group_instance_id: None,
            client_id: client_id.to_owned(),
            client_host: "/127.0.0.1".to_owned(),
            protocol_type: "consumer".to_owned(),
            protocols: protocols(&[("range", &format!("{client_id}-metadata"))]),
            session_timeout: Duration::from_secs(10),
            rebalance_timeout: Duration::from_secs(5),
            require_known_member_id: false,
        }
    }

    fn sync_request(
        group: &str,
        generation_id: i32,
        member_id: &str,
        assignments: &[(&str, &str)],
    ) -> SyncRequest {
        SyncRequest {
            group_id: group.to_owned(),
            generation_id,
            member_id: member_id.to_owned(),
            group_instance_id: None,
            protocol_type: Some("consumer".to_owned()),
            protocol_name: Some("range".to_owned()),
            assignments: assignments
                .iter()
                .map(|(m, a)| (m.to_string(), Bytes::from(a.to_string())))
                .collect(),
        }
    }

    fn commit_request(
        group: &str,
        generation_id: i32,
        member_id: &str,
        offsets: &[(&str, i32, i64)],
    ) -> CommitRequest {
        CommitRequest {
            group_id: group.to_owned(),
            generation_id,
            member_id: member_id.to_owned(),
            group_instance_id: None,
            offsets: offsets.iter().map(|(t, p, o)| (t.to_string(), *p, *o, -1, None)).collect(),
        }
    }

    fn errors(results: Vec<((String, i32), Result<(), GroupError>)>) -> Vec<Result<(), GroupError>> {
        results.into_iter().map(|(_, result)| result).collect()
    }

    /// Joins `requests` together into one generation, syncs them with the leader assigning
    /// "<member id>-assignment" to each, and returns their join answers in request order.
    async fn form_group(coordinator: &Rc<GroupCoordinator>, requests: Vec<JoinRequest>) -> Vec<Joined> {
        let group = requests[0].group_id.clone();
        let tasks: Vec<_> = requests
            .into_iter()
            .map(|request| {
                let coordinator = Rc::clone(coordinator);
                glommio::spawn_local(async move { coordinator.join(request).await })
            })
            .collect();
        let mut joined = Vec::new();
        for task in tasks {
            joined.push(task.await.expect("join"));
        }
        let generation = joined[0].generation_id;
        assert!(joined.iter().all(|j| j.generation_id == generation), "{joined:?}");
        let assignments: Vec<(String, String)> =
            joined.iter().map(|j| (j.member_id.clone(), format!("{}-assignment", j.member_id))).collect();
        let assignments: Vec<(&str, &str)> =
            assignments.iter().map(|(m, a)| (m.as_str(), a.as_str())).collect();
        let syncs: Vec<_> = joined
            .iter()
            .map(|j| {
                let leads = j.leader_id == j.member_id;
                let request =
                    sync_request(&group, generation, &j.member_id, if leads { &assignments } else { &[] });
                let coordinator = Rc::clone(coordinator);
                glommio::spawn_local(async move { coordinator.sync(request).await })
            })
            .collect();
        for (sync, j) in syncs.into_iter().zip(&joined) {
            let synced = sync.await.expect("sync");
            assert_eq!(synced.assignment, Bytes::from(format!("{}-assignment", j.member_id)));
        }
        assert_eq!(coordinator.describe_group(&group).state, "Stable");
        joined
    }

    /// Heartbeats every 20 ms until the answer is an error, for at most 5 s.
    async fn heartbeat_until_error(
        coordinator: &GroupCoordinator,
        group: &str,
        joined: &Joined,
    ) -> GroupError {
        let give_up = Instant::now() + Duration::from_secs(5);
        while Instant::now() < give_up {
            if let Err(error) = coordinator.heartbeat(group, joined.generation_id, &joined.member_id, None) {
                return error;
            }
            glommio::timer::sleep(Duration::from_millis(20)).await;
        }
        panic!("heartbeats of {} kept succeeding", joined.member_id);
    }

    #[test]
    fn a_new_member_gets_its_member_id_then_joins_and_syncs_alone() {
        let dir = tempfile::tempdir().unwrap();
        run(async {
            let coordinator = open(dir.path()).await;
            let short_session =
                JoinRequest { session_timeout: Duration::from_millis(1), ..join_request("g", "", "client") };
            assert_eq!(coordinator.join(short_session).await, Err(GroupError::InvalidSessionTimeout));
            assert_eq!(
                coordinator.join(join_request("", "", "client")).await,
                Err(GroupError::InvalidGroupId)
            );

            let first = JoinRequest { require_known_member_id: true, ..join_request("g", "", "client") };
            let member_id = match coordinator.join(first.clone()).await {
                Err(GroupError::MemberIdRequired(member_id)) => member_id,
                other => panic!("expected MemberIdRequired, got {other:?}"),
            };
            assert!(member_id.starts_with("client-"), "{member_id}");
            assert_eq!(coordinator.describe_group("g").state, "Empty", "a handed-out id is no member yet");
            let stranger = join_request("g", "client-unknown", "client");
            assert_eq!(coordinator.join(stranger).await, Err(GroupError::UnknownMemberId));

            let joined =
                coordinator.join(JoinRequest { member_id: member_id.clone(), ..first }).await.unwrap();
            assert_eq!(joined.generation_id, 1);
            assert_eq!(joined.member_id, member_id);
            assert_eq!(joined.leader_id, member_id);
            assert_eq!(joined.protocol_type, "consumer");
            assert_eq!(joined.protocol_name, "range");
            assert_eq!(joined.members, vec![(member_id.clone(), None, Bytes::from("client-metadata"))]);
            assert_eq!(coordinator.describe_group("g").state, "CompletingRebalance");
            assert_eq!(
                coordinator.heartbeat("g", 1, &member_id, None),
                Ok(()),
                "fine while the leader assigns"
            );
            assert_eq!(coordinator.heartbeat("g", 0, &member_id, None), Err(GroupError::IllegalGeneration));

            let synced =
                coordinator.sync(sync_request("g", 1, &member_id, &[(&member_id, "p0")])).await.unwrap();
            assert_eq!(
                synced,
                Synced {
                    protocol_type: "consumer".into(),
                    protocol_name: "range".into(),
                    assignment: "p0".into()
                }
            );
            let description = coordinator.describe_group("g");
            assert_eq!((description.state.as_str(), description.protocol_name.as_str()), ("Stable", "range"));
            assert_eq!(
                description.members,
                vec![MemberDescription {
                    member_id: member_id.clone(),
                    group_instance_id: None,
                    client_id: "client".into(),
                    client_host: "/127.0.0.1".into(),
                    metadata: "client-metadata".into(),
                    assignment: "p0".into(),
                }]
            );
            assert_eq!(coordinator.list_groups(), vec![("g".into(), "consumer".into(), "Stable".into())]);

            coordinator.close().await;
            assert_eq!(
                coordinator.heartbeat("g", 1, &member_id, None),
                Err(GroupError::CoordinatorNotAvailable)
            );
            assert_eq!(coordinator.describe_group("g").state, "Dead");
        });
    }

    #[test]
    fn two_members_join_one_generation_and_the_leader_assigns_both() {
        let dir = tempfile::tempdir().unwrap();
        run(async {
            let coordinator = open(dir.path()).await;
            let a = JoinRequest {
                protocols: protocols(&[("sticky", "a-sticky"), ("range", "a-range")]),
                ..join_request("g", "", "a")
            };
            let b =
                JoinRequest { protocols: protocols(&[("range", "b-range")]), ..join_request("g", "", "b") };
            let (a, b) = future::zip(coordinator.join(a), coordinator.join(b)).await;
            let (a, b) = (a.unwrap(), b.unwrap());
            assert_eq!((a.generation_id, b.generation_id), (1, 1));
            assert_eq!(a.leader_id, a.member_id, "the first to join leads");
            assert_eq!(b.leader_id, a.member_id);
            assert_eq!(a.protocol_name, "range", "the only protocol both support");
            assert_eq!(
                a.members,
                vec![
                    (a.member_id.clone(), None, "a-range".into()),
                    (b.member_id.clone(), None, "b-range".into())
                ]
            );
            assert!(b.members.is_empty(), "only the leader gets the members");

            let mut follower = pin!(coordinator.sync(sync_request("g", 1, &b.member_id, &[])));
            assert!(future::poll_once(&mut follower).await.is_none(), "followers wait for the leader");
            let assignments = [(a.member_id.as_str(), "A"), (b.member_id.as_str(), "B")];
            let leader = coordinator.sync(sync_request("g", 1, &a.member_id, &assignments)).await.unwrap();
            assert_eq!(leader.assignment, Bytes::from("A"));
            assert_eq!(follower.await.unwrap().assignment, Bytes::from("B"));
            assert_eq!(coordinator.heartbeat("g", 1, &b.member_id, None), Ok(()));

            let other_protocol =
                JoinRequest { protocols: protocols(&[("roundrobin", "c")]), ..join_request("g", "", "c") };
            assert_eq!(coordinator.join(other_protocol).await, Err(GroupError::InconsistentGroupProtocol));
            let other_type = JoinRequest { protocol_type: "connect".into(), ..join_request("g", "", "c") };
            assert_eq!(coordinator.join(other_type).await, Err(GroupError::InconsistentGroupProtocol));
            assert_eq!(
                coordinator.heartbeat("g", 1, &a.member_id, None),
                Ok(()),
                "refused joins change nothing"
            );
        });
    }

    #[test]
    fn a_third_member_makes_the_others_rejoin_a_new_generation() {
        let dir = tempfile::tempdir().unwrap();
        run(async {
            let coordinator = open(dir.path()).await;
            let formed =
                form_group(&coordinator, vec![join_request("g", "", "a"), join_request("g", "", "b")]).await;
            let (a, b) = (&formed[0], &formed[1]);
            let mut third = pin!(coordinator.join(join_request("g", "", "c")));
            assert!(future::poll_once(&mut third).await.is_none(), "the newcomer waits for the others");
            for member in [a, b] {
                assert_eq!(
                    coordinator.heartbeat("g", 1, &member.member_id, None),
                    Err(GroupError::RebalanceInProgress)
                );
            }
            let sync = coordinator.sync(sync_request("g", 1, &b.member_id, &[])).await;
            assert_eq!(sync, Err(GroupError::RebalanceInProgress));
            let commit =
                coordinator.commit_offsets(commit_request("g", 1, &a.member_id, &[("t", 0, 10)])).await;
            assert_eq!(errors(commit), vec![Ok(())], "members commit what they consumed while rejoining");

            let rejoin_a = coordinator.join(join_request("g", &a.member_id, "a"));
            let rejoin_b = coordinator.join(join_request("g", &b.member_id, "b"));
            let ((a2, b2), c2) = future::zip(future::zip(rejoin_a, rejoin_b), third).await;
            let (a2, b2, c2) = (a2.unwrap(), b2.unwrap(), c2.unwrap());
            assert_eq!((a2.generation_id, b2.generation_id, c2.generation_id), (2, 2, 2));
            assert_eq!(a2.leader_id, a.member_id, "the leader that rejoined stays leader");
            assert_eq!(a2.members.len(), 3);
            assert!(b2.members.is_empty() && c2.members.is_empty());

            assert_eq!(coordinator.heartbeat("g", 1, &b.member_id, None), Err(GroupError::IllegalGeneration));
            let stale =
                coordinator.commit_offsets(commit_request("g", 1, &a.member_id, &[("t", 0, 11)])).await;
            assert_eq!(errors(stale), vec![Err(GroupError::IllegalGeneration)]);
            let early =
                coordinator.commit_offsets(commit_request("g", 2, &a.member_id, &[("t", 0, 11)])).await;
            assert_eq!(
                errors(early),
                vec![Err(GroupError::RebalanceInProgress)],
                "no commit before the sync"
            );
            let stranger = coordinator.commit_offsets(commit_request("g", 2, "x", &[("t", 0, 11)])).await;
            assert_eq!(errors(stranger), vec![Err(GroupError::UnknownMemberId)]);
            assert_eq!(coordinator.fetch_offsets("g", None), vec![("t".into(), 0, 10, -1, None)]);
        });
    }

    #[test]
    fn a_leaving_leader_hands_the_group_to_the_remaining_member() {
        let dir = tempfile::tempdir().unwrap();
        run(async {
            let coordinator = open(dir.path()).await;
            let formed =
                form_group(&coordinator, vec![join_request("g", "", "a"), join_request("g", "", "b")]).await;
            let (a, b) = (&formed[0], &formed[1]);
            assert_eq!(a.leader_id, a.member_id);
            assert_eq!(coordinator.leave("g", vec![(a.member_id.clone(), None)]).await, vec![Ok(())]);
            assert_eq!(
                coordinator.leave("g", vec![(a.member_id.clone(), None)]).await,
                vec![Err(GroupError::UnknownMemberId)]
            );
            assert_eq!(
                coordinator.leave("nope", vec![(b.member_id.clone(), None)]).await,
                vec![Err(GroupError::UnknownMemberId)]
            );
            assert_eq!(
                coordinator.heartbeat("g", 1, &b.member_id, None),
                Err(GroupError::RebalanceInProgress)
            );

            let b2 = coordinator.join(join_request("g", &b.member_id, "b")).await.unwrap();
            assert_eq!(b2.generation_id, 2);
            assert_eq!(b2.leader_id, b.member_id);
            assert_eq!(b2.members, vec![(b.member_id.clone(), None, "b-metadata".into())]);
            let synced = coordinator.sync(sync_request("g", 2, &b.member_id, &[(&b.member_id, "all")])).await;
            assert_eq!(synced.unwrap().assignment, Bytes::from("all"));
            let members: Vec<String> =
                coordinator.describe_group("g").members.into_iter().map(|m| m.member_id).collect();
            assert_eq!(members, vec![b.member_id.clone()]);

            assert_eq!(coordinator.leave("g", vec![(b.member_id.clone(), None)]).await, vec![Ok(())]);
            assert_eq!(coordinator.describe_group("g").state, "Dead", "nothing is left of the group");
            assert!(coordinator.list_groups().is_empty());
        });
    }

    #[test]
    fn a_silent_member_is_removed_when_its_session_expires() {
        let dir = tempfile::tempdir().unwrap();
        run(async {
            let coordinator = open(dir.path()).await;
            let session = Duration::from_millis(150);
            let silent = JoinRequest { session_timeout: session, ..join_request("g", "", "b") };
            let formed = form_group(&coordinator, vec![join_request("g", "", "a"), silent]).await;
            let (a, b) = (&formed[0], &formed[1]);
            let last_heard_of_b = Instant::now();
            assert_eq!(heartbeat_until_error(&coordinator, "g", a).await, GroupError::RebalanceInProgress);
            assert!(last_heard_of_b.elapsed() >= session, "removed after {:?}", last_heard_of_b.elapsed());
            assert_eq!(coordinator.heartbeat("g", 1, &b.member_id, None), Err(GroupError::UnknownMemberId));

            let a2 = coordinator.join(join_request("g", &a.member_id, "a")).await.unwrap();
            assert_eq!(a2.generation_id, 2);
            assert_eq!(a2.members.len(), 1, "{a2:?}");
        });
    }

    #[test]
    fn a_member_that_does_not_rejoin_within_the_rebalance_timeout_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        run(async {
            let coordinator = open(dir.path()).await;
            let rebalance_timeout = Duration::from_millis(200);
            let request = |client| JoinRequest { rebalance_timeout, ..join_request("g", "", client) };
            let formed = form_group(&coordinator, vec![request("a"), request("b")]).await;
            let (a, b) = (&formed[0], &formed[1]);
            let started = Instant::now();
            let third = coordinator.join(request("c"));
            let a_rejoins = coordinator.join(JoinRequest { member_id: a.member_id.clone(), ..request("a") });
            let (c2, a2) = future::zip(third, a_rejoins).await;
            assert!(started.elapsed() >= rebalance_timeout, "completed after {:?}", started.elapsed());
            let (a2, c2) = (a2.unwrap(), c2.unwrap());
            assert_eq!((a2.generation_id, c2.generation_id), (2, 2));
            let members: Vec<&String> = a2.members.iter().map(|(id, _, _)| id).collect();
            assert_eq!(members, vec![&a.member_id, &c2.member_id], "b did not rejoin");
            assert_eq!(coordinator.heartbeat("g", 1, &b.member_id, None), Err(GroupError::UnknownMemberId));
        });
    }

    #[test]
    fn a_static_member_that_restarts_takes_its_place_back_and_fences_its_old_id() {
        let dir = tempfile::tempdir().unwrap();
        run(async {
            let coordinator = open(dir.path()).await;
            let instance = Some("instance-1".to_owned());
            let static_request =
                || JoinRequest { group_instance_id: instance.clone(), ..join_request("g", "", "s") };
            let formed = form_group(&coordinator, vec![static_request(), join_request("g", "", "d")]).await;
            let (old, d) = (&formed[0], &formed[1]);
            assert!(old.member_id.starts_with("instance-1-"), "{}", old.member_id);

            let mut restart = pin!(coordinator.join(static_request()));
            let joined = future::poll_once(&mut restart).await.expect("answered at once").unwrap();
            assert_ne!(joined.member_id, old.member_id);
            assert_eq!(joined.generation_id, 1, "no rebalance");
            assert_eq!(joined.leader_id, old.member_id, "the old leader id: the new member assigns nothing");
            assert!(joined.members.is_empty());
            assert_eq!(coordinator.describe_group("g").state, "Stable");
            assert_eq!(
                coordinator.heartbeat("g", 1, &d.member_id, None),
                Ok(()),
                "the others notice nothing"
            );
            let mut sync = sync_request("g", 1, &joined.member_id, &[]);
            sync.group_instance_id = instance.clone();
            let synced = coordinator.sync(sync).await.unwrap();
            assert_eq!(
                synced.assignment,
                Bytes::from(format!("{}-assignment", old.member_id)),
                "its old assignment"
            );

            let heartbeat = |member_id: &str| coordinator.heartbeat("g", 1, member_id, instance.as_deref());
            assert_eq!(heartbeat(&old.member_id), Err(GroupError::FencedInstanceId));
            assert_eq!(heartbeat(&joined.member_id), Ok(()));
            let old_join = JoinRequest { member_id: old.member_id.clone(), ..static_request() };
            assert_eq!(coordinator.join(old_join).await, Err(GroupError::FencedInstanceId));
            let mut old_commit = commit_request("g", 1, &old.member_id, &[("t", 0, 1)]);
            old_commit.group_instance_id = instance.clone();
            assert_eq!(
                errors(coordinator.commit_offsets(old_commit).await),
                vec![Err(GroupError::FencedInstanceId)]
            );

            let removed = coordinator.leave("g", vec![(String::new(), instance.clone())]).await;
            assert_eq!(removed, vec![Ok(())], "an admin removes a static member by its instance id");
            assert_eq!(
                coordinator.heartbeat("g", 1, &d.member_id, None),
                Err(GroupError::RebalanceInProgress)
            );
        });
    }

    #[test]
    fn the_offsets_log_is_compacted_and_keeps_the_latest_offsets() {
        let dir = tempfile::tempdir().unwrap();
        let growth = 256 << 10;
        let compacting = GroupConfig { offsets_compact_growth_bytes: growth, ..config() };
        let log_config = LogConfig { index_interval_bytes: 1024, ..LogConfig::default() };
        run(async {
            let coordinator = GroupCoordinator::open_with(
                dir.path().join("groups"),
                log_config.clone(),
                compacting.clone(),
            )
            .await
            .unwrap();
            // 300 commits of the same 100 partitions by two groups: about 1.5 MB of records.
            let partitions: Vec<(&str, i32, i64)> = (0..100).map(|p| ("t", p, 0)).collect();
            for round in 0..150i64 {
                for group in ["a", "b"] {
                    let offsets: Vec<(&str, i32, i64)> =
                        partitions.iter().map(|(t, p, _)| (*t, *p, round * 1000 + i64::from(*p))).collect();
                    let results = coordinator.commit_offsets(commit_request(group, -1, "", &offsets)).await;
                    assert!(results.iter().all(|(_, r)| r.is_ok()));
                }
            }
            let size = coordinator.local_log().size_bytes();
            assert!(size < 3 * growth, "the log was compacted: {size} bytes");
            assert!(
                coordinator.local_log().log_start_offset() > 0,
                "segments before the snapshot were deleted"
            );
            coordinator.close().await;

            let coordinator =
                GroupCoordinator::open_with(dir.path().join("groups"), log_config, compacting).await.unwrap();
            for group in ["a", "b"] {
                let offsets = coordinator.fetch_offsets(group, None);
                assert_eq!(offsets.len(), 100);
                for (topic, partition, offset, _, _) in offsets {
                    assert_eq!((topic.as_str(), offset), ("t", 149_000 + i64::from(partition)));
                }
            }
            coordinator.close().await;
        });
    }

    /// Kafka's offsets.retention.minutes (KIP-211): a group without members loses, at the
    /// next compaction, the offsets it committed longer ago than the retention; a group with a
    /// member keeps them, as do recent commits; and a restart does not bring them back.
    #[test]
    fn offsets_of_a_group_without_members_expire_at_the_next_compaction() {
        let dir = tempfile::tempdir().unwrap();
        let expiring = GroupConfig {
            offsets_compact_growth_bytes: 64 << 10,
            offsets_retention: Duration::from_millis(300),
            ..config()
        };
        let log_config = LogConfig { index_interval_bytes: 1024, ..LogConfig::default() };
        run(async {
            let open = || {
                GroupCoordinator::open_with(dir.path().join("groups"), log_config.clone(), expiring.clone())
            };
            let coordinator = open().await.unwrap();
            let member = form_group(&coordinator, vec![join_request("kept", "", "c")]).await.remove(0);
            let commit = |group: &str, generation: i32, member_id: &str, offsets: &[(&str, i32, i64)]| {
                let request = commit_request(group, generation, member_id, offsets);
                let coordinator = Rc::clone(&coordinator);
                async move { errors(coordinator.commit_offsets(request).await).into_iter().all(|r| r.is_ok()) }
            };
            assert!(commit("gone", -1, "", &[("t", 0, 5)]).await);
            assert!(commit("kept", member.generation_id, &member.member_id, &[("t", 0, 6)]).await);
            glommio::timer::sleep(Duration::from_millis(400)).await;
            // Past the retention: recent commits, enough of them for two compactions.
            let partitions: Vec<(&str, i32, i64)> = (0..100).map(|p| ("t", p, 7)).collect();
            for _ in 0..50 {
                assert!(commit("fresh", -1, "", &partitions).await);
            }
            assert!(coordinator.local_log().log_start_offset() > 0, "compacted");
            assert_eq!(
                [served(&coordinator, "gone"), served(&coordinator, "kept"), served(&coordinator, "fresh")],
                [-1, 6, 7]
            );
            assert!(coordinator.list_groups().iter().all(|(group, _, _)| group != "gone"), "forgotten");
            coordinator.close().await;

            let coordinator = open().await.unwrap();
            assert_eq!(
                [served(&coordinator, "gone"), served(&coordinator, "kept"), served(&coordinator, "fresh")],
                [-1, 6, 7],
                "a restart brings nothing back"
            );
            coordinator.close().await;
        });
    }

    /// The offset `coordinator` serves for `group` on partition t/0 (-1: none).
    fn served(coordinator: &GroupCoordinator, group: &str) -> i64 {
        coordinator.fetch_offsets(group, Some(vec![("t".to_owned(), 0)]))[0].2
    }

    /// A crash between a compaction's snapshot and the deletion of what it replaced: replay
    /// drops every offset written before the snapshot's start, also for an empty snapshot.
    #[test]
    fn a_replay_drops_what_a_snapshot_marker_supersedes() {
        let dir = tempfile::tempdir().unwrap();
        run(async {
            let log = Log::open(dir.path(), LogConfig::default()).await.unwrap();
            let append = |bytes: Vec<u8>| {
                let headers = batch::parse_all(&bytes).unwrap();
                log.append(Bytes::from(bytes), &headers).unwrap();
            };
            let commit = |group: &str, offset| {
                let committed = CommittedOffset {
                    offset,
                    leader_epoch: -1,
                    metadata: None,
                    commit_timestamp_ms: 0,
                    log_end: 0,
                };
                encode_commit_batch(group, &[("t".to_owned(), 0, committed)], 0)
            };
            append(commit("expired", 1));
            append(commit("kept", 2));
            let start = log.next_offset();
            append(commit("kept", 2)); // the snapshot, without the expired group
            append(encode_snapshot_marker(start, 0));
            append(commit("new", 3));
            log.flush().await.unwrap();
            let replayed = replay(&log, log.durable_offset(), false).await.unwrap();
            let mut groups: Vec<&str> = replayed.groups.keys().map(String::as_str).collect();
            groups.sort_unstable();
            assert_eq!(groups, ["kept", "new"]);
            assert_eq!(replayed.snapshot, Some(Snapshot { start: 2, marker_end: 4 }));

            // Every offset expired: the snapshot is empty and starts at its marker.
            append(encode_snapshot_marker(SNAPSHOT_AT_MARKER, 0));
            log.flush().await.unwrap();
            let replayed = replay(&log, log.durable_offset(), false).await.unwrap();
            assert!(replayed.groups.is_empty(), "{:?}", replayed.groups.keys().collect::<Vec<_>>());
            assert_eq!(replayed.snapshot, Some(Snapshot { start: 5, marker_end: 6 }));
            log.close().await.unwrap();
        });
    }

    #[test]
    fn a_snapshot_batch_holds_one_group_and_stays_small() {
        let committed = |offset, metadata_bytes| CommittedOffset {
            offset,
            leader_epoch: -1,
            metadata: Some("m".repeat(metadata_bytes)),
            commit_timestamp_ms: 0,
            log_end: 0,
        };
        let mut state: BTreeMap<String, BTreeMap<(String, i32), CommittedOffset>> = BTreeMap::new();
        let many = state.entry("many".to_owned()).or_default();
        for partition in 0..2500 {
            many.insert(("t".to_owned(), partition), committed(i64::from(partition), 0));
        }
        let large = state.entry("large".to_owned()).or_default();
        for partition in 0..600 {
            large.insert(("t".to_owned(), partition), committed(i64::from(partition), 4096));
        }
        let batches = snapshot_batches(state, 0);
        let mut seen = HashMap::<String, usize>::new();
        for bytes in &batches {
            let header = batch::parse(bytes).unwrap();
            assert!(bytes.len() <= 1 << 20, "a batch of {} bytes", bytes.len());
            assert!(header.record_count as usize <= SNAPSHOT_RECORDS_PER_BATCH);
            let records = decode_commit_batch(bytes, &header).unwrap();
            let LogRecord::Commit(first) = &records[0] else { panic!("a commit") };
            assert!(records
                .iter()
                .all(|r| matches!(r, LogRecord::Commit(c) if c.group_id == first.group_id)));
            *seen.entry(first.group_id.clone()).or_default() += records.len();
        }
        assert_eq!(seen, HashMap::from([("many".to_owned(), 2500), ("large".to_owned(), 600)]));
        assert_eq!(batches.len(), 3 + 5, "1000 + 1000 + 500 records, and 128 x 4 KiB of metadata a batch");
    }

    /// A fake replicated offsets log: records each batch proposed (as its records), commits
    /// it at once, or after 50 ms for a commit of group `slow`.
    #[allow(clippy::type_complexity)]
    fn recording_append(slow: &'static str) -> (ReplicatedAppend, Rc<RefCell<Vec<Vec<LogRecord>>>>) {
        let proposed: Rc<RefCell<Vec<Vec<LogRecord>>>> = Rc::default();
        let sink = Rc::clone(&proposed);
        let append: ReplicatedAppend = Rc::new(move |bytes: Bytes| {
            let sink = Rc::clone(&sink);
            Box::pin(async move {
                let header = batch::parse(&bytes).unwrap();
                let records = decode_commit_batch(&bytes, &header).unwrap();
                let is_slow = matches!(&records[0], LogRecord::Commit(r) if r.group_id == slow);
                let first = sink.borrow().iter().map(|b| b.len() as i64).sum::<i64>();
                let next = first + records.len() as i64;
                sink.borrow_mut().push(records);
                if is_slow {
                    glommio::timer::sleep(Duration::from_millis(50)).await;
                }
                Ok((first, next))
            })
        });
        (append, proposed)
    }

    /// The batches a [`recording_append`] saw: (group, offset) of each commit, ("marker",
    /// snapshot start) of a snapshot marker.
    fn proposed_offsets(proposed: &RefCell<Vec<Vec<LogRecord>>>) -> Vec<Vec<(String, i64)>> {
        let of = |record: &LogRecord| match record {
            LogRecord::Commit(r) => (r.group_id.clone(), r.committed.offset),
            LogRecord::SnapshotStart(start) => ("marker".to_owned(), *start),
        };
        proposed.borrow().iter().map(|records| records.iter().map(of).collect()).collect()
    }

    /// Kafka's offsets.retention.check.interval.ms: a quiet offsets log, whose growth starts
    /// no compaction, loses expired offsets at the next check, locally and replicated, and a
    /// restart does not bring them back; a group loaded from the log counts its time without
    /// members from its latest commit, not from the start.
    #[test]
    fn a_quiet_offsets_log_loses_expired_offsets_at_the_retention_check() {
        let dir = tempfile::tempdir().unwrap();
        let expiring = GroupConfig {
            offsets_retention: Duration::from_millis(300),
            offsets_retention_check_interval: Duration::from_millis(100),
            ..config()
        };
        let log_config = LogConfig { index_interval_bytes: 1024, ..LogConfig::default() };
        run(async {
            let commit_both = |coordinator: Rc<GroupCoordinator>| async move {
                let member = form_group(&coordinator, vec![join_request("kept", "", "c")]).await.remove(0);
                let gone = commit_request("gone", -1, "", &[("t", 0, 5)]);
                let kept = commit_request("kept", member.generation_id, &member.member_id, &[("t", 0, 6)]);
                for request in [gone, kept] {
                    assert!(errors(coordinator.commit_offsets(request).await).iter().all(|r| r.is_ok()));
                }
                assert_eq!([served(&coordinator, "gone"), served(&coordinator, "kept")], [5, 6]);
            };

            let open = || {
                GroupCoordinator::open_with(dir.path().join("groups"), log_config.clone(), expiring.clone())
            };
            let coordinator = open().await.unwrap();
            commit_both(Rc::clone(&coordinator)).await;
            glommio::timer::sleep(Duration::from_millis(700)).await;
            assert_eq!([served(&coordinator, "gone"), served(&coordinator, "kept")], [-1, 6]);
            coordinator.close().await;
            let coordinator = open().await.unwrap();
            assert_eq!(
                [served(&coordinator, "gone"), served(&coordinator, "kept")],
                [-1, 6],
                "a restart brings nothing back"
            );
            let old = commit_request("old", -1, "", &[("t", 0, 4)]);
            assert!(errors(coordinator.commit_offsets(old).await).iter().all(|r| r.is_ok()));
            coordinator.close().await;
            // Past the retention while the node is down: gone at the first check after it
            // starts, well before a retention counted from the start would let it go.
            glommio::timer::sleep(Duration::from_millis(400)).await;
            let coordinator = open().await.unwrap();
            assert_eq!(served(&coordinator, "old"), 4);
            glommio::timer::sleep(Duration::from_millis(200)).await;
            assert_eq!(served(&coordinator, "old"), -1, "expired at the first check");
            coordinator.close().await;

            let log = Log::open(&dir.path().join("replicated"), LogConfig::default()).await.unwrap();
            let (append, proposed) = recording_append("none");
            let (coordinator, _) =
                GroupCoordinator::open_replicated(&log, 0, expiring.clone(), append).await.unwrap();
            commit_both(Rc::clone(&coordinator)).await;
            glommio::timer::sleep(Duration::from_millis(700)).await;
            assert_eq!([served(&coordinator, "gone"), served(&coordinator, "kept")], [-1, 6]);
            let snapshot = [vec![("kept".to_owned(), 6)], vec![("marker".to_owned(), 2)]];
            assert_eq!(proposed_offsets(&proposed)[2..], snapshot, "a snapshot without the expired group");
            coordinator.close().await;
            log.close().await.unwrap();
        });
    }

    /// The snapshot of a replicated compaction holds every commit proposed before it (it waits
    /// for the one still in flight) and no commit is proposed between it and its marker (one
    /// that arrives meanwhile waits).
    #[test]
    fn a_replicated_compaction_waits_for_commits_in_flight_and_holds_new_ones_back() {
        let dir = tempfile::tempdir().unwrap();
        run(async {
            // Replays nothing: the replicated log is a fake that records what is proposed.
            let log = Log::open(dir.path(), LogConfig::default()).await.unwrap();
            let (append, proposed) = recording_append("slow");
            let compacting = GroupConfig { offsets_compact_growth_bytes: 1, ..config() };
            let (coordinator, snapshot) =
                GroupCoordinator::open_replicated(&log, 0, compacting, append).await.unwrap();
            assert_eq!(snapshot, None);
            let commit = |group: &str, offset: i64| {
                let coordinator = Rc::clone(&coordinator);
                let request = commit_request(group, -1, "", &[("t", 0, offset)]);
                glommio::spawn_local(async move { errors(coordinator.commit_offsets(request).await) })
                    .detach()
            };
            let slow = commit("slow", 1);
            glommio::timer::sleep(Duration::from_millis(5)).await;
            assert_eq!(proposed.borrow().len(), 1, "the slow commit is in flight");
            // Answered at once, and past the growth: a compaction starts, and waits for the
            // slow commit.
            assert_eq!(commit("fast", 2).await.unwrap(), vec![Ok(())]);
            let late = commit("late", 3);
            glommio::timer::sleep(Duration::from_millis(5)).await;
            assert_eq!(proposed.borrow().len(), 2, "neither the snapshot nor the late commit yet");
            assert_eq!(slow.await.unwrap(), vec![Ok(())]);
            assert_eq!(late.await.unwrap(), vec![Ok(())]);
            let proposed = proposed_offsets(&proposed);
            let expected = [
                vec![("slow".to_owned(), 1)],
                vec![("fast".to_owned(), 2)],
                vec![("fast".to_owned(), 2)],
                vec![("slow".to_owned(), 1)],
                vec![("marker".to_owned(), 2)],
                vec![("late".to_owned(), 3)],
            ];
            assert_eq!(proposed[..6], expected, "{proposed:?}");
            assert_eq!(
                coordinator.fetch_offsets("slow", None),
                vec![("t".to_owned(), 0, 1, -1, None)],
                "the slow commit applied once committed"
            );
            coordinator.close().await;
        });
    }

    #[test]
    fn committed_offsets_are_durable_and_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        run(async {
            let coordinator = open(dir.path()).await;
            let mut first =
                commit_request("g", -1, "", &[("t", 0, 42), ("t", 1, 7), ("t", -1, 1), ("t", 2, 9)]);
            first.offsets[0].3 = 3;
            first.offsets[0].4 = Some("at 42".into());
            first.offsets[3].4 = Some("x".repeat(4097));
            let results = coordinator.commit_offsets(first).await;
            let expected = vec![
                (("t".into(), 0), Ok(())),
                (("t".into(), 1), Ok(())),
                (("t".into(), -1), Err(GroupError::UnknownTopicOrPartition)),
                (("t".into(), 2), Err(GroupError::OffsetMetadataTooLarge)),
            ];
            assert_eq!(results, expected);
            let committed = vec![("t".into(), 0, 42, 3, Some("at 42".into())), ("t".into(), 1, 7, -1, None)];
            assert_eq!(coordinator.fetch_offsets("g", None), committed);
            let some = coordinator.fetch_offsets("g", Some(vec![("t".into(), 1), ("t".into(), 9)]));
            assert_eq!(some, vec![("t".into(), 1, 7, -1, None), ("t".into(), 9, -1, -1, None)]);
            let later = coordinator.commit_offsets(commit_request("g", -1, "", &[("t", 0, 50)])).await;
            assert_eq!(errors(later), vec![Ok(())]);
            assert_eq!(coordinator.list_groups(), vec![("g".into(), String::new(), "Empty".into())]);
            let member = coordinator.commit_offsets(commit_request("g", 5, "someone", &[("t", 0, 1)])).await;
            assert_eq!(errors(member), vec![Err(GroupError::UnknownMemberId)]);
            let unknown_group =
                coordinator.commit_offsets(commit_request("h", 5, "someone", &[("t", 0, 1)])).await;
            assert_eq!(errors(unknown_group), vec![Err(GroupError::IllegalGeneration)]);

            let live = form_group(&coordinator, vec![join_request("live", "", "a")]).await;
            let standalone = coordinator.commit_offsets(commit_request("live", -1, "", &[("t", 0, 1)])).await;
            assert_eq!(errors(standalone), vec![Err(GroupError::UnknownMemberId)], "the group has members");
            let wrong = coordinator
                .commit_offsets(commit_request("live", 7, &live[0].member_id, &[("t", 0, 1)]))
                .await;
            assert_eq!(errors(wrong), vec![Err(GroupError::IllegalGeneration)]);
            let right = coordinator
                .commit_offsets(commit_request("live", 1, &live[0].member_id, &[("u", 3, 30)]))
                .await;
            assert_eq!(errors(right), vec![Ok(())]);
            coordinator.close().await;

            let coordinator = open(dir.path()).await;
            let replayed = vec![("t".into(), 0, 50, -1, None), ("t".into(), 1, 7, -1, None)];
            assert_eq!(coordinator.fetch_offsets("g", None), replayed, "the later commit of t/0 wins");
            assert_eq!(coordinator.fetch_offsets("live", None), vec![("u".into(), 3, 30, -1, None)]);
            assert_eq!(coordinator.describe_group("live").state, "Empty", "membership is not persisted");
            coordinator.close().await;

            // Every commit is one valid RecordBatch v2 (CRC-32C checked by parse_all).
            let log = Log::open(&dir.path().join("groups"), LogConfig::default()).await.unwrap();
            let bytes = log.read(0, 1 << 20).await.unwrap().expect("batches");
            let headers = batch::parse_all(&bytes).unwrap();
            assert_eq!(headers.iter().map(|h| h.record_count).collect::<Vec<_>>(), vec![2, 1, 1]);
            log.close().await.unwrap();
        });
    }

    #[test]
    fn groups_are_independent() {
        let dir = tempfile::tempdir().unwrap();
        run(async {
            let coordinator = open(dir.path()).await;
            let one = form_group(&coordinator, vec![join_request("one", "", "a")]).await.remove(0);
            let two = form_group(&coordinator, vec![join_request("two", "", "b")]).await.remove(0);
            let mut newcomer = pin!(coordinator.join(join_request("one", "", "c")));
            assert!(future::poll_once(&mut newcomer).await.is_none());
            assert_eq!(
                coordinator.heartbeat("one", 1, &one.member_id, None),
                Err(GroupError::RebalanceInProgress)
            );
            assert_eq!(coordinator.heartbeat("two", 1, &two.member_id, None), Ok(()));
            assert_eq!(
                coordinator.heartbeat("two", 1, &one.member_id, None),
                Err(GroupError::UnknownMemberId)
            );
            let listed = coordinator.list_groups();
            let expected: Vec<(String, String, String)> = vec![
                ("one".into(), "consumer".into(), "PreparingRebalance".into()),
                ("two".into(), "consumer".into(), "Stable".into()),
            ];
            assert_eq!(listed, expected);
            let commit =
                coordinator.commit_offsets(commit_request("two", 1, &two.member_id, &[("t", 0, 5)])).await;
            assert_eq!(errors(commit), vec![Ok(())]);
            assert_eq!(
                coordinator.fetch_offsets("one", Some(vec![("t".into(), 0)])),
                vec![("t".into(), 0, -1, -1, None)]
            );
            assert_eq!(
                coordinator.fetch_offsets("two", Some(vec![("t".into(), 0)])),
                vec![("t".into(), 0, 5, -1, None)]
            );

            coordinator.close().await;
            assert_eq!(
                newcomer.await,
                Err(GroupError::CoordinatorNotAvailable),
                "parked joins hear of the close"
            );
        });
    }

    #[test]
    fn offset_records_round_trip_and_damaged_ones_are_refused() {
        let committed = |offset, metadata: Option<&str>| CommittedOffset {
            offset,
            leader_epoch: 4,
            metadata: metadata.map(str::to_owned),
            commit_timestamp_ms: 1_700_000_000_000,
            log_end: 0,
        };
        let entries = vec![
            ("orders".to_owned(), 0, committed(12, None)),
            ("orders".to_owned(), 7, committed(-1, Some("é"))),
        ];
        let bytes = encode_commit_batch("group", &entries, 1_700_000_000_000);
        let header = batch::parse(&bytes).unwrap();
        assert_eq!(header.record_count, 2);
        let records = decode_commit_batch(&bytes, &header).unwrap();
        let decoded: Vec<(String, i32, CommittedOffset)> = records
            .into_iter()
            .map(|r| match r {
                LogRecord::Commit(r) if r.group_id == "group" => (r.topic, r.partition, r.committed),
                other => panic!("not a commit of the group: {other:?}"),
            })
            .collect();
        assert_eq!(decoded, entries);
        for cut in 0..bytes.len() {
            assert!(
                decode_commit_batch(&bytes[..cut], &header).is_err(),
                "a batch cut at {cut} must be refused"
            );
        }
        assert_eq!(snapshot_start(&bytes, &header), None, "a commit is no snapshot marker");
        let single = encode_commit_batch("group", &entries[..1], 1_700_000_000_000);
        assert_eq!(snapshot_start(&single, &batch::parse(&single).unwrap()), None);

        let marker = encode_snapshot_marker(4_321, 1_700_000_000_000);
        let header = batch::parse(&marker).unwrap();
        assert_eq!(decode_commit_batch(&marker, &header).unwrap(), vec![LogRecord::SnapshotStart(4_321)]);
        assert_eq!(snapshot_start(&marker, &header), Some(4_321));
        for cut in 0..marker.len() {
            assert!(decode_commit_batch(&marker[..cut], &header).is_err(), "a marker cut at {cut}");
        }
    }

    #[test]
    fn errors_carry_kafkas_codes_and_requests_can_cross_cores() {
        fn crosses_cores<T: std::fmt::Debug + Send + 'static>() {}
        crosses_cores::<JoinRequest>();
        crosses_cores::<JoinResult>();
        crosses_cores::<SyncRequest>();
        crosses_cores::<SyncResult>();
        crosses_cores::<CommitRequest>();
        crosses_cores::<GroupDescription>();
        let codes = [
            (GroupError::UnknownMemberId, 25),
            (GroupError::CoordinatorLoadInProgress, 14),
            (GroupError::NotCoordinator, 16),
            (GroupError::IllegalGeneration, 22),
            (GroupError::RebalanceInProgress, 27),
            (GroupError::MemberIdRequired(String::new()), 79),
            (GroupError::FencedInstanceId, 82),
            (GroupError::InconsistentGroupProtocol, 23),
            (GroupError::InvalidSessionTimeout, 26),
            (GroupError::CoordinatorNotAvailable, 15),
            (GroupError::OffsetsTopicUnavailable(String::new()), 15),
            (GroupError::GroupIdNotFound, 69),
            (GroupError::Storage(String::new()), 56),
        ];
        for (error, code) in codes {
            assert_eq!(error.kafka_code(), code, "{error:?}");
        }
    }
}
