//! A disk that really fills: the hub store on a small tmpfs, the rest of it taken by a filler
//! file. The commit that cannot be written fails with an error (nothing is acknowledged), and
//! the store turns unready (what `/readyz` reports) and stays so, as sled keeps the I/O error.
//!
//! Mounting needs privileges: the test re-runs itself inside a new user and mount namespace
//! (`unshare --user --map-root-user --mount`, util-linux), where it may mount a tmpfs that
//! nobody else sees and that vanishes with the process. It works for root and for other users.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::path::Path;
use std::process::Command;

use edgesync_cloud::store::HubStore;
use edgesync_protocol::{DeviceId, NodeId, PropertyId, Quality, Sample, Timestamp, Value};

const INNER: &str = "EDGESYNC_STORE_FULL_INNER";
const TEST: &str = "a_full_disk_fails_the_commit_and_makes_the_store_unready";

#[test]
fn a_full_disk_fails_the_commit_and_makes_the_store_unready() {
    if std::env::var_os(INNER).is_some() {
        inner();
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let out = Command::new("unshare")
        .args(["--user", "--map-root-user", "--mount", "--"])
        .arg(exe)
        .args(["--exact", TEST, "--nocapture", "--test-threads=1"])
        .env(INNER, "1")
        .output()
        .expect("run unshare (Debian package util-linux)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "the test inside the namespace failed:\n{text}"
    );
    assert!(
        text.contains("1 passed"),
        "the inner test did not run:\n{text}"
    );
}

fn sample(i: u64) -> Sample {
    Sample {
        device: DeviceId::new(format!("d{}", i % 10)).unwrap(),
        property: PropertyId::new(format!("p{}", i % 100)).unwrap(),
        value: Some(Value::Int(i as i64)),
        quality: Quality::Good,
        ts: Timestamp(1_700_000_000_000 + i),
    }
}

fn inner() {
    let dir = std::env::temp_dir().join(format!("edgesync-full-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let status = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=16m", "tmpfs"])
        .arg(&dir)
        .status()
        .expect("run mount");
    assert!(status.success(), "mount a tmpfs on {}", dir.display());
    let store = HubStore::open(&dir.join("hub"), 4 << 20).unwrap();
    assert!(store.is_ready());
    // Leave 2 MiB: some commits fit, then the disk is full.
    fill(&dir.join("filler"));
    let filler = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("filler"))
        .unwrap();
    let len = filler.metadata().unwrap().len();
    filler.set_len(len.saturating_sub(2 << 20)).unwrap();
    drop(filler);
    let node = NodeId::new("gw-1").unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut next = 1u64;
    let mut failure = None;
    rt.block_on(async {
        // Bounded: 16 MiB cannot hold 2,000 batches of 500 records.
        for _ in 0..2000 {
            let batch: Vec<Sample> = (next..next + 500).map(sample).collect();
            match store.commit_batch(&node, next, &batch).await {
                Ok(out) => {
                    assert_eq!(out.stored_seq, next + 499);
                    next += 500;
                }
                Err(e) => {
                    failure = Some(e.to_string());
                    break;
                }
            }
        }
    });
    let failure = failure.expect("a commit on a full disk failed");
    assert!(!store.is_ready(), "the store is unready after {failure}");
    let why = store.write_error().expect("the reason is kept");
    assert!(
        why.contains("No space left") || why.contains("os error 28"),
        "the reason names the full disk: {why}"
    );
    // Some commits fitted; what was reported stored is exactly what they stored, nothing of
    // the failed one.
    assert!(next > 1, "no commit fitted in 2 MiB: {failure}");
    assert_eq!(store.stored_seq(&node).unwrap(), next - 1);
    // Space comes back; sled keeps its error until the store is reopened, and so does the hub.
    std::fs::remove_file(dir.join("filler")).unwrap();
    let again = rt.block_on(store.commit_batch(&node, next, &[sample(next)]));
    assert!(again.is_err());
    assert!(!store.is_ready());
}

/// Writes `path` until the filesystem is full.
fn fill(path: &Path) {
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0u8; 64 * 1024];
    loop {
        match f.write_all(&chunk) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(28) => break,
            Err(e) => panic!("filling {}: {e}", path.display()),
        }
    }
}
