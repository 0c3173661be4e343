//! Three nodes of a cluster in one process: each a `Shard` on its own executor thread, with
//! its own data directory; their replicas' messages and their controller requests travel over
//! in-memory queues in place of the daemon's transport. What this proves: the controller
//! elects a leader, registers nodes, creates replicated topics from any node, every node opens
//! its replicas, and produce and fetch go through the partition's leader, with every replica
//! holding the same bytes.

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
    Acks, ClusterSettings, ControllerRequest, Durability, FetchLimits, GroupConfig, Shard, ShardConfig,
    ShardError,
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
                cache_bytes: 8 << 20,
                groups: GroupConfig::default(),
                cluster: Some(ClusterSettings {
                    node_id: id,
                    seeds: (1..=NODES).collect(),
                    tick: Duration::from_millis(5),
                    heartbeat_ticks: 2,
                    election_ticks: 10,
                    default_replication_factor: None,
                    replica_lag_time_max: Duration::from_secs(10),
                    incarnation: 1,
                    controller_disk_lost: false,
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
    threads: Vec<std::thread::JoinHandle<()>>,
    dirs: Arc<Vec<tempfile::TempDir>>,
}

impl Cluster {
    fn start() -> Cluster {
        let inboxes: Inboxes = Arc::new((0..NODES).map(|_| Mutex::new(Inbox::default())).collect());
        let dirs: Vec<tempfile::TempDir> = (0..NODES).map(|_| tempfile::tempdir().unwrap()).collect();
        let threads = (1..=NODES)
            .map(|id| run_node(id, dirs[id as usize - 1].path().to_path_buf(), Arc::clone(&inboxes)))
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

    fn stop(self) {
        for inbox in self.inboxes.iter() {
            inbox.lock().unwrap().stop = true;
        }
        for thread in self.threads {
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
            let fetched = cluster.on(id, move |shard| {
                Box::pin(async move {
                    let limits = FetchLimits {
                        max_bytes: 1 << 20,
                        min_one_batch: true,
                        min_bytes: 1,
                        max_wait: Duration::from_millis(100),
                        current_leader_epoch: -1,
                    };
                    shard.fetch("orders", partition, 0, limits).await
                })
            });
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
    // Every replica holds the same bytes (each log's file, up to the shortest of them).
    for partition in 0..2 {
        let logs: Vec<Vec<u8>> = (0..NODES as usize)
            .map(|i| {
                let path = cluster_dirs[i]
                    .path()
                    .join(format!("topics/orders/{partition}/00000000000000000000.log"));
                std::fs::read(path).unwrap()
            })
            .collect();
        let shortest = logs.iter().map(|l| l.len()).min().unwrap();
        for (i, log) in logs.iter().enumerate() {
            assert!(log[..shortest] == logs[0][..shortest], "node {} partition {partition} differs", i + 1);
        }
    }
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
