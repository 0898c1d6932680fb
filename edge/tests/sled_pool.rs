//! sled's IO thread pool (the copy in `vendor/sled`) leaves an idle process alone: its threads
//! wake for jobs, not once a second each. A test binary of its own, because the pool is global
//! to a process and other tests' stores would give it work.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::time::Duration;

/// Voluntary context switches of the pool's permanent threads (`sled-io-0` to `sled-io-6`, the
/// first seven it starts) in this process, by thread id. Threads it adds under load keep a
/// one-second deadline so that they can end; they are not counted.
fn pool_switches() -> BTreeMap<u32, u64> {
    let mut out = BTreeMap::new();
    for task in std::fs::read_dir("/proc/self/task").unwrap() {
        let path = task.unwrap().path();
        let Ok(comm) = std::fs::read_to_string(path.join("comm")) else {
            continue;
        };
        let permanent = comm
            .trim()
            .strip_prefix("sled-io-")
            .and_then(|n| n.parse::<u32>().ok())
            .is_some_and(|n| n < 7);
        if !permanent {
            continue;
        }
        let Ok(status) = std::fs::read_to_string(path.join("status")) else {
            continue;
        };
        let switches = status
            .lines()
            .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
            .map(|v| v.trim().parse::<u64>().unwrap())
            .unwrap();
        let tid = path.file_name().unwrap().to_str().unwrap().parse().unwrap();
        out.insert(tid, switches);
    }
    out
}

#[test]
fn idle_pool_threads_do_not_wake() {
    let dir = tempfile::tempdir().unwrap();
    let db = sled::Config::new().path(dir.path()).open().unwrap();
    // Work for the pool: it starts its threads on the first job.
    for i in 0u32..1000 {
        db.insert(i.to_be_bytes(), vec![7u8; 100]).unwrap();
    }
    db.flush().unwrap();
    std::thread::sleep(Duration::from_millis(1500));

    let before = pool_switches();
    assert_eq!(before.len(), 7, "sled's pool keeps 7 permanent threads");
    std::thread::sleep(Duration::from_secs(4));
    let after = pool_switches();

    assert_eq!(after.len(), 7, "a permanent pool thread ended");
    let woke: Vec<(u32, u64)> = before
        .iter()
        .map(|(tid, n)| (*tid, after[tid] - n))
        .collect();
    // Before the patch every idle thread woke once a second: 4 here.
    for (tid, n) in &woke {
        assert!(
            *n <= 1,
            "idle sled-io thread {tid} woke {n} times in 4 s (all: {woke:?})"
        );
    }
    drop(db);
}
