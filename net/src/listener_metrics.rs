//! What a shard's listeners count: requests, bytes in and out per API and protocol, produce
//! and fetch latency, connections.
//!
//! One [`ServerMetrics`] per shard holds the metric families, registered once in the shard's
//! registry; each listener counts through a [`ListenerMetrics`] of its protocol, which keeps
//! the handles of the series it has used so far (a `RefCell`: a listener lives on one core),
//! so counting a request takes no lock: only the first request of an API looks its series up
//! in the family.
//!
//! Label cardinality is bounded by the protocols' API counts: `protocol` (native, kafka) and
//! `api` (a name of the protocol's request kinds, snake_case).

use std::cell::RefCell;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

/// Labels of a per-API series.
type ApiLabels = Vec<(&'static str, String)>;
/// Labels of a per-protocol series.
type ProtocolLabels = Vec<(&'static str, &'static str)>;
type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Request latency buckets: 25 us to ~3.3 s, doubling (fetches that long-poll fill the top).
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(25e-6, 2.0, 18))
}

/// A request's API as metrics name it.
#[derive(Debug, Clone, Copy)]
pub struct Api {
    /// The protocol's number for the API (Kafka's API key), below [`API_INDEXES`]: where its
    /// series are kept.
    pub index: u8,
    /// Whether its latency is measured: produce and fetch.
    pub timed: bool,
    /// The API's name as the protocol spells it (`produce`; Kafka's `ListOffsets`), looked up
    /// once per API and listener; metrics use it in snake_case.
    pub name: fn(u8) -> &'static str,
}

/// APIs a protocol may number (one slot each per listener).
pub const API_INDEXES: usize = 256;

impl Api {
    /// Requests that could not be decoded: no API to name.
    pub const UNREADABLE: Api = Api { index: u8::MAX, timed: false, name: |_| "unreadable" };
}

/// The metric families of one shard's listeners.
#[derive(Debug, Clone)]
pub struct ServerMetrics {
    requests: Family<ApiLabels, Counter>,
    request_bytes: Family<ApiLabels, Counter>,
    response_bytes: Family<ApiLabels, Counter>,
    produce_latency: HistogramFamily<ProtocolLabels>,
    fetch_latency: HistogramFamily<ProtocolLabels>,
    connections: Family<ProtocolLabels, Gauge>,
    connections_accepted: Family<ProtocolLabels, Counter>,
}

impl Default for ServerMetrics {
    fn default() -> Self {
        ServerMetrics {
            requests: Family::default(),
            request_bytes: Family::default(),
            response_bytes: Family::default(),
            produce_latency: Family::new_with_constructor(latency_histogram),
            fetch_latency: Family::new_with_constructor(latency_histogram),
            connections: Family::default(),
            connections_accepted: Family::default(),
        }
    }
}

impl ServerMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register("requests", "Requests received, by protocol and API", self.requests.clone());
        registry.register_with_unit(
            "request",
            "Bytes of requests received (frames, with their size prefix), by protocol and API",
            Unit::Bytes,
            self.request_bytes.clone(),
        );
        registry.register_with_unit(
            "response",
            "Bytes of responses sent, by protocol and API",
            Unit::Bytes,
            self.response_bytes.clone(),
        );
        registry.register_with_unit(
            "produce_latency",
            "Produce requests from decoded to answered (in sync mode, including the fdatasync)",
            Unit::Seconds,
            self.produce_latency.clone(),
        );
        registry.register_with_unit(
            "fetch_latency",
            "Fetch requests from decoded to answered, including any long-poll wait",
            Unit::Seconds,
            self.fetch_latency.clone(),
        );
        registry.register("connections", "Client connections open now", self.connections.clone());
        registry.register(
            "connections_accepted",
            "Client connections accepted (including those refused at --max-connections)",
            self.connections_accepted.clone(),
        );
    }

    /// The counting handle of one protocol's listeners on this shard.
    pub fn listener(&self, protocol: &'static str) -> ListenerMetrics {
        let labels = vec![("protocol", protocol)];
        ListenerMetrics {
            protocol,
            families: self.clone(),
            produce_latency: self.produce_latency.get_or_create(&labels).clone(),
            fetch_latency: self.fetch_latency.get_or_create(&labels).clone(),
            connections: self.connections.get_or_create(&labels).clone(),
            connections_accepted: self.connections_accepted.get_or_create(&labels).clone(),
            apis: RefCell::new(vec![None; API_INDEXES]),
        }
    }
}

/// The series of one API.
#[derive(Debug, Clone)]
struct ApiSeries {
    requests: Counter,
    request_bytes: Counter,
    response_bytes: Counter,
    latency: Option<Histogram>,
}

/// Counts one protocol's requests on one shard. Lives on that shard's core.
#[derive(Debug)]
pub struct ListenerMetrics {
    protocol: &'static str,
    families: ServerMetrics,
    produce_latency: Histogram,
    fetch_latency: Histogram,
    pub(crate) connections: Gauge,
    pub(crate) connections_accepted: Counter,
    /// By the API's index, filled at its first request.
    apis: RefCell<Vec<Option<ApiSeries>>>,
}

impl ListenerMetrics {
    fn new_series(&self, api: Api) -> ApiSeries {
        let name = snake_case((api.name)(api.index));
        let latency = match name.as_str() {
            "produce" => Some(self.produce_latency.clone()),
            "fetch" => Some(self.fetch_latency.clone()),
            _ => None,
        };
        let labels = vec![("protocol", self.protocol.to_owned()), ("api", name)];
        ApiSeries {
            requests: self.families.requests.get_or_create(&labels).clone(),
            request_bytes: self.families.request_bytes.get_or_create(&labels).clone(),
            response_bytes: self.families.response_bytes.get_or_create(&labels).clone(),
            latency: latency.filter(|_| api.timed),
        }
    }

    /// Runs `count` on the series of `api`, made at its first use. Counting takes no lock
    /// another core holds and clones nothing.
    fn with_series(&self, api: Api, count: impl FnOnce(&ApiSeries)) {
        let mut apis = self.apis.borrow_mut();
        let slot = &mut apis[usize::from(api.index)];
        count(slot.get_or_insert_with(|| self.new_series(api)));
    }

    /// A request of `bytes` (its whole frame) arrived.
    pub fn request(&self, api: Api, bytes: usize) {
        self.with_series(api, |series| {
            series.requests.inc();
            series.request_bytes.inc_by(bytes as u64);
        });
    }

    /// A request of `api` was answered after `elapsed`.
    pub fn answered(&self, api: Api, elapsed: Duration) {
        self.with_series(api, |series| {
            if let Some(latency) = &series.latency {
                latency.observe(elapsed.as_secs_f64());
            }
        });
    }

    /// A response of `bytes` to a request of `api` was encoded for sending.
    pub fn response(&self, api: Api, bytes: usize) {
        self.with_series(api, |series| {
            series.response_bytes.inc_by(bytes as u64);
        });
    }
}

/// `ListOffsets` -> `list_offsets`; names already in snake_case are kept.
fn snake_case(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 4);
    for (i, c) in name.char_indices() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_become_snake_case() {
        assert_eq!(snake_case("ListOffsets"), "list_offsets");
        assert_eq!(snake_case("Produce"), "produce");
        assert_eq!(snake_case("create_topic"), "create_topic");
    }

    #[test]
    fn requests_are_counted_per_protocol_and_api_and_only_produce_and_fetch_are_timed() {
        let metrics = ServerMetrics::default();
        let mut registry = Registry::with_prefix("pyralog");
        metrics.register(&mut registry);
        let kafka = metrics.listener("kafka");
        let native = metrics.listener("native");
        let produce = Api { index: 0, timed: true, name: |_| "Produce" };
        let metadata = Api { index: 3, timed: false, name: |_| "Metadata" };
        kafka.request(produce, 100);
        kafka.answered(produce, Duration::from_millis(2));
        kafka.request(metadata, 30);
        kafka.answered(metadata, Duration::from_millis(2));
        let native_produce = Api { index: 0, timed: true, name: |_| "produce" };
        native.request(native_produce, 70);
        native.response(native_produce, 20);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for line in [
            "pyralog_requests_total{protocol=\"kafka\",api=\"produce\"} 1",
            "pyralog_request_bytes_total{protocol=\"kafka\",api=\"produce\"} 100",
            "pyralog_requests_total{protocol=\"kafka\",api=\"metadata\"} 1",
            "pyralog_request_bytes_total{protocol=\"native\",api=\"produce\"} 70",
            "pyralog_response_bytes_total{protocol=\"native\",api=\"produce\"} 20",
            "pyralog_produce_latency_seconds_count{protocol=\"kafka\"} 1",
            "pyralog_produce_latency_seconds_count{protocol=\"native\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line} in\n{text}");
        }
    }
}
