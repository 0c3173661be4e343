//! The operator's endpoints on `--metrics-listen`: `/metrics` (Prometheus text format),
//! `/health` and `/config`.
//!
//! Every shard has a registry of its own (labelled `shard="N"`), holding its listeners' and
//! its storage's metrics; only its own core updates and reads them. A scrape arrives at shard
//! 0, which asks each shard over the mesh for its registry's text and its partitions' and
//! consumer groups' offsets (`Shard::scrape`), then merges the texts family by family and adds
//! the node-wide families: build info, partition counts and sizes, consumer group lag, and
//! the process's memory, CPU and file descriptors. No shard takes a lock another core holds,
//! and the hot paths count through handles (see `pyralog_net::server::ListenerMetrics`).
//!
//! Label cardinality stays low by default (shard, protocol, API, consumer group and topic);
//! `--metrics-partitions` adds one series per partition for offsets and sizes, and per
//! partition for group lag.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};
use pyralog_net::http::{HttpHandler, HttpResponse};
use pyralog_net::server::ServerMetrics;
use pyralog_shard::metrics::{PartitionStats, ShardScrape};
use pyralog_shard::{ScrapeHook, Shard};

use crate::service::Topology;

/// Every metric name starts with this (but the standard `process_*` ones).
const PREFIX: &str = "pyralog";

/// One shard's registry and what its listeners count through.
pub struct ShardRegistry {
    registry: Registry,
    pub server: ServerMetrics,
}

impl ShardRegistry {
    pub fn new(shard: &Shard) -> ShardRegistry {
        let mut registry = Registry::with_prefix_and_labels(
            PREFIX,
            [("shard".into(), shard.id.to_string().into())].into_iter(),
        );
        let server = ServerMetrics::default();
        server.register(&mut registry);
        shard.metrics().register(&mut registry);
        ShardRegistry { registry, server }
    }

    /// What writes this registry for a scrape, on the shard's own core.
    pub fn into_scrape_hook(self) -> ScrapeHook {
        Box::new(move || {
            let mut text = String::new();
            prometheus_text::encode(&mut text, &self.registry).expect("writing to a String cannot fail");
            text
        })
    }
}

/// Serves `/metrics`, `/health` and `/config` on shard 0.
pub struct Endpoints {
    pub shard: Rc<Shard>,
    /// Set once every shard serves.
    pub topology: Arc<OnceLock<Topology>>,
    /// Set when the node begins to stop.
    pub stopping: Arc<AtomicBool>,
    /// The running configuration, as JSON.
    pub config_json: String,
    pub per_partition: bool,
    /// Unix time the process started, in seconds.
    pub started_at_s: f64,
    pub node_id: u32,
    /// The cluster's id, hex.
    pub cluster_id: String,
}

impl HttpHandler for Endpoints {
    async fn get(&self, path: &str) -> HttpResponse {
        match path {
            "/metrics" => self.metrics().await,
            "/health" => self.health(),
            "/config" => HttpResponse {
                status: 200,
                content_type: "application/json",
                body: format!("{}\n", self.config_json),
            },
            "/cluster" => crate::status::cluster_json(&self.shard, self.node_id, &self.cluster_id).await,
            path if path.starts_with("/checksum/") => crate::status::checksum_json(&self.shard, path).await,
            "/" => HttpResponse::text(200, "pyralog: /metrics (Prometheus), /health, /config, /cluster\n"),
            _ => HttpResponse::text(404, format!("{path} is not served: try /metrics, /health or /config\n")),
        }
    }
}

impl Endpoints {
    fn health(&self) -> HttpResponse {
        if self.stopping.load(Ordering::SeqCst) {
            return HttpResponse::text(503, "stopping\n");
        }
        match self.topology.get() {
            Some(topology) => {
                HttpResponse::text(200, format!("ready: {} shards serving\n", topology.shards.len()))
            }
            None => HttpResponse::text(503, "starting: not every shard serves yet\n"),
        }
    }

    async fn metrics(&self) -> HttpResponse {
        let mut scrapes = match self.shard.scrape().await {
            Ok(scrapes) => scrapes,
            Err(error) => return HttpResponse::text(503, format!("cannot scrape the shards: {error}\n")),
        };
        // The shards' texts move out; node_families reads only their offsets.
        let mut texts: Vec<String> =
            scrapes.iter_mut().map(|scrape| std::mem::take(&mut scrape.text)).collect();
        texts.push(node_families(&scrapes, self.per_partition));
        texts.push(process_families(self.started_at_s));
        HttpResponse {
            status: 200,
            content_type: "text/plain; version=0.0.4; charset=utf-8",
            body: merge_families(&texts),
        }
    }
}

type Labels = Vec<(&'static str, String)>;

/// The families computed from every shard's partitions and committed offsets.
fn node_families(scrapes: &[ShardScrape], per_partition: bool) -> String {
    let mut registry = Registry::with_prefix(PREFIX);
    let build = Family::<Labels, Gauge>::default();
    build.get_or_create(&vec![("version", env!("CARGO_PKG_VERSION").to_owned())]).set(1);
    registry.register("build_info", "The running pyralog's version (always 1)", build);

    let partitions = Family::<Labels, Gauge>::default();
    let stopped = Family::<Labels, Gauge>::default();
    let log_size = Family::<Labels, Gauge>::default();
    for scrape in scrapes {
        let shard = vec![("shard", scrape.shard.to_string())];
        partitions.get_or_create(&shard).set(scrape.partitions.len() as i64);
        stopped.get_or_create(&shard).set(scrape.partitions.iter().filter(|p| p.stopped).count() as i64);
        log_size.get_or_create(&shard).set(scrape.partitions.iter().map(|p| p.size_bytes as i64).sum());
    }
    registry.register("partitions", "Partitions open on each shard", partitions);
    registry.register(
        "partitions_stopped",
        "Partitions that take no more writes after a write or fdatasync error (restart to recover)",
        stopped,
    );
    registry.register_with_unit(
        "log_size",
        "Bytes of all partitions' segments on each shard",
        Unit::Bytes,
        log_size,
    );

    let by_partition: BTreeMap<(&str, u32), &PartitionStats> =
        scrapes.iter().flat_map(|s| &s.partitions).map(|p| ((p.topic.as_str(), p.partition), p)).collect();
    if per_partition {
        register_partition_families(&mut registry, &by_partition);
    }
    let lag = Family::<Labels, Gauge>::default();
    for committed in scrapes.iter().flat_map(|s| &s.committed) {
        let Ok(partition) = u32::try_from(committed.partition) else { continue };
        let Some(stats) = by_partition.get(&(committed.topic.as_str(), partition)) else { continue };
        let behind = (stats.high_watermark - committed.offset).max(0);
        let mut labels = vec![("group", committed.group.clone()), ("topic", committed.topic.clone())];
        if per_partition {
            labels.push(("partition", partition.to_string()));
        }
        lag.get_or_create(&labels).inc_by(behind);
    }
    registry.register(
        "consumer_group_lag_messages",
        "Offsets between a group's committed offset and the high watermark, summed over the topic's \
         partitions (per partition with --metrics-partitions)",
        lag,
    );
    encode(&registry)
}

fn register_partition_families(registry: &mut Registry, partitions: &BTreeMap<(&str, u32), &PartitionStats>) {
    type Reading = fn(&PartitionStats) -> i64;
    let families: [(&str, &str, Reading); 5] = [
        ("partition_log_start_offset", "First offset still stored", |p| p.log_start_offset),
        ("partition_log_end_offset", "Next offset to be assigned", |p| p.log_end_offset),
        ("partition_durable_offset", "Offsets below this are fdatasync'ed", |p| p.durable_offset),
        ("partition_high_watermark", "Consumers read below this", |p| p.high_watermark),
        ("partition_size_bytes", "Bytes of the partition's segments", |p| p.size_bytes as i64),
    ];
    for (name, help, value) in families {
        let family = Family::<Labels, Gauge>::default();
        for ((topic, partition), stats) in partitions {
            family
                .get_or_create(&vec![("topic", (*topic).to_owned()), ("partition", partition.to_string())])
                .set(value(stats));
        }
        registry.register(name, help, family);
    }
}

/// The standard process families (as Prometheus's client libraries name them).
fn process_families(started_at_s: f64) -> String {
    let mut text = String::new();
    let mut gauge = |name: &str, kind: &str, help: &str, value: f64| {
        let _ = write!(text, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n");
    };
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = |key: &str| -> f64 {
        let line = status.lines().find(|l| l.starts_with(key)).unwrap_or_default();
        line.split_whitespace().nth(1).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0) * 1024.0
    };
    gauge("process_resident_memory_bytes", "gauge", "Resident memory size in bytes.", kib("VmRSS:"));
    gauge("process_virtual_memory_bytes", "gauge", "Virtual memory size in bytes.", kib("VmSize:"));
    let fds = std::fs::read_dir("/proc/self/fd").map_or(0, |entries| entries.count());
    gauge("process_open_fds", "gauge", "Number of open file descriptors.", fds as f64);
    gauge(
        "process_cpu_seconds_total",
        "counter",
        "Total user and system CPU time spent in seconds.",
        cpu_seconds(),
    );
    gauge(
        "process_start_time_seconds",
        "gauge",
        "Start time of the process since unix epoch in seconds.",
        started_at_s,
    );
    text
}

/// User plus system CPU time of this process, from /proc/self/stat.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces, so split after its ')').
    let fields: Vec<&str> = stat.rsplit_once(')').map_or("", |(_, rest)| rest).split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf reads a constant of the running system.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    // utime and stime are fields 14 and 15 of stat; 11 and 12 counted from after the name.
    (ticks(11) + ticks(12)) / per_second
}

fn encode(registry: &Registry) -> String {
    let mut text = String::new();
    prometheus_text::encode(&mut text, registry).expect("writing to a String cannot fail");
    text
}

/// Joins several expositions into one: each family's HELP and TYPE once, followed by the
/// samples of that family from every text, families in the order they first appear. The
/// shards' registries hold the same families (with different `shard` labels), and a family
/// may appear only once in an exposition.
pub fn merge_families(texts: &[String]) -> String {
    let mut order: Vec<String> = Vec::new();
    let mut families: BTreeMap<String, (Vec<String>, Vec<String>)> = BTreeMap::new();
    for text in texts {
        let mut current = String::new();
        for line in text.lines().filter(|l| !l.is_empty() && *l != "# EOF") {
            if let Some(rest) = line.strip_prefix("# HELP ").or_else(|| line.strip_prefix("# TYPE ")) {
                let name = rest.split(' ').next().unwrap_or_default().to_owned();
                let entry = families.entry(name.clone()).or_insert_with(|| {
                    order.push(name.clone());
                    Default::default()
                });
                if !entry.0.iter().any(|l| l == line) && (current != name || entry.0.len() < 2) {
                    entry.0.push(line.to_owned());
                }
                current = name;
            } else {
                families.entry(current.clone()).or_default().1.push(line.to_owned());
            }
        }
    }
    let mut out = String::new();
    for name in order {
        let (head, samples) = &families[&name];
        for line in head.iter().chain(samples) {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_of_several_shards_are_merged_with_one_head_each() {
        let shard = |id: u32, value: u32| {
            format!(
                "# HELP pyralog_requests_total Requests.\n# TYPE pyralog_requests_total counter\n\
                 pyralog_requests_total{{shard=\"{id}\"}} {value}\n# HELP pyralog_x X.\n# TYPE pyralog_x gauge\n\
                 pyralog_x{{shard=\"{id}\"}} 1\n"
            )
        };
        let merged = merge_families(&[shard(0, 5), shard(1, 7)]);
        assert_eq!(
            merged,
            "# HELP pyralog_requests_total Requests.\n# TYPE pyralog_requests_total counter\n\
             pyralog_requests_total{shard=\"0\"} 5\npyralog_requests_total{shard=\"1\"} 7\n\
             # HELP pyralog_x X.\n# TYPE pyralog_x gauge\npyralog_x{shard=\"0\"} 1\npyralog_x{shard=\"1\"} 1\n"
        );
    }

    #[test]
    fn lag_is_the_high_watermark_minus_the_commit_summed_per_topic() {
        let stats = |partition, high_watermark| PartitionStats {
            topic: "orders".into(),
            partition,
            log_start_offset: 0,
            log_end_offset: high_watermark,
            durable_offset: high_watermark,
            high_watermark,
            size_bytes: 100,
            stopped: partition == 1,
        };
        let committed = |partition, offset| pyralog_shard::metrics::CommittedStats {
            group: "billing".into(),
            topic: "orders".into(),
            partition,
            offset,
        };
        let scrapes = vec![
            ShardScrape {
                shard: 0,
                text: String::new(),
                partitions: vec![stats(0, 100)],
                committed: vec![committed(0, 60), committed(1, 10)],
            },
            ShardScrape { shard: 1, text: String::new(), partitions: vec![stats(1, 50)], committed: vec![] },
        ];
        let text = node_families(&scrapes, false);
        assert!(
            text.contains("pyralog_consumer_group_lag_messages{group=\"billing\",topic=\"orders\"} 80\n"),
            "{text}"
        );
        assert!(text.contains("pyralog_partitions_stopped{shard=\"1\"} 1\n"), "{text}");
        assert!(!text.contains("partition_log_end_offset"), "{text}");
        let text = node_families(&scrapes, true);
        assert!(text.contains("pyralog_consumer_group_lag_messages{group=\"billing\",topic=\"orders\",partition=\"1\"} 40\n"), "{text}");
        assert!(
            text.contains("pyralog_partition_log_end_offset{topic=\"orders\",partition=\"0\"} 100\n"),
            "{text}"
        );
    }
}
