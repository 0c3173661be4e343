//! A deterministic simulator: N replicas of one group, a virtual clock, a faulty network and
//! disks that lose what they did not flush, all driven from one seed.
//!
//! What it is: a world that carries out every [`Action`] of every [`RaftGroup`] the way the
//! daemon's shell will (append, flush later, persist the hard state later, send), injects
//! faults (drops, delays, duplicates and so reordering, symmetric and one-way partitions,
//! crashes losing unflushed writes and tearing the last batch, pauses, clock-rate skew, a
//! replica whose whole disk is lost), runs clients that propose and record what was
//! acknowledged, and checks the invariants after every event. After the fault phase it heals
//! everything and demands that a leader is elected and every replica converges within the
//! settle window (liveness).
//!
//! Invariants checked (a failure names the seed and a replay command):
//! - at most one leader per term; a replica's term never goes back; epochs grow in each log;
//! - one value per (epoch, offset): two replicas that hold a batch of the same epoch at the
//!   same offset hold the same bytes (Raft's log matching, checked at every append);
//! - every committed batch is durable on W replicas when a leader commits it;
//! - the commit point never moves back within a replica's incarnation; a batch below any
//!   replica's commit point equals the one first committed at that offset (never lost or
//!   changed); a new leader holds every batch committed in earlier terms (completeness);
//! - liveness (checked last): after the faults stop, one leader, identical logs, every acknowledged batch
//!   present and everything committed everywhere, within the settle window;
//! - a leader that heard an append answer from a follower's new disk never lets an answer of
//!   its lost disk raise the follower's acknowledged offset or clear its recovering mark.
//!
//! What it is not: it does not model byzantine peers. Messages a replica sent before it lost
//! its disk stay in flight (some messages are held up for long), so a stale vote or
//! acknowledgement may arrive after its replacement has spoken.

#[cfg(test)]
mod fuzz;
pub(crate) mod log;
#[cfg(test)]
mod tests;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::fmt;

use rand_core::{Rng, SeedableRng};
use rand_xorshift::XorShiftRng;

use crate::group::{Action, Config, LogNotice, PlantedBug, RaftGroup, Restore, Role};
use crate::message::{Body, HardState, Message};
use crate::quorum::{Preset, Quorum};
use log::SimLog;

/// A planted bug, for the test that shows the simulator catches it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bug {
    CommitEarlierTerm,
    AckBeforeDurable,
    /// E = ⌊RF/2⌋ + 1 whatever W is: with RF 5 and W 2, election and write quorums miss.
    ElectionQuorumTooSmall,
    /// Membership changes without the joint configuration.
    SkipJointConsensus,
    /// A replica outside its newest voter set votes without the log check.
    LearnerVotesBlind,
    /// Retention may cut the log past the commit point.
    TrimPastCommit,
}

impl Bug {
    pub fn parse(name: &str) -> Option<Bug> {
        match name {
            "commit-earlier-term" => Some(Bug::CommitEarlierTerm),
            "ack-before-durable" => Some(Bug::AckBeforeDurable),
            "election-quorum-too-small" => Some(Bug::ElectionQuorumTooSmall),
            "skip-joint-consensus" => Some(Bug::SkipJointConsensus),
            "learner-votes-blind" => Some(Bug::LearnerVotesBlind),
            "trim-past-commit" => Some(Bug::TrimPastCommit),
            _ => None,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Bug::CommitEarlierTerm => "commit-earlier-term",
            Bug::AckBeforeDurable => "ack-before-durable",
            Bug::ElectionQuorumTooSmall => "election-quorum-too-small",
            Bug::SkipJointConsensus => "skip-joint-consensus",
            Bug::LearnerVotesBlind => "learner-votes-blind",
            Bug::TrimPastCommit => "trim-past-commit",
        }
    }
}

/// Scripted histories; the seed still picks every delay, so each seed is another timing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    /// Raft's figure 8 (5 replicas): a leader replicates an entry to one follower and dies; a
    /// leader of the next term appends at the same offset alone and dies; the first comes
    /// back, wins, and brings its old entry to a write quorum. Counting replicas for that
    /// entry (instead of for the new leader's own epoch) commits what the second can undo.
    Figure8,
    /// A follower cut off for a second comes back: with pre-vote, the group's term and leader
    /// stay as they were (it cannot disrupt them by inflating terms).
    IsolatedFollower,
    /// The leader is cut off alone: check-quorum makes it step down within two election
    /// timeouts, and the others elect a new one.
    IsolatedLeader,
    /// The leader hands over to a follower (TimeoutNow), which leads within 200 ms.
    Transfer,
    /// The leader crashes on a 1 ms network; `Outcome::leader_gap_us` says how long the group
    /// went without one.
    LeaderCrash,
}

impl Scenario {
    pub fn parse(name: &str) -> Option<Scenario> {
        match name {
            "figure-8" => Some(Scenario::Figure8),
            "isolated-follower" => Some(Scenario::IsolatedFollower),
            "isolated-leader" => Some(Scenario::IsolatedLeader),
            "transfer" => Some(Scenario::Transfer),
            "leader-crash" => Some(Scenario::LeaderCrash),
            _ => None,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Scenario::Figure8 => "figure-8",
            Scenario::IsolatedFollower => "isolated-follower",
            Scenario::IsolatedLeader => "isolated-leader",
            Scenario::Transfer => "transfer",
            Scenario::LeaderCrash => "leader-crash",
        }
    }
}

/// What a run simulates; the seed picks everything left as `None`.
#[derive(Debug, Clone)]
pub struct Options {
    pub replicas: Option<usize>,
    pub preset: Option<Preset>,
    pub bug: Option<Bug>,
    /// Virtual time with faults, then `settle_us` without.
    pub faults_us: u64,
    pub settle_us: u64,
    pub faults: bool,
    /// A scripted history instead of random faults.
    pub scenario: Option<Scenario>,
    /// Membership changes (one more replica, which only it knows at first, added as a learner
    /// and then swapped with a voter by joint consensus); `None`: a quarter of the seeds.
    pub membership: Option<bool>,
    /// Print every event and action (for replaying one seed).
    pub trace: bool,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            replicas: None,
            preset: None,
            bug: None,
            faults_us: 2_000_000,
            settle_us: 3_000_000,
            faults: true,
            scenario: None,
            membership: None,
            trace: false,
        }
    }
}

/// What a passing run did.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub events: u64,
    pub committed_batches: usize,
    pub acked_batches: usize,
    pub leaders: usize,
    /// Membership changes the leader started (each a joint and a final configuration).
    pub membership_changes: usize,
    /// Trims the cores took (a replica's log start moved by retention).
    pub trims: usize,
    /// Replicas told to start their logs afresh past the leader's log start.
    pub logs_started: usize,
    /// Scenario leader-crash: from the crash to the next leader.
    pub leader_gap_us: Option<u64>,
}

/// A failed run: its seed, when, why, and how to replay it.
#[derive(Debug, Clone)]
pub struct Failure {
    pub seed: u64,
    pub time_us: u64,
    pub message: String,
    pub options: Options,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "seed {} failed at {} us: {}", self.seed, self.time_us, self.message)?;
        write!(
            f,
            "\nreplay: cargo run -p pyralog-replication --features sim --example simulate -- --seed {}",
            self.seed
        )?;
        if let Some(bug) = self.options.bug {
            write!(f, " --bug {}", bug.name())?;
        }
        if let Some(replicas) = self.options.replicas {
            write!(f, " --replicas {replicas}")?;
        }
        if self.options.membership == Some(true) {
            write!(f, " --membership")?;
        }
        if let Some(scenario) = self.options.scenario {
            write!(f, " --scenario {}", scenario.name())?;
        }
        Ok(())
    }
}

/// Runs one seed. A panic inside the core (a broken assertion) is a failure of that seed.
pub fn run(seed: u64, options: &Options) -> Result<Outcome, Failure> {
    let world = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut world = World::new(seed, options);
        let result = world.run();
        (world.now, result)
    }));
    let (time_us, result) = match world {
        Ok(done) => done,
        Err(panic) => {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panic".into());
            (0, Err(format!("panic: {message}")))
        }
    };
    result.map_err(|message| Failure { seed, time_us, message, options: options.clone() })
}

/// Milliseconds of virtual time per core tick, before a replica's clock skew.
const TICK_US: u64 = 10_000;
const NETWORK_DELAY_US_MAX: u64 = 10_000;
/// A slow message (see `World::slow_per_mille`) takes up to this much longer.
const SLOW_DELAY_US_MAX: u64 = 400_000;
/// Flushes and hard-state writes take up to this long; a third of the seeds get a slow disk
/// (ten times slower), which widens every window between an append and its flush.
const DISK_DELAY_US_MAX: u64 = 2_000;
/// Events one seed may take: a bound on a run that would otherwise never end.
const EVENTS_MAX: u64 = 2_000_000;

#[derive(Debug)]
enum Event {
    /// A message, and the sender's disk generation when it left.
    Deliver(Message, u64),
    Tick {
        node: usize,
        incarnation: u64,
    },
    Flushed {
        node: usize,
        incarnation: u64,
        end_offset: i64,
        truncations: u64,
    },
    Persisted {
        node: usize,
        incarnation: u64,
        state: HardState,
    },
    Restart {
        node: usize,
        disk_lost: bool,
    },
    Crash {
        node: usize,
        incarnation: u64,
    },
    /// `node`'s shell saw its connection to `peer` fail (a crash reset it, or a partition
    /// timed it out).
    PeerLost {
        node: usize,
        incarnation: u64,
        peer: usize,
    },
    Unblock {
        from: usize,
        to: usize,
    },
    Fault,
    Heal,
    Propose,
    /// Retention on one replica: its log starts at a later batch boundary.
    Trim,
    /// The scripted scenario checks whether its next step is due.
    Script,
}

struct Scheduled {
    at_us: u64,
    sequence: u64,
    event: Event,
}
impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.at_us, self.sequence) == (other.at_us, other.sequence)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scheduled {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at_us, self.sequence).cmp(&(other.at_us, other.sequence))
    }
}

struct Node {
    group: Option<RaftGroup>,
    incarnation: u64,
    log: SimLog,
    /// The hard state on disk.
    hard: HardState,
    persist_free_us: u64,
    flushing: bool,
    paused_until_us: u64,
    tick_us: u64,
    /// The commit point this incarnation reported last.
    high_watermark: i64,
    /// Batches below this index were compared with the committed record.
    checked_count: usize,
    last_term: i32,
    /// Lost its disk, and the recovering mark is not persisted yet.
    disk_lost: bool,
    /// How many times it lost its disk.
    disk_generation: u64,
}

/// Lost its disk and has not caught up yet (crashed or not).
fn recovering(n: &Node) -> bool {
    n.disk_lost || n.hard.recovering || n.group.as_ref().is_some_and(RaftGroup::recovering)
}

struct Committed {
    end: i64,
    epoch: i32,
    crc: u32,
    by_term: i32,
}

struct Pending {
    node: usize,
    incarnation: u64,
    term: i32,
    end: i64,
    batches: Vec<(i64, u32)>,
}

struct World {
    seed: u64,
    options: Options,
    rng: XorShiftRng,
    /// Retention's own generator: trims draw nothing from the world's, so a seed's history
    /// stays what it was without them until a trim changes what the replicas do.
    trim_rng: XorShiftRng,
    now: u64,
    sequence: u64,
    /// The sequence of the event being handled (see `put_off`).
    handling_sequence: u64,
    queue: BinaryHeap<Reverse<Scheduled>>,
    nodes: Vec<Node>,
    config: Config,
    blocked: Vec<Vec<bool>>,
    drop_per_mille: u64,
    duplicate_per_mille: u64,
    /// Messages held up for long (a stalled connection), up to `SLOW_DELAY_US_MAX`.
    slow_per_mille: u64,
    /// (leader, its term, follower): the newest disk generation of the follower whose
    /// append answer that leader received in that term.
    answers_heard: HashMap<(usize, i32, usize), u64>,
    leaders: HashMap<i32, u32>,
    values: HashMap<(i64, i32), (i64, u32)>,
    committed: Vec<Committed>,
    /// The committed batches themselves, for a replica told to start its log past them.
    committed_batches: Vec<bytes::Bytes>,
    pending: Vec<Pending>,
    acked: Vec<(i64, u32)>,
    next_value: u64,
    events: u64,
    disk_delay_us_max: u64,
    /// Membership changes are in the fault mix.
    membership: bool,
    /// A message takes 1 ms plus up to this.
    network_delay_us_max: u64,
    leader_gap_us: Option<u64>,
    membership_changes: usize,
    trims: usize,
    logs_started: usize,
    /// Actions a fault made a replica take, carried out after it.
    fault_actions: Vec<(usize, Vec<Action>)>,
    script_step: u32,
    script_mark_us: u64,
    script_nodes: Vec<usize>,
}

type Check = Result<(), String>;

impl World {
    fn new(seed: u64, options: &Options) -> World {
        let mut rng = XorShiftRng::seed_from_u64(seed);
        let replicas = options.replicas.unwrap_or(if seed.is_multiple_of(2) { 3 } else { 5 });
        let membership = options.membership.unwrap_or(seed % 4 == 3) && options.faults;
        let slots = replicas + usize::from(membership);
        let presets = [Preset::Balanced, Preset::WriteOptimized, Preset::ReadOptimized];
        let preset = options.preset.unwrap_or(presets[(seed / 2 % 3) as usize]);
        let mut quorum = Quorum::preset(preset, replicas as u32).expect("presets are valid");
        if options.bug == Some(Bug::ElectionQuorumTooSmall) {
            let majority = replicas as u32 / 2 + 1;
            quorum = Quorum::unchecked_for_tests(replicas as u32, quorum.write_quorum(), majority);
        }
        let planted_bug = match options.bug {
            Some(Bug::CommitEarlierTerm) => Some(PlantedBug::CommitEarlierTerm),
            Some(Bug::AckBeforeDurable) => Some(PlantedBug::AckBeforeDurable),
            Some(Bug::SkipJointConsensus) => Some(PlantedBug::SkipJointConsensus),
            Some(Bug::LearnerVotesBlind) => Some(PlantedBug::LearnerVotesBlind),
            Some(Bug::TrimPastCommit) => Some(PlantedBug::TrimPastCommit),
            _ => None,
        };
        let config = Config {
            id: 0,
            voters: (1..=replicas as u32).collect(),
            quorum,
            // The spare replica is in no one's initial configuration but its own (as a
            // learner): the leader adds it first, so a replica that lost its disk comes back
            // not knowing it (see `change_membership`).
            learners: Vec::new(),
            heartbeat_ticks: 2,
            election_ticks: 10,
            planted_bug,
        };
        // A third of the seeds' logs refuse a fifth of the reads (see `SimLog`).
        let refuse_reads_per_mille = if options.faults && seed / 4 % 3 == 1 { 200 } else { 0 };
        let nodes = (0..slots)
            .map(|slot| {
                // Clock-rate skew: each replica's ticks run 0.7x to 1.3x the virtual clock.
                let skew = if options.faults { 700 + rng.next_u64() % 601 } else { 1000 };
                Node {
                    group: None,
                    incarnation: 0,
                    log: SimLog {
                        refuse_reads_per_mille,
                        refusals: std::cell::Cell::new(seed ^ (slot as u64 + 1) << 32),
                        ..SimLog::default()
                    },
                    hard: HardState::default(),
                    persist_free_us: 0,
                    flushing: false,
                    paused_until_us: 0,
                    tick_us: TICK_US * skew / 1000,
                    high_watermark: 0,
                    checked_count: 0,
                    last_term: 0,
                    disk_lost: false,
                    disk_generation: 0,
                }
            })
            .collect();
        World {
            seed,
            options: options.clone(),
            rng,
            trim_rng: XorShiftRng::seed_from_u64(seed ^ 0x7472_696d),
            now: 0,
            sequence: 0,
            handling_sequence: 0,
            queue: BinaryHeap::new(),
            nodes,
            config,
            blocked: vec![vec![false; slots]; slots],
            membership,
            membership_changes: 0,
            trims: 0,
            logs_started: 0,
            network_delay_us_max: if options.scenario == Some(Scenario::LeaderCrash) {
                1
            } else {
                NETWORK_DELAY_US_MAX
            },
            leader_gap_us: None,
            drop_per_mille: 0,
            duplicate_per_mille: 0,
            slow_per_mille: 0,
            answers_heard: HashMap::new(),
            leaders: HashMap::new(),
            values: HashMap::new(),
            committed: Vec::new(),
            committed_batches: Vec::new(),
            pending: Vec::new(),
            acked: Vec::new(),
            next_value: 0,
            events: 0,
            disk_delay_us_max: if seed % 3 == 2 { 10 * DISK_DELAY_US_MAX } else { DISK_DELAY_US_MAX },
            fault_actions: Vec::new(),
            script_step: 0,
            script_mark_us: 0,
            script_nodes: Vec::new(),
        }
    }

    fn random(&mut self, below: u64) -> u64 {
        self.rng.next_u64() % below.max(1)
    }

    fn schedule(&mut self, delay_us: u64, event: Event) {
        self.sequence += 1;
        self.queue.push(Reverse(Scheduled { at_us: self.now + delay_us, sequence: self.sequence, event }));
    }

    fn run(&mut self) -> Result<Outcome, String> {
        for node in 0..self.nodes.len() {
            self.restart(node, false)?;
        }
        if self.options.faults {
            let first = 100_000 + self.random(200_000);
            self.schedule(first, Event::Fault);
            let first = 50_000 + self.trim_rng.next_u64() % 200_000;
            self.schedule(first, Event::Trim);
        }
        if self.options.scenario.is_some() {
            self.schedule(1_000, Event::Script);
        }
        self.schedule(self.options.faults_us, Event::Heal);
        self.schedule(50_000, Event::Propose);
        let end_us = self.options.faults_us + self.options.settle_us;
        while let Some(Reverse(next)) = self.queue.pop() {
            if next.at_us > end_us {
                break;
            }
            self.now = next.at_us;
            self.handling_sequence = next.sequence;
            self.events += 1;
            if self.events > EVENTS_MAX {
                return Err(format!("more than {EVENTS_MAX} events"));
            }
            if self.options.trace {
                println!("{:>9} {:?}", self.now, next.event);
            }
            self.handle(next.event)?;
        }
        self.check_converged()?;
        Ok(Outcome {
            events: self.events,
            committed_batches: self.committed.len(),
            acked_batches: self.acked.len(),
            leaders: self.leaders.len(),
            membership_changes: self.membership_changes,
            trims: self.trims,
            logs_started: self.logs_started,
            leader_gap_us: self.leader_gap_us,
        })
    }

    /// Events for a paused replica wait until it resumes; true when this one was put off.
    /// A put-off event keeps its place among those due at the same time (its sequence): a
    /// pause extended while events wait for it would otherwise put an event off twice,
    /// behind later ones put off once (a hard state persisted before an earlier one, which
    /// no disk does).
    fn put_off(&mut self, node: usize, event: Event) -> Option<Event> {
        let until = self.nodes[node].paused_until_us;
        if self.now < until {
            let sequence = self.handling_sequence;
            self.queue.push(Reverse(Scheduled { at_us: until, sequence, event }));
            return None;
        }
        Some(event)
    }

    fn handle(&mut self, event: Event) -> Check {
        let mut out = Vec::new();
        match event {
            Event::Deliver(message, generation) => {
                let node = message.to as usize - 1;
                let Some(Event::Deliver(message, generation)) =
                    self.put_off(node, Event::Deliver(message, generation))
                else {
                    return Ok(());
                };
                let (from, answer) = (message.from, matches!(message.body, Body::AppendResponse(_)));
                let Node { group: Some(group), log, .. } = &mut self.nodes[node] else { return Ok(()) };
                let (term, before) = (group.term(), group.follower_view(from));
                group.receive(message, log, &mut out);
                if answer {
                    self.check_stale_answer(node, term, from as usize - 1, generation, before)?;
                }
                self.apply(node, out)
            }
            Event::Tick { node, incarnation } => {
                if self.nodes[node].incarnation != incarnation || self.nodes[node].group.is_none() {
                    return Ok(());
                }
                let Some(event) = self.put_off(node, Event::Tick { node, incarnation }) else {
                    return Ok(());
                };
                let Node { group: Some(group), log, .. } = &mut self.nodes[node] else {
                    unreachable!("checked above")
                };
                group.tick(log, &mut out);
                let tick_us = self.nodes[node].tick_us;
                self.schedule(tick_us, event);
                self.apply(node, out)
            }
            Event::Flushed { node, incarnation, end_offset, truncations } => {
                if self.nodes[node].incarnation != incarnation || self.nodes[node].group.is_none() {
                    return Ok(());
                }
                let event = Event::Flushed { node, incarnation, end_offset, truncations };
                let Some(_) = self.put_off(node, event) else { return Ok(()) };
                let n = &mut self.nodes[node];
                n.flushing = false;
                if n.log.truncations == truncations {
                    n.log.flushed(end_offset);
                }
                let group = n.group.as_mut().expect("a live incarnation has its group");
                group.notice(LogNotice::Durable { end_offset, truncations }, &mut out);
                self.start_flush(node);
                self.apply(node, out)
            }
            Event::Persisted { node, incarnation, state } => {
                if self.nodes[node].incarnation != incarnation || self.nodes[node].group.is_none() {
                    return Ok(());
                }
                let Some(_) = self.put_off(node, Event::Persisted { node, incarnation, state }) else {
                    return Ok(());
                };
                let n = &mut self.nodes[node];
                if state.term < n.hard.term {
                    return Err(format!(
                        "replica {} persisted term {} after term {}",
                        node + 1,
                        state.term,
                        n.hard.term
                    ));
                }
                n.hard = state;
                n.disk_lost &= !state.recovering;
                n.group.as_mut().expect("live").notice(LogNotice::HardStatePersisted(state), &mut out);
                self.apply(node, out)
            }
            Event::Restart { node, disk_lost } => self.restart(node, disk_lost),
            Event::Crash { node, incarnation } => {
                if self.nodes[node].incarnation == incarnation && self.nodes[node].group.is_some() {
                    self.crash(node);
                }
                Ok(())
            }
            Event::PeerLost { node, incarnation, peer } => {
                if self.nodes[node].incarnation == incarnation {
                    if let Some(group) = self.nodes[node].group.as_mut() {
                        group.peer_unreachable(peer as u32 + 1);
                    }
                }
                Ok(())
            }
            Event::Unblock { from, to } => {
                self.blocked[from][to] = false;
                Ok(())
            }
            Event::Fault => {
                if self.now < self.options.faults_us {
                    self.inject_fault();
                    for (node, out) in std::mem::take(&mut self.fault_actions) {
                        self.apply(node, out)?;
                    }
                    let next = 20_000 + self.random(300_000);
                    self.schedule(next, Event::Fault);
                }
                Ok(())
            }
            Event::Heal => {
                self.heal_partitions();
                self.drop_per_mille = 0;
                self.duplicate_per_mille = 0;
                self.slow_per_mille = 0;
                Ok(())
            }
            Event::Propose => self.propose(),
            Event::Trim => {
                self.trim();
                let next = 20_000 + self.trim_rng.next_u64() % 150_000;
                self.schedule(next, Event::Trim);
                Ok(())
            }
            Event::Script => {
                self.script_step()?;
                if self.now < self.options.faults_us {
                    self.schedule(2_000, Event::Script);
                }
                Ok(())
            }
        }
    }

    fn restart(&mut self, node: usize, disk_lost: bool) -> Check {
        let mut out = Vec::new();
        let n = &mut self.nodes[node];
        n.incarnation += 1;
        // Until the recovering mark is on disk, the replica comes back as one that lost it all.
        let disk_lost = disk_lost || n.disk_lost;
        // A term that was never persisted was never said to anyone: the persisted one counts.
        n.last_term = n.hard.term;
        // Half the time the shell had checkpointed the last commit point it carried out; it
        // clamps it to the recovered log (what a crash kept below it is what was committed).
        let checkpointed = !disk_lost && self.rng.next_u64().is_multiple_of(2);
        let n = &mut self.nodes[node];
        if disk_lost && n.log.start > 0 {
            // A lost disk told to start its log afresh before it stored its recovering mark: as
            // the daemon's shell does, it comes back with nothing, its log at 0 again.
            n.log = SimLog {
                refuse_reads_per_mille: n.log.refuse_reads_per_mille,
                refusals: n.log.refusals.clone(),
                ..SimLog::default()
            };
            n.checked_count = 0;
        }
        n.high_watermark = if checkpointed { n.high_watermark.min(n.log.end()) } else { 0 };
        n.flushing = false;
        n.paused_until_us = 0;
        n.checked_count = n.checked_count.min(n.log.batches.len());
        let restore = Restore {
            hard_state: n.hard,
            epochs: n.log.epochs(),
            log_start: n.log.start,
            log_end: n.log.end(),
            disk_lost,
            memberships: n.log.memberships(),
            high_watermark: n.high_watermark,
        };
        let mut config = self.config.clone();
        config.id = node as u32 + 1;
        if self.membership && node + 1 == self.blocked.len() {
            config.learners = vec![config.id];
        }
        let rng = XorShiftRng::seed_from_u64(self.seed ^ (node as u64) << 48 ^ n.incarnation << 32);
        let mut group =
            RaftGroup::new(config, restore, rng, &mut out).map_err(|e| format!("restart refused: {e}"))?;
        // Under random faults, half the time the shell says the replica is just back (as the
        // daemon's does for a while after a restart): it campaigns last when an election is
        // brought forward. Scripted scenarios keep the elections they script. (A bit of the
        // seed rather than a draw from `self.rng`: the seeds keep their runs.)
        let last =
            self.options.scenario.is_none() && (self.seed >> ((node as u64 + n.incarnation) % 64)) & 1 == 1;
        group.set_campaign_last(if last { vec![node as u32 + 1] } else { Vec::new() });
        n.group = Some(group);
        let (incarnation, first_tick) = (n.incarnation, 1 + self.random(self.nodes[node].tick_us));
        self.schedule(first_tick, Event::Tick { node, incarnation });
        self.apply(node, out)
    }

    fn start_flush(&mut self, node: usize) {
        let n = &self.nodes[node];
        if n.flushing || n.log.durable_count == n.log.batches.len() {
            return;
        }
        let event = Event::Flushed {
            node,
            incarnation: n.incarnation,
            end_offset: n.log.end(),
            truncations: n.log.truncations,
        };
        self.nodes[node].flushing = true;
        let delay = 100 + self.random(self.disk_delay_us_max);
        self.schedule(delay, event);
    }

    fn apply(&mut self, node: usize, actions: Vec<Action>) -> Check {
        for action in actions {
            if self.options.trace && !matches!(action, Action::Send(_)) {
                println!("{:>9}   replica {} {:?}", self.now, node + 1, action);
            }
            match action {
                Action::Send(message) => self.send(message),
                Action::Append { batches } => {
                    for bytes in batches {
                        let view = self.nodes[node].log.append(bytes);
                        let value = (view.end_offset(), view.crc);
                        let first =
                            *self.values.entry((view.base_offset, view.leader_epoch)).or_insert(value);
                        if first != value {
                            return Err(format!(
                                "log matching: replica {} appended a different batch of epoch {} at offset {}",
                                node + 1,
                                view.leader_epoch,
                                view.base_offset
                            ));
                        }
                    }
                    self.start_flush(node);
                }
                Action::Truncate { end_offset, truncations } => {
                    let n = &mut self.nodes[node];
                    if end_offset < n.high_watermark || end_offset < n.log.start {
                        return Err(format!(
                            "replica {} truncated to {end_offset} below its commit point {} or its log's start {}",
                            node + 1,
                            n.high_watermark,
                            n.log.start
                        ));
                    }
                    n.log.truncate(end_offset);
                    if n.log.truncations != truncations {
                        return Err(format!(
                            "truncation count {truncations} but the log made {}",
                            n.log.truncations
                        ));
                    }
                    n.checked_count = n.checked_count.min(n.log.batches.len());
                }
                Action::StartLog { start, truncations } => {
                    let count = self.committed.partition_point(|c| c.end <= start);
                    let committed_end = count.checked_sub(1).map_or(0, |k| self.committed[k].end);
                    if committed_end != start {
                        return Err(format!(
                            "replica {} was told to start its log at {start}, not the end of a committed batch \
                             (committed up to {})",
                            node + 1,
                            self.committed.last().map_or(0, |c| c.end)
                        ));
                    }
                    let n = &mut self.nodes[node];
                    n.log.start_at(start, &self.committed_batches[..count]);
                    if n.log.truncations != truncations {
                        return Err(format!(
                            "truncation count {truncations} but the log made {}",
                            n.log.truncations
                        ));
                    }
                    n.checked_count = count;
                    self.logs_started += 1;
                    let incarnation = n.incarnation;
                    let delay = 100 + self.random(self.disk_delay_us_max);
                    let event = Event::Flushed { node, incarnation, end_offset: start, truncations };
                    self.schedule(delay, event);
                }
                Action::PersistHardState(state) => {
                    let n = &mut self.nodes[node];
                    let at =
                        n.persist_free_us.max(self.now) + 100 + self.rng.next_u64() % self.disk_delay_us_max;
                    n.persist_free_us = at;
                    let incarnation = n.incarnation;
                    self.schedule(at - self.now, Event::Persisted { node, incarnation, state });
                }
                Action::Commit { high_watermark } => self.on_commit(node, high_watermark)?,
                Action::Role { term, role, .. } => {
                    if role == Role::Leader {
                        self.on_leader(node, term)?;
                    }
                }
            }
        }
        let n = &mut self.nodes[node];
        let term = n.group.as_ref().map_or(0, RaftGroup::term);
        if term < n.last_term {
            return Err(format!("replica {} went back from term {} to {term}", node + 1, n.last_term));
        }
        n.last_term = term;
        Ok(())
    }

    fn send(&mut self, message: Message) {
        let (from, to) = (message.from as usize - 1, message.to as usize - 1);
        if self.blocked[from][to] || self.random(1000) < self.drop_per_mille {
            return;
        }
        let mut delay = 1_000 + self.random(self.network_delay_us_max);
        if self.random(1000) < self.slow_per_mille {
            delay += self.random(SLOW_DELAY_US_MAX);
        }
        let generation = self.nodes[from].disk_generation;
        if self.random(1000) < self.duplicate_per_mille {
            let again = 1_000 + self.random(3 * self.network_delay_us_max);
            self.schedule(again, Event::Deliver(message.clone(), generation));
        }
        self.schedule(delay, Event::Deliver(message, generation));
    }

    /// A leader that has heard an append answer from a follower's newer disk never lets an
    /// answer from an older one (sent before that disk was lost) raise what it counts for
    /// that follower or clear its recovering mark: that would count lost data toward W.
    fn check_stale_answer(
        &mut self,
        leader: usize,
        term: i32,
        follower: usize,
        generation: u64,
        before: Option<(i64, bool)>,
    ) -> Check {
        let heard = self.answers_heard.entry((leader, term, follower)).or_insert(generation);
        let newer_heard = *heard > generation;
        *heard = (*heard).max(generation);
        let group = self.nodes[leader].group.as_ref().expect("it just received");
        let after = group.follower_view(follower as u32 + 1);
        let (Some((acked_before, recovering_before)), Some((acked_after, recovering_after))) =
            (before, after)
        else {
            return Ok(());
        };
        if newer_heard && (acked_after > acked_before || recovering_before && !recovering_after) {
            return Err(format!(
                "replica {}, leader of term {term}, took an answer from replica {}'s lost disk after its new \
                 one's: acknowledged {acked_before} -> {acked_after}, recovering {recovering_before} -> \
                 {recovering_after}",
                leader + 1,
                follower + 1
            ));
        }
        Ok(())
    }

    fn on_commit(&mut self, node: usize, high_watermark: i64) -> Check {
        let n = &mut self.nodes[node];
        if high_watermark < n.high_watermark {
            return Err(format!("replica {} moved its commit point back to {high_watermark}", node + 1));
        }
        n.high_watermark = high_watermark;
        let term = n.group.as_ref().map_or(0, RaftGroup::term);
        while n.checked_count < n.log.batches.len() && n.log.ends[n.checked_count] <= high_watermark {
            let k = n.checked_count;
            let view = crate::batch::parse(&n.log.batches[k]).expect("stored batches are valid");
            match self.committed.get(k) {
                Some(c) if (c.end, c.epoch, c.crc) != (view.end_offset(), view.leader_epoch, view.crc) => {
                    return Err(format!(
                        "committed batch at offset {} changed on replica {}: epoch {} became {}",
                        view.base_offset,
                        node + 1,
                        c.epoch,
                        view.leader_epoch
                    ));
                }
                Some(_) => {}
                None => {
                    self.committed.push(Committed {
                        end: view.end_offset(),
                        epoch: view.leader_epoch,
                        crc: view.crc,
                        by_term: term,
                    });
                    self.committed_batches.push(n.log.batches[k].clone());
                }
            }
            n.checked_count += 1;
        }
        let leads = n.group.as_ref().is_some_and(|g| g.role() == Role::Leader);
        if leads {
            self.check_durable_on_write_quorum(node, high_watermark)?;
            self.check_no_electable_replica_lacks(node, high_watermark)?;
            self.settle_proposals(node, high_watermark);
        }
        Ok(())
    }

    fn check_durable_on_write_quorum(&self, node: usize, high_watermark: i64) -> Check {
        let count = self.nodes[node].log.index_of(high_watermark);
        let leader = &self.nodes[node].log.batches[..count];
        let membership = self.nodes[node].group.as_ref().expect("a leader is live").membership();
        for set in &membership.sets {
            let holders = set
                .voters
                .iter()
                .map(|v| &self.nodes[*v as usize - 1])
                .filter(|n| {
                    // A replica that lost its disk after acknowledging counted when it did.
                    recovering(n) || n.log.durable_count >= count && n.log.batches[..count] == *leader
                })
                .count();
            self.check_holders(node, high_watermark, count, holders, set.quorum.write_quorum())?;
        }
        Ok(())
    }

    fn check_holders(&self, node: usize, high_watermark: i64, count: usize, holders: usize, w: u32) -> Check {
        if holders < w as usize {
            let logs: Vec<String> = self
                .nodes
                .iter()
                .map(|n| format!("{}/{}", n.log.durable_count, n.log.batches.len()))
                .collect();
            return Err(format!(
                "replica {} committed to {high_watermark} ({count} batches), durable on {holders} replicas, \
                 fewer than W = {w} (durable/held batches: {})",
                node + 1,
                logs.join(" ")
            ));
        }
        Ok(())
    }

    /// A committed batch must be safe from every election that could follow: no replica that
    /// lacks it may be able to gather E votes, even if every voter crashed first and came back
    /// with only what it had flushed (the weakest log it can vote with). Raft's counting rule
    /// is what makes this hold: the W replicas a commit counts hold the leader's epoch-start
    /// batch durably, so they refuse anyone whose log lacks it.
    fn check_no_electable_replica_lacks(&self, node: usize, high_watermark: i64) -> Check {
        if self.membership {
            // Which voters each replica would ask depends on the configurations in its own
            // log; the oracle does not model that. Completeness and the committed record
            // still hold these seeds to account.
            return Ok(());
        }
        let count = self.nodes[node].log.index_of(high_watermark);
        let committed = &self.nodes[node].log.batches[..count];
        let last_of = |batches: &[bytes::Bytes]| {
            let epoch = batches.last().map_or(-1, |b| crate::batch::parse(b).map_or(-1, |v| v.leader_epoch));
            let end = batches.last().map_or(0, |b| crate::batch::parse(b).map_or(0, |v| v.end_offset()));
            (epoch, end)
        };
        for (r, candidate) in self.nodes.iter().enumerate() {
            let holds = candidate.log.batches.len() >= count && candidate.log.batches[..count] == *committed;
            if holds || recovering(candidate) {
                continue;
            }
            let theirs = last_of(&candidate.log.batches);
            let votes = 1 + self
                .nodes
                .iter()
                .enumerate()
                .filter(|&(v, voter)| v != r && !recovering(voter))
                .filter(|(_, voter)| last_of(&voter.log.batches[..voter.log.durable_count]) <= theirs)
                .count();
            if votes >= self.config.quorum.election_quorum() as usize {
                return Err(format!(
                    "replica {} committed to {high_watermark}, but replica {} lacks it and could win {votes} votes \
                     (E = {}): the commit can be lost",
                    node + 1,
                    r + 1,
                    self.config.quorum.election_quorum()
                ));
            }
        }
        Ok(())
    }

    fn settle_proposals(&mut self, node: usize, high_watermark: i64) {
        let (incarnation, term) = {
            let n = &self.nodes[node];
            (n.incarnation, n.group.as_ref().map_or(0, RaftGroup::term))
        };
        let mut i = 0;
        while i < self.pending.len() {
            let p = &self.pending[i];
            if p.node == node && p.incarnation == incarnation && p.term == term && p.end <= high_watermark {
                let p = self.pending.swap_remove(i);
                self.acked.extend(p.batches);
            } else {
                i += 1;
            }
        }
    }

    fn on_leader(&mut self, node: usize, term: i32) -> Check {
        let id = node as u32 + 1;
        if self.options.faults && self.now < self.options.faults_us && self.random(100) < 15 {
            // Leaders that die young leave entries of their term on a few replicas only:
            // the histories of Raft's figure 8 and of KIP-279.
            let (incarnation, delay) = (self.nodes[node].incarnation, 500 + self.random(20_000));
            self.schedule(delay, Event::Crash { node, incarnation });
        }
        if let Some(other) = self.leaders.insert(term, id) {
            if other != id {
                return Err(format!("two leaders in term {term}: replicas {other} and {id}"));
            }
        }
        let log = &self.nodes[node].log;
        for (k, c) in self.committed.iter().enumerate() {
            if c.by_term >= term {
                continue;
            }
            let held = log.batches.get(k).and_then(|b| crate::batch::parse(b).ok());
            if held.is_none_or(|v| (v.end_offset(), v.leader_epoch, v.crc) != (c.end, c.epoch, c.crc)) {
                return Err(format!(
                    "leader completeness: replica {id}, leader of term {term}, lacks the batch ending at {} committed in term {}",
                    c.end, c.by_term
                ));
            }
        }
        Ok(())
    }

    fn propose(&mut self) -> Check {
        if self.now >= self.options.faults_us {
            return Ok(());
        }
        let next = 5_000 + self.random(40_000);
        self.schedule(next, Event::Propose);
        let leader = (0..self.nodes.len()).rev().find(|&i| {
            let n = &self.nodes[i];
            self.now >= n.paused_until_us && n.group.as_ref().is_some_and(|g| g.role() == Role::Leader)
        });
        let Some(node) = leader else { return Ok(()) };
        let spare = self.blocked.len() as u32;
        let added = self.nodes[node].group.as_ref().is_some_and(|g| g.membership().is_member(spare));
        if self.membership && !added {
            // Add the spare as soon as a leader can: the swaps of the fault mix need it.
            self.change_membership();
            for (node, out) in std::mem::take(&mut self.fault_actions) {
                self.apply(node, out)?;
            }
        }
        self.propose_to(node)
    }

    /// A client proposes 1 to 3 batches of 1 to 3 records to `node`, a leader.
    fn propose_to(&mut self, node: usize) -> Check {
        let count = 1 + self.random(3);
        let mut batches = Vec::new();
        for _ in 0..count {
            self.next_value += 1;
            let value = self.next_value.to_be_bytes();
            let records = 1 + self.random(3) as usize;
            let pairs: Vec<(Option<&[u8]>, &[u8])> = (0..records).map(|_| (None, &value[..])).collect();
            batches.push(crate::batch::build(&pairs, 0, self.now as i64));
        }
        let mut out = Vec::new();
        let n = &mut self.nodes[node];
        let group = n.group.as_mut().expect("a leader is live");
        let term = group.term();
        let Ok((base, end)) = group.propose(batches, &n.log, &mut out) else { return Ok(()) };
        let first_new = out.iter().find_map(|a| match a {
            Action::Append { batches } => Some(batches.clone()),
            _ => None,
        });
        let crcs: Vec<(i64, u32)> = first_new
            .unwrap_or_default()
            .iter()
            .map(|b| {
                let view = crate::batch::parse(b).expect("the core stamped it");
                (view.base_offset, view.crc)
            })
            .collect();
        assert_eq!(crcs.first().map(|c| c.0), Some(base), "proposals are appended at once");
        let incarnation = n.incarnation;
        self.pending.push(Pending { node, incarnation, term, end, batches: crcs });
        self.apply(node, out)
    }

    fn inject_fault(&mut self) {
        let replicas = self.nodes.len();
        let node = self.random(replicas as u64) as usize;
        let live = self.nodes[node].group.is_some();
        match self.random(100) {
            0..=24 if live => {
                // Crash, preferring the leader: keep a random part of the unflushed tail.
                let target = (0..replicas)
                    .find(|&i| self.nodes[i].group.as_ref().is_some_and(|g| g.role() == Role::Leader))
                    .filter(|_| self.random(2) == 0)
                    .unwrap_or(node);
                self.crash(target);
            }
            25..=29 if live => self.lose_disk(node),
            30..=44 if live => {
                let pause = 10_000 + self.random(400_000);
                // Never shorten a pause: events put off until its end must stay in order.
                let n = &mut self.nodes[node];
                n.paused_until_us = n.paused_until_us.max(self.now + pause);
            }
            45..=69 => {
                // Cut a random set of replicas from the others, both ways, for a while.
                let side: Vec<bool> = (0..replicas).map(|_| self.random(2) == 0).collect();
                let heal = 50_000 + self.random(700_000);
                for from in 0..replicas {
                    for to in 0..replicas {
                        if side[from] != side[to] {
                            self.blocked[from][to] = true;
                            self.schedule(heal, Event::Unblock { from, to });
                            self.maybe_time_out(from, to, heal);
                        }
                    }
                }
            }
            70..=84 => {
                let to = self.random(replicas as u64) as usize;
                if to != node {
                    self.blocked[node][to] = true;
                    let heal = 50_000 + self.random(700_000);
                    self.schedule(heal, Event::Unblock { from: node, to });
                }
            }
            85..=89 => {
                // A graceful handover, as a rolling restart or a rebalance would ask.
                let Some((leader, _)) = self.leader_now() else { return };
                let target = self.random(replicas as u64) as u32 + 1;
                let mut out = Vec::new();
                let group = self.nodes[leader].group.as_mut().expect("a leader is live");
                if group.transfer_leadership(target, &mut out).is_ok() {
                    self.fault_actions.push((leader, out));
                }
            }
            90..=94 if self.membership => self.change_membership(),
            _ => {
                self.drop_per_mille = self.random(150);
                self.duplicate_per_mille = self.random(60);
                self.slow_per_mille = self.random(30);
            }
        }
    }

    /// Retention on a random live replica: its log starts at a later batch boundary, half the
    /// time the furthest its core allows (its commit point and durable end), a quarter the
    /// furthest at or below the start its leader last told it (as the daemon's followers
    /// follow their leader's retention), else any of its log's (which the core refuses past
    /// those).
    fn trim(&mut self) {
        let node = (self.trim_rng.next_u64() % self.nodes.len() as u64) as usize;
        let way = self.trim_rng.next_u64() % 4;
        let pick = self.trim_rng.next_u64();
        let n = &mut self.nodes[node];
        let Some(group) = n.group.as_mut() else { return };
        let allowed = group.high_watermark().min(group.durable_end());
        let (furthest, bound) = match way {
            0 | 1 => (true, allowed),
            2 => (true, allowed.min(group.leader_log_start())),
            _ => (false, n.log.end()),
        };
        let first = n.log.index_of(n.log.start);
        let last = n.log.ends.partition_point(|end| *end <= bound);
        if last <= first {
            return;
        }
        let k = if furthest { last - 1 } else { first + (pick % (last - first) as u64) as usize };
        let start = n.log.ends[k];
        if group.trim(start).is_ok() {
            n.log.start = start;
            self.trims += 1;
        }
    }

    /// The leader adds the spare replica as a learner, then swaps a random voter with the
    /// learner (joint consensus) each time.
    fn change_membership(&mut self) {
        let Some((leader, _)) = self.leader_now() else { return };
        let group = self.nodes[leader].group.as_ref().expect("a leader is live");
        let current = group.membership().clone();
        if current.is_joint() {
            return;
        }
        let voters = &current.sets[0].voters;
        let (next, learners) = match current.learners.first() {
            None => (voters.clone(), vec![self.nodes.len() as u32]),
            Some(&added) => {
                let removed = voters[self.random(voters.len() as u64) as usize];
                let next = voters.iter().copied().filter(|v| *v != removed).chain([added]).collect();
                (next, vec![removed])
            }
        };
        let quorum = current.sets[0].quorum;
        let mut out = Vec::new();
        let n = &mut self.nodes[leader];
        let group = n.group.as_mut().expect("a leader is live");
        let result = group.change_membership(next, quorum, learners, &n.log, &mut out);
        if result.is_ok() {
            self.membership_changes += 1;
            self.fault_actions.push((leader, out));
        }
    }

    /// The replica stops; its disk keeps what was flushed and a random part of the rest.
    fn crash(&mut self, node: usize) {
        let down = 20_000 + self.random(500_000);
        self.crash_for(node, down);
    }

    fn crash_for(&mut self, node: usize, down_us: u64) {
        let unsynced = self.nodes[node].log.batches.len() - self.nodes[node].log.durable_count;
        let kept = self.random(unsynced as u64 + 1) as usize;
        let tear = self.random(2) == 0;
        let n = &mut self.nodes[node];
        n.group = None;
        n.log.crash(kept, tear);
        self.schedule(down_us, Event::Restart { node, disk_lost: false });
        // The others' connections to it reset, most of the time at once.
        for other in (0..self.nodes.len()).filter(|&o| o != node) {
            if self.random(4) != 0 {
                let (incarnation, delay) = (self.nodes[other].incarnation, 100 + self.random(2_000));
                self.schedule(delay, Event::PeerLost { node: other, incarnation, peer: node });
            }
        }
    }

    /// A cut connection times out on one side (TCP_USER_TIMEOUT) now and then: a replica
    /// may give up a leader that others still hear.
    fn maybe_time_out(&mut self, from: usize, to: usize, heal_us: u64) {
        if self.random(2) == 0 {
            let (incarnation, delay) = (self.nodes[from].incarnation, self.random(heal_us));
            self.schedule(delay, Event::PeerLost { node: from, incarnation, peer: to });
        }
    }

    fn leader_now(&self) -> Option<(usize, i32)> {
        let leaders = self.nodes.iter().enumerate().filter_map(|(i, n)| {
            n.group.as_ref().filter(|g| g.role() == Role::Leader).map(|g| (i, g.term()))
        });
        leaders.max_by_key(|&(_, term)| term)
    }

    fn heal_partitions(&mut self) {
        for row in &mut self.blocked {
            row.fill(false);
        }
    }

    fn isolate(&mut self, group: &[usize]) {
        for from in 0..self.nodes.len() {
            for to in 0..self.nodes.len() {
                self.blocked[from][to] = group.contains(&from) != group.contains(&to);
            }
        }
    }

    /// One step of the scripted scenario, when its condition holds (see [`Scenario`]).
    fn script_step(&mut self) -> Check {
        match self.options.scenario {
            Some(Scenario::Figure8) => self.figure_8_step(),
            Some(Scenario::IsolatedFollower) => self.isolated_follower_step(),
            Some(Scenario::IsolatedLeader) => self.isolated_leader_step(),
            Some(Scenario::Transfer) => self.transfer_step(),
            Some(Scenario::LeaderCrash) => self.leader_crash_step(),
            None => Ok(()),
        }
    }

    /// A leader that has committed something, after start-up.
    fn settled_leader(&self) -> Option<(usize, i32)> {
        let (leader, term) = self.leader_now()?;
        let committed = self.nodes[leader].group.as_ref().is_some_and(|g| g.high_watermark() > 0);
        (self.now > 300_000 && committed).then_some((leader, term))
    }

    fn isolated_follower_step(&mut self) -> Check {
        let since = self.now - self.script_mark_us;
        match self.script_step {
            0 => {
                let Some((leader, term)) = self.settled_leader() else { return Ok(()) };
                self.script_nodes = vec![leader, (leader + 1) % self.nodes.len(), term as usize];
                self.isolate(&[self.script_nodes[1]]);
                self.advance_script();
            }
            1 if since > 1_000_000 => {
                self.heal_partitions();
                self.advance_script();
            }
            2 if since > 300_000 => {
                let (leader, term) = (self.script_nodes[0], self.script_nodes[2] as i32);
                if self.leader_now() != Some((leader, term)) || self.nodes.iter().any(|n| n.last_term != term)
                {
                    return Err(format!(
                        "pre-vote: after replica {} came back, the leader is {:?} (was replica {} in term {term})",
                        self.script_nodes[1] + 1,
                        self.leader_now().map(|(l, t)| (l + 1, t)),
                        leader + 1
                    ));
                }
                self.advance_script();
            }
            _ => {}
        }
        Ok(())
    }

    fn isolated_leader_step(&mut self) -> Check {
        let since = self.now - self.script_mark_us;
        match self.script_step {
            0 => {
                let Some((leader, _)) = self.settled_leader() else { return Ok(()) };
                self.script_nodes = vec![leader];
                self.isolate(&[leader]);
                self.advance_script();
            }
            // Two election timeouts of the slowest clock, plus an election.
            1 if since > 2 * 20 * TICK_US + 200_000 => {
                let old = self.script_nodes[0];
                if self.nodes[old].group.as_ref().is_some_and(|g| g.role() == Role::Leader) {
                    return Err(format!("check-quorum: replica {} cut off still leads", old + 1));
                }
                self.advance_script();
            }
            // The others elect a leader; split votes may take a few rounds (timeouts are drawn
            // from only `election_ticks` values), so allow two seconds.
            2 => {
                let old = self.script_nodes[0];
                if self.leader_now().is_some_and(|(l, _)| l != old) {
                    self.heal_partitions();
                    self.advance_script();
                } else if since > 2_000_000 {
                    return Err(format!(
                        "check-quorum: no leader among the others 2 s after replica {} stepped down",
                        old + 1
                    ));
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn transfer_step(&mut self) -> Check {
        let since = self.now - self.script_mark_us;
        match self.script_step {
            0 => {
                let Some((leader, _)) = self.settled_leader() else { return Ok(()) };
                let target =
                    (leader + 1 + self.random(self.nodes.len() as u64 - 1) as usize) % self.nodes.len();
                self.script_nodes = vec![leader, target];
                let mut out = Vec::new();
                let group = self.nodes[leader].group.as_mut().expect("a leader is live");
                group.transfer_leadership(target as u32 + 1, &mut out).map_err(|e| e.to_string())?;
                self.apply(leader, out)?;
                self.advance_script();
            }
            1 if since > 200_000 => {
                let target = self.script_nodes[1];
                if self.leader_now().map(|(l, _)| l) != Some(target) {
                    return Err(format!(
                        "transfer: 200 ms after replica {} handed over to {}, the leader is {:?}",
                        self.script_nodes[0] + 1,
                        target + 1,
                        self.leader_now().map(|(l, t)| (l + 1, t))
                    ));
                }
                self.advance_script();
            }
            _ => {}
        }
        Ok(())
    }

    fn leader_crash_step(&mut self) -> Check {
        match self.script_step {
            0 => {
                let Some((leader, _)) = self.settled_leader() else { return Ok(()) };
                self.script_nodes = vec![leader];
                self.crash_for(leader, 1_000_000);
                self.advance_script();
            }
            1 if self.leader_now().is_some_and(|(l, _)| l != self.script_nodes[0]) => {
                self.leader_gap_us = Some(self.now - self.script_mark_us);
                self.advance_script();
            }
            _ => {}
        }
        Ok(())
    }

    fn figure_8_step(&mut self) -> Check {
        let since = self.now - self.script_mark_us;
        let jitter_us = self.random(20_000);
        match self.script_step {
            0 => {
                let Some((leader, _)) = self.leader_now() else { return Ok(()) };
                let committed = self.nodes[leader].group.as_ref().is_some_and(|g| g.high_watermark() > 0);
                if self.now > 200_000 && committed {
                    let follower = (leader + 1) % self.nodes.len();
                    self.script_nodes = vec![leader, follower];
                    self.isolate(&[leader, follower]);
                    let _ = self.propose_to(leader);
                    self.advance_script();
                }
            }
            1 if since > 30_000 + jitter_us => {
                self.crash_for(self.script_nodes[0], 10_000_000);
                self.advance_script();
            }
            2 => {
                let Some((second, _)) = self.leader_now() else { return Ok(()) };
                if self.script_nodes.contains(&second) {
                    return Ok(());
                }
                // Cut it off at once: its epoch-start batch stays on it alone.
                self.script_nodes.push(second);
                self.isolate(&[second]);
                self.advance_script();
            }
            3 if since > 5_000 + jitter_us => {
                self.crash_for(self.script_nodes[2], self.options.faults_us - self.now + 100_000);
                self.heal_partitions();
                let first = self.script_nodes[0];
                let _ = self.restart(first, false);
                self.advance_script();
            }
            _ => {}
        }
        Ok(())
    }

    fn advance_script(&mut self) {
        self.script_step += 1;
        self.script_mark_us = self.now;
    }

    /// The replica loses its disk and comes back empty, unless another replica is still
    /// recovering from such a loss (two at once may lose acknowledged data for real).
    fn lose_disk(&mut self, node: usize) {
        if self.nodes.iter().any(recovering) {
            return;
        }
        if self.config.quorum.write_quorum() < 2 {
            return;
        }
        // What the lost disk sent stays in flight: a stale vote or acknowledgement may still
        // arrive after its replacement has spoken.
        let n = &mut self.nodes[node];
        n.disk_generation += 1;
        n.group = None;
        n.log = SimLog {
            refuse_reads_per_mille: n.log.refuse_reads_per_mille,
            refusals: n.log.refusals.clone(),
            ..SimLog::default()
        };
        n.hard = HardState::default();
        n.checked_count = 0;
        n.last_term = 0;
        n.disk_lost = true;
        let down = 20_000 + self.random(500_000);
        self.schedule(down, Event::Restart { node, disk_lost: true });
    }

    /// Liveness: after the settle window, one leader and every replica caught up with it.
    fn check_converged(&self) -> Check {
        let groups: Vec<&RaftGroup> = self.nodes.iter().filter_map(|n| n.group.as_ref()).collect();
        if groups.len() != self.nodes.len() {
            return Err("liveness: a replica is still down after the settle window".into());
        }
        let term = groups.iter().map(|g| g.term()).max().expect("at least one replica");
        let leaders: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| groups[i].role() == Role::Leader && groups[i].term() == term)
            .collect();
        let [leader] = leaders[..] else {
            let states: Vec<String> = groups
                .iter()
                .map(|g| {
                    let voters: Vec<Vec<u32>> =
                        g.membership().sets.iter().map(|s| s.voters.clone()).collect();
                    format!(
                        "{}: {:?} term {} log ({}, {}) voters {voters:?} recovering {}",
                        g.id(),
                        g.role(),
                        g.term(),
                        g.epochs().last_epoch(),
                        g.log_end(),
                        g.recovering()
                    )
                })
                .collect();
            return Err(format!(
                "liveness: {} leaders of term {term} after the settle window; {}",
                leaders.len(),
                states.join("; ")
            ));
        };
        let log = &self.nodes[leader].log;
        let membership = groups[leader].membership();
        for (i, g) in groups.iter().enumerate() {
            if !membership.is_member(i as u32 + 1) {
                continue;
            }
            if g.term() != term || g.leader() != Some(leader as u32 + 1) || g.recovering() {
                return Err(format!(
                    "liveness: replica {} is in term {} (leader {:?}, recovering {}), not following {} in {term}",
                    i + 1,
                    g.term(),
                    g.leader(),
                    g.recovering(),
                    leader + 1
                ));
            }
            if self.nodes[i].log.batches != log.batches || g.high_watermark() != log.end() {
                return Err(format!(
                    "liveness: replica {} has log end {} and commit point {}, the leader's log ends at {}",
                    i + 1,
                    self.nodes[i].log.end(),
                    g.high_watermark(),
                    log.end()
                ));
            }
        }
        for &(base, crc) in &self.acked {
            let held = log.batches.get(log.index_of(base)).and_then(|b| crate::batch::parse(b).ok());
            if held.is_none_or(|v| v.base_offset != base || v.crc != crc) {
                return Err(format!("an acknowledged batch at offset {base} is lost"));
            }
        }
        Ok(())
    }
}
