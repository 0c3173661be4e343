//! `pyralog cluster status|verify`, and the node endpoints they read.
//!
//! Each node serves, beside /metrics: `/cluster`, its view as JSON (the registered nodes, the
//! controller's leader, the topics' placements, and every replica it holds: role, term, offsets
//! and, where it leads, its followers and in-sync replicas); and `/checksum/TOPIC/PARTITION/END`,
//! a CRC-32C over its replica's batches ending at or below END. The commands ask one node for
//! the list of nodes, then every node: a node that does not answer is down.
//!
//! `status` takes each partition's facts from the node that leads it in the highest term;
//! `verify` compares the replicas of each partition up to the commit point every replica has
//! made durable, and names any replica that differs.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use pyralog_net::http::HttpResponse;
use pyralog_shard::{Shard, CONTROLLER_NAME, CONTROLLER_TOPIC_ID};
use serde_json::{json, Value};

/// How long the commands wait for a node's answer.
const NODE_TIMEOUT: Duration = Duration::from_secs(5);

/// `/cluster`: this node's view (see the module docs).
pub async fn cluster_json(shard: &Shard, node_id: u32, cluster_id: &str) -> HttpResponse {
    let Some(meta) = shard.cluster_meta() else {
        return HttpResponse::text(404, "this node is a cluster of one (started without --seeds)\n");
    };
    let statuses = match shard.replica_statuses().await {
        Ok(statuses) => statuses,
        Err(error) => return HttpResponse::text(503, format!("cannot ask the shards: {error}\n")),
    };
    let replicas: Vec<Value> = statuses
        .iter()
        .map(|status| {
            let in_sync = status.leads.then(|| shard.in_sync_of(status));
            let followers: Vec<Value> = status
                .followers
                .iter()
                .map(|f| {
                    json!({"node": f.id, "match_end": f.match_end, "acked_end": f.acked_end,
                           "lag": status.log_end - f.acked_end, "silent_ticks": f.silent_ticks,
                           "stalled_ticks": f.stalled_ticks,
                           "behind_ticks": (f.behind_ticks != u64::MAX).then_some(f.behind_ticks),
                           "recovering": f.recovering})
                })
                .collect();
            json!({
                "topic": status.topic, "partition": status.partition, "replicas": status.voters,
                "term": status.term, "leader": status.leader, "leads": status.leads,
                "log_start": status.log_start, "log_end": status.log_end, "durable_end": status.durable_end,
                "high_watermark": status.high_watermark, "in_sync": in_sync, "followers": followers,
                "failure": status.failure,
                "core": {"role": format!("{:?}", status.core.role), "term": status.core.term,
                         "leader": status.core.leader, "log_end": status.core.log_end,
                         "durable_end": status.core.durable_end, "recovering": status.core.recovering,
                         "campaign_last": status.core.campaign_last},
                "queued_actions": status.queued_actions, "performing": status.performing,
            })
        })
        .collect();
    let controller = shard.replica_role(CONTROLLER_TOPIC_ID, 0);
    // A seed's view of which nodes are down (only seeds hear every node's heartbeats).
    let down = shard.nodes_not_heard();
    let body = json!({
        "node": node_id,
        "cluster_id": cluster_id,
        "controller": {"leader": controller.and_then(|r| r.leader), "term": controller.map(|r| r.term)},
        "nodes": meta.nodes.values().map(|n| json!({
            "id": n.id, "cluster_address": n.cluster_address, "rack": n.rack, "shards": n.shards,
            "up": down.as_ref().map(|down| !down.contains(&n.id)),
            "metrics_address": n.metrics_address,
            "kafka": format!("{}:{}", n.kafka_host, n.kafka_port),
            "native": format!("{}:{}", n.native_host, n.native_port),
        })).collect::<Vec<_>>(),
        "topics": meta.topics.iter().map(|(name, t)| (name.clone(), json!({
            "replication_factor": t.replication_factor, "write_quorum": t.write_quorum, "replicas": t.replicas,
        }))).collect::<serde_json::Map<_, _>>(),
        "replicas": replicas,
    });
    HttpResponse { status: 200, content_type: "application/json", body: format!("{body}\n") }
}

/// `/checksum/TOPIC/PARTITION/FROM/END`.
pub async fn checksum_json(shard: &Shard, path: &str) -> HttpResponse {
    let mut parts = path.trim_start_matches("/checksum/").split('/');
    let (Some(topic), Some(partition), Some(from), Some(end), None) =
        (parts.next(), parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return HttpResponse::text(400, "ask /checksum/TOPIC/PARTITION/FROM/END\n");
    };
    let (Ok(partition), Ok(from), Ok(end)) =
        (partition.parse::<u32>(), from.parse::<i64>(), end.parse::<i64>())
    else {
        return HttpResponse::text(400, "PARTITION, FROM and END are numbers\n");
    };
    match shard.replica_checksum(topic, partition, from, end).await {
        Ok((crc, batches, reached)) => HttpResponse {
            status: 200,
            content_type: "application/json",
            body: format!("{}\n", json!({"crc32c": crc, "batches": batches, "end": reached})),
        },
        Err(error) => HttpResponse::text(409, format!("{error}\n")),
    }
}

/// A GET over plain HTTP/1.0; the body when the status is 200.
fn get(address: &str, path: &str) -> Result<String> {
    let addr = address
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve {address}"))?
        .next()
        .ok_or_else(|| anyhow!("{address} resolves to no address"))?;
    let mut stream = TcpStream::connect_timeout(&addr, NODE_TIMEOUT)
        .with_context(|| format!("no node answers at {address} (its --metrics-listen)"))?;
    stream.set_read_timeout(Some(NODE_TIMEOUT))?;
    stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n").as_bytes())?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    let (head, body) =
        answer.split_once("\r\n\r\n").ok_or_else(|| anyhow!("{address}: not an HTTP answer"))?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        bail!("{address}{path}: {}", body.trim());
    }
    Ok(body.to_owned())
}

/// A node's id and its /cluster JSON, or why it did not answer.
type View = (u64, Result<Value>);

/// The first node's view, and every node's.
fn views(node: &str) -> Result<(Value, Vec<View>)> {
    let first: Value = serde_json::from_str(&get(node, "/cluster")?)?;
    let mut views = Vec::new();
    for described in first["nodes"].as_array().cloned().unwrap_or_default() {
        let id = described["id"].as_u64().unwrap_or_default();
        let view = match described["metrics_address"].as_str() {
            Some(address) => get(address, "/cluster").and_then(|body| Ok(serde_json::from_str(&body)?)),
            None => Err(anyhow!("node {id} registered no metrics address")),
        };
        views.push((id, view));
    }
    Ok((first, views))
}

/// The replica of (topic, partition) that leads it in the highest term, among every view.
fn leaders(views: &[View]) -> std::collections::BTreeMap<(String, u64), Value> {
    let mut leaders = std::collections::BTreeMap::<(String, u64), Value>::new();
    for (_, view) in views {
        let Ok(view) = view else { continue };
        for replica in view["replicas"].as_array().into_iter().flatten() {
            if replica["leads"] != json!(true) {
                continue;
            }
            let key = (
                replica["topic"].as_str().unwrap_or_default().to_owned(),
                replica["partition"].as_u64().unwrap_or_default(),
            );
            let newer =
                leaders.get(&key).is_none_or(|known| known["term"].as_i64() < replica["term"].as_i64());
            if newer {
                leaders.insert(key, replica.clone());
            }
        }
    }
    leaders
}

pub fn status(node: &str) -> Result<()> {
    let (first, views) = views(node)?;
    println!("cluster {}", first["cluster_id"].as_str().unwrap_or("?"));
    println!(
        "controller leader: {}",
        first["controller"]["leader"].as_u64().map_or("none known".to_owned(), |l| format!("node {l}"))
    );
    println!("node\tstate\taddress");
    let nodes = first["nodes"].as_array().cloned().unwrap_or_default();
    let mut stopped_replicas = 0;
    for (described, (id, view)) in nodes.iter().zip(&views) {
        let state = match view {
            Ok(view) => {
                let stopped = stopped(view);
                stopped_replicas += stopped.len();
                match stopped.first() {
                    None => "up".to_owned(),
                    Some((_, failure)) => format!(
                        "up, {} replica(s) stopped ({}; restart the node once the cause is fixed): {failure}",
                        stopped.len(),
                        stopped.iter().map(|(replica, _)| replica.as_str()).collect::<Vec<_>>().join(", "),
                    ),
                }
            }
            Err(error) => format!("down ({error:#})"),
        };
        println!("{id}\t{state}\t{}", described["cluster_address"].as_str().unwrap_or("?"));
    }
    let leaders = leaders(&views);
    println!("topic\tpartition\tleader\tterm\treplicas\tin-sync\tlag (offsets, per follower)");
    let (mut under_replicated, mut offline) = (0, 0);
    let topics = first["topics"].as_object().cloned().unwrap_or_default();
    for (name, topic) in topics.iter().filter(|(name, _)| name.as_str() != CONTROLLER_NAME) {
        for (partition, replicas) in topic["replicas"].as_array().into_iter().flatten().enumerate() {
            let replicas: Vec<u64> =
                replicas.as_array().into_iter().flatten().filter_map(Value::as_u64).collect();
            let Some(leader) = leaders.get(&(name.clone(), partition as u64)) else {
                offline += 1;
                println!(
                    "{name}\t{partition}\tnone\t-\t{replicas:?}\t[]\t(offline: no reachable replica leads)"
                );
                continue;
            };
            let in_sync: Vec<u64> =
                leader["in_sync"].as_array().into_iter().flatten().filter_map(Value::as_u64).collect();
            if in_sync.len() < replicas.len() {
                under_replicated += 1;
            }
            let lags: Vec<String> = leader["followers"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|f| format!("{}:{}", f["node"], f["lag"]))
                .collect();
            println!(
                "{name}\t{partition}\tnode {}\t{}\t{replicas:?}\t{in_sync:?}\t{}",
                leader["leader"],
                leader["term"],
                lags.join(" ")
            );
        }
    }
    println!("{under_replicated} under-replicated, {offline} offline partitions, {stopped_replicas} stopped replicas");
    Ok(())
}

/// The replicas a node's view says stopped after a storage error ("topic/partition"), with
/// why. Such a replica answers no one, so its peers treat it as down.
fn stopped(view: &Value) -> Vec<(String, String)> {
    view["replicas"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|replica| {
            let failure = replica["failure"].as_str()?;
            let name = format!("{}/{}", replica["topic"].as_str().unwrap_or("?"), replica["partition"]);
            Some((name, failure.to_owned()))
        })
        .collect()
}

pub fn verify(node: &str, topic: &str) -> Result<()> {
    let (first, views) = views(node)?;
    let placement = first["topics"][topic].clone();
    if placement.is_null() {
        bail!("the cluster has no topic '{topic}'");
    }
    let leaders = leaders(&views);
    let mut differing = 0;
    for (partition, replicas) in placement["replicas"].as_array().into_iter().flatten().enumerate() {
        let Some(leader) = leaders.get(&(topic.to_owned(), partition as u64)) else {
            bail!("{topic}/{partition} has no reachable leader: its commit point is unknown");
        };
        // Compared up to the commit point, or less where a replica has not made it durable (or,
        // a follower, matched with the leader) yet: such a replica is named as behind.
        let commit = leader["high_watermark"].as_i64().unwrap_or_default();
        let mut end = commit;
        let mut behind = Vec::new();
        // From where every replica's log starts (retention cuts each one on its own).
        let mut from = 0;
        let mut addresses = Vec::new();
        for id in replicas.as_array().into_iter().flatten().filter_map(Value::as_u64) {
            let (_, view) =
                views.iter().find(|(v, _)| *v == id).ok_or_else(|| anyhow!("node {id} is not registered"))?;
            let view = view
                .as_ref()
                .map_err(|e| anyhow!("node {id} (a replica of {topic}/{partition}) is down: {e:#}"))?;
            let own = view["replicas"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|r| r["topic"] == json!(topic) && r["partition"] == json!(partition))
                .ok_or_else(|| anyhow!("node {id} holds no replica of {topic}/{partition}"))?;
            let mut holds = own["durable_end"].as_i64().unwrap_or_default();
            from = from.max(own["log_start"].as_i64().unwrap_or_default());
            // A follower's durable log may still hold an old leader's tail past where it
            // matches this leader (a restart, a cut not made yet): compared only up to what
            // the leader knows it matches and holds durably.
            let acked = leader["followers"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|f| f["node"] == json!(id))
                .and_then(|f| f["acked_end"].as_i64());
            if let Some(acked) = acked {
                holds = holds.min(acked);
            }
            if holds < commit {
                behind.push(format!("node {id} holds up to offset {holds}"));
            }
            end = end.min(holds);
            let address = first["nodes"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|n| n["id"] == json!(id))
                .and_then(|n| n["metrics_address"].as_str())
                .unwrap_or_default()
                .to_owned();
            addresses.push((id, address));
        }
        let mut sums = Vec::new();
        for (id, address) in &addresses {
            let answer: Value =
                serde_json::from_str(&get(address, &format!("/checksum/{topic}/{partition}/{from}/{end}"))?)?;
            sums.push((*id, answer["crc32c"].as_u64(), answer["batches"].as_u64(), answer["end"].as_i64()));
        }
        let reference = (sums[0].1, sums[0].2, sums[0].3);
        let differ: Vec<u64> = sums.iter().filter(|s| (s.1, s.2, s.3) != reference).map(|s| s.0).collect();
        if differ.is_empty() {
            let agreed = reference.2.unwrap_or_default();
            let upto = if behind.is_empty() {
                format!("up to the commit point, offset {agreed}")
            } else {
                format!(
                    "up to offset {agreed}, below the commit point {commit}: {} (catching up)",
                    behind.join(", ")
                )
            };
            println!(
                "{topic}/{partition}: {} replicas agree from offset {from} {upto} ({} batches)",
                sums.len(),
                reference.1.unwrap_or_default()
            );
        } else {
            differing += 1;
            println!(
                "{topic}/{partition}: replicas on nodes {differ:?} differ from node {} below offset {end}",
                sums[0].0
            );
        }
    }
    if differing > 0 {
        bail!("{differing} partitions of '{topic}' have replicas that differ below their commit point");
    }
    Ok(())
}
