//! Producer workers: one thread and one [`Producer`] per `--producers`, each on its own
//! [`Transport::session`] of the run's client (native: shared connections; Kafka: a connection
//! per producer, as each Kafka producer instance has).
//!
//! Latency is acknowledgement time minus the message's base time: its *intended* send time on
//! the `--rate` schedule when the run is rate-limited (so a stalled broker shows up in the
//! latencies of the messages that should have gone out meanwhile, instead of hiding behind a
//! paused sender), its enqueue time otherwise. The base time also rides in the payload for the
//! end-to-end mode.
//!
//! Each worker keeps, per partition, the base times of the records not yet reported, in send
//! order; a delivery report pops as many as its batch holds. Batches of one partition are
//! reported in send order, which keeps the two in step.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use pyralog_net::client::{
    Acks, DeliveryReport, Partitioner, Producer, ProducerConfig, Transport, OFFSET_UNACKNOWLEDGED,
};

use crate::payload::{self, Header};
use crate::stats::{self, Run, SharedHistogram};

#[derive(Debug, Clone)]
pub struct ProduceOptions {
    pub topic: String,
    pub producers: u32,
    /// Total over all producers.
    pub messages: Option<u64>,
    pub duration: Option<Duration>,
    pub message_bytes: usize,
    pub batch_bytes: usize,
    pub linger: Duration,
    pub max_in_flight_per_partition: usize,
    /// Messages per second over all producers.
    pub rate: Option<f64>,
    pub acks: Acks,
    pub partitioner: Partitioner,
    /// Stamp batches with a producer id and sequences (see `ProducerConfig::idempotent`).
    pub idempotent: bool,
}

pub fn spawn<T: Transport>(
    client: &T,
    options: &ProduceOptions,
    run: &Arc<Run>,
) -> anyhow::Result<Vec<JoinHandle<()>>> {
    let mut workers = Vec::new();
    let first_id = first_producer_id();
    for index in 0..options.producers {
        let id = first_id.wrapping_add(index);
        let quota = options.messages.map(|total| {
            let producers = u64::from(options.producers);
            total / producers + u64::from(u64::from(index) < total % producers)
        });
        let (client, options, run) = (client.session(), options.clone(), Arc::clone(run));
        let worker = std::thread::Builder::new()
            .name(format!("producer-{index}"))
            .spawn(move || produce(id, client, &options, quota, &run))?;
        workers.push(worker);
    }
    Ok(workers)
}

/// The payload's producer id of a run's first producer; the others follow it. Random, so the
/// messages of several runs into one topic keep apart in a `--verify` of them all (runs that
/// numbered producers from 0 made every message of the second run a duplicate of the first's).
/// Two runs of a few producers each share an id with a chance of about one in a billion.
fn first_producer_id() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    // The standard library's per-process random hash keys, the only randomness it offers.
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(std::time::SystemTime::UNIX_EPOCH.elapsed().map_or(0, |t| t.as_nanos()));
    hasher.finish() as u32
}

/// Base times (ns since the run's start) of sent, unreported records, per partition.
type PendingTimes = Arc<Mutex<Vec<VecDeque<u64>>>>;

fn produce<T: Transport>(id: u32, client: T, options: &ProduceOptions, quota: Option<u64>, run: &Arc<Run>) {
    let histogram = run.produce_latency.register();
    let send_lag = options.rate.map(|_| run.send_lag.register());
    let pending: PendingTimes = Arc::new(Mutex::new(Vec::new()));
    let config = ProducerConfig {
        batch_bytes: options.batch_bytes,
        linger: options.linger,
        max_in_flight_per_partition: options.max_in_flight_per_partition,
        acks: options.acks,
        partitioner: options.partitioner,
        idempotent: options.idempotent,
        ..ProducerConfig::new(options.topic.clone())
    };
    let on_delivery =
        delivery_callback(Arc::clone(run), histogram, Arc::clone(&pending), options.message_bytes);
    let mut producer = match Producer::new(client, config, on_delivery) {
        Ok(producer) => producer,
        Err(error) => return run.fail(&error),
    };
    pending
        .lock()
        .expect("no panics under this lock")
        .resize(producer.partition_count() as usize, VecDeque::new());
    let interval_ns = options.rate.map(|rate| 1e9 * f64::from(options.producers) / rate);
    let mut value = vec![0u8; options.message_bytes];
    let mut sequence = 0u64;
    let duration_ns = options.duration.map(|duration| u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX));
    while !run.stopping() && quota.is_none_or(|quota| sequence < quota) {
        // As few clock readings as a message allows (this one, and the producer's in `send`):
        // at a million messages a second, each costs.
        let now_ns = run.elapsed_ns();
        if duration_ns.is_some_and(|duration_ns| now_ns >= duration_ns) {
            break;
        }
        let base_ns = match interval_ns {
            Some(interval_ns) => {
                let intended_ns = (sequence as f64 * interval_ns) as u64;
                let sent_ns = match wait_until(run, &mut producer, intended_ns, now_ns) {
                    Ok(sent_ns) => sent_ns,
                    Err(error) => {
                        run.fail(&error);
                        break;
                    }
                };
                if let Some(send_lag) = &send_lag {
                    let lag_us = sent_ns.saturating_sub(intended_ns) / 1_000;
                    stats::record_us(&mut send_lag.lock().expect("no panics under this lock"), lag_us);
                }
                intended_ns
            }
            None => now_ns,
        };
        payload::write(&mut value, Header { producer: id, sequence, send_ns: base_ns });
        match producer.send(None, &value) {
            Ok(partition) => {
                pending.lock().expect("no panics under this lock")[partition as usize].push_back(base_ns);
                run.sent.fetch_add(1, Ordering::Relaxed);
                sequence += 1;
            }
            Err(error) => {
                run.errors.fetch_add(1, Ordering::Relaxed);
                run.fail(&error);
                break;
            }
        }
    }
    if let Err(error) = producer.flush() {
        // The failed batches were counted by the callback; this records why.
        run.fail(&error);
    }
}

/// Sleeps until `intended_ns` on the run's clock, sending lingering batches meanwhile.
/// `now_ns` is a fresh reading of that clock; returns the reading at which it stopped waiting.
fn wait_until<T: Transport>(
    run: &Run,
    producer: &mut Producer<T>,
    intended_ns: u64,
    mut now_ns: u64,
) -> pyralog_net::client::Result<u64> {
    while now_ns < intended_ns && !run.stopping() {
        // Wake at least every millisecond so a linger of a few ms is honoured.
        std::thread::sleep(Duration::from_nanos((intended_ns - now_ns).min(1_000_000)));
        producer.poll()?;
        now_ns = run.elapsed_ns();
    }
    Ok(now_ns)
}

fn delivery_callback(
    run: Arc<Run>,
    histogram: SharedHistogram,
    pending: PendingTimes,
    message_bytes: usize,
) -> impl FnMut(DeliveryReport) + Send + 'static {
    move |report: DeliveryReport| {
        let completed_ns =
            u64::try_from(report.completed.duration_since(run.start).as_nanos()).unwrap_or(u64::MAX);
        let count = u64::from(report.record_count);
        run.leader_retries.fetch_add(u64::from(report.retries), Ordering::Relaxed);
        if report.error.is_none() && report.base_offset != OFFSET_UNACKNOWLEDGED {
            run.acknowledged_at(completed_ns);
        }
        {
            let mut pending = pending.lock().expect("no panics under this lock");
            let queue = &mut pending[report.partition as usize];
            let mut histogram = histogram.lock().expect("no panics under this lock");
            for _ in 0..queue.len().min(report.record_count as usize) {
                let base_ns = queue.pop_front().expect("bounded by len");
                if report.error.is_none() {
                    stats::record_us(&mut histogram, completed_ns.saturating_sub(base_ns) / 1_000);
                }
            }
        }
        match &report.error {
            None if report.base_offset == OFFSET_UNACKNOWLEDGED => {
                run.unacknowledged.fetch_add(count, Ordering::Relaxed);
                run.produced_bytes.fetch_add(count * message_bytes as u64, Ordering::Relaxed);
            }
            None => {
                run.acked.fetch_add(count, Ordering::Relaxed);
                run.produced_bytes.fetch_add(count * message_bytes as u64, Ordering::Relaxed);
            }
            Some(error) => {
                run.errors.fetch_add(count, Ordering::Relaxed);
                run.fail(error);
            }
        }
    }
}
