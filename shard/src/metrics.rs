//! What a shard measures, and what it reports when the node is scraped.
//!
//! Each shard owns its metrics outright, as it owns its partitions: they are created with the
//! shard, updated only on its core, and read only there. A scrape asks every shard over the
//! mesh for a [`ShardScrape`] (`Shard::scrape`), which the shard writes on its own core: so no
//! metric is ever touched by two cores, and the histograms' internal mutex is never contended.
//! The daemon registers these metrics in the shard's registry (with everything else the shard
//! counts, such as its listeners') and turns the scrapes into Prometheus text.
//!
//! Gauges that follow state (offsets, sizes, committed offsets) are not kept up to date on the
//! hot path: a scrape reads them off the partitions and coordinators ([`PartitionStats`],
//! [`CommittedStats`]).

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

/// Buckets of the flush latency: 50 us to ~3.3 s, doubling.
const FLUSH_SECONDS_BUCKETS: (f64, f64, u16) = (50e-6, 2.0, 17);
/// Buckets of the bytes per flush: 4 KiB to 64 MiB (a partition's unflushed limit), doubling.
const FLUSH_BYTES_BUCKETS: (f64, f64, u16) = (4096.0, 2.0, 15);
/// Buckets of the replication lag: 100 us to ~11 s, by half again (so a p99 read from them
/// is within 50% of the true one; scripts/bench-cluster.sh interpolates inside a bucket).
const REPLICATION_LAG_SECONDS_BUCKETS: (f64, f64, u16) = (100e-6, 1.5, 29);

/// The metrics a shard updates itself.
#[derive(Debug)]
pub struct ShardMetrics {
    /// One flush of one partition: its writes plus the fdatasync.
    pub flush_duration: Histogram,
    pub flush_size: Histogram,
    pub flushed_bytes: Counter,
    /// Partition reads that returned records from the cache of recent batches, and those
    /// that read them from the log.
    pub cache_hits: Counter,
    pub cache_misses: Counter,
    /// Sampled on every tick of every replica this shard leads, once per follower: how long
    /// ago the leader appended the oldest batch that follower has not made durable (0 when
    /// it holds the leader's whole log durably). See `Replica::sample_replication_lag`.
    pub replication_lag: Histogram,
    /// Produces this shard, owning the partition, answered with an error, by the error's
    /// kind (`ShardError::kind`): refusals such as not_enough_replicas or not_leader, which
    /// clients retry, and failures.
    pub produce_errors: Family<Vec<(&'static str, &'static str)>, Counter>,
}

impl Default for ShardMetrics {
    fn default() -> Self {
        let (start, factor, length) = FLUSH_SECONDS_BUCKETS;
        let flush_duration = Histogram::new(exponential_buckets(start, factor, length));
        let (start, factor, length) = FLUSH_BYTES_BUCKETS;
        let flush_size = Histogram::new(exponential_buckets(start, factor, length));
        let (start, factor, length) = REPLICATION_LAG_SECONDS_BUCKETS;
        let replication_lag = Histogram::new(exponential_buckets(start, factor, length));
        ShardMetrics {
            flush_duration,
            flush_size,
            flushed_bytes: Counter::default(),
            cache_hits: Counter::default(),
            cache_misses: Counter::default(),
            replication_lag,
            produce_errors: Family::default(),
        }
    }
}

impl ShardMetrics {
    /// Registers every metric in `registry` (the shard's, labelled with its id).
    pub fn register(&self, registry: &mut Registry) {
        registry.register_with_unit(
            "flush_duration",
            "Time to flush one partition: its writes plus the fdatasync",
            Unit::Seconds,
            self.flush_duration.clone(),
        );
        registry.register_with_unit(
            "flush_size",
            "Bytes written by one flush of one partition",
            Unit::Bytes,
            self.flush_size.clone(),
        );
        registry.register_with_unit(
            "flushed",
            "Bytes written and fdatasync'ed by flushes",
            Unit::Bytes,
            self.flushed_bytes.clone(),
        );
        registry.register(
            "cache_hits",
            "Partition reads served from the shard's cache of recent batches",
            self.cache_hits.clone(),
        );
        registry.register(
            "cache_misses",
            "Partition reads that went to the log (disk or page-aligned read ahead)",
            self.cache_misses.clone(),
        );
        registry.register_with_unit(
            "replication_lag",
            "Per follower and tick of a leader replica: age of the oldest batch the follower has not made durable",
            Unit::Seconds,
            self.replication_lag.clone(),
        );
        registry.register(
            "produce_errors",
            "Produces answered with an error by the shard owning the partition, by kind (not_enough_replicas, not_leader, ...)",
            self.produce_errors.clone(),
        );
    }

    /// Counts a produce the owning shard answered with `error`.
    pub fn note_produce_error(&self, error: &crate::ShardError) {
        self.produce_errors.get_or_create(&vec![("kind", error.kind())]).inc();
    }
}

/// One partition's offsets and size, as a scrape found them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionStats {
    pub topic: String,
    pub partition: u32,
    pub log_start_offset: i64,
    /// The next offset to be assigned.
    pub log_end_offset: i64,
    pub durable_offset: i64,
    /// Consumers read below this: the durable offset in sync mode, the log end in cached mode.
    pub high_watermark: i64,
    pub size_bytes: u64,
    /// A write or fdatasync failed: the partition takes no more writes (fsyncgate).
    pub stopped: bool,
}

/// A consumer group's committed offset of one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommittedStats {
    pub group: String,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

/// What one shard reports to a scrape.
#[derive(Debug, Clone, Default)]
pub struct ShardScrape {
    pub shard: usize,
    /// The shard's registry in Prometheus text format, written by the daemon's scrape hook
    /// (`Shard::set_scrape_hook`); empty without one.
    pub text: String,
    pub partitions: Vec<PartitionStats>,
    pub committed: Vec<CommittedStats>,
}
