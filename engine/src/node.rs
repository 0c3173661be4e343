//! Starting, running and stopping a node.
//!
//! Start-up checks everything a person can get wrong before any executor exists (so no shard
//! is left waiting on a peer that never came): the data directory is writable and not in use
//! by another node, the ports are free, io_uring works, the memlock limit covers the I/O
//! memory. Then one executor per shard is spawned and pinned; each opens its partitions and
//! binds its listeners, and the node prints one summary once every shard is ready.
//!
//! SIGINT and SIGTERM are blocked in every thread and taken by the main thread with
//! `sigtimedwait`. On either, shards stop accepting, flush and close their segments, and the
//! process exits 0.

use std::cell::Cell;
use std::fs::File;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use glommio::{LocalExecutorBuilder, Placement};
use pyralog_dma::LogConfig;
use pyralog_net::codec::ShardInfo;
use pyralog_net::ports::{self, Sharing};
use pyralog_net::server::{self, ListenerConfig};
use pyralog_shard::{Durability, GroupConfig, Shard, ShardConfig, ShardMesh};

use crate::cluster::ClusterPlan;
use crate::identity;
use crate::kafka::{KafkaService, KafkaSettings};
use crate::metrics::{Endpoints, ShardRegistry};
use crate::service::{ProducerIds, Service, Topology};
use crate::{DurabilityArg, NodeArgs};

/// How long start-up may take before the node gives up.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);
/// How often a shard looks at the stop flag.
const STOP_POLL_INTERVAL: Duration = Duration::from_millis(20);
/// Requests one connection may have in flight.
const IN_FLIGHT_PER_CONNECTION_MAX: usize = 1024;
// `--flush-bytes` is bounded by what a partition may hold unflushed (its range is a literal).
const _: () = assert!(pyralog_shard::UNFLUSHED_BYTES_MAX == 64 << 20);
// `--segment-bytes` is bounded by what a segment's 32-bit positions reach, and holds a block.
const _: () = assert!(pyralog_dma::SEGMENT_BYTES_MAX == 4 << 30 && pyralog_dma::BLOCK_BYTES == 4096);

struct ShardReady {
    shard: usize,
    cpu: usize,
    port: u16,
    kafka_port: u16,
    /// Shard 0 serves the metrics endpoints.
    metrics_port: Option<u16>,
}

enum ShardEvent {
    Ready(ShardReady),
    Failed(String),
    Stopped { shard: usize, error: Option<String> },
}

pub fn run(mut args: NodeArgs) -> Result<()> {
    // Everything that can be checked without touching the disk comes first, so a refused
    // start leaves no trace in the data directory.
    let cpus = choose_cpus(&args)?;
    check_ports(&args, cpus.len())?;
    let (advertised_host, advertised_port) = args.kafka_advertised()?;
    if args.default_partitions == 0 {
        bail!("--default-partitions must be at least 1");
    }
    check_io_uring()?;
    let io_memory_bytes = io_memory_per_shard(args.io_memory_bytes, cpus.len())?;
    let seeds = args.seeds.as_deref().map(identity::parse_seeds).transpose()?;
    let data_dir = DataDir::prepare(&args.data_dir)?;
    // Absolute from here on: every file the shards open is named from it (glommio cannot open
    // a directory by a relative path).
    args.data_dir = data_dir.path.clone();
    let identity_existed = identity::exists(&args.data_dir);
    let (identity, cluster) = match establish_identity(&args, seeds, cpus.len()) {
        Ok(identity) => identity,
        Err(error) => {
            data_dir.discard_after_failed_start();
            return Err(error);
        }
    };
    let kafka = KafkaSettings {
        advertised_host,
        advertised_port,
        auto_create_topics: args.auto_create_topics,
        default_partitions: args.default_partitions,
        max_message_bytes: u32::try_from(args.max_request_bytes).unwrap_or(u32::MAX),
        segment_bytes: args.segment_bytes,
        retention_bytes: args.retention_bytes,
        retention_ms: args.retention_ms,
        cluster_id: identity.cluster_id.map(|id| crate::identity::hex(&id)).unwrap_or_default(),
        node_id: identity.node_id,
    };
    block_stop_signals();
    let node = match start(&args, &identity, cluster.as_ref(), &cpus, kafka, io_memory_bytes) {
        Ok(node) => node,
        Err(error) => {
            // A start that fails leaves the directory as it found it: a node id stored by it
            // would bind the directory to an id nobody chose to keep.
            if !identity_existed {
                identity::remove(&args.data_dir);
            }
            data_dir.discard_after_failed_start();
            return Err(error);
        }
    };
    let outcome = node.run_until_stopped();
    data_dir.release();
    outcome
}

/// Loads or creates the node's identity (see `identity`), stored before any shard starts, and
/// with --seeds the node's cluster plan (see `cluster`).
fn establish_identity(
    args: &NodeArgs,
    seeds: Option<Vec<identity::Seed>>,
    shards: usize,
) -> Result<(identity::NodeMeta, Option<ClusterPlan>)> {
    let stored = identity::load(&args.data_dir)?;
    let node_id = identity::node_id(stored.as_ref(), args.node_id, &args.data_dir, seeds.is_some())?;
    let plan = seeds.map(|seeds| ClusterPlan::new(args, node_id, seeds)).transpose()?;
    if let Some(plan) = &plan {
        if shards > crate::cluster::SHARDS_MAX {
            bail!("a node of a cluster runs at most {} shards", crate::cluster::SHARDS_MAX);
        }
        for shard in 0..shards {
            let addr = plan.shard_listen(shard);
            ports::check_free(addr, Sharing::Exclusive).map_err(|problem| {
                anyhow!("cluster port {addr} (--cluster-listen + shard {shard}) is {problem}")
            })?;
        }
    }
    let (cluster_id, controller_lost) = match (stored.and_then(|meta| meta.cluster_id), &plan) {
        (Some(id), _) => (id, false),
        (None, Some(plan)) => crate::cluster::learn_cluster_id(plan)?,
        // A cluster of one bootstraps its cluster at its first start.
        (None, None) => (identity::new_cluster_id()?, false),
    };
    let incarnation = match stored {
        Some(meta) => meta.incarnation,
        None => identity::new_incarnation()?,
    };
    let plan = plan.map(|mut plan| {
        plan.settings.incarnation = incarnation;
        plan.settings.controller_disk_lost = controller_lost;
        plan
    });
    let meta = identity::NodeMeta { node_id, cluster_id: Some(cluster_id), incarnation };
    if stored != Some(meta) {
        identity::store(&args.data_dir, &meta)?;
    }
    Ok((meta, plan))
}

/// A node whose shards all serve.
struct RunningNode {
    stop: Arc<AtomicBool>,
    handles: Vec<glommio::ExecutorJoinHandle<()>>,
    events: mpsc::Receiver<ShardEvent>,
}

/// Spawns one pinned executor per CPU and waits until each serves. On failure every shard
/// already started is stopped and joined before this returns, so none is still writing into
/// the data directory.
fn start(
    args: &NodeArgs,
    identity: &identity::NodeMeta,
    cluster: Option<&ClusterPlan>,
    cpus: &[usize],
    kafka: KafkaSettings,
    io_memory_bytes: usize,
) -> Result<RunningNode> {
    // Producer ids of this run start above every id an earlier run can have issued, as long
    // as fewer than 1024 were issued per millisecond of its uptime.
    let first_producer_id = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
        .saturating_mul(1024);
    let stop = Arc::new(AtomicBool::new(false));
    let topology: Arc<OnceLock<Topology>> = Arc::new(OnceLock::new());
    let (events, event_receiver) = mpsc::channel::<ShardEvent>();
    let mesh = pyralog_shard::new_mesh(cpus.len());
    let mut node = RunningNode {
        stop: Arc::clone(&stop),
        handles: Vec::with_capacity(cpus.len()),
        events: event_receiver,
    };
    let endpoints = EndpointSettings {
        listen: args.metrics_listen,
        config_json: serde_json::to_string(args).expect("the settings serialize"),
        per_partition: args.metrics_partitions,
        started_at_s: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64()),
    };
    for &cpu in cpus {
        let mut config = shard_config(args);
        config.cluster = cluster.map(|plan| plan.settings.clone());
        let context = ShardContext {
            mesh: mesh.clone(),
            config,
            cluster: cluster
                .map(|plan| (plan.clone(), identity.cluster_id.expect("a node has a cluster id"))),
            listen: args.listen,
            shard_port_base: args.shard_port_base,
            kafka_listen: args.kafka_listen,
            kafka_shard_port_base: args.kafka_shard_port_base,
            kafka: kafka.clone(),
            first_producer_id,
            max_request_bytes: args.max_request_bytes,
            listener: ListenerConfig {
                max_in_flight_per_connection: IN_FLIGHT_PER_CONNECTION_MAX,
                max_connections: args.max_connections,
            },
            cpu,
            stop: Arc::clone(&stop),
            topology: Arc::clone(&topology),
            events: events.clone(),
            endpoints: endpoints.clone(),
        };
        let spawned = LocalExecutorBuilder::new(Placement::Fixed(cpu))
            .name(&format!("pyralog-cpu{cpu}"))
            .io_memory(io_memory_bytes)
            .spawn(move || run_shard(context));
        match spawned {
            Ok(handle) => node.handles.push(handle),
            Err(error) => return Err(node.abandon(anyhow!("starting the executor on CPU {cpu}: {error}"))),
        }
    }
    drop(events);

    let mut ready = Vec::new();
    let deadline = std::time::Instant::now() + STARTUP_TIMEOUT;
    while ready.len() < cpus.len() {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let error = match node.events.recv_timeout(left) {
            Ok(ShardEvent::Ready(shard)) => {
                ready.push(shard);
                continue;
            }
            Ok(ShardEvent::Failed(error)) => anyhow!("{error}"),
            Ok(ShardEvent::Stopped { shard, error }) => {
                anyhow!("shard {shard} stopped during start-up: {}", error.unwrap_or_default())
            }
            Err(_) => anyhow!("the shards did not start within {STARTUP_TIMEOUT:?}"),
        };
        return Err(node.abandon(error));
    }
    ready.sort_by_key(|r| r.shard);
    let shards: Vec<ShardInfo> =
        ready.iter().map(|r| ShardInfo { shard: r.shard as u32, cpu: r.cpu as u32, port: r.port }).collect();
    let kafka_ports: Vec<u16> = ready.iter().map(|r| r.kafka_port).collect();
    topology
        .set(Topology { shards: shards.clone(), kafka_ports: kafka_ports.clone() })
        .unwrap_or_else(|_| unreachable!("set once"));
    let metrics_port = ready.iter().find_map(|r| r.metrics_port).expect("shard 0 serves the metrics");
    print_summary(args, identity, cluster, &shards, &kafka_ports, io_memory_bytes, metrics_port);
    Ok(node)
}

impl RunningNode {
    /// Stops and joins every shard after a failed start-up; returns `error` for the caller.
    fn abandon(self, error: anyhow::Error) -> anyhow::Error {
        self.stop.store(true, Ordering::SeqCst);
        for handle in self.handles {
            let _ = handle.join();
        }
        error
    }

    /// Serves until SIGINT or SIGTERM, or until a shard stops on its own; then stops every
    /// shard (each flushes and closes its logs) and joins them.
    fn run_until_stopped(self) -> Result<()> {
        let outcome = wait_for_stop(&self.events);
        self.stop.store(true, Ordering::SeqCst);
        let mut errors = Vec::new();
        if let Err(error) = outcome {
            errors.push(error);
        }
        for handle in self.handles {
            if handle.join().is_err() {
                errors.push("a shard panicked".to_owned());
            }
        }
        while let Ok(event) = self.events.try_recv() {
            if let ShardEvent::Stopped { shard, error: Some(error) } = event {
                errors.push(format!("shard {shard}: {error}"));
            }
        }
        if !errors.is_empty() {
            bail!("stopped with errors: {}", errors.join("; "));
        }
        println!("pyralog: stopped cleanly");
        Ok(())
    }
}

struct ShardContext {
    mesh: ShardMesh,
    config: ShardConfig,
    /// The node's cluster plan and cluster id, when it runs with --seeds.
    cluster: Option<(ClusterPlan, pyralog_net::cluster::ClusterId)>,
    listen: SocketAddr,
    shard_port_base: Option<u16>,
    kafka_listen: SocketAddr,
    kafka_shard_port_base: Option<u16>,
    kafka: KafkaSettings,
    first_producer_id: i64,
    max_request_bytes: usize,
    listener: ListenerConfig,
    cpu: usize,
    stop: Arc<AtomicBool>,
    topology: Arc<OnceLock<Topology>>,
    events: mpsc::Sender<ShardEvent>,
    endpoints: EndpointSettings,
}

/// What shard 0 needs to serve the operator's endpoints (`metrics`).
#[derive(Clone)]
struct EndpointSettings {
    listen: SocketAddr,
    config_json: String,
    per_partition: bool,
    started_at_s: f64,
}

async fn run_shard(context: ShardContext) {
    let shard = match Shard::start(context.mesh, context.config).await {
        Ok(shard) => shard,
        Err(error) => {
            let _ = context.events.send(ShardEvent::Failed(format!("shard on CPU {}: {error}", context.cpu)));
            return;
        }
    };
    // Port 0 (no base): the shard takes a free port. check_ports vetted the ranges.
    let shard_addr = |listen: SocketAddr, base: Option<u16>| {
        let base = first_shard_port(listen, base, "").expect("checked by check_ports at startup");
        SocketAddr::new(listen.ip(), base.map_or(0, |base| base + shard.id as u16))
    };
    let transport = match &context.cluster {
        Some((plan, cluster_id)) => match crate::cluster::start_transport(plan, *cluster_id, &shard) {
            Ok(transport) => Some(transport),
            Err(error) => {
                let addr = plan.shard_listen(shard.id);
                let _ =
                    context.events.send(ShardEvent::Failed(format!("binding cluster port {addr}: {error}")));
                let _ = shard.shutdown().await;
                return;
            }
        },
        None => None,
    };
    let registry = ShardRegistry::new(&shard);
    let native_metrics = Rc::new(registry.server.listener("native"));
    let kafka_metrics = Rc::new(registry.server.listener("kafka"));
    shard.set_scrape_hook(registry.into_scrape_hook());
    let own_addr = shard_addr(context.listen, context.shard_port_base);
    let kafka_own_addr = shard_addr(context.kafka_listen, context.kafka_shard_port_base);
    let listeners = server::bind(context.listen, Sharing::Shared).and_then(|shared| {
        Ok((
            shared,
            server::bind(own_addr, Sharing::Exclusive)?,
            server::bind(context.kafka_listen, Sharing::Shared)?,
            server::bind(kafka_own_addr, Sharing::Exclusive)?,
        ))
    });
    let metrics_listener = match shard.id {
        0 => server::bind(context.endpoints.listen, Sharing::Exclusive).map(Some),
        _ => Ok(None),
    };
    let listeners = listeners.and_then(|listeners| Ok((listeners, metrics_listener?)));
    let ((shared, own, kafka_shared, kafka_own), metrics_listener) = match listeners {
        Ok(listeners) => listeners,
        Err(error) => {
            let _ = context.events.send(ShardEvent::Failed(format!(
                "binding {}, {own_addr}, {}, {kafka_own_addr} and {}: {error}",
                context.listen, context.kafka_listen, context.endpoints.listen
            )));
            let _ = shard.shutdown().await;
            return;
        }
    };
    let port = own.local_addr().map(|a| a.port()).unwrap_or(own_addr.port());
    let kafka_port = kafka_own.local_addr().map(|a| a.port()).unwrap_or(kafka_own_addr.port());
    let metrics_port = metrics_listener.as_ref().map(|l| l.local_addr().map_or(0, |a| a.port()));
    let _endpoints = metrics_listener.map(|listener| {
        let endpoints = Endpoints {
            shard: Rc::clone(&shard),
            topology: Arc::clone(&context.topology),
            stopping: Arc::clone(&context.stop),
            config_json: context.endpoints.config_json.clone(),
            per_partition: context.endpoints.per_partition,
            started_at_s: context.endpoints.started_at_s,
            node_id: context.kafka.node_id,
            cluster_id: context.kafka.cluster_id.clone(),
        };
        glommio::spawn_local(pyralog_net::http::serve(listener, Rc::new(endpoints)))
    });
    let ready = ShardReady { shard: shard.id, cpu: context.cpu, port, kafka_port, metrics_port };
    let _ = context.events.send(ShardEvent::Ready(ready));
    while context.topology.get().is_none() && !context.stop.load(Ordering::SeqCst) {
        glommio::timer::sleep(Duration::from_millis(1)).await;
    }
    let topology = Rc::new(
        context.topology.get().cloned().unwrap_or(Topology { shards: Vec::new(), kafka_ports: Vec::new() }),
    );
    // Once every shard serves, shard 0 tells the controller where this node is.
    let _registering = match (&context.cluster, shard.id) {
        (Some((plan, _)), 0) if !topology.shards.is_empty() => {
            let metrics = SocketAddr::new(context.endpoints.listen.ip(), metrics_port.unwrap_or(0));
            let node = crate::cluster::node_info(plan, &topology, &context.kafka, context.listen, metrics);
            let registering = Rc::clone(&shard);
            Some(glommio::spawn_local(async move {
                while let Err(error) = registering.register_node(node.clone()).await {
                    if matches!(error, pyralog_shard::ShardError::ShuttingDown) {
                        return;
                    }
                    eprintln!("pyralog: registering with the cluster's controller: {error}; trying again");
                }
            }))
        }
        _ => None,
    };
    let producer_ids = Rc::new(ProducerIds::new(context.first_producer_id));
    let service = Rc::new(server::Native {
        handler: Service {
            shard: Rc::clone(&shard),
            topology: Rc::clone(&topology),
            node_id: context.kafka.node_id,
            shared_port: shared.local_addr().map_or(context.listen.port(), |a| a.port()),
            producer_ids: Rc::clone(&producer_ids),
        },
        max_request_bytes: context.max_request_bytes,
    });
    let stop_listeners = Rc::new(Cell::new(false));
    let serving = [shared, own].map(|listener| {
        glommio::spawn_local(server::serve(
            listener,
            Rc::clone(&service),
            context.listener,
            Rc::clone(&stop_listeners),
            Rc::clone(&native_metrics),
        ))
    });
    let kafka_service = Rc::new(server::Kafka {
        handler: KafkaService {
            shard: Rc::clone(&shard),
            settings: Rc::new(context.kafka.clone()),
            broker_ports: topology.kafka_ports.clone(),
            groups: crate::groups::Groups,
            producer_ids: Rc::clone(&producer_ids),
        },
        max_request_bytes: context.max_request_bytes,
    });
    let kafka_serving = [kafka_shared, kafka_own].map(|listener| {
        glommio::spawn_local(server::serve(
            listener,
            Rc::clone(&kafka_service),
            context.listener,
            Rc::clone(&stop_listeners),
            Rc::clone(&kafka_metrics),
        ))
    });
    while !context.stop.load(Ordering::SeqCst) {
        glommio::timer::sleep(STOP_POLL_INTERVAL).await;
    }
    if transport.is_some() {
        // While clients are still served (a produce then answers NotLeader and is retried
        // on the new leader) and peers still hear us.
        let (handed, kept) = shard.hand_over_leaderships().await;
        let leaderships = |count: usize| if count == 1 { "leadership" } else { "leaderships" };
        if handed > 0 {
            println!(
                "pyralog: shard {}: handed {handed} {} over to in-sync followers",
                shard.id,
                leaderships(handed)
            );
        }
        if kept > 0 {
            eprintln!(
                "pyralog: shard {}: {kept} {} could not be handed over before stopping",
                shard.id,
                leaderships(kept)
            );
        }
    }
    stop_listeners.set(true);
    drop(serving); // cancels the accept loops
    drop(kafka_serving);
    if let Some(transport) = transport {
        transport.close().await;
    }
    let error = shard.shutdown().await.err().map(|e| e.to_string());
    let _ = context.events.send(ShardEvent::Stopped { shard: shard.id, error });
}

fn shard_config(args: &NodeArgs) -> ShardConfig {
    ShardConfig {
        data_dir: args.data_dir.clone(),
        durability: match args.durability {
            DurabilityArg::Sync => Durability::Sync,
            DurabilityArg::Cached => Durability::Cached {
                flush_interval: Duration::from_millis(args.flush_interval_ms),
                flush_bytes: args.flush_bytes,
            },
        },
        log: LogConfig {
            segment_bytes: args.segment_bytes,
            index_interval_bytes: pyralog_dma::INDEX_INTERVAL_BYTES,
            retention_bytes: args.retention_bytes,
            retention_ms: args.retention_ms,
        },
        retention_check_interval: Duration::from_millis(args.retention_check_interval_ms),
        cache_bytes: args.cache_bytes,
        groups: GroupConfig {
            initial_rebalance_delay: Duration::from_millis(args.group_initial_rebalance_delay_ms),
            offsets_segment_bytes: args.offsets_segment_bytes,
            offsets_compact_growth_bytes: args.offsets_compact_bytes,
            offsets_retention: Duration::from_secs(args.offsets_retention_minutes * 60),
            offsets_retention_check_interval: Duration::from_millis(args.offsets_retention_check_interval_ms),
            ..GroupConfig::default()
        },
        cluster: None,
    }
}

fn choose_cpus(args: &NodeArgs) -> Result<Vec<usize>> {
    let available: Vec<usize> = core_affinity::get_core_ids()
        .ok_or_else(|| anyhow!("cannot read this process's CPU affinity"))?
        .into_iter()
        .map(|c| c.id)
        .collect();
    let cpus = match (&args.cpus, args.shards) {
        (Some(list), _) => parse_cpu_list(list)?,
        (None, Some(0)) => bail!("--shards must be at least 1"),
        (None, Some(n)) if n > available.len() => {
            bail!("--shards {n} asks for more shards than the {} CPUs this process may use", available.len())
        }
        (None, Some(n)) => available[..n].to_vec(),
        (None, None) => available.clone(),
    };
    if let Some(missing) = cpus.iter().find(|c| !available.contains(c)) {
        bail!("CPU {missing} is not one this process may use (allowed: {available:?})");
    }
    Ok(cpus)
}

fn parse_cpu_list(list: &str) -> Result<Vec<usize>> {
    let mut cpus = Vec::new();
    for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let bad = || anyhow!("--cpus takes a list like \"0,1\" or \"0-3\", not {list:?}");
        match part.split_once('-') {
            Some((from, to)) => {
                let (from, to): (usize, usize) =
                    (from.parse().map_err(|_| bad())?, to.parse().map_err(|_| bad())?);
                if from > to {
                    return Err(bad());
                }
                cpus.extend(from..=to);
            }
            None => cpus.push(part.parse().map_err(|_| bad())?),
        }
    }
    cpus.sort_unstable();
    cpus.dedup();
    if cpus.is_empty() {
        bail!("--cpus names no CPU");
    }
    Ok(cpus)
}

/// The data directory, locked against a second node for as long as this value lives.
struct DataDir {
    /// Absolute.
    path: PathBuf,
    lock: File,
    /// This run made the directory: a failed start removes it whole.
    created: bool,
}

const LOCK_FILE_NAME: &str = ".lock";

impl DataDir {
    /// Creates the directory if needed, proves it writable, and locks it against a second node.
    fn prepare(dir: &Path) -> Result<DataDir> {
        let created = !dir.exists();
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create data directory {}", dir.display()))?;
        let path = std::fs::canonicalize(dir)
            .with_context(|| format!("cannot resolve data directory {}", dir.display()))?;
        let discard = |error: anyhow::Error| {
            if created {
                let _ = std::fs::remove_dir_all(&path);
            }
            error
        };
        let probe = path.join(".write-probe");
        std::fs::write(&probe, b"pyralog")
            .and_then(|()| std::fs::remove_file(&probe))
            .map_err(|e| discard(anyhow!("data directory {} is not writable: {e}", dir.display())))?;
        let lock = match lock(&path.join(LOCK_FILE_NAME)) {
            Ok(Some(lock)) => lock,
            Ok(None) => bail!("data directory {} is in use by another pyralog process", dir.display()),
            Err(error) => return Err(discard(error)),
        };
        let data_dir = DataDir { path, lock, created };
        data_dir.remove_stale_probes();
        Ok(data_dir)
    }

    /// Probe files of a process killed while it probed: ours to remove, since we hold the lock.
    fn remove_stale_probes(&self) {
        let Ok(entries) = std::fs::read_dir(&self.path) else { return };
        for entry in entries.flatten() {
            if entry.file_name().to_str().is_some_and(|name| name.starts_with(pyralog_dma::PROBE_FILE_PREFIX))
            {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }

    /// After a failed start: removes what this run made (the whole directory if it made it,
    /// else the lock file), so a refused start leaves nothing behind.
    fn discard_after_failed_start(self) {
        if self.created {
            let _ = std::fs::remove_dir_all(&self.path);
        } else {
            self.remove_stale_probes();
            self.release();
        }
    }

    /// Removes the lock file while holding the lock, then lets the lock go.
    fn release(self) {
        let _ = std::fs::remove_file(self.path.join(LOCK_FILE_NAME));
        drop(self.lock);
    }
}

/// Locks the lock file at `path`: `None` if another process holds it for [`LOCK_WAIT`] (a
/// node killed a moment ago holds it until its exit finishes: `kill -9` then a start at
/// once). A node removes its lock file when it stops, so the file locked may have been
/// unlinked meanwhile by the node that held it; a lock on an unlinked file guards nothing
/// (the next node creates a new one), so the lock is taken again until the file locked is
/// the one the path names.
fn lock(path: &Path) -> Result<Option<File>> {
    use std::os::unix::fs::MetadataExt;
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    let mut attempts = 0;
    while attempts < LOCK_ATTEMPTS_MAX {
        let file = File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
        // SAFETY: flock on a file descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            if std::time::Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(LOCK_POLL);
            continue;
        }
        attempts += 1;
        let held = file.metadata().with_context(|| format!("inspecting {}", path.display()))?;
        let named = std::fs::metadata(path).ok();
        if named.is_some_and(|named| named.ino() == held.ino() && named.dev() == held.dev()) {
            return Ok(Some(file));
        }
    }
    bail!("{} kept changing while it was being locked", path.display())
}

/// Tries at taking the lock before giving up (each retry follows a node removing its file).
const LOCK_ATTEMPTS_MAX: usize = 8;
/// How long a held lock is waited for before the start is refused, and how often it is
/// tried meanwhile.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(3);
const LOCK_POLL: std::time::Duration = std::time::Duration::from_millis(20);

/// Every port the node will listen on is free, checked with the listeners' own socket options
/// (see `pyralog_net::ports`): a port held only by connections of a node that was killed is
/// free, one another process listens on is not.
fn check_ports(args: &NodeArgs, shards: usize) -> Result<()> {
    let mut ports = vec![
        (args.listen, "--listen", Sharing::Shared),
        (args.kafka_listen, "--kafka-listen", Sharing::Shared),
        (args.metrics_listen, "--metrics-listen", Sharing::Exclusive),
    ];
    let listeners = [
        (args.listen, args.shard_port_base, "--listen", "shard port"),
        (args.kafka_listen, args.kafka_shard_port_base, "--kafka-listen", "Kafka shard port"),
    ];
    for (listen, base, flag, what) in listeners {
        if let Some(base) = first_shard_port(listen, base, flag)? {
            for shard in 0..shards {
                let port = base.checked_add(shard as u16).ok_or_else(|| anyhow!("{what}s run past 65535"))?;
                ports.push((SocketAddr::new(listen.ip(), port), what, Sharing::Exclusive));
            }
        }
    }
    for (addr, what, sharing) in ports {
        ports::check_free(addr, sharing).map_err(|problem| anyhow!("{what} {addr} is {problem}"))?;
    }
    Ok(())
}

/// The port of shard 0 on a listener's per-shard range: `base` (a `--…-shard-port-base`), else
/// the listener's port + 1; `None` when the base is 0 (each shard takes a free port).
fn first_shard_port(listen: SocketAddr, base: Option<u16>, flag: &str) -> Result<Option<u16>> {
    match base {
        Some(0) => Ok(None),
        Some(base) => Ok(Some(base)),
        None => listen
            .port()
            .checked_add(1)
            .map(Some)
            .ok_or_else(|| anyhow!("{flag} port leaves no room for shard ports")),
    }
}

fn check_io_uring() -> Result<()> {
    #[repr(C)]
    struct Params([u32; 30]);
    let mut params = Params([0; 30]);
    // SAFETY: io_uring_setup reads and writes only the params struct, which is large enough.
    let fd = unsafe { libc::syscall(libc::SYS_io_uring_setup, 4u32, &mut params as *mut Params) };
    if fd < 0 {
        let error = std::io::Error::last_os_error();
        bail!(
            "io_uring is unavailable ({error}); pyralog needs Linux 5.8+ with io_uring enabled \
             (sysctl kernel.io_uring_disabled=0, and not blocked by a container's seccomp profile)"
        );
    }
    // SAFETY: closing the fd io_uring_setup just returned.
    unsafe { libc::close(fd as i32) };
    Ok(())
}

/// Registered io_uring memory per shard when `--io-memory-bytes` is not given: room for the
/// writes of small flushes beside small reads (a full write chunk, `WRITE_CHUNK_BYTES_MAX`,
/// comes from the huge-page allocator; see there, and bench/RESULTS.md's fifth session for
/// why reads are slower with more registered).
const IO_MEMORY_DEFAULT: usize = 1 << 20;

/// The io_uring memory each shard registers, checked against the memlock limit.
fn io_memory_per_shard(asked: Option<usize>, shards: usize) -> Result<usize> {
    let bytes = asked.unwrap_or(IO_MEMORY_DEFAULT);
    let needed = (bytes as u64).saturating_mul(shards as u64);
    if let Some(limit) = memlock_limit().filter(|&limit| limit < needed) {
        bail!(
            "the memlock limit is {} KiB but {shards} shards need {} KiB of io_uring buffers: raise it \
             (ulimit -l, or LimitMEMLOCK= for systemd) or lower --io-memory-bytes",
            limit / 1024,
            needed / 1024
        );
    }
    Ok(bytes)
}

/// RLIMIT_MEMLOCK in bytes; `None` when unlimited or unknown.
fn memlock_limit() -> Option<u64> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit) } != 0 {
        return None;
    }
    (limit.rlim_cur != libc::RLIM_INFINITY).then_some(limit.rlim_cur)
}

fn stop_signals() -> libc::sigset_t {
    // SAFETY: sigset manipulation on a local, zero-initialised set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        set
    }
}

/// Blocks SIGINT and SIGTERM here, before any thread exists, so every thread inherits the
/// mask and only `wait_for_stop` receives them.
fn block_stop_signals() {
    let set = stop_signals();
    // SAFETY: changes this thread's signal mask only.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
}

/// Returns on SIGINT or SIGTERM (Ok), or when a shard stops on its own (Err).
fn wait_for_stop(events: &mpsc::Receiver<ShardEvent>) -> Result<(), String> {
    let set = stop_signals();
    let timeout = libc::timespec { tv_sec: 0, tv_nsec: 100_000_000 };
    loop {
        // SAFETY: waits on the blocked set; the info pointer may be null.
        let signal = unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &timeout) };
        if signal == libc::SIGINT || signal == libc::SIGTERM {
            eprintln!(
                "pyralog: received {}, stopping",
                if signal == libc::SIGINT { "SIGINT" } else { "SIGTERM" }
            );
            return Ok(());
        }
        match events.try_recv() {
            Ok(ShardEvent::Stopped { shard, error }) => {
                return Err(format!("shard {shard} stopped unexpectedly: {}", error.unwrap_or_default()));
            }
            Ok(_) | Err(mpsc::TryRecvError::Empty) => {}
            Err(mpsc::TryRecvError::Disconnected) => return Err("every shard stopped".to_owned()),
        }
    }
}

fn print_summary(
    args: &NodeArgs,
    identity: &identity::NodeMeta,
    cluster_plan: Option<&ClusterPlan>,
    shards: &[ShardInfo],
    kafka_ports: &[u16],
    io_memory_bytes: usize,
    metrics_port: u16,
) {
    let placement: Vec<String> =
        shards.iter().map(|s| format!("shard {} on CPU {} port {}", s.shard, s.cpu, s.port)).collect();
    let durability = match args.durability {
        DurabilityArg::Sync => "sync (acknowledged after fdatasync, group commit)".to_owned(),
        DurabilityArg::Cached => format!(
            "cached (acknowledged from memory; flushed every {} ms or {} bytes)",
            args.flush_interval_ms, args.flush_bytes
        ),
    };
    println!("pyralog {}", env!("CARGO_PKG_VERSION"));
    println!("  shards      {} ({})", shards.len(), placement.join(", "));
    println!("  listen      {} (native protocol, shared by all shards)", args.listen);
    let (host, port) = args.kafka_advertised().unwrap_or_default();
    println!(
        "  kafka       {} (Kafka protocol, shared by all shards; advertised as {host}:{port}; auto-create topics {})",
        args.kafka_listen,
        if args.auto_create_topics { "on" } else { "off" }
    );
    let brokers: Vec<String> = kafka_ports
        .iter()
        .enumerate()
        .map(|(shard, port)| format!("broker {shard} at {host}:{port}"))
        .collect();
    println!(
        "  kafka shards {} (each shard a Kafka broker: partition leaders are their shards)",
        brokers.join(", ")
    );
    let cluster = identity.cluster_id.map_or("none".to_owned(), |id| identity::hex(&id));
    match cluster_plan {
        None => println!("  node        {} of cluster {cluster} (a cluster of one)", identity.node_id),
        Some(plan) => {
            let seeds: Vec<String> =
                plan.seeds.iter().map(|s| format!("{}@{}", s.node_id, s.address)).collect();
            println!(
                "  node        {} of cluster {cluster}; seeds {}; cluster listen {} (advertised {}, shard i on port + i){}",
                identity.node_id,
                seeds.join(","),
                plan.listen,
                plan.advertise,
                plan.rack.as_ref().map_or(String::new(), |r| format!("; rack {r}"))
            );
        }
    }
    println!("  data dir    {}", args.data_dir.display());
    println!("  durability  {durability}");
    println!(
        "  limits      segment {} B, cache {} B per shard, request {} B, io memory {} B per shard",
        args.segment_bytes, args.cache_bytes, args.max_request_bytes, io_memory_bytes
    );
    println!("  disk buffers {}", huge_pages_summary());
    let metrics = SocketAddr::new(args.metrics_listen.ip(), metrics_port);
    println!("  metrics     http://{metrics}/metrics (Prometheus; also /health and /config)");
    let source = args
        .config
        .as_ref()
        .map_or("defaults and flags".to_owned(), |path| format!("{}, then flags", path.display()));
    println!("  config      from {source}: {}", settings_line(args));
    // Last, so that whoever waits for it has read the whole summary.
    println!("pyralog: ready, {} shards serving", shards.len());
}

/// Every setting as `key=value`, the keys a --config file takes.
fn settings_line(args: &NodeArgs) -> String {
    let value = serde_json::to_value(args).expect("the settings serialize");
    let serde_json::Value::Object(map) = value else { unreachable!("NodeArgs is a struct") };
    let settings: Vec<String> = map
        .iter()
        .filter(|(key, value)| !value.is_null() && key.as_str() != "config")
        .map(|(key, value)| match value {
            serde_json::Value::String(text) => format!("{key}={text}"),
            other => format!("{key}={other}"),
        })
        .collect();
    settings.join(" ")
}

/// Whether the disk buffers can be on huge pages (`pyralog_dma::huge`): the kernel's
/// transparent huge page mode, the bracketed word of the sysfs file.
fn huge_pages_summary() -> String {
    const MODE: &str = "/sys/kernel/mm/transparent_hugepage/enabled";
    let text = std::fs::read_to_string(MODE).unwrap_or_default();
    let mode = text.split_whitespace().find_map(|word| word.strip_prefix('[')?.strip_suffix(']'));
    match mode {
        Some(mode @ ("always" | "madvise")) => format!("on 2 MiB transparent huge pages ({MODE}: {mode})"),
        Some(mode) => format!(
            "on 4 KiB pages: transparent huge pages are off ({MODE}: {mode}); reads from disk are \
             slower, set it to madvise to speed them up"
        ),
        None => format!("on 4 KiB pages: transparent huge pages are unavailable (no {MODE})"),
    }
}
