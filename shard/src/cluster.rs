//! The cluster's metadata, as the controller's committed log builds it: nodes, replicated
//! topics and where each partition's replicas live.
//!
//! The controller is a Raft group (a [`crate::replica`] like any partition's) over the seed
//! nodes, on shard 0 of each. Changes are proposed to its leader as [`MetaRecord`]s, one JSON
//! record per RecordBatch, and every node applies the committed ones in log order to its own
//! [`ClusterMeta`]; applying is deterministic, so every node that applied the same prefix holds
//! the same metadata. A record that does not apply (a topic created twice by two racing
//! requests) changes nothing, on every node alike.
//!
//! Placement lives here, in [`place`], so it can be replaced (CopySet placement, moves and
//! rebalancing are later work): a topic's replicas go on distinct nodes, on distinct racks
//! while racks last, and the first replica of each partition (its preferred leader) is spread
//! so that every node leads about as many partitions as the others. Nodes the controller's
//! leader has not heard from lately (see `replicated`'s node heartbeats) are left out while
//! enough others are up; a topic is never refused for a node being down that placement could
//! do without, nor placed on one it could avoid.
//!
//! Invariants: a partition's replicas are distinct nodes that were registered when it was
//! placed; `applied_end` and `next_producer_id` only grow (so producer id blocks never
//! overlap); the snapshot on disk (`cluster.meta`) holds only
//! committed records, so a node can serve from it at start before the controller answers.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::topics::{self, TopicConfig};
use crate::ShardError;

const SNAPSHOT_FILE_NAME: &str = "cluster.meta";
/// Most nodes a cluster registers.
pub const NODES_MAX: usize = 1024;
/// Most replicas of one partition.
pub const REPLICATION_FACTOR_MAX: u32 = 7;
/// Producer ids the controller reserves for a node at a time (Kafka's block size too).
pub const PRODUCER_IDS_PER_BLOCK: i64 = 1000;

/// A node as the cluster knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub id: u32,
    /// Where peers reach its shard 0 for node-to-node traffic; shard i listens on port + i.
    pub cluster_address: String,
    pub shards: u32,
    pub rack: Option<String>,
    /// Where clients reach it: the native protocol's shared port and its per-shard ports.
    pub native_host: String,
    pub native_port: u16,
    pub native_shard_ports: Vec<u16>,
    pub kafka_host: String,
    pub kafka_port: u16,
    pub kafka_shard_ports: Vec<u16>,
    /// Where its operator endpoints answer (/metrics, /cluster): what `pyralog cluster`
    /// asks.
    #[serde(default)]
    pub metrics_address: Option<String>,
    /// The node's data directory (see the daemon's node.meta): a new one is a lost disk.
    #[serde(default)]
    pub incarnation: u64,
    /// Set when applied: the controller log's offset after the first registration of this
    /// incarnation. Replicas placed on the node before it were on a disk it no longer has.
    #[serde(default)]
    pub registered_at: i64,
}

/// A replicated topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicPlacement {
    pub id: [u8; 16],
    pub replication_factor: u32,
    pub write_quorum: u32,
    pub max_message_bytes: Option<u32>,
    /// Per partition, its replicas' node ids; the first is the preferred leader.
    pub replicas: Vec<Vec<u32>>,
    /// Set when applied: per partition, the controller log's offset after its creation.
    #[serde(default)]
    pub created_at: Vec<i64>,
}

impl TopicPlacement {
    pub fn config(&self) -> TopicConfig {
        TopicConfig {
            max_message_bytes: self.max_message_bytes,
            replication_factor: Some(self.replication_factor),
            min_insync_replicas: Some(self.write_quorum),
        }
    }
}

/// One change of the metadata, as the controller's log stores it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MetaRecord {
    /// A node announces itself (again, after a restart with new ports).
    RegisterNode(NodeInfo),
    CreateTopic {
        name: String,
        topic: TopicPlacement,
    },
    /// Grows a topic: `replicas` are the new partitions' replicas.
    CreatePartitions {
        name: String,
        replicas: Vec<Vec<u32>>,
    },
    DeleteTopic {
        name: String,
    },
    /// Reserves the next [`PRODUCER_IDS_PER_BLOCK`] producer ids for a node's idempotent
    /// producers: ids are unique across the cluster because blocks never overlap.
    AllocateProducerIds {
        node: u32,
    },
}

impl MetaRecord {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("metadata records serialize")
    }

    pub fn decode(bytes: &[u8]) -> Result<MetaRecord, ShardError> {
        serde_json::from_slice(bytes)
            .map_err(|e| ShardError::Storage(format!("a controller record does not decode: {e}")))
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterMeta {
    pub nodes: BTreeMap<u32, NodeInfo>,
    pub topics: BTreeMap<String, TopicPlacement>,
    /// The controller log's offset up to which records are applied.
    pub applied_end: i64,
    /// The first producer id no block has reserved yet: only grows.
    #[serde(default)]
    pub next_producer_id: i64,
    /// The last block of producer ids reserved for each node: `[first, end)`.
    #[serde(default)]
    pub producer_id_blocks: BTreeMap<u32, (i64, i64)>,
}

impl ClusterMeta {
    /// Applies one committed record, the one ending at `end` in the controller's log. Returns
    /// why it changed nothing, if it did not apply.
    pub fn apply(&mut self, record: MetaRecord, end: i64) -> Result<(), String> {
        assert!(end > self.applied_end, "records apply in log order: {end} after {}", self.applied_end);
        self.applied_end = end;
        match record {
            MetaRecord::RegisterNode(mut node) => {
                if self.nodes.len() >= NODES_MAX && !self.nodes.contains_key(&node.id) {
                    return Err(format!("the cluster has {NODES_MAX} nodes already"));
                }
                node.registered_at = match self.nodes.get(&node.id) {
                    Some(known) if known.incarnation == node.incarnation => known.registered_at,
                    _ => end,
                };
                self.nodes.insert(node.id, node);
            }
            MetaRecord::CreateTopic { name, mut topic } => {
                if self.topics.contains_key(&name) {
                    return Err(format!("topic '{name}' already exists"));
                }
                self.check_replicas(&topic.replicas)?;
                topic.created_at = vec![end; topic.replicas.len()];
                self.topics.insert(name, topic);
            }
            MetaRecord::CreatePartitions { name, replicas } => {
                self.check_replicas(&replicas)?;
                let topic = self.topics.get_mut(&name).ok_or_else(|| format!("unknown topic '{name}'"))?;
                if replicas.iter().any(|r| r.len() != topic.replication_factor as usize) {
                    return Err(format!(
                        "new partitions of '{name}' must have {} replicas",
                        topic.replication_factor
                    ));
                }
                topic.created_at.resize(topic.replicas.len(), 0);
                topic.created_at.extend(std::iter::repeat_n(end, replicas.len()));
                topic.replicas.extend(replicas);
            }
            MetaRecord::DeleteTopic { name } => {
                self.topics.remove(&name).ok_or_else(|| format!("unknown topic '{name}'"))?;
            }
            MetaRecord::AllocateProducerIds { node } => {
                if !self.nodes.contains_key(&node) {
                    return Err(format!("node {node} is not registered"));
                }
                let first = self.next_producer_id;
                let end = first.checked_add(PRODUCER_IDS_PER_BLOCK).ok_or("producer ids ran out")?;
                assert!(end > first, "producer id blocks only grow");
                self.next_producer_id = end;
                self.producer_id_blocks.insert(node, (first, end));
            }
        }
        Ok(())
    }

    fn check_replicas(&self, replicas: &[Vec<u32>]) -> Result<(), String> {
        for set in replicas {
            if let Some(unknown) = set.iter().find(|id| !self.nodes.contains_key(id)) {
                return Err(format!("node {unknown} is not registered"));
            }
            let mut sorted = set.clone();
            sorted.sort_unstable();
            sorted.dedup();
            if sorted.len() != set.len() || set.is_empty() {
                return Err(format!("replicas {set:?} are not distinct nodes"));
            }
        }
        Ok(())
    }

    /// How many partitions each node is the preferred leader of.
    fn leader_counts(&self) -> BTreeMap<u32, usize> {
        let mut counts: BTreeMap<u32, usize> = self.nodes.keys().map(|&id| (id, 0)).collect();
        for topic in self.topics.values() {
            for set in &topic.replicas {
                *counts.entry(set[0]).or_default() += 1;
            }
        }
        counts
    }

    pub fn load(data_dir: &Path) -> Result<Option<ClusterMeta>, ShardError> {
        let path = data_dir.join(SNAPSHOT_FILE_NAME);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| ShardError::Storage(format!("{} is damaged: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(ShardError::Storage(format!("reading {}: {e}", path.display()))),
        }
    }

    /// Writes the snapshot durably (see `topics::persist_file`).
    pub fn persist(&self, data_dir: &Path) -> Result<(), ShardError> {
        let bytes = serde_json::to_vec_pretty(self).expect("metadata serializes");
        topics::persist_file(data_dir, SNAPSHOT_FILE_NAME, &bytes)
    }
}

/// Places `partitions` new partitions of `replication_factor` replicas each on the registered
/// nodes of `meta` (see the module docs): on those not in `down` while there are enough of
/// them, else on every registered node.
pub fn place(
    meta: &ClusterMeta,
    partitions: u32,
    replication_factor: u32,
    down: &[u32],
) -> Result<Vec<Vec<u32>>, ShardError> {
    let up: Vec<&NodeInfo> = meta.nodes.values().filter(|n| !down.contains(&n.id)).collect();
    let nodes: Vec<&NodeInfo> =
        if up.len() >= replication_factor as usize { up } else { meta.nodes.values().collect() };
    if replication_factor == 0 || replication_factor > REPLICATION_FACTOR_MAX {
        return Err(ShardError::InvalidReplicationFactor(format!(
            "a replication factor is 1 to {REPLICATION_FACTOR_MAX}, not {replication_factor}"
        )));
    }
    if replication_factor as usize > nodes.len() {
        return Err(ShardError::InvalidReplicationFactor(format!(
            "replication factor {replication_factor} needs {replication_factor} nodes (failure domains; two shards \
             of one node never count twice), and the cluster has {} registered",
            nodes.len()
        )));
    }
    let mut leads = meta.leader_counts();
    leads.retain(|id, _| nodes.iter().any(|n| n.id == *id));
    let mut placed = Vec::with_capacity(partitions as usize);
    for _ in 0..partitions {
        // The preferred leader: the node leading fewest partitions (lowest id on a tie).
        let leader =
            *leads.iter().min_by_key(|(id, count)| (**count, **id)).map(|(id, _)| id).expect("nodes exist");
        *leads.get_mut(&leader).expect("counted") += 1;
        let mut set = vec![leader];
        // Then the nodes after it in id order, preferring racks not used yet.
        let start = nodes.iter().position(|n| n.id == leader).expect("a registered node");
        let ring: Vec<&NodeInfo> = (1..nodes.len()).map(|i| nodes[(start + i) % nodes.len()]).collect();
        while set.len() < replication_factor as usize {
            let used_racks: Vec<&Option<String>> =
                set.iter().map(|id| &meta.nodes[id].rack).filter(|r| r.is_some()).collect();
            let candidates = ring.iter().filter(|n| !set.contains(&n.id));
            let fresh_rack = candidates.clone().find(|n| n.rack.is_none() || !used_racks.contains(&&n.rack));
            let next = fresh_rack.or_else(|| candidates.clone().next()).expect("enough nodes checked above");
            set.push(next.id);
        }
        placed.push(set);
    }
    Ok(placed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: u32, rack: Option<&str>) -> NodeInfo {
        NodeInfo {
            id,
            cluster_address: format!("127.0.0.{id}:9100"),
            shards: 2,
            rack: rack.map(str::to_owned),
            native_host: format!("127.0.0.{id}"),
            native_port: 7070,
            native_shard_ports: vec![7071, 7072],
            kafka_host: format!("127.0.0.{id}"),
            kafka_port: 9092,
            kafka_shard_ports: vec![9093, 9094],
            metrics_address: None,
            incarnation: 1,
            registered_at: 0,
        }
    }

    fn meta(nodes: &[(u32, Option<&str>)]) -> ClusterMeta {
        let mut meta = ClusterMeta::default();
        for (i, (id, rack)) in nodes.iter().enumerate() {
            meta.apply(MetaRecord::RegisterNode(node(*id, *rack)), i as i64 + 1).unwrap();
        }
        meta
    }

    #[test]
    fn replicas_go_on_distinct_nodes_and_leaders_spread_evenly() {
        let meta = meta(&[(1, None), (2, None), (3, None)]);
        let placed = place(&meta, 6, 3, &[]).unwrap();
        for set in &placed {
            let mut sorted = set.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, vec![1, 2, 3]);
        }
        let leaders: Vec<u32> = placed.iter().map(|s| s[0]).collect();
        for id in [1, 2, 3] {
            assert_eq!(leaders.iter().filter(|&&l| l == id).count(), 2, "{leaders:?}");
        }
        let refused = place(&meta, 1, 4, &[]).unwrap_err().to_string();
        assert!(refused.contains("needs 4 nodes") && refused.contains("has 3"), "{refused}");
    }

    #[test]
    fn down_nodes_are_left_out_while_enough_others_are_up() {
        let meta = meta(&[(1, None), (2, None), (3, None), (4, None)]);
        let placed = place(&meta, 6, 2, &[3]).unwrap();
        assert!(placed.iter().all(|set| !set.contains(&3)), "{placed:?}");
        let leaders: Vec<u32> = placed.iter().map(|s| s[0]).collect();
        for id in [1, 2, 4] {
            assert_eq!(leaders.iter().filter(|&&l| l == id).count(), 2, "{leaders:?}");
        }
        // Three replicas with two nodes down: placed on every node rather than refused.
        let placed = place(&meta, 1, 3, &[3, 4]).unwrap();
        assert_eq!(placed[0].len(), 3);
        assert!(placed[0].contains(&3) || placed[0].contains(&4), "{placed:?}");
    }

    #[test]
    fn racks_are_spread_before_they_repeat() {
        let meta = meta(&[(1, Some("a")), (2, Some("a")), (3, Some("b")), (4, Some("b"))]);
        for set in place(&meta, 8, 2, &[]).unwrap() {
            let racks: Vec<&Option<String>> = set.iter().map(|id| &meta.nodes[id].rack).collect();
            assert_ne!(racks[0], racks[1], "replicas {set:?} share a rack");
        }
    }

    #[test]
    fn records_apply_in_order_and_refusals_change_nothing() {
        let mut meta = meta(&[(1, None), (2, None), (3, None)]);
        let topic = TopicPlacement {
            id: [1; 16],
            replication_factor: 3,
            write_quorum: 2,
            max_message_bytes: None,
            replicas: place(&meta, 2, 3, &[]).unwrap(),
            created_at: Vec::new(),
        };
        let create = MetaRecord::CreateTopic { name: "orders".into(), topic: topic.clone() };
        let decoded = MetaRecord::decode(&create.encode()).unwrap();
        assert_eq!(decoded, create);
        meta.apply(decoded, 10).unwrap();
        let before = meta.clone();
        assert!(meta.apply(create, 11).is_err(), "a second create of the name");
        let bad = MetaRecord::CreatePartitions { name: "orders".into(), replicas: vec![vec![1, 9, 2]] };
        assert!(meta.apply(bad, 12).is_err(), "node 9 is not registered");
        assert_eq!(meta.topics, before.topics);
        assert_eq!(meta.applied_end, 12);
        let grow = MetaRecord::CreatePartitions {
            name: "orders".into(),
            replicas: place(&meta, 1, 3, &[]).unwrap(),
        };
        meta.apply(grow, 13).unwrap();
        assert_eq!(meta.topics["orders"].replicas.len(), 3);
        meta.apply(MetaRecord::DeleteTopic { name: "orders".into() }, 14).unwrap();
        assert!(meta.topics.is_empty());
    }

    #[test]
    fn producer_id_blocks_never_overlap() {
        let mut meta = meta(&[(1, None), (2, None)]);
        let mut end = 10;
        let mut blocks = Vec::new();
        for node in [1, 2, 1, 1, 2] {
            end += 1;
            let record = MetaRecord::decode(&MetaRecord::AllocateProducerIds { node }.encode()).unwrap();
            meta.apply(record, end).unwrap();
            blocks.push(meta.producer_id_blocks[&node]);
        }
        for (i, (first, end)) in blocks.iter().enumerate() {
            assert_eq!(end - first, PRODUCER_IDS_PER_BLOCK);
            assert!(
                blocks[..i].iter().all(|(f, e)| e <= first || end <= f),
                "block {i} overlaps: {blocks:?}"
            );
        }
        assert!(meta.apply(MetaRecord::AllocateProducerIds { node: 9 }, end + 1).is_err(), "an unknown node");
        assert_eq!(meta.next_producer_id, 5 * PRODUCER_IDS_PER_BLOCK, "a refusal reserves nothing");
    }

    #[test]
    fn the_snapshot_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(ClusterMeta::load(dir.path()).unwrap(), None);
        let meta = meta(&[(1, Some("r")), (2, None)]);
        meta.persist(dir.path()).unwrap();
        assert_eq!(ClusterMeta::load(dir.path()).unwrap(), Some(meta));
        std::fs::write(dir.path().join(SNAPSHOT_FILE_NAME), b"{").unwrap();
        assert!(ClusterMeta::load(dir.path()).is_err());
    }
}
