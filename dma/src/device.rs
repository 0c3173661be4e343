//! A workaround for glommio 0.9's io_poll probe.
//!
//! glommio decides once per thread and block device whether to send O_DIRECT I/O to its
//! polled ring, by reading the first block of the first file it opens there. When that file is
//! empty (a brand-new segment), the read short-circuits at end of file and "succeeds", so every
//! later read and write on the device goes to the polled ring. On devices without polling
//! support (virtio disks, most cloud volumes) the kernel then fails each of them with
//! EOPNOTSUPP. Opening a file with one real block of data first makes the probe see the truth.

use std::cell::RefCell;
use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use glommio::io::DmaFile;

use crate::{LogError, Result};

/// Every probe file's name starts with this; one left by a process killed while probing is
/// stale once a new process holds the data directory.
pub const PROBE_FILE_PREFIX: &str = ".pyralog-device-probe";

/// Tells the probe files of this process's threads apart.
static PROBE_FILES_MADE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

thread_local! {
    static PROBED_DEVICES: RefCell<HashSet<u64>> = RefCell::new(HashSet::new());
}

/// Makes glommio probe the device of `dir` on a file holding data. Cheap after the first call
/// on each thread and device.
pub async fn settle_device_probe(dir: &Path) -> Result<()> {
    let device = std::fs::metadata(dir).map_err(|e| LogError::io("inspecting", dir, e))?.dev();
    if PROBED_DEVICES.with(|p| p.borrow().contains(&device)) {
        return Ok(());
    }
    let number = PROBE_FILES_MADE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = dir.join(format!("{PROBE_FILE_PREFIX}-{}-{number}", std::process::id()));
    std::fs::write(&path, [0u8; 4096]).map_err(|e| LogError::io("writing device probe", &path, e))?;
    let opened = DmaFile::open(&path).await;
    let _ = std::fs::remove_file(&path);
    let file = opened.map_err(|e| LogError::io("opening device probe", &path, e))?;
    file.close().await.map_err(|e| LogError::io("closing device probe", &path, e))?;
    PROBED_DEVICES.with(|p| p.borrow_mut().insert(device));
    Ok(())
}
