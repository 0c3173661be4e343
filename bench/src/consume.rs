//! Consumer workers and the `--verify` checker.
//!
//! The topic's partitions are dealt round-robin to `--consumers` threads, each with its own
//! [`Consumer`]. A worker stops when the run stops, when the run's consumed count reaches
//! `--messages`, when `--duration` is up, after `--idle-secs` without a record, or (end-to-end
//! mode, where the producers' count and duration bound the run and the consumers get neither)
//! once the producers are done and every message they got onto the wire was consumed.
//!
//! The verifier owns the invariants a correct log must show the bench: per partition and
//! producer, sequences strictly increase (in order, no duplicates); across partitions no
//! sequence of a producer is seen twice; every payload's filler matches its header; and, at
//! the end, each producer's sequences form a gap-free range. Its memory is bounded:
//! [`VERIFY_SEQUENCES_MAX`] sequences per producer, [`VERIFY_PRODUCERS_MAX`] producers.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use pyralog_net::client::{ConsumedRecord, Consumer, Transport};

use crate::payload;
use crate::stats::{self, Mode, Run};

/// Highest sequence the verifier tracks per producer (a 128 MiB bitmap at most).
pub const VERIFY_SEQUENCES_MAX: u64 = 1 << 30;
/// Most distinct producer ids the verifier tracks.
pub const VERIFY_PRODUCERS_MAX: usize = 4096;
/// Most problems kept for the report; the rest are only counted.
const PROBLEMS_KEPT_MAX: usize = 50;
/// How long one fetch may wait at the broker for data.
const POLL_WAIT: Duration = Duration::from_millis(100);

#[derive(Debug, Clone)]
pub struct ConsumeOptions {
    pub messages: Option<u64>,
    pub duration: Option<Duration>,
    pub idle: Duration,
    pub mode: Mode,
}

pub fn spawn<T: Transport>(
    consumers: Vec<Consumer<T>>,
    options: &ConsumeOptions,
    run: &Arc<Run>,
    verifier: Option<&Arc<Mutex<Verifier>>>,
) -> anyhow::Result<Vec<JoinHandle<()>>> {
    let mut workers = Vec::new();
    for (id, consumer) in consumers.into_iter().enumerate() {
        let (options, run, verifier) = (options.clone(), Arc::clone(run), verifier.cloned());
        let worker = std::thread::Builder::new()
            .name(format!("consumer-{id}"))
            .spawn(move || consume(consumer, &options, &run, verifier.as_deref()))?;
        workers.push(worker);
    }
    Ok(workers)
}

fn consume<T: Transport>(
    mut consumer: Consumer<T>,
    options: &ConsumeOptions,
    run: &Run,
    verifier: Option<&Mutex<Verifier>>,
) {
    consume_until_done(&mut consumer, options, run, verifier);
    run.unread.fetch_add(u64::try_from(consumer.lag()).unwrap_or(0), Ordering::Relaxed);
}

fn consume_until_done<T: Transport>(
    consumer: &mut Consumer<T>,
    options: &ConsumeOptions,
    run: &Run,
    verifier: Option<&Mutex<Verifier>>,
) {
    let histogram = run.consume_latency.register();
    let mut last_record = Instant::now();
    let mut leader_retries = 0;
    loop {
        if let Some(reason) = stop_reason(options, run, last_record) {
            return run.consumer_stopped(reason);
        }
        let polled = consumer.poll(POLL_WAIT);
        run.leader_retries.fetch_add(consumer.leader_retries() - leader_retries, Ordering::Relaxed);
        leader_retries = consumer.leader_retries();
        let records = match polled {
            Ok(records) => records,
            Err(error) => {
                run.errors.fetch_add(1, Ordering::Relaxed);
                run.consumer_stopped(format!("a fetch failed: {error}"));
                run.fail(&error);
                return;
            }
        };
        if records.is_empty() {
            continue;
        }
        last_record = Instant::now();
        let now_ns = run.elapsed_ns();
        run.last_record_ns.fetch_max(now_ns, Ordering::Relaxed);
        let now_ms = unix_ms();
        let mut bytes = 0u64;
        {
            let mut histogram = histogram.lock().expect("no panics under this lock");
            for record in &records {
                bytes += record.value.len() as u64;
                let latency_us = match (options.mode, payload::header(&record.value)) {
                    (Mode::EndToEnd, Some(header)) => now_ns.saturating_sub(header.send_ns) / 1_000,
                    _ => u64::try_from(now_ms.saturating_sub(record.timestamp_ms)).unwrap_or(0) * 1_000,
                };
                stats::record_us(&mut histogram, latency_us);
            }
        }
        if let Some(verifier) = verifier {
            let mut verifier = verifier.lock().expect("no panics under this lock");
            records.iter().for_each(|record| verifier.check(record));
        }
        run.consumed.fetch_add(records.len() as u64, Ordering::Relaxed);
        run.consumed_bytes.fetch_add(bytes, Ordering::Relaxed);
    }
}

/// Why a consumer should stop now, in a sentence naming the flag that bounds it, if it should.
fn stop_reason(options: &ConsumeOptions, run: &Run, last_record: Instant) -> Option<String> {
    let consumed = run.consumed.load(Ordering::Relaxed);
    if run.stopping() {
        return Some("the run was stopped (the hard deadline passed, or the node went away)".to_owned());
    }
    let produced = run.acked.load(Ordering::Relaxed) + run.unacknowledged.load(Ordering::Relaxed);
    if options.mode == Mode::EndToEnd && run.producers_done.load(Ordering::Relaxed) && consumed >= produced {
        return Some("every message produced was consumed".to_owned());
    }
    if let Some(messages) = options.messages.filter(|messages| consumed >= *messages) {
        return Some(format!("the {messages} messages asked for (--messages) were consumed"));
    }
    if let Some(duration) = options.duration.filter(|duration| run.start.elapsed() >= *duration) {
        return Some(format!("--duration {} s passed", duration.as_secs_f64()));
    }
    if last_record.elapsed() >= options.idle {
        let idle = options.idle.as_secs_f64();
        return Some(format!("no record arrived for {idle} s (--idle-secs)"));
    }
    None
}

fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Checks exactly-once, per-partition order and payload integrity. See the module docs.
#[derive(Debug, Default)]
pub struct Verifier {
    /// Last sequence seen per (partition, producer).
    last: HashMap<(u32, u32), u64>,
    /// Sequences seen per producer, one bit each.
    seen: HashMap<u32, Vec<u64>>,
    problems: Vec<String>,
    problem_count: u64,
    /// Whether sequences must start at 0 (the whole topic was read from the earliest offset).
    from_zero: bool,
}

impl Verifier {
    pub fn new(from_zero: bool) -> Verifier {
        Verifier { from_zero, ..Verifier::default() }
    }

    fn problem(&mut self, problem: String) {
        self.problem_count += 1;
        if self.problems.len() < PROBLEMS_KEPT_MAX {
            self.problems.push(problem);
        }
    }

    pub fn check(&mut self, record: &ConsumedRecord) {
        let (partition, offset) = (record.partition, record.offset);
        let Some(header) = payload::header(&record.value) else {
            let bytes = record.value.len();
            return self.problem(format!(
                "partition {partition} offset {offset}: {bytes}-byte payload has no header"
            ));
        };
        let (producer, sequence) = (header.producer, header.sequence);
        let at = format!("partition {partition} offset {offset} (producer {producer} sequence {sequence})");
        if let Some(position) = payload::filler_mismatch(&record.value, header) {
            self.problem(format!("{at}: payload corrupt at filler byte {position}"));
        }
        if let Some(last) = self.last.insert((partition, producer), sequence) {
            if sequence <= last {
                self.problem(format!("{at}: out of order or duplicate, after sequence {last}"));
            }
        }
        if sequence >= VERIFY_SEQUENCES_MAX {
            return self.problem(format!("{at}: sequence beyond the verifier's {VERIFY_SEQUENCES_MAX}"));
        }
        if !self.seen.contains_key(&producer) && self.seen.len() >= VERIFY_PRODUCERS_MAX {
            return self.problem(format!("{at}: more than {VERIFY_PRODUCERS_MAX} producers"));
        }
        let bits = self.seen.entry(producer).or_default();
        let (word, bit) = ((sequence / 64) as usize, sequence % 64);
        if bits.len() <= word {
            bits.resize(word + 1, 0);
        }
        let duplicate = bits[word] & (1 << bit) != 0;
        bits[word] |= 1 << bit;
        if duplicate {
            self.problem(format!("{at}: delivered twice"));
        }
    }

    /// Adds the gaps in each producer's sequences, unless the consumers stopped with messages
    /// left unread (a gap may then be a message not read yet), and returns (problem count,
    /// kept problems).
    pub fn finish(&mut self, check_gaps: bool) -> (u64, Vec<String>) {
        let mut gaps = Vec::new();
        for (producer, bits) in self.seen.iter().filter(|_| check_gaps) {
            let Some(first) = first_set(bits) else { continue };
            let from = if self.from_zero { 0 } else { first };
            let last = last_set(bits).expect("a first bit exists");
            let missing: Vec<u64> =
                (from..=last).filter(|s| bits[(s / 64) as usize] & (1 << (s % 64)) == 0).collect();
            if !missing.is_empty() {
                let shown: Vec<_> = missing.iter().take(10).collect();
                gaps.push(format!(
                    "producer {producer}: {} of sequences {from}..={last} never arrived, first: {shown:?}",
                    missing.len()
                ));
            }
        }
        gaps.sort();
        gaps.into_iter().for_each(|gap| self.problem(gap));
        (self.problem_count, self.problems.clone())
    }

    pub fn producers(&self) -> usize {
        self.seen.len()
    }
}

fn first_set(bits: &[u64]) -> Option<u64> {
    let word = bits.iter().position(|w| *w != 0)?;
    Some(word as u64 * 64 + u64::from(bits[word].trailing_zeros()))
}

fn last_set(bits: &[u64]) -> Option<u64> {
    let word = bits.iter().rposition(|w| *w != 0)?;
    Some(word as u64 * 64 + 63 - u64::from(bits[word].leading_zeros()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn record(partition: u32, offset: i64, producer: u32, sequence: u64) -> ConsumedRecord {
        let mut value = vec![0u8; 64];
        payload::write(&mut value, payload::Header { producer, sequence, send_ns: 0 });
        ConsumedRecord { partition, offset, timestamp_ms: 0, key: None, value: Bytes::from(value) }
    }

    #[test]
    fn a_clean_stream_verifies() {
        let mut verifier = Verifier::new(true);
        for sequence in 0..100 {
            verifier.check(&record((sequence % 3) as u32, sequence as i64, 1, sequence));
        }
        assert_eq!(verifier.finish(true), (0, vec![]));
    }

    #[test]
    fn duplicates_reorders_gaps_and_damage_are_reported() {
        let mut verifier = Verifier::new(true);
        verifier.check(&record(0, 0, 7, 1));
        verifier.check(&record(0, 1, 7, 1));
        verifier.check(&record(1, 0, 7, 3));
        let mut damaged = record(1, 1, 7, 4);
        let mut value = damaged.value.to_vec();
        value[40] ^= 0xff;
        damaged.value = Bytes::from(value);
        verifier.check(&damaged);
        let (count, problems) = verifier.finish(true);
        assert_eq!(count, 4, "{problems:#?}");
        let text = problems.join("\n");
        assert!(text.contains("out of order or duplicate"), "{text}");
        assert!(text.contains("delivered twice"), "{text}");
        assert!(text.contains("payload corrupt"), "{text}");
        assert!(text.contains("2 of sequences 0..=4 never arrived, first: [0, 2]"), "{text}");
    }
}
