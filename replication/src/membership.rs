//! Group membership: the voter sets and learners of a group, and the configuration batches
//! that carry them in the log (joint consensus, Raft thesis chapter 4).
//!
//! A membership has one voter set, or two while a change is under way (joint: the old set
//! first, the new one second); each set has its own quorum. While joint, a commit needs W of
//! each set and an election E of each set, so no decision can be taken by either
//! configuration alone. Learners receive the log but neither vote nor count.
//!
//! A configuration travels as a control batch with one record of control type
//! [`CONTROL_TYPE_VOTERS`] (as KRaft's VotersRecord, KIP-853), takes a Kafka offset, and
//! applies from the moment it is appended (committed or not), as Raft requires; a truncation
//! that removes it reverts to the one before.
//!
//! Invariants: a [`Membership`] has one or two voter sets, each non-empty, without
//! duplicates, with a quorum whose replication factor is the set's size; learners are not
//! voters of the newest set (a voter of the old set leaving it may be listed as a learner of
//! the new configuration while joint). Decoding never panics on any bytes.

use crate::batch;
use crate::error::{ReplicationError, Result};
use crate::message::ReplicaId;
use crate::quorum::{Quorum, REPLICATION_FACTOR_MAX};

/// The control record type of a membership batch (KRaft's VotersRecord).
pub const CONTROL_TYPE_VOTERS: i16 = 6;
/// Learners a group may have.
pub const LEARNERS_MAX: usize = 4;

/// One voter set and its quorum.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VoterSet {
    pub voters: Vec<ReplicaId>,
    pub quorum: Quorum,
}

/// The voter sets (one, or old and new while joint) and the learners of a group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Membership {
    pub sets: Vec<VoterSet>,
    pub learners: Vec<ReplicaId>,
}

impl Membership {
    /// Checks the invariants in the module docs.
    pub fn validate(&self) -> Result<()> {
        let refuse = |reason: String| Err(ReplicationError::Config { reason });
        if self.sets.is_empty() || self.sets.len() > 2 {
            return refuse(format!(
                "{} voter sets: a membership has one, or two while joint",
                self.sets.len()
            ));
        }
        for set in &self.sets {
            let mut sorted = set.voters.clone();
            sorted.sort_unstable();
            sorted.dedup();
            if sorted.len() != set.voters.len()
                || set.voters.len() != set.quorum.replication_factor() as usize
            {
                return refuse(format!(
                    "voters {:?} repeat a replica or do not match replication factor {}",
                    set.voters,
                    set.quorum.replication_factor()
                ));
            }
        }
        // While joint, a voter of the old set may already be listed as a learner of the new
        // configuration: it votes until the new one applies.
        let newest = &self.sets[self.sets.len() - 1].voters;
        if self.learners.len() > LEARNERS_MAX || self.learners.iter().any(|l| newest.contains(l)) {
            return refuse(format!("learners {:?}: at most {LEARNERS_MAX}, none a new voter", self.learners));
        }
        Ok(())
    }

    pub fn is_voter(&self, id: ReplicaId) -> bool {
        self.sets.iter().any(|s| s.voters.contains(&id))
    }

    pub fn is_member(&self, id: ReplicaId) -> bool {
        self.is_voter(id) || self.learners.contains(&id)
    }

    pub fn is_joint(&self) -> bool {
        self.sets.len() == 2
    }

    /// Every voter of every set, once, in order.
    pub fn voters(&self) -> Vec<ReplicaId> {
        let mut voters: Vec<ReplicaId> = self.sets.iter().flat_map(|s| s.voters.iter().copied()).collect();
        voters.sort_unstable();
        voters.dedup();
        voters
    }

    /// Voters and learners, once each, in order.
    pub fn members(&self) -> Vec<ReplicaId> {
        let mut members = self.voters();
        members.extend(&self.learners);
        members.sort_unstable();
        members.dedup();
        members
    }

    /// True when `count(id)` reaches the quorum `needed(set)` in every voter set.
    pub fn every_set(&self, needed: impl Fn(&Quorum) -> u32, count: impl Fn(ReplicaId) -> bool) -> bool {
        self.sets.iter().all(|s| s.voters.iter().filter(|v| count(**v)).count() >= needed(&s.quorum) as usize)
    }

    /// The configuration batch carrying this membership.
    pub fn to_batch(&self) -> Vec<u8> {
        let mut key = Vec::with_capacity(4);
        key.extend_from_slice(&0i16.to_be_bytes());
        key.extend_from_slice(&CONTROL_TYPE_VOTERS.to_be_bytes());
        let mut value = vec![0, 0, self.sets.len() as u8];
        for set in &self.sets {
            value.push(set.quorum.write_quorum() as u8);
            value.push(set.quorum.election_quorum() as u8);
            value.push(set.voters.len() as u8);
            set.voters.iter().for_each(|v| value.extend_from_slice(&v.to_be_bytes()));
        }
        value.push(self.learners.len() as u8);
        self.learners.iter().for_each(|l| value.extend_from_slice(&l.to_be_bytes()));
        batch::build(&[(Some(&key), &value)], batch::ATTRIBUTE_CONTROL, 0)
    }

    /// The membership a checked batch carries, if it is a configuration batch. None for any
    /// other batch, and for one whose record does not decode (never a panic).
    pub fn from_batch(bytes: &[u8], view: &batch::BatchView) -> Option<Membership> {
        if view.attributes & batch::ATTRIBUTE_CONTROL == 0 || view.last_offset_delta != 0 {
            return None;
        }
        let (key, value) = batch::first_record(bytes.get(..view.total_bytes)?)?;
        if key.get(2..4)? != CONTROL_TYPE_VOTERS.to_be_bytes() {
            return None;
        }
        let mut reader = Reader { bytes: value, at: 2 };
        let sets_count = reader.byte()?;
        let mut sets = Vec::new();
        for _ in 0..sets_count.min(2) {
            let (write_quorum, election_quorum, count) = (reader.byte()?, reader.byte()?, reader.byte()?);
            if count == 0 || u32::from(count) > REPLICATION_FACTOR_MAX {
                return None;
            }
            let voters = (0..count).map(|_| reader.id()).collect::<Option<Vec<_>>>()?;
            let quorum = Quorum::with_election_quorum(
                u32::from(count),
                u32::from(write_quorum),
                u32::from(election_quorum),
            )
            .ok()?;
            sets.push(VoterSet { voters, quorum });
        }
        let learners_count = reader.byte()?;
        if usize::from(learners_count) > LEARNERS_MAX {
            return None;
        }
        let learners = (0..learners_count).map(|_| reader.id()).collect::<Option<Vec<_>>>()?;
        let membership = Membership { sets, learners };
        membership.validate().ok()?;
        Some(membership)
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn byte(&mut self) -> Option<u8> {
        let b = *self.bytes.get(self.at)?;
        self.at += 1;
        Some(b)
    }
    fn id(&mut self) -> Option<ReplicaId> {
        let b = self.bytes.get(self.at..self.at + 4)?;
        self.at += 4;
        Some(u32::from_be_bytes(b.try_into().ok()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(voters: &[u32], w: u32) -> VoterSet {
        VoterSet { voters: voters.to_vec(), quorum: Quorum::new(voters.len() as u32, w).expect("valid") }
    }

    #[test]
    fn a_membership_round_trips_through_its_batch_and_garbage_is_refused() {
        let joint = Membership { sets: vec![set(&[1, 2, 3], 2), set(&[2, 3, 4], 2)], learners: vec![5] };
        let bytes = joint.to_batch();
        let view = batch::parse(&bytes).expect("valid batch");
        assert_eq!(Membership::from_batch(&bytes, &view), Some(joint));
        let plain = batch::build(&[(None, b"x")], 0, 0);
        let view = batch::parse(&plain).expect("valid");
        assert_eq!(Membership::from_batch(&plain, &view), None);
        let leader_change = batch::epoch_start(1, &[1, 2, 3]);
        let view = batch::parse(&leader_change).expect("valid");
        assert_eq!(Membership::from_batch(&leader_change, &view), None);
        for cut in 0..bytes.len() {
            let mut short = bytes[..cut].to_vec();
            short.resize(bytes.len(), 0xff);
            if let Ok(view) = batch::parse(&short) {
                let _ = Membership::from_batch(&short, &view);
            }
        }
    }

    #[test]
    fn validate_refuses_bad_memberships() {
        assert!(Membership { sets: vec![], learners: vec![] }.validate().is_err());
        assert!(Membership { sets: vec![set(&[1, 2, 3], 2)], learners: vec![3] }.validate().is_err());
        let three = Membership { sets: vec![set(&[1, 2, 3], 2); 3], learners: vec![] };
        assert!(three.validate().is_err());
    }
}
