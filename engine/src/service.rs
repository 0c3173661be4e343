//! The native protocol's [`Handler`]: turns decoded requests into shard calls and shard
//! results into responses. Per-partition failures become per-partition error codes; the rest
//! of the request still succeeds.

use std::rc::Rc;
use std::time::Duration;

use futures_util::future::join_all;

use pyralog_net::codec::{
    Acks, ErrorCode, FetchPartitionResult, ListOffsetsPartitionResult, MetadataResponse, PartitionInfo,
    ProducePartitionResult, Request, Response, ResponseFrame, ShardInfo, TopicInfo,
};
use pyralog_net::server::Handler;
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
        // The native protocol has no idempotent producer; these come from Kafka clients only.
        ShardError::OutOfOrderSequence(_) | ShardError::InvalidProducerEpoch(_) => ErrorCode::InvalidRequest,
        ShardError::CorruptBatch(_) => ErrorCode::CorruptBatch,
        ShardError::TooLarge(_) => ErrorCode::MessageTooLarge,
        ShardError::OffsetOutOfRange(_) => ErrorCode::OffsetOutOfRange,
        ShardError::Storage(_) => ErrorCode::StorageError,
        ShardError::ShuttingDown => ErrorCode::ShuttingDown,
        ShardError::NotLeader { .. } => ErrorCode::NotLeader,
        ShardError::NotController { .. } => ErrorCode::NotController,
        ShardError::Unavailable(_) => ErrorCode::Overloaded,
    }
}

impl Handler for Service {
    async fn handle(&self, correlation_id: u64, request: Request) -> Option<ResponseFrame> {
        let result = match request {
            Request::Metadata { topics } => Ok(Response::Metadata(self.metadata(&topics))),
            Request::CreateTopic { name, partitions } => self
                .shard
                .create_topic(&name, partitions, Default::default())
                .await
                .map(|()| Response::CreateTopic),
            Request::DeleteTopic { name } => {
                self.shard.delete_topic(&name).await.map(|()| Response::DeleteTopic)
            }
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
                    let result = self.shard.list_offsets(&list.topic, p.partition, p.timestamp).await;
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
        let port_of = |shard: usize| self.topology.shards.get(shard).map_or(0, |s| s.port);
        let describe = |name: &str, count: u32| TopicInfo {
            name: name.to_owned(),
            error: ErrorCode::None,
            partitions: (0..count)
                .map(|partition| {
                    let shard = self.shard.owner_of(name, partition);
                    PartitionInfo { partition, shard: shard as u32, port: port_of(shard) }
                })
                .collect(),
        };
        let topics = if wanted.is_empty() {
            table.iter().map(|(name, count)| describe(name, count)).collect()
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
        MetadataResponse { shards: self.topology.shards.clone(), topics }
    }
}
