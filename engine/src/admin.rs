//! `pyralog topic create|list|describe|delete`: topic management over the native protocol.

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use pyralog_net::client::Client;
use pyralog_net::codec::ErrorCode;

#[derive(Debug, Subcommand)]
pub enum TopicAction {
    /// Create a topic.
    Create {
        name: String,
        #[arg(long, default_value_t = 1)]
        partitions: u32,
    },
    /// List topics and their partition counts.
    List,
    /// Show where each partition of a topic lives and its offsets.
    Describe { name: String },
    /// Delete a topic and all its data.
    Delete { name: String },
}

pub fn run(broker: &str, action: TopicAction) -> Result<()> {
    let client = Client::connect(broker).with_context(|| format!("connecting to {broker}"))?;
    match action {
        TopicAction::Create { name, partitions } => {
            client.create_topic(&name, partitions).with_context(|| format!("creating topic '{name}'"))?;
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
                bail!("topic '{name}': {:?}", topic.error);
            }
            println!("topic '{name}': {} partitions", topic.partitions.len());
            println!("partition\tshard\tport\tlog start\thigh watermark");
            for p in topic.partitions {
                let start = client.list_offsets(&name, p.partition, pyralog_net::codec::OFFSET_EARLIEST)?;
                let end = client.list_offsets(&name, p.partition, pyralog_net::codec::OFFSET_LATEST)?;
                println!("{}\t{}\t{}\t{start}\t{end}", p.partition, p.shard, p.port);
            }
        }
        TopicAction::Delete { name } => {
            client.delete_topic(&name).with_context(|| format!("deleting topic '{name}'"))?;
            println!("deleted topic '{name}'");
        }
    }
    Ok(())
}
