//! Acknowledged means on disk: with the real processes under `strace`, every group the agent
//! reports committed and every sequence number the hub acknowledges was preceded by an
//! `fdatasync`/`fsync` of that store's files, started after the group was written.
//!
//! Both binaries log a trace event (target `edgesync::durability`) when a group is written to
//! sled (`appending` in the agent, `written` in the hub) and when it counts as durable
//! (`committed` in the agent, before the uplink may send it; `acknowledged` in the hub, before
//! the ack goes out). `strace -f -ttt -T -y` records those log writes together with the sync
//! calls and the files they were made on, each with its start time and duration.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use edgesync_testkit::harness::{self, Pki, TempDir};
use edgesync_testkit::sim::{Script, SimConfig, SimHandle, Table};
use tokio::process::Command;

use crate::support::{self, LEVEL, RO, TD};

/// Enables the markers and keeps everything else at `info`.
const LOG: (&str, &str) = ("RUST_LOG", "info,rumqttd=warn,edgesync::durability=trace");

/// A sync call on a store file: when it started and ended (seconds, strace's clock).
#[derive(Debug, Clone, Copy)]
struct Sync {
    start: f64,
    end: f64,
}

/// What one strace log holds: sync calls on files under the store directory, and markers
/// (`(kind, upto)` at a time).
#[derive(Debug, Default)]
struct Trace {
    syncs: Vec<Sync>,
    markers: Vec<(String, u64, f64)>,
}

/// Parses `strace -f -ttt -T -y -s 512` output. Lines look like
/// `PID 1700000000.123456 fdatasync(7</dir/db>) = 0 <0.000321>` (start time, duration), or are
/// split into `PID T0 fdatasync(7</dir/db> <unfinished ...>` and `PID T1 <... fdatasync
/// resumed>) = 0 <D>` (T0 the start, T1 the return, D the whole call's duration).
fn parse(text: &str, store: &Path) -> anyhow::Result<Trace> {
    let store = store.display().to_string();
    let mut out = Trace::default();
    // Unfinished sync calls per PID: their start time.
    let mut open: BTreeMap<String, f64> = BTreeMap::new();
    for line in text.lines() {
        // strace leaves the PID column out while it follows a single thread, and pads it with
        // spaces to a common width (`123  1700000000.1 ...`).
        let (pid, line) = match line.split_once(' ') {
            Some((p, rest)) if !p.contains('.') && p.parse::<u32>().is_ok() => {
                (p, rest.trim_start())
            }
            _ => ("", line),
        };
        let Some((ts, rest)) = line.split_once(' ') else {
            continue;
        };
        let Ok(ts) = ts.parse::<f64>() else {
            continue;
        };
        let is_sync = rest.starts_with("fdatasync(") || rest.starts_with("fsync(");
        if is_sync && rest.contains(&store) {
            if rest.contains("<unfinished ...>") {
                open.insert(pid.to_owned(), ts);
            } else if rest.contains("= 0 <") {
                out.syncs.push(Sync {
                    start: ts,
                    end: ts + duration(rest)?,
                });
            }
            continue;
        }
        if rest.starts_with("<... fdatasync resumed>") || rest.starts_with("<... fsync resumed>") {
            // The duration on a resumed line is the whole call's.
            if let Some(start) = open.remove(pid)
                && rest.contains("= 0 <")
            {
                out.syncs.push(Sync {
                    start,
                    end: start + duration(rest)?,
                });
            }
            continue;
        }
        if rest.starts_with("write(") {
            for kind in ["appending", "committed", "written", "acknowledged"] {
                let needle = format!("{kind} upto=");
                if let Some(i) = rest.find(&needle) {
                    let digits: String = rest[i + needle.len()..]
                        .chars()
                        .take_while(char::is_ascii_digit)
                        .collect();
                    out.markers.push((kind.to_owned(), digits.parse()?, ts));
                }
            }
        }
    }
    Ok(out)
}

/// The `<0.000123>` duration at the end of a line.
fn duration(rest: &str) -> anyhow::Result<f64> {
    let d = rest
        .rsplit_once('<')
        .and_then(|(_, d)| d.strip_suffix('>'))
        .context("no duration")?;
    Ok(d.parse()?)
}

/// Checks that every `done` marker for `upto` was preceded by a sync of the store that started
/// after the `begun` marker covering `upto` and ended before the `done` marker. Returns how many
/// `done` markers were checked.
fn check(trace: &Trace, begun: &str, done: &str) -> anyhow::Result<usize> {
    // upto -> time of the begun marker of the group ending at or after it.
    let begun: Vec<(u64, f64)> = trace
        .markers
        .iter()
        .filter(|(k, ..)| k == begun)
        .map(|(_, upto, ts)| (*upto, *ts))
        .collect();
    let mut checked = 0;
    for (_, upto, at) in trace.markers.iter().filter(|(k, ..)| k == done) {
        // The group holding `upto` is the first traced one whose range reaches `upto`, but
        // only if a traced group ended below it: otherwise the group holding `upto` may have
        // been written before strace attached, and the first traced one is a later group.
        let Some(i) = begun.iter().position(|(u, _)| u >= upto) else {
            // Written before strace attached: nothing to check it against.
            continue;
        };
        if i == 0 {
            continue;
        }
        let written_at = begun[i].1;
        let ok = trace
            .syncs
            .iter()
            .any(|s| s.start >= written_at && s.end <= *at);
        if !ok {
            bail!(
                "{done} upto={upto} at {at:.6} without a sync of the store after it was written at {written_at:.6} (syncs: {:?})",
                trace
                    .syncs
                    .iter()
                    .filter(|s| s.end > written_at - 0.5 && s.start < at + 0.5)
                    .collect::<Vec<_>>()
            );
        }
        checked += 1;
    }
    Ok(checked)
}

/// Attaches strace to `pid` (every thread, and threads started later) until it recorded
/// `want` lines holding `marker` (or 60 s passed: attaching can be slow on a loaded machine),
/// then detaches; returns what it recorded.
async fn trace_until(
    strace: &Path,
    pid: u32,
    out: &Path,
    marker: &str,
    want: usize,
) -> anyhow::Result<String> {
    let mut child = Command::new(strace)
        .args([
            "-f",
            "-ttt",
            "-T",
            "-y",
            "-s",
            "512",
            "-e",
            "trace=fsync,fdatasync,write",
            "-o",
            &out.display().to_string(),
            "-p",
            &pid.to_string(),
        ])
        .kill_on_drop(true)
        .spawn()
        .context("spawn strace")?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let seen = std::fs::read_to_string(out)
            .map(|t| t.matches(marker).count())
            .unwrap_or(0);
        if seen >= want {
            break;
        }
    }
    // SIGTERM makes strace detach and exit; the traced process runs on untouched.
    if let Some(id) = child.id() {
        std::process::Command::new("kill")
            .args(["-TERM", &id.to_string()])
            .status()?;
    }
    tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .context("strace did not exit")??;
    Ok(std::fs::read_to_string(out)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_commit_and_every_ack_follows_an_fsync_of_the_store() -> anyhow::Result<()> {
    let strace = support::which("strace")?;
    let tmp = TempDir::new("durable")?;
    let pki = Pki::new(&tmp.path().join("pki"), TD)?;
    // Two registers change every 20 ms; the agent polls every 50 ms and commits every 10 ms:
    // about 20 groups per second.
    let sim = SimHandle::start("127.0.0.1:0".parse()?, SimConfig::with_units([1])).await?;
    for reg in [RO, LEVEL] {
        sim.add_script(
            1,
            Table::HoldingRegisters,
            reg,
            Script::Counter { step: 1 },
            Duration::from_millis(20),
        )?;
    }
    let hub_dir = tmp.path().join("hub");
    std::fs::create_dir_all(&hub_dir)?;
    let (hub, tunnel, _http) =
        harness::start_hub_env(&hub_dir, &pki, "127.0.0.1:0", "127.0.0.1:0", &[LOG]).await?;
    let agent = support::start_agent_env(
        tmp.path(),
        &pki,
        &tunnel,
        &sim.local_addr().to_string(),
        "[mqtt]\nmode = \"off\"\n",
        &[LOG],
    )
    .await?;
    let r = async {
        // Let the tunnel come up and records flow.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (agent_pid, hub_pid) = (
            agent.pid().context("agent pid")?,
            hub.pid().context("hub pid")?,
        );
        let (agent_out, hub_out) = (
            tmp.path().join("agent.strace"),
            tmp.path().join("hub.strace"),
        );
        let (agent_trace, hub_trace) = tokio::try_join!(
            trace_until(&strace, agent_pid, &agent_out, "committed upto=", 40),
            trace_until(&strace, hub_pid, &hub_out, "acknowledged upto=", 40),
        )?;
        let agent_store = tmp.path().join(support::NODE).join("data");
        let hub_store = hub_dir.join("hubdata");
        let a = parse(&agent_trace, &agent_store)?;
        let h = parse(&hub_trace, &hub_store)?;
        let agent_checked = check(&a, "appending", "committed")
            .context("agent: a group counted as committed before it was synced");
        let hub_checked = check(&h, "written", "acknowledged")
            .context("hub: records acknowledged before they were synced");
        let (agent_checked, hub_checked) = match (agent_checked, hub_checked) {
            (Ok(a), Ok(h)) => (a, h),
            (a, h) => bail!(
                "{}\n{}",
                a.map_or_else(|e| format!("{e:#}"), |n| format!("agent: {n} commits ok")),
                h.map_or_else(|e| format!("{e:#}"), |n| format!("hub: {n} acks ok"))
            ),
        };
        // The test saw real traffic on both ends.
        let head = |t: &str| t.lines().take(3).collect::<Vec<_>>().join("\n");
        assert!(
            agent_checked >= 20,
            "only {agent_checked} agent commits seen (syncs {}, {} lines traced, starting:\n{})",
            a.syncs.len(),
            agent_trace.lines().count(),
            head(&agent_trace)
        );
        assert!(
            hub_checked >= 20,
            "only {hub_checked} hub acks seen (syncs {}, {} lines traced, starting:\n{})",
            h.syncs.len(),
            hub_trace.lines().count(),
            head(&hub_trace)
        );
        Ok::<_, anyhow::Error>(())
    }
    .await;
    let _ = agent.terminate().await;
    let _ = hub.terminate().await;
    r
}

#[test]
fn the_parser_pairs_unfinished_syncs_and_finds_markers() {
    let store = Path::new("/s/data");
    let text = "\
10 100.000000 write(1</dev/pts/0>, \"... TRACE edgesync::durability: appending upto=5 from=1\\n\", 60) = 60 <0.000010>
11 100.001000 fdatasync(7</s/data/db> <unfinished ...>
10 100.001500 write(1</dev/pts/0>, \"... appending upto=9 from=6\\n\", 40) = 40 <0.000010>
11 100.002000 <... fdatasync resumed>) = 0 <0.001000>
10 100.003000 write(1</dev/pts/0>, \"... committed upto=5 from=1\\n\", 40) = 40 <0.000010>
10 100.004000 write(1</dev/pts/0>, \"... committed upto=9 from=6\\n\", 40) = 40 <0.000010>
11 100.005000 fdatasync(8</other/db>) = 0 <0.000100>
";
    let t = parse(text, store).unwrap();
    assert_eq!(t.syncs.len(), 1);
    assert_eq!(t.markers.len(), 4);
    // upto=5 is covered; upto=9 was written after the only sync started.
    let err = check(&t, "appending", "committed").unwrap_err();
    assert!(err.to_string().contains("committed upto=9"), "{err}");
    let ok = "\
10 100.000000 write(2<pipe:[1]>, \"written upto=3 node=n\\n\", 20) = 20 <0.000010>
12 100.000100 fsync(9</s/data/db>) = 0 <0.000200>
10 100.000400 write(2<pipe:[1]>, \"acknowledged upto=3 node=n\\n\", 20) = 20 <0.000010>
";
    let t = parse(ok, store).unwrap();
    // The only traced group may not be the one holding upto=3: nothing to check.
    assert_eq!(check(&t, "written", "acknowledged").unwrap(), 0);
    let ok = format!(
        "10 99.000000 write(2<pipe:[1]>, \"written upto=2 node=n\\n\", 20) = 20 <0.000010>\n{ok}"
    );
    let t = parse(&ok, store).unwrap();
    assert_eq!(check(&t, "written", "acknowledged").unwrap(), 1);
    // A group whose first traced write came after strace attached, committed before the next
    // group was written, is not checked against that later group (seen in CI).
    let late = "\
10 100.000000 write(1</dev/pts/0>, \"... committed upto=83 from=80\\n\", 40) = 40 <0.000010>
10 100.050000 write(1</dev/pts/0>, \"... appending upto=90 from=84\\n\", 40) = 40 <0.000010>
";
    let t = parse(late, store).unwrap();
    assert_eq!(check(&t, "appending", "committed").unwrap(), 0);
    // PIDs of different widths are padded.
    let padded = ok.replace("10 100.", "10  100.");
    let t = parse(&padded, store).unwrap();
    assert_eq!((t.syncs.len(), t.markers.len()), (1, 3));
    // Without the PID column (strace following one thread).
    let single: String = ok
        .lines()
        .map(|l| format!("{}\n", l.split_once(' ').unwrap().1))
        .collect();
    let t = parse(&single, store).unwrap();
    assert_eq!((t.syncs.len(), t.markers.len()), (1, 3));
    assert_eq!(check(&t, "written", "acknowledged").unwrap(), 1);
}
