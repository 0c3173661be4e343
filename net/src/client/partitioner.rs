//! Choosing the partition of a record.
//!
//! [`Partitioner`] is the policy a producer is configured with; [`PartitionSelector`] is its
//! per-producer state (round-robin counter, sticky partition, random generator). Keyed records
//! under [`Partitioner::KeyHash`] land where the Kafka Java client's default partitioner puts
//! them, `(murmur2(key) & 0x7fffffff) % partitions`, so Pyralog and Kafka agree on placement;
//! keyless records fall back to sticky.
//!
//! Invariant: every choice is in `0..partitions`, and `partitions` is never zero.

/// How a producer spreads records over a topic's partitions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Partitioner {
    /// Kafka's murmur2 of the key; keyless records go sticky.
    #[default]
    KeyHash,
    /// Each record to the next partition in turn.
    RoundRobin,
    /// All records to one partition until its batch is sent, then move on.
    Sticky,
    /// A uniformly random partition per record.
    Random,
}

/// The mutable state behind a [`Partitioner`]. One per producer, used from one thread.
#[derive(Debug, Clone)]
pub struct PartitionSelector {
    policy: Partitioner,
    next_round_robin: u32,
    sticky: Option<u32>,
    random: XorShift64,
}

impl PartitionSelector {
    /// `seed` varies the random and sticky choices between producers; any value works.
    pub fn new(policy: Partitioner, seed: u64) -> PartitionSelector {
        PartitionSelector { policy, next_round_robin: 0, sticky: None, random: XorShift64::new(seed) }
    }

    pub fn policy(&self) -> Partitioner {
        self.policy
    }

    /// The partition for a record with `key`, in `0..partitions`.
    pub fn choose(&mut self, key: Option<&[u8]>, partitions: u32) -> u32 {
        assert!(partitions > 0, "a topic has at least one partition");
        let partition = match (self.policy, key) {
            (Partitioner::KeyHash, Some(key)) => key_hash_partition(key, partitions),
            (Partitioner::KeyHash | Partitioner::Sticky, _) => self.sticky(partitions),
            (Partitioner::RoundRobin, _) => {
                let partition = self.next_round_robin % partitions;
                self.next_round_robin = self.next_round_robin.wrapping_add(1);
                partition
            }
            (Partitioner::Random, _) => self.random.below(partitions),
        };
        assert!(partition < partitions);
        partition
    }

    /// Tells the selector that `partition`'s batch was sent: sticky choices move elsewhere.
    pub fn batch_sent(&mut self, partition: u32, partitions: u32) {
        if self.sticky != Some(partition) {
            return;
        }
        self.sticky = if partitions > 1 {
            // Any partition but the one just filled, uniformly.
            let step = 1 + self.random.below(partitions - 1);
            Some((partition + step) % partitions)
        } else {
            None
        };
    }

    fn sticky(&mut self, partitions: u32) -> u32 {
        match self.sticky {
            Some(partition) if partition < partitions => partition,
            _ => {
                let partition = self.random.below(partitions);
                self.sticky = Some(partition);
                partition
            }
        }
    }
}

/// The Kafka Java client's partition for a keyed record.
pub fn key_hash_partition(key: &[u8], partitions: u32) -> u32 {
    assert!(partitions > 0, "a topic has at least one partition");
    (murmur2(key) & 0x7fff_ffff) as u32 % partitions
}

/// Murmur2, 32-bit, seed 0x9747b28c: bit for bit Kafka's `Utils.murmur2`.
pub fn murmur2(data: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    // Kafka takes the length as a Java int; keys are far below 2 GiB.
    let mut h = SEED ^ data.len() as u32;
    let mut words = data.chunks_exact(4);
    for word in &mut words {
        let mut k = u32::from_le_bytes(word.try_into().expect("chunks of 4"));
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let tail = words.remainder();
    if !tail.is_empty() {
        for (i, byte) in tail.iter().enumerate().rev() {
            h ^= u32::from(*byte) << (8 * i);
        }
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// Marsaglia's xorshift64: plenty for spreading records, and no dependency.
#[derive(Debug, Clone)]
struct XorShift64(u64);

impl XorShift64 {
    fn new(seed: u64) -> XorShift64 {
        // Zero is xorshift's fixed point; mix the seed so nearby seeds diverge at once.
        XorShift64((seed ^ 0x9e37_79b9_7f4a_7c15).max(1))
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn below(&mut self, bound: u32) -> u32 {
        assert!(bound > 0);
        (((self.next() >> 32) * u64::from(bound)) >> 32) as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur2_matches_kafka() {
        let vectors: [(&[u8], i32); 6] = [
            (b"21", -973932308),
            (b"foobar", -790332482),
            (b"a-little-bit-long-string", -985981536),
            (b"a-little-bit-longer-string", -1486304829),
            (b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58897971),
            (b"abc", 479470107),
        ];
        for (key, expected) in vectors {
            assert_eq!(murmur2(key), expected, "key {:?}", String::from_utf8_lossy(key));
        }
    }

    #[test]
    fn key_hash_is_stable_and_in_range() {
        let mut selector = PartitionSelector::new(Partitioner::KeyHash, 1);
        for partitions in 1..20 {
            let first = selector.choose(Some(b"foobar"), partitions);
            assert!(first < partitions);
            assert_eq!(selector.choose(Some(b"foobar"), partitions), first);
        }
        // (-790332482 & 0x7fffffff) % 7.
        assert_eq!(key_hash_partition(b"foobar", 7), ((-790332482i32 & 0x7fff_ffff) % 7) as u32);
    }

    #[test]
    fn round_robin_cycles() {
        let mut selector = PartitionSelector::new(Partitioner::RoundRobin, 0);
        let chosen: Vec<_> = (0..6).map(|_| selector.choose(Some(b"key ignored"), 3)).collect();
        assert_eq!(chosen, [0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn sticky_stays_until_its_batch_is_sent() {
        for policy in [Partitioner::Sticky, Partitioner::KeyHash] {
            let mut selector = PartitionSelector::new(policy, 7);
            let first = selector.choose(None, 4);
            assert!((0..10).all(|_| selector.choose(None, 4) == first));
            selector.batch_sent((first + 1) % 4, 4);
            assert_eq!(selector.choose(None, 4), first);
            selector.batch_sent(first, 4);
            let second = selector.choose(None, 4);
            assert_ne!(second, first);
            assert!(second < 4);
        }
    }

    #[test]
    fn random_covers_every_partition() {
        let mut selector = PartitionSelector::new(Partitioner::Random, 42);
        let mut seen = [0u32; 5];
        for _ in 0..1_000 {
            seen[selector.choose(None, 5) as usize] += 1;
        }
        assert!(seen.iter().all(|count| *count > 100), "{seen:?}");
    }
}
