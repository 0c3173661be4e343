//! The replication core's own cost, no I/O: messages per second through one group, the time
//! of one heartbeat round through 10,000 groups, and the heap bytes of an idle replica.
//!
//! `cargo run --release -p pyralog-replication --example core_bench`. The bound is the CPU:
//! a message is a few hundred bytes moved and a few branches, so a core should handle
//! millions per second; the targets are a heartbeat round of 10,000 groups under
//! 5 ms of one core and at most 2 KiB per idle replica.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Instant;

use bytes::Bytes;
use pyralog_replication::group::LogRead;
use pyralog_replication::{batch, Action, Config, LogNotice, Message, Quorum, RaftGroup, Restore, Role};
use rand_core::SeedableRng;
use rand_xorshift::XorShiftRng;

struct Counting;
static LIVE_BYTES: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards to the system allocator and only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: the caller's layout goes to the system allocator unchanged.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE_BYTES.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: `ptr` came from `alloc` above with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// A log kept only as batches in memory, enough for the leader to fill appends.
#[derive(Default)]
struct MemoryLog {
    batches: Vec<Bytes>,
    ends: Vec<i64>,
}

impl LogRead for MemoryLog {
    fn read(&self, from_offset: i64, bytes_max: usize, batches: &mut Vec<Bytes>) {
        let first = self.ends.partition_point(|end| *end <= from_offset);
        let mut bytes = 0;
        for b in &self.batches[first..] {
            if bytes > 0 && bytes + b.len() > bytes_max {
                return;
            }
            bytes += b.len();
            batches.push(b.clone());
        }
    }
}

struct Replica {
    group: RaftGroup,
    log: MemoryLog,
}

fn replica(id: u32) -> Replica {
    let config = Config::new(id, vec![1, 2, 3], Quorum::new(3, 2).expect("valid"), 1, 10);
    let rng = XorShiftRng::seed_from_u64(u64::from(id));
    let group = RaftGroup::new(config, Restore::default(), rng, &mut Vec::new()).expect("valid");
    Replica { group, log: MemoryLog::default() }
}

/// Carries out actions at once: appends land and are durable, hard states persist, messages
/// are queued. Returns how many messages it queued.
fn carry_out(r: &mut Replica, actions: &mut Vec<Action>, queue: &mut Vec<Message>) -> usize {
    let mut sent = 0;
    let mut notices = Vec::new();
    for action in actions.drain(..) {
        match action {
            Action::Send(m) => {
                queue.push(m);
                sent += 1;
            }
            Action::Append { batches } => {
                for b in batches {
                    let view = batch::parse(&b).expect("the core appends checked batches");
                    r.log.ends.push(view.end_offset());
                    r.log.batches.push(b);
                }
                let end = r.log.ends.last().copied().unwrap_or(0);
                notices.push(LogNotice::Durable { end_offset: end, truncations: 0 });
            }
            Action::PersistHardState(state) => notices.push(LogNotice::HardStatePersisted(state)),
            _ => {}
        }
    }
    for notice in notices {
        r.group.notice(notice, actions);
    }
    if !actions.is_empty() {
        sent += carry_out(r, actions, queue);
    }
    sent
}

/// Delivers queued messages until none are left; returns how many were delivered.
fn deliver(group: &mut [Replica], queue: &mut Vec<Message>, actions: &mut Vec<Action>) -> usize {
    let mut delivered = 0;
    while let Some(m) = queue.pop() {
        let r = &mut group[m.to as usize - 1];
        r.group.receive(m, &r.log, actions);
        carry_out(r, actions, queue);
        delivered += 1;
    }
    delivered
}

/// Three replicas with replica 1 elected.
fn elected_group() -> Vec<Replica> {
    let mut group: Vec<Replica> = (1..=3).map(replica).collect();
    let (mut queue, mut actions) = (Vec::new(), Vec::new());
    while group[0].group.role() != Role::Leader {
        let r = &mut group[0];
        r.group.tick(&r.log, &mut actions);
        carry_out(r, &mut actions, &mut queue);
        deliver(&mut group, &mut queue, &mut actions);
    }
    deliver(&mut group, &mut queue, &mut actions);
    group
}

fn main() {
    // Bytes of an idle follower replica (no log, no leader): the core's own state.
    let before = LIVE_BYTES.load(Ordering::Relaxed);
    let idle: Vec<Replica> = (0..10_000).map(|i| replica(2 + i % 2)).collect();
    let idle_bytes = (LIVE_BYTES.load(Ordering::Relaxed) - before) as usize;
    let inline = std::mem::size_of::<RaftGroup>();
    println!("idle replica: {} bytes (RaftGroup inline {inline} + heap)", idle_bytes / idle.len());
    drop(idle);

    // Appends through one group: one batch of 10 small records per proposal.
    let mut group = elected_group();
    let (mut queue, mut actions) = (Vec::new(), Vec::new());
    let records: Vec<(Option<&[u8]>, &[u8])> = (0..10).map(|_| (None, &[0u8; 100][..])).collect();
    let proposal = batch::build(&records, 0, 0);
    let (started, mut messages, proposals) = (Instant::now(), 0usize, 200_000);
    for _ in 0..proposals {
        let r = &mut group[0];
        r.group.propose(vec![proposal.clone()], &r.log, &mut actions).expect("leader");
        messages += carry_out(r, &mut actions, &mut queue);
        messages += deliver(&mut group, &mut queue, &mut actions);
    }
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "one group: {proposals} appends, {messages} messages in {seconds:.2} s: {:.0} messages/s, {:.0} appends/s",
        messages as f64 / seconds,
        proposals as f64 / seconds
    );

    // Heartbeat rounds through 10,000 groups, in three timed phases: every leader ticks (two
    // heartbeats each), every follower answers, every leader takes the answers. A node hosting
    // 10,000 replicas does a mix of the leader's and the follower's share.
    let mut groups: Vec<Vec<Replica>> = (0..10_000).map(|_| elected_group()).collect();
    let (mut leader_us, mut follower_us) = (Vec::new(), Vec::new());
    let mut queues: Vec<Vec<Message>> = (0..groups.len()).map(|_| Vec::new()).collect();
    // The followers' answers, per group: kept across rounds, so that the timed phases measure
    // the core and not the allocation and freeing of the harness's own queues.
    let mut answers: Vec<Vec<Message>> = (0..groups.len()).map(|_| Vec::new()).collect();
    for _ in 0..20 {
        let started = Instant::now();
        for (group, queue) in groups.iter_mut().zip(&mut queues) {
            let r = &mut group[0];
            r.group.tick(&r.log, &mut actions);
            carry_out(r, &mut actions, queue);
        }
        let ticked = started.elapsed();
        let started = Instant::now();
        for ((group, queue), out) in groups.iter_mut().zip(&mut queues).zip(&mut answers) {
            for m in queue.drain(..) {
                let r = &mut group[m.to as usize - 1];
                r.group.receive(m, &r.log, &mut actions);
                carry_out(r, &mut actions, out);
            }
        }
        follower_us.push(started.elapsed().as_micros());
        let started = Instant::now();
        for (group, answers) in groups.iter_mut().zip(&mut answers) {
            let r = &mut group[0];
            for m in answers.drain(..) {
                r.group.receive(m, &r.log, &mut actions);
                carry_out(r, &mut actions, &mut queue);
            }
        }
        leader_us.push((ticked + started.elapsed()).as_micros());
        queue.clear();
    }
    leader_us.sort_unstable();
    follower_us.sort_unstable();
    let ms = |v: &[u128], at: usize| v[at] as f64 / 1000.0;
    println!(
        "10,000 groups, heartbeat round: leaders' share p50 {:.2} ms (max {:.2}), followers' share p50 {:.2} ms (max {:.2})",
        ms(&leader_us, 10),
        ms(&leader_us, 19),
        ms(&follower_us, 10),
        ms(&follower_us, 19)
    );
    let still_leading = groups.iter().filter(|g| g[0].group.role() == Role::Leader).count();
    assert_eq!(still_leading, groups.len(), "no leader lost its group during the rounds");
}
