//! Three nodes of a cluster in one process: each a `Shard` on its own executor thread, with
//! its own data directory; their replicas' messages and their controller requests travel over
//! in-memory queues in place of the daemon's transport. What this proves: the controller
//! elects a leader, registers nodes, creates replicated topics from any node, every node opens
//! its replicas, and produce and fetch go through the partition's leader, with every replica
//! holding the same bytes; a consumer group's coordinator follows the leader of its offsets
//! partition; a follower promoted to leader recognises an idempotent producer's retry.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use pyralog_dma::LogConfig;
use pyralog_replication::Message;
use pyralog_shard::cluster::NodeInfo;
use pyralog_shard::{
    Acks, ClusterSettings, CommitRequest, ControllerRequest, Durability, FetchLimits, Fetched, GroupConfig,
    GroupError, GroupOp, GroupReply, Shard, ShardConfig, ShardError, OFFSETS_TOPIC,
};

type Work = Box<dyn FnOnce(Rc<Shard>) -> Pin<Box<dyn Future<Output = ()>>> + Send>;
type Reply = Arc<Mutex<Option<Result<i64, ShardError>>>>;

/// What one node receives: replica messages, forwarded controller requests, and test work.
#[derive(Default)]
struct Inbox {
    messages: VecDeque<([u8; 16], u32, Message)>,
    requests: VecDeque<(ControllerRequest, Reply)>,
    work: VecDeque<Work>,
    stop: bool,
}

type Inboxes = Arc<Vec<Mutex<Inbox>>>;

const NODES: u32 = 3;

fn node_info(id: u32) -> NodeInfo {
    NodeInfo {
        id,
        cluster_address: format!("127.0.0.{id}:9100"),
        shards: 1,
        rack: None,
        native_host: format!("127.0.0.{id}"),
        native_port: 7070,
        native_shard_ports: vec![7071],
        kafka_host: format!("127.0.0.{id}"),
        kafka_port: 9092,
        kafka_shard_ports: vec![9093],
        metrics_address: None,
        incarnation: 1,
        registered_at: 0,
    }
}

/// Runs node `id` until told to stop.
fn run_node(id: u32, dir: std::path::PathBuf, inboxes: Inboxes) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let executor = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
            .io_memory(1 << 20)
            .make()
            .expect("executor");
        executor.run(async move {
            let config = ShardConfig {
                data_dir: dir,
                durability: Durability::Sync,
                log: LogConfig { segment_bytes: 1 << 20, ..LogConfig::default() },
                retention_check_interval: Duration::from_secs(30),
                cache_bytes: 8 << 20,
                groups: GroupConfig::default(),
                cluster: Some(ClusterSettings {
                    node_id: id,
                    seeds: (1..=NODES).collect(),
                    tick: Duration::from_millis(5),
                    heartbeat_ticks: 2,
                    election_ticks: 10,
                    default_replication_factor: None,
                    offsets_replication_factor: None,
                    replica_lag_time_max: Duration::from_secs(10),
                    incarnation: 1,
                    controller_disk_lost: false,
                    recovery_bytes_per_sec: 0,
                    controller_segment_bytes: 1 << 20,
                }),
            };
            let shard = Shard::start(pyralog_shard::new_mesh(1), config).await.expect("the shard starts");
            let sending = Arc::clone(&inboxes);
            shard.set_cluster_send(Rc::new(move |address, message| {
                let to = message.to as usize - 1;
                sending[to].lock().unwrap().messages.push_back((
                    address.topic_id,
                    address.partition,
                    message,
                ));
            }));
            let forwarding = Arc::clone(&inboxes);
            shard.set_cluster_forward(Rc::new(move |node, request| {
                let reply: Reply = Arc::new(Mutex::new(None));
                forwarding[node as usize - 1]
                    .lock()
                    .unwrap()
                    .requests
                    .push_back((request, Arc::clone(&reply)));
                Box::pin(async move {
                    loop {
                        if let Some(answer) = reply.lock().unwrap().take() {
                            return answer;
                        }
                        glommio::timer::sleep(Duration::from_millis(1)).await;
                    }
                })
            }));
            let registering = Rc::clone(&shard);
            glommio::spawn_local(async move {
                registering.register_node(node_info(id)).await.expect("the node registers");
            })
            .detach();
            loop {
                let (messages, requests, work, stop) = {
                    let mut inbox = inboxes[id as usize - 1].lock().unwrap();
                    let messages: Vec<_> = inbox.messages.drain(..).collect();
                    let requests: Vec<_> = inbox.requests.drain(..).collect();
                    let work: Vec<_> = inbox.work.drain(..).collect();
                    (messages, requests, work, inbox.stop)
                };
                if stop {
                    break;
                }
                for (topic_id, partition, message) in messages {
                    shard.deliver(topic_id, partition, message).await;
                }
                for (request, reply) in requests {
                    let shard = Rc::clone(&shard);
                    glommio::spawn_local(async move {
                        let answer = shard.handle_controller_request(request).await;
                        *reply.lock().unwrap() = Some(answer);
                    })
                    .detach();
                }
                for work in work {
                    glommio::spawn_local(work(Rc::clone(&shard))).detach();
                }
                glommio::timer::sleep(Duration::from_micros(300)).await;
            }
            shard.shutdown().await.expect("a clean shutdown");
        });
    })
}

struct Cluster {
    inboxes: Inboxes,
    /// By node id - 1; None once the node was stopped.
    threads: Vec<Option<std::thread::JoinHandle<()>>>,
    dirs: Arc<Vec<tempfile::TempDir>>,
}

impl Cluster {
    fn start() -> Cluster {
        let inboxes: Inboxes = Arc::new((0..NODES).map(|_| Mutex::new(Inbox::default())).collect());
        let dirs: Vec<tempfile::TempDir> = (0..NODES).map(|_| tempfile::tempdir().unwrap()).collect();
        let threads = (1..=NODES)
            .map(|id| Some(run_node(id, dirs[id as usize - 1].path().to_path_buf(), Arc::clone(&inboxes))))
            .collect();
        Cluster { inboxes, threads, dirs: Arc::new(dirs) }
    }

    /// Runs `work` on node `id`'s shard and returns its result.
    fn on<T: Send + 'static>(
        &self,
        id: u32,
        work: impl FnOnce(Rc<Shard>) -> Pin<Box<dyn Future<Output = T>>> + Send + 'static,
    ) -> T {
        let (sender, receiver) = std::sync::mpsc::channel();
        let work: Work = Box::new(move |shard| {
            let future = work(shard);
            Box::pin(async move {
                let _ = sender.send(future.await);
            })
        });
        self.inboxes[id as usize - 1].lock().unwrap().work.push_back(work);
        receiver.recv_timeout(Duration::from_secs(30)).expect("the work finishes")
    }

    /// Stops node `id` without handing its leaderships over: the others elect new leaders
    /// after their election timeout, as after a crash.
    fn stop_node(&mut self, id: u32) {
        self.inboxes[id as usize - 1].lock().unwrap().stop = true;
        let thread = self.threads[id as usize - 1].take().expect("the node runs");
        thread.join().expect("the node stops cleanly");
    }

    /// Starts node `id` again on its data directory.
    fn restart_node(&mut self, id: u32) {
        assert!(self.threads[id as usize - 1].is_none(), "node {id} is stopped");
        *self.inboxes[id as usize - 1].lock().unwrap() = Inbox::default();
        let dir = self.dirs[id as usize - 1].path().to_path_buf();
        self.threads[id as usize - 1] = Some(run_node(id, dir, Arc::clone(&self.inboxes)));
    }

    fn running(&self) -> Vec<u32> {
        (1..=NODES).filter(|id| self.threads[*id as usize - 1].is_some()).collect()
    }

    fn stop(self) {
        for inbox in self.inboxes.iter() {
            inbox.lock().unwrap().stop = true;
        }
        for thread in self.threads.into_iter().flatten() {
            thread.join().expect("the node stops cleanly");
        }
    }
}

fn batch(value: &str) -> Bytes {
    Bytes::from(pyralog_replication::batch::build(&[(Some(b"k".as_slice()), value.as_bytes())], 0, 1000))
}

/// Retries `attempt` while the cluster is still electing or applying.
fn eventually<T>(mut attempt: impl FnMut() -> Result<T, ShardError>) -> T {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        match attempt() {
            Ok(value) => return value,
            Err(error) if std::time::Instant::now() < deadline => {
                let _ = error;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(error) => panic!("still failing after 20 s: {error}"),
        }
    }
}

#[test]
fn a_replicated_topic_created_on_any_node_serves_through_its_leaders() {
    let cluster = Cluster::start();
    let cluster_dirs = cluster.dirs.clone();
    // Created through node 2, whichever node leads the controller.
    eventually(|| {
        let config = pyralog_shard::topics::TopicConfig { replication_factor: Some(3), ..Default::default() };
        cluster.on(2, move |shard| Box::pin(async move { shard.create_topic("orders", 2, config).await }))
    });
    // Every node knows the topic and holds a replica of each partition.
    for id in 1..=NODES {
        let partitions = eventually(|| {
            cluster.on(id, |shard| {
                Box::pin(async move {
                    shard.topics().get("orders").ok_or(ShardError::UnknownTopic("orders".into()))
                })
            })
        });
        assert_eq!(partitions, 2);
    }
    let mut acknowledged = Vec::new();
    for i in 0..20 {
        let value = format!("record-{i}");
        let partition = i % 2;
        // The leader is whichever node accepts: the others answer NotLeader.
        let produced = eventually(|| {
            let mut last = None;
            for id in 1..=NODES {
                let value = value.clone();
                let result = cluster.on(id, move |shard| {
                    Box::pin(
                        async move { shard.produce("orders", partition, batch(&value), Acks::All).await },
                    )
                });
                match result {
                    Ok(produced) => return Ok(produced),
                    Err(error @ ShardError::NotLeader { .. }) => last = Some(error),
                    Err(error) => return Err(error),
                }
            }
            Err(last.expect("three nodes answered"))
        });
        acknowledged.push((partition, produced.base_offset, value));
    }
    // The leader of each partition serves the committed records; the others refuse.
    for partition in 0..2u32 {
        let expected: Vec<(i64, String)> = acknowledged
            .iter()
            .filter(|(p, _, _)| *p == partition)
            .map(|(_, offset, value)| (*offset, value.clone()))
            .collect();
        let mut served = 0;
        for id in 1..=NODES {
            let fetched = fetch_on(&cluster, id, "orders", partition);
            match fetched {
                Ok(fetched) => {
                    assert_eq!(values_of(&fetched.records), expected, "node {id} partition {partition}");
                    served += 1;
                }
                Err(ShardError::NotLeader { .. }) => {}
                Err(error) => panic!("node {id} partition {partition}: {error}"),
            }
        }
        assert_eq!(served, 1, "exactly the leader serves partition {partition}");
    }
    cluster.stop();
    // Every replica holds the same batches (each log's, up to the shortest of them: a follower
    // may lack the last batch, and a file ends in the zeros of its last block).
    for partition in 0..2 {
        let logs: Vec<Vec<Vec<u8>>> = (0..NODES as usize)
            .map(|i| {
                let path = cluster_dirs[i]
                    .path()
                    .join(format!("topics/orders/{partition}/00000000000000000000.log"));
                stored_batches(&std::fs::read(path).unwrap())
            })
            .collect();
        let shortest = logs.iter().map(|l| l.len()).min().unwrap();
        for (i, log) in logs.iter().enumerate() {
            assert!(log[..shortest] == logs[0][..shortest], "node {} partition {partition} differs", i + 1);
        }
    }
}

/// The whole batches at the start of a segment file's bytes.
fn stored_batches(bytes: &[u8]) -> Vec<Vec<u8>> {
    let mut batches = Vec::new();
    let mut at = 0;
    while let Some(header) = pyralog_dma::batch::stored_header(&bytes[at..]) {
        let Some(batch) = bytes.get(at..at + header.total_bytes as usize) else { break };
        batches.push(batch.to_vec());
        at += header.total_bytes as usize;
    }
    batches
}

/// Fetches `topic`/`partition` from its start on node `id`.
fn fetch_on(cluster: &Cluster, id: u32, topic: &'static str, partition: u32) -> Result<Fetched, ShardError> {
    cluster.on(id, move |shard| {
        Box::pin(async move {
            let limits = FetchLimits {
                max_bytes: 1 << 20,
                min_one_batch: true,
                min_bytes: 1,
                max_wait: Duration::from_millis(100),
                current_leader_epoch: -1,
            };
            shard.fetch(topic, partition, 0, limits).await
        })
    })
}

/// (offset, value) of every data record in `chunks`, skipping control batches.
fn values_of(chunks: &[Bytes]) -> Vec<(i64, String)> {
    let mut values = Vec::new();
    for chunk in chunks {
        let mut at = 0;
        while let Some(header) = pyralog_dma::batch::stored_header(&chunk[at..]) {
            let bytes = &chunk[at..at + header.total_bytes as usize];
            at += header.total_bytes as usize;
            if header.attributes & 0x20 != 0 {
                continue;
            }
            let (_, value) = pyralog_replication::batch::first_record(bytes).expect("a record");
            values.push((header.base_offset, String::from_utf8(value.to_vec()).unwrap()));
        }
    }
    values
}

/// A standalone OffsetCommit of `offset` for orders/0 by group `group`, sent to node `id`.
fn commit_on(cluster: &Cluster, id: u32, group: &str, offset: i64) -> Result<(), GroupError> {
    let group = group.to_owned();
    cluster.on(id, move |shard| {
        Box::pin(async move {
            let request = CommitRequest {
                group_id: group.clone(),
                generation_id: -1,
                member_id: String::new(),
                group_instance_id: None,
                offsets: vec![("orders".to_owned(), 0, offset, -1, None)],
            };
            match shard.group(&group, GroupOp::Commit(request)).await? {
                GroupReply::Committed(mut results) => results.remove(0).1,
                other => panic!("a commit answered with {other:?}"),
            }
        })
    })
}

/// The offset of orders/0 that group `group` committed, as node `id` serves it.
fn committed_on(cluster: &Cluster, id: u32, group: &str) -> Result<i64, GroupError> {
    let group = group.to_owned();
    cluster.on(id, move |shard| {
        Box::pin(async move {
            let op = GroupOp::FetchOffsets {
                group_id: group.clone(),
                partitions: Some(vec![("orders".into(), 0)]),
            };
            match shard.group(&group, op).await? {
                GroupReply::Offsets(rows) => Ok(rows[0].2),
                other => panic!("an offset fetch answered with {other:?}"),
            }
        })
    })
}

/// Commits `offset` on whichever running node coordinates `group` (the others refuse with
/// NOT_COORDINATOR or COORDINATOR_LOAD_IN_PROGRESS); returns that node.
fn commit_anywhere(cluster: &Cluster, group: &str, offset: i64) -> u32 {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        for id in cluster.running() {
            match commit_on(cluster, id, group, offset) {
                Ok(()) => return id,
                Err(GroupError::NotCoordinator)
                | Err(GroupError::CoordinatorLoadInProgress)
                | Err(GroupError::CoordinatorNotAvailable) => {}
                Err(error) => panic!("node {id} refused a commit with {error}"),
            }
        }
        assert!(std::time::Instant::now() < deadline, "no node coordinates group {group} after 20 s");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_groups_coordinator_moves_with_the_leader_of_its_offsets_partition() {
    let mut cluster = Cluster::start();
    // Created through the controller the first time a coordinator is looked for.
    eventually(|| cluster.on(3, |shard| Box::pin(async move { shard.ensure_offsets_topic().await })));
    for id in 1..=NODES {
        let partitions = eventually(|| {
            cluster.on(id, |shard| {
                Box::pin(async move {
                    shard.topics().get(OFFSETS_TOPIC).ok_or(ShardError::UnknownTopic(OFFSETS_TOPIC.into()))
                })
            })
        });
        assert_eq!(partitions, pyralog_shard::GROUP_LOGS as u32);
    }
    let coordinator = commit_anywhere(&cluster, "readers", 10);
    assert_eq!(commit_anywhere(&cluster, "readers", 20), coordinator, "the coordinator stays put");
    for id in (1..=NODES).filter(|id| *id != coordinator) {
        assert_eq!(commit_on(&cluster, id, "readers", 99), Err(GroupError::NotCoordinator), "node {id}");
        assert_eq!(committed_on(&cluster, id, "readers"), Err(GroupError::NotCoordinator), "node {id}");
    }
    // FindCoordinator's answer, from any node, once the roles are known there.
    for id in 1..=NODES {
        let found = eventually(|| {
            let found =
                cluster.on(id, |shard| Box::pin(async move { shard.offsets_coordinator("readers").await }));
            match found {
                Ok((node, _)) if node == coordinator => Ok(node),
                other => Err(ShardError::Unavailable(format!("node {id} names {other:?}"))),
            }
        });
        assert_eq!(found, coordinator);
    }
    cluster.stop_node(coordinator);
    // A new leader of the offsets partition replays it: the last acknowledged commit is there.
    let moved = eventually(|| {
        for id in cluster.running() {
            if let Ok(offset) = committed_on(&cluster, id, "readers") {
                return Ok((id, offset));
            }
        }
        Err(ShardError::Unavailable("no new coordinator yet".into()))
    });
    assert_ne!(moved.0, coordinator);
    assert_eq!(moved.1, 20, "the acknowledged commit survived its coordinator");
    assert_eq!(commit_anywhere(&cluster, "readers", 30), moved.0);
    assert_eq!(committed_on(&cluster, moved.0, "readers"), Ok(30));
    cluster.stop();
}

/// `value` as an idempotent producer's batch: producer 7, epoch 0, first sequence `sequence`.
fn idempotent_batch(value: &str, sequence: i32) -> Bytes {
    let mut bytes = pyralog_replication::batch::build(&[(Some(b"k".as_slice()), value.as_bytes())], 0, 1000);
    bytes[43..51].copy_from_slice(&7i64.to_be_bytes());
    bytes[51..53].copy_from_slice(&0i16.to_be_bytes());
    bytes[53..57].copy_from_slice(&sequence.to_be_bytes());
    let crc = crc32c::crc32c(&bytes[21..]);
    bytes[17..21].copy_from_slice(&crc.to_be_bytes());
    Bytes::from(bytes)
}

/// Produces `records` to idem/0 on whichever running node leads it; returns (node, result).
fn produce_anywhere(cluster: &Cluster, records: Bytes) -> (u32, pyralog_shard::Produced) {
    eventually(|| {
        let mut last = None;
        for id in cluster.running() {
            let records = records.clone();
            let result = cluster.on(id, move |shard| {
                Box::pin(async move { shard.produce("idem", 0, records, Acks::All).await })
            });
            match result {
                Ok(produced) => return Ok((id, produced)),
                Err(error @ ShardError::NotLeader { .. }) => last = Some(error),
                Err(error) => return Err(error),
            }
        }
        Err(last.expect("a node answered"))
    })
}

#[test]
fn a_follower_promoted_to_leader_recognises_a_retry_of_a_batch_the_old_leader_wrote() {
    let mut cluster = Cluster::start();
    eventually(|| {
        let config = pyralog_shard::topics::TopicConfig { replication_factor: Some(3), ..Default::default() };
        cluster.on(1, move |shard| Box::pin(async move { shard.create_topic("idem", 1, config).await }))
    });
    let (leader, first) = produce_anywhere(&cluster, idempotent_batch("first", 0));
    // The old leader dies after committing the batch; the producer, which never heard back,
    // sends it again to the new leader.
    cluster.stop_node(leader);
    let (new_leader, retried) = produce_anywhere(&cluster, idempotent_batch("first", 0));
    assert_ne!(new_leader, leader);
    assert_eq!(retried, first, "the retry is answered with the original offsets");
    let (_, next) = produce_anywhere(&cluster, idempotent_batch("second", 1));
    assert!(next.base_offset >= first.next_offset);
    let fetched = fetch_on(&cluster, new_leader, "idem", 0);
    let values: Vec<String> =
        values_of(&fetched.expect("the new leader serves").records).into_iter().map(|(_, v)| v).collect();
    assert_eq!(values, vec!["first".to_owned(), "second".to_owned()], "stored once each");
    cluster.stop();
}

/// `count` producer ids handed out by node `id`, in order.
fn producer_ids_on(cluster: &Cluster, id: u32, count: usize) -> Vec<i64> {
    eventually(|| {
        cluster.on(id, move |shard| {
            Box::pin(async move {
                let mut ids = Vec::with_capacity(count);
                for _ in 0..count {
                    ids.push(shard.next_producer_id().await?);
                }
                Ok(ids)
            })
        })
    })
}

#[test]
fn producer_ids_are_unique_across_nodes_and_restarts() {
    let mut cluster = Cluster::start();
    let mut seen = std::collections::HashSet::new();
    // More than a block on node 1: it reserves the next one ahead, then hands it out.
    let many = producer_ids_on(&cluster, 1, 1500);
    assert!(many.windows(2).all(|w| w[0] < w[1]), "a node hands its ids out in order");
    seen.extend(many);
    for id in 2..=NODES {
        for producer_id in producer_ids_on(&cluster, id, 3) {
            assert!(seen.insert(producer_id), "id {producer_id} of node {id} was handed out before");
        }
    }
    cluster.stop_node(2);
    cluster.restart_node(2);
    for producer_id in producer_ids_on(&cluster, 2, 3) {
        assert!(seen.insert(producer_id), "id {producer_id} of restarted node 2 was handed out before");
    }
    cluster.stop();
}
