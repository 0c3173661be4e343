//! Listening sockets: how every listener of the node is bound, and the start-up check that its
//! ports are free.
//!
//! Both live here so they cannot drift apart. The check once bound with other socket options
//! than the listeners, and a node killed with clients connected could not start again on its
//! own ports for a minute: its accepted sockets, left in FIN_WAIT2 or TIME_WAIT, share the
//! listener's options, and the kernel lets a new bind reuse the port only if the new socket
//! carries the same ones (SO_REUSEADDR on both, or SO_REUSEPORT on both, same user).
//!
//! Every listener sets SO_REUSEADDR, so such leftovers never hold its port. The shared ports
//! also set SO_REUSEPORT (every shard accepts on them), which would let a second node share
//! them silently: so [`check_free`] also looks for a socket *listening* on the port in the
//! kernel's table (`/proc/net/tcp`, `/proc/net/tcp6`), and names the process holding it when
//! it can.
//!
//! Not here: accepting and serving connections (`server`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use socket2::{Domain, Protocol, Socket, Type};

/// Connections the kernel queues on a listener before the shard accepts them.
pub const LISTEN_BACKLOG: i32 = 1024;

/// Whether several sockets of the node accept on one port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sharing {
    /// Every shard binds the port (SO_REUSEPORT): the kernel spreads connections over them.
    Shared,
    /// One shard alone: a per-shard port must reach exactly one shard of one node, and with
    /// SO_REUSEPORT the kernel may even hand one ephemeral port to two listeners.
    Exclusive,
}

/// A bound, listening socket with the options every listener of the node uses.
pub fn bind(addr: SocketAddr, sharing: Sharing) -> std::io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if sharing == Sharing::Shared {
        socket.set_reuse_port(true)?;
    }
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}

/// Why a port cannot be listened on.
#[derive(Debug)]
pub enum PortProblem {
    /// A socket is listening on it (another node, or another program).
    Listening { owner: Option<String> },
    /// The bind failed: the address is not this host's, or the port is privileged, or a socket
    /// without our options holds it.
    Bind(std::io::Error),
}

impl std::fmt::Display for PortProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PortProblem::Listening { owner: Some(owner) } => write!(f, "already in use by {owner}"),
            PortProblem::Listening { owner: None } => write!(f, "already in use by another process"),
            PortProblem::Bind(error) if error.kind() == std::io::ErrorKind::AddrInUse => {
                write!(f, "already in use by another process")
            }
            PortProblem::Bind(error) => write!(f, "cannot be listened on: {error}"),
        }
    }
}

/// Checks that `addr` can be bound as the node's listeners will bind it, and that no socket
/// is listening on it. Binds and closes at once; a port 0 is always free.
pub fn check_free(addr: SocketAddr, sharing: Sharing) -> Result<(), PortProblem> {
    if addr.port() == 0 {
        return Ok(());
    }
    // Which processes hold the listeners is looked up once (a walk of every process's file
    // descriptors); after that only the kernel's table is read, until the orphans are gone.
    // A holder that is exiting (killed a moment ago, `kill -9` then a start at once) counts as
    // gone: its sockets close as it finishes.
    let inodes = listening_sockets(addr);
    if let Some(owner) = inodes.iter().find_map(|&inode| socket_owner(inode)).filter(|o| !o.exiting) {
        return Err(PortProblem::Listening { owner: Some(owner.to_string()) });
    }
    let deadline = std::time::Instant::now() + ORPHAN_LISTENER_WAIT;
    let mut inodes = inodes;
    while !inodes.is_empty() {
        if std::time::Instant::now() >= deadline {
            return Err(PortProblem::Listening { owner: None });
        }
        std::thread::sleep(ORPHAN_LISTENER_POLL);
        inodes = listening_sockets(addr);
    }
    bind(addr, sharing).map(drop).map_err(PortProblem::Bind)
}

/// How long a listening socket that no live process holds may take to go away. A process
/// killed with io_uring accepts pending leaves its listeners to the kernel until the ring's
/// teardown (asynchronous, after the exit) cancels them: a few milliseconds, more on a loaded
/// machine; one still exiting (waiting for its in-flight disk writes) closes them a moment
/// later. A listener of a process this one may not look into (another user's) also waits
/// this long before it is reported.
const ORPHAN_LISTENER_WAIT: std::time::Duration = std::time::Duration::from_secs(3);
const ORPHAN_LISTENER_POLL: std::time::Duration = std::time::Duration::from_millis(50);

/// The inodes of the sockets listening where `addr` would, as the kernel's tables show them.
fn listening_sockets(addr: SocketAddr) -> Vec<u64> {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else { continue };
        inodes.extend(
            text.lines()
                .skip(1)
                .filter_map(TableEntry::parse)
                .filter(|entry| entry.listening && overlaps(entry.local, addr))
                .map(|entry| entry.inode),
        );
    }
    inodes
}

/// Two listening addresses collide when their ports match and either IP covers the other.
fn overlaps(listening: SocketAddr, wanted: SocketAddr) -> bool {
    let covers = |ip: IpAddr, other: IpAddr| ip.is_unspecified() || ip == other || ip.to_canonical() == other;
    listening.port() == wanted.port()
        && (covers(listening.ip(), wanted.ip()) || covers(wanted.ip(), listening.ip()))
}

/// One row of `/proc/net/tcp` or `/proc/net/tcp6`.
#[derive(Debug, PartialEq, Eq)]
struct TableEntry {
    local: SocketAddr,
    listening: bool,
    inode: u64,
}

/// The state column's value for a listening socket (TCP_LISTEN).
const TCP_LISTEN: &str = "0A";

impl TableEntry {
    /// `  0: 0100007F:1B9E 00000000:0000 0A ... uid timeout inode ...`
    fn parse(line: &str) -> Option<TableEntry> {
        let columns: Vec<&str> = line.split_whitespace().collect();
        let (ip, port) = columns.get(1)?.split_once(':')?;
        let port = u16::from_str_radix(port, 16).ok()?;
        let ip = parse_table_ip(ip)?;
        let listening = *columns.get(3)? == TCP_LISTEN;
        let inode = columns.get(9)?.parse().ok()?;
        Some(TableEntry { local: SocketAddr::new(ip, port), listening, inode })
    }
}

/// The kernel prints an address as 32-bit words in host byte order, each as 8 hex digits.
fn parse_table_ip(hex: &str) -> Option<IpAddr> {
    let word = |i: usize| -> Option<[u8; 4]> {
        let text = hex.get(i * 8..i * 8 + 8)?;
        Some(u32::from_str_radix(text, 16).ok()?.to_ne_bytes())
    };
    match hex.len() {
        8 => Some(IpAddr::V4(Ipv4Addr::from(word(0)?))),
        32 => {
            let mut bytes = [0u8; 16];
            for i in 0..4 {
                bytes[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            Some(IpAddr::V6(Ipv6Addr::from(bytes)))
        }
        _ => None,
    }
}

/// The process holding a socket.
struct Owner {
    pid: u32,
    name: String,
    /// Killed or exiting: it holds its sockets only until its exit finishes.
    exiting: bool,
}

impl std::fmt::Display for Owner {
    /// "process 1234 (pyralog)".
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "process {} ({})", self.pid, self.name)
    }
}

/// The process holding socket `inode`, when this process may look at its file descriptors
/// (same user, or root).
fn socket_owner(inode: u64) -> Option<Owner> {
    let target = format!("socket:[{inode}]");
    for process in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = process.file_name().to_str().and_then(|name| name.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(descriptors) = std::fs::read_dir(process.path().join("fd")) else { continue };
        let holds = descriptors
            .flatten()
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|link| link.as_os_str() == target.as_str()));
        if holds {
            let name = std::fs::read_to_string(process.path().join("comm")).unwrap_or_default();
            let stat = std::fs::read_to_string(process.path().join("stat")).unwrap_or_default();
            let status = std::fs::read_to_string(process.path().join("status")).unwrap_or_default();
            let exiting = is_exiting(&stat, &status);
            return Some(Owner { pid, name: name.trim().to_owned(), exiting });
        }
    }
    None
}

/// The kernel's flag on a task that has begun to exit (`PF_EXITING`, `/proc/PID/stat`'s 9th
/// field).
const PF_EXITING: u64 = 0x4;
/// SIGKILL's bit in the pending-signal masks of `/proc/PID/status`.
const SIGKILL_PENDING: u64 = 1 << (9 - 1);

/// Whether a process is on its way out, from its `/proc/PID/stat` and `/proc/PID/status`:
/// dead or a zombie, exiting, or with a SIGKILL pending (not yet delivered).
fn is_exiting(stat: &str, status: &str) -> bool {
    // "pid (comm) state ppid pgrp session tty_nr tpgid flags ...": comm may hold anything,
    // so the fields are counted from its closing parenthesis.
    let fields: Vec<&str> =
        stat.rsplit_once(')').map_or(Vec::new(), |(_, rest)| rest.split_whitespace().collect());
    let dead = fields.first().is_some_and(|state| matches!(*state, "Z" | "X" | "x"));
    let flags = fields.get(6).and_then(|flags| flags.parse::<u64>().ok()).unwrap_or(0);
    let killed = status.lines().any(|line| {
        let Some((name, mask)) = line.split_once(':') else { return false };
        matches!(name, "SigPnd" | "ShdPnd")
            && u64::from_str_radix(mask.trim(), 16).is_ok_and(|mask| mask & SIGKILL_PENDING != 0)
    });
    dead || flags & PF_EXITING != 0 || killed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_rows_parse_into_addresses_states_and_inodes() {
        let v4 = "   0: 0100007F:1B9E 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 123456 1 0";
        assert_eq!(
            TableEntry::parse(v4),
            Some(TableEntry { local: "127.0.0.1:7070".parse().unwrap(), listening: true, inode: 123456 })
        );
        let v6 = "   1: 00000000000000000000000001000000:2384 00000000000000000000000000000000:0000 06 \
                  00000000:00000000 03:00000000 00000000     0        0 0 3 0";
        let entry = TableEntry::parse(v6).unwrap();
        assert_eq!(entry.local, "[::1]:9092".parse().unwrap());
        assert!(!entry.listening);
        assert_eq!(TableEntry::parse("  sl  local_address rem_address   st"), None);
    }

    #[test]
    fn a_killed_or_exiting_process_is_told_from_a_live_one() {
        let stat =
            |state: &str, flags: u64| format!("1234 (py ralog) x) {state} 1 1234 1234 0 -1 {flags} 12 0 0");
        let status =
            |pending: &str| format!("Name:\tpyralog\nSigPnd:\t0000000000000000\nShdPnd:\t{pending}\n");
        let quiet = status("0000000000000000");
        assert!(!is_exiting(&stat("S", 0x400040), &quiet), "a sleeping process");
        assert!(!is_exiting(&stat("R", 0x400040), &status("0000000000004000")), "SIGTERM pending only");
        assert!(is_exiting(&stat("D", 0x400044), &quiet), "PF_EXITING");
        assert!(is_exiting(&stat("Z", 0x400040), &quiet), "a zombie");
        assert!(is_exiting(&stat("S", 0x400040), &status("0000000000000100")), "SIGKILL pending");
        // This very process, alive.
        let me = |file: &str| std::fs::read_to_string(format!("/proc/self/{file}")).unwrap();
        assert!(!is_exiting(&me("stat"), &me("status")));
    }

    #[test]
    fn any_address_overlaps_every_address_of_a_port() {
        let at = |text: &str| text.parse::<SocketAddr>().unwrap();
        assert!(overlaps(at("0.0.0.0:7070"), at("127.0.0.1:7070")));
        assert!(overlaps(at("127.0.0.1:7070"), at("0.0.0.0:7070")));
        assert!(overlaps(at("[::]:7070"), at("127.0.0.1:7070")));
        assert!(!overlaps(at("127.0.0.2:7070"), at("127.0.0.1:7070")));
        assert!(!overlaps(at("127.0.0.1:7071"), at("127.0.0.1:7070")));
    }

    #[test]
    fn a_listening_port_is_found_and_named_and_a_closed_one_is_free() {
        let listener = bind("127.0.0.1:0".parse().unwrap(), Sharing::Shared).unwrap();
        let addr = listener.local_addr().unwrap();
        let problem = check_free(addr, Sharing::Shared).unwrap_err();
        let owner = format!("process {}", std::process::id());
        assert!(problem.to_string().contains(&owner), "{problem}");
        drop(listener);
        check_free(addr, Sharing::Shared).unwrap();
    }

    #[test]
    fn a_port_held_by_a_connection_of_a_closed_listener_is_free() {
        let listener = bind("127.0.0.1:0".parse().unwrap(), Sharing::Shared).unwrap();
        let addr = listener.local_addr().unwrap();
        let client = std::net::TcpStream::connect(addr).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        drop(listener);
        drop(accepted); // the server side closes first: FIN_WAIT2 while the client stays
        check_free(addr, Sharing::Shared).unwrap();
        check_free(addr, Sharing::Exclusive).unwrap();
        drop(client);
    }
}
