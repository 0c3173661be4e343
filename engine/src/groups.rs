//! Kafka's group APIs over the shard's group coordinator (wiring in progress: every call
//! answers COORDINATOR_NOT_AVAILABLE until the coordinator lands).

use pyralog_net::kafka::error;
use pyralog_net::kafka::messages::*;
use pyralog_shard::Shard;

#[derive(Default)]
pub struct Groups;

impl Groups {
    pub async fn join(
        &self,
        _: &Shard,
        _: join_group_request::JoinGroupRequest,
        _: i16,
        _: String,
    ) -> join_group_response::JoinGroupResponse {
        join_group_response::JoinGroupResponse {
            error_code: error::COORDINATOR_NOT_AVAILABLE,
            ..Default::default()
        }
    }
    pub async fn sync(
        &self,
        _: &Shard,
        _: sync_group_request::SyncGroupRequest,
    ) -> sync_group_response::SyncGroupResponse {
        sync_group_response::SyncGroupResponse {
            error_code: error::COORDINATOR_NOT_AVAILABLE,
            ..Default::default()
        }
    }
    pub async fn heartbeat(
        &self,
        _: &Shard,
        _: heartbeat_request::HeartbeatRequest,
    ) -> heartbeat_response::HeartbeatResponse {
        heartbeat_response::HeartbeatResponse {
            error_code: error::COORDINATOR_NOT_AVAILABLE,
            ..Default::default()
        }
    }
    pub async fn leave(
        &self,
        _: &Shard,
        _: leave_group_request::LeaveGroupRequest,
        _: i16,
    ) -> leave_group_response::LeaveGroupResponse {
        leave_group_response::LeaveGroupResponse {
            error_code: error::COORDINATOR_NOT_AVAILABLE,
            ..Default::default()
        }
    }
    pub async fn commit(
        &self,
        _: &Shard,
        _: offset_commit_request::OffsetCommitRequest,
        _: i16,
    ) -> offset_commit_response::OffsetCommitResponse {
        offset_commit_response::OffsetCommitResponse::default()
    }
    pub async fn fetch_offsets(
        &self,
        _: &Shard,
        _: offset_fetch_request::OffsetFetchRequest,
        _: i16,
    ) -> offset_fetch_response::OffsetFetchResponse {
        offset_fetch_response::OffsetFetchResponse {
            error_code: error::COORDINATOR_NOT_AVAILABLE,
            ..Default::default()
        }
    }
    pub async fn list(
        &self,
        _: &Shard,
        _: list_groups_request::ListGroupsRequest,
    ) -> list_groups_response::ListGroupsResponse {
        list_groups_response::ListGroupsResponse {
            error_code: error::COORDINATOR_NOT_AVAILABLE,
            ..Default::default()
        }
    }
    pub async fn describe(
        &self,
        _: &Shard,
        _: describe_groups_request::DescribeGroupsRequest,
    ) -> describe_groups_response::DescribeGroupsResponse {
        describe_groups_response::DescribeGroupsResponse::default()
    }
}
