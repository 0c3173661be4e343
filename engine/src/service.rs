//! The native protocol's [`Handler`]: turns decoded requests into shard calls and shard
//! results into responses. Per-partition failures become per-partition error codes; the rest
//! of the request still succeeds.
//!
//! Metadata names each partition's leader. On a node of its own that is this node, at the
//! host the client asked (an empty host) and the owning shard's port. In a cluster a replicated
//! partition is described as this node last heard of it: its leader (else its preferred
//! leader, `replicas[0]`, which answers `NotLeader` if it is not), that node's native host and
//! the port of the shard owning the partition there, the leader's epoch and the replicas;
//! every registered node is listed, so a client can ask another node when one goes away.

use std::cell::Cell;
use std::rc::Rc;
use std::time::Duration;

use futures_util::future::join_all;

use pyralog_net::codec::{
    Acks, ErrorCode, FetchPartitionResult, ListOffsetsPartitionResult, MetadataResponse, NodeInfo,
    PartitionInfo, ProducePartitionResult, Request, Response, ResponseFrame, ShardInfo, TopicInfo,
};
use pyralog_net::server::Handler;
use pyralog_shard::cluster::{ClusterMeta, TopicPlacement};
use pyralog_shard::producers::Refusal;
use pyralog_shard::topics::TopicConfig;
use pyralog_shard::{Shard, ShardError};

use crate::fetch;

/// The ports every shard serves, for metadata responses.
#[derive(Debug, Clone)]
pub struct Topology {
    pub shards: Vec<ShardInfo>,
    /// Each shard's own Kafka port, by shard id.
    pub kafka_ports: Vec<u16>,
}

pub struct Service {
    pub shard: Rc<Shard>,
    pub topology: Rc<Topology>,
    /// This node's id, which metadata names as the leader of a partition of one replica.
    pub node_id: u32,
    /// The shared native port, which metadata gives as this node's port.
    pub shared_port: u16,
    pub producer_ids: Rc<ProducerIds>,
}

/// The producer ids a shard hands out to idempotent producers of both protocols: without a
/// cluster `first + shard + shards * n` (`first`: the node's start in ms, so a restart never
/// repeats one), in a cluster from the blocks its controller reserves for the node
/// (`Shard::next_producer_id`).
pub struct ProducerIds {
    first: i64,
    issued: Cell<i64>,
}

impl ProducerIds {
    pub fn new(first: i64) -> ProducerIds {
        ProducerIds { first, issued: Cell::new(0) }
    }

    pub async fn next(&self, shard: &Shard) -> Result<i64, ShardError> {
        if shard.cluster_meta().is_some() {
            return shard.next_producer_id().await;
        }
        let n = self.issued.get();
        self.issued.set(n + 1);
        Ok(self.first + shard.id as i64 + shard.count as i64 * n)
    }
}

pub fn error_code(error: &ShardError) -> ErrorCode {
    match error {
        ShardError::UnknownTopic(_) => ErrorCode::UnknownTopic,
        ShardError::UnknownPartition { .. } => ErrorCode::UnknownPartition,
        ShardError::TopicAlreadyExists(_) => ErrorCode::TopicAlreadyExists,
        ShardError::InvalidTopic(_)
        | ShardError::InvalidConfig(_)
        | ShardError::InvalidPartitions(_)
        | ShardError::InvalidReplicationFactor(_) => ErrorCode::InvalidTopic,
        ShardError::OutOfOrderSequence(_) => ErrorCode::OutOfOrderSequence,
        ShardError::InvalidProducerEpoch(_) => ErrorCode::InvalidProducerEpoch,
        ShardError::CorruptBatch(_) => ErrorCode::CorruptBatch,
        ShardError::TooLarge(_) => ErrorCode::MessageTooLarge,
        ShardError::OffsetOutOfRange(_) => ErrorCode::OffsetOutOfRange,
        ShardError::Storage(_) => ErrorCode::StorageError,
        ShardError::ShuttingDown => ErrorCode::ShuttingDown,
        ShardError::NotLeader { .. } => ErrorCode::NotLeader,
        ShardError::NotController { .. } => ErrorCode::NotController,
        ShardError::Unavailable(_) => ErrorCode::Overloaded,
        ShardError::NotEnoughReplicas { .. } => ErrorCode::NotEnoughReplicas,
        ShardError::AfterRefusal { refusal, .. } => match refusal {
            Refusal::NotLeader => ErrorCode::NotLeader,
            Refusal::NotEnoughReplicas => ErrorCode::NotEnoughReplicas,
            Refusal::Storage => ErrorCode::StorageError,
        },
        // Native requests name no leader epoch, so these come from Kafka clients only.
        ShardError::FencedLeaderEpoch { .. } | ShardError::UnknownLeaderEpoch { .. } => ErrorCode::NotLeader,
    }
}

impl Service {
    /// A native CreateTopic: a replication factor (or write quorum) needs a cluster.
    async fn create_topic(
        &self,
        name: &str,
        partitions: u32,
        replication_factor: u32,
        min_insync_replicas: u32,
    ) -> Result<(), ShardError> {
        if self.shard.cluster_meta().is_none() && (replication_factor > 1 || min_insync_replicas > 1) {
            return Err(ShardError::InvalidReplicationFactor(format!(
                "replication factor {replication_factor} (write quorum {min_insync_replicas}): this node is a \
                 cluster of one, so only 1 is possible; start nodes with --seeds to form a cluster"
            )));
        }
        let config = TopicConfig {
            replication_factor: (replication_factor > 0).then_some(replication_factor),
            min_insync_replicas: (min_insync_replicas > 0).then_some(min_insync_replicas),
            ..TopicConfig::default()
        };
        self.shard.create_topic(name, partitions, config).await
    }
}

impl Handler for Service {
    async fn handle(&self, correlation_id: u64, request: Request) -> Option<ResponseFrame> {
        let result = match request {
            Request::Metadata { topics } => Ok(Response::Metadata(self.metadata(&topics))),
            Request::CreateTopic { name, partitions, replication_factor, min_insync_replicas } => self
                .create_topic(&name, partitions, replication_factor, min_insync_replicas)
                .await
                .map(|()| Response::CreateTopic),
            Request::DeleteTopic { name } => {
                self.shard.delete_topic(&name).await.map(|()| Response::DeleteTopic)
            }
            Request::InitProducerId => self
                .producer_ids
                .next(&self.shard)
                .await
                .map(|producer_id| Response::InitProducerId { producer_id, producer_epoch: 0 }),
            Request::Produce(produce) => {
                let acks = match produce.acks {
                    Acks::None => pyralog_shard::Acks::None,
                    _ => pyralog_shard::Acks::All,
                };
                let appends = produce.partitions.into_iter().map(|p| {
                    let shard = &self.shard;
                    let topic = &produce.topic;
                    async move {
                        match shard.produce(topic, p.partition, p.records, acks).await {
                            Ok(done) => ProducePartitionResult {
                                partition: p.partition,
                                error: ErrorCode::None,
                                message: String::new(),
                                base_offset: done.base_offset,
                                next_offset: done.next_offset,
                            },
                            Err(error) => ProducePartitionResult {
                                partition: p.partition,
                                error: error_code(&error),
                                message: error.to_string(),
                                base_offset: -1,
                                next_offset: -1,
                            },
                        }
                    }
                });
                let results = join_all(appends).await;
                if acks == pyralog_shard::Acks::None {
                    return None;
                }
                Ok(Response::Produce(results))
            }
            Request::Fetch(fetch) => {
                // The request's max_bytes bounds the whole response; a partition's own
                // max_bytes (0: none) bounds its share.
                let wanted: Vec<fetch::Wanted<'_>> = fetch
                    .partitions
                    .iter()
                    .map(|p| fetch::Wanted {
                        topic: &fetch.topic,
                        partition: p.partition,
                        offset: p.offset,
                        max_bytes: p.max_bytes,
                        current_leader_epoch: -1,
                    })
                    .collect();
                let max_wait = Duration::from_millis(u64::from(fetch.max_wait_ms));
                let results =
                    fetch::fetch(&self.shard, &wanted, fetch.max_bytes, fetch.min_bytes, max_wait).await;
                let partitions = fetch.partitions.iter().zip(results).map(|(p, result)| match result {
                    Ok(fetched) => FetchPartitionResult {
                        partition: p.partition,
                        error: ErrorCode::None,
                        message: String::new(),
                        high_watermark: fetched.high_watermark,
                        log_start_offset: fetched.log_start_offset,
                        records: fetched.records,
                    },
                    Err(error) => FetchPartitionResult {
                        partition: p.partition,
                        error: error_code(&error),
                        message: error.to_string(),
                        high_watermark: -1,
                        log_start_offset: -1,
                        records: Vec::new(),
                    },
                });
                Ok(Response::Fetch(partitions.collect()))
            }
            Request::ListOffsets(list) => {
                let mut results = Vec::with_capacity(list.partitions.len());
                for p in &list.partitions {
                    let result = self
                        .shard
                        .list_offsets(&list.topic, p.partition, p.timestamp, None)
                        .await
                        .map(|l| l.offset);
                    results.push(match result {
                        Ok(offset) => ListOffsetsPartitionResult {
                            partition: p.partition,
                            error: ErrorCode::None,
                            message: String::new(),
                            offset,
                        },
                        Err(error) => ListOffsetsPartitionResult {
                            partition: p.partition,
                            error: error_code(&error),
                            message: error.to_string(),
                            offset: -1,
                        },
                    });
                }
                Ok(Response::ListOffsets(results))
            }
        };
        Some(match result {
            Ok(body) => ResponseFrame::ok(correlation_id, body),
            Err(error) => ResponseFrame::error(correlation_id, error_code(&error), error.to_string()),
        })
    }
}

impl Service {
    fn metadata(&self, wanted: &[String]) -> MetadataResponse {
        let table = self.shard.topics();
        let cluster = self.shard.cluster_meta();
        let describe = |name: &str, count: u32| TopicInfo {
            name: name.to_owned(),
            error: ErrorCode::None,
            partitions: (0..count)
                .map(|partition| match cluster.as_ref().and_then(|c| Some((c, c.topics.get(name)?))) {
                    Some((cluster, placement)) => {
                        self.describe_replicated(cluster, name, placement, partition)
                    }
                    None => self.describe_local(name, partition),
                })
                .collect(),
        };
        let topics = if wanted.is_empty() {
            // Internal topics are described only when asked for by name.
            table
                .iter()
                .filter(|(name, _)| !pyralog_shard::is_internal_topic(name))
                .map(|(name, count)| describe(name, count))
                .collect()
        } else {
            wanted
                .iter()
                .map(|name| match table.get(name) {
                    Some(count) => describe(name, count),
                    None => TopicInfo {
                        name: name.clone(),
                        error: ErrorCode::UnknownTopic,
                        partitions: Vec::new(),
                    },
                })
                .collect()
        };
        MetadataResponse {
            shards: self.topology.shards.clone(),
            topics,
            nodes: self.nodes(cluster.as_ref()),
            node_id: self.node_id,
        }
    }

    /// A partition this node holds alone: led by this node, on the owning shard's port.
    fn describe_local(&self, name: &str, partition: u32) -> PartitionInfo {
        let shard = self.shard.owner_of(name, partition);
        let port = self.topology.shards.get(shard).map_or(0, |s| s.port);
        PartitionInfo::single_node(partition, shard as u32, port, self.node_id)
    }

    /// A replicated partition: its leader as this node last heard (else its preferred leader),
    /// and that node's shard owning the partition, as `engine::kafka` describes it to Kafka.
    fn describe_replicated(
        &self,
        cluster: &ClusterMeta,
        name: &str,
        placement: &TopicPlacement,
        partition: u32,
    ) -> PartitionInfo {
        let replicas = placement.replicas.get(partition as usize).cloned().unwrap_or_default();
        let (leader, epoch) = self.shard.partition_leader(placement, partition);
        let node = leader.and_then(|leader| cluster.nodes.get(&leader));
        let (shard, host, port) = match node {
            Some(node) => {
                let shard = pyralog_shard::topics::owner_shard(name, partition, node.shards as usize);
                let port = node.native_shard_ports.get(shard).copied().unwrap_or(node.native_port);
                (shard as u32, node.native_host.clone(), port)
            }
            // A leader not registered yet: its shard and port are unknown; the client asks
            // this node, which answers NotLeader until the leader registers.
            None => (0, String::new(), 0),
        };
        PartitionInfo {
            partition,
            shard,
            port,
            host,
            leader_node: leader.unwrap_or(self.node_id),
            leader_epoch: epoch,
            replicas,
        }
    }

    /// Every node of the cluster, or this one alone.
    fn nodes(&self, cluster: Option<&ClusterMeta>) -> Vec<NodeInfo> {
        let Some(cluster) = cluster.filter(|c| !c.nodes.is_empty()) else {
            return vec![NodeInfo {
                id: self.node_id,
                host: String::new(),
                port: self.shared_port,
                shard_ports: self.topology.shards.iter().map(|s| s.port).collect(),
            }];
        };
        cluster
            .nodes
            .values()
            .map(|node| NodeInfo {
                id: node.id,
                host: node.native_host.clone(),
                port: node.native_port,
                shard_ports: node.native_shard_ports.clone(),
            })
            .collect()
    }
}
