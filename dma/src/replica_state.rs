//! The state a Raft replica of a partition keeps beside its log: its term, its vote, whether
//! it is recovering a lost disk, and the start offset of every epoch in its log.
//!
//! One file per replica, `replica.state` in the partition's directory, of two slots of
//! [`SLOT_BYTES`]. A write goes to the slot the last write did not use and is fdatasync'ed
//! before [`ReplicaStateFile::store`] returns (O_DIRECT, one write and one fdatasync: the
//! directory entry is synced once, when the file is created). A torn write damages only the
//! slot being written: [`ReplicaStateFile::open`] takes the valid slot (magic, length and
//! CRC-32C) with the higher sequence number, so what a crash leaves is the last state stored
//! or the one before the write that tore, never a mix.
//!
//! What the caller (the replica's shell) must do with it: store the term and vote before any
//! message that depends on them leaves, and store an epoch's start before the first batch of
//! that epoch is appended, so the recovered history names every epoch the log holds (starts at
//! or past the recovered log end are dropped by the caller).
//!
//! What it is not: it does not know Raft; it keeps what it is given.

use std::path::{Path, PathBuf};

use glommio::io::{DmaFile, OpenOptions};

use crate::error::{LogError, Result};

pub const FILE_NAME: &str = "replica.state";
/// Bytes of one slot: room for [`EPOCHS_MAX`] epochs.
pub const SLOT_BYTES: usize = 64 << 10;
const HEADER_BYTES: usize = 4 + 4 + 4 + 8 + 4 + 8 + 1 + 8 + 8 + 4;
/// Most epoch starts kept: the oldest are dropped beyond it (a follower whose log diverges
/// before the oldest one kept is then truncated to the oldest kept start and fetches again).
pub const EPOCHS_MAX: usize = (SLOT_BYTES - HEADER_BYTES) / 12;
const MAGIC: u32 = 0x5052_5332; // "PRS2"

/// What a replica persists besides its log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplicaState {
    pub term: i32,
    pub voted_for: Option<u32>,
    pub recovering: bool,
    /// The incarnation of the replica's disk (0 until it was lost once; see replication's
    /// `HardState::disk_id`).
    pub disk_id: u64,
    /// A commit point the replica knew when this was stored (a lower bound of the true one).
    pub commit: i64,
    /// (epoch, start offset), oldest first, both growing.
    pub epochs: Vec<(i32, i64)>,
}

/// The open state file of one replica (on the shard that owns the partition).
pub struct ReplicaStateFile {
    path: PathBuf,
    file: DmaFile,
    /// The sequence number of the last state stored (0: none yet).
    sequence: u64,
}

impl ReplicaStateFile {
    /// Opens the state file in `dir`, creating it (and syncing the directory) when missing.
    /// Returns the last state stored, `None` for a new file.
    pub async fn open(dir: &Path) -> Result<(ReplicaStateFile, Option<ReplicaState>)> {
        let path = dir.join(FILE_NAME);
        let existed = path.exists();
        // glommio's first open on a device decides whether its reads are polled: it must see
        // a file holding data (see `device`).
        crate::settle_device_probe(dir).await?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(!existed)
            .dma_open(&path)
            .await
            .map_err(|e| LogError::io("opening replica state", &path, e))?;
        if !existed {
            crate::log::sync_directory(dir).await?;
        }
        let mut best: Option<(u64, ReplicaState)> = None;
        let size = file.file_size().await.map_err(|e| LogError::io("sizing replica state", &path, e))?;
        for slot in 0..2u64 {
            if size < (slot + 1) * SLOT_BYTES as u64 {
                continue;
            }
            let read = file
                .read_at(slot * SLOT_BYTES as u64, SLOT_BYTES)
                .await
                .map_err(|e| LogError::io("reading replica state", &path, e))?;
            if let Some((sequence, state)) = decode(&read) {
                if best.as_ref().is_none_or(|(best, _)| sequence > *best) {
                    best = Some((sequence, state));
                }
            }
        }
        let sequence = best.as_ref().map_or(0, |(sequence, _)| *sequence);
        Ok((ReplicaStateFile { path, file, sequence }, best.map(|(_, state)| state)))
    }

    /// Stores `state` durably: it is what the next open returns once this returns Ok. An error
    /// leaves the previous state in the other slot.
    pub async fn store(&mut self, state: &ReplicaState) -> Result<()> {
        assert!(state.epochs.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1), "epochs grow");
        let sequence = self.sequence + 1;
        let slot = sequence % 2;
        let mut buffer = self.file.alloc_dma_buffer(SLOT_BYTES);
        encode(sequence, state, buffer.as_bytes_mut());
        self.file
            .write_at(buffer, slot * SLOT_BYTES as u64)
            .await
            .map_err(|e| LogError::io("writing replica state", &self.path, e))?;
        self.file.fdatasync().await.map_err(|e| LogError::io("syncing replica state", &self.path, e))?;
        self.sequence = sequence;
        Ok(())
    }

    pub async fn close(self) -> Result<()> {
        self.file.close().await.map_err(|e| LogError::io("closing replica state", &self.path, e))
    }
}

/// Layout: magic u32, CRC-32C u32 (of the bytes after it up to the payload's end), payload
/// length u32, sequence u64, term i32, voted_for i64 (-1: none), recovering u8, disk id u64,
/// commit i64, epoch count u32, then (epoch i32, start i64) per epoch; all big-endian, zeros
/// after.
fn encode(sequence: u64, state: &ReplicaState, out: &mut [u8]) {
    out.fill(0);
    let epochs = &state.epochs[state.epochs.len().saturating_sub(EPOCHS_MAX)..];
    let mut payload = Vec::with_capacity(HEADER_BYTES + 12 * epochs.len());
    payload.extend_from_slice(&sequence.to_be_bytes());
    payload.extend_from_slice(&state.term.to_be_bytes());
    payload.extend_from_slice(&state.voted_for.map_or(-1, i64::from).to_be_bytes());
    payload.push(u8::from(state.recovering));
    payload.extend_from_slice(&state.disk_id.to_be_bytes());
    payload.extend_from_slice(&state.commit.to_be_bytes());
    payload.extend_from_slice(&(epochs.len() as u32).to_be_bytes());
    for (epoch, start) in epochs {
        payload.extend_from_slice(&epoch.to_be_bytes());
        payload.extend_from_slice(&start.to_be_bytes());
    }
    let length = payload.len() as u32;
    let mut crc = crc32c::crc32c(&length.to_be_bytes());
    crc = crc32c::crc32c_append(crc, &payload);
    out[0..4].copy_from_slice(&MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&crc.to_be_bytes());
    out[8..12].copy_from_slice(&length.to_be_bytes());
    out[12..12 + payload.len()].copy_from_slice(&payload);
}

fn decode(slot: &[u8]) -> Option<(u64, ReplicaState)> {
    let be_u32 = |at: usize| Some(u32::from_be_bytes(slot.get(at..at + 4)?.try_into().ok()?));
    if be_u32(0)? != MAGIC {
        return None;
    }
    let crc = be_u32(4)?;
    let length = be_u32(8)? as usize;
    let payload = slot.get(12..12usize.checked_add(length)?)?;
    if crc32c::crc32c_append(crc32c::crc32c(&(length as u32).to_be_bytes()), payload) != crc {
        return None;
    }
    let i32_at = |at: usize| Some(i32::from_be_bytes(payload.get(at..at + 4)?.try_into().ok()?));
    let i64_at = |at: usize| Some(i64::from_be_bytes(payload.get(at..at + 8)?.try_into().ok()?));
    let sequence = i64_at(0)? as u64;
    let term = i32_at(8)?;
    let voted_for = match i64_at(12)? {
        -1 => None,
        id => Some(u32::try_from(id).ok()?),
    };
    let recovering = match *payload.get(20)? {
        0 => false,
        1 => true,
        _ => return None,
    };
    let disk_id = i64_at(21)? as u64;
    let commit = i64_at(29)?;
    let count = u32::from_be_bytes(payload.get(37..41)?.try_into().ok()?) as usize;
    if payload.len() != 41 + 12 * count {
        return None;
    }
    let epochs: Vec<(i32, i64)> =
        (0..count).map(|i| Some((i32_at(41 + 12 * i)?, i64_at(45 + 12 * i)?))).collect::<Option<_>>()?;
    let grows = epochs.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1);
    let state = ReplicaState { term, voted_for, recovering, disk_id, commit, epochs };
    (grows && term >= 0 && commit >= 0).then_some((sequence, state))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::tests::run;

    fn state(term: i32, epochs: usize) -> ReplicaState {
        ReplicaState {
            term,
            voted_for: Some(3),
            recovering: term % 2 == 0,
            disk_id: u64::from(term as u32) << 40,
            commit: i64::from(term) * 7,
            epochs: (0..epochs).map(|i| (i as i32 + 1, 10 * i as i64)).collect(),
        }
    }

    #[test]
    fn the_last_state_stored_comes_back() {
        let dir = tempfile::tempdir().unwrap();
        run(async {
            let (mut file, recovered) = ReplicaStateFile::open(dir.path()).await.unwrap();
            assert_eq!(recovered, None);
            for term in 1..=5 {
                file.store(&state(term, term as usize)).await.unwrap();
            }
            file.close().await.unwrap();
            let (mut file, recovered) = ReplicaStateFile::open(dir.path()).await.unwrap();
            assert_eq!(recovered, Some(state(5, 5)));
            // The sequence carries on: the next store wins over both slots.
            file.store(&ReplicaState::default()).await.unwrap();
            file.close().await.unwrap();
            let (file, recovered) = ReplicaStateFile::open(dir.path()).await.unwrap();
            assert_eq!(recovered, Some(ReplicaState::default()));
            file.close().await.unwrap();
        });
    }

    #[test]
    fn a_torn_slot_falls_back_to_the_state_before() {
        let dir = tempfile::tempdir().unwrap();
        run(async {
            let (mut file, _) = ReplicaStateFile::open(dir.path()).await.unwrap();
            file.store(&state(7, 2)).await.unwrap(); // slot 1
            file.store(&state(8, 3)).await.unwrap(); // slot 0
            file.close().await.unwrap();
        });
        // Damage the newer slot (slot 0) as a torn write would.
        let path = dir.path().join(FILE_NAME);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[40] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        run(async {
            let (file, recovered) = ReplicaStateFile::open(dir.path()).await.unwrap();
            assert_eq!(recovered, Some(state(7, 2)));
            file.close().await.unwrap();
        });
    }

    #[test]
    fn only_the_newest_epochs_are_kept_beyond_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        run(async {
            let (mut file, _) = ReplicaStateFile::open(dir.path()).await.unwrap();
            let big = state(1, EPOCHS_MAX + 10);
            file.store(&big).await.unwrap();
            file.close().await.unwrap();
            let (file, recovered) = ReplicaStateFile::open(dir.path()).await.unwrap();
            let recovered = recovered.unwrap();
            assert_eq!(recovered.epochs.len(), EPOCHS_MAX);
            assert_eq!(recovered.epochs.last(), big.epochs.last());
            file.close().await.unwrap();
        });
    }

    #[test]
    fn garbage_is_never_a_state() {
        assert_eq!(decode(&[0u8; 64]), None);
        let mut slot = vec![0u8; SLOT_BYTES];
        encode(9, &state(4, 3), &mut slot);
        assert_eq!(decode(&slot), Some((9, state(4, 3))));
        for at in [4, 8, 12, 20, 33] {
            let mut bad = slot.clone();
            bad[at] ^= 0x40;
            assert_eq!(decode(&bad), None, "a flip at byte {at}");
        }
    }
}
