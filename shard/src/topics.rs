//! Topic metadata: names, partition counts, and which shard owns each partition.
//!
//! Every shard keeps its own copy of the [`TopicTable`]. Shard 0 is the only writer of the
//! persisted file (`topics.meta` in the data directory): it validates a change, makes the file
//! durable (write to a temporary file, fsync, rename, fsync the directory) and only then tells
//! every shard. Placement is a pure function of the topic name, the partition and the shard
//! count, so no shard needs to ask another where a partition lives.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::ShardError;

/// Longest topic name, as in Kafka (file names must stay under 255 bytes).
pub const TOPIC_NAME_BYTES_MAX: usize = 249;
/// Most partitions one topic may have.
pub const PARTITIONS_PER_TOPIC_MAX: u32 = 10_000;
const META_FILE_NAME: &str = "topics.meta";
const META_HEADER_V1: &str = "pyralog-topics v1";
const META_HEADER: &str = "pyralog-topics v2";

/// What the node knows of a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TopicMeta {
    pub partitions: u32,
    /// Random, fixed at creation (Kafka's topic id).
    pub id: [u8; 16],
    pub config: TopicConfig,
}

/// Per-topic settings that override the node's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TopicConfig {
    /// Largest batch a produce may append (Kafka's max.message.bytes).
    pub max_message_bytes: Option<u32>,
    /// In a cluster: the replicas of each partition (nodes). Default: the node's
    /// --default-replication-factor.
    pub replication_factor: Option<u32>,
    /// In a cluster: the write quorum W, replicas that hold a batch durably before it is
    /// committed (Kafka's min.insync.replicas). Default: a majority of the replicas.
    pub min_insync_replicas: Option<u32>,
}

impl TopicConfig {
    /// The setting names this node understands, as Kafka spells them.
    pub const NAMES: &[&str] = &["max.message.bytes", "min.insync.replicas"];

    /// Applies `name=value`; an unknown name or a bad value is an error naming it.
    pub fn set(&mut self, name: &str, value: &str) -> Result<(), String> {
        match name {
            "max.message.bytes" => {
                let bytes: u32 = value
                    .parse()
                    .ok()
                    .filter(|&b| b > 0)
                    .ok_or_else(|| format!("max.message.bytes={value} is not a positive integer"))?;
                self.max_message_bytes = Some(bytes);
                Ok(())
            }
            "min.insync.replicas" => {
                let count: u32 = value
                    .parse()
                    .ok()
                    .filter(|&c| c > 0)
                    .ok_or_else(|| format!("min.insync.replicas={value} is not a positive integer"))?;
                self.min_insync_replicas = Some(count);
                Ok(())
            }
            _ => Err(format!("unsupported topic config '{name}' (supported: {})", Self::NAMES.join(", "))),
        }
    }
}

impl TopicMeta {
    /// A new topic with a fresh random id.
    pub fn new(partitions: u32, config: TopicConfig) -> TopicMeta {
        TopicMeta { partitions, id: random_id(), config }
    }
}

/// 16 random bytes from the kernel.
fn random_id() -> [u8; 16] {
    use std::io::Read;
    let mut id = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut id))
        .expect("reading /dev/urandom");
    id
}

/// A stable id for a topic persisted before ids existed (format v1).
fn legacy_id(name: &str) -> [u8; 16] {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&fnv1a(FNV1A_BASIS, name).to_be_bytes());
    id[8..].copy_from_slice(&fnv1a(FNV1A_BASIS.rotate_left(32), name).to_be_bytes());
    id
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<[u8; 16]> {
    if text.len() != 32 {
        return None;
    }
    let mut id = [0u8; 16];
    for (i, byte) in id.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(id)
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TopicTable {
    topics: BTreeMap<String, TopicMeta>,
    /// Each topic's name by its id (Kafka's topic ids: Fetch v13+, DeleteTopics v6+).
    names: HashMap<[u8; 16], String>,
}

pub fn validate_topic_name(name: &str) -> Result<(), ShardError> {
    if name.is_empty() || name.len() > TOPIC_NAME_BYTES_MAX {
        return Err(ShardError::InvalidTopic(format!(
            "a topic name has 1 to {TOPIC_NAME_BYTES_MAX} characters, '{name}' has {}",
            name.len()
        )));
    }
    if name == "." || name == ".." {
        return Err(ShardError::InvalidTopic(format!("'{name}' is not a topic name")));
    }
    if let Some(bad) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
        return Err(ShardError::InvalidTopic(format!(
            "topic names use letters, digits, '.', '_' and '-'; '{name}' has {bad:?}"
        )));
    }
    Ok(())
}

/// FNV-1a's 64-bit offset basis, the usual `seed` of [`fnv1a`].
pub const FNV1A_BASIS: u64 = 0xcbf2_9ce4_8422_2325;

/// 64-bit FNV-1a of `text` from `seed`: stable across releases and platforms, unlike std's
/// hasher, so placements computed with it never move.
pub fn fnv1a(seed: u64, text: &str) -> u64 {
    text.bytes().fold(seed, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
}

/// The shard that owns `partition` of `topic` among `shard_count` shards.
pub fn owner_shard(topic: &str, partition: u32, shard_count: usize) -> usize {
    assert!(shard_count > 0, "a node has at least one shard");
    ((fnv1a(FNV1A_BASIS, topic).wrapping_add(u64::from(partition))) % shard_count as u64) as usize
}

pub fn partition_dir(data_dir: &Path, topic: &str, partition: u32) -> PathBuf {
    data_dir.join("topics").join(topic).join(partition.to_string())
}

pub fn topic_dir(data_dir: &Path, topic: &str) -> PathBuf {
    data_dir.join("topics").join(topic)
}

impl TopicTable {
    /// The topic's partition count.
    pub fn get(&self, name: &str) -> Option<u32> {
        self.topics.get(name).map(|meta| meta.partitions)
    }

    pub fn meta(&self, name: &str) -> Option<TopicMeta> {
        self.topics.get(name).copied()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, u32)> {
        self.topics.iter().map(|(name, meta)| (name.as_str(), meta.partitions))
    }

    pub fn iter_meta(&self) -> impl Iterator<Item = (&str, &TopicMeta)> {
        self.topics.iter().map(|(name, meta)| (name.as_str(), meta))
    }

    /// The name of the topic whose id is `id`.
    pub fn name_of(&self, id: &[u8; 16]) -> Option<&str> {
        self.names.get(id).map(String::as_str)
    }

    pub fn insert(&mut self, name: &str, meta: TopicMeta) {
        if let Some(replaced) = self.topics.insert(name.to_owned(), meta) {
            self.forget_name(&replaced.id, name);
        }
        self.names.insert(meta.id, name.to_owned());
    }

    pub fn remove(&mut self, name: &str) -> bool {
        let Some(removed) = self.topics.remove(name) else { return false };
        self.forget_name(&removed.id, name);
        true
    }

    fn forget_name(&mut self, id: &[u8; 16], name: &str) {
        if self.names.get(id).is_some_and(|named| named == name) {
            self.names.remove(id);
        }
    }

    pub fn load(data_dir: &Path) -> Result<TopicTable, ShardError> {
        let path = data_dir.join(META_FILE_NAME);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(TopicTable::default()),
            Err(e) => return Err(ShardError::Storage(format!("reading {}: {e}", path.display()))),
        };
        let bad =
            |line: &str| ShardError::Storage(format!("{} has a malformed line: '{line}'", path.display()));
        let mut lines = text.lines();
        let legacy = match lines.next() {
            Some(META_HEADER) => false,
            Some(META_HEADER_V1) => true,
            _ => {
                return Err(ShardError::Storage(format!(
                    "{} does not start with '{META_HEADER}'",
                    path.display()
                )))
            }
        };
        let mut table = TopicTable::default();
        // v2: "<name> <partitions> <id hex> [<config>=<value> ...]"; v1: "<name> <partitions>".
        for line in lines.filter(|l| !l.is_empty()) {
            let mut words = line.split(' ');
            let (Some(name), Some(count)) = (words.next(), words.next()) else { return Err(bad(line)) };
            validate_topic_name(name).map_err(|_| bad(line))?;
            let partitions: u32 = count.parse().map_err(|_| bad(line))?;
            let id = if legacy {
                legacy_id(name)
            } else {
                words.next().and_then(unhex).ok_or_else(|| bad(line))?
            };
            let mut config = TopicConfig::default();
            for setting in words {
                let (key, value) = setting.split_once('=').ok_or_else(|| bad(line))?;
                config.set(key, value).map_err(|_| bad(line))?;
            }
            table.insert(name, TopicMeta { partitions, id, config });
        }
        Ok(table)
    }

    /// Writes the table durably: it is on disk under its final name when this returns.
    pub fn persist(&self, data_dir: &Path) -> Result<(), ShardError> {
        let mut text = format!("{META_HEADER}\n");
        for (name, meta) in self.iter_meta() {
            text.push_str(&format!("{name} {} {}", meta.partitions, hex(&meta.id)));
            if let Some(bytes) = meta.config.max_message_bytes {
                text.push_str(&format!(" max.message.bytes={bytes}"));
            }
            text.push('\n');
        }
        persist_file(data_dir, META_FILE_NAME, text.as_bytes())
    }
}

/// Replaces `data_dir/name` with `bytes` durably: a temporary file, fsync, rename, fsync of
/// the directory. A crash leaves the old file or the new one, whole.
pub fn persist_file(data_dir: &Path, name: &str, bytes: &[u8]) -> Result<(), ShardError> {
    let path = data_dir.join(name);
    let temporary = data_dir.join(format!("{name}.tmp"));
    let storage = |op: &str, e: std::io::Error| ShardError::Storage(format!("{op} {}: {e}", path.display()));
    let mut file = std::fs::File::create(&temporary).map_err(|e| storage("creating", e))?;
    file.write_all(bytes).map_err(|e| storage("writing", e))?;
    file.sync_all().map_err(|e| storage("syncing", e))?;
    std::fs::rename(&temporary, &path).map_err(|e| storage("renaming", e))?;
    std::fs::File::open(data_dir).and_then(|d| d.sync_all()).map_err(|e| storage("syncing directory of", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_topic_is_found_by_its_id_until_it_is_removed_or_recreated() {
        let meta = |id: u8| TopicMeta { partitions: 1, id: [id; 16], config: TopicConfig::default() };
        let mut table = TopicTable::default();
        table.insert("orders", meta(1));
        table.insert("payments", meta(2));
        assert_eq!(table.name_of(&[1; 16]), Some("orders"));
        assert_eq!(table.name_of(&[2; 16]), Some("payments"));
        // Deleted and created again: a new id, and the old one names nothing.
        table.insert("orders", meta(3));
        assert_eq!(table.name_of(&[1; 16]), None);
        assert_eq!(table.name_of(&[3; 16]), Some("orders"));
        assert!(table.remove("orders"));
        assert_eq!(table.name_of(&[3; 16]), None);
        assert_eq!(table.name_of(&[2; 16]), Some("payments"));
    }

    #[test]
    fn names_follow_kafka_rules() {
        assert!(validate_topic_name("orders.v2_eu-1").is_ok());
        for bad in ["", ".", "..", "a/b", "spaced name", &"x".repeat(250)] {
            assert!(validate_topic_name(bad).is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn placement_spreads_partitions_over_shards() {
        let owners: Vec<usize> = (0..8).map(|p| owner_shard("events", p, 2)).collect();
        assert_eq!(owners.iter().filter(|&&s| s == 0).count(), 4);
        assert!(owners.windows(2).all(|w| w[0] != w[1]), "consecutive partitions alternate: {owners:?}");
    }

    #[test]
    fn the_table_survives_a_round_trip_and_rejects_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let mut table = TopicTable::default();
        table.insert("a", TopicMeta::new(3, TopicConfig::default()));
        table.insert(
            "b.c",
            TopicMeta::new(12, TopicConfig { max_message_bytes: Some(1000), ..TopicConfig::default() }),
        );
        assert_ne!(table.meta("a").unwrap().id, table.meta("b.c").unwrap().id);
        table.persist(dir.path()).unwrap();
        assert_eq!(TopicTable::load(dir.path()).unwrap(), table);
        std::fs::write(dir.path().join(META_FILE_NAME), "pyralog-topics v2\nbad/name 3\n").unwrap();
        assert!(TopicTable::load(dir.path()).is_err());
        // A v1 table (no ids) still loads, with ids that do not change between loads.
        std::fs::write(dir.path().join(META_FILE_NAME), "pyralog-topics v1\nold 2\n").unwrap();
        let old = TopicTable::load(dir.path()).unwrap().meta("old").unwrap();
        assert_eq!(old.partitions, 2);
        assert_eq!(TopicTable::load(dir.path()).unwrap().meta("old").unwrap().id, old.id);
    }
}
