//! Flexible quorums: replication factor RF, write quorum W, election quorum E.
//!
//! The commit point is the largest offset durable on W replicas, leader included. An election
//! needs E votes, candidate included, with E = max(RF − W + 1, ⌊RF/2⌋ + 1): every election
//! quorum meets every write quorum (Flexible Paxos: E + W > RF), and, because two candidates
//! may share a term in Raft, every other election quorum too (FlexiRaft: 2E > RF).
//!
//! What the presets cost, for RF = 3 and RF = 5 (a replica "down" is crashed or cut off):
//! - `balanced` (default, W = E = ⌊RF/2⌋ + 1): writes and elections both go on with up to
//!   ⌊(RF−1)/2⌋ replicas down (1 of 3, 2 of 5). Nothing acknowledged is lost unless more than
//!   that many lose their disks at once.
//! - `write-optimized` (W = 2 for RF ≥ 3, so E = RF − 1): a write is acknowledged after two
//!   durable copies, so writes go on with RF − 2 down; but an election needs RF − 1 votes, so
//!   with 2 replicas down (of any RF ≥ 3) no leader can be elected until one returns. An
//!   acknowledged write may live on only 2 replicas: losing both disks loses it.
//! - `read-optimized` (W = RF, E = ⌊RF/2⌋ + 1): every replica holds every committed record, so
//!   any replica can serve reads up to the commit point; but one replica down stops writes
//!   (until the group's membership drops it), while elections still go on with a majority.
//!
//! Invariants: a [`Quorum`] only exists with 1 ≤ W ≤ RF, E + W > RF and 2E > RF.

use crate::error::{ReplicationError, Result};

/// The largest replication factor a group may have.
pub const REPLICATION_FACTOR_MAX: u32 = 7;

/// The named strategies users pick instead of numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    Balanced,
    WriteOptimized,
    ReadOptimized,
}

impl Preset {
    /// Parses `balanced`, `write-optimized` or `read-optimized`.
    pub fn parse(name: &str) -> Result<Preset> {
        match name {
            "balanced" => Ok(Preset::Balanced),
            "write-optimized" => Ok(Preset::WriteOptimized),
            "read-optimized" => Ok(Preset::ReadOptimized),
            other => Err(ReplicationError::Config {
                reason: format!(
                    "unknown quorum preset {other:?}: use balanced, write-optimized or read-optimized"
                ),
            }),
        }
    }
}

/// A checked quorum configuration of one group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quorum {
    replication_factor: u32,
    write_quorum: u32,
    election_quorum: u32,
}

impl Quorum {
    /// The quorum for `replication_factor` and `write_quorum` with the smallest safe E.
    pub fn new(replication_factor: u32, write_quorum: u32) -> Result<Quorum> {
        let majority = replication_factor / 2 + 1;
        let election_quorum = (replication_factor + 1).saturating_sub(write_quorum).max(majority);
        Quorum::with_election_quorum(replication_factor, write_quorum, election_quorum)
    }

    /// A quorum with an explicit E, refused unless it meets every write and election quorum.
    pub fn with_election_quorum(
        replication_factor: u32,
        write_quorum: u32,
        election_quorum: u32,
    ) -> Result<Quorum> {
        let refuse = |reason: String| Err(ReplicationError::Config { reason });
        if replication_factor == 0 || replication_factor > REPLICATION_FACTOR_MAX {
            return refuse(format!(
                "replication factor {replication_factor} is outside 1..={REPLICATION_FACTOR_MAX}"
            ));
        }
        if write_quorum == 0 || write_quorum > replication_factor {
            return refuse(format!(
                "write quorum (min.insync.replicas) {write_quorum} is outside 1..={replication_factor} \
                 for replication factor {replication_factor}"
            ));
        }
        if election_quorum > replication_factor {
            return refuse(format!(
                "election quorum {election_quorum} exceeds replication factor {replication_factor}"
            ));
        }
        if election_quorum + write_quorum <= replication_factor {
            return refuse(format!(
                "election quorum {election_quorum} and write quorum {write_quorum} need not meet among \
                 {replication_factor} replicas: a new leader could miss acknowledged writes (need E + W > RF)"
            ));
        }
        if 2 * election_quorum <= replication_factor {
            return refuse(format!(
                "two election quorums of {election_quorum} need not meet among {replication_factor} \
                 replicas: two leaders could share a term (need 2E > RF)"
            ));
        }
        Ok(Quorum { replication_factor, write_quorum, election_quorum })
    }

    /// The quorum a preset names for `replication_factor`.
    pub fn preset(preset: Preset, replication_factor: u32) -> Result<Quorum> {
        let write_quorum = match preset {
            Preset::Balanced => replication_factor / 2 + 1,
            Preset::WriteOptimized => replication_factor.min(2),
            Preset::ReadOptimized => replication_factor,
        };
        Quorum::new(replication_factor, write_quorum)
    }

    pub fn replication_factor(&self) -> u32 {
        self.replication_factor
    }
    pub fn write_quorum(&self) -> u32 {
        self.write_quorum
    }
    pub fn election_quorum(&self) -> u32 {
        self.election_quorum
    }

    /// A quorum without the intersection checks, for the planted-bug test only.
    #[cfg(any(test, feature = "sim"))]
    pub fn unchecked_for_tests(replication_factor: u32, write_quorum: u32, election_quorum: u32) -> Quorum {
        Quorum { replication_factor, write_quorum, election_quorum }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_give_the_documented_numbers() {
        let q = |p, rf| {
            let q = Quorum::preset(p, rf).expect("presets are valid");
            (q.write_quorum(), q.election_quorum())
        };
        assert_eq!(q(Preset::Balanced, 3), (2, 2));
        assert_eq!(q(Preset::Balanced, 5), (3, 3));
        assert_eq!(q(Preset::WriteOptimized, 3), (2, 2));
        assert_eq!(q(Preset::WriteOptimized, 5), (2, 4));
        assert_eq!(q(Preset::ReadOptimized, 5), (5, 3));
        assert_eq!(q(Preset::Balanced, 1), (1, 1));
    }

    #[test]
    fn every_accepted_quorum_intersects_and_bad_ones_are_refused_with_a_reason() {
        for rf in 1..=REPLICATION_FACTOR_MAX {
            for w in 1..=rf {
                let q = Quorum::new(rf, w).expect("the computed E is always safe");
                assert!(q.election_quorum() + q.write_quorum() > rf);
                assert!(2 * q.election_quorum() > rf);
                for e in 1..=rf {
                    let ok = e + w > rf && 2 * e > rf;
                    assert_eq!(Quorum::with_election_quorum(rf, w, e).is_ok(), ok, "rf {rf} w {w} e {e}");
                }
            }
        }
        let refused = Quorum::with_election_quorum(5, 2, 3).expect_err("E=3 misses W=2 of 5");
        assert!(refused.to_string().contains("E + W > RF"), "{refused}");
        assert!(Quorum::new(3, 0).is_err());
        assert!(Quorum::new(3, 4).is_err());
        assert!(Quorum::new(0, 0).is_err());
        assert!(Preset::parse("fast").is_err());
    }
}
