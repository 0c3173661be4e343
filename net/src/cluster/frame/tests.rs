use proptest::prelude::*;

use super::*;

fn key(partition: u32) -> GroupKey {
    GroupKey { topic_id: [7; 16], partition }
}

fn batch(value: &[u8]) -> Bytes {
    Bytes::from(pyralog_replication::batch::build(&[(Some(b"k"), value)], 0, 1_700_000_000_000))
}

fn membership(voters: &[u32], learners: &[u32]) -> Membership {
    let quorum = pyralog_replication::Quorum::new(voters.len() as u32, voters.len() as u32 / 2 + 1).unwrap();
    let set = pyralog_replication::VoterSet { voters: voters.to_vec(), quorum };
    Membership { sets: vec![set], learners: learners.to_vec() }
}

fn message(body: Body) -> Message {
    Message { from: 1, to: 2, term: 5, body }
}

/// One message of every body variant.
fn every_body() -> Vec<Body> {
    vec![
        Body::PreVote { last_epoch: 4, log_end: 1_000 },
        Body::PreVoteResponse { granted: true },
        Body::Vote { last_epoch: 4, log_end: 1_000, transfer: true },
        Body::VoteResponse { granted: false },
        Body::Append(Append {
            prev_end: 10,
            prev_epoch: 3,
            commit_end: 8,
            log_start: 4,
            seq: 5,
            batches: vec![batch(b"one"), batch(&[9; 5000]), batch(b"three")],
        }),
        Body::Append(Append {
            prev_end: 0,
            prev_epoch: -1,
            commit_end: 0,
            log_start: 0,
            seq: 5,
            batches: vec![],
        }),
        Body::AppendResponse(AppendResponse {
            accepted: false,
            match_end: 0,
            acked_end: 0,
            log_end: 40,
            epochs: vec![EpochStart { epoch: 1, start_offset: 0 }, EpochStart { epoch: 3, start_offset: 12 }],
            recovering: true,
            seq: 5,
            disk_id: 3,
        }),
        Body::StartAt(StartAt {
            start: 4_000,
            prev_epoch: 6,
            commit_end: 4_100,
            seq: 9,
            memberships: vec![(-1, membership(&[1, 2, 3], &[])), (700, membership(&[1, 2, 4], &[5]))],
        }),
        Body::TimeoutNow,
        Body::TermQuery { disk_id: 7 },
        Body::TermAnswer { disk_id: 7 },
    ]
}

fn round_trip(frame: &Frame) -> Frame {
    decode(encode_to_bytes(frame)).expect("a frame we encoded decodes")
}

#[test]
fn every_kind_round_trips() {
    let hello = Hello { cluster_id: Some([3; 16]), from_node: 1, from_shard: 2, to_node: 3, to_shard: 4 };
    let frames = [
        Frame::Hello(hello),
        Frame::Hello(Hello { cluster_id: None, ..hello }),
        Frame::Welcome(Welcome { cluster_id: Some([9; 16]), node: 3, controller_term: 4 }),
        Frame::Welcome(Welcome { cluster_id: None, node: u32::MAX, controller_term: 4 }),
        Frame::Refused { reason: "this is node 2, not node 3: check --seeds".into() },
        Frame::Refused { reason: String::new() },
        Frame::Messages(vec![]),
        Frame::Request { id: 1, reply_to: "10.1.2.3:9093".parse().unwrap(), body: Bytes::from_static(b"{}") },
        Frame::Request { id: u64::MAX, reply_to: "[::1]:1".parse().unwrap(), body: Bytes::new() },
        Frame::Response { id: 7, body: Bytes::from(vec![0xee; REQUEST_BODY_BYTES_MAX]) },
        Frame::Response { id: 0, body: Bytes::new() },
    ];
    for frame in frames {
        assert_eq!(round_trip(&frame), frame);
    }
}

#[test]
fn every_body_variant_round_trips_alone_and_together() {
    let entries: Vec<_> =
        every_body().into_iter().enumerate().map(|(i, b)| (key(i as u32), message(b))).collect();
    for entry in &entries {
        let frame = Frame::Messages(vec![entry.clone()]);
        assert_eq!(round_trip(&frame), frame);
    }
    let frame = Frame::Messages(entries);
    assert_eq!(round_trip(&frame), frame);
}

#[test]
fn batches_are_written_and_read_without_copies() {
    let big = batch(&[1; 10_000]);
    let frame = Frame::Messages(vec![(
        key(0),
        message(Body::Append(Append {
            prev_end: 0,
            prev_epoch: -1,
            commit_end: 0,
            log_start: 0,
            seq: 5,
            batches: vec![big.clone()],
        })),
    )]);
    let mut chunks = Vec::new();
    encode(&frame, &mut chunks);
    assert!(chunks.iter().any(|chunk| chunk.as_ptr() == big.as_ptr()), "the batch is its own chunk");
    let whole = encode_to_bytes(&frame);
    let range = whole.as_ptr() as usize..whole.as_ptr() as usize + whole.len();
    let Frame::Messages(entries) = decode(whole.clone()).unwrap() else { panic!("Messages") };
    let Body::Append(append) = &entries[0].1.body else { panic!("an Append") };
    assert!(range.contains(&(append.batches[0].as_ptr() as usize)), "the batch is a slice of the frame");
    assert_eq!(append.batches[0], big);
}

#[test]
fn bodies_are_written_and_read_without_copies() {
    let body = Bytes::from(vec![3; 5000]);
    let frame = Frame::Response { id: 9, body: body.clone() };
    let mut chunks = Vec::new();
    encode(&frame, &mut chunks);
    assert!(chunks.iter().any(|chunk| chunk.as_ptr() == body.as_ptr()), "the body is its own chunk");
    let whole = encode_to_bytes(&frame);
    let range = whole.as_ptr() as usize..whole.as_ptr() as usize + whole.len();
    let Frame::Response { body: decoded, .. } = decode(whole.clone()).unwrap() else { panic!("Response") };
    assert!(range.contains(&(decoded.as_ptr() as usize)), "the body is a slice of the frame");
    assert_eq!(decoded, body);
}

#[test]
#[should_panic(expected = "the transport checks a body's length first")]
fn the_encoder_refuses_a_body_over_the_limit() {
    let body = Bytes::from(vec![0; REQUEST_BODY_BYTES_MAX + 1]);
    encode_to_bytes(&Frame::Response { id: 1, body });
}

#[test]
fn a_damaged_frame_names_the_crc_mismatch() {
    let frame = Frame::Welcome(Welcome { cluster_id: Some([1; 16]), node: 3, controller_term: 4 });
    let mut bytes = encode_to_bytes(&frame).to_vec();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    let error = decode(Bytes::from(bytes)).unwrap_err();
    assert!(matches!(error, ClusterFrameError::Crc { .. }), "{error}");
    assert!(error.to_string().contains("CRC-32C mismatch"), "{error}");
}

/// A frame with the given body after the header, with a correct length and CRC.
fn forged(kind: u8, body: &[u8]) -> Bytes {
    let mut after_crc = vec![FRAME_VERSION, kind];
    after_crc.extend_from_slice(body);
    let mut frame = Vec::new();
    frame.extend_from_slice(&((after_crc.len() + 4) as u32).to_be_bytes());
    frame.extend_from_slice(&crc32c::crc32c(&after_crc).to_be_bytes());
    frame.extend_from_slice(&after_crc);
    Bytes::from(frame)
}

fn entry_head(tag: u8) -> Vec<u8> {
    let mut entry = vec![0; 16];
    entry.extend_from_slice(&0u32.to_be_bytes()); // partition
    entry.extend_from_slice(&[0; 12]); // from, to, term
    entry.push(tag);
    entry
}

#[test]
fn limits_are_named_in_their_errors() {
    let oversized = {
        let mut frame = ((CLUSTER_FRAME_BYTES_MAX + 1) as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(&[0; 16]);
        Bytes::from(frame)
    };
    let error = decode(oversized).unwrap_err();
    assert!(error.to_string().contains("CLUSTER_FRAME_BYTES_MAX"), "{error}");

    let too_many = forged(KIND_MESSAGES, &(FRAME_ENTRIES_MAX as u32 + 1).to_be_bytes());
    let error = decode(too_many).unwrap_err();
    assert!(error.to_string().contains("FRAME_ENTRIES_MAX"), "{error}");
    assert!(error.to_string().contains(&(FRAME_ENTRIES_MAX + 1).to_string()), "{error}");

    let more_than_left = forged(KIND_MESSAGES, &1000u32.to_be_bytes());
    let error = decode(more_than_left).unwrap_err();
    assert!(matches!(error, ClusterFrameError::CountOverBytes { count: 1000, .. }), "{error}");

    let mut append = 1u32.to_be_bytes().to_vec();
    append.extend(entry_head(TAG_APPEND));
    append.extend_from_slice(&[0; 36]); // prev_end, prev_epoch, commit_end, log_start, seq
    append.extend_from_slice(&(APPEND_BATCHES_MAX as u32 + 1).to_be_bytes());
    let error = decode(forged(KIND_MESSAGES, &append)).unwrap_err();
    assert!(error.to_string().contains("APPEND_BATCHES_MAX"), "{error}");

    let mut response = 1u32.to_be_bytes().to_vec();
    response.extend(entry_head(TAG_APPEND_RESPONSE));
    response.extend_from_slice(&[0; 1 + 24 + 1 + 16]);
    response.extend_from_slice(&(EPOCHS_MAX as u32 + 1).to_be_bytes());
    response.extend_from_slice(&[0; 12 * (EPOCHS_MAX + 1)]);
    let error = decode(forged(KIND_MESSAGES, &response)).unwrap_err();
    assert!(error.to_string().contains("EPOCHS_MAX"), "{error}");

    let start_at_head = || {
        let mut start_at = 1u32.to_be_bytes().to_vec();
        start_at.extend(entry_head(TAG_START_AT));
        start_at.extend_from_slice(&[0; 28]); // start, prev_epoch, commit_end, seq
        start_at
    };
    let mut start_at = start_at_head();
    start_at.extend_from_slice(&(MEMBERSHIPS_MAX as u32 + 1).to_be_bytes());
    let error = decode(forged(KIND_MESSAGES, &start_at)).unwrap_err();
    assert!(error.to_string().contains("MEMBERSHIPS_MAX"), "{error}");
    let mut start_at = start_at_head();
    start_at.extend_from_slice(&1u32.to_be_bytes());
    start_at.extend_from_slice(&7i64.to_be_bytes());
    start_at.extend_from_slice(&(MEMBERSHIP_BATCH_BYTES_MAX as u32 + 1).to_be_bytes());
    start_at.extend(vec![0; MEMBERSHIP_BATCH_BYTES_MAX + 1]);
    let error = decode(forged(KIND_MESSAGES, &start_at)).unwrap_err();
    assert!(error.to_string().contains("MEMBERSHIP_BATCH_BYTES_MAX"), "{error}");
    // A batch that carries no membership (a data batch) is refused by offset.
    let mut start_at = start_at_head();
    let data = batch(b"not a configuration");
    start_at.extend_from_slice(&1u32.to_be_bytes());
    start_at.extend_from_slice(&7i64.to_be_bytes());
    start_at.extend_from_slice(&(data.len() as u32).to_be_bytes());
    start_at.extend_from_slice(&data);
    let error = decode(forged(KIND_MESSAGES, &start_at)).unwrap_err();
    assert!(matches!(error, ClusterFrameError::Membership(7)), "{error}");

    let mut reason = (REFUSED_REASON_BYTES_MAX as u16 + 1).to_be_bytes().to_vec();
    reason.extend(vec![b'x'; REFUSED_REASON_BYTES_MAX + 1]);
    let error = decode(forged(KIND_REFUSED, &reason)).unwrap_err();
    assert!(error.to_string().contains("REFUSED_REASON_BYTES_MAX"), "{error}");

    let over = REQUEST_BODY_BYTES_MAX as u32 + 1;
    let mut response = 5u64.to_be_bytes().to_vec();
    response.extend_from_slice(&over.to_be_bytes());
    response.extend(vec![0; over as usize]);
    let error = decode(forged(KIND_RESPONSE, &response)).unwrap_err();
    assert!(error.to_string().contains("REQUEST_BODY_BYTES_MAX"), "{error}");
    assert!(error.to_string().contains("the Response's body length"), "{error}");
    let mut request = 5u64.to_be_bytes().to_vec();
    request.extend_from_slice(&[4, 127, 0, 0, 1, 0x23, 0x84]);
    request.extend_from_slice(&over.to_be_bytes());
    let error = decode(forged(KIND_REQUEST, &request)).unwrap_err();
    assert!(error.to_string().contains("REQUEST_BODY_BYTES_MAX"), "{error}");

    let mut more_than_left = 5u64.to_be_bytes().to_vec();
    more_than_left.extend_from_slice(&100u32.to_be_bytes());
    more_than_left.extend_from_slice(&[0; 99]);
    let error = decode(forged(KIND_RESPONSE, &more_than_left)).unwrap_err();
    assert!(matches!(error, ClusterFrameError::Truncated { needed: 100, left: 99, .. }), "{error}");
}

#[test]
fn strictness_trailing_bytes_versions_kinds_flags_and_short_batches() {
    let mut welcome = vec![0];
    welcome.extend_from_slice(&3u32.to_be_bytes());
    welcome.extend_from_slice(&0i32.to_be_bytes());
    assert!(decode(forged(KIND_WELCOME, &welcome)).is_ok());
    welcome.push(0);
    assert_eq!(decode(forged(KIND_WELCOME, &welcome)).unwrap_err(), ClusterFrameError::Trailing(1));
    assert_eq!(decode(forged(9, &[])).unwrap_err(), ClusterFrameError::Kind(9));
    let mut flag = vec![2];
    flag.extend_from_slice(&3u32.to_be_bytes());
    assert!(matches!(
        decode(forged(KIND_WELCOME, &flag)).unwrap_err(),
        ClusterFrameError::Flag { value: 2, .. }
    ));

    let mut version = encode_to_bytes(&Frame::Messages(vec![])).to_vec();
    version[8] = FRAME_VERSION - 1;
    let crc = crc32c::crc32c(&version[8..]);
    version[4..8].copy_from_slice(&crc.to_be_bytes());
    assert_eq!(decode(Bytes::from(version)).unwrap_err(), ClusterFrameError::Version(FRAME_VERSION - 1));

    let mut short = 1u32.to_be_bytes().to_vec();
    short.extend(entry_head(TAG_APPEND));
    short.extend_from_slice(&[0; 36]);
    short.extend_from_slice(&1u32.to_be_bytes());
    short.extend_from_slice(&10u32.to_be_bytes());
    short.extend_from_slice(&[0; BATCH_HEADER_BYTES]);
    let error = decode(forged(KIND_MESSAGES, &short)).unwrap_err();
    assert!(matches!(error, ClusterFrameError::BatchTooShort { value: 10, .. }), "{error}");

    let mut request = 5u64.to_be_bytes().to_vec();
    request.extend_from_slice(&[4, 127, 0, 0, 1, 0x23, 0x84]);
    request.extend_from_slice(&1u32.to_be_bytes());
    request.push(b'x');
    assert!(decode(forged(KIND_REQUEST, &request)).is_ok());
    request.push(0);
    assert_eq!(decode(forged(KIND_REQUEST, &request)).unwrap_err(), ClusterFrameError::Trailing(1));
    request[8] = 5;
    assert_eq!(decode(forged(KIND_REQUEST, &request)).unwrap_err(), ClusterFrameError::AddressFamily(5));

    let mut not_utf8 = 2u16.to_be_bytes().to_vec();
    not_utf8.extend_from_slice(&[0xff, 0xfe]);
    assert_eq!(decode(forged(KIND_REFUSED, &not_utf8)).unwrap_err(), ClusterFrameError::ReasonNotUtf8);
}

#[test]
fn the_encoder_stops_at_the_frame_limit() {
    let big = batch(&vec![5; 4 << 20]);
    let append = message(Body::Append(Append {
        prev_end: 0,
        prev_epoch: 1,
        commit_end: 0,
        log_start: 0,
        seq: 5,
        batches: vec![big],
    }));
    let mut encoder = MessagesEncoder::new();
    assert!(encoder.push(&key(0), &append));
    assert!(encoder.push(&key(1), &append));
    assert!(encoder.push(&key(2), &append));
    assert!(!encoder.push(&key(3), &append), "a fourth 4 MiB append is over 16 MiB");
    assert!(encoder.push(&key(4), &message(Body::TermQuery { disk_id: 7 })), "a small message still fits");
    assert_eq!(encoder.len(), 4);
    let bytes = encoder.frame_bytes();
    let mut chunks = Vec::new();
    encoder.finish(&mut chunks);
    assert_eq!(chunks.iter().map(Bytes::len).sum::<usize>(), bytes);
    let mut whole = BytesMut::new();
    chunks.iter().for_each(|chunk| whole.put_slice(chunk));
    let Frame::Messages(entries) = decode(whole.freeze()).unwrap() else { panic!("Messages") };
    assert_eq!(entries.iter().map(|(key, _)| key.partition).collect::<Vec<_>>(), [0, 1, 2, 4]);
}

fn arbitrary_body() -> impl Strategy<Value = Body> {
    let batches = prop::collection::vec(prop::collection::vec(any::<u8>(), BATCH_HEADER_BYTES..200), 0..4)
        .prop_map(|batches| batches.into_iter().map(Bytes::from).collect::<Vec<_>>());
    let epochs = prop::collection::vec((any::<i32>(), any::<i64>()), 0..=EPOCHS_MAX).prop_map(|epochs| {
        epochs.into_iter().map(|(epoch, start_offset)| EpochStart { epoch, start_offset }).collect::<Vec<_>>()
    });
    prop_oneof![
        (any::<i32>(), any::<i64>()).prop_map(|(last_epoch, log_end)| Body::PreVote { last_epoch, log_end }),
        any::<bool>().prop_map(|granted| Body::PreVoteResponse { granted }),
        (any::<i32>(), any::<i64>(), any::<bool>()).prop_map(|(last_epoch, log_end, transfer)| Body::Vote {
            last_epoch,
            log_end,
            transfer
        }),
        any::<bool>().prop_map(|granted| Body::VoteResponse { granted }),
        (any::<i64>(), any::<i32>(), any::<i64>(), any::<i64>(), any::<u64>(), batches).prop_map(
            |(prev_end, prev_epoch, commit_end, log_start, seq, batches)| {
                Body::Append(Append { prev_end, prev_epoch, commit_end, log_start, seq, batches })
            }
        ),
        (any::<bool>(), any::<i64>(), any::<i64>(), any::<i64>(), epochs, any::<bool>(), any::<(u64, u64)>())
            .prop_map(|(accepted, match_end, acked_end, log_end, epochs, recovering, (seq, disk_id))| {
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
        (any::<i64>(), any::<i32>(), any::<i64>(), any::<u64>(), prop::collection::vec(any::<i64>(), 0..3))
            .prop_map(|(start, prev_epoch, commit_end, seq, offsets)| {
                let memberships = offsets.into_iter().map(|o| (o, membership(&[1, 2, 3], &[4]))).collect();
                Body::StartAt(StartAt { start, prev_epoch, commit_end, seq, memberships })
            }),
        Just(Body::TimeoutNow),
        any::<u64>().prop_map(|disk_id| Body::TermQuery { disk_id }),
        any::<u64>().prop_map(|disk_id| Body::TermAnswer { disk_id }),
    ]
}

pub(crate) fn arbitrary_entries() -> impl Strategy<Value = Vec<(GroupKey, Message)>> {
    let entry = (any::<[u8; 16]>(), any::<u32>(), any::<u32>(), any::<u32>(), any::<i32>(), arbitrary_body())
        .prop_map(|(topic_id, partition, from, to, term, body)| {
            (GroupKey { topic_id, partition }, Message { from, to, term, body })
        });
    prop::collection::vec(entry, 0..12)
}

fn arbitrary_address() -> impl Strategy<Value = SocketAddr> {
    // An IPv6 address's flow label and scope are not carried: none is generated.
    let ip = prop_oneof![
        any::<[u8; 4]>().prop_map(std::net::IpAddr::from),
        any::<[u8; 16]>().prop_map(std::net::IpAddr::from),
    ];
    (ip, any::<u16>()).prop_map(|(ip, port)| SocketAddr::new(ip, port))
}

/// A frame of any kind.
fn arbitrary_frame() -> impl Strategy<Value = Frame> {
    let cluster_id = prop::option::of(any::<ClusterId>());
    let body = prop::collection::vec(any::<u8>(), 0..300).prop_map(Bytes::from);
    prop_oneof![
        (cluster_id.clone(), any::<u32>(), any::<u16>(), any::<u32>(), any::<u16>()).prop_map(
            |(cluster_id, from_node, from_shard, to_node, to_shard)| {
                Frame::Hello(Hello { cluster_id, from_node, from_shard, to_node, to_shard })
            }
        ),
        (cluster_id, any::<u32>()).prop_map(|(cluster_id, node)| Frame::Welcome(Welcome {
            cluster_id,
            node,
            controller_term: 2
        })),
        ".{0,40}".prop_map(|reason| Frame::Refused { reason }),
        arbitrary_entries().prop_map(Frame::Messages),
        (any::<u64>(), arbitrary_address(), body.clone()).prop_map(|(id, reply_to, body)| Frame::Request {
            id,
            reply_to,
            body
        }),
        (any::<u64>(), body).prop_map(|(id, body)| Frame::Response { id, body }),
    ]
}

proptest! {
    #[test]
    fn arbitrary_messages_round_trip(entries in arbitrary_entries()) {
        let frame = Frame::Messages(entries);
        prop_assert_eq!(round_trip(&frame), frame);
    }

    #[test]
    fn arbitrary_frames_round_trip(frame in arbitrary_frame()) {
        prop_assert_eq!(round_trip(&frame), frame);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode(Bytes::from(bytes.clone()));
        let _ = decode_body(Bytes::from(bytes));
    }

    /// Mutations after which the CRC is made right again, so that the fields are parsed.
    #[test]
    fn mutated_frames_never_panic(
        frame in arbitrary_frame(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut bytes = encode_to_bytes(&frame).to_vec();
        for (at, value) in flips {
            let at = LENGTH_PREFIX_BYTES + 4 + at.index(bytes.len() - LENGTH_PREFIX_BYTES - 4);
            bytes[at] = value;
        }
        let crc = crc32c::crc32c(&bytes[8..]);
        bytes[4..8].copy_from_slice(&crc.to_be_bytes());
        // What decodes is what encodes: one encoding per frame, so a decoded frame passed on
        // is the frame that was sent.
        if let Ok(decoded) = decode(Bytes::from(bytes.clone())) {
            prop_assert_eq!(&encode_to_bytes(&decoded)[..], &bytes[..]);
        }
        bytes.truncate(8 + cut.index(bytes.len() - 7));
        let _ = decode_body(Bytes::from(bytes[4..].to_vec()));
    }
}
