//! Model checking the replication core with stateright: three replicas, each wrapping the real
//! [`RaftGroup`] (not a re-implementation), explored exhaustively within bounds.
//!
//! What the model is:
//! - **Actors:** replicas 1, 2, 3 (stateright ids 0, 1, 2), quorum `balanced` (RF 3, W 2, E 2),
//!   heartbeat 1 tick, election timeout 2 ticks. Each holds a `RaftGroup`, an in-memory log of
//!   one-record batches (so offset = batch index) and the hard state it last persisted.
//! - **Network:** stateright's unordered, duplicating network: any message sent may be delivered
//!   any number of times, in any order, or never. Loss (`PYRALOG_MODEL_LOSSY=1`, stateright's
//!   `Drop`) is off by default because on a duplicating network it adds no actor state: a
//!   dropped message is one never delivered again, which the lossless model already explores;
//!   it only multiplies network states (17 times more at depth 10).
//! - **Nondeterministic events** (stateright timers, any of which may fire at any time): `Tick`
//!   (this replica's clock runs to the next thing the core does: a heartbeat, a pre-vote, a
//!   step-down; the clocks run at arbitrary relative rates);
//!   `Flush` (the log is fdatasync'ed: `LogNotice::Durable` with the current truncation
//!   count); `Persist` (the pending hard state is on disk: `HardStatePersisted`); a crash
//!   (stateright's `Crash`/`Recover`), which keeps only the durable batches and the persisted
//!   hard state (the unsynced tail is lost; torn batches are left to the simulator).
//! - **Client:** the network starts holding `Propose(a)` and `Propose(b)` for every replica; a
//!   replica that leads and does not hold the value proposes it (duplicated deliveries model
//!   client retries, also to later leaders).
//!
//! Bounds (`Bounds`): terms ≤ `term_max`, log end ≤ `log_end_max`, `Tick` events ≤ `ticks_max`
//! per replica life, restarts ≤ `restarts_max` in all; states past a bound are not explored.
//! Within them the space is still too large to finish (the duplicating network keeps every
//! message ever sent), so the test explores it breadth-first to a depth (number of events):
//! every state reachable in that many events is checked.
//!
//! Properties, checked in every reachable state, over ghost records that survive crashes
//! (kept in stateright's per-actor storage, never read by the core):
//! - at most one leader per term (every term any replica ever led in);
//! - log matching: two logs holding an entry of the same epoch at the same offset are equal up
//!   to it;
//! - a committed offset never changes value or disappears: each replica records the longest
//!   prefix it ever reported committed; its log below its commit point always agrees with that
//!   record, and the records of all replicas agree with each other;
//! - the commit point never moves back within a replica's life (the core keeps it in memory);
//! - the term never goes back (across restarts too), the epochs of a log strictly grow and never
//!   exceed the term;
//! - sometimes (not vacuous): a client batch is committed.
//!
//! Two replica states are the same state when the core's `Debug` form, the log, the persisted
//! hard state and the ghosts are: that merges the many interleavings that lead to one state.
//! The one thing `Debug` hides is the election-jitter RNG's position (`XorShiftRng` prints no
//! state); it only picks election deadlines, and the model's `Tick` events already let every
//! replica's clock run at any relative rate, so merging on it explores one of the jitter
//! sequences per state rather than all of them. `RaftGroup` is not `Clone`: a replica clones by
//! replaying its inputs since its last start (deterministic: the RNG is seeded from the replica
//! and its restart count).
//!
//! What is not covered exhaustively: a commit needs about 20 events (election, proposal,
//! replication, flushes, acknowledgements), past the depth the test reaches, so commit-point
//! and figure-8 interleavings are only sampled (`a_client_batch_can_be_committed`, DFS) and
//! left to the seeded simulator (`src/sim`), whose planted-bug test scripts figure 8.

use std::borrow::Cow;
use std::collections::hash_map::DefaultHasher;
use std::fmt::Write as _;
use std::hash::{Hash, Hasher};
use std::time::Instant;

use bytes::Bytes;
use pyralog_replication::batch;
use pyralog_replication::epoch::{EpochHistory, EpochStart};
use pyralog_replication::group::PlantedBug;
use pyralog_replication::{
    Action, Config, HardState, LogNotice, LogRead, Message, Quorum, RaftGroup, ReplicaId, Restore, Role,
};
use rand_core::SeedableRng;
use rand_xorshift::XorShiftRng;
use stateright::actor::{
    model_timeout, Actor, ActorModel, ActorModelState, Envelope, Id, LossyNetwork, Network, Out,
};
use stateright::{Checker, Expectation, Model};

const REPLICAS: usize = 3;
/// The values clients propose, one one-record batch each.
const VALUES: [u8; 2] = [b'a', b'b'];

/// What bounds the explored space.
#[derive(Debug, Clone, Copy)]
struct Bounds {
    term_max: i32,
    log_end_max: usize,
    /// Clock events per replica life, by replica.
    ticks_max: [u32; REPLICAS],
    restarts_max: u32,
    /// Values the client proposes (a prefix of `VALUES`).
    values: usize,
    lossy: bool,
    bug: Option<PlantedBug>,
}

/// One entry of a log, as the properties compare them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Entry {
    epoch: i32,
    crc: u32,
    control: bool,
}

fn entry_of(bytes: &[u8]) -> Entry {
    let view = batch::parse(bytes).expect("the core appends only checked batches");
    assert_eq!(view.last_offset_delta, 0, "the model's batches hold one record");
    Entry {
        epoch: view.leader_epoch,
        crc: view.crc,
        control: view.attributes & batch::ATTRIBUTE_CONTROL != 0,
    }
}

fn client_batch(value: u8) -> Vec<u8> {
    batch::build(&[(None, &[value])], 0, 0)
}

/// A replica's log in memory: one-record batches, so the offset of a batch is its index.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
struct MemLog {
    batches: Vec<Bytes>,
    entries: Vec<Entry>,
    /// Batches below this index are fdatasync'ed.
    durable_count: usize,
    truncations: u64,
}

impl MemLog {
    fn from_durable(batches: &[Bytes]) -> MemLog {
        MemLog {
            batches: batches.to_vec(),
            entries: batches.iter().map(|b| entry_of(b)).collect(),
            durable_count: batches.len(),
            truncations: 0,
        }
    }

    fn end(&self) -> i64 {
        self.batches.len() as i64
    }

    fn epochs(&self) -> EpochHistory {
        let mut starts: Vec<EpochStart> = Vec::new();
        for (offset, entry) in self.entries.iter().enumerate() {
            if starts.last().is_none_or(|s| s.epoch != entry.epoch) {
                starts.push(EpochStart { epoch: entry.epoch, start_offset: offset as i64 });
            }
        }
        EpochHistory::from_starts(starts).expect("a log's epochs grow")
    }
}

impl LogRead for MemLog {
    fn read(&self, from_offset: i64, _bytes_max: usize, batches: &mut Vec<Bytes>) {
        // The model's batches are tiny: the byte limit is never reached.
        let from = usize::try_from(from_offset).unwrap_or(usize::MAX).min(self.batches.len());
        batches.extend(self.batches[from..].iter().cloned());
    }
}

/// What the checker remembers of a replica across crashes; the core never sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
struct Ghost {
    /// The longest prefix this replica ever reported committed.
    committed: Vec<Entry>,
    /// Every term this replica led in.
    led_terms: Vec<i32>,
    term_max: i32,
    /// The first property broken on this replica alone.
    violation: Option<String>,
}

impl Ghost {
    fn violate(&mut self, what: String) {
        if self.violation.is_none() {
            self.violation = Some(what);
        }
    }
}

/// What a crash keeps: durable batches, the persisted hard state, and the ghost.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
struct Storage {
    batches: Vec<Bytes>,
    hard: (i32, Option<ReplicaId>, bool),
    restarts: u32,
    ghost: Ghost,
}

fn hard_state(hard: (i32, Option<ReplicaId>, bool)) -> HardState {
    HardState { term: hard.0, voted_for: hard.1, recovering: hard.2, disk_id: 0 }
}

/// A message between replicas, hashed and ordered by its `Debug` form (`Message` has neither).
#[derive(Debug, Clone)]
struct Wire {
    message: Message,
    key: String,
}

impl PartialEq for Wire {
    fn eq(&self, other: &Wire) -> bool {
        self.key == other.key
    }
}
impl Eq for Wire {}
impl Hash for Wire {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.key.hash(state);
    }
}
impl PartialOrd for Wire {
    fn partial_cmp(&self, other: &Wire) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Wire {
    fn cmp(&self, other: &Wire) -> std::cmp::Ordering {
        self.key.cmp(&other.key)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Msg {
    /// From the client: propose this value if you lead and do not hold it.
    Propose(u8),
    Raft(Wire),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Timer {
    Tick,
    Flush,
    Persist,
}

#[derive(Debug, Clone)]
enum Input {
    Receive(Message),
    Tick,
    Flush,
    Persist,
    Propose(u8),
}

/// One replica: the real core, its log and disk, and the ghost. See the module docs.
#[derive(Debug)]
struct Replica {
    bounds: Bounds,
    index: usize,
    /// What it started from, and every input since: how it clones.
    start: Storage,
    inputs: Vec<Input>,
    group: RaftGroup,
    log: MemLog,
    persisted: HardState,
    pending_hard: Option<HardState>,
    ticks: u32,
    /// The last commit point reported, and the largest term, in this life.
    commit: i64,
    term: i32,
    ghost: Ghost,
    fingerprint: u64,
}

impl Replica {
    fn start(bounds: Bounds, index: usize, start: Storage) -> Replica {
        let id = index as ReplicaId + 1;
        let config = Config {
            id,
            voters: (1..=REPLICAS as ReplicaId).collect(),
            quorum: Quorum::new(REPLICAS as u32, 2).expect("balanced RF 3"),
            learners: Vec::new(),
            heartbeat_ticks: 1,
            election_ticks: 2,
            planted_bug: bounds.bug,
        };
        let log = MemLog::from_durable(&start.batches);
        let persisted = hard_state(start.hard);
        // The model changes no membership: its logs hold no configuration batch.
        let restore = Restore {
            hard_state: persisted,
            epochs: log.epochs(),
            log_start: 0,
            log_end: log.end(),
            disk_lost: false,
            memberships: Vec::new(),
            high_watermark: 0,
        };
        let rng = XorShiftRng::seed_from_u64(u64::from(id) << 8 | u64::from(start.restarts));
        let mut actions = Vec::new();
        let group = RaftGroup::new(config, restore, rng, &mut actions).expect("a valid configuration");
        assert!(actions.is_empty(), "a replica that kept its disk persists nothing at start");
        let mut replica = Replica {
            bounds,
            index,
            ghost: start.ghost.clone(),
            start,
            inputs: Vec::new(),
            group,
            log,
            persisted,
            pending_hard: None,
            ticks: 0,
            commit: 0,
            term: 0,
            fingerprint: 0,
        };
        replica.check();
        replica
    }

    /// Applies one input to the core and carries out its actions; returns the messages sent.
    fn step(&mut self, input: Input) -> Vec<Message> {
        let mut actions = Vec::new();
        match &input {
            Input::Receive(message) => self.group.receive(message.clone(), &self.log, &mut actions),
            Input::Tick => {
                // Ticks that change nothing visible are skipped: one event runs the clock to the
                // next thing the core does (a heartbeat, a pre-vote, a step down), at most two
                // election timeouts.
                self.ticks += 1;
                for _ in 0..4 {
                    self.group.tick(&self.log, &mut actions);
                    if !actions.is_empty() {
                        break;
                    }
                }
            }
            Input::Flush => {
                self.log.durable_count = self.log.batches.len();
                let notice =
                    LogNotice::Durable { end_offset: self.log.end(), truncations: self.log.truncations };
                self.group.notice(notice, &mut actions);
            }
            Input::Persist => {
                let hard = self.pending_hard.take().expect("Persist fires only when pending");
                self.persisted = hard;
                self.group.notice(LogNotice::HardStatePersisted(hard), &mut actions);
            }
            Input::Propose(value) => {
                // A refusal (not the leader) changes nothing.
                let _ = self.group.propose(vec![client_batch(*value)], &self.log, &mut actions);
            }
        }
        self.inputs.push(input);
        let mut sent = Vec::new();
        for action in actions {
            self.perform(action, &mut sent);
        }
        self.check();
        sent
    }

    fn perform(&mut self, action: Action, sent: &mut Vec<Message>) {
        match action {
            Action::Send(message) => sent.push(message),
            Action::Append { batches } => {
                for bytes in batches {
                    let entry = entry_of(&bytes);
                    let view = batch::parse(&bytes).expect("checked above");
                    assert_eq!(view.base_offset, self.log.end(), "the core appends at the log end");
                    self.log.batches.push(bytes);
                    self.log.entries.push(entry);
                }
            }
            Action::Truncate { end_offset, truncations } => {
                let keep = usize::try_from(end_offset).expect("offsets are not negative");
                if end_offset < self.commit {
                    self.ghost
                        .violate(format!("truncated to {end_offset} below commit point {}", self.commit));
                }
                self.log.batches.truncate(keep);
                self.log.entries.truncate(keep);
                self.log.durable_count = self.log.durable_count.min(keep);
                self.log.truncations += 1;
                assert_eq!(truncations, self.log.truncations, "the core counts truncations as the log does");
            }
            Action::StartLog { .. } => unreachable!("the model trims no log, so no leader sends StartAt"),
            Action::PersistHardState(hard) => self.pending_hard = Some(hard),
            Action::Commit { high_watermark } => {
                if high_watermark <= self.commit {
                    self.ghost
                        .violate(format!("commit point moved from {} to {high_watermark}", self.commit));
                }
                self.commit = high_watermark;
            }
            Action::Role { term, role, .. } => {
                if role == Role::Leader && !self.ghost.led_terms.contains(&term) {
                    self.ghost.led_terms.push(term);
                }
            }
        }
    }

    /// Checks what one replica can break alone and extends its committed record.
    fn check(&mut self) {
        // In memory the term never goes back; across a restart, never below what was persisted
        // (a term raised but never persisted reached no one: nothing left before the persist).
        let term = self.group.term();
        if term < self.term || term < self.ghost.term_max {
            let before = self.term.max(self.ghost.term_max);
            self.ghost.violate(format!("term went back from {before} to {term}"));
        }
        self.term = term;
        self.ghost.term_max = self.ghost.term_max.max(self.persisted.term);
        let starts = self.group.epochs().starts();
        if starts.windows(2).any(|w| w[0].epoch >= w[1].epoch || w[0].start_offset >= w[1].start_offset) {
            self.ghost.violate(format!("epochs do not grow: {starts:?}"));
        }
        if self.log.entries.iter().any(|e| e.epoch > term) {
            self.ghost.violate(format!("an entry's epoch exceeds term {term}"));
        }
        let hw = usize::try_from(self.group.high_watermark()).expect("not negative");
        if hw > self.log.entries.len() {
            self.ghost.violate(format!("commit point {hw} past the log end {}", self.log.end()));
            return;
        }
        let common = hw.min(self.ghost.committed.len());
        if let Some(offset) = (0..common).find(|&o| self.log.entries[o] != self.ghost.committed[o]) {
            self.ghost.violate(format!(
                "committed offset {offset} changed from {:?} to {:?}",
                self.ghost.committed[offset], self.log.entries[offset]
            ));
        }
        if hw > self.ghost.committed.len() {
            let more = self.log.entries[self.ghost.committed.len()..hw].to_vec();
            self.ghost.committed.extend(more);
        }
        self.fingerprint = self.compute_fingerprint();
    }

    fn compute_fingerprint(&self) -> u64 {
        let mut text = String::new();
        write!(text, "{:?}", self.group).expect("writing to a String");
        let mut hasher = DefaultHasher::new();
        text.hash(&mut hasher);
        self.log.hash(&mut hasher);
        (self.persisted.term, self.persisted.voted_for, self.persisted.recovering).hash(&mut hasher);
        self.pending_hard.map(|h| (h.term, h.voted_for, h.recovering)).hash(&mut hasher);
        (self.ticks, self.commit, self.term).hash(&mut hasher);
        self.ghost.hash(&mut hasher);
        hasher.finish()
    }

    fn storage(&self) -> Storage {
        Storage {
            batches: self.log.batches[..self.log.durable_count].to_vec(),
            hard: (self.persisted.term, self.persisted.voted_for, self.persisted.recovering),
            restarts: self.start.restarts,
            ghost: self.ghost.clone(),
        }
    }

    fn holds(&self, value: u8) -> bool {
        let crc = batch::parse(&client_batch(value)).expect("valid").crc;
        self.log.entries.iter().any(|e| !e.control && e.crc == crc)
    }
}

impl Clone for Replica {
    fn clone(&self) -> Replica {
        let mut copy = Replica::start(self.bounds, self.index, self.start.clone());
        for input in &self.inputs {
            copy.step(input.clone());
        }
        debug_assert_eq!(copy.fingerprint, self.fingerprint, "replay is deterministic");
        copy
    }
}

impl PartialEq for Replica {
    fn eq(&self, other: &Replica) -> bool {
        self.fingerprint == other.fingerprint
    }
}
impl Hash for Replica {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.fingerprint.hash(state);
    }
}

/// The stateright actor around a [`Replica`].
struct ReplicaActor {
    bounds: Bounds,
}

impl ReplicaActor {
    /// Applies `input` to a copy of the state; keeps the copy only if something changed.
    fn apply(&self, state: &mut Cow<Replica>, input: Input, o: &mut Out<Self>) {
        let mut next = state.as_ref().clone();
        let sent = next.step(input);
        if sent.is_empty() && next.fingerprint == state.fingerprint {
            return;
        }
        for message in sent {
            let to = Id::from(message.to as usize - 1);
            let key = format!("{message:?}");
            o.send(to, Msg::Raft(Wire { message, key }));
        }
        let storage = next.storage();
        if storage != state.storage() {
            o.save(storage);
        }
        Self::set_timers(&next, o);
        *state = Cow::Owned(next);
    }

    fn set_timers(replica: &Replica, o: &mut Out<Self>) {
        let mut timer = |timer: Timer, wanted: bool| {
            if wanted {
                o.set_timer(timer, model_timeout());
            } else {
                o.cancel_timer(timer);
            }
        };
        timer(Timer::Tick, replica.ticks < replica.bounds.ticks_max[replica.index]);
        timer(Timer::Flush, replica.log.durable_count < replica.log.batches.len());
        timer(Timer::Persist, replica.pending_hard.is_some());
    }
}

impl Actor for ReplicaActor {
    type Msg = Msg;
    type State = Replica;
    type Timer = Timer;
    type Random = ();
    type Storage = Storage;

    fn on_start(&self, id: Id, storage: &Option<Storage>, o: &mut Out<Self>) -> Replica {
        let start = match storage {
            Some(storage) => Storage { restarts: storage.restarts + 1, ..storage.clone() },
            None => Storage::default(),
        };
        let replica = Replica::start(self.bounds, usize::from(id), start);
        o.save(replica.storage());
        Self::set_timers(&replica, o);
        replica
    }

    fn on_msg(&self, _id: Id, state: &mut Cow<Replica>, _src: Id, msg: Msg, o: &mut Out<Self>) {
        match msg {
            Msg::Propose(value) => {
                if state.group.role() == Role::Leader && !state.holds(value) {
                    self.apply(state, Input::Propose(value), o);
                }
            }
            Msg::Raft(wire) => self.apply(state, Input::Receive(wire.message), o),
        }
    }

    fn on_timeout(&self, _id: Id, state: &mut Cow<Replica>, timer: &Timer, o: &mut Out<Self>) {
        let input = match timer {
            Timer::Tick => Input::Tick,
            Timer::Flush => Input::Flush,
            Timer::Persist => Input::Persist,
        };
        self.apply(state, input, o);
    }
}

type State = ActorModelState<ReplicaActor>;

fn replicas(state: &State) -> impl Iterator<Item = &Replica> {
    state.actor_states.iter().map(|r| &**r)
}

fn within_bounds(bounds: &Bounds, state: &State) -> bool {
    let restarts: u32 = state.actor_storages.iter().flatten().map(|s| s.restarts).sum();
    restarts <= bounds.restarts_max
        && replicas(state)
            .all(|r| r.group.term() <= bounds.term_max && r.log.batches.len() <= bounds.log_end_max)
}

fn no_replica_violation(_: &ActorModel<ReplicaActor, Bounds>, state: &State) -> bool {
    replicas(state).all(|r| r.ghost.violation.is_none())
}

fn one_leader_per_term(_: &ActorModel<ReplicaActor, Bounds>, state: &State) -> bool {
    let all: Vec<&Replica> = replicas(state).collect();
    all.iter().enumerate().all(|(i, a)| {
        all[i + 1..].iter().all(|b| a.ghost.led_terms.iter().all(|t| !b.ghost.led_terms.contains(t)))
    })
}

fn prefixes_agree(a: &[Entry], b: &[Entry]) -> bool {
    a.iter().zip(b).all(|(x, y)| x == y)
}

fn committed_records_agree(_: &ActorModel<ReplicaActor, Bounds>, state: &State) -> bool {
    let all: Vec<&Replica> = replicas(state).collect();
    all.iter()
        .enumerate()
        .all(|(i, a)| all[i + 1..].iter().all(|b| prefixes_agree(&a.ghost.committed, &b.ghost.committed)))
}

fn log_matching(_: &ActorModel<ReplicaActor, Bounds>, state: &State) -> bool {
    let all: Vec<&Replica> = replicas(state).collect();
    all.iter().enumerate().all(|(i, a)| {
        all[i + 1..].iter().all(|b| {
            let (x, y) = (&a.log.entries, &b.log.entries);
            let last_same_epoch = (0..x.len().min(y.len())).rev().find(|&o| x[o].epoch == y[o].epoch);
            last_same_epoch.is_none_or(|o| x[..=o] == y[..=o])
        })
    })
}

fn client_batch_committed(_: &ActorModel<ReplicaActor, Bounds>, state: &State) -> bool {
    replicas(state).any(|r| r.ghost.committed.iter().any(|e| !e.control))
}

fn model(bounds: Bounds) -> ActorModel<ReplicaActor, Bounds> {
    let client = Id::from(REPLICAS);
    let proposals = VALUES[..bounds.values].iter().flat_map(|value| {
        (0..REPLICAS).map(move |i| Envelope { src: client, dst: Id::from(i), msg: Msg::Propose(*value) })
    });
    ActorModel::new(bounds, ())
        .actors((0..REPLICAS).map(|_| ReplicaActor { bounds }))
        .init_network(Network::new_unordered_duplicating(proposals))
        .lossy_network(if bounds.lossy { LossyNetwork::Yes } else { LossyNetwork::No })
        .max_crashes(if bounds.restarts_max > 0 { 1 } else { 0 })
        .property(Expectation::Always, "replica alone", no_replica_violation)
        .property(Expectation::Always, "one leader per term", one_leader_per_term)
        .property(Expectation::Always, "committed records agree", committed_records_agree)
        .property(Expectation::Always, "log matching", log_matching)
        .property(Expectation::Sometimes, "a client batch is committed", client_batch_committed)
        .within_boundary(within_bounds)
}

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// The replica-local violation message in a counterexample's last state, for the report.
fn violation_in(state: &State) -> String {
    replicas(state).filter_map(|r| r.ghost.violation.clone()).collect::<Vec<_>>().join("; ")
}

/// Breadth-first to `PYRALOG_MODEL_DEPTH` events (default 10) with terms ≤ 2, log end ≤ 3,
/// 4 `Tick`s per replica life, 1 restart, 2 client values, lossless duplicating network
/// (each overridable: `PYRALOG_MODEL_TERMS`, `_LOG`, `_TICKS`, `_RESTARTS`, `_VALUES`,
/// `_LOSSY=1`; `PYRALOG_MODEL_DEPTH=0` runs to exhaustion, which does not end in hours;
/// `PYRALOG_MODEL_BUG=1` plants `CommitEarlierTerm`).
///
/// Measured (debug profile: this crate at opt-level 2, stateright at 0; 2 shared cores):
/// depth 10: 230,225 unique states (634,023 visited) in 13 s; depth 12: 3,555,896 unique
/// (9,724,957 visited) in 241 s. Lossy, depth 10: 389,988 unique (1,684,451) in 13 s.
#[test]
fn bounded_model_keeps_every_safety_property() {
    let bounds = Bounds {
        term_max: env_or("PYRALOG_MODEL_TERMS", 2) as i32,
        log_end_max: env_or("PYRALOG_MODEL_LOG", 3),
        ticks_max: [env_or("PYRALOG_MODEL_TICKS", 4) as u32; REPLICAS],
        restarts_max: env_or("PYRALOG_MODEL_RESTARTS", 1) as u32,
        values: env_or("PYRALOG_MODEL_VALUES", 2),
        lossy: env_or("PYRALOG_MODEL_LOSSY", 0) == 1,
        bug: (env_or("PYRALOG_MODEL_BUG", 0) == 1).then_some(PlantedBug::CommitEarlierTerm),
    };
    let depth = env_or("PYRALOG_MODEL_DEPTH", 10);
    let started = Instant::now();
    let mut checker = model(bounds).checker().threads(2);
    if depth > 0 {
        checker = checker.target_max_depth(depth);
    }
    let checker = checker.spawn_bfs().join();
    println!(
        "model: {bounds:?}, depth {depth}: {} states ({} unique), max depth {}, {:?}",
        checker.state_count(),
        checker.unique_state_count(),
        checker.max_depth(),
        started.elapsed()
    );
    assert!(checker.is_done(), "the search ends at its depth");
    for name in ALWAYS {
        if let Some(path) = checker.discovery(name) {
            let violation = violation_in(path.last_state());
            panic!("{name} broken ({violation}) after events {:#?}", path.into_actions());
        }
    }
}

/// The properties that must hold in every reachable state.
const ALWAYS: [&str; 4] = ["replica alone", "one leader per term", "committed records agree", "log matching"];

/// Not vacuous: a depth-first search reaches a committed client batch (50 to 55 events on the
/// first path it takes, a few seconds), so the properties are checked on states that matter.
#[test]
fn a_client_batch_can_be_committed() {
    let bounds = Bounds {
        term_max: 2,
        log_end_max: 3,
        ticks_max: [4; REPLICAS],
        restarts_max: 0,
        values: 2,
        lossy: false,
        bug: None,
    };
    let started = Instant::now();
    let checker = model(bounds)
        .checker()
        .threads(2)
        .finish_when(stateright::HasDiscoveries::AnyOf(["a client batch is committed"].into()))
        .spawn_dfs()
        .join();
    let path = checker.assert_any_discovery("a client batch is committed");
    println!(
        "commit found after {} steps, {} states, {:?}",
        path.into_actions().len(),
        checker.unique_state_count(),
        started.elapsed()
    );
}
