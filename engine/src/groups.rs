//! Kafka's consumer-group APIs over the shards' group coordinators.
//!
//! Every request goes to the coordinator of the group's offsets log (`Shard::group`), on
//! whichever shard owns it; this module only translates between Kafka's messages and the
//! coordinator's types. FindCoordinator names the shard-broker of the group's offsets log, and
//! ListGroups lists only the groups of the shard that answers it, as a Kafka broker lists only
//! the groups it coordinates: clients that ask every broker of the metadata (librdkafka,
//! kafka-python, the Java AdminClient) see each group once. The shared bootstrap port answers as
//! the shard that accepted the connection; it is named in no metadata, so those clients never
//! ask it.
//!
//! In a cluster the coordinator is the shard owning the group's partition of the offsets
//! topic on the node leading that partition (`pyralog_shard::offsets`); elsewhere requests get
//! NOT_COORDINATOR (COORDINATOR_LOAD_IN_PROGRESS while a new leader replays the partition),
//! and clients ask FindCoordinator again.

use std::time::Duration;

use bytes::Bytes;
use pyralog_net::kafka::error;
use pyralog_net::kafka::messages::*;
use pyralog_shard::{CommitRequest, GroupError, GroupOp, GroupReply, JoinRequest, Shard, SyncRequest};

pub struct Groups;

/// A group's committed offsets by topic: (topic, [(partition, offset, leader epoch, metadata)]).
type CommittedByTopic = Vec<(String, Vec<(i32, i64, i32, String)>)>;

/// The Kafka error code for a group request its coordinator did not take: not reachable
/// (COORDINATOR_NOT_AVAILABLE), or in a cluster not (or not yet) this node
/// (NOT_COORDINATOR, COORDINATOR_LOAD_IN_PROGRESS): the client finds the coordinator again.
fn unavailable(error: GroupError) -> i16 {
    error.kafka_code()
}

fn code<T>(result: &Result<T, GroupError>) -> i16 {
    result.as_ref().err().map_or(error::NONE, GroupError::kafka_code)
}

impl Groups {
    pub async fn join(
        &self,
        shard: &Shard,
        body: join_group_request::JoinGroupRequest,
        version: i16,
        client_id: String,
        peer: std::net::SocketAddr,
    ) -> join_group_response::JoinGroupResponse {
        use join_group_response::*;
        let session_timeout = Duration::from_millis(body.session_timeout_ms.max(0) as u64);
        let rebalance_timeout = if version >= 1 {
            Duration::from_millis(body.rebalance_timeout_ms.max(0) as u64)
        } else {
            session_timeout
        };
        let request = JoinRequest {
            group_id: body.group_id.clone(),
            member_id: body.member_id.clone(),
            group_instance_id: body.group_instance_id,
            client_id,
            // As Kafka reports it: "/" and the client's address.
            client_host: format!("/{}", peer.ip()),
            protocol_type: body.protocol_type,
            protocols: body.protocols.into_iter().map(|p| (p.name, p.metadata)).collect(),
            session_timeout,
            rebalance_timeout,
            require_known_member_id: version >= 4,
        };
        let failed = |code: i16, member_id: String| JoinGroupResponse {
            error_code: code,
            generation_id: -1,
            protocol_name: if version >= 7 { None } else { Some(String::new()) },
            member_id,
            ..Default::default()
        };
        match shard.group(&body.group_id, GroupOp::Join(request)).await {
            Ok(GroupReply::Joined(Ok(joined))) => JoinGroupResponse {
                error_code: error::NONE,
                generation_id: joined.generation_id,
                protocol_type: Some(joined.protocol_type),
                protocol_name: Some(joined.protocol_name),
                leader: joined.leader_id,
                member_id: joined.member_id,
                members: joined
                    .members
                    .into_iter()
                    .map(|(member_id, group_instance_id, metadata)| JoinGroupResponseMember {
                        member_id,
                        group_instance_id,
                        metadata,
                    })
                    .collect(),
                ..Default::default()
            },
            Ok(GroupReply::Joined(Err(GroupError::MemberIdRequired(member_id)))) => {
                failed(GroupError::MemberIdRequired(String::new()).kafka_code(), member_id)
            }
            Ok(GroupReply::Joined(Err(error))) => failed(error.kafka_code(), body.member_id),
            Ok(other) => unreachable!("join answered with {other:?}"),
            Err(error) => failed(unavailable(error), body.member_id),
        }
    }

    pub async fn sync(
        &self,
        shard: &Shard,
        body: sync_group_request::SyncGroupRequest,
    ) -> sync_group_response::SyncGroupResponse {
        use sync_group_response::SyncGroupResponse;
        let request = SyncRequest {
            group_id: body.group_id.clone(),
            generation_id: body.generation_id,
            member_id: body.member_id,
            group_instance_id: body.group_instance_id,
            protocol_type: body.protocol_type,
            protocol_name: body.protocol_name,
            assignments: body.assignments.into_iter().map(|a| (a.member_id, a.assignment)).collect(),
        };
        match shard.group(&body.group_id, GroupOp::Sync(request)).await {
            Ok(GroupReply::Synced(Ok(synced))) => SyncGroupResponse {
                error_code: error::NONE,
                protocol_type: Some(synced.protocol_type),
                protocol_name: Some(synced.protocol_name),
                assignment: synced.assignment,
                ..Default::default()
            },
            Ok(GroupReply::Synced(Err(error))) => SyncGroupResponse {
                error_code: error.kafka_code(),
                assignment: Bytes::new(),
                ..Default::default()
            },
            Ok(other) => unreachable!("sync answered with {other:?}"),
            Err(error) => SyncGroupResponse { error_code: unavailable(error), ..Default::default() },
        }
    }

    pub async fn heartbeat(
        &self,
        shard: &Shard,
        body: heartbeat_request::HeartbeatRequest,
    ) -> heartbeat_response::HeartbeatResponse {
        let op = GroupOp::Heartbeat {
            group_id: body.group_id.clone(),
            generation_id: body.generation_id,
            member_id: body.member_id,
            group_instance_id: body.group_instance_id,
        };
        let error_code = match shard.group(&body.group_id, op).await {
            Ok(GroupReply::Heartbeat(result)) => code(&result),
            Ok(other) => unreachable!("heartbeat answered with {other:?}"),
            Err(error) => unavailable(error),
        };
        heartbeat_response::HeartbeatResponse { error_code, ..Default::default() }
    }

    pub async fn leave(
        &self,
        shard: &Shard,
        body: leave_group_request::LeaveGroupRequest,
        version: i16,
    ) -> leave_group_response::LeaveGroupResponse {
        use leave_group_response::*;
        let members: Vec<(String, Option<String>)> = if version >= 3 {
            body.members.into_iter().map(|m| (m.member_id, m.group_instance_id)).collect()
        } else {
            vec![(body.member_id, None)]
        };
        let op = GroupOp::Leave { group_id: body.group_id.clone(), members: members.clone() };
        let results = match shard.group(&body.group_id, op).await {
            Ok(GroupReply::Left(results)) => results,
            Ok(other) => unreachable!("leave answered with {other:?}"),
            Err(error) => {
                return LeaveGroupResponse { error_code: unavailable(error), ..Default::default() };
            }
        };
        if version < 3 {
            return LeaveGroupResponse { error_code: code(&results[0]), ..Default::default() };
        }
        LeaveGroupResponse {
            error_code: error::NONE,
            members: members
                .into_iter()
                .zip(results)
                .map(|((member_id, group_instance_id), result)| MemberResponse {
                    member_id,
                    group_instance_id,
                    error_code: code(&result),
                })
                .collect(),
            ..Default::default()
        }
    }

    pub async fn commit(
        &self,
        shard: &Shard,
        body: offset_commit_request::OffsetCommitRequest,
        version: i16,
    ) -> offset_commit_response::OffsetCommitResponse {
        use offset_commit_response::*;
        let topics = shard.topics();
        // Partitions of unknown topics are answered here; the rest go to the coordinator.
        let mut offsets = Vec::new();
        for topic in &body.topics {
            for p in &topic.partitions {
                let known = topics
                    .get(&topic.name)
                    .is_some_and(|count| p.partition_index >= 0 && (p.partition_index as u32) < count);
                if known {
                    let epoch = if version >= 6 { p.committed_leader_epoch } else { -1 };
                    offsets.push((
                        topic.name.clone(),
                        p.partition_index,
                        p.committed_offset,
                        epoch,
                        p.committed_metadata.clone(),
                    ));
                }
            }
        }
        let request = CommitRequest {
            group_id: body.group_id.clone(),
            generation_id: body.generation_id_or_member_epoch,
            member_id: body.member_id.clone(),
            group_instance_id: body.group_instance_id.clone(),
            offsets,
        };
        let results: Vec<((String, i32), Result<(), GroupError>)> =
            match shard.group(&body.group_id, GroupOp::Commit(request)).await {
                Ok(GroupReply::Committed(results)) => results,
                Ok(other) => unreachable!("commit answered with {other:?}"),
                Err(error) => {
                    let code = unavailable(error);
                    return OffsetCommitResponse {
                        topics: body
                            .topics
                            .into_iter()
                            .map(|t| OffsetCommitResponseTopic {
                                name: t.name,
                                partitions: t
                                    .partitions
                                    .iter()
                                    .map(|p| OffsetCommitResponsePartition {
                                        partition_index: p.partition_index,
                                        error_code: code,
                                    })
                                    .collect(),
                            })
                            .collect(),
                        ..Default::default()
                    };
                }
            };
        let outcome = |topic: &str, partition: i32| {
            results
                .iter()
                .find(|((t, p), _)| t == topic && *p == partition)
                .map_or(error::UNKNOWN_TOPIC_OR_PARTITION, |(_, result)| code(result))
        };
        OffsetCommitResponse {
            topics: body
                .topics
                .iter()
                .map(|t| OffsetCommitResponseTopic {
                    name: t.name.clone(),
                    partitions: t
                        .partitions
                        .iter()
                        .map(|p| OffsetCommitResponsePartition {
                            partition_index: p.partition_index,
                            error_code: outcome(&t.name, p.partition_index),
                        })
                        .collect(),
                })
                .collect(),
            ..Default::default()
        }
    }

    /// The committed offsets of one group.
    async fn committed(
        &self,
        shard: &Shard,
        group_id: &str,
        partitions: Option<Vec<(String, i32)>>,
    ) -> Result<CommittedByTopic, i16> {
        let op = GroupOp::FetchOffsets { group_id: group_id.to_owned(), partitions };
        let rows = match shard.group(group_id, op).await {
            Ok(GroupReply::Offsets(rows)) => rows,
            Ok(other) => unreachable!("offset fetch answered with {other:?}"),
            Err(error) => return Err(unavailable(error)),
        };
        let mut by_topic = CommittedByTopic::new();
        for (topic, partition, offset, epoch, metadata) in rows {
            let row = (partition, offset, epoch, metadata.unwrap_or_default());
            match by_topic.iter_mut().find(|(t, _)| *t == topic) {
                Some((_, partitions)) => partitions.push(row),
                None => by_topic.push((topic, vec![row])),
            }
        }
        Ok(by_topic)
    }

    pub async fn fetch_offsets(
        &self,
        shard: &Shard,
        body: offset_fetch_request::OffsetFetchRequest,
        version: i16,
    ) -> offset_fetch_response::OffsetFetchResponse {
        use offset_fetch_response::*;
        if version >= 8 {
            let mut groups = Vec::new();
            for group in body.groups {
                let wanted = group.topics.map(|topics| {
                    topics
                        .into_iter()
                        .flat_map(|t| t.partition_indexes.into_iter().map(move |p| (t.name.clone(), p)))
                        .collect()
                });
                groups.push(match self.committed(shard, &group.group_id, wanted).await {
                    Ok(topics) => OffsetFetchResponseGroup {
                        group_id: group.group_id,
                        topics: topics
                            .into_iter()
                            .map(|(name, partitions)| OffsetFetchResponseTopics {
                                name,
                                partitions: partitions
                                    .into_iter()
                                    .map(
                                        |(
                                            partition_index,
                                            committed_offset,
                                            committed_leader_epoch,
                                            metadata,
                                        )| {
                                            OffsetFetchResponsePartitions {
                                                partition_index,
                                                committed_offset,
                                                committed_leader_epoch,
                                                metadata: Some(metadata),
                                                error_code: error::NONE,
                                            }
                                        },
                                    )
                                    .collect(),
                            })
                            .collect(),
                        error_code: error::NONE,
                    },
                    Err(code) => OffsetFetchResponseGroup {
                        group_id: group.group_id,
                        topics: Vec::new(),
                        error_code: code,
                    },
                });
            }
            return OffsetFetchResponse { groups, ..Default::default() };
        }
        let wanted = body.topics.map(|topics| {
            topics
                .into_iter()
                .flat_map(|t| t.partition_indexes.into_iter().map(move |p| (t.name.clone(), p)))
                .collect()
        });
        match self.committed(shard, &body.group_id, wanted).await {
            Ok(topics) => OffsetFetchResponse {
                error_code: error::NONE,
                topics: topics
                    .into_iter()
                    .map(|(name, partitions)| OffsetFetchResponseTopic {
                        name,
                        partitions: partitions
                            .into_iter()
                            .map(|(partition_index, committed_offset, committed_leader_epoch, metadata)| {
                                OffsetFetchResponsePartition {
                                    partition_index,
                                    committed_offset,
                                    committed_leader_epoch,
                                    metadata: Some(metadata),
                                    error_code: error::NONE,
                                }
                            })
                            .collect(),
                    })
                    .collect(),
                ..Default::default()
            },
            Err(code) => OffsetFetchResponse { error_code: code, ..Default::default() },
        }
    }

    pub async fn list(
        &self,
        shard: &Shard,
        body: list_groups_request::ListGroupsRequest,
    ) -> list_groups_response::ListGroupsResponse {
        use list_groups_response::*;
        match shard.list_groups().await {
            Ok(groups) => ListGroupsResponse {
                error_code: error::NONE,
                groups: groups
                    .into_iter()
                    .filter(|(_, _, state)| {
                        body.states_filter.is_empty() || body.states_filter.contains(state)
                    })
                    .map(|(group_id, protocol_type, group_state)| ListedGroup {
                        group_id,
                        protocol_type,
                        group_state,
                        group_type: "classic".to_owned(),
                    })
                    .collect(),
                ..Default::default()
            },
            Err(_) => {
                ListGroupsResponse { error_code: error::COORDINATOR_NOT_AVAILABLE, ..Default::default() }
            }
        }
    }

    pub async fn describe(
        &self,
        shard: &Shard,
        body: describe_groups_request::DescribeGroupsRequest,
    ) -> describe_groups_response::DescribeGroupsResponse {
        use describe_groups_response::*;
        let mut groups = Vec::new();
        for group_id in body.groups {
            let op = GroupOp::Describe { group_id: group_id.clone() };
            groups.push(match shard.group(&group_id, op).await {
                Ok(GroupReply::Described(description)) => DescribedGroup {
                    error_code: error::NONE,
                    group_id,
                    group_state: description.state,
                    protocol_type: description.protocol_type,
                    protocol_data: description.protocol_name,
                    members: description
                        .members
                        .into_iter()
                        .map(|m| DescribedGroupMember {
                            member_id: m.member_id,
                            group_instance_id: m.group_instance_id,
                            client_id: m.client_id,
                            client_host: m.client_host,
                            member_metadata: m.metadata,
                            member_assignment: m.assignment,
                        })
                        .collect(),
                    authorized_operations: i32::MIN,
                },
                Ok(other) => unreachable!("describe answered with {other:?}"),
                Err(error) => {
                    DescribedGroup { error_code: unavailable(error), group_id, ..Default::default() }
                }
            });
        }
        DescribeGroupsResponse { groups, ..Default::default() }
    }
}
