//! Arbitrary message sequences thrown at one replica, with the invariants as the oracle.
//!
//! Peers here are liars: any sender id (known or not), any term, offsets past the log,
//! batches with bad CRCs, impossible lengths or wrong epochs, in any order, mixed with ticks
//! and log notices. The replica must never panic, never move its commit point back, never cut
//! its log at or below it, never lower its term, and only ask for appends and truncations
//! that keep its log contiguous and cut at batch boundaries (the in-memory log checks both).

use bytes::Bytes;
use proptest::prelude::*;
use rand_core::SeedableRng;
use rand_xorshift::XorShiftRng;

use super::log::SimLog;
use crate::batch;
use crate::epoch::EpochStart;
use crate::group::{Action, Config, LogNotice, RaftGroup, Restore};
use crate::membership::{Membership, VoterSet};
use crate::message::{Append, AppendResponse, Body, Message, StartAt};
use crate::quorum::Quorum;

#[derive(Debug, Clone)]
enum Input {
    Receive(Message),
    Tick,
    Durable(i64, u64),
    Persisted,
}

fn batch_strategy() -> impl Strategy<Value = Bytes> {
    (0i64..40, -1i32..6, 1usize..4, 0u8..8).prop_map(|(base, epoch, records, damage)| {
        let pairs: Vec<(Option<&[u8]>, &[u8])> = (0..records).map(|_| (None, &b"v"[..])).collect();
        let mut bytes = batch::build(&pairs, 0, 0);
        if base >= 0 && epoch >= 0 {
            batch::stamp(&mut bytes, base, epoch);
        }
        match damage {
            0 => *bytes.last_mut().expect("non-empty") ^= 1, // bad CRC
            1 => bytes[8..12].copy_from_slice(&i32::MAX.to_be_bytes()), // impossible length
            _ => {}
        }
        Bytes::from(bytes)
    })
}

/// Half the appends are shaped as an honest leader's: batches contiguous from `prev_end`,
/// of one epoch, so that the replica gets past its checks and appends, commits and truncates.
fn honest(prev_end: i64, epoch: i32, mut batches: Vec<Bytes>) -> Vec<Bytes> {
    if epoch < 2 || prev_end < 0 {
        return batches;
    }
    let mut base = prev_end;
    for b in &mut batches {
        let mut bytes = b.to_vec();
        if let Ok(view) = batch::parse(&bytes) {
            batch::stamp(&mut bytes, base, epoch);
            base += i64::from(view.last_offset_delta) + 1;
            *b = Bytes::from(bytes);
        }
    }
    batches
}

fn body_strategy() -> impl Strategy<Value = Body> {
    let offset = -2i64..50;
    let epoch = -2i32..7;
    prop_oneof![
        (epoch.clone(), offset.clone())
            .prop_map(|(last_epoch, log_end)| Body::PreVote { last_epoch, log_end }),
        any::<bool>().prop_map(|granted| Body::PreVoteResponse { granted }),
        (epoch.clone(), offset.clone(), any::<bool>())
            .prop_map(|(last_epoch, log_end, transfer)| Body::Vote { last_epoch, log_end, transfer }),
        any::<bool>().prop_map(|granted| Body::VoteResponse { granted }),
        (
            prop_oneof![Just(0i64), 0i64..12, -2i64..50],
            prop_oneof![Just(-1i32), 3i32..6, -2i32..7],
            offset.clone(),
            prop_oneof![Just(0i64), offset.clone()],
            prop::collection::vec(batch_strategy(), 0..4),
            0i32..6,
            0u64..8
        )
            .prop_map(|(prev_end, prev_epoch, commit_end, log_start, batches, epoch, seq)| {
                // An honest leader says -1 before offset 0.
                let prev_epoch = if prev_end == 0 && epoch >= 2 { -1 } else { prev_epoch };
                Body::Append(Append {
                    prev_end,
                    prev_epoch,
                    commit_end,
                    log_start,
                    seq,
                    batches: honest(prev_end, epoch, batches),
                })
            }),
        (any::<bool>(), offset.clone(), offset.clone(), offset, epoch, any::<bool>(), 0u64..8, 0u64..3)
            .prop_map(|(accepted, match_end, acked_end, log_end, e, recovering, seq, disk_id)| {
                let epochs = vec![EpochStart { epoch: e.max(0), start_offset: 0 }];
                Body::AppendResponse(AppendResponse {
                    accepted,
                    match_end,
                    acked_end,
                    log_end,
                    epochs,
                    recovering,
                    seq,
                    disk_id,
                })
            }),
        (
            -2i64..50,
            -2i32..7,
            -2i64..50,
            0u64..8,
            // Mostly the initial configuration alone, as a leader that changed none sends.
            prop_oneof![3 => Just(vec![-1i64]), 1 => prop::collection::vec(-2i64..50, 0..3)]
        )
            .prop_map(|(start, prev_epoch, commit_end, seq, offsets)| {
                let voters = VoterSet { voters: vec![1, 2, 3], quorum: Quorum::new(3, 2).expect("valid") };
                let membership = Membership { sets: vec![voters], learners: Vec::new() };
                let memberships = offsets.into_iter().map(|offset| (offset, membership.clone())).collect();
                Body::StartAt(StartAt { start, prev_epoch, commit_end, seq, memberships })
            }),
        Just(Body::TimeoutNow),
        (0u64..3).prop_map(|disk_id| Body::TermQuery { disk_id }),
        (0u64..3).prop_map(|disk_id| Body::TermAnswer { disk_id }),
    ]
}

fn input_strategy() -> impl Strategy<Value = Input> {
    prop_oneof![
        6 => (prop_oneof![Just(1u32), Just(3), 0u32..5], prop_oneof![3 => Just(2u32), 1 => 0u32..5], -1i32..7, body_strategy())
            .prop_map(|(from, to, term, body)| Input::Receive(Message { from, to, term, body })),
        2 => Just(Input::Tick),
        1 => (0i64..50, 0u64..3).prop_map(|(end, truncations)| Input::Durable(end, truncations)),
        2 => Just(Input::Persisted),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    #[test]
    fn arbitrary_messages_never_break_a_replica(inputs in prop::collection::vec(input_strategy(), 1..120)) {
        let config = Config {
            id: 2,
            voters: vec![1, 2, 3],
            quorum: Quorum::new(3, 2).expect("valid"),
            learners: Vec::new(),
            heartbeat_ticks: 1,
            election_ticks: 3,
            planted_bug: None,
        };
        let mut out = Vec::new();
        let mut group = RaftGroup::new(config, Restore::default(), XorShiftRng::seed_from_u64(7), &mut out)
            .expect("valid config");
        let mut log = SimLog::default();
        let (mut high_watermark, mut term) = (0, 0);
        for input in inputs {
            match input {
                Input::Receive(message) => group.receive(message, &log, &mut out),
                Input::Tick => group.tick(&log, &mut out),
                Input::Durable(end, truncations) => {
                    let end = end.min(log.end());
                    group.notice(LogNotice::Durable { end_offset: end, truncations }, &mut out);
                }
                Input::Persisted => {
                    let state = group.hard_state();
                    group.notice(LogNotice::HardStatePersisted(state), &mut out);
                }
            }
            for action in out.drain(..) {
                match action {
                    Action::Append { batches } => batches.into_iter().for_each(|b| { log.append(b); }),
                    Action::Truncate { end_offset, .. } => {
                        prop_assert!(end_offset >= high_watermark, "cut at {end_offset} below commit {high_watermark}");
                        prop_assert!(end_offset >= log.start, "cut at {end_offset} below the log's start {}", log.start);
                        log.truncate(end_offset);
                    }
                    Action::StartLog { start, .. } => {
                        prop_assert!(start > high_watermark, "started afresh at {start}, not past commit {high_watermark}");
                        // What lies below the new start stands as one batch no read reaches.
                        let pairs: Vec<(Option<&[u8]>, &[u8])> = (0..start).map(|_| (None, &b"v"[..])).collect();
                        let mut below = batch::build(&pairs, 0, 0);
                        batch::stamp(&mut below, 0, 0);
                        log.start_at(start, &[Bytes::from(below)]);
                    }
                    Action::Commit { high_watermark: hw } => {
                        prop_assert!(hw >= high_watermark, "commit moved back from {high_watermark} to {hw}");
                        prop_assert!(hw <= log.end(), "commit {hw} past the log end {}", log.end());
                        high_watermark = hw;
                    }
                    _ => {}
                }
            }
            prop_assert!(group.term() >= term, "term went back");
            term = group.term();
            prop_assert_eq!(group.log_end(), log.end());
        }
    }
}
