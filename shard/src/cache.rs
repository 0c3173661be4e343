//! The shard's cache of recent batches, shared by all the partitions the shard owns.
//!
//! Batches go in when they are appended, as the same `Bytes` the log writes, so a tailing
//! fetch is served without touching the disk and without copying. Eviction is first in,
//! first out across the shard: in an append-only log the oldest insert is the coldest data.
//! A batch that is not durable yet is never evicted (the log's unflushed bytes are bounded
//! separately), so every offset below the high watermark is either cached or on disk.
//!
//! Lives on one shard; `!Send`.

use std::collections::{HashMap, VecDeque};

use bytes::Bytes;

/// Identifies a partition within one shard.
pub type PartitionKey = u64;

#[derive(Debug, Clone)]
struct Entry {
    base_offset: i64,
    next_offset: i64,
    bytes: Bytes,
}

pub struct ShardCache {
    budget_bytes: u64,
    used_bytes: u64,
    partitions: HashMap<PartitionKey, Partition>,
    order: VecDeque<PartitionKey>,
}

#[derive(Default)]
struct Partition {
    entries: VecDeque<Entry>,
    /// Everything below it is on disk: only those batches may be evicted.
    durable_offset: i64,
}

impl ShardCache {
    pub fn new(budget_bytes: u64) -> ShardCache {
        ShardCache { budget_bytes, used_bytes: 0, partitions: HashMap::new(), order: VecDeque::new() }
    }

    pub fn used_bytes(&self) -> u64 {
        self.used_bytes
    }

    /// Caches a batch, then evicts what the budget no longer holds.
    pub fn insert(&mut self, key: PartitionKey, base_offset: i64, next_offset: i64, bytes: Bytes) {
        let partition = self.partitions.entry(key).or_default();
        if let Some(last) = partition.entries.back() {
            assert_eq!(last.next_offset, base_offset, "cached batches of a partition are contiguous");
        }
        self.used_bytes += bytes.len() as u64;
        partition.entries.push_back(Entry { base_offset, next_offset, bytes });
        self.order.push_back(key);
        self.evict();
    }

    /// Records that everything of partition `key` below `durable_offset` is on disk, then
    /// evicts what the budget no longer holds.
    pub fn mark_durable(&mut self, key: PartitionKey, durable_offset: i64) {
        let partition = self.partitions.entry(key).or_default();
        assert!(durable_offset >= partition.durable_offset, "the durable offset only grows");
        partition.durable_offset = durable_offset;
        self.evict();
    }

    /// Evicts the oldest batches while over budget, stopping at one that is not durable yet.
    fn evict(&mut self) {
        while self.used_bytes > self.budget_bytes {
            let Some(&key) = self.order.front() else { break };
            let partition = self.partitions.get_mut(&key).expect("ordered keys have entries");
            let oldest = partition.entries.front().expect("ordered keys have entries");
            if oldest.next_offset > partition.durable_offset {
                break;
            }
            self.used_bytes -= oldest.bytes.len() as u64;
            partition.entries.pop_front();
            self.order.pop_front();
        }
    }

    /// Batches from the one holding `offset`, below `high_watermark`, up to `max_bytes` (with
    /// `min_one`, at least one batch however large). `None` when the cache does not reach
    /// back to `offset`; then the log has it, if anyone does. (The cache holds a contiguous
    /// suffix of each partition, so when it reaches back, nothing more is on disk.)
    pub fn read(
        &self,
        key: PartitionKey,
        offset: i64,
        high_watermark: i64,
        max_bytes: usize,
        min_one: bool,
    ) -> Option<Vec<Bytes>> {
        let entries = &self.partitions.get(&key)?.entries;
        let first = entries.front()?;
        if offset < first.base_offset {
            return None;
        }
        let start = entries.partition_point(|e| e.next_offset <= offset);
        let mut chunks = Vec::new();
        let mut bytes = 0usize;
        for entry in entries.range(start..) {
            if entry.next_offset > high_watermark
                || ((!min_one || !chunks.is_empty()) && bytes + entry.bytes.len() > max_bytes)
            {
                break;
            }
            bytes += entry.bytes.len();
            chunks.push(entry.bytes.clone());
        }
        Some(chunks)
    }

    /// Drops the batches of partition `key` that will never be durable: its log stopped
    /// taking writes after a failed flush, and what was pending is not on disk. Left in place
    /// they would stop the shard's eviction for good (it never passes an undurable batch).
    pub fn drop_undurable(&mut self, key: PartitionKey) {
        let Some(partition) = self.partitions.get_mut(&key) else { return };
        let mut dropped = 0;
        while partition.entries.back().is_some_and(|e| e.next_offset > partition.durable_offset) {
            let entry = partition.entries.pop_back().expect("checked");
            self.used_bytes -= entry.bytes.len() as u64;
            dropped += 1;
        }
        // Their places in the eviction order are this partition's last ones.
        let mut at = self.order.len();
        while dropped > 0 {
            at -= 1;
            if self.order[at] == key {
                self.order.remove(at);
                dropped -= 1;
            }
        }
        self.evict();
    }

    /// Drops a partition's entries (truncation, deletion).
    pub fn forget(&mut self, key: PartitionKey) {
        if let Some(partition) = self.partitions.remove(&key) {
            self.used_bytes -= partition.entries.iter().map(|e| e.bytes.len() as u64).sum::<u64>();
            self.order.retain(|k| *k != key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(len: usize) -> Bytes {
        Bytes::from(vec![0u8; len])
    }

    #[test]
    fn reads_start_at_the_batch_holding_the_offset() {
        let mut cache = ShardCache::new(1 << 20);
        cache.mark_durable(1, 100);
        for i in 0..10 {
            cache.insert(1, i * 10, i * 10 + 10, chunk(100));
        }
        let chunks = cache.read(1, 35, 100, 250, true).unwrap();
        assert_eq!(chunks.len(), 2, "batches 30..40 and 40..50 fit in 250 bytes");
        assert_eq!(cache.read(1, 35, 40, 1 << 20, true).unwrap().len(), 1, "the high watermark bounds reads");
        assert_eq!(cache.read(1, 95, 100, 1, true).unwrap().len(), 1, "one batch even above max_bytes");
        assert_eq!(cache.read(1, 95, 100, 1, false).unwrap().len(), 0, "unless only what fits is wanted");
        assert!(cache.read(2, 0, 100, 100, true).is_none());
    }

    #[test]
    fn eviction_is_fifo_across_partitions_and_spares_unflushed_batches() {
        let mut cache = ShardCache::new(300);
        cache.insert(1, 0, 1, chunk(100));
        cache.insert(2, 0, 1, chunk(100));
        cache.insert(1, 1, 2, chunk(100));
        cache.insert(2, 1, 2, chunk(100));
        assert_eq!(cache.used_bytes(), 400, "nothing durable, nothing evicted");
        cache.mark_durable(2, 2);
        assert_eq!(cache.used_bytes(), 400, "partition 1's oldest batch is first and not durable");
        cache.mark_durable(1, 2);
        assert_eq!(cache.used_bytes(), 300);
        assert!(cache.read(1, 0, 2, 1000, true).is_none(), "partition 1's oldest batch went first");
        assert_eq!(cache.read(2, 0, 2, 1000, true).unwrap().len(), 2);
        cache.forget(2);
        assert_eq!(cache.used_bytes(), 100);
    }

    #[test]
    fn a_partition_that_stopped_taking_writes_does_not_hold_eviction_back() {
        let mut cache = ShardCache::new(250);
        cache.insert(1, 0, 1, chunk(100));
        cache.mark_durable(1, 1);
        cache.insert(1, 1, 2, chunk(100)); // its flush fails: never durable
        for offset in 0..5 {
            cache.insert(2, offset, offset + 1, chunk(100));
            cache.mark_durable(2, offset + 1);
        }
        assert_eq!(cache.used_bytes(), 600, "partition 1's undurable batch blocks eviction");
        cache.drop_undurable(1);
        assert_eq!(cache.used_bytes(), 200, "within budget again");
        cache.insert(1, 1, 2, chunk(100)); // contiguous again at the durable end
        cache.insert(2, 5, 6, chunk(100));
        cache.mark_durable(2, 6);
        assert_eq!(cache.read(2, 5, 6, 1000, true).unwrap().len(), 1);
    }

    #[test]
    fn one_partition_flushing_never_evicts_anothers_unflushed_batches() {
        let mut cache = ShardCache::new(100);
        cache.insert(1, 0, 1, chunk(100));
        cache.insert(2, 0, 1, chunk(100));
        cache.mark_durable(2, 1);
        assert_eq!(cache.read(1, 0, 1, 1000, true).unwrap().len(), 1, "partition 1 is not durable yet");
        cache.mark_durable(1, 1);
        assert!(cache.read(1, 0, 1, 1000, true).is_none());
        assert_eq!(cache.used_bytes(), 100);
    }
}
