//! `pyralog-bench`: a load generator for Pyralog, over its native protocol or (`--protocol
//! kafka`) its Kafka listener.
//!
//! Both protocols run the same workers through the client library's [`Transport`]: the same
//! `Producer` (batching, linger, partitioner, in-flight window) and `Consumer` (prefetch,
//! offsets), the same payloads, latency accounting, report, `--verify` and exit codes. Only the
//! bytes on the wire differ: the native client talks to each partition's shard directly; the
//! Kafka client opens its connections per producer and per consumer (a Kafka broker answers a
//! connection's requests in order) to the broker metadata names as each partition's leader.
//!
//! Modes: `produce` (throughput and acknowledgement latency), `consume` (throughput and record
//! age at consume, optional `--verify` of a topic written by `produce`), `e2e` (producers and
//! consumers in one process, latency from the send time embedded in each payload to its
//! consumption: one clock), `fetch` (round trips of reads near the end of the log).
//!
//! Produce and e2e create a missing topic and say so; consume and fetch refuse one (consume
//! creates it with `--create-topic`). A consume's rate counts the time spent receiving: from
//! its start to the last record received, not the `--idle-secs` wait after the data ran out.
//!
//! Over either protocol a run follows partition leaders through a cluster's failover (the
//! client retries on the new leader: see `pyralog_net::client::failover`; each batch once with
//! the idempotent producer, the default over either protocol, at least once with
//! `--no-idempotence`); the
//! report's `failover` line (`ack_gap_max_ms`, `leader_retries` in `--json`) gives the longest
//! time between two acknowledgements and how many requests were sent again after a leader
//! change.
//!
//! Every run ends by itself: by `--messages` or `--duration`, by `--idle-secs` without data
//! for consumers, and in any case by a hard deadline (`--deadline-secs`). The report is printed
//! in every case and closes with one plain line; the exit codes are [`outcome`]'s: 0 done,
//! 1 errors or verification failures, 2 the node was unreachable (nothing listening, or a
//! listener of the other protocol) or went away, 3 the hard deadline passed, 4 a consume got
//! fewer messages than `--messages` asked for (or an e2e run's consumers fewer than were
//! produced).

mod consume;
mod outcome;
mod payload;
mod produce;
mod stats;

use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use pyralog_net::client::{
    Acks, Client, ClientError, ConnectOptions, Consumer, ErrorCode, KafkaClient, Partitioner, Pending,
    Protocol, StartAt, Transport, IN_FLIGHT_BATCHES_MAX_DEFAULT,
};

use crate::consume::{ConsumeOptions, Verifier};
use crate::outcome::{EXIT_FAILED, EXIT_UNREACHABLE};
use crate::produce::ProduceOptions;
use crate::stats::{Mode, Report, Run, Timeline};

/// Time a run may take beyond `--duration` before the hard deadline.
const DEADLINE_SLACK: Duration = Duration::from_secs(30);
/// Hard deadline of a run bounded only by `--messages`.
const DEADLINE_DEFAULT: Duration = Duration::from_secs(600);
/// Run length when neither `--messages` nor `--duration` is given.
const DURATION_DEFAULT: Duration = Duration::from_secs(10);
/// Bound on every request's wait; also how long workers get to wind down after the deadline.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, Parser)]
#[command(
    name = "pyralog-bench",
    version,
    about = "Load generator for Pyralog",
    long_about = "Load generator for Pyralog: produces, consumes or both against a running node, \
over its native protocol (default, 127.0.0.1:7070) or its Kafka listener (--protocol kafka, \
127.0.0.1:9092). Progress goes to stderr every second; the report goes to stdout and ends with \
one line saying what was achieved or what failed.",
    after_help = "Exit codes: 0 done; 1 errors or verification problems; 2 the node was \
unreachable (nothing listening, or a listener of the other protocol) or went away; 3 the hard \
deadline passed; 4 a consume ended with fewer messages than --messages asked for (or an e2e \
run's consumers with fewer than were produced)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Produce messages and measure acknowledgement latency (enqueue, or intended send under
    /// --rate, to acknowledgement). A missing topic is created with --partitions partitions.
    Produce {
        #[command(flatten)]
        common: CommonArgs,
        #[command(flatten)]
        produce: ProduceArgs,
    },
    /// Consume messages and measure record age at consume (from the record's timestamp, set
    /// when it was produced, to its consumption). A missing topic is refused unless
    /// --create-topic is given.
    Consume {
        #[command(flatten)]
        common: CommonArgs,
        #[command(flatten)]
        consume: ConsumeArgs,
        /// Where each partition starts: earliest (its log start), latest (its end: only
        /// records produced after the start are read) or an offset.
        #[arg(long, default_value = "earliest")]
        from: String,
        /// Create the topic (with --partitions partitions) if it does not exist, then wait for
        /// records in it. Without it, consuming from a missing topic is refused.
        #[arg(long)]
        create_topic: bool,
    },
    /// Read near the end of each partition in a closed loop (one fetch in flight, no
    /// long-poll), the reads a tailing consumer makes; latency is each fetch's round trip.
    /// Run it on a topic written just before, so the data is in the broker's cache. With
    /// --messages, the run stops after that many fetches.
    Fetch {
        #[command(flatten)]
        common: CommonArgs,
        /// Each fetch starts this many records before the partition's end.
        #[arg(long, default_value_t = 100, value_name = "RECORDS")]
        behind: i64,
        /// Bytes asked for per fetch.
        #[arg(long, default_value_t = 64 << 10, value_name = "BYTES")]
        fetch_bytes: u32,
    },
    /// Produce and consume at once; latency is send (or intended send under --rate) to
    /// consume, on one clock. --messages and --duration bound the producers; consumers read
    /// until everything produced is consumed or --idle-secs pass without a record. A missing
    /// topic is created with --partitions partitions.
    E2e {
        #[command(flatten)]
        common: CommonArgs,
        #[command(flatten)]
        produce: ProduceArgs,
        #[command(flatten)]
        consume: ConsumeArgs,
    },
}

#[derive(Debug, Args)]
struct CommonArgs {
    /// The protocol to drive the node with: native (its --listen port) or kafka (its
    /// --kafka-listen port).
    #[arg(long, value_enum, default_value_t = ProtocolArg::Native)]
    protocol: ProtocolArg,
    /// Bootstrap address of the node, HOST:PORT: its native listener (default
    /// 127.0.0.1:7070) or, with --protocol kafka, its Kafka listener (default 127.0.0.1:9092).
    #[arg(long, value_name = "HOST:PORT")]
    broker: Option<String>,
    /// The topic to produce to or consume from.
    #[arg(long, default_value = "bench")]
    topic: String,
    /// Partitions of the topic when the bench creates it (an existing topic keeps its own).
    #[arg(long, default_value_t = 2)]
    partitions: u32,
    /// Messages in total, over all producers (produce, e2e) or all consumers (consume); fetches
    /// in the fetch mode. No default: without it the run lasts --duration.
    #[arg(long)]
    messages: Option<u64>,
    /// Seconds to run; 10 when neither this nor --messages is given, no limit when only
    /// --messages is.
    #[arg(long, value_name = "SECONDS")]
    duration: Option<f64>,
    /// Bytes of each message value, at least the 20-byte payload header (producer id,
    /// sequence, send time) that --verify and e2e latency read.
    #[arg(long, default_value_t = 1024, value_name = "BYTES")]
    message_bytes: usize,
    /// Hard deadline in seconds: workers are stopped then and the run exits 3. Default:
    /// --duration + 30, or 600 for a run bounded only by --messages.
    #[arg(long, value_name = "SECONDS")]
    deadline_secs: Option<f64>,
    /// Print the report as one JSON object on stdout (the closing line goes to stderr).
    #[arg(long)]
    json: bool,
    /// Write one CSV row per second of the run to FILE: elapsed_s, messages_per_s, mb_per_s,
    /// p50_ms, p99_ms, max_ms (latency of the records of that second, empty when there were
    /// none) and errors (in that second). Draw it with scripts/plot-bench.py FILE.
    #[arg(long, value_name = "FILE")]
    timeline: Option<std::path::PathBuf>,
}

#[derive(Debug, Args)]
struct ProduceArgs {
    /// Producer threads, each with its own producer (and, over Kafka, its own connection).
    #[arg(long, default_value_t = 1)]
    producers: u32,
    /// Bytes of records a partition's batch collects before it is sent.
    #[arg(long, default_value_t = 16 << 10, value_name = "BYTES")]
    batch_bytes: usize,
    /// Milliseconds a batch waits for more records before it is sent anyway; 0 sends each
    /// record at once.
    #[arg(long, default_value_t = 5.0, value_name = "MS")]
    linger_ms: f64,
    /// Batches of one partition awaiting acknowledgement; at the bound, a partition's batch
    /// keeps filling (past its linger) until one is acknowledged. 1 gives the lowest latency
    /// per request sent: a record waits at most one round trip.
    #[arg(long, default_value_t = IN_FLIGHT_BATCHES_MAX_DEFAULT, value_name = "BATCHES")]
    max_in_flight_per_partition: usize,
    /// Messages per second over all producers; latency then counts from each message's
    /// intended send time on that schedule. Default: as fast as the node acknowledges.
    #[arg(long, value_name = "MESSAGES_PER_SECOND")]
    rate: Option<f64>,
    /// When the node acknowledges a produce.
    #[arg(long, value_enum, default_value_t = AcksArg::Durable)]
    acks: AcksArg,
    /// How records are spread over the topic's partitions.
    #[arg(long, value_enum, default_value_t = PartitionerArg::Sticky)]
    partitioner: PartitionerArg,
    /// Send batches without a producer id and sequence numbers: a batch sent again after a
    /// leader change may then be stored twice. By default (with --acks durable) the producer
    /// is idempotent, keeping at most 5 batches of a partition in flight.
    #[arg(long)]
    no_idempotence: bool,
}

#[derive(Debug, Args)]
struct ConsumeArgs {
    /// Consumer threads; the partitions are dealt round-robin between them (at most one
    /// consumer per partition).
    #[arg(long, default_value_t = 1)]
    consumers: u32,
    /// Check what was consumed: each producer's messages arrive once, in order within a
    /// partition, with intact payloads, and (when nothing was left unread) with no sequence
    /// missing. Exits 1 on any problem. The report adds verify_producers (distinct producer
    /// ids seen in the payloads), verify_problems (duplicates, reorders, corrupt payloads
    /// and missing sequences found; each is also printed on stderr) and verify_unread
    /// (messages below the partitions' ends still unread when the consumers stopped; gaps
    /// are only checked when it is 0).
    #[arg(long)]
    verify: bool,
    /// Seconds without a record after which a consumer stops.
    #[arg(long, default_value_t = 10.0, value_name = "SECONDS")]
    idle_secs: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ProtocolArg {
    /// Pyralog's own protocol, straight to the shard that owns each partition.
    Native,
    /// The Kafka wire protocol, through the node's Kafka listener.
    Kafka,
}

impl ProtocolArg {
    fn name(self) -> &'static str {
        match self {
            ProtocolArg::Native => "native",
            ProtocolArg::Kafka => "kafka",
        }
    }

    fn default_broker(self) -> &'static str {
        self.protocol().default_addr()
    }

    fn protocol(self) -> Protocol {
        match self {
            ProtocolArg::Native => Protocol::Native,
            ProtocolArg::Kafka => Protocol::Kafka,
        }
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum AcksArg {
    /// Send without waiting for an acknowledgement (Kafka acks=0).
    None,
    /// Acknowledged once the node holds the batch as its --durability says (Kafka acks=-1).
    Durable,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum PartitionerArg {
    /// Fill one partition's batch, then move to the next partition.
    Sticky,
    /// Each record to the next partition in turn.
    RoundRobin,
    /// Each record to a partition picked at random.
    Random,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tighten_timer_slack();
    match run(cli.command) {
        Ok((code, _)) => ExitCode::from(code),
        Err(error) => {
            eprintln!("pyralog-bench: {error:#}");
            let client_error = error.downcast_ref::<ClientError>();
            if let Some(ClientError::WrongProtocol { found, .. }) = client_error {
                let flag = match found {
                    Protocol::Kafka => "add --protocol kafka",
                    Protocol::Native => "drop --protocol kafka",
                };
                eprintln!("pyralog-bench: to use this port, {flag}; or give --broker the other one");
            }
            let unreachable = client_error.is_some_and(|error| {
                error.is_disconnect() || matches!(error, ClientError::WrongProtocol { .. })
            });
            ExitCode::from(if unreachable { EXIT_UNREACHABLE } else { EXIT_FAILED })
        }
    }
}

/// Lets `--rate` sleeps end on time. Linux rounds a normal thread's sleeps up by its timer
/// slack (50 us by default), which would add that much to every rate-limited latency; threads
/// started afterwards inherit the setting.
fn tighten_timer_slack() {
    const TIMER_SLACK_NS: libc::c_ulong = 1_000;
    // SAFETY: PR_SET_TIMERSLACK takes one integer argument and touches no memory of ours.
    if unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, TIMER_SLACK_NS) } != 0 {
        eprintln!(
            "pyralog-bench: cannot tighten the timer slack ({}); --rate latencies include up to 50 us of oversleep",
            std::io::Error::last_os_error()
        );
    }
}

fn command_common(command: &Command) -> &CommonArgs {
    match command {
        Command::Produce { common, .. }
        | Command::Consume { common, .. }
        | Command::E2e { common, .. }
        | Command::Fetch { common, .. } => common,
    }
}

/// Runs a command and prints its report; returns the exit code and the report.
fn run(command: Command) -> anyhow::Result<(u8, serde_json::Value)> {
    let common = command_common(&command);
    let broker = common.broker.as_deref().unwrap_or(common.protocol.default_broker());
    let options = ConnectOptions {
        connect_timeout: CONNECT_TIMEOUT,
        request_timeout: REQUEST_TIMEOUT,
        ..Default::default()
    };
    // The client's connection errors name the address and what to do; no context to add.
    match common.protocol {
        ProtocolArg::Native => run_with(Client::connect_with(broker, options)?, &command),
        ProtocolArg::Kafka => run_with(KafkaClient::connect_with(broker, options)?, &command),
    }
}

/// [`run`] over one protocol's client.
fn run_with<T: Transport>(client: T, command: &Command) -> anyhow::Result<(u8, serde_json::Value)> {
    let (mode, common) = match command {
        Command::Produce { common, .. } => (Mode::Produce, common),
        Command::Consume { common, .. } => (Mode::Consume, common),
        Command::E2e { common, .. } => (Mode::EndToEnd, common),
        Command::Fetch { common, .. } => (Mode::Fetch, common),
    };
    anyhow::ensure!(
        common.message_bytes >= payload::HEADER_BYTES,
        "--message-bytes must be at least {} (the payload header)",
        payload::HEADER_BYTES
    );
    let duration = match (common.messages, common.duration) {
        (None, None) => Some(DURATION_DEFAULT),
        (_, seconds) => seconds.map(Duration::from_secs_f64),
    };
    let deadline = common
        .deadline_secs
        .map(Duration::from_secs_f64)
        .unwrap_or_else(|| duration.map_or(DEADLINE_DEFAULT, |d| d + DEADLINE_SLACK));
    let create = match command {
        Command::Produce { .. } | Command::E2e { .. } => Create::Yes,
        Command::Consume { create_topic: true, .. } => Create::Yes,
        Command::Consume { create_topic: false, .. } => Create::No("consume"),
        Command::Fetch { .. } => Create::No("fetch"),
    };
    let partitions = ensure_topic(&client, &common.topic, common.partitions, create)?;

    // Consumers resolve their start offsets before any message of this run is produced.
    let consumers = match command {
        Command::Produce { .. } | Command::Fetch { .. } => Vec::new(),
        Command::Consume { consume, from, .. } => {
            make_consumers(&client, &common.topic, partitions, consume.consumers, parse_from(from)?)?
        }
        Command::E2e { consume, .. } => {
            make_consumers(&client, &common.topic, partitions, consume.consumers, StartAt::Latest)?
        }
    };
    let verifier = match command {
        Command::Consume { consume, from, .. } if consume.verify => {
            Some(Arc::new(Mutex::new(Verifier::new(from == "earliest"))))
        }
        Command::E2e { consume, .. } if consume.verify => Some(Arc::new(Mutex::new(Verifier::new(true)))),
        _ => None,
    };

    let run = Arc::new(Run::new());
    let mut timeline = common.timeline.as_deref().map(|path| Timeline::create(path, &run)).transpose()?;
    let mut producers = Vec::new();
    let mut consumer_workers = Vec::new();
    if let Command::Consume { consume, .. } | Command::E2e { consume, .. } = command {
        // In e2e the producers' count and duration bound the run; consumers drain what they sent.
        let consume_only = mode == Mode::Consume;
        let options = ConsumeOptions {
            messages: common.messages.filter(|_| consume_only),
            duration: duration.filter(|_| consume_only),
            idle: Duration::from_secs_f64(consume.idle_secs),
            mode,
        };
        consumer_workers = consume::spawn(consumers, &options, &run, verifier.as_ref())?;
    }
    if let Command::Produce { produce, .. } | Command::E2e { produce, .. } = command {
        let options = produce_options(common, produce, duration);
        producers = produce::spawn(&client, &options, &run)?;
    }

    if let Command::Fetch { behind, fetch_bytes, .. } = command {
        let options = FetchOptions {
            topic: common.topic.clone(),
            partitions,
            behind: (*behind).max(1),
            fetch_bytes: *fetch_bytes,
            duration: duration.unwrap_or(DURATION_DEFAULT),
            fetches: common.messages,
        };
        consumer_workers.push(spawn_fetcher(client.clone(), options, Arc::clone(&run))?);
    }

    let deadline_passed = supervise(mode, &run, producers, consumer_workers, deadline, timeline.as_mut());
    if let Some(timeline) = &mut timeline {
        timeline.row(mode, &run);
    }
    let mut report = Report {
        mode,
        protocol: common.protocol.name(),
        seconds: run.start.elapsed().as_secs_f64(),
        extra: Default::default(),
    };
    let verify_problems = verifier.map(|verifier| finish_verify(&verifier, &run, &mut report));
    let asked = common.messages.filter(|_| mode == Mode::Consume || mode == Mode::Produce);
    let (code, result) = outcome::judge(mode, &run, deadline_passed, asked, verify_problems);
    report.extra.insert("result".into(), result.clone().into());
    let json = report.json(&run);
    if common.json {
        println!("{json}");
        eprintln!("{result}");
    } else {
        report.print_human(&run);
        println!("{result}");
    }
    Ok((code, json))
}

struct FetchOptions {
    topic: String,
    partitions: u32,
    behind: i64,
    fetch_bytes: u32,
    duration: Duration,
    /// Stop after this many fetches (`--messages` in this mode), if given.
    fetches: Option<u64>,
}

/// The fetch mode's worker: round-robin over the partitions, each fetch from `behind` records
/// before the end the partition had when the run started, timing each round trip.
fn spawn_fetcher<T: Transport>(
    client: T,
    options: FetchOptions,
    run: Arc<Run>,
) -> anyhow::Result<JoinHandle<()>> {
    let mut starts = Vec::with_capacity(options.partitions as usize);
    for partition in 0..options.partitions {
        let end = client.list_offsets(&options.topic, partition, pyralog_net::client::OFFSET_LATEST)?;
        let first = client.list_offsets(&options.topic, partition, pyralog_net::client::OFFSET_EARLIEST)?;
        if end > first {
            starts.push((partition, (end - options.behind).max(first)));
        }
    }
    anyhow::ensure!(!starts.is_empty(), "topic '{}' holds no records to fetch; produce first", options.topic);
    let worker = std::thread::Builder::new().name("fetcher".into()).spawn(move || {
        let histogram = run.consume_latency.register();
        let mut done = 0u64;
        for &(partition, offset) in starts.iter().cycle() {
            if run.stopping()
                || run.start.elapsed() >= options.duration
                || options.fetches.is_some_and(|fetches| done >= fetches)
            {
                break;
            }
            let sent = Instant::now();
            let fetched = client
                .fetch_async(&options.topic, partition, offset, options.fetch_bytes, 0)
                .and_then(|pending| pending.wait());
            let elapsed_us = sent.elapsed().as_micros() as u64;
            match fetched {
                Ok(result) => {
                    let records = result.reader().filter(Result::is_ok).count() as u64;
                    stats::record_us(&mut histogram.lock().expect("no panics under this lock"), elapsed_us);
                    run.consumed.fetch_add(records, Ordering::Relaxed);
                    run.consumed_bytes.fetch_add(result.records.len() as u64, Ordering::Relaxed);
                    done += 1;
                }
                Err(error) => {
                    run.errors.fetch_add(1, Ordering::Relaxed);
                    run.fail(&error);
                    break;
                }
            }
        }
    })?;
    Ok(worker)
}

/// Adds the verifier's findings to the report and stderr; returns how many problems it found.
fn finish_verify(verifier: &Mutex<Verifier>, run: &Run, report: &mut Report) -> u64 {
    let mut verifier = verifier.lock().expect("no worker panics under this lock");
    let unread = run.unread.load(Ordering::Relaxed);
    if unread > 0 {
        eprintln!("verify: {unread} messages were left unread, so gaps in sequences are not checked");
    }
    let (count, problems) = verifier.finish(unread == 0);
    for problem in &problems {
        eprintln!("verify: {problem}");
    }
    report.extra.insert("verify_unread".into(), unread.into());
    report.extra.insert("verify_producers".into(), verifier.producers().into());
    report.extra.insert("verify_problems".into(), count.into());
    report.extra.insert("problems".into(), problems.into());
    count
}

/// Prints progress every second until the workers end; at the hard deadline tells them to stop,
/// and gives up on them if they have not within the request timeout. Returns whether the hard
/// deadline passed (whether or not the workers then stopped).
fn supervise(
    mode: Mode,
    run: &Run,
    mut producers: Vec<JoinHandle<()>>,
    mut consumers: Vec<JoinHandle<()>>,
    deadline: Duration,
    mut timeline: Option<&mut Timeline>,
) -> bool {
    let mut previous = (Instant::now(), 0, 0);
    let mut next_progress = Instant::now() + Duration::from_secs(1);
    let mut deadline_passed = false;
    loop {
        producers.retain(|worker| !worker.is_finished());
        if producers.is_empty() {
            run.producers_done.store(true, Ordering::Relaxed);
        }
        consumers.retain(|worker| !worker.is_finished());
        if producers.is_empty() && consumers.is_empty() {
            return deadline_passed;
        }
        let elapsed = run.start.elapsed();
        if elapsed >= deadline {
            run.stop.store(true, Ordering::Relaxed);
            deadline_passed = true;
        }
        if elapsed >= deadline + REQUEST_TIMEOUT + Duration::from_secs(5) {
            return deadline_passed;
        }
        if Instant::now() >= next_progress {
            stats::progress(mode, run, &mut previous);
            if let Some(timeline) = timeline.as_deref_mut() {
                timeline.row(mode, run);
            }
            next_progress += Duration::from_secs(1);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether the bench may create a missing topic: produce and e2e do, consume and fetch only
/// when asked (reading from a topic nobody writes to would wait out --idle-secs for nothing).
#[derive(Debug, Clone, Copy)]
enum Create {
    Yes,
    /// Refused, for the mode named.
    No(&'static str),
}

/// How long a topic created (or found created) through the broker may stay unknown to it: a
/// node of a cluster learns a topic created through another one as it applies the controller's
/// log.
const TOPIC_KNOWN_TIMEOUT: Duration = Duration::from_secs(10);

/// The topic's partition count, creating the topic with `partitions` if it does not exist and
/// `create` allows it. Says on stderr what it did with a topic it did not find as asked.
fn ensure_topic<T: Transport>(
    client: &T,
    topic: &str,
    partitions: u32,
    create: Create,
) -> anyhow::Result<u32> {
    match client.partition_count(topic) {
        Ok(count) => {
            if count != partitions {
                eprintln!(
                    "pyralog-bench: topic '{topic}' exists with {count} partitions; using them (--partitions {partitions} applies only to a topic the bench creates)"
                );
            }
            Ok(count)
        }
        Err(ClientError::Server { code: ErrorCode::UnknownTopic, .. }) => {
            if let Create::No(mode) = create {
                let hint = match mode {
                    "consume" => "; pass --create-topic to create it and wait for records",
                    _ => "",
                };
                anyhow::bail!("topic '{topic}' does not exist, nothing to {mode}: produce to it first{hint}");
            }
            eprintln!("pyralog-bench: topic '{topic}' does not exist; creating it with {partitions} partitions (--partitions)");
            match client.create_topic(topic, partitions) {
                Ok(()) | Err(ClientError::Server { code: ErrorCode::TopicAlreadyExists, .. }) => {}
                Err(error) => return Err(error).with_context(|| format!("creating topic '{topic}'")),
            }
            // In a cluster the topic may have been created through another node, which this
            // one learns from the controller's log a moment later.
            let deadline = Instant::now() + TOPIC_KNOWN_TIMEOUT;
            loop {
                match client.partition_count(topic) {
                    Err(ClientError::Server { code: ErrorCode::UnknownTopic, .. })
                        if Instant::now() < deadline =>
                    {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    counted => return Ok(counted?),
                }
            }
        }
        Err(error) => Err(error).with_context(|| format!("reading the metadata of topic '{topic}'")),
    }
}

fn make_consumers<T: Transport>(
    client: &T,
    topic: &str,
    partitions: u32,
    consumers: u32,
    start: StartAt,
) -> anyhow::Result<Vec<Consumer<T>>> {
    let consumers = consumers.clamp(1, partitions.max(1));
    (0..consumers)
        .map(|id| {
            let mine: Vec<u32> = (0..partitions).filter(|p| p % consumers == id).collect();
            Consumer::new(client.session(), topic, &mine, start)
                .with_context(|| format!("starting consumer {id} on partitions {mine:?}"))
        })
        .collect()
}

fn parse_from(from: &str) -> anyhow::Result<StartAt> {
    Ok(match from {
        "earliest" => StartAt::Earliest,
        "latest" => StartAt::Latest,
        offset => StartAt::Offset(
            offset
                .parse()
                .with_context(|| format!("--from '{offset}': expected earliest, latest or an offset"))?,
        ),
    })
}

fn produce_options(common: &CommonArgs, produce: &ProduceArgs, duration: Option<Duration>) -> ProduceOptions {
    ProduceOptions {
        topic: common.topic.clone(),
        producers: produce.producers.max(1),
        messages: common.messages,
        duration,
        message_bytes: common.message_bytes,
        batch_bytes: produce.batch_bytes,
        linger: Duration::from_secs_f64(produce.linger_ms / 1e3),
        max_in_flight_per_partition: produce.max_in_flight_per_partition.max(1),
        idempotent: !produce.no_idempotence,
        rate: produce.rate.filter(|rate| *rate > 0.0),
        acks: match produce.acks {
            AcksArg::None => Acks::None,
            AcksArg::Durable => Acks::Durable,
        },
        partitioner: match produce.partitioner {
            PartitionerArg::Sticky => Partitioner::Sticky,
            PartitionerArg::RoundRobin => Partitioner::RoundRobin,
            PartitionerArg::Random => Partitioner::Random,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pyralog_net::client::fake_broker::FakeBroker;

    fn bench(args: &[&str]) -> (u8, serde_json::Value) {
        let cli = Cli::try_parse_from(std::iter::once("pyralog-bench").chain(args.iter().copied())).unwrap();
        run(cli.command).unwrap()
    }

    /// `--protocol` and `--broker` for the fake broker's listener of that protocol.
    fn target(broker: &FakeBroker, protocol: &'static str) -> [String; 4] {
        let addr = match protocol {
            "native" => broker.addr(),
            _ => broker.kafka_addr(),
        };
        ["--protocol".into(), protocol.into(), "--broker".into(), addr.to_string()]
    }

    fn args<'a>(parts: &[&'a [&'a str]], target: &'a [String; 4]) -> Vec<&'a str> {
        let mut args: Vec<&str> = parts.concat();
        args.extend(target.iter().map(String::as_str));
        args
    }

    /// Produces over one protocol, then consumes and verifies over another.
    fn fetch_times_reads_near_the_end(protocol: &'static str) {
        let broker = FakeBroker::start().unwrap();
        let common: &[&str] = &["--topic", "f", "--partitions", "2", "--json", "--message-bytes", "100"];
        let target = target(&broker, protocol);
        let fetch: &[&str] = &["fetch", "--messages", "50", "--behind", "10"];
        let cli = Cli::try_parse_from(
            std::iter::once("pyralog-bench").chain(args(&[fetch, common], &target).iter().copied()),
        )
        .unwrap();
        let error = run(cli.command).unwrap_err().to_string();
        assert!(error.contains("topic 'f' does not exist, nothing to fetch"), "{error}");
        Client::connect(&broker.addr().to_string()).unwrap().create_topic("f", 2).unwrap();
        let cli = Cli::try_parse_from(
            std::iter::once("pyralog-bench").chain(args(&[fetch, common], &target).iter().copied()),
        )
        .unwrap();
        let error = run(cli.command).unwrap_err().to_string();
        assert!(error.contains("holds no records to fetch"), "{error}");

        let produce: &[&str] = &["produce", "--messages", "1000", "--batch-bytes", "2048"];
        assert_eq!(bench(&args(&[produce, common], &target)).0, 0);
        let (code, report) = bench(&args(&[fetch, common], &target));
        assert_eq!(code, 0, "{report}");
        assert_eq!(report["mode"], "fetch");
        assert_eq!(report["latency_us"]["count"], 50, "one round trip timed per fetch");
        // Each fetch starts 10 records before a partition's end: whole batches from there on.
        let consumed = report["consumed"].as_u64().unwrap();
        assert!((50 * 10..=50 * 40).contains(&consumed), "{report}");
        assert_eq!(report["errors"], 0);
    }

    #[test]
    fn fetch_times_reads_near_the_end_native() {
        fetch_times_reads_near_the_end("native");
    }

    #[test]
    fn fetch_times_reads_near_the_end_kafka() {
        fetch_times_reads_near_the_end("kafka");
    }

    fn produce_then_verify_consume(produce_over: &'static str, consume_over: &'static str) {
        let broker = FakeBroker::start().unwrap();
        let common: &[&str] = &["--topic", "v", "--partitions", "3", "--json", "--message-bytes", "200"];
        let produce: &[&str] =
            &["produce", "--messages", "3000", "--producers", "2", "--batch-bytes", "4096"];
        let (code, report) = bench(&args(&[produce, common], &target(&broker, produce_over)));
        assert_eq!(code, 0, "{report}");
        assert_eq!(report["protocol"], produce_over);
        assert_eq!(report["acked"], 3000);
        assert_eq!(report["messages"], 3000);
        assert_eq!(report["bytes"], 3000 * 200);
        assert_eq!(report["errors"], 0);
        assert_eq!(report["latency_us"]["count"], 3000);
        let total: i64 = (0..3).map(|p| broker.next_offset("v", p).unwrap()).sum();
        assert_eq!(total, 3000);

        let consume: &[&str] =
            &["consume", "--messages", "3000", "--consumers", "2", "--verify", "--idle-secs", "5"];
        let (code, report) = bench(&args(&[consume, common], &target(&broker, consume_over)));
        assert_eq!(code, 0, "{report}");
        assert_eq!(report["protocol"], consume_over);
        assert_eq!(report["consumed"], 3000);
        assert_eq!(report["verify_producers"], 2);
        assert_eq!(report["verify_problems"], 0);
    }

    #[test]
    fn produce_then_verify_consume_native() {
        produce_then_verify_consume("native", "native");
    }

    #[test]
    fn produce_then_verify_consume_kafka() {
        produce_then_verify_consume("kafka", "kafka");
    }

    #[test]
    fn what_one_protocol_produces_the_other_consumes() {
        produce_then_verify_consume("native", "kafka");
        produce_then_verify_consume("kafka", "native");
    }

    /// The README's by-hand steps: a native run and a Kafka run into one topic, then one
    /// verify of both runs' messages (each run's producers have ids of their own).
    #[test]
    fn one_verify_covers_two_runs_into_one_topic() {
        let broker = FakeBroker::start().unwrap();
        let common: &[&str] = &["--topic", "two", "--partitions", "2", "--json", "--message-bytes", "100"];
        let produce: &[&str] = &["produce", "--messages", "1000"];
        for protocol in ["native", "kafka"] {
            let (code, report) = bench(&args(&[produce, common], &target(&broker, protocol)));
            assert_eq!((code, &report["acked"]), (0, &1000.into()), "{report}");
        }
        let consume: &[&str] = &["consume", "--messages", "2000", "--verify", "--idle-secs", "5"];
        let (code, report) = bench(&args(&[consume, common], &target(&broker, "native")));
        assert_eq!(code, 0, "{report}");
        assert_eq!(report["consumed"], 2000);
        assert_eq!(report["verify_producers"], 2, "one producer per run: {report}");
        assert_eq!(report["verify_problems"], 0);
        assert_eq!(report["verify_unread"], 0);
    }

    fn verify_flags_a_duplicate_and_exits_1(protocol: &'static str) {
        let broker = FakeBroker::start().unwrap();
        let target = target(&broker, protocol);
        let common: &[&str] = &["--topic", "d", "--partitions", "1", "--json"];
        let (code, _) = bench(&args(&[&["produce", "--messages", "100"], common], &target));
        assert_eq!(code, 0);
        // Append a copy of the producer's message 5 after its message 99.
        let client = Client::connect(&broker.addr().to_string()).unwrap();
        let fetched = client.fetch("d", 0, 5, 1 << 20, 0).unwrap();
        let fifth = fetched.reader().map(Result::unwrap).find(|r| r.offset == 5).unwrap();
        let producer = payload::header(&fifth.value).unwrap().producer;
        let mut value = vec![0u8; 1024];
        payload::write(&mut value, payload::Header { producer, sequence: 5, send_ns: 0 });
        let mut batch = pyralog_net::client::BatchBuilder::new(0, 0);
        batch.append(0, None, &value);
        client.produce("d", 0, batch.finish(), Acks::Durable).unwrap();

        let consume: &[&str] = &["consume", "--verify", "--messages", "101", "--idle-secs", "2"];
        let (code, report) = bench(&args(&[consume, common], &target));
        assert_eq!(code, 1, "{report}");
        assert_eq!(report["verify_problems"], 2, "out of order, and delivered twice: {report}");
        let problems = report["problems"].to_string();
        assert!(problems.contains(&format!("offset 100 (producer {producer} sequence 5)")), "{problems}");
    }

    #[test]
    fn verify_flags_a_duplicate_and_exits_1_native() {
        verify_flags_a_duplicate_and_exits_1("native");
    }

    #[test]
    fn verify_flags_a_duplicate_and_exits_1_kafka() {
        verify_flags_a_duplicate_and_exits_1("kafka");
    }

    fn e2e_with_a_rate_measures_send_to_consume(protocol: &'static str) {
        let broker = FakeBroker::start().unwrap();
        let e2e: &[&str] = &[
            "e2e",
            "--topic",
            "e",
            "--partitions",
            "2",
            "--json",
            "--messages",
            "400",
            "--rate",
            "2000",
            "--producers",
            "2",
            "--consumers",
            "2",
            "--verify",
            "--idle-secs",
            "5",
        ];
        let (code, report) = bench(&args(&[e2e], &target(&broker, protocol)));
        assert_eq!(code, 0, "{report}");
        assert_eq!(report["consumed"], 400);
        assert_eq!(report["verify_problems"], 0);
        assert_eq!(report["latency_us"]["count"], 400);
        assert_eq!(report["ack_latency_us"]["count"], 400);
        // 400 messages at 2000/s take at least 0.2 s on the schedule.
        assert!(report["seconds"].as_f64().unwrap() >= 0.19, "{report}");
    }

    #[test]
    fn e2e_with_a_rate_measures_send_to_consume_native() {
        e2e_with_a_rate_measures_send_to_consume("native");
    }

    #[test]
    fn e2e_with_a_rate_measures_send_to_consume_kafka() {
        e2e_with_a_rate_measures_send_to_consume("kafka");
    }

    #[test]
    fn acks_none_over_kafka_counts_unacknowledged_and_the_log_verifies() {
        let broker = FakeBroker::start().unwrap();
        let target = target(&broker, "kafka");
        let common: &[&str] = &["--topic", "n", "--partitions", "2", "--json", "--message-bytes", "64"];
        let produce: &[&str] = &["produce", "--messages", "2000", "--acks", "none"];
        let (code, report) = bench(&args(&[produce, common], &target));
        assert_eq!(code, 0, "{report}");
        assert_eq!((report["acked"].as_u64(), report["unacknowledged"].as_u64()), (Some(0), Some(2000)));
        assert_eq!(report["messages"], 2000);
        let consume: &[&str] = &["consume", "--messages", "2000", "--verify", "--idle-secs", "5"];
        let (code, report) = bench(&args(&[consume, common], &target));
        assert_eq!(code, 0, "{report}");
        assert_eq!(report["verify_problems"], 0);
    }

    fn a_broker_that_goes_away_exits_2_with_the_acknowledged_count(protocol: &'static str) {
        let mut broker = FakeBroker::start().unwrap();
        let produce: &[&str] = &["produce", "--topic", "g", "--json", "--duration", "20", "--rate", "5000"];
        let target = target(&broker, protocol);
        let cli =
            Cli::try_parse_from(std::iter::once("pyralog-bench").chain(args(&[produce], &target))).unwrap();
        let started = Instant::now();
        let runner = std::thread::spawn(move || run(cli.command).unwrap());
        // Let some messages through, then take the broker away.
        while broker.next_offset("g", 0).unwrap_or(0) + broker.next_offset("g", 1).unwrap_or(0) < 100 {
            assert!(started.elapsed() < Duration::from_secs(10), "nothing was produced");
            std::thread::sleep(Duration::from_millis(5));
        }
        broker.shutdown();
        let (code, report) = runner.join().unwrap();
        assert_eq!(code, 2, "{report}");
        assert!(report["acked"].as_u64().unwrap() >= 100, "{report}");
        assert!(report["broker_gone"].is_string(), "{report}");
        assert!(started.elapsed() < Duration::from_secs(15), "the run stopped early, not at --duration");
    }

    #[test]
    fn a_broker_that_goes_away_exits_2_with_the_acknowledged_count_native() {
        a_broker_that_goes_away_exits_2_with_the_acknowledged_count("native");
    }

    #[test]
    fn a_broker_that_goes_away_exits_2_with_the_acknowledged_count_kafka() {
        a_broker_that_goes_away_exits_2_with_the_acknowledged_count("kafka");
    }

    #[test]
    fn a_produce_runs_on_through_a_failover_and_reports_the_gap_and_the_retries() {
        let mut broker = FakeBroker::start_cluster(2).unwrap();
        let produce: &[&str] = &[
            "produce",
            "--topic",
            "fo",
            "--partitions",
            "2",
            "--json",
            "--messages",
            "3000",
            "--rate",
            "3000",
        ];
        let target = ["--protocol".into(), "native".into(), "--broker".into(), broker.addr().to_string()];
        let cli =
            Cli::try_parse_from(std::iter::once("pyralog-bench").chain(args(&[produce], &target))).unwrap();
        let started = Instant::now();
        let runner = std::thread::spawn(move || run(cli.command).unwrap());
        // Node 0, the bootstrap node and partition 0's leader, goes away mid-run.
        while broker.next_offset("fo", 0).unwrap_or(0) < 300 {
            assert!(started.elapsed() < Duration::from_secs(10), "nothing was produced");
            std::thread::sleep(Duration::from_millis(5));
        }
        broker.stop_node(0);
        let (code, report) = runner.join().unwrap();
        assert_eq!(code, 0, "{report}");
        assert_eq!(report["acked"], 3000);
        assert_eq!(report["errors"], 0);
        assert!(report["broker_gone"].is_null(), "{report}");
        assert!(report["leader_retries"].as_u64().unwrap() > 0, "{report}");
        assert!(report["ack_gap_max_ms"].as_f64().unwrap() > 0.0, "{report}");
        // What node 0 stored without answering is recognised when it comes again (the
        // producer is idempotent): each record once.
        let stored: i64 = (0..2).map(|p| broker.next_offset("fo", p).unwrap()).sum();
        assert_eq!(stored, 3000);
    }

    #[test]
    fn an_unreachable_broker_exits_2_over_either_protocol() {
        let mut broker = FakeBroker::start().unwrap();
        let (native, kafka) = (broker.addr().to_string(), broker.kafka_addr().to_string());
        broker.shutdown();
        for (protocol, addr) in [("native", native), ("kafka", kafka)] {
            let args =
                ["pyralog-bench", "produce", "--protocol", protocol, "--broker", &addr, "--messages", "1"];
            let cli = Cli::try_parse_from(args).unwrap();
            let error = run(cli.command).unwrap_err();
            assert!(error.downcast_ref::<ClientError>().is_some_and(ClientError::is_disconnect), "{error:#}");
        }
    }

    #[test]
    fn a_consume_that_ends_short_exits_4_and_says_why() {
        let broker = FakeBroker::start().unwrap();
        let target = target(&broker, "native");
        let common: &[&str] = &["--topic", "s", "--partitions", "2", "--json", "--message-bytes", "100"];
        assert_eq!(bench(&args(&[&["produce", "--messages", "100"], common], &target)).0, 0);
        let consume: &[&str] = &["consume", "--messages", "150", "--idle-secs", "1"];
        let (code, report) = bench(&args(&[consume, common], &target));
        assert_eq!(code, outcome::EXIT_SHORT, "{report}");
        assert_eq!(report["consumed"], 100);
        let result = report["result"].as_str().unwrap();
        assert!(result.starts_with("FAILED: consumed 100 of the 150 messages asked for"), "{result}");
        assert!(result.contains("no record arrived for 1 s (--idle-secs)"), "{result}");
        // The rate counts the time spent receiving, not the idle second that ended the run.
        let (seconds, rate_seconds) =
            (report["seconds"].as_f64().unwrap(), report["rate_seconds"].as_f64().unwrap());
        assert!(rate_seconds > 0.0 && rate_seconds + 0.9 < seconds, "{report}");
        let rate = report["msgs_per_sec"].as_f64().unwrap();
        assert!((rate - 100.0 / rate_seconds).abs() < 1e-6, "{report}");

        let (code, report) = bench(&args(&[&["consume", "--messages", "100", "--verify"], common], &target));
        assert_eq!(code, 0, "{report}");
        let result = report["result"].as_str().unwrap();
        assert!(result.starts_with("verified 100 of 100 messages consumed"), "{result}");
    }

    #[test]
    fn consume_refuses_a_missing_topic_unless_asked_to_create_it() {
        let broker = FakeBroker::start().unwrap();
        let target = target(&broker, "kafka");
        let consume: &[&str] = &["consume", "--topic", "absent", "--json", "--idle-secs", "0.2"];
        let cli =
            Cli::try_parse_from(std::iter::once("pyralog-bench").chain(args(&[consume], &target))).unwrap();
        let error = format!("{:#}", run(cli.command).unwrap_err());
        assert!(error.contains("topic 'absent' does not exist, nothing to consume"), "{error}");
        assert!(error.contains("--create-topic"), "{error}");
        assert!(broker.next_offset("absent", 0).is_none(), "refused, so not created");

        let (code, report) = bench(&args(&[consume, &["--create-topic", "--partitions", "3"]], &target));
        assert_eq!(code, 0, "{report}");
        assert_eq!(report["consumed"], 0);
        assert_eq!(broker.next_offset("absent", 2), Some(0), "created with 3 partitions");
    }

    #[test]
    fn the_timeline_has_a_row_per_second() {
        let broker = FakeBroker::start().unwrap();
        let file = std::env::temp_dir().join(format!("pyralog-bench-timeline-{}.csv", std::process::id()));
        let path = file.to_str().unwrap();
        let produce: &[&str] =
            &["produce", "--topic", "t", "--json", "--duration", "2.5", "--rate", "1000", "--timeline", path];
        let (code, report) = bench(&args(&[produce], &target(&broker, "native")));
        assert_eq!(code, 0, "{report}");
        let text = std::fs::read_to_string(&file).unwrap();
        std::fs::remove_file(&file).unwrap();
        let mut lines = text.lines();
        assert_eq!(lines.next(), Some(stats::TIMELINE_HEADER));
        let rows: Vec<Vec<f64>> =
            lines.map(|line| line.split(',').map(|field| field.parse().unwrap()).collect()).collect();
        // Rows at 1 s and 2 s, and the part-second to the end of the run.
        assert_eq!(rows.len(), 3, "{text}");
        for (row, second) in rows.iter().zip([1.0, 2.0, 2.5]) {
            assert_eq!(row.len(), 7, "{text}");
            assert!((row[0] - second).abs() < 0.3, "elapsed {} for second {second}: {text}", row[0]);
            assert!((700.0..1300.0).contains(&row[1]), "about 1000 msg/s: {text}");
            assert!(row[3] <= row[4] && row[4] <= row[5], "p50 <= p99 <= max: {text}");
            assert_eq!(row[6], 0.0, "no errors: {text}");
        }
    }
}
