//! The Kafka listener's [`KafkaHandler`]: Kafka requests turned into shard calls.
//!
//! Batches go from the produce request to the log and from the log (or the shard cache) to the
//! fetch response as the same bytes: no record is decoded or re-encoded on either path.
//!
//! Each shard is a Kafka broker of its own (node id = shard id, at its own Kafka port), and
//! metadata names the shard that owns a partition as its leader, so Kafka clients send each
//! partition's requests straight to the owning core. The shared port answers everything too
//! (it is the bootstrap address), hopping to the owner when needed, as the broker of the shard
//! that accepted the connection: ListGroups there lists that shard's groups (see `groups`).

use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;

use futures_util::future::join_all;
use pyralog_net::kafka::messages::*;
use pyralog_net::kafka::wire::{Records, Uuid};
use pyralog_net::kafka::{error, Request, RequestBody, ResponseBody};
use pyralog_net::server::KafkaHandler;
use pyralog_shard::cluster::{ClusterMeta, TopicPlacement};
use pyralog_shard::producers::Refusal;
use pyralog_shard::topics::{TopicConfig, TopicMeta};
use pyralog_shard::{FetchLimits, GroupError, GroupId, Shard, ShardError};

use crate::{fetch, groups};

/// ListOffsets' timestamp asking for the record with the largest timestamp (v7+).
const MAX_TIMESTAMP: i64 = -3;
/// FindCoordinator's key type of a consumer group, and of a transactional id.
const COORDINATOR_KEY_GROUP: i8 = 0;
const COORDINATOR_KEY_TRANSACTION: i8 = 1;
/// What a transactional producer is told. Transactions are refused with
/// TRANSACTIONAL_ID_AUTHORIZATION_FAILED because clients take that error as final: librdkafka
/// fails init_transactions() at once with this message, and the Java client's transaction
/// manager fails on it too (with Kafka's own text). The honest COORDINATOR_NOT_AVAILABLE is
/// retried until the client's own timeout (10 s to 2 min).
const TRANSACTIONS_REFUSED: &str = "transactions are not supported by Pyralog yet (there is no \
    transaction coordinator); drop transactional.id, and keep enable.idempotence for \
    exactly-once appends per partition";

/// Settings of the Kafka listener, the same on every shard.
#[derive(Debug, Clone)]
pub struct KafkaSettings {
    /// Host and port clients are told to connect to.
    pub advertised_host: String,
    pub advertised_port: u16,
    pub auto_create_topics: bool,
    /// Partitions of an auto-created topic, or of CreateTopics with -1.
    pub default_partitions: u32,
    /// What DescribeConfigs reports as the node's settings.
    pub max_message_bytes: u32,
    pub segment_bytes: u64,
    pub retention_bytes: Option<u64>,
    pub retention_ms: Option<u64>,
    /// The cluster's id (hex), as metadata reports it.
    pub cluster_id: String,
    /// This node's id: its shard i is broker `node_id × 1000 + i`.
    pub node_id: u32,
}

pub struct KafkaService {
    pub shard: Rc<Shard>,
    pub settings: Rc<KafkaSettings>,
    pub groups: groups::Groups,
    /// Each shard's own Kafka port, by shard id: the brokers of metadata responses.
    pub broker_ports: Vec<u16>,
    pub producer_ids: Rc<crate::service::ProducerIds>,
}

/// The Kafka error code for a shard error.
pub fn error_code(error: &ShardError) -> i16 {
    match error {
        ShardError::UnknownTopic(_) | ShardError::UnknownPartition { .. } => {
            error::UNKNOWN_TOPIC_OR_PARTITION
        }
        ShardError::TopicAlreadyExists(_) => error::TOPIC_ALREADY_EXISTS,
        ShardError::InvalidTopic(_) => error::INVALID_TOPIC_EXCEPTION,
        ShardError::InvalidConfig(_) => error::INVALID_CONFIG,
        ShardError::InvalidPartitions(_) => error::INVALID_PARTITIONS,
        ShardError::InvalidReplicationFactor(_) => error::INVALID_REPLICATION_FACTOR,
        ShardError::CorruptBatch(_) => error::CORRUPT_MESSAGE,
        ShardError::TooLarge(_) => error::MESSAGE_TOO_LARGE,
        ShardError::OffsetOutOfRange(_) => error::OFFSET_OUT_OF_RANGE,
        ShardError::OutOfOrderSequence(_) => error::OUT_OF_ORDER_SEQUENCE_NUMBER,
        ShardError::InvalidProducerEpoch(_) => error::INVALID_PRODUCER_EPOCH,
        ShardError::Storage(_) => error::KAFKA_STORAGE_ERROR,
        // Retriable: the client refreshes metadata and tries again.
        ShardError::ShuttingDown | ShardError::NotLeader { .. } => error::NOT_LEADER_OR_FOLLOWER,
        ShardError::NotController { .. } => error::NOT_CONTROLLER,
        ShardError::Unavailable(_) => error::REQUEST_TIMED_OUT,
        ShardError::FencedLeaderEpoch { .. } => error::FENCED_LEADER_EPOCH,
        ShardError::UnknownLeaderEpoch { .. } => error::UNKNOWN_LEADER_EPOCH,
        ShardError::NotEnoughReplicas { .. } => error::NOT_ENOUGH_REPLICAS,
        // The refused batch's own answer: retried in order, never renumbered.
        ShardError::AfterRefusal { refusal, .. } => match refusal {
            Refusal::NotLeader => error::NOT_LEADER_OR_FOLLOWER,
            Refusal::NotEnoughReplicas => error::NOT_ENOUGH_REPLICAS,
            Refusal::Storage => error::KAFKA_STORAGE_ERROR,
        },
    }
}

impl KafkaHandler for KafkaService {
    async fn handle(&self, request: Request, peer: std::net::SocketAddr) -> Option<ResponseBody> {
        let version = request.header.request_api_version;
        let client_id = request.header.client_id.unwrap_or_default();
        Some(match request.body {
            RequestBody::ApiVersions(_) => ResponseBody::ApiVersions(api_versions()),
            RequestBody::Metadata(body) => ResponseBody::Metadata(self.metadata(body).await),
            RequestBody::Produce(body) => {
                return self.produce(body, version).await.map(ResponseBody::Produce)
            }
            RequestBody::Fetch(body) => ResponseBody::Fetch(self.fetch(body, version).await),
            RequestBody::ListOffsets(body) => {
                ResponseBody::ListOffsets(self.list_offsets(body, version).await)
            }
            RequestBody::CreateTopics(body) => ResponseBody::CreateTopics(self.create_topics(body).await),
            RequestBody::DeleteTopics(body) => {
                ResponseBody::DeleteTopics(self.delete_topics(body, version).await)
            }
            RequestBody::CreatePartitions(body) => {
                ResponseBody::CreatePartitions(self.create_partitions(body).await)
            }
            RequestBody::DescribeConfigs(body) => ResponseBody::DescribeConfigs(self.describe_configs(body)),
            RequestBody::InitProducerId(body) => {
                ResponseBody::InitProducerId(self.init_producer_id(body).await)
            }
            RequestBody::OffsetForLeaderEpoch(body) => {
                ResponseBody::OffsetForLeaderEpoch(self.offset_for_leader_epoch(body).await)
            }
            RequestBody::FindCoordinator(body) => {
                ResponseBody::FindCoordinator(self.find_coordinator(body).await)
            }
            RequestBody::JoinGroup(body) => {
                ResponseBody::JoinGroup(self.groups.join(&self.shard, body, version, client_id, peer).await)
            }
            RequestBody::SyncGroup(body) => {
                ResponseBody::SyncGroup(self.groups.sync(&self.shard, body).await)
            }
            RequestBody::Heartbeat(body) => {
                ResponseBody::Heartbeat(self.groups.heartbeat(&self.shard, body).await)
            }
            RequestBody::LeaveGroup(body) => {
                ResponseBody::LeaveGroup(self.groups.leave(&self.shard, body, version).await)
            }
            RequestBody::OffsetCommit(body) => {
                ResponseBody::OffsetCommit(self.groups.commit(&self.shard, body, version).await)
            }
            RequestBody::OffsetFetch(body) => {
                ResponseBody::OffsetFetch(self.groups.fetch_offsets(&self.shard, body, version).await)
            }
            RequestBody::ListGroups(body) => {
                ResponseBody::ListGroups(self.groups.list(&self.shard, body).await)
            }
            RequestBody::DescribeGroups(body) => {
                ResponseBody::DescribeGroups(self.groups.describe(&self.shard, body).await)
            }
        })
    }
}

fn api_versions() -> api_versions_response::ApiVersionsResponse {
    use api_versions_response::{ApiVersion, ApiVersionsResponse};
    ApiVersionsResponse {
        error_code: error::NONE,
        api_keys: pyralog_net::kafka::SUPPORTED
            .iter()
            .map(|&(api_key, min_version, max_version)| ApiVersion { api_key, min_version, max_version })
            .collect(),
        ..Default::default()
    }
}

impl KafkaService {
    /// Creates `topic` if it is missing and auto-creation is on; true when it exists now.
    async fn ensure_topic(&self, topic: &str, allow: bool) -> Result<bool, ShardError> {
        if self.shard.topics().get(topic).is_some() {
            return Ok(true);
        }
        if !(allow && self.settings.auto_create_topics) {
            return Ok(false);
        }
        match self.shard.create_topic(topic, self.settings.default_partitions, TopicConfig::default()).await {
            Ok(()) | Err(ShardError::TopicAlreadyExists(_)) => Ok(true),
            Err(error) => Err(error),
        }
    }

    /// Every shard of every node as a Kafka broker: the registered nodes but those counted as
    /// down (as Kafka lists only live brokers: a client then does not try a dead node's
    /// address, or another cluster's node found there), and this one even before its
    /// registration is applied (a client must always find a broker to ask).
    fn brokers(
        &self,
        cluster: Option<&ClusterMeta>,
        down: &[u32],
    ) -> Vec<metadata_response::MetadataResponseBroker> {
        let own = || {
            self.broker_ports.iter().enumerate().map(|(shard, port)| {
                metadata_response::MetadataResponseBroker {
                    node_id: broker_id(self.settings.node_id, shard),
                    host: self.settings.advertised_host.clone(),
                    port: i32::from(*port),
                    rack: None,
                }
            })
        };
        let Some(cluster) = cluster else { return own().collect() };
        let mut brokers = Vec::new();
        if !cluster.nodes.contains_key(&self.settings.node_id) {
            brokers.extend(own());
        }
        let listed =
            cluster.nodes.values().filter(|n| n.id == self.settings.node_id || !down.contains(&n.id));
        for node in listed {
            for (shard, port) in node.kafka_shard_ports.iter().enumerate() {
                brokers.push(metadata_response::MetadataResponseBroker {
                    node_id: broker_id(node.id, shard),
                    host: node.kafka_host.clone(),
                    port: i32::from(*port),
                    rack: node.rack.clone(),
                });
            }
        }
        brokers
    }

    /// A replicated partition as metadata describes it: its leader and epoch
    /// (`Shard::partition_leader`), its replicas as the brokers of the shards owning it on each
    /// node, and its in-sync replicas: measured where this node leads the partition
    /// (`in_sync`); elsewhere this node does not know them, and names every replica. Either
    /// way without the nodes counted down (`down`), but the leader: as Kafka's controller
    /// takes a dead broker out of every ISR at once, not after the replica lag time.
    fn describe_replicated(
        &self,
        cluster: &ClusterMeta,
        in_sync: &HashMap<GroupId, Vec<u32>>,
        down: &[u32],
        name: &str,
        placement: &TopicPlacement,
        partition: u32,
    ) -> metadata_response::MetadataResponsePartition {
        let replicas = &placement.replicas[partition as usize];
        let broker_of = |node: u32| {
            let shards = cluster.nodes.get(&node).map_or(1, |n| n.shards as usize);
            broker_id(node, pyralog_shard::topics::owner_shard(name, partition, shards))
        };
        let (leader, epoch) = self.shard.partition_leader(placement, partition);
        let replica_brokers: Vec<i32> = replicas.iter().map(|&n| broker_of(n)).collect();
        let isr_nodes = in_sync
            .get(&(placement.id, partition))
            .unwrap_or(replicas)
            .iter()
            .filter(|&&n| Some(n) == leader || !down.contains(&n))
            .map(|&n| broker_of(n))
            .collect();
        metadata_response::MetadataResponsePartition {
            error_code: if leader.is_some() { error::NONE } else { error::LEADER_NOT_AVAILABLE },
            partition_index: partition as i32,
            leader_id: leader.map_or(-1, broker_of),
            leader_epoch: epoch,
            offline_replicas: replicas.iter().filter(|n| down.contains(n)).map(|&n| broker_of(n)).collect(),
            replica_nodes: replica_brokers,
            isr_nodes,
        }
    }

    async fn metadata(&self, body: metadata_request::MetadataRequest) -> metadata_response::MetadataResponse {
        use metadata_response::*;
        let wanted: Option<Vec<String>> =
            body.topics.map(|topics| topics.into_iter().filter_map(|t| t.name).collect());
        let mut topics = Vec::new();
        let cluster = self.shard.cluster_meta();
        let cluster = cluster.as_ref();
        let in_sync = match cluster {
            Some(_) => self.shard.in_sync_led_here().await.unwrap_or_default(),
            None => HashMap::new(),
        };
        // The nodes counted as down, once for the whole answer: left out of the brokers, their
        // replicas listed as offline.
        let down = self.shard.nodes_down();
        let describe = |name: &str, meta: TopicMeta| MetadataResponseTopic {
            error_code: error::NONE,
            name: Some(name.to_owned()),
            topic_id: Uuid(meta.id),
            is_internal: pyralog_shard::is_internal_topic(name),
            partitions: (0..meta.partitions)
                .map(|partition| {
                    if let Some(placement) = cluster.and_then(|c| c.topics.get(name)) {
                        let cluster = cluster.expect("checked");
                        return self
                            .describe_replicated(cluster, &in_sync, &down, name, placement, partition);
                    }
                    let leader = broker_id(self.settings.node_id, self.shard.owner_of(name, partition));
                    MetadataResponsePartition {
                        error_code: error::NONE,
                        partition_index: partition as i32,
                        leader_id: leader,
                        leader_epoch: 0,
                        replica_nodes: vec![leader],
                        isr_nodes: vec![leader],
                        offline_replicas: Vec::new(),
                    }
                })
                .collect(),
            ..Default::default()
        };
        match wanted {
            None => {
                // Internal topics are named only when asked for, as Kafka's clients expect.
                let table = self.shard.topics();
                for (name, meta) in
                    table.iter_meta().filter(|(name, _)| !pyralog_shard::is_internal_topic(name))
                {
                    topics.push(describe(name, *meta));
                }
            }
            Some(names) => {
                for name in names {
                    let exists = self.ensure_topic(&name, body.allow_auto_topic_creation).await;
                    let meta = self.shard.topics().meta(&name);
                    topics.push(match (exists, meta) {
                        (Ok(true), Some(meta)) => describe(&name, meta),
                        (Err(error), _) => MetadataResponseTopic {
                            error_code: error_code(&error),
                            name: Some(name),
                            ..Default::default()
                        },
                        _ => MetadataResponseTopic {
                            error_code: error::UNKNOWN_TOPIC_OR_PARTITION,
                            name: Some(name),
                            ..Default::default()
                        },
                    });
                }
            }
        }
        // Every node forwards topic changes to the controller's leader, so clients are told to
        // send them here (as KRaft brokers name an alive broker, KIP-590): a client told of a
        // leader that just died would wait for it rather than read the metadata again.
        let controller = broker_id(self.settings.node_id, 0);
        MetadataResponse {
            brokers: self.brokers(cluster, &down),
            cluster_id: Some(self.settings.cluster_id.clone()),
            controller_id: controller,
            topics,
            ..Default::default()
        }
    }

    async fn produce(
        &self,
        body: produce_request::ProduceRequest,
        version: i16,
    ) -> Option<produce_response::ProduceResponse> {
        use produce_response::*;
        let acks = body.acks;
        let level = match acks {
            0 => pyralog_shard::Acks::None,
            1 => pyralog_shard::Acks::Leader,
            _ => pyralog_shard::Acks::All,
        };
        // A request refused as a whole still answers partition by partition.
        let refused = if version < 3 {
            Some((
                error::UNSUPPORTED_FOR_MESSAGE_FORMAT,
                format!(
                    "Produce v{version} carries the legacy message format; use Produce v3+ (RecordBatch v2)"
                ),
            ))
        } else if !(-1..=1).contains(&acks) {
            Some((error::INVALID_REQUIRED_ACKS, format!("acks={acks} is not 0, 1 or -1")))
        } else {
            None
        };
        let refused = &refused;
        let topics = body.topic_data.into_iter().map(|topic| async move {
            let exists =
                if refused.is_none() { self.ensure_topic(&topic.name, true).await } else { Ok(true) };
            let partitions = topic.partition_data.into_iter().map(|p| {
                let name = &topic.name;
                let exists = &exists;
                async move {
                    let result = match (refused, exists, p.records) {
                        (Some(refusal), _, _) => Err(refusal.clone()),
                        (_, Err(error), _) => Err((error_code(error), error.to_string())),
                        (_, Ok(false), _) => {
                            Err((error::UNKNOWN_TOPIC_OR_PARTITION, format!("unknown topic '{name}'")))
                        }
                        (_, _, None) => Err((error::INVALID_RECORD, "no records".to_owned())),
                        (_, _, Some(records)) => {
                            let partition = u32::try_from(p.index).unwrap_or(u32::MAX);
                            self.shard
                                .produce(name, partition, records.into_bytes(), level)
                                .await
                                .map_err(|error| (error_code(&error), error.to_string()))
                        }
                    };
                    match result {
                        Ok(done) => (
                            PartitionProduceResponse {
                                index: p.index,
                                error_code: error::NONE,
                                base_offset: done.base_offset,
                                log_append_time_ms: -1,
                                log_start_offset: -1,
                                ..Default::default()
                            },
                            None,
                        ),
                        Err((code, message)) => {
                            let hint = self.leader_hint(code, name, p.index);
                            let current_leader = hint.as_ref().map_or_else(Default::default, |hint| {
                                LeaderIdAndEpoch { leader_id: hint.broker, leader_epoch: hint.epoch }
                            });
                            let response = PartitionProduceResponse {
                                index: p.index,
                                error_code: code,
                                base_offset: -1,
                                log_append_time_ms: -1,
                                log_start_offset: -1,
                                error_message: Some(message),
                                current_leader,
                                ..Default::default()
                            };
                            (response, hint)
                        }
                    }
                }
            });
            let (partition_responses, hints): (Vec<_>, Vec<_>) =
                join_all(partitions).await.into_iter().unzip();
            (TopicProduceResponse { partition_responses, name: topic.name.clone() }, hints)
        });
        let (responses, hints): (Vec<_>, Vec<Vec<_>>) = join_all(topics).await.into_iter().unzip();
        let node_endpoints = LeaderHint::endpoints(hints.into_iter().flatten().flatten())
            .map(|(node_id, host, port, rack)| NodeEndpoint { node_id, host, port, rack })
            .collect();
        (acks != 0).then(|| ProduceResponse { responses, node_endpoints, ..Default::default() })
    }

    async fn fetch(&self, body: fetch_request::FetchRequest, version: i16) -> fetch_response::FetchResponse {
        use fetch_response::*;
        /// One partition asked for: its topic's name (`None`: no topic has the id it was
        /// asked by, from v13), the topic's id (v13+), and the partition's fields.
        struct Asked {
            topic: Option<String>,
            topic_id: Uuid,
            partition: i32,
            offset: i64,
            max_bytes: i32,
            /// -1 before v9.
            current_leader_epoch: i32,
        }
        let mut asked = Vec::new();
        for t in &body.topics {
            let topic =
                if version >= 13 { self.shard.topic_named(&t.topic_id.0) } else { Some(t.topic.clone()) };
            asked.extend(t.partitions.iter().map(|p| Asked {
                topic: topic.clone(),
                topic_id: t.topic_id,
                partition: p.partition,
                offset: p.fetch_offset,
                max_bytes: p.partition_max_bytes,
                current_leader_epoch: p.current_leader_epoch,
            }));
        }
        let wanted: Vec<fetch::Wanted<'_>> = asked
            .iter()
            .filter_map(|a| {
                Some(fetch::Wanted {
                    topic: a.topic.as_deref()?,
                    partition: u32::try_from(a.partition).unwrap_or(u32::MAX),
                    offset: a.offset,
                    max_bytes: a.max_bytes.max(1) as u32,
                    current_leader_epoch: a.current_leader_epoch,
                })
            })
            .collect();
        let max_wait = Duration::from_millis(body.max_wait_ms.max(0) as u64);
        let max_bytes = body.max_bytes.max(1) as u32;
        let mut results =
            fetch::fetch(&self.shard, &wanted, max_bytes, body.min_bytes.max(0) as u32, max_wait)
                .await
                .into_iter();
        drop(wanted);
        let refused = |partition_index: i32, error_code: i16| PartitionData {
            partition_index,
            error_code,
            high_watermark: -1,
            last_stable_offset: -1,
            log_start_offset: -1,
            aborted_transactions: Some(Vec::new()),
            preferred_read_replica: -1,
            records: Some(Records::default()),
            ..Default::default()
        };
        let mut responses: Vec<FetchableTopicResponse> = Vec::new();
        let mut hints = Vec::new();
        for a in asked {
            let data = match &a.topic {
                None => refused(a.partition, error::UNKNOWN_TOPIC_ID),
                Some(topic) => match results.next().expect("a result for each partition asked for") {
                    Ok(fetched) => PartitionData {
                        partition_index: a.partition,
                        error_code: error::NONE,
                        high_watermark: fetched.high_watermark,
                        last_stable_offset: fetched.high_watermark,
                        log_start_offset: fetched.log_start_offset,
                        aborted_transactions: Some(Vec::new()),
                        preferred_read_replica: -1,
                        records: Some(Records(fetched.records)),
                        ..Default::default()
                    },
                    Err(failed) => {
                        let code = error_code(&failed);
                        let mut data = refused(a.partition, code);
                        if let Some(hint) = self.leader_hint(code, topic, a.partition) {
                            data.current_leader =
                                LeaderIdAndEpoch { leader_id: hint.broker, leader_epoch: hint.epoch };
                            hints.push(hint);
                        }
                        data
                    }
                },
            };
            let topic = a.topic.unwrap_or_default();
            match responses.last_mut() {
                Some(last) if last.topic == topic && last.topic_id == a.topic_id => {
                    last.partitions.push(data)
                }
                _ => responses.push(FetchableTopicResponse {
                    topic,
                    topic_id: a.topic_id,
                    partitions: vec![data],
                }),
            }
        }
        assert!(results.next().is_none(), "every result was answered");
        let node_endpoints = LeaderHint::endpoints(hints)
            .map(|(node_id, host, port, rack)| NodeEndpoint { node_id, host, port, rack })
            .collect();
        FetchResponse {
            error_code: error::NONE,
            session_id: 0,
            responses,
            node_endpoints,
            ..Default::default()
        }
    }

    async fn list_offsets(
        &self,
        body: list_offsets_request::ListOffsetsRequest,
        version: i16,
    ) -> list_offsets_response::ListOffsetsResponse {
        use list_offsets_response::*;
        let mut topics = Vec::new();
        for topic in body.topics {
            let mut partitions = Vec::new();
            for p in topic.partitions {
                let partition = u32::try_from(p.partition_index).unwrap_or(u32::MAX);
                if p.timestamp == MAX_TIMESTAMP && version < 7 {
                    partitions.push(ListOffsetsPartitionResponse {
                        partition_index: p.partition_index,
                        error_code: error::UNSUPPORTED_VERSION,
                        timestamp: -1,
                        offset: -1,
                        ..Default::default()
                    });
                    continue;
                }
                // current_leader_epoch is -1 before v4: no epoch check, but still the leader's
                // answer, as Kafka gives it to consumers.
                let found = self
                    .shard
                    .list_offsets(&topic.name, partition, p.timestamp, Some(p.current_leader_epoch))
                    .await;
                let leader_epoch = found.as_ref().map_or(-1, |listed| listed.leader_epoch);
                let found = found.map(|listed| listed.offset);
                let (offset, timestamp) = match found {
                    Ok(offset) if p.timestamp >= 0 && offset >= 0 => {
                        let exact = self.record_at_time(&topic.name, partition, offset, p.timestamp).await;
                        (Ok(exact.0), exact.1)
                    }
                    Ok(offset) if p.timestamp == MAX_TIMESTAMP && offset >= 0 => {
                        // The batch holding the largest timestamp: find that record in it.
                        let exact = self.record_at_time(&topic.name, partition, offset, i64::MAX).await;
                        (Ok(exact.0), exact.1)
                    }
                    other => (other, -1),
                };
                partitions.push(match offset {
                    Ok(offset) => ListOffsetsPartitionResponse {
                        partition_index: p.partition_index,
                        error_code: error::NONE,
                        timestamp,
                        offset,
                        leader_epoch,
                        ..Default::default()
                    },
                    Err(error) => ListOffsetsPartitionResponse {
                        partition_index: p.partition_index,
                        error_code: error_code(&error),
                        timestamp: -1,
                        offset: -1,
                        ..Default::default()
                    },
                });
            }
            topics.push(ListOffsetsTopicResponse { name: topic.name, partitions });
        }
        ListOffsetsResponse { topics, ..Default::default() }
    }

    /// The first record at or after `timestamp` in the batch at `batch_offset` (the one the
    /// time index found): its offset and timestamp. A compressed batch is not decoded: its base
    /// offset and max timestamp stand for it.
    /// OffsetForLeaderEpoch (KIP-101, KIP-320): for each partition, from its leader, the
    /// largest epoch at or below the one asked and the offset it ends at; -1 and -1 for an
    /// epoch unknown there (see `pyralog_shard::epochs`). `replica_id` (v3+: -1 for a consumer,
    /// -2 for a debugging tool) changes nothing: this node's followers replicate by Raft, so
    /// every asker is answered as a consumer.
    async fn offset_for_leader_epoch(
        &self,
        body: offset_for_leader_epoch_request::OffsetForLeaderEpochRequest,
    ) -> offset_for_leader_epoch_response::OffsetForLeaderEpochResponse {
        use offset_for_leader_epoch_response::*;
        let topics = body.topics.into_iter().map(|topic| async move {
            let partitions = topic.partitions.into_iter().map(|p| {
                let name = &topic.topic;
                async move {
                    let partition = u32::try_from(p.partition).unwrap_or(u32::MAX);
                    let found = self
                        .shard
                        .end_of_epoch(name, partition, p.current_leader_epoch, p.leader_epoch)
                        .await;
                    let (error_code, (leader_epoch, end_offset)) = match found {
                        Ok(end) => (error::NONE, end.unwrap_or((-1, -1))),
                        Err(error) => (error_code(&error), (-1, -1)),
                    };
                    EpochEndOffset { error_code, partition: p.partition, leader_epoch, end_offset }
                }
            });
            OffsetForLeaderTopicResult { topic: topic.topic.clone(), partitions: join_all(partitions).await }
        });
        OffsetForLeaderEpochResponse { topics: join_all(topics).await, ..Default::default() }
    }

    async fn record_at_time(
        &self,
        topic: &str,
        partition: u32,
        batch_offset: i64,
        timestamp: i64,
    ) -> (i64, i64) {
        let limits = FetchLimits {
            max_bytes: 1,
            min_one_batch: true,
            min_bytes: 0,
            max_wait: Duration::ZERO,
            current_leader_epoch: -1,
        };
        let Ok(fetched) = self.shard.fetch(topic, partition, batch_offset, limits).await else {
            return (batch_offset, -1);
        };
        let Some(batch) = fetched.records.first() else { return (batch_offset, -1) };
        let Some(header) = pyralog_dma::batch::stored_header(batch) else { return (batch_offset, -1) };
        // i64::MAX asks for the record holding the batch's max timestamp.
        let timestamp = if timestamp == i64::MAX { header.max_timestamp } else { timestamp };
        let exact = pyralog_net::client::RecordReader::new(batch.slice(..header.total_bytes as usize))
            .map_while(Result::ok)
            .find(|record| record.timestamp_ms >= timestamp && record.offset >= batch_offset);
        match exact {
            Some(record) => (record.offset, record.timestamp_ms),
            None => (header.base_offset, header.max_timestamp),
        }
    }

    async fn create_topics(
        &self,
        body: create_topics_request::CreateTopicsRequest,
    ) -> create_topics_response::CreateTopicsResponse {
        use create_topics_response::*;
        let mut topics = Vec::new();
        for topic in body.topics {
            let partitions = if topic.num_partitions == -1 {
                self.settings.default_partitions as i32
            } else {
                topic.num_partitions
            };
            let mut config = TopicConfig::default();
            let mut failure: Option<(i16, String)> = None;
            let clustered = self.shard.cluster_meta().is_some();
            if clustered && topic.replication_factor != -1 {
                match u32::try_from(topic.replication_factor) {
                    Ok(factor) if factor > 0 => config.replication_factor = Some(factor),
                    _ => {
                        failure = Some((
                            error::INVALID_REPLICATION_FACTOR,
                            format!("replication factor {} is not positive", topic.replication_factor),
                        ))
                    }
                }
            } else if !clustered && !matches!(topic.replication_factor, -1 | 1) {
                // Metadata lists one broker per shard, so tools that size replication by the
                // broker count ask for more than the node has.
                failure = Some((
                    error::INVALID_REPLICATION_FACTOR,
                    format!(
                        "replication factor {}: the replication factor counts nodes, not the \
                         shard-brokers of the metadata (one per shard), and this is a single node \
                         (a cluster of one): only 1, or -1 (the default); start nodes with --seeds \
                         to form a cluster",
                        topic.replication_factor
                    ),
                ));
            } else if !topic.assignments.is_empty() {
                failure =
                    Some((error::INVALID_REQUEST, "manual replica assignments are not supported".to_owned()));
            } else if partitions <= 0 {
                failure = Some((error::INVALID_PARTITIONS, format!("{partitions} partitions")));
            }
            for setting in &topic.configs {
                if failure.is_some() {
                    break;
                }
                if let Err(message) = config.set(&setting.name, setting.value.as_deref().unwrap_or("")) {
                    failure = Some((error::INVALID_CONFIG, message));
                }
            }
            if failure.is_none() && body.validate_only {
                if let Err(error) = pyralog_shard::topics::validate_topic_name(&topic.name) {
                    failure = Some((error_code(&error), error.to_string()));
                } else if self.shard.topics().get(&topic.name).is_some() {
                    failure =
                        Some((error::TOPIC_ALREADY_EXISTS, format!("topic '{}' already exists", topic.name)));
                }
            } else if failure.is_none() {
                if let Err(error) = self.shard.create_topic(&topic.name, partitions as u32, config).await {
                    failure = Some((error_code(&error), error.to_string()));
                }
            }
            let meta = self.shard.topics().meta(&topic.name);
            let replication_factor = meta.and_then(|m| m.config.replication_factor).map_or(1, |f| f as i16);
            topics.push(match failure {
                None => CreatableTopicResult {
                    name: topic.name,
                    topic_id: Uuid(meta.map_or([0; 16], |m| m.id)),
                    error_code: error::NONE,
                    error_message: None,
                    num_partitions: partitions,
                    replication_factor,
                    configs: Some(Vec::new()),
                    ..Default::default()
                },
                Some((code, message)) => CreatableTopicResult {
                    name: topic.name,
                    error_code: code,
                    error_message: Some(message),
                    num_partitions: -1,
                    replication_factor: -1,
                    configs: None,
                    ..Default::default()
                },
            });
        }
        CreateTopicsResponse { topics, ..Default::default() }
    }

    async fn delete_topics(
        &self,
        body: delete_topics_request::DeleteTopicsRequest,
        version: i16,
    ) -> delete_topics_response::DeleteTopicsResponse {
        use delete_topics_response::*;
        let names: Vec<Option<String>> = if version >= 6 {
            body.topics
                .into_iter()
                .map(|t| t.name.or_else(|| self.shard.topic_named(&t.topic_id.0)))
                .collect()
        } else {
            body.topic_names.into_iter().map(Some).collect()
        };
        let mut responses = Vec::new();
        for name in names {
            let Some(name) = name else {
                responses.push(DeletableTopicResult {
                    name: None,
                    error_code: error::UNKNOWN_TOPIC_OR_PARTITION,
                    error_message: Some("no topic has that id".to_owned()),
                    ..Default::default()
                });
                continue;
            };
            let id = self.shard.topics().meta(&name).map_or([0; 16], |m| m.id);
            let result = self.shard.delete_topic(&name).await;
            responses.push(DeletableTopicResult {
                name: Some(name),
                topic_id: Uuid(id),
                error_code: result.as_ref().err().map_or(error::NONE, error_code),
                error_message: result.err().map(|e| e.to_string()),
            });
        }
        DeleteTopicsResponse { responses, ..Default::default() }
    }

    async fn create_partitions(
        &self,
        body: create_partitions_request::CreatePartitionsRequest,
    ) -> create_partitions_response::CreatePartitionsResponse {
        use create_partitions_response::*;
        let mut results = Vec::new();
        for topic in body.topics {
            let result = if topic.assignments.as_ref().is_some_and(|a| !a.is_empty()) {
                Err((error::INVALID_REQUEST, "manual replica assignments are not supported".to_owned()))
            } else if topic.count <= 0 {
                Err((error::INVALID_PARTITIONS, format!("{} partitions", topic.count)))
            } else if body.validate_only {
                match self.shard.topics().get(&topic.name) {
                    None => {
                        Err((error::UNKNOWN_TOPIC_OR_PARTITION, format!("unknown topic '{}'", topic.name)))
                    }
                    Some(now) if now >= topic.count as u32 => {
                        Err((error::INVALID_PARTITIONS, format!("topic has {now} partitions already")))
                    }
                    Some(_) => Ok(()),
                }
            } else {
                self.shard
                    .create_partitions(&topic.name, topic.count as u32)
                    .await
                    .map_err(|e| (error_code(&e), e.to_string()))
            };
            results.push(CreatePartitionsTopicResult {
                name: topic.name,
                error_code: result.as_ref().err().map_or(error::NONE, |e| e.0),
                error_message: result.err().map(|e| e.1),
            });
        }
        CreatePartitionsResponse { results, ..Default::default() }
    }

    fn describe_configs(
        &self,
        body: describe_configs_request::DescribeConfigsRequest,
    ) -> describe_configs_response::DescribeConfigsResponse {
        use describe_configs_response::*;
        const TOPIC: i8 = 2;
        const BROKER: i8 = 4;
        // config_source: 1 dynamic topic config, 4 static broker config, 5 default.
        let settings = &self.settings;
        let results = body
            .resources
            .into_iter()
            .map(|resource| {
                let topic_meta = (resource.resource_type == TOPIC)
                    .then(|| self.shard.topics().meta(&resource.resource_name))
                    .flatten();
                let error = match resource.resource_type {
                    TOPIC if topic_meta.is_none() => {
                        Some((error::UNKNOWN_TOPIC_OR_PARTITION, "unknown topic"))
                    }
                    TOPIC | BROKER => None,
                    _ => Some((error::INVALID_REQUEST, "only topic and broker configs are described")),
                };
                if let Some((code, message)) = error {
                    return DescribeConfigsResult {
                        error_code: code,
                        error_message: Some(message.to_owned()),
                        resource_type: resource.resource_type,
                        resource_name: resource.resource_name,
                        configs: Vec::new(),
                    };
                }
                let topic_max = topic_meta.and_then(|m| m.config.max_message_bytes);
                let node_source = |set: bool| if set { 4 } else { 5 };
                let entries: Vec<(&str, String, i8)> = vec![
                    (
                        "max.message.bytes",
                        topic_max.unwrap_or(settings.max_message_bytes).to_string(),
                        if topic_max.is_some() { 1 } else { 4 },
                    ),
                    (
                        "retention.ms",
                        settings.retention_ms.map_or("-1".to_owned(), |v| v.to_string()),
                        node_source(settings.retention_ms.is_some()),
                    ),
                    (
                        "retention.bytes",
                        settings.retention_bytes.map_or("-1".to_owned(), |v| v.to_string()),
                        node_source(settings.retention_bytes.is_some()),
                    ),
                    ("segment.bytes", settings.segment_bytes.to_string(), 4),
                    ("cleanup.policy", "delete".to_owned(), 5),
                    ("compression.type", "producer".to_owned(), 5),
                    ("message.timestamp.type", "CreateTime".to_owned(), 5),
                    // The write quorum W that acks=all needs in sync (a replicated topic's is
                    // in its placement); a partition of one node has only itself.
                    match topic_meta.and_then(|m| m.config.min_insync_replicas) {
                        Some(write_quorum) => ("min.insync.replicas", write_quorum.to_string(), 1),
                        None => ("min.insync.replicas", "1".to_owned(), 5),
                    },
                ];
                let configs = entries
                    .into_iter()
                    .filter(|(name, _, _)| {
                        resource.configuration_keys.as_ref().is_none_or(|keys| keys.iter().any(|k| k == name))
                    })
                    .map(|(name, value, source)| DescribeConfigsResourceResult {
                        name: name.to_owned(),
                        value: Some(value),
                        // Nothing can be altered over Kafka yet (no AlterConfigs).
                        read_only: true,
                        is_default: source == 5,
                        config_source: source,
                        is_sensitive: false,
                        synonyms: Vec::new(),
                        ..Default::default()
                    })
                    .collect();
                DescribeConfigsResult {
                    error_code: error::NONE,
                    error_message: None,
                    resource_type: resource.resource_type,
                    resource_name: resource.resource_name,
                    configs,
                }
            })
            .collect();
        DescribeConfigsResponse { results, ..Default::default() }
    }

    async fn init_producer_id(
        &self,
        body: init_producer_id_request::InitProducerIdRequest,
    ) -> init_producer_id_response::InitProducerIdResponse {
        use init_producer_id_response::InitProducerIdResponse;
        // InitProducerId carries no error message: TRANSACTIONS_REFUSED reaches clients through
        // FindCoordinator, which they ask first.
        if body.transactional_id.is_some() {
            return InitProducerIdResponse {
                error_code: error::TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
                producer_id: -1,
                producer_epoch: -1,
                ..Default::default()
            };
        }
        // A producer that knows its id asks for the next epoch (KIP-360); it keeps its id
        // until the epoch would overflow.
        if body.producer_id >= 0 && body.producer_epoch >= 0 && body.producer_epoch < i16::MAX - 1 {
            return InitProducerIdResponse {
                error_code: error::NONE,
                producer_id: body.producer_id,
                producer_epoch: body.producer_epoch + 1,
                ..Default::default()
            };
        }
        let producer_id = match self.producer_ids.next(&self.shard).await {
            Ok(id) => id,
            Err(failed) => {
                eprintln!("pyralog: InitProducerId: {failed}");
                return InitProducerIdResponse {
                    error_code: error::COORDINATOR_NOT_AVAILABLE,
                    producer_id: -1,
                    producer_epoch: -1,
                    ..Default::default()
                };
            }
        };
        InitProducerIdResponse {
            error_code: error::NONE,
            producer_id,
            producer_epoch: 0,
            ..Default::default()
        }
    }

    async fn find_coordinator(
        &self,
        body: find_coordinator_request::FindCoordinatorRequest,
    ) -> find_coordinator_response::FindCoordinatorResponse {
        use find_coordinator_response::*;
        let refused = |key: String, error_code: i16, message: String| Coordinator {
            key,
            node_id: -1,
            host: String::new(),
            port: -1,
            error_code,
            error_message: Some(message),
        };
        let mut answers = Vec::new();
        for key in std::iter::once(body.key.clone()).chain(body.coordinator_keys) {
            answers.push(match body.key_type {
                COORDINATOR_KEY_GROUP => match self.group_coordinator(&key).await {
                    Ok((node_id, host, port)) => {
                        Coordinator { key, node_id, host, port, error_code: error::NONE, error_message: None }
                    }
                    Err(failed) => refused(key, failed.kafka_code(), failed.to_string()),
                },
                COORDINATOR_KEY_TRANSACTION => refused(
                    key,
                    error::TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
                    TRANSACTIONS_REFUSED.to_owned(),
                ),
                other => refused(
                    key,
                    error::INVALID_REQUEST,
                    format!("key type {other} is neither 0 (consumer group) nor 1 (transactional id)"),
                ),
            });
        }
        let single = answers.remove(0);
        let coordinators = answers;
        FindCoordinatorResponse {
            error_code: single.error_code,
            error_message: single.error_message.clone(),
            node_id: single.node_id,
            host: single.host.clone(),
            port: single.port,
            coordinators,
            ..Default::default()
        }
    }
}

impl KafkaService {
    /// The broker (id, host, port) coordinating `group_id`: the shard of this node that owns
    /// its offsets log; in a cluster, the shard owning its offsets partition on the node that
    /// leads it (see `pyralog_shard::offsets`).
    async fn group_coordinator(&self, group_id: &str) -> Result<(i32, String, i32), GroupError> {
        if self.shard.cluster_meta().is_none() {
            let shard = pyralog_shard::group_log_of(group_id) % self.broker_ports.len().max(1);
            let port = self.broker_ports.get(shard).copied().unwrap_or(self.settings.advertised_port);
            let host = self.settings.advertised_host.clone();
            return Ok((broker_id(self.settings.node_id, shard), host, i32::from(port)));
        }
        let (node, shard) = self.shard.offsets_coordinator(group_id).await?;
        let info = self.shard.cluster_node(node).ok_or(GroupError::CoordinatorNotAvailable)?;
        let port = info.kafka_shard_ports.get(shard).copied().ok_or(GroupError::CoordinatorNotAvailable)?;
        Ok((broker_id(node, shard), info.kafka_host, i32::from(port)))
    }
}

/// KIP-951: where a partition's leader is, named in a NOT_LEADER_OR_FOLLOWER or
/// FENCED_LEADER_EPOCH answer (Produce v10+, Fetch v16+; older versions drop the fields), so
/// that a client goes there without asking for metadata first.
struct LeaderHint {
    broker: i32,
    epoch: i32,
    host: String,
    port: i32,
    rack: Option<String>,
}

impl LeaderHint {
    /// The endpoints of the brokers `hints` name, once each, by broker id: (id, host, port,
    /// rack).
    fn endpoints(
        hints: impl IntoIterator<Item = LeaderHint>,
    ) -> impl Iterator<Item = (i32, String, i32, Option<String>)> {
        let by_broker: std::collections::BTreeMap<i32, LeaderHint> =
            hints.into_iter().map(|hint| (hint.broker, hint)).collect();
        by_broker.into_values().map(|hint| (hint.broker, hint.host, hint.port, hint.rack))
    }
}

impl KafkaService {
    /// The leader of a replicated partition as this node heard it from its replica, for an
    /// answer with `code`: only NOT_LEADER_OR_FOLLOWER and FENCED_LEADER_EPOCH name one (as
    /// Kafka's do), and only a leader heard in an epoch (metadata's guess, the preferred
    /// replica with epoch -1, may be this very node refusing the request).
    fn leader_hint(&self, code: i16, topic: &str, partition: i32) -> Option<LeaderHint> {
        if code != error::NOT_LEADER_OR_FOLLOWER && code != error::FENCED_LEADER_EPOCH {
            return None;
        }
        let partition = u32::try_from(partition).ok()?;
        let cluster = self.shard.cluster_meta()?;
        let placement = cluster.topics.get(topic)?;
        let (leader, epoch) = self.shard.partition_leader(placement, partition);
        if epoch < 0 {
            return None;
        }
        let node = cluster.nodes.get(&leader?)?;
        let shard = pyralog_shard::topics::owner_shard(topic, partition, node.shards as usize);
        let port = *node.kafka_shard_ports.get(shard)?;
        Some(LeaderHint {
            broker: broker_id(node.id, shard),
            epoch,
            host: node.kafka_host.clone(),
            port: i32::from(port),
            rack: node.rack.clone(),
        })
    }
}

/// The Kafka broker id of `shard` of node `node`: unique across the cluster, and 0..shards on
/// a node 0 (a cluster of one, as before clusters).
pub fn broker_id(node: u32, shard: usize) -> i32 {
    node as i32 * crate::cluster::BROKER_IDS_PER_NODE + shard as i32
}
