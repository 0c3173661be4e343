//! Following a partition's leader when it moves: which errors mean "ask again elsewhere", and
//! how long and how often to ask.
//!
//! In a cluster a replicated partition is served by its leader's node only; every other node
//! answers [`ErrorCode::NotLeader`]. A leader also moves when its node goes down, which the
//! client sees as a refused or lost connection. Either way the request may succeed on the new
//! leader: the client reads the metadata again (from any node it knows) and resends there,
//! after a backoff that starts at [`LEADER_RETRY_BACKOFF_FIRST`] and doubles up to
//! [`LEADER_RETRY_BACKOFF_MAX`], for at most [`ConnectOptions::leader_retry_budget`]
//! ([`LEADER_RETRY_BUDGET_DEFAULT`], 10 s) from the first failure. Past the budget the request
//! fails with [`ClientError::LeaderUnavailable`], which names the partition, the leader last
//! known and the last error.
//!
//! A lost connection is retried only for a partition with replicas on other nodes: a node of
//! its own has no one to fail over to, and its clients learn at once that it is gone. So is a
//! request the node did not answer within the request timeout
//! ([`ConnectOptions::request_timeout`]). A paused node (SIGSTOP, a stalled VM) or one cut off
//! by the network resets no connection, and the others elect a new leader after their
//! election timeout: a producer does not wait for its request timeout to find it. A batch its
//! leader leaves unanswered for [`LEADER_CHECK_INTERVAL`] makes it ask another node's metadata;
//! once that names a leader of a later epoch the batch is sent there (and so are the
//! partition's other batches waiting on the silent node), so the gap is about the election
//! plus one interval rather than the request timeout, which a Kafka client waits. A
//! consumer's fetch is looked into the same way once its long-poll wait and an interval have
//! passed; other requests (metadata aside) wait for their timeout. An
//! unknown topic is retried while the metadata names it: a node applies a new topic a moment
//! after the controller's leader does, and a client that read the metadata there may ask it
//! first (the next metadata read drops a topic that is really gone, which ends the retries).
//!
//! **Once, or at least once.** A produce whose answer was lost (the node went down, or lost
//! its leadership, after appending it) may already be in the log when it is sent again. An
//! idempotent [`super::Producer`] (the default) stamps its batches with a producer id and
//! sequence numbers, so the leader recognises such a batch and answers with the offsets it
//! got the first time: each batch is stored once, in send order. Without a producer id (a
//! producer made with `idempotent: false`, [`super::Client::produce`] on its own) a retried
//! batch may be stored twice, and with more than one batch of a
//! partition in flight land after a later one its old leader had already taken. Either way a
//! batch is reported acknowledged only when a node acknowledged it, so no acknowledged record
//! is lost.
//!
//! [`ErrorCode::NotLeader`]: super::ErrorCode::NotLeader
//! [`ConnectOptions::leader_retry_budget`]: super::ConnectOptions::leader_retry_budget
//! [`ConnectOptions::request_timeout`]: super::ConnectOptions::request_timeout
//! [`ClientError::LeaderUnavailable`]: super::ClientError::LeaderUnavailable

use std::time::{Duration, Instant};

use super::transport::Transport;
use super::{ClientError, Result};

/// How long a request keeps following its partition's leader, from its first failure.
pub const LEADER_RETRY_BUDGET_DEFAULT: Duration = Duration::from_secs(10);
/// How long a produce waits for its partition's leader before the client asks the other
/// nodes whether they elected a new one (and again each time this passes). Past the election
/// timeout (150-300 ms) plus an election's round trips, so that a leader paused or cut off is
/// usually found replaced at the first look; a look is one metadata request to one other node.
pub const LEADER_CHECK_INTERVAL: Duration = Duration::from_millis(500);
/// The pause before the first retry; each further retry doubles it.
pub const LEADER_RETRY_BACKOFF_FIRST: Duration = Duration::from_millis(10);
/// The longest pause between two retries: what a request may wait past the moment a new
/// leader is known (Kafka's retry.backoff.ms default). A retry costs a metadata request to
/// any node, small next to the gap a longer pause adds to every failover.
pub const LEADER_RETRY_BACKOFF_MAX: Duration = Duration::from_millis(100);

/// The retries of one partition's requests since their first failure.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Retry {
    started: Instant,
    retries: u32,
    budget: Duration,
}

impl Retry {
    pub(crate) fn new(now: Instant, budget: Duration) -> Retry {
        Retry { started: now, retries: 0, budget }
    }

    /// The pause before the next retry, counting it; `None` once the budget is spent (the
    /// pause would end past it).
    pub(crate) fn next_pause(&mut self, now: Instant) -> Option<Duration> {
        let doublings = self.retries.min(16);
        let pause = LEADER_RETRY_BACKOFF_FIRST.saturating_mul(1 << doublings).min(LEADER_RETRY_BACKOFF_MAX);
        let spent = now.saturating_duration_since(self.started);
        if spent + pause > self.budget {
            return None;
        }
        self.retries += 1;
        assert!(self.retries <= self.retries_max(), "the budget bounds the retries");
        Some(pause)
    }

    /// The error that ends the retries: `topic`/`partition`, its leader as last known (`leader`)
    /// and the last failure.
    pub(crate) fn exhausted(
        &self,
        topic: &str,
        partition: u32,
        leader: String,
        last: ClientError,
    ) -> ClientError {
        ClientError::LeaderUnavailable {
            topic: topic.to_owned(),
            partition,
            leader,
            retries: self.retries,
            waited: self.started.elapsed(),
            last: Box::new(last),
        }
    }

    /// Most retries a budget allows: one per first pause, a bound the assertion above checks.
    fn retries_max(&self) -> u32 {
        u32::try_from(self.budget.as_millis() / LEADER_RETRY_BACKOFF_FIRST.as_millis()).unwrap_or(u32::MAX)
    }
}

/// Runs `op` (a blocking request for `topic`/`partition` over `client`) until it succeeds,
/// fails for another reason than a moved leader, or the retry budget is spent, reading where
/// the topic is led again before each retry.
pub(crate) fn following_leader<C: Transport, T>(
    client: &C,
    topic: &str,
    partition: u32,
    mut op: impl FnMut() -> Result<T>,
) -> Result<T> {
    let mut retry: Option<Retry> = None;
    loop {
        let error = match op() {
            Err(error) if client.leader_moved(topic, partition, &error) => error,
            done => return done,
        };
        let now = Instant::now();
        let retry = retry.get_or_insert_with(|| Retry::new(now, client.leader_retry_budget()));
        let Some(pause) = retry.next_pause(now) else {
            return Err(retry.exhausted(topic, partition, client.leader_name(topic, partition), error));
        };
        std::thread::sleep(pause);
        // A failed read keeps the cache as it was; the next attempt's error says more.
        let _ = client.refresh_leaders(topic);
    }
}

/// Whether a request of `topic`/`partition` sent to `sent_to` (its leader then), and left
/// unanswered for [`LEADER_CHECK_INTERVAL`], went to a leader that has been replaced: the
/// metadata moved the partition since, or another node names a leader of a later epoch
/// ([`Transport::leader_replaced`]). False over a transport that does not follow leaders.
pub(crate) fn leader_left<T: Transport>(
    client: &T,
    topic: &str,
    partition: u32,
    sent_to: Option<std::net::SocketAddr>,
) -> bool {
    sent_to.is_some()
        && (client.leader_addr(topic, partition) != sent_to
            || client.leader_replaced(topic, partition).is_some())
}

/// Asks `candidates` in turn (`ask(candidate, wait)`, `wait` bounding the answer, `None`:
/// the request timeout) until one answers, and returns which and its answer. A candidate
/// that cannot be reached is passed over; so is one that does not answer within `short`,
/// if given (a metadata read: a silent node is why the caller needs another's view), and if
/// no candidate answered that fast the first is asked again with the whole request timeout
/// (they may all be slow rather than silent). Any other error is returned at once; if every
/// candidate failed, the first failure.
pub(crate) fn ask_in_turn<A: Copy, T>(
    candidates: &[A],
    short: Option<Duration>,
    mut ask: impl FnMut(A, Option<Duration>) -> Result<T>,
) -> Result<(A, T)> {
    let mut failure = None;
    for &candidate in candidates {
        match ask(candidate, short) {
            Ok(answer) => return Ok((candidate, answer)),
            Err(error) if error.is_disconnect() || short.is_some() && error.is_timeout() => {
                failure.get_or_insert(error);
            }
            Err(error) => return Err(error),
        }
    }
    let failure = failure.expect("a caller names at least one candidate");
    if failure.is_timeout() {
        if let Ok(answer) = ask(candidates[0], None) {
            return Ok((candidates[0], answer));
        }
    }
    Err(failure)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_double_up_to_the_cap_and_stop_at_the_budget() {
        let start = Instant::now();
        let mut retry = Retry::new(start, Duration::from_secs(2));
        let mut at = start;
        let mut pauses = Vec::new();
        while let Some(pause) = retry.next_pause(at) {
            pauses.push(pause.as_millis());
            at += pause;
        }
        let mut expected = vec![10, 20, 40, 80];
        expected.extend([100; 18]);
        assert_eq!(pauses, expected);
        assert!(at - start <= Duration::from_secs(2));
        assert_eq!(retry.retries, 22);
    }
}
