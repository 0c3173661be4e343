//! The daemon's side of a cluster: the node's cluster flags resolved, the cluster id learned
//! or created at start-up, each shard's cluster transport bound and wired to its replicas,
//! and the node registered with the controller once it serves.
//!
//! Cluster id. A node that has none asks the other seeds before its shards start, answering
//! their questions meanwhile (`identity::answer_queries` on its shard 0's cluster port): it
//! adopts the first id a seed tells it; the lowest seed creates one only when every other seed
//! answered that it has none (a cluster that never ran); a node that is not a seed waits for a
//! seed that has one. So a seed that lost its data directory rejoins its cluster rather than
//! founding another.
//!
//! Nodes that are not seeds. A node not in --seeds is a broker: it holds replicas and serves
//! clients like any node but has no controller replica; its shard 0 follows the metadata from
//! the seeds ([`PeerRequest::Metadata`], long-polled) and forwards its controller requests to
//! the leader they name. It needs --cluster-listen (the seeds do not name it), and registers
//! through the controller like every node, after which placement uses it.
//!
//! Routing. A replica's message goes to the peer node's shard that owns the partition there
//! (`topics::owner_shard` with that node's shard count), at the node's registered cluster
//! address plus the shard index; the controller's messages go to the seeds' shard 0, at the
//! addresses in --seeds (known before any node registered).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::rc::{Rc, Weak};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use pyralog_net::cluster::frame::REQUEST_BODY_BYTES_MAX;
use pyralog_net::cluster::identity;
use pyralog_net::cluster::transport::{ClusterConfig, ClusterTransport, PeerAddress};
use pyralog_net::cluster::{ClusterId, GroupKey};
use pyralog_shard::{
    ClusterSettings, ControllerRequest, MetadataAnswer, SendHook, Shard, ShardError, CONTROLLER_TOPIC_ID,
    METADATA_WAIT, NODE_HEARTBEAT_INTERVAL,
};

use crate::identity::Seed;
use crate::NodeArgs;

/// How long a node without a cluster id waits for the seeds to tell it one.
const CLUSTER_ID_WAIT: Duration = Duration::from_secs(300);
/// How long one query to a seed may take.
const CLUSTER_ID_QUERY_TIMEOUT: Duration = Duration::from_millis(500);
/// How often the waiting node says what it waits for.
const CLUSTER_ID_PROGRESS_INTERVAL: Duration = Duration::from_secs(5);
/// Kafka broker ids are node id × this + shard: unique across the cluster.
pub const BROKER_IDS_PER_NODE: i32 = 1000;
/// Node ids keep broker ids within Kafka's int32.
pub const NODE_ID_MAX: u32 = (i32::MAX / BROKER_IDS_PER_NODE) as u32 - 1;
/// Shards of a node keep broker ids of nodes apart.
pub const SHARDS_MAX: usize = BROKER_IDS_PER_NODE as usize;

/// The node's cluster flags, resolved and checked.
#[derive(Debug, Clone)]
pub struct ClusterPlan {
    pub node_id: u32,
    pub seeds: Vec<Seed>,
    /// Shard 0's cluster address; shard i listens on its port + i.
    pub listen: SocketAddr,
    /// Where peers reach shard 0 (HOST:PORT).
    pub advertise: String,
    pub rack: Option<String>,
    pub settings: ClusterSettings,
}

impl ClusterPlan {
    /// The cluster plan of a node started with `--seeds`.
    pub fn new(args: &NodeArgs, node_id: u32, seeds: Vec<Seed>) -> Result<ClusterPlan> {
        if node_id > NODE_ID_MAX {
            bail!("--node-id {node_id} is above {NODE_ID_MAX} (Kafka broker ids are node id × 1000 + shard)");
        }
        let own_seed = seeds.iter().find(|s| s.node_id == node_id);
        let listen = match (args.cluster_listen, own_seed) {
            (Some(listen), _) => listen,
            (None, Some(seed)) => resolve(&seed.address)
                .with_context(|| format!("--seeds names this node ({node_id}) at {}", seed.address))?,
            (None, None) => bail!(
                "node {node_id} is not in --seeds, so it joins the cluster as a broker: give it \
                 --cluster-listen HOST:PORT, where the other nodes reach it"
            ),
        };
        let advertise = match (&args.cluster_advertise, own_seed) {
            (Some(advertise), _) => advertise.clone(),
            (None, Some(seed)) => seed.address.clone(),
            (None, None) if listen.ip().is_unspecified() => bail!(
                "--cluster-listen {listen} is every address, which peers cannot connect to: say where they \
                 reach this node with --cluster-advertise HOST:PORT"
            ),
            (None, None) => listen.to_string(),
        };
        if let Some(rack) = &args.rack {
            check_rack(rack)?;
        }
        if args.heartbeat_interval_ms >= args.election_timeout_ms {
            bail!(
                "--election-timeout-ms {} must be longer than --heartbeat-interval-ms {}",
                args.election_timeout_ms,
                args.heartbeat_interval_ms
            );
        }
        let tick_ms = RAFT_TICK.as_millis() as u64;
        let settings = ClusterSettings {
            node_id,
            seeds: seeds.iter().map(|s| s.node_id).collect(),
            tick: RAFT_TICK,
            heartbeat_ticks: args.heartbeat_interval_ms.div_ceil(tick_ms).max(1) as u32,
            election_ticks: args.election_timeout_ms.div_ceil(tick_ms).max(2) as u32,
            default_replication_factor: args.default_replication_factor,
            offsets_replication_factor: args.offsets_topic_replication_factor,
            replica_lag_time_max: Duration::from_millis(args.replica_lag_time_max_ms),
            incarnation: 0,
            controller_disk_lost: false,
            recovery_bytes_per_sec: args.recovery_bytes_per_sec,
            controller_segment_bytes: args.controller_segment_bytes,
        };
        Ok(ClusterPlan { node_id, seeds, listen, advertise, rack: args.rack.clone(), settings })
    }

    /// Shard `shard`'s cluster address.
    pub fn shard_listen(&self, shard: usize) -> SocketAddr {
        SocketAddr::new(
            self.listen.ip(),
            if self.listen.port() == 0 { 0 } else { self.listen.port() + shard as u16 },
        )
    }
}

/// One tick of every replica's clock; the heartbeat and election timeouts are whole ticks.
pub const RAFT_TICK: Duration = Duration::from_millis(10);

/// Longest rack name (it is sent to peers and shown in metadata).
pub const RACK_BYTES_MAX: usize = 64;

fn check_rack(rack: &str) -> Result<()> {
    if rack.is_empty() || rack.len() > RACK_BYTES_MAX || !rack.chars().all(|c| c.is_ascii_graphic()) {
        bail!("--rack takes 1 to {RACK_BYTES_MAX} printable characters without spaces, not '{rack}'");
    }
    Ok(())
}

fn resolve(address: &str) -> Result<SocketAddr> {
    address
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve {address}"))?
        .next()
        .ok_or_else(|| anyhow!("{address} resolves to no address"))
}

/// The cluster id of a node that has none stored, learned from the seeds or created (see
/// the module docs), and whether this node's controller replica lost its data: it adopted the
/// id of a cluster whose controller already had a term (it ran without this node's data).
/// Blocks until the seeds answer, up to [`CLUSTER_ID_WAIT`].
pub fn learn_cluster_id(plan: &ClusterPlan) -> Result<(ClusterId, bool)> {
    let others: Vec<&Seed> = plan.seeds.iter().filter(|s| s.node_id != plan.node_id).collect();
    let is_seed = others.len() < plan.seeds.len();
    let lowest_seed = is_seed && others.iter().all(|s| s.node_id > plan.node_id);
    // Answer the other seeds' questions while asking ours: they may be waiting on us.
    let stop = Arc::new(AtomicBool::new(false));
    let answering = match pyralog_net::ports::bind(plan.listen, pyralog_net::ports::Sharing::Exclusive) {
        Ok(listener) => {
            let (stop, node) = (Arc::clone(&stop), plan.node_id);
            Some(std::thread::spawn(move || identity::answer_queries(listener, node, None, &stop)))
        }
        Err(error) => bail!("cannot listen on --cluster-listen {}: {error}", plan.listen),
    };
    let outcome = ask_seeds(plan, &others, lowest_seed);
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    if let Some(thread) = answering {
        let _ = thread.join();
    }
    outcome
}

fn ask_seeds(plan: &ClusterPlan, others: &[&Seed], lowest_seed: bool) -> Result<(ClusterId, bool)> {
    let started = Instant::now();
    let mut said = Instant::now();
    loop {
        let mut fresh = 0;
        let mut waiting_for = Vec::new();
        for seed in others {
            let answer = resolve(&seed.address).and_then(|addr| {
                identity::query_cluster_id(addr, plan.node_id, seed.node_id, CLUSTER_ID_QUERY_TIMEOUT)
                    .map_err(|e| anyhow!("{e}"))
            });
            match answer {
                Ok((Some(id), controller_term)) => return Ok((id, controller_term > 0 && is_seed(plan))),
                Ok((None, _)) => fresh += 1,
                Err(error) => waiting_for.push(format!("{}@{} ({error})", seed.node_id, seed.address)),
            }
        }
        if lowest_seed && fresh == others.len() {
            return Ok((crate::identity::new_cluster_id()?, false));
        }
        if started.elapsed() > CLUSTER_ID_WAIT {
            bail!(
                "no seed told this node its cluster id within {CLUSTER_ID_WAIT:?}; unreachable: {}",
                waiting_for.join(", ")
            );
        }
        if said.elapsed() >= CLUSTER_ID_PROGRESS_INTERVAL {
            said = Instant::now();
            let why = if waiting_for.is_empty() {
                "the lowest seed to create it".to_owned()
            } else {
                format!("seeds {}", waiting_for.join(", "))
            };
            println!("pyralog: node {} waits for {why} to learn its cluster id", plan.node_id);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn is_seed(plan: &ClusterPlan) -> bool {
    plan.seeds.iter().any(|s| s.node_id == plan.node_id)
}

/// Starts shard `shard`'s transport and connects it to the shard's replicas.
pub fn start_transport(
    plan: &ClusterPlan,
    cluster_id: ClusterId,
    shard: &Rc<Shard>,
) -> std::io::Result<Rc<ClusterTransport>> {
    let config = ClusterConfig::new(
        plan.node_id,
        shard.id as u16,
        plan.shard_listen(shard.id),
        Rc::new(Cell::new(Some(cluster_id))),
    );
    let controller_term = Rc::clone(&config.controller_term);
    let transport = ClusterTransport::start(config)?;
    if shard.id == 0 {
        // Shard 0 answers the seeds' identity queries: tell them the controller's term.
        let watched = Rc::downgrade(shard);
        glommio::spawn_local(async move {
            while let Some(shard) = watched.upgrade() {
                if let Some(role) = shard.replica_role(CONTROLLER_TOPIC_ID, 0) {
                    controller_term.set(role.term);
                }
                drop(shard);
                glommio::timer::sleep(Duration::from_millis(50)).await;
            }
        })
        .detach();
    }
    let seeds: HashMap<u32, String> = plan.seeds.iter().map(|s| (s.node_id, s.address.clone())).collect();
    shard.set_cluster_send(send_hook(Rc::downgrade(shard), Rc::clone(&transport), seeds));
    if shard.id == 0 {
        serve_controller_requests(plan, shard, &transport);
    }
    let lost_by = Rc::downgrade(shard);
    transport.set_peer_lost_hook(Rc::new(move |node| {
        if let Some(shard) = lost_by.upgrade() {
            shard.cluster_peer_lost(node);
        }
    }));
    let (receiving, into) = (Rc::clone(&transport), Rc::clone(shard));
    glommio::spawn_local(async move {
        while let Some(received) = receiving.recv().await {
            into.deliver(received.key.topic_id, received.key.partition, received.message).await;
        }
    })
    .detach();
    Ok(transport)
}

/// How long a request forwarded to the controller's leader may take.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a request for the metadata may take beyond the seed's hold ([`METADATA_WAIT`]).
const METADATA_TIMEOUT_SLACK: Duration = Duration::from_secs(1);

/// What a node asks another node's shard 0 over the cluster transport; JSON bodies.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
enum PeerRequest {
    /// Make this change if you lead the controller. Answer: `Result<i64, ShardError>`, the
    /// controller log's offset after the change.
    Controller(ControllerRequest),
    /// Your metadata if newer than `applied_end` (a seed holds the request up to
    /// [`METADATA_WAIT`] for some). Answer: `Result<MetadataAnswer, ShardError>`.
    Metadata { applied_end: i64 },
    /// To a seed: the sending node is up (the transport names it). Answer: `Result<(), ShardError>`.
    Heartbeat,
}

/// Sends `request` to `node`'s shard 0 at `address` and decodes its JSON answer; the outer
/// error (what went wrong, for the caller to try another node) when it cannot be reached,
/// does not answer in time or answers what does not decode.
async fn ask_peer<T: serde::de::DeserializeOwned>(
    transport: &ClusterTransport,
    node: u32,
    address: Option<&String>,
    request: &PeerRequest,
    timeout: Duration,
) -> Result<Result<T, ShardError>, String> {
    let addr = address
        .ok_or_else(|| format!("node {node} has no known cluster address"))
        .and_then(|a| resolve(a).map_err(|e| e.to_string()))?;
    let body = Bytes::from(serde_json::to_vec(request).expect("requests serialize"));
    let peer = PeerAddress { node, shard: 0, addr };
    let answer = transport.request(peer, body, timeout).await.map_err(|error| error.to_string())?;
    serde_json::from_slice::<Result<T, ShardError>>(&answer)
        .map_err(|error| format!("node {node} answered with bad JSON: {error}"))
}

/// Shard 0: forwards controller requests to the controller's leader (a seed, at its --seeds
/// address), asks the seeds for the metadata if this node is not one, and answers what other
/// nodes ask (see [`PeerRequest`]).
fn serve_controller_requests(plan: &ClusterPlan, shard: &Rc<Shard>, transport: &Rc<ClusterTransport>) {
    let seeds: Rc<HashMap<u32, String>> =
        Rc::new(plan.seeds.iter().map(|s| (s.node_id, s.address.clone())).collect());
    let (forwarding, addresses) = (Rc::clone(transport), Rc::clone(&seeds));
    shard.set_cluster_forward(Rc::new(move |node, request| {
        let (transport, addresses) = (Rc::clone(&forwarding), Rc::clone(&addresses));
        Box::pin(async move {
            let request = PeerRequest::Controller(request);
            match ask_peer(&transport, node, addresses.get(&node), &request, FORWARD_TIMEOUT).await {
                Ok(answer) => answer,
                Err(error) => {
                    // The leader moved, or cannot be reached: the caller retries with the
                    // leader it hears of next.
                    eprintln!("pyralog: forwarding a controller request to node {node}: {error}");
                    Err(ShardError::NotController { leader: None, term: -1 })
                }
            }
        })
    }));
    {
        let (asking, addresses) = (Rc::clone(transport), Rc::clone(&seeds));
        shard.set_metadata_source(Rc::new(move |node, applied_end| {
            let (transport, addresses) = (Rc::clone(&asking), Rc::clone(&addresses));
            Box::pin(async move {
                let request = PeerRequest::Metadata { applied_end };
                let timeout = METADATA_WAIT + METADATA_TIMEOUT_SLACK;
                ask_peer(&transport, node, addresses.get(&node), &request, timeout)
                    .await
                    .map_err(ShardError::Unavailable)?
            })
        }));
    }
    // Tells every seed, this one too, that this node is up (see `replicated`'s liveness).
    let (beating, me, addresses, weak) =
        (Rc::clone(transport), plan.node_id, Rc::clone(&seeds), Rc::downgrade(shard));
    glommio::spawn_local(async move {
        while let Some(shard) = weak.upgrade() {
            for (&seed, address) in addresses.iter() {
                if seed == me {
                    shard.note_node_heard(me);
                    continue;
                }
                let (transport, address) = (Rc::clone(&beating), address.clone());
                glommio::spawn_local(async move {
                    let request = PeerRequest::Heartbeat;
                    // Unanswered: the seed counts this node down after a session timeout.
                    let _ = ask_peer::<()>(
                        &transport,
                        seed,
                        Some(&address),
                        &request,
                        NODE_HEARTBEAT_INTERVAL * 2,
                    )
                    .await;
                })
                .detach();
            }
            drop(shard);
            glommio::timer::sleep(NODE_HEARTBEAT_INTERVAL).await;
        }
    })
    .detach();
    let (serving, into) = (Rc::clone(transport), Rc::clone(shard));
    glommio::spawn_local(async move {
        while let Some(incoming) = serving.recv_request().await {
            let (transport, shard) = (Rc::clone(&serving), Rc::clone(&into));
            glommio::spawn_local(async move {
                let body = match serde_json::from_slice::<PeerRequest>(&incoming.body) {
                    Ok(PeerRequest::Controller(request)) => {
                        serde_json::to_vec(&shard.handle_controller_request(request).await)
                    }
                    Ok(PeerRequest::Metadata { applied_end }) => {
                        metadata_answer(shard.read_metadata(applied_end, METADATA_WAIT).await)
                    }
                    Ok(PeerRequest::Heartbeat) => {
                        shard.note_node_heard(incoming.from_node);
                        serde_json::to_vec(&Ok::<(), ShardError>(()))
                    }
                    Err(error) => serde_json::to_vec(&Err::<(), _>(ShardError::InvalidConfig(format!(
                        "node {} sent a request that does not decode: {error}",
                        incoming.from_node
                    )))),
                };
                let body = Bytes::from(body.expect("answers serialize"));
                if let Err(error) = transport.respond(&incoming, body) {
                    eprintln!("pyralog: answering node {}'s controller request: {error}", incoming.from_node);
                }
            })
            .detach();
        }
    })
    .detach();
}

/// A metadata answer's body, or an error naming the limit if the metadata is too large for
/// one response.
fn metadata_answer(answer: Result<MetadataAnswer, ShardError>) -> serde_json::Result<Vec<u8>> {
    let body = serde_json::to_vec(&answer)?;
    if body.len() <= REQUEST_BODY_BYTES_MAX {
        return Ok(body);
    }
    serde_json::to_vec(&Err::<MetadataAnswer, _>(ShardError::Storage(format!(
        "the cluster's metadata is {} bytes of JSON, more than one answer carries \
         (REQUEST_BODY_BYTES_MAX, {REQUEST_BODY_BYTES_MAX}): make this node a seed",
        body.len()
    ))))
}

/// Where a peer node's shard 0 listens and how many shards it has, as last resolved.
struct Route {
    version: i64,
    addr: SocketAddr,
    shards: u32,
}

fn send_hook(shard: Weak<Shard>, transport: Rc<ClusterTransport>, seeds: HashMap<u32, String>) -> SendHook {
    let routes: RefCell<HashMap<u32, Route>> = RefCell::new(HashMap::new());
    Rc::new(move |address, message| {
        let Some(shard) = shard.upgrade() else { return };
        let to = message.to;
        let controller = address.topic_id == CONTROLLER_TOPIC_ID;
        let version = if controller { -1 } else { shard.cluster_version() };
        let mut routes = routes.borrow_mut();
        let stale = routes.get(&to).is_none_or(|r| r.version != version);
        if stale {
            let found = if controller {
                seeds.get(&to).and_then(|a| resolve(a).ok()).map(|addr| (addr, 1))
            } else {
                shard.cluster_node(to).and_then(|n| Some((resolve(&n.cluster_address).ok()?, n.shards)))
            };
            // A peer not known yet (not registered): Raft sends again later.
            let Some((addr, shards)) = found else { return };
            routes.insert(to, Route { version, addr, shards });
        }
        let route = &routes[&to];
        let peer_shard = if controller {
            0
        } else {
            pyralog_shard::topics::owner_shard(&address.topic, address.partition, route.shards as usize)
        };
        let addr = SocketAddr::new(route.addr.ip(), route.addr.port() + peer_shard as u16);
        let peer = PeerAddress { node: to, shard: peer_shard as u16, addr };
        transport.send(peer, GroupKey { topic_id: address.topic_id, partition: address.partition }, message);
    })
}

/// This node as the controller registers it: its cluster address, shards, rack and where
/// clients reach it.
pub fn node_info(
    plan: &ClusterPlan,
    topology: &crate::service::Topology,
    kafka: &crate::kafka::KafkaSettings,
    native_listen: SocketAddr,
    metrics_address: SocketAddr,
) -> pyralog_shard::cluster::NodeInfo {
    pyralog_shard::cluster::NodeInfo {
        id: plan.node_id,
        cluster_address: plan.advertise.clone(),
        shards: topology.shards.len() as u32,
        rack: plan.rack.clone(),
        native_host: native_listen.ip().to_string(),
        native_port: native_listen.port(),
        native_shard_ports: topology.shards.iter().map(|s| s.port).collect(),
        kafka_host: kafka.advertised_host.clone(),
        kafka_port: kafka.advertised_port,
        kafka_shard_ports: topology.kafka_ports.clone(),
        metrics_address: Some(metrics_address.to_string()),
        incarnation: plan.settings.incarnation,
        // Set by the controller when it applies the registration.
        registered_at: 0,
    }
}
