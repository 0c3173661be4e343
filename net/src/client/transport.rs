//! What a [`super::Producer`] and a [`super::Consumer`] need of a broker, so the same batching,
//! pipelining and prefetching code runs over the native protocol ([`super::Client`]) and over
//! the Kafka wire protocol ([`super::KafkaClient`]).
//!
//! Both implementations keep the same promises: requests to one partition leave in call order
//! on one connection (so the broker appends produced batches in that order), every wait is
//! bounded by the request timeout, and a broker that goes away turns every pending and later
//! request into an error for which [`super::ClientError::is_disconnect`] is true.
//!
//! A transport that follows leaders ([`super::failover`]; both clients do) says which
//! errors mean the partition's leader moved and reads the metadata again on request; the
//! producer and consumer then send the request again, in order, within the retry budget. The
//! defaults follow nothing: every error is final, as before clusters.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::pipeline::Doorbell;
use super::{Acks, Client, ClientError, FetchResult, PendingFetch, PendingProduce, ProduceAck, Result};

/// A request on its way whose outcome is a `T`.
pub trait Pending<T>: Send + std::fmt::Debug {
    /// Blocks for the outcome, at most until the request timeout counted from the send.
    fn wait(self) -> Result<T>;
    /// The outcome if it is known, without blocking: `None` while it is still due. `now` is
    /// the caller's clock reading, against which the request timeout is checked.
    fn try_wait(&mut self, now: Instant) -> Option<Result<T>>;
    /// Rings `doorbell` once the outcome is known (at once if it already is), so one thread
    /// can wait for whichever of several requests completes first.
    fn ring_on_completion(&self, doorbell: &Arc<Doorbell>);
    /// Blocks for the outcome at most `limit`, never past the request timeout: `None` if it
    /// is still due then.
    fn wait_within(&mut self, limit: Duration) -> Option<Result<T>>;
    /// Gives up on the outcome before the request timeout: the caller sends the request
    /// elsewhere (its connection's slot is freed where the protocol allows).
    fn abandon(self);
}

/// A broker connection that produces and fetches record batches of a topic's partitions.
pub trait Transport: Clone + Send + Sync + std::fmt::Debug + 'static {
    type PendingProduce: Pending<ProduceAck>;
    type PendingFetch: Pending<FetchResult>;

    /// A handle for one producer or one consumer, sharing this one's metadata. The native
    /// client shares its connections too (the native protocol matches responses by correlation
    /// id, so nothing waits behind a slow request); a Kafka client opens a connection of its
    /// own, as a Kafka broker answers each connection's requests in order and a consumer's
    /// long-poll would otherwise hold back a producer's acknowledgements.
    fn session(&self) -> Self;

    /// The topic's partition count; a missing topic is
    /// `ClientError::Server { code: ErrorCode::UnknownTopic, .. }`.
    fn partition_count(&self, topic: &str) -> Result<u32>;

    /// Creates the topic; an existing one is
    /// `ClientError::Server { code: ErrorCode::TopicAlreadyExists, .. }`.
    fn create_topic(&self, topic: &str, partitions: u32) -> Result<()>;

    /// The offset for `spec`: [`super::OFFSET_EARLIEST`], [`super::OFFSET_LATEST`] or a
    /// timestamp in ms.
    fn list_offsets(&self, topic: &str, partition: u32, spec: i64) -> Result<i64>;

    /// Sends one or more whole batches to a partition and returns at once. Under `Acks::None`
    /// the outcome is known at once: [`super::OFFSET_UNACKNOWLEDGED`].
    fn produce_async(
        &self,
        topic: &str,
        partition: u32,
        records: Bytes,
        acks: Acks,
    ) -> Result<Self::PendingProduce>;

    /// Asks for whole batches from `offset`, waiting up to `max_wait_ms` for data to arrive.
    fn fetch_async(
        &self,
        topic: &str,
        partition: u32,
        offset: i64,
        max_bytes: u32,
        max_wait_ms: u32,
    ) -> Result<Self::PendingFetch>;

    /// Whether `error`, from a request for `topic`/`partition`, may succeed on the partition's
    /// leader once [`Transport::refresh_leaders`] has run: the leader moved.
    fn leader_moved(&self, _topic: &str, _partition: u32, _error: &ClientError) -> bool {
        false
    }

    /// Reads again where `topic`'s partitions are led.
    fn refresh_leaders(&self, _topic: &str) -> Result<()> {
        Ok(())
    }

    /// Where the partition's requests go now, if the transport follows leaders: a producer
    /// whose earlier batches went elsewhere settles them first, so that none is overtaken.
    fn leader_addr(&self, _topic: &str, _partition: u32) -> Option<std::net::SocketAddr> {
        None
    }

    /// The partition's leader as last known, for the error that ends the retries.
    fn leader_name(&self, _topic: &str, _partition: u32) -> String {
        "unknown".to_owned()
    }

    /// Asked when a request to the partition's leader has gone unanswered for
    /// [`super::failover::LEADER_CHECK_INTERVAL`]: reads the metadata from the other nodes
    /// and, if they name a leader of a later epoch (the silent one was replaced: paused, or
    /// cut off), keeps it and returns its name. `None` when they name the same leader, or none
    /// answers.
    fn leader_replaced(&self, _topic: &str, _partition: u32) -> Option<String> {
        None
    }

    /// An id and epoch for an idempotent producer, if the broker hands them out (`None`: it
    /// does not, and the producer's batches carry none: at least once across failovers).
    fn init_producer_id(&self) -> Result<Option<(i64, i16)>> {
        Ok(None)
    }

    /// How long a request keeps following its partition's leader from its first failure.
    fn leader_retry_budget(&self) -> Duration {
        Duration::ZERO
    }
}

impl Pending<ProduceAck> for PendingProduce {
    fn wait(self) -> Result<ProduceAck> {
        PendingProduce::wait(self)
    }

    fn try_wait(&mut self, now: Instant) -> Option<Result<ProduceAck>> {
        PendingProduce::try_wait(self, now)
    }

    fn ring_on_completion(&self, doorbell: &Arc<Doorbell>) {
        match &self.response {
            Some(response) => response.ring_on_completion(doorbell),
            None => doorbell.ring(),
        }
    }

    fn wait_within(&mut self, limit: Duration) -> Option<Result<ProduceAck>> {
        PendingProduce::wait_within(self, limit)
    }

    fn abandon(self) {
        if let Some(response) = self.response {
            response.abandon();
        }
    }
}

impl Pending<FetchResult> for PendingFetch {
    fn wait(self) -> Result<FetchResult> {
        PendingFetch::wait(self)
    }

    fn try_wait(&mut self, now: Instant) -> Option<Result<FetchResult>> {
        PendingFetch::try_wait(self, now)
    }

    fn ring_on_completion(&self, doorbell: &Arc<Doorbell>) {
        self.response.ring_on_completion(doorbell);
    }

    fn wait_within(&mut self, limit: Duration) -> Option<Result<FetchResult>> {
        PendingFetch::wait_within(self, limit)
    }

    fn abandon(self) {
        self.response.abandon();
    }
}

impl Transport for Client {
    type PendingProduce = PendingProduce;
    type PendingFetch = PendingFetch;

    fn session(&self) -> Client {
        self.clone()
    }

    fn partition_count(&self, topic: &str) -> Result<u32> {
        Client::partition_count(self, topic)
    }

    fn create_topic(&self, topic: &str, partitions: u32) -> Result<()> {
        Client::create_topic(self, topic, partitions)
    }

    fn list_offsets(&self, topic: &str, partition: u32, spec: i64) -> Result<i64> {
        Client::list_offsets(self, topic, partition, spec)
    }

    fn produce_async(
        &self,
        topic: &str,
        partition: u32,
        records: Bytes,
        acks: Acks,
    ) -> Result<PendingProduce> {
        Client::produce_async(self, topic, partition, records, acks)
    }

    fn fetch_async(
        &self,
        topic: &str,
        partition: u32,
        offset: i64,
        max_bytes: u32,
        max_wait_ms: u32,
    ) -> Result<PendingFetch> {
        Client::fetch_async(self, topic, partition, offset, max_bytes, max_wait_ms)
    }

    fn leader_moved(&self, topic: &str, partition: u32, error: &ClientError) -> bool {
        Client::leader_moved(self, topic, partition, error)
    }

    fn refresh_leaders(&self, topic: &str) -> Result<()> {
        self.metadata(&[topic]).map(drop)
    }

    fn leader_name(&self, topic: &str, partition: u32) -> String {
        Client::leader_name(self, topic, partition)
    }

    fn leader_addr(&self, topic: &str, partition: u32) -> Option<std::net::SocketAddr> {
        let cache = self.inner.topics.read().unwrap_or_else(|p| p.into_inner());
        cache.get(topic)?.iter().find(|r| r.info.partition == partition).map(|r| r.leader)
    }

    fn leader_replaced(&self, topic: &str, partition: u32) -> Option<String> {
        Client::leader_replaced(self, topic, partition)
    }

    fn init_producer_id(&self) -> Result<Option<(i64, i16)>> {
        Client::init_producer_id(self)
    }

    fn leader_retry_budget(&self) -> Duration {
        self.inner.options.leader_retry_budget
    }
}
