//! `pyralog`: the daemon, and `pyralog topic ...` to manage a running one.
//!
//! The daemon runs one glommio executor per shard, each pinned to its own core (see `node`).
//! Flags are parsed and checked here; anything a person can get wrong (a taken port, a data
//! directory that cannot be written, no io_uring, a low memlock limit) ends the process with
//! one plain sentence, not a panic.

mod admin;
mod cluster;
mod config;
mod fetch;
mod groups;
mod identity;
mod kafka;
mod metrics;
mod node;
mod service;
mod status;

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{CommandFactory, Parser, Subcommand, ValueEnum};

/// O_DIRECT reads' buffers and the io_uring memory on huge pages (see `pyralog_dma::huge`).
#[global_allocator]
static ALLOCATOR: pyralog_dma::huge::DmaAllocator = pyralog_dma::huge::DmaAllocator;

#[derive(Debug, Parser)]
#[command(
    name = "pyralog",
    version,
    about = "A thread-per-core distributed log broker on io_uring",
    long_about = "A thread-per-core distributed log broker on io_uring.\n\nWithout a subcommand, runs a \
                  node: one shard per CPU, serving the native protocol on --listen and Kafka's on \
                  --kafka-listen, with Prometheus metrics on --metrics-listen. Every flag can also be set in \
                  a --config file; flags on the command line override it.",
    args_override_self = true
)]
pub struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    node: NodeArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Look at a running cluster through its nodes' --metrics-listen endpoints.
    Cluster {
        /// Any node's metrics address (its --metrics-listen): the others are found from it.
        #[arg(long, value_name = "HOST:PORT", default_value = "127.0.0.1:9644", global = true)]
        node: String,
        #[command(subcommand)]
        action: ClusterAction,
    },
    /// Manage the topics of a running node.
    Topic {
        /// The node's native listener.
        #[arg(long, value_name = "HOST:PORT", default_value = "127.0.0.1:7070", global = true)]
        broker: String,
        #[command(subcommand)]
        action: admin::TopicAction,
    },
}

#[derive(Debug, Subcommand)]
enum ClusterAction {
    /// Nodes (up or down), the controller's leader, and per partition its leader, replicas,
    /// in-sync replicas and followers' lag; under-replicated and offline partitions counted.
    Status,
    /// Compares the replicas of each partition of TOPIC up to the commit point (a checksum of
    /// their stored batches) and names any that differ; exits 1 if one does.
    Verify { topic: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DurabilityArg {
    /// Acknowledge a produce after its batch is on disk (fdatasync), with group commit.
    Sync,
    /// Acknowledge from memory; flush every --flush-interval-ms or --flush-bytes. A crash
    /// loses at most what arrived since the last flush.
    Cached,
}

#[derive(Debug, clap::Args, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct NodeArgs {
    /// A TOML (or, ending in .json, JSON) file setting any of these flags: keys are the flag
    /// names without dashes (`data-dir = "/var/lib/pyralog"`). Flags given here override it;
    /// unknown keys are refused. deploy/pyralog.toml lists every key.
    #[arg(long, value_name = "FILE")]
    #[serde(skip_serializing)]
    pub config: Option<PathBuf>,
    /// Where segments, indexes and topic metadata live (created if missing; relative paths are
    /// taken from the working directory).
    #[arg(long, value_name = "DIR", default_value = "./pyralog-data")]
    pub data_dir: PathBuf,
    /// The native protocol's shared address; every shard accepts on it (SO_REUSEPORT).
    #[arg(long, value_name = "HOST:PORT", default_value = "127.0.0.1:7070")]
    pub listen: SocketAddr,
    /// The Kafka protocol's address; every shard accepts on it (SO_REUSEPORT), so Kafka
    /// clients and tools (kcat, librdkafka, kafka-python, the Java client) work unchanged.
    #[arg(long, value_name = "HOST:PORT", default_value = "127.0.0.1:9092")]
    pub kafka_listen: SocketAddr,
    /// The address Kafka clients are told to connect to (metadata, coordinator lookups).
    /// Default: --kafka-listen. Set it when clients reach the node by another name or address;
    /// the per-shard Kafka ports are advertised at the same host.
    #[arg(long, value_name = "HOST:PORT")]
    pub kafka_advertise: Option<String>,
    /// First per-shard Kafka port: shard i is also Kafka broker i on this port + i, and
    /// metadata names each partition's shard as its leader, so Kafka clients send a
    /// partition's requests straight to the core that owns it. Default: the --kafka-listen
    /// port + 1. 0 picks free ports (reported in metadata).
    #[arg(long, value_name = "PORT")]
    pub kafka_shard_port_base: Option<u16>,
    /// Create a topic the first time a Kafka client asks for it in Metadata or Produce.
    #[arg(long, default_value_t = true, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub auto_create_topics: bool,
    /// Partitions of an auto-created topic, and of a Kafka CreateTopics asking for the default.
    #[arg(long, value_name = "COUNT", default_value_t = 1)]
    pub default_partitions: u32,
    /// How long the first member of an empty consumer group waits for others to join the
    /// same generation (Kafka's group.initial.rebalance.delay.ms).
    #[arg(long, value_name = "MS", default_value_t = 3000)]
    pub group_initial_rebalance_delay_ms: u64,
    /// Segment size of the consumer-offsets logs (Kafka's offsets.topic.segment.bytes):
    /// compaction frees whole segments. 64 KiB to 1 GiB.
    #[arg(long, value_name = "BYTES", default_value_t = 16 << 20, value_parser = clap::value_parser!(u64).range((64 << 10)..=(1 << 30)))]
    pub offsets_segment_bytes: u64,
    /// Compact a consumer-offsets log once this many bytes of commits were written since its
    /// last compaction: the latest offset of every group's partitions is written again and
    /// the segments before that are deleted (in a cluster, on every replica). 64 KiB to 64 GiB.
    #[arg(long, value_name = "BYTES", default_value_t = 64 << 20, value_parser = clap::value_parser!(u64).range((64 << 10)..=(64 << 30)))]
    pub offsets_compact_bytes: u64,
    /// A consumer group without members for this long loses the offsets it committed longer
    /// ago than this (Kafka's offsets.retention.minutes; default 7 days). A group loaded from
    /// the log counts its time without members from its latest commit.
    #[arg(long, value_name = "MINUTES", default_value_t = 7 * 24 * 60, value_parser = clap::value_parser!(u64).range(1..=(100 * 365 * 24 * 60)))]
    pub offsets_retention_minutes: u64,
    /// How often each group coordinator looks for offsets past --offsets-retention-minutes
    /// and, finding any, compacts its offsets log at once to drop them (Kafka's
    /// offsets.retention.check.interval.ms). 1 s to 1 day.
    #[arg(long, value_name = "MS", default_value_t = 600_000, value_parser = clap::value_parser!(u64).range(1000..=86_400_000))]
    pub offsets_retention_check_interval_ms: u64,
    /// First per-shard port: shard i also listens on this port + i, so a shard-aware client
    /// reaches a partition's owner with no cross-core hop. Default: the --listen port + 1.
    /// 0 picks free ports (reported in metadata).
    #[arg(long, value_name = "PORT")]
    pub shard_port_base: Option<u16>,
    /// Number of shards, pinned to CPUs 0..N. Default: one per available CPU.
    #[arg(long, value_name = "COUNT", conflicts_with = "cpus")]
    pub shards: Option<usize>,
    /// The CPUs to run shards on, one shard each: "0,1" or "0-3".
    #[arg(long, value_name = "LIST")]
    pub cpus: Option<String>,
    /// A segment is rolled before it grows past this many bytes (4 KiB to 4 GiB: positions in
    /// a segment are 32-bit).
    #[arg(long, value_name = "BYTES", default_value_t = 1 << 30, value_parser = clap::value_parser!(u64).range(4096..=(4 << 30)))]
    pub segment_bytes: u64,
    /// Bytes of recent batches each shard keeps in memory for tailing reads.
    #[arg(long, value_name = "BYTES", default_value_t = 256 << 20)]
    pub cache_bytes: u64,
    /// When a produce is acknowledged.
    #[arg(long, value_enum, default_value_t = DurabilityArg::Sync)]
    pub durability: DurabilityArg,
    /// Cached mode: flush at least this often (1 ms to 1 hour).
    #[arg(long, value_name = "MS", default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    pub flush_interval_ms: u64,
    /// Cached mode: flush once this many bytes wait (4 KiB to 64 MiB: a partition holds at
    /// most 64 MiB not yet on disk, and a produce past that waits for the flush).
    #[arg(long, value_name = "BYTES", default_value_t = 4 << 20, value_parser = clap::value_parser!(u64).range(4096..=(64 << 20)))]
    pub flush_bytes: u64,
    /// Delete the oldest closed segments while a partition would keep at least this many bytes.
    /// Default: keep everything. Applies to every topic (in a cluster, each replica below what
    /// it knows committed; not to the controller's log or the offsets topic).
    #[arg(long, value_name = "BYTES")]
    pub retention_bytes: Option<u64>,
    /// Delete closed segments whose newest record is older than this many milliseconds.
    /// Default: keep everything. Applies to every topic (in a cluster, each replica below what
    /// it knows committed; not to the controller's log or the offsets topic).
    #[arg(long, value_name = "MS")]
    pub retention_ms: Option<u64>,
    /// How often retention looks for segments to delete (Kafka's
    /// log.retention.check.interval.ms), and, in a cluster, how often each replica of the
    /// offsets topic and of the controller deletes what its latest snapshot covers: 100 ms to
    /// 1 hour.
    #[arg(long, value_name = "MS", default_value_t = 30_000, value_parser = clap::value_parser!(u64).range(100..=3_600_000))]
    pub retention_check_interval_ms: u64,
    /// Largest request frame; larger ones get an error and the connection is closed.
    #[arg(long, value_name = "BYTES", default_value_t = 8 << 20)]
    pub max_request_bytes: usize,
    /// Connections each shard serves at once on each of its listeners.
    #[arg(long, value_name = "COUNT", default_value_t = 4096)]
    pub max_connections: usize,
    /// Memory each shard registers with io_uring for disk write buffers; counts against the
    /// memlock limit (ulimit -l). Default 1 MiB: room for small flushes' writes (a large
    /// flush's 2 MiB chunks come from huge pages of the process's own memory).
    #[arg(long, value_name = "BYTES")]
    pub io_memory_bytes: Option<usize>,
    /// Where to serve Prometheus metrics (/metrics), readiness (/health: 200 once every shard
    /// serves, 503 before and while stopping) and the running configuration (/config), over
    /// HTTP. Port 0 picks a free port (printed at start-up).
    #[arg(long, value_name = "HOST:PORT", default_value = "127.0.0.1:9644")]
    pub metrics_listen: SocketAddr,
    /// Also export each partition's offsets and size, and consumer group lag per partition (one
    /// series per partition: mind the cardinality with many partitions).
    #[arg(long, default_value_t = false, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub metrics_partitions: bool,
    /// This node's id in its cluster: unique and stable. It is stored in the data directory at
    /// the first start, and a later start with another id is refused. Default: the stored id,
    /// else 0 (a node without --seeds is a cluster of one).
    #[arg(long, value_name = "ID")]
    pub node_id: Option<u32>,
    /// The cluster's seeds, ID@HOST:PORT,... (node ids and cluster addresses): the voters of
    /// the controller, the Raft group that holds the cluster's metadata. Give every seed the
    /// same list. Without it the node is a cluster of one.
    #[arg(long, value_name = "ID@HOST:PORT,...")]
    pub seeds: Option<String>,
    /// Where this node takes node-to-node traffic (replication, the controller): shard i
    /// listens on this port + i. Default: this node's address in --seeds.
    #[arg(long, value_name = "HOST:PORT")]
    pub cluster_listen: Option<SocketAddr>,
    /// The cluster address other nodes are told. Default: this node's address in --seeds, else
    /// --cluster-listen.
    #[arg(long, value_name = "HOST:PORT")]
    pub cluster_advertise: Option<String>,
    /// This node's failure domain (a rack, a zone): a topic's replicas go on distinct racks
    /// while there are racks to spare.
    #[arg(long, value_name = "NAME")]
    pub rack: Option<String>,
    /// Replicas of a topic created without a replication factor (Kafka's -1, an auto-created
    /// topic, `topic create` without --replication-factor). Default: 3, or the node count if
    /// fewer.
    #[arg(long, value_name = "COUNT")]
    pub default_replication_factor: Option<u32>,
    /// Replicas of the consumer-offsets topic (Kafka's offsets.topic.replication.factor),
    /// created when a consumer group first needs it. Unset: 3 (or --default-replication-factor),
    /// at most the nodes registered then. Set: exactly this many; until that many nodes are
    /// registered, consumer groups are answered COORDINATOR_NOT_AVAILABLE (they retry) and
    /// the node says why. Fixed once the topic exists.
    #[arg(long, value_name = "COUNT", value_parser = clap::value_parser!(u32).range(1..))]
    pub offsets_topic_replication_factor: Option<u32>,
    /// How often a partition's leader tells its followers it is alive.
    #[arg(long, value_name = "MS", default_value_t = 50, value_parser = clap::value_parser!(u64).range(10..=10_000))]
    pub heartbeat_interval_ms: u64,
    /// A follower that has not heard from its leader for this long (plus a random part up to as
    /// much again) starts an election. Lower fails over faster; too low for the machine's
    /// scheduling and network jitter makes needless elections.
    #[arg(long, value_name = "MS", default_value_t = 150, value_parser = clap::value_parser!(u64).range(20..=60_000))]
    pub election_timeout_ms: u64,
    /// A follower that has not caught up with its leader for this long is out of the in-sync
    /// replicas (Kafka's replica.lag.time.max.ms): metadata and `pyralog cluster status` show it.
    #[arg(long, value_name = "MS", default_value_t = 10_000)]
    pub replica_lag_time_max_ms: u64,
    /// Bytes per second each shard's partition leaders may read from disk to catch up
    /// followers that are behind the cache (new, back from a long stop, or back with an empty
    /// disk), so that clients keep the disk; 0 for no bound. Followers within the cache (the
    /// recent --cache-bytes) are sent from memory, unthrottled.
    #[arg(long, value_name = "BYTES", default_value_t = 100 << 20)]
    pub recovery_bytes_per_sec: u64,
    /// Segment size of a seed's copy of the controller's log (the cluster's metadata
    /// changes): a seed deletes the segments that its stored metadata (cluster.meta)
    /// covers. 4 KiB to 1 GiB.
    #[arg(long, value_name = "BYTES", default_value_t = 8 << 20, value_parser = clap::value_parser!(u64).range(4096..=(1 << 30)))]
    pub controller_segment_bytes: u64,
}

impl NodeArgs {
    /// The advertised Kafka host and port.
    pub fn kafka_advertised(&self) -> anyhow::Result<(String, u16)> {
        let Some(text) = &self.kafka_advertise else {
            if self.kafka_listen.ip().is_unspecified() {
                anyhow::bail!(
                    "--kafka-listen {} is every address, which Kafka clients cannot connect to: \
                     say where they reach this node with --kafka-advertise HOST:PORT",
                    self.kafka_listen
                );
            }
            return Ok((self.kafka_listen.ip().to_string(), self.kafka_listen.port()));
        };
        let (host, port) = text
            .rsplit_once(':')
            .ok_or_else(|| anyhow::anyhow!("--kafka-advertise '{text}' is not HOST:PORT"))?;
        let port: u16 =
            port.parse().map_err(|_| anyhow::anyhow!("--kafka-advertise '{text}' has no valid port"))?;
        Ok((host.trim_start_matches('[').trim_end_matches(']').to_owned(), port))
    }
}

/// The daemon's long flag names, which a --config file's keys may name.
fn daemon_flags() -> Vec<String> {
    Cli::command()
        .get_arguments()
        .filter_map(|arg| arg.get_long())
        .filter(|long| !matches!(*long, "help" | "version"))
        .map(String::from)
        .collect()
}

fn main() {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    // The command line alone first, where a flag given twice is an error: it names the file.
    let alone = Cli::command().args_override_self(false).get_matches_from(args.clone());
    let args = match alone.get_one::<PathBuf>("config") {
        Some(path) => config::splice(args, path, &daemon_flags()).unwrap_or_else(|error| {
            eprintln!("pyralog: {error:#}");
            std::process::exit(2);
        }),
        None => args,
    };
    // The file's settings, then the command line's, which override them.
    let cli = Cli::parse_from(args);
    if cli.command.is_some() {
        // An admin command's output piped into `head` ends it quietly when the pipe closes,
        // as other command-line tools do, rather than panicking in `println!` on EPIPE
        // (Rust ignores SIGPIPE). The daemon keeps ignoring it: a closed socket is an error
        // for one connection, not the end of the process.
        // SAFETY: called before any other thread exists; it only resets a signal disposition.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    let result = match cli.command {
        Some(Command::Topic { broker, action }) => admin::run(&broker, action),
        Some(Command::Cluster { node, action: ClusterAction::Status }) => status::status(&node),
        Some(Command::Cluster { node, action: ClusterAction::Verify { topic } }) => {
            status::verify(&node, &topic)
        }
        None => node::run(cli.node),
    };
    if let Err(error) = result {
        eprintln!("pyralog: {error:#}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// deploy/pyralog.toml is the reference of the config file's keys: every daemon flag but
    /// `config` itself is there, set or commented out.
    #[test]
    fn the_sample_config_file_names_every_flag() {
        let sample = include_str!("../../deploy/pyralog.toml");
        let keys: Vec<&str> = sample
            .lines()
            .filter_map(|line| line.trim_start_matches('#').trim_start().split_once(" = "))
            .map(|(key, _)| key)
            .collect();
        let missing: Vec<String> = daemon_flags()
            .into_iter()
            .filter(|flag| flag != "config" && !keys.contains(&flag.as_str()))
            .collect();
        assert!(missing.is_empty(), "deploy/pyralog.toml does not list {missing:?}");
    }
}
