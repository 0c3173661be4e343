//! `pyralog topic create|list|describe|delete`: topic management over the native protocol.
//!
//! Errors are the client's as they come: they already name the address (a node not running,
//! a Kafka port given as --broker) or the topic, in words a person can act on.

use anyhow::{bail, Result};
use clap::Subcommand;
use pyralog_net::client::{self, Client};
use pyralog_net::codec::ErrorCode;

#[derive(Debug, Subcommand)]
pub enum TopicAction {
    /// Create a topic. Its partitions are spread over the node's shards (and, in a cluster,
    /// their replicas over the nodes).
    Create {
        /// The topic's name.
        name: String,
        /// How many partitions the topic has; fixed once it is created.
        #[arg(long, default_value_t = 1)]
        partitions: u32,
        /// In a cluster: replicas of each partition, on distinct nodes. Default: the node's
        /// --default-replication-factor (3, or fewer nodes).
        #[arg(long, value_name = "COUNT")]
        replication_factor: Option<u32>,
        /// In a cluster: the write quorum W, replicas holding a batch durably before it is
        /// committed (Kafka's min.insync.replicas). Default: a majority of the replicas.
        #[arg(long, value_name = "COUNT", conflicts_with = "quorum")]
        min_insync_replicas: Option<u32>,
        /// In a cluster: the write quorum by name, for --replication-factor replicas:
        /// balanced (a majority), write-optimized (2: fast acknowledgements, elections need
        /// more replicas) or read-optimized (every replica: reads from any in-sync replica
        /// see everything committed).
        #[arg(long, value_name = "PRESET", requires = "replication_factor")]
        quorum: Option<String>,
    },
    /// List the node's topics, one per line: name and partition count.
    List,
    /// Show each partition of a topic: its shard, the shard's port, its log start offset, its
    /// high watermark (the offset the next record will get), and its leader node, the leader's
    /// epoch and its replicas (node ids).
    Describe {
        /// The topic's name.
        name: String,
    },
    /// Delete a topic and all its data; this cannot be undone.
    Delete {
        /// The topic's name.
        name: String,
    },
}

pub fn run(broker: &str, action: TopicAction) -> Result<()> {
    // The client's connection errors name the address and what to do: no context to add.
    let client = Client::connect(broker)?;
    match action {
        TopicAction::Create { name, partitions, replication_factor, min_insync_replicas, quorum } => {
            let write_quorum = match (&quorum, replication_factor) {
                (Some(preset), Some(factor)) => {
                    let preset = pyralog_replication::Preset::parse(preset)?;
                    Some(pyralog_replication::Quorum::preset(preset, factor)?.write_quorum())
                }
                _ => min_insync_replicas,
            };
            client.create_replicated_topic(
                &name,
                partitions,
                replication_factor.unwrap_or(0),
                write_quorum.unwrap_or(0),
            )?;
            println!("created topic '{name}' with {partitions} partitions");
        }
        TopicAction::List => {
            let metadata = client.metadata(&[])?;
            for topic in metadata.topics {
                println!("{}\t{} partitions", topic.name, topic.partitions.len());
            }
        }
        TopicAction::Describe { name } => {
            let metadata = client.metadata(&[name.as_str()])?;
            let Some(topic) = metadata.topics.into_iter().find(|t| t.name == name) else {
                bail!("the node did not describe topic '{name}'");
            };
            if topic.error != ErrorCode::None {
                return Err(client::topic_error(topic.error, &name).into());
            }
            println!("topic '{name}': {} partitions", topic.partitions.len());
            println!("partition\tshard\tport\tlog start\thigh watermark\tleader\tepoch\treplicas");
            for p in topic.partitions {
                let start = client.list_offsets(&name, p.partition, pyralog_net::codec::OFFSET_EARLIEST)?;
                let end = client.list_offsets(&name, p.partition, pyralog_net::codec::OFFSET_LATEST)?;
                let replicas: Vec<String> = p.replicas.iter().map(u32::to_string).collect();
                let (leader, epoch, replicas) = (p.leader_node, p.leader_epoch, replicas.join(","));
                println!(
                    "{}\t{}\t{}\t{start}\t{end}\t{leader}\t{epoch}\t{replicas}",
                    p.partition, p.shard, p.port
                );
            }
        }
        TopicAction::Delete { name } => {
            client.delete_topic(&name)?;
            println!("deleted topic '{name}'");
        }
    }
    Ok(())
}
