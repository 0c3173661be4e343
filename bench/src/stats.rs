//! Run-wide counters, latency histograms, progress lines and the final report.
//!
//! Workers count with atomics and record latencies into their own histogram (behind an
//! uncontended mutex); the progress printer and the report merge the histograms. Latencies are
//! in microseconds, clamped to the histogram's range rather than dropped.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use hdrhistogram::Histogram;

/// Largest latency the histograms hold: one hour.
const LATENCY_US_MAX: u64 = 3_600_000_000;

pub type SharedHistogram = Arc<Mutex<Histogram<u64>>>;

pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_US_MAX, 3).expect("static bounds are valid")
}

pub fn record_us(histogram: &mut Histogram<u64>, latency_us: u64) {
    histogram.saturating_record(latency_us.clamp(1, LATENCY_US_MAX));
}

/// The histograms of one kind of latency, one per worker.
#[derive(Debug, Default)]
pub struct LatencySet {
    workers: Mutex<Vec<SharedHistogram>>,
}

impl LatencySet {
    pub fn register(&self) -> SharedHistogram {
        let histogram = Arc::new(Mutex::new(new_histogram()));
        self.workers.lock().expect("no panics under this lock").push(Arc::clone(&histogram));
        histogram
    }

    pub fn merged(&self) -> Histogram<u64> {
        let mut merged = new_histogram();
        for worker in self.workers.lock().expect("no panics under this lock").iter() {
            let worker = worker.lock().unwrap_or_else(|p| p.into_inner());
            merged.add(&*worker).expect("same bounds");
        }
        merged
    }
}

/// State shared by every thread of a run.
#[derive(Debug)]
pub struct Run {
    pub start: Instant,
    /// Set to make every worker wind down (end of run, broker gone, deadline).
    pub stop: AtomicBool,
    pub sent: AtomicU64,
    pub acked: AtomicU64,
    /// Sent under `--acks none`: on the wire, never acknowledged.
    pub unacknowledged: AtomicU64,
    pub produced_bytes: AtomicU64,
    pub errors: AtomicU64,
    pub consumed: AtomicU64,
    pub consumed_bytes: AtomicU64,
    /// Messages below the high watermarks that consumers had not read when they stopped.
    pub unread: AtomicU64,
    /// When the last record was received, in ns since `start`: the end of the time a consume
    /// spent receiving (its rate leaves out the idle wait that ends it).
    pub last_record_ns: AtomicU64,
    /// Why each consumer stopped, one sentence per distinct reason.
    pub consume_stopped: Mutex<Vec<String>>,
    pub producers_done: AtomicBool,
    pub produce_latency: LatencySet,
    pub consume_latency: LatencySet,
    /// Under `--rate`: how late each record reached `Producer::send` after its intended time.
    /// The load generator's own lateness, already inside the latencies above; a large value
    /// here means the machine, not the broker, delayed the sends.
    pub send_lag: LatencySet,
    /// Requests sent again because their partition's leader moved (a failover).
    pub leader_retries: AtomicU64,
    /// Acknowledgements so far: the last one's time and the longest gap between two, in ns
    /// since `start`. A failover shows here as the time no batch was acknowledged.
    pub ack_gaps: Mutex<AckGaps>,
    /// The first failure that means the broker is gone.
    pub broker_gone: Mutex<Option<String>>,
    pub first_error: Mutex<Option<String>>,
}

impl Run {
    pub fn new() -> Run {
        Run {
            start: Instant::now(),
            stop: AtomicBool::new(false),
            sent: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            unacknowledged: AtomicU64::new(0),
            produced_bytes: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            consumed: AtomicU64::new(0),
            consumed_bytes: AtomicU64::new(0),
            unread: AtomicU64::new(0),
            last_record_ns: AtomicU64::new(0),
            consume_stopped: Mutex::new(Vec::new()),
            producers_done: AtomicBool::new(false),
            produce_latency: LatencySet::default(),
            send_lag: LatencySet::default(),
            consume_latency: LatencySet::default(),
            leader_retries: AtomicU64::new(0),
            ack_gaps: Mutex::new(AckGaps::default()),
            broker_gone: Mutex::new(None),
            first_error: Mutex::new(None),
        }
    }

    /// Notes an acknowledgement that arrived at `acknowledged_ns` (since `start`).
    pub fn acknowledged_at(&self, acknowledged_ns: u64) {
        let mut gaps = self.ack_gaps.lock().expect("no panics under this lock");
        if let Some(last_ns) = gaps.last_ns {
            gaps.longest_ns = gaps.longest_ns.max(acknowledged_ns.saturating_sub(last_ns));
        }
        gaps.last_ns = Some(gaps.last_ns.map_or(acknowledged_ns, |last| last.max(acknowledged_ns)));
    }

    pub fn elapsed_ns(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Records a failure; a lost broker also stops the run.
    pub fn fail(&self, error: &pyralog_net::client::ClientError) {
        if error.is_disconnect() {
            self.broker_gone
                .lock()
                .expect("no panics under this lock")
                .get_or_insert_with(|| error.to_string());
            self.stop.store(true, Ordering::Relaxed);
        } else {
            self.first_error
                .lock()
                .expect("no panics under this lock")
                .get_or_insert_with(|| error.to_string());
        }
    }

    pub fn broker_gone(&self) -> Option<String> {
        self.broker_gone.lock().expect("no panics under this lock").clone()
    }

    /// Records why a consumer stopped (each distinct reason once).
    pub fn consumer_stopped(&self, reason: String) {
        let mut reasons = self.consume_stopped.lock().expect("no panics under this lock");
        if !reasons.contains(&reason) {
            reasons.push(reason);
        }
    }

    /// Why the consumers stopped, as one sentence.
    pub fn consume_stopped(&self) -> String {
        self.consume_stopped.lock().expect("no panics under this lock").join("; ")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Produce,
    Consume,
    EndToEnd,
    Fetch,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Produce => "produce",
            Mode::Consume => "consume",
            Mode::EndToEnd => "e2e",
            Mode::Fetch => "fetch",
        }
    }

    /// The count that measures this mode's throughput, and its bytes.
    fn throughput(self, run: &Run) -> (u64, u64) {
        match self {
            Mode::Produce => (
                run.acked.load(Ordering::Relaxed) + run.unacknowledged.load(Ordering::Relaxed),
                run.produced_bytes.load(Ordering::Relaxed),
            ),
            Mode::Consume | Mode::EndToEnd | Mode::Fetch => {
                (run.consumed.load(Ordering::Relaxed), run.consumed_bytes.load(Ordering::Relaxed))
            }
        }
    }

    /// The latency the report leads with.
    fn latency(self, run: &Run) -> Histogram<u64> {
        match self {
            Mode::Produce => run.produce_latency.merged(),
            Mode::Consume | Mode::EndToEnd | Mode::Fetch => run.consume_latency.merged(),
        }
    }

    /// The name of the latency the report leads with.
    pub fn latency_name(self) -> &'static str {
        match self {
            Mode::Produce => "acknowledgement latency",
            Mode::Consume => "record age at consume",
            Mode::EndToEnd => "end-to-end latency",
            Mode::Fetch => "fetch round trip",
        }
    }

    fn latency_meaning(self) -> &'static str {
        match self {
            Mode::Produce => "from enqueue (or intended send under --rate) to acknowledgement",
            Mode::Consume => {
                "from the record's timestamp, set when it was produced, to its consumption; \
                 ms resolution, and includes how long the record waited in the log before this run"
            }
            Mode::EndToEnd => "from send (or intended send under --rate) to consumption, on one clock",
            Mode::Fetch => "from fetch request to response, reading near the end of the log",
        }
    }

    /// The seconds a rate is counted over: a consume counts from its start to its last
    /// record received, leaving out the wait (--idle-secs, --duration) after the data ran out.
    pub fn rate_seconds(self, run: &Run, seconds: f64) -> f64 {
        match self {
            Mode::Consume => run.last_record_ns.load(Ordering::Relaxed) as f64 / 1e9,
            Mode::Produce | Mode::EndToEnd | Mode::Fetch => seconds,
        }
    }
}

/// Prints one progress line to stderr.
pub fn progress(mode: Mode, run: &Run, previous: &mut (Instant, u64, u64)) {
    let now = Instant::now();
    let (messages, bytes) = mode.throughput(run);
    let seconds = now.duration_since(previous.0).as_secs_f64().max(1e-9);
    let rate = (messages - previous.1) as f64 / seconds;
    let mb_rate = (bytes - previous.2) as f64 / seconds / 1e6;
    let p99 = mode.latency(run).value_at_quantile(0.99);
    eprintln!(
        "[{:>6.1}s] {messages:>12} msgs {rate:>12.0} msg/s {mb_rate:>9.1} MB/s  p99 {p99} us",
        run.start.elapsed().as_secs_f64()
    );
    *previous = (now, messages, bytes);
}

/// `--timeline FILE`: one CSV row per second of the run, so a stall shows as the seconds it
/// lasted instead of being averaged into the report. Each row covers the time since the
/// previous one: its throughput (the mode's count, as the report's), the latency of the
/// records completed in it (empty when none were) and the errors counted in it. The last row
/// covers the part-second before the run ended.
pub struct Timeline {
    out: std::io::BufWriter<std::fs::File>,
    path: std::path::PathBuf,
    /// Counts, errors and latencies at the previous row.
    at: Instant,
    messages: u64,
    bytes: u64,
    errors: u64,
    latency: Histogram<u64>,
}

pub const TIMELINE_HEADER: &str = "elapsed_s,messages_per_s,mb_per_s,p50_ms,p99_ms,max_ms,errors";

impl Timeline {
    pub fn create(path: &std::path::Path, run: &Run) -> anyhow::Result<Timeline> {
        use anyhow::Context;
        use std::io::Write;
        let file = std::fs::File::create(path)
            .with_context(|| format!("cannot create the --timeline file {}", path.display()))?;
        let mut out = std::io::BufWriter::new(file);
        writeln!(out, "{TIMELINE_HEADER}")?;
        Ok(Timeline {
            out,
            path: path.to_owned(),
            at: run.start,
            messages: 0,
            bytes: 0,
            errors: 0,
            latency: new_histogram(),
        })
    }

    /// Writes the row of the time since the previous one.
    pub fn row(&mut self, mode: Mode, run: &Run) {
        use std::io::Write;
        let now = Instant::now();
        let seconds = now.duration_since(self.at).as_secs_f64().max(1e-9);
        let (messages, bytes) = mode.throughput(run);
        let errors = run.errors.load(Ordering::Relaxed);
        let latency = mode.latency(run);
        let mut interval = latency.clone();
        // Counts only grow, so the previous histogram is inside this one.
        interval.subtract(&self.latency).expect("same bounds, and counts only grow");
        let ms = |us: u64| format!("{:.3}", us as f64 / 1e3);
        let (p50, p99, max) = if interval.is_empty() {
            (String::new(), String::new(), String::new())
        } else {
            (ms(interval.value_at_quantile(0.5)), ms(interval.value_at_quantile(0.99)), ms(interval.max()))
        };
        let written = writeln!(
            self.out,
            "{:.3},{:.1},{:.3},{p50},{p99},{max},{}",
            now.duration_since(run.start).as_secs_f64(),
            (messages - self.messages) as f64 / seconds,
            (bytes - self.bytes) as f64 / seconds / 1e6,
            errors - self.errors,
        );
        if let Err(error) = written.and_then(|()| self.out.flush()) {
            eprintln!("pyralog-bench: writing the --timeline file {}: {error}", self.path.display());
        }
        (self.at, self.messages, self.bytes, self.errors, self.latency) =
            (now, messages, bytes, errors, latency);
    }
}

/// The gaps between acknowledgements, over every producer of a run.
#[derive(Debug, Default, Clone, Copy)]
pub struct AckGaps {
    pub last_ns: Option<u64>,
    pub longest_ns: u64,
}

/// The final numbers of a run.
pub struct Report {
    pub mode: Mode,
    /// "native" or "kafka".
    pub protocol: &'static str,
    pub seconds: f64,
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl Report {
    pub fn json(&self, run: &Run) -> serde_json::Value {
        let (messages, bytes) = self.mode.throughput(run);
        let latency = self.mode.latency(run);
        let rate_seconds = self.mode.rate_seconds(run, self.seconds);
        let per_second = |count: u64| if rate_seconds > 0.0 { count as f64 / rate_seconds } else { 0.0 };
        let mut object = serde_json::json!({
            "mode": self.mode.name(),
            "protocol": self.protocol,
            "messages": messages,
            "bytes": bytes,
            "seconds": self.seconds,
            "rate_seconds": rate_seconds,
            "msgs_per_sec": per_second(messages),
            "mb_per_sec": per_second(bytes) / 1e6,
            "sent": run.sent.load(Ordering::Relaxed),
            "acked": run.acked.load(Ordering::Relaxed),
            "unacknowledged": run.unacknowledged.load(Ordering::Relaxed),
            "consumed": run.consumed.load(Ordering::Relaxed),
            "errors": run.errors.load(Ordering::Relaxed),
            "latency_name": self.mode.latency_name(),
            "latency_meaning": self.mode.latency_meaning(),
            "latency_us": latency_json(&latency),
            "leader_retries": run.leader_retries.load(Ordering::Relaxed),
            "ack_gap_max_ms": run.ack_gaps.lock().expect("no panics under this lock").longest_ns as f64 / 1e6,
            "broker_gone": run.broker_gone(),
            "first_error": run.first_error.lock().expect("no panics under this lock").clone(),
        });
        if self.mode == Mode::EndToEnd {
            object["ack_latency_us"] = latency_json(&run.produce_latency.merged());
        }
        if matches!(self.mode, Mode::Consume | Mode::EndToEnd) {
            object["consume_stopped"] = run.consume_stopped().into();
        }
        let send_lag = run.send_lag.merged();
        if !send_lag.is_empty() {
            object["send_lag_us"] = latency_json(&send_lag);
        }
        let map = object.as_object_mut().expect("built as an object");
        map.extend(self.extra.clone());
        object
    }

    pub fn print_human(&self, run: &Run) {
        let json = self.json(run);
        let latency = &json["latency_us"];
        println!("mode         {}", self.mode.name());
        println!("protocol     {}", self.protocol);
        println!("messages     {}", json["messages"]);
        println!("MB           {:.1}", json["bytes"].as_f64().unwrap_or(0.0) / 1e6);
        println!("seconds      {:.2}", self.seconds);
        if self.mode == Mode::Consume {
            println!(
                "receiving    {:.2} s (from the start to the last record received; the rates count these)",
                json["rate_seconds"].as_f64().unwrap_or(0.0)
            );
        }
        println!("msgs/s       {:.0}", json["msgs_per_sec"].as_f64().unwrap_or(0.0));
        println!("MB/s         {:.1}", json["mb_per_sec"].as_f64().unwrap_or(0.0));
        println!(
            "sent {} acked {} unacknowledged {} consumed {} errors {}",
            json["sent"], json["acked"], json["unacknowledged"], json["consumed"], json["errors"]
        );
        println!(
            "failover     longest gap between acknowledgements {:.1} ms, {} requests retried after a leader change",
            json["ack_gap_max_ms"].as_f64().unwrap_or(0.0),
            json["leader_retries"]
        );
        if let Some(reasons) = json.get("consume_stopped").and_then(|r| r.as_str()) {
            println!("consumers stopped: {reasons}");
        }
        println!("{}, us ({}):", self.mode.latency_name(), self.mode.latency_meaning());
        println!(
            "  p50 {}  p90 {}  p99 {}  p99.9 {}  max {}",
            latency["p50"], latency["p90"], latency["p99"], latency["p999"], latency["max"]
        );
        if self.mode == Mode::EndToEnd {
            let ack = &json["ack_latency_us"];
            println!(
                "acknowledgement latency, us (enqueue to acknowledgement):\n  p50 {}  p99 {}  max {}",
                ack["p50"], ack["p99"], ack["max"]
            );
        }
        if let Some(lag) = json.get("send_lag_us") {
            println!(
                "send lag (the load generator's own lateness behind --rate), us:\n  p50 {}  p99 {}  max {}",
                lag["p50"], lag["p99"], lag["max"]
            );
        }
        // The problems themselves went to stderr as they were found.
        for (key, value) in
            self.extra.iter().filter(|(key, _)| !matches!(key.as_str(), "problems" | "result"))
        {
            println!("{key:<16} {value:<8} {}", explain(key));
        }
    }
}

/// What a report's extra key means, for the human report.
fn explain(key: &str) -> &'static str {
    match key {
        "verify_producers" => "distinct producer ids seen in the payloads",
        "verify_problems" => "duplicates, reorders, corrupt payloads and missing sequences found",
        "verify_unread" => "messages left unread below the partitions' ends (gaps are checked only at 0)",
        _ => "",
    }
}

fn latency_json(histogram: &Histogram<u64>) -> serde_json::Value {
    serde_json::json!({
        "p50": histogram.value_at_quantile(0.50),
        "p90": histogram.value_at_quantile(0.90),
        "p99": histogram.value_at_quantile(0.99),
        "p999": histogram.value_at_quantile(0.999),
        "max": histogram.max(),
        "count": histogram.len(),
    })
}
