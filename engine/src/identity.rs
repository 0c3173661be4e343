//! Who this node is: its node id, its cluster's id, and the seeds it bootstraps from.
//!
//! The node id is stable: stored in the data directory (`node.meta`) the first time the node
//! starts, and a start with another `--node-id` is refused, since every replica the data
//! directory holds was placed on that id. The cluster id is created once, when the cluster
//! bootstraps, and stored next to it; a peer of another cluster is refused by the cluster
//! transport.
//!
//! A node started without `--seeds` is a cluster of one: its only seed is itself, and it
//! creates its cluster id at its first start (an existing single-node data directory gets its
//! node id, 0 unless given, and a cluster id the first time this version starts on it).
//!
//! Not here: talking to peers (net::cluster), the controller's metadata (shard).

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};

const META_FILE_NAME: &str = "node.meta";
const META_HEADER: &str = "pyralog-node v1";
/// Most seeds (the controller's voters).
pub const SEEDS_MAX: usize = 9;

pub type ClusterId = [u8; 16];

/// One initial voter of the controller, from `--seeds ID@HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seed {
    pub node_id: u32,
    /// As given (a name is resolved when it is used, so a seed may come up after this node).
    pub address: String,
}

/// Parses `--seeds`: `ID@HOST:PORT` separated by commas, ids unique.
pub fn parse_seeds(text: &str) -> Result<Vec<Seed>> {
    let mut seeds: Vec<Seed> = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let bad = || anyhow!("--seeds takes ID@HOST:PORT,... (like 1@10.0.0.1:9100), not '{part}'");
        let (id, address) = part.split_once('@').ok_or_else(bad)?;
        let node_id: u32 = id.parse().map_err(|_| bad())?;
        let (host, port) = address.rsplit_once(':').ok_or_else(bad)?;
        if host.is_empty() || port.parse::<u16>().is_err() {
            return Err(bad());
        }
        if seeds.iter().any(|s| s.node_id == node_id) {
            bail!("--seeds names node {node_id} twice");
        }
        seeds.push(Seed { node_id, address: address.to_owned() });
    }
    if seeds.is_empty() {
        bail!("--seeds names no seed");
    }
    if seeds.len() > SEEDS_MAX {
        bail!("--seeds names {} seeds; the controller takes at most {SEEDS_MAX} voters", seeds.len());
    }
    seeds.sort_by_key(|s| s.node_id);
    Ok(seeds)
}

/// What `node.meta` holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeMeta {
    pub node_id: u32,
    pub cluster_id: Option<ClusterId>,
    /// Random, drawn when the data directory gets its node.meta: a node that comes back with
    /// a new one lost its disk, and the controller's metadata tells its replicas so.
    pub incarnation: u64,
}

/// Reads `node.meta` from the data directory: `None` when the directory has none yet.
pub fn load(data_dir: &Path) -> Result<Option<NodeMeta>> {
    let path = data_dir.join(META_FILE_NAME);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(anyhow!("cannot read {}: {e}", path.display())),
    };
    let bad =
        |what: &str| anyhow!("{} is damaged ({what}): restore it, or remove the node's data", path.display());
    let mut lines = text.lines();
    if lines.next() != Some(META_HEADER) {
        return Err(bad(&format!("it does not start with '{META_HEADER}'")));
    }
    let (mut node_id, mut cluster_id, mut incarnation) = (None, None, None);
    for line in lines.filter(|l| !l.is_empty()) {
        match line.split_once(' ') {
            Some(("node-id", id)) => node_id = Some(id.parse().map_err(|_| bad("its node id"))?),
            Some(("cluster-id", hex)) => cluster_id = Some(unhex(hex).ok_or_else(|| bad("its cluster id"))?),
            Some(("incarnation", hex)) => {
                incarnation = Some(u64::from_str_radix(hex, 16).map_err(|_| bad("its incarnation"))?)
            }
            _ => return Err(bad(&format!("an unknown line '{line}'"))),
        }
    }
    let node_id = node_id.ok_or_else(|| bad("no node id"))?;
    // A node.meta from before incarnations: 0 names the disk the node always had.
    Ok(Some(NodeMeta { node_id, cluster_id, incarnation: incarnation.unwrap_or(0) }))
}

/// Whether the data directory has a `node.meta`.
pub fn exists(data_dir: &Path) -> bool {
    data_dir.join(META_FILE_NAME).exists()
}

/// Removes `node.meta` (after a failed first start that wrote it).
pub fn remove(data_dir: &Path) {
    let _ = std::fs::remove_file(data_dir.join(META_FILE_NAME));
}

/// Writes `node.meta` durably (a temporary file, fsync, rename, fsync of the directory).
pub fn store(data_dir: &Path, meta: &NodeMeta) -> Result<()> {
    use std::io::Write;
    let path = data_dir.join(META_FILE_NAME);
    let temporary = data_dir.join(format!("{META_FILE_NAME}.tmp"));
    let mut text =
        format!("{META_HEADER}\nnode-id {}\nincarnation {:016x}\n", meta.node_id, meta.incarnation);
    if let Some(id) = meta.cluster_id {
        text.push_str(&format!("cluster-id {}\n", hex(&id)));
    }
    let write = || -> std::io::Result<()> {
        let mut file = std::fs::File::create(&temporary)?;
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&temporary, &path)?;
        std::fs::File::open(data_dir)?.sync_all()
    };
    write().with_context(|| format!("cannot write {}", path.display()))
}

/// The node id to run as: the stored one, checked against `--node-id`; else `--node-id`; else
/// 0 for a node without seeds (a cluster of one).
pub fn node_id(
    stored: Option<&NodeMeta>,
    flag: Option<u32>,
    data_dir: &Path,
    clustered: bool,
) -> Result<u32> {
    match (stored.map(|m| m.node_id), flag) {
        (Some(stored), Some(flag)) if stored != flag => bail!(
            "data directory {} belongs to node {stored}, not node {flag}: start it with --node-id {stored}, \
             or give node {flag} a data directory of its own",
            data_dir.display()
        ),
        (Some(id), _) | (None, Some(id)) => Ok(id),
        (None, None) if clustered => bail!(
            "a node of a cluster (--seeds) needs --node-id: its id in --seeds, or a new id to join as a broker"
        ),
        (None, None) => Ok(0),
    }
}

/// A new data directory's incarnation: random, never 0.
pub fn new_incarnation() -> Result<u64> {
    let id = new_cluster_id()?;
    Ok(u64::from_le_bytes(id[..8].try_into().expect("8 bytes")).max(1))
}

/// 16 random bytes from the kernel: a new cluster's id.
pub fn new_cluster_id() -> Result<ClusterId> {
    use std::io::Read;
    let mut id = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut id))
        .context("reading /dev/urandom for a cluster id")?;
    Ok(id)
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<ClusterId> {
    if text.len() != 32 {
        return None;
    }
    let mut id = [0u8; 16];
    for (i, byte) in id.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_parse_and_refuse_what_they_must() {
        let seeds = parse_seeds("3@127.0.0.3:9100, 1@127.0.0.1:9100,2@host.example:9100").unwrap();
        assert_eq!(seeds.iter().map(|s| s.node_id).collect::<Vec<_>>(), vec![1, 2, 3]);
        assert_eq!(seeds[1].address, "host.example:9100");
        for bad in ["", "1@", "x@h:1", "1@h", "1@h:99999", "1@h:1,1@g:2", "1@:5"] {
            assert!(parse_seeds(bad).is_err(), "{bad:?} must be refused");
        }
        let many: Vec<String> = (0..10).map(|i| format!("{i}@h:{}", 9000 + i)).collect();
        assert!(parse_seeds(&many.join(",")).is_err());
    }

    #[test]
    fn the_node_id_is_stable_and_a_mismatch_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(dir.path()).unwrap(), None);
        assert_eq!(node_id(None, None, dir.path(), false).unwrap(), 0);
        assert!(node_id(None, None, dir.path(), true).is_err(), "a cluster node names itself");
        let meta = NodeMeta { node_id: 2, cluster_id: Some(new_cluster_id().unwrap()), incarnation: 77 };
        store(dir.path(), &meta).unwrap();
        let stored = load(dir.path()).unwrap().unwrap();
        assert_eq!(stored, meta);
        assert_eq!(node_id(Some(&stored), None, dir.path(), true).unwrap(), 2);
        assert_eq!(node_id(Some(&stored), Some(2), dir.path(), true).unwrap(), 2);
        let refused = node_id(Some(&stored), Some(3), dir.path(), true).unwrap_err().to_string();
        assert!(refused.contains("belongs to node 2, not node 3"), "{refused}");
        std::fs::write(dir.path().join(META_FILE_NAME), "pyralog-node v1\nnode-id x\n").unwrap();
        assert!(load(dir.path()).is_err());
    }
}
