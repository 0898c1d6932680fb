//! SVIDs that rotate (issue 9): the files watcher on its own, then real processes whose
//! short-lived SVIDs rotate on disk while records flow, and a hub that ends a session whose
//! certificate expires.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail, ensure};
use edgesync_cloud::store::HubStore;
use edgesync_protocol::NodeId;
use edgesync_protocol::spiffe_id::NodeIds;
use edgesync_protocol::svid_files::{Accept, Checked, SvidFiles, Watcher};
use edgesync_protocol::tls::Identity;
use edgesync_testkit::harness::{self, Api, Pki, Proc, SimDevice, TempDir};
use edgesync_testkit::pki::Svid;
use tokio::time::Instant;

use crate::support::{DEVICE, NODE, TD, audit, start_counters};

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The leaf's `notAfter` of a minted SVID, in seconds since the epoch.
fn not_after(svid: &Svid) -> anyhow::Result<u64> {
    let leaf = svid.leaf_der().context("no leaf")?;
    Ok(edgesync_protocol::tls::cert_validity(leaf)?.1)
}

#[test]
fn the_watcher_loads_consistent_rotations_only_and_keeps_the_last_good_svid() -> anyhow::Result<()>
{
    let tmp = TempDir::new("svid-watch")?;
    let pki = Pki::new(&tmp.path().join("pki"), TD)?;
    let id = format!("spiffe://{TD}/edge/{NODE}");
    let first = pki.ca.mint(&id, Duration::from_secs(3600))?;
    let (cert, key) = first.write(tmp.path(), "svid")?;
    let want = id.clone();
    let accept: Accept = Arc::new(move |i: &Identity| {
        if i.id.to_string() == want {
            Ok(())
        } else {
            Err(format!("{} is not {want}", i.id))
        }
    });
    let files = SvidFiles {
        cert: cert.clone(),
        key: key.clone(),
        bundle: pki.bundle.clone(),
        federated: Vec::new(),
    };
    let (store, mut w) = Watcher::start(files, accept.clone())?;
    let mut rotated = w.subscribe();
    assert_eq!(store.validity().1, not_after(&first)?);
    assert_eq!(w.check(), Checked::Unchanged);

    // spiffe-helper style: the new chain lands before its key. Never loaded half-way.
    let second = pki.ca.mint(&id, Duration::from_secs(7200))?;
    std::fs::write(&cert, &second.cert_pem)?;
    match w.check() {
        Checked::Unusable(why) => ensure!(
            why.contains("private key does not belong"),
            "mismatch reported as: {why}"
        ),
        other => bail!("a chain with the previous key was {other:?}"),
    }
    assert_eq!(store.validity().1, not_after(&first)?, "the old SVID stays");
    assert!(!rotated.has_changed()?);
    std::fs::write(&key, &second.key_pem)?;
    assert_eq!(w.check(), Checked::Rotated);
    assert_eq!(store.validity().1, not_after(&second)?);
    assert!(rotated.has_changed()?);
    rotated.borrow_and_update();

    // Another node's SVID: valid, but refused by the caller's rule, naming the file.
    let other = pki.ca.mint(
        &format!("spiffe://{TD}/edge/gw-2"),
        Duration::from_secs(3600),
    )?;
    other.write(tmp.path(), "svid")?;
    match w.check() {
        Checked::Unusable(why) => ensure!(
            why.contains("svid.pem") && why.contains("gw-2"),
            "refusal: {why}"
        ),
        other => bail!("another node's SVID was {other:?}"),
    }
    // A missing file (mid-rename) and garbage: the last good SVID stays.
    std::fs::remove_file(&key)?;
    assert!(matches!(w.check(), Checked::Unusable(why) if why.contains("svid.key.pem")));
    std::fs::write(&key, b"not a key")?;
    assert!(matches!(w.check(), Checked::Unusable(_)));
    // A file far larger than any SVID is not read whole.
    std::fs::write(&key, vec![b'A'; 3 << 20])?;
    assert!(matches!(w.check(), Checked::Unusable(why) if why.contains("larger than")));
    assert_eq!(store.validity().1, not_after(&second)?);
    assert_eq!(store.id().to_string(), id);
    assert!(!rotated.has_changed()?);

    // A bundle rotation alone (a new CA) is picked up too, with a consistent SVID.
    let pki2 = Pki::new(&tmp.path().join("pki2"), TD)?;
    let third = pki2.ca.mint(&id, Duration::from_secs(3600))?;
    third.write(tmp.path(), "svid")?;
    std::fs::copy(&pki2.bundle, &pki.bundle)?;
    assert_eq!(w.check(), Checked::Rotated);
    assert_eq!(store.validity().1, not_after(&third)?);

    // The first load refuses what a rotation would refuse, naming the file.
    let bad = SvidFiles {
        cert: cert.clone(),
        key: tmp.path().join("missing.key.pem"),
        bundle: pki.bundle.clone(),
        federated: Vec::new(),
    };
    let e = Watcher::start(bad, accept)
        .err()
        .context("a missing key loads")?;
    ensure!(e.to_string().contains("missing.key.pem"), "{e}");
    Ok(())
}

/// A hub process whose SVID is `svid` (written as `hub.pem` / `hub.key.pem` in `dir`).
async fn start_hub(
    dir: &std::path::Path,
    pki: &Pki,
    svid: &Svid,
) -> anyhow::Result<(Proc, Api, String)> {
    let (cert, key) = svid.write(dir, "hub")?;
    let cfg = harness::hub_toml(
        dir,
        "127.0.0.1:0",
        "127.0.0.1:0",
        TD,
        &cert,
        &key,
        &pki.bundle,
        None,
    )?;
    let hub = Proc::spawn_env(
        &harness::bin("edgesync-hub")?,
        &["run", "--config", &cfg.display().to_string()],
        &dir.join("hub.log"),
        Some("edgesync-hub listening"),
        &[],
    )
    .await?;
    let (tunnel, http) = harness::hub_addrs(hub.ready_line.as_deref().unwrap_or_default())?;
    Ok((hub, Api::new(&http), tunnel))
}

async fn start_agent(
    dir: &std::path::Path,
    bundle: &std::path::Path,
    tunnel: &str,
    plc: &str,
) -> anyhow::Result<Proc> {
    let cfg = harness::agent_toml(
        dir,
        tunnel,
        TD,
        &dir.join("agent.pem"),
        &dir.join("agent.key.pem"),
        bundle,
        &[SimDevice {
            id: DEVICE.into(),
            endpoint: plc.to_owned(),
            unit: 1,
            counters: 4,
            poll_ms: 50,
        }],
        "",
    )?;
    harness::spawn_agent(&cfg, &dir.join("agent.log")).await
}

/// What the process tests share: the binaries built first (the SVIDs they use live for
/// seconds), a trust domain, and a PLC whose 4 counters change every 50 ms.
struct Setup {
    tmp: TempDir,
    pki: Pki,
    sim: edgesync_testkit::sim::SimHandle,
    scripts: Vec<edgesync_testkit::sim::ScriptId>,
    /// The agent's directory.
    dir: std::path::PathBuf,
}

impl Setup {
    async fn new(tag: &str) -> anyhow::Result<Setup> {
        harness::bin("edgesync-hub")?;
        harness::bin("edgesync-agent")?;
        let tmp = TempDir::new(tag)?;
        let pki = Pki::new(&tmp.path().join("pki"), TD)?;
        let sim = edgesync_testkit::sim::SimHandle::start(
            "127.0.0.1:0".parse()?,
            edgesync_testkit::sim::SimConfig::with_units([1]),
        )
        .await?;
        let scripts = start_counters(&sim, 4)?;
        let dir = tmp.path().join(NODE);
        std::fs::create_dir_all(&dir)?;
        Ok(Setup {
            tmp,
            pki,
            sim,
            scripts,
            dir,
        })
    }

    async fn agent(&self, tunnel: &str) -> anyhow::Result<Proc> {
        start_agent(
            &self.dir,
            &self.pki.bundle,
            tunnel,
            &self.sim.local_addr().to_string(),
        )
        .await
    }

    /// An agent whose SVID comes from the Workload API at `endpoint`.
    async fn agent_via_api(&self, tunnel: &str, endpoint: &str) -> anyhow::Result<Proc> {
        let unused = self.tmp.path().join("unused.pem");
        let cfg = harness::agent_toml(
            &self.dir,
            tunnel,
            TD,
            &unused,
            &unused,
            &unused,
            &[SimDevice {
                id: DEVICE.into(),
                endpoint: self.sim.local_addr().to_string(),
                unit: 1,
                counters: 4,
                poll_ms: 50,
            }],
            "",
        )?;
        use_workload_api(&cfg, &unused, &unused, &unused, endpoint)?;
        harness::spawn_agent(&cfg, &self.dir.join("agent.log")).await
    }

    fn logs(&self, agent: &Proc) -> String {
        format!(
            "--- agent ---\n{}\n--- hub ---\n{}",
            agent.log_text(),
            std::fs::read_to_string(self.tmp.path().join("hub.log")).unwrap_or_default()
        )
    }
}

/// After the hub stopped: its store holds every record once, no gap, and at least up to
/// `last` (what it acknowledged). `restarts`: the agent was restarted (see `audit`).
fn hub_stored_all(
    dir: &std::path::Path,
    last: u64,
    restarts: bool,
    logs: &str,
) -> anyhow::Result<()> {
    let store = HubStore::open(&dir.join("hubdata").join("hub.sled"), 1 << 20)?;
    let a = audit(&store, restarts).with_context(|| logs.to_owned())?;
    ensure!(a.gaps.is_empty(), "gaps {:?}", a.gaps);
    ensure!(
        store.stored_seq(&NodeId::new(NODE)?)? >= last,
        "the hub kept what it acknowledged"
    );
    Ok(())
}

/// The node's status from the hub's API.
async fn node_status(api: &Api) -> anyhow::Result<Option<serde_json::Value>> {
    let (status, n) = api.get(&format!("/api/v1/nodes/{NODE}")).await?;
    Ok((status == 200).then_some(n))
}

/// Waits until the hub stored records beyond `seq` over a live session; returns the new seq.
async fn flowing_past(api: &Api, seq: u64, within: Duration) -> anyhow::Result<u64> {
    api.wait_for(within, move |api| async move {
        Ok(node_status(&api).await?.and_then(|n| {
            let s = n["uplink_seq"].as_u64()?;
            (n["connected"] == true && s > seq).then_some(s)
        }))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_lived_svids_rotated_on_disk_keep_both_ends_connected_past_their_expiry()
-> anyhow::Result<()> {
    let setup = Setup::new("svid-rotation").await?;
    let (tmp, pki, dir) = (&setup.tmp, &setup.pki, &setup.dir);
    let hub_id = format!("spiffe://{TD}/hub");
    let node_id = format!("spiffe://{TD}/edge/{NODE}");
    // Both SVIDs expire 12 s from now; the CA's rotation replaces them after 4 s.
    let life = Duration::from_secs(12);
    let hub_old = pki.ca.mint(&hub_id, life)?;
    let agent_old = pki.ca.mint(&node_id, life)?;
    let expiry = not_after(&hub_old)?.max(not_after(&agent_old)?);
    let (hub, api, tunnel) = start_hub(tmp.path(), pki, &hub_old).await?;
    agent_old.write(dir, "agent")?;
    let agent = setup.agent(&tunnel).await?;
    let logs = |agent: &Proc| setup.logs(agent);
    let seq = flowing_past(&api, 0, Duration::from_secs(30))
        .await
        .with_context(|| logs(&agent))?;
    let first = node_status(&api).await?.context("node status")?;
    ensure!(
        first["svid_expires_ms"].as_u64() == Some(not_after(&agent_old)? * 1000),
        "node status shows the agent's certificate expiry: {first}"
    );

    tokio::time::sleep(Duration::from_secs(4)).await;
    // Rotation, written the way spiffe-helper does: one file after the other.
    let hub_new = pki.ca.mint(&hub_id, Duration::from_secs(3600))?;
    let agent_new = pki.ca.mint(&node_id, Duration::from_secs(3600))?;
    std::fs::write(tmp.path().join("hub.pem"), &hub_new.cert_pem)?;
    std::fs::write(dir.join("agent.pem"), &agent_new.cert_pem)?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    std::fs::write(tmp.path().join("hub.key.pem"), &hub_new.key_pem)?;
    std::fs::write(dir.join("agent.key.pem"), &agent_new.key_pem)?;

    // The agent reconnects with its new SVID (the hub shows the new expiry) and values flow.
    let want = not_after(&agent_new)? * 1000;
    api.wait_for(Duration::from_secs(15), move |api| async move {
        Ok(node_status(&api)
            .await?
            .filter(|n| n["connected"] == true && n["svid_expires_ms"].as_u64() == Some(want)))
    })
    .await
    .with_context(|| format!("the agent presents its rotated SVID\n{}", logs(&agent)))?;

    // Past the old certificates' expiry: still connected, values still flowing.
    let wait = (expiry + 2).saturating_sub(unix_now());
    tokio::time::sleep(Duration::from_secs(wait)).await;
    let seq = flowing_past(&api, seq, Duration::from_secs(10))
        .await
        .with_context(|| format!("values flow past the old expiry\n{}", logs(&agent)))?;
    // A fresh connection after the hub's first certificate expired: it presents the new one.
    agent.kill9().await?;
    let agent = setup.agent(&tunnel).await?;
    let seq = flowing_past(&api, seq, Duration::from_secs(15))
        .await
        .with_context(|| {
            format!(
                "a new agent process connects to the rotated hub\n{}",
                logs(&agent)
            )
        })?;

    // Nothing lost, nothing duplicated across the reconnects.
    for s in &setup.scripts {
        setup.sim.remove_script(*s);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let last = flowing_past(&api, seq, Duration::from_secs(10))
        .await
        .unwrap_or(seq);
    let agent_log = agent.log_text();
    ensure!(agent.terminate().await?, "agent exits 0\n{agent_log}");
    let hub_log = std::fs::read_to_string(tmp.path().join("hub.log"))?;
    ensure!(hub.terminate().await?, "hub exits 0\n{hub_log}");
    ensure!(
        hub_log.contains("SVID rotated"),
        "the hub logs its rotation\n{hub_log}"
    );
    hub_stored_all(tmp.path(), last, true, &format!("{agent_log}\n{hub_log}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hub_ends_a_session_when_the_agents_certificate_expires() -> anyhow::Result<()> {
    let setup = Setup::new("svid-expiry").await?;
    let (tmp, pki, dir) = (&setup.tmp, &setup.pki, &setup.dir);
    let hub_svid = pki
        .ca
        .mint(&format!("spiffe://{TD}/hub"), Duration::from_secs(3600))?;
    let (hub, api, tunnel) = start_hub(tmp.path(), pki, &hub_svid).await?;
    // Never rotated.
    let agent_svid = pki.ca.mint(
        &format!("spiffe://{TD}/edge/{NODE}"),
        Duration::from_secs(6),
    )?;
    agent_svid.write(dir, "agent")?;
    let expires = not_after(&agent_svid)?;
    let agent = setup.agent(&tunnel).await?;
    let logs = |agent: &Proc| setup.logs(agent);
    flowing_past(&api, 0, Duration::from_secs(30))
        .await
        .with_context(|| logs(&agent))?;
    ensure!(
        unix_now() < expires,
        "the session came up before the expiry"
    );
    // Within a few seconds of the expiry the session is gone and stays gone (the agent's
    // attempts with its expired certificate are refused).
    let deadline = Instant::now() + Duration::from_secs(expires.saturating_sub(unix_now()) + 5);
    loop {
        let n = node_status(&api).await?.context("node status")?;
        if n["connected"] == false && unix_now() >= expires {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "still connected after the certificate expired: {n}\n{}",
            logs(&agent)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let n = node_status(&api).await?.context("node status")?;
    ensure!(
        n["connected"] == false,
        "reconnected with an expired certificate: {n}"
    );
    let hub_log = std::fs::read_to_string(tmp.path().join("hub.log"))?;
    ensure!(
        hub_log.contains("certificate expired"),
        "the hub says why it ended the session\n{hub_log}"
    );
    let agent_log = harness::strip_ansi(&agent.log_text());
    ensure!(
        agent_log.contains("our SVID has expired and was not rotated"),
        "the agent says its SVID expired\n{agent_log}"
    );
    // Its reconnects are refused by the hub, and it says so in terms it can act on.
    ensure!(
        agent_log.contains("the hub refused our certificate: it has expired"),
        "the agent explains the hub's refusal\n{agent_log}"
    );
    // Renewed at last (a gateway back from a long outage): the same agent process comes back
    // with it and values flow again.
    let seq = node_status(&api)
        .await?
        .and_then(|n| n["uplink_seq"].as_u64())
        .unwrap_or(0);
    pki.ca
        .mint(
            &format!("spiffe://{TD}/edge/{NODE}"),
            Duration::from_secs(3600),
        )?
        .write(dir, "agent")?;
    flowing_past(&api, seq, Duration::from_secs(15))
        .await
        .with_context(|| format!("back after the renewal\n{}", logs(&agent)))?;
    drop(agent);
    drop(hub);
    Ok(())
}

/// Accepts any server certificate (the test's hostile agent does not care who the hub is).
#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Runs a TLS handshake in memory; the first error either side reports.
fn handshake(client: rustls::ClientConfig, server: rustls::ServerConfig) -> Result<(), String> {
    let name =
        rustls::pki_types::ServerName::try_from("edgesync-hub").map_err(|e| e.to_string())?;
    let mut c = rustls::ClientConnection::new(Arc::new(client), name).map_err(|e| e.to_string())?;
    let mut s = rustls::ServerConnection::new(Arc::new(server)).map_err(|e| e.to_string())?;
    for _ in 0..16 {
        let mut buf = vec![];
        c.write_tls(&mut buf).map_err(|e| e.to_string())?;
        if !buf.is_empty() {
            s.read_tls(&mut &buf[..]).map_err(|e| e.to_string())?;
            s.process_new_packets().map_err(|e| format!("hub: {e}"))?;
        }
        buf.clear();
        s.write_tls(&mut buf).map_err(|e| e.to_string())?;
        if !buf.is_empty() {
            c.read_tls(&mut &buf[..]).map_err(|e| e.to_string())?;
            c.process_new_packets().map_err(|e| format!("agent: {e}"))?;
        }
        if !c.is_handshaking() && !s.is_handshaking() && buf.is_empty() {
            return Ok(());
        }
    }
    Err("the handshake did not finish".into())
}

/// Trust is scoped per trust domain: a peer is verified against the bundle of the domain its
/// SPIFFE ID claims and no other, and only configured domains and paths are accepted.
#[test]
fn peers_are_verified_against_their_own_trust_domain_bundle_only() -> anyhow::Result<()> {
    use edgesync_cloud::devca::DevCa;
    use edgesync_protocol::spiffe_id::{parse_id, trust_domain};
    use edgesync_protocol::tls::{
        SvidStore, TrustBundle, TrustBundles, client_config, server_config,
    };
    const FED: &str = "plant2.example";
    let ours = DevCa::new(TD)?;
    let fed = DevCa::new(FED)?;
    let forger = DevCa::new(TD)?; // another CA claiming our trust domain
    let evil = DevCa::new("evil.example")?;
    let hour = Duration::from_secs(3600);
    let hub_id = parse_id(&format!("spiffe://{TD}/hub"))?;
    let td = trust_domain(TD)?;
    let fed_td = trust_domain(FED)?;
    let bundle = |ca: &DevCa| TrustBundle::from_pem(ca.bundle_pem().as_bytes());
    let identity = |s: &Svid| Identity::from_pem(s.cert_pem.as_bytes(), s.key_pem.as_bytes());
    // The hub trusts our domain and the federated one, and accepts nodes of both.
    let mut hub_bundles = TrustBundles::single(&td, bundle(&ours)?);
    hub_bundles.insert(&fed_td, bundle(&fed)?);
    let hub_svid = ours.mint(hub_id.to_string().as_str(), hour)?;
    let hub_store = SvidStore::with_bundles(identity(&hub_svid)?, hub_bundles)?;
    let nodes = NodeIds::new(td.clone()).with_domain(fed_td.clone());
    let hub = || server_config(hub_store.clone(), nodes.clone()).map_err(anyhow::Error::from);
    // An agent whose own bundles hold its domain and the federated one (so that its own side
    // accepts the hub whatever the case).
    let agent = |svid: &Svid, own: &DevCa| -> anyhow::Result<rustls::ClientConfig> {
        let mut b = TrustBundles::single(&trust_domain(own.trust_domain())?, bundle(own)?);
        b.insert(&td, bundle(&ours)?);
        Ok(client_config(
            SvidStore::with_bundles(identity(svid)?, b)?,
            hub_id.clone(),
        )?)
    };

    // Accepted: our node, and a node of the federated domain issued by its own CA.
    handshake(
        agent(&ours.mint(&format!("spiffe://{TD}/edge/n1"), hour)?, &ours)?,
        hub()?,
    )
    .map_err(|e| anyhow::anyhow!("our node: {e}"))?;
    handshake(
        agent(&fed.mint(&format!("spiffe://{FED}/edge/n2"), hour)?, &fed)?,
        hub()?,
    )
    .map_err(|e| anyhow::anyhow!("federated node: {e}"))?;

    let refused = |what: &str, svid: Svid, ca: &DevCa, needles: &[&str]| -> anyhow::Result<()> {
        let e = handshake(agent(&svid, ca)?, hub()?)
            .err()
            .with_context(|| format!("the hub accepted {what}"))?;
        ensure!(
            e.starts_with("hub:") && needles.iter().any(|n| e.contains(n)),
            "{what}: {e}"
        );
        Ok(())
    };
    // A federated CA issuing an identity in OUR domain: verified against our bundle only.
    refused(
        "a federated CA's leaf for our domain",
        fed.mint(&format!("spiffe://{TD}/edge/victim"), hour)?,
        &fed,
        &["UnknownIssuer"],
    )?;
    // Another CA claiming our trust domain (a forged leaf).
    refused(
        "a forged leaf of our domain",
        forger.mint(&format!("spiffe://{TD}/edge/victim"), hour)?,
        &forger,
        // Same issuer name as our CA: found by name, refused by its signature.
        &["UnknownIssuer", "BadSignature"],
    )?;
    // A trust domain that is neither ours nor federated.
    refused(
        "a foreign trust domain",
        evil.mint("spiffe://evil.example/edge/n3", hour)?,
        &evil,
        &["trust domain evil.example is not trusted"],
    )?;
    // Not an edge path.
    refused(
        "a non-edge path",
        ours.mint(&format!("spiffe://{TD}/workload/db"), hour)?,
        &ours,
        &["NotEdge"],
    )?;
    // An expired SVID.
    let now = SystemTime::now();
    refused(
        "an expired SVID",
        ours.mint_with_validity(
            &format!("spiffe://{TD}/edge/n1"),
            now - Duration::from_secs(7200),
            now - Duration::from_secs(60),
        )?,
        &ours,
        &["Expired"],
    )?;
    // Without the federation configured, the federated node is refused.
    let plain = server_config(
        SvidStore::new(identity(&hub_svid)?, bundle(&ours)?)?,
        NodeIds::new(td.clone()),
    )?;
    let e = handshake(
        agent(&fed.mint(&format!("spiffe://{FED}/edge/n2"), hour)?, &fed)?,
        plain,
    )
    .err()
    .context("a hub without the federation accepted its node")?;
    ensure!(
        e.contains("trust domain plant2.example is not trusted"),
        "{e}"
    );

    // The agent side: a hub in the federated domain is verified against that domain's
    // bundle; a hub id in our domain issued by the federated CA is refused.
    let fed_hub_id = parse_id(&format!("spiffe://{FED}/hub"))?;
    let agent_svid = ours.mint(&format!("spiffe://{TD}/edge/n1"), hour)?;
    let mut agent_bundles = TrustBundles::single(&td, bundle(&ours)?);
    agent_bundles.insert(&fed_td, bundle(&fed)?);
    let agent_store = SvidStore::with_bundles(identity(&agent_svid)?, agent_bundles)?;
    let fed_hub_store = SvidStore::with_bundles(
        identity(&fed.mint(fed_hub_id.to_string().as_str(), hour)?)?,
        TrustBundles::single(&td, bundle(&ours)?),
    )?;
    handshake(
        client_config(agent_store.clone(), fed_hub_id.clone())?,
        server_config(fed_hub_store, NodeIds::new(td.clone()))?,
    )
    .map_err(|e| anyhow::anyhow!("federated hub: {e}"))?;
    let impostor = SvidStore::with_bundles(
        identity(&fed.mint(hub_id.to_string().as_str(), hour)?)?,
        TrustBundles::single(&td, bundle(&ours)?),
    )?;
    let e = handshake(
        client_config(agent_store.clone(), hub_id.clone())?,
        server_config(impostor, NodeIds::new(td.clone()))?,
    )
    .err()
    .context("the agent accepted our hub id issued by the federated CA")?;
    ensure!(
        e.starts_with("agent:") && e.contains("UnknownIssuer"),
        "{e}"
    );

    // A withdrawn identity is neither presented nor used to verify.
    agent_store.withdraw();
    let e = handshake(client_config(agent_store.clone(), hub_id.clone())?, hub()?)
        .err()
        .context("a withdrawn identity still completed a handshake")?;
    ensure!(e.contains("withdrawn") || e.contains("hub:"), "{e}");
    Ok(())
}

#[test]
fn leaves_that_break_the_x509_svid_key_usage_rules_are_refused_by_both_ends() -> anyhow::Result<()>
{
    use edgesync_protocol::tls::{SvidStore, TrustBundle, client_config, server_config};
    use rcgen::KeyUsagePurpose as Ku;
    let tmp = TempDir::new("svid-ku")?;
    let pki = Pki::new(&tmp.path().join("pki"), TD)?;
    let provider = edgesync_protocol::tls::provider();
    let td = edgesync_protocol::spiffe_id::trust_domain(TD)?;
    let hub_id = edgesync_protocol::spiffe_id::parse_id(&format!("spiffe://{TD}/hub"))?;
    let bundle = || TrustBundle::from_pem(pki.ca.bundle_pem().as_bytes());
    let store = |s: &Svid| -> anyhow::Result<Arc<SvidStore>> {
        Ok(SvidStore::new(
            Identity::from_pem(s.cert_pem.as_bytes(), s.key_pem.as_bytes())?,
            bundle()?,
        )?)
    };
    let now = SystemTime::now();
    let (from, until) = (
        now - Duration::from_secs(60),
        now + Duration::from_secs(3600),
    );
    let good_hub = pki
        .ca
        .mint(hub_id.to_string().as_str(), Duration::from_secs(3600))?;
    let good_agent = pki.ca.mint(
        &format!("spiffe://{TD}/edge/{NODE}"),
        Duration::from_secs(3600),
    )?;
    let hub_cfg =
        || server_config(store(&good_hub)?, NodeIds::new(td.clone())).map_err(anyhow::Error::from);
    // Both ends well-formed: the handshake completes.
    handshake(
        client_config(store(&good_agent)?, hub_id.clone())?,
        hub_cfg()?,
    )
    .map_err(|e| anyhow::anyhow!("good SVIDs: {e}"))?;

    for (what, usages) in [
        ("no digitalSignature", vec![Ku::KeyEncipherment]),
        ("keyCertSign", vec![Ku::DigitalSignature, Ku::KeyCertSign]),
        ("cRLSign", vec![Ku::DigitalSignature, Ku::CrlSign]),
        ("no key usage extension", vec![]),
    ] {
        // An agent presenting such a leaf (its own checks bypassed): the hub refuses it.
        let bad = pki.ca.mint_with_key_usages(
            &format!("spiffe://{TD}/edge/{NODE}"),
            from,
            until,
            usages.clone(),
        )?;
        let agent = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyServer(provider.clone())))
            .with_client_auth_cert(bad.chain_der.clone(), bad.private_key_der())?;
        let mut agent = agent;
        agent.alpn_protocols = vec![edgesync_protocol::tls::ALPN.to_vec()];
        let e = handshake(agent, hub_cfg()?)
            .err()
            .with_context(|| format!("the hub accepted an agent leaf with {what}"))?;
        ensure!(
            e.starts_with("hub:") && e.contains("not an X.509-SVID leaf"),
            "{what}: {e}"
        );
        // A hub presenting such a leaf: the agent refuses it.
        let bad_hub = pki
            .ca
            .mint_with_key_usages(&hub_id.to_string(), from, until, usages)?;
        let mut hub = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_no_client_auth()
            .with_single_cert(bad_hub.chain_der.clone(), bad_hub.private_key_der())?;
        hub.alpn_protocols = vec![edgesync_protocol::tls::ALPN.to_vec()];
        let e = handshake(client_config(store(&good_agent)?, hub_id.clone())?, hub)
            .err()
            .with_context(|| format!("the agent accepted a hub leaf with {what}"))?;
        ensure!(
            e.starts_with("agent:") && e.contains("not an X.509-SVID leaf"),
            "{what}: {e}"
        );
        // Our own SVID files with such a leaf are refused at load.
        ensure!(
            Identity::from_pem(bad.cert_pem.as_bytes(), bad.key_pem.as_bytes()).is_err(),
            "{what}: loaded as our own SVID"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_ca_files_let_a_hub_and_an_agent_connect_and_are_never_overwritten()
-> anyhow::Result<()> {
    let hub_bin = harness::bin("edgesync-hub")?;
    let tmp = TempDir::new("dev-ca")?;
    let pki_dir = tmp.path().join("pki");
    let run = |args: &[&str]| {
        std::process::Command::new(&hub_bin)
            .arg("dev-ca")
            .args(args)
            .output()
    };
    let dir_arg = pki_dir.display().to_string();
    let out = run(&["--dir", &dir_arg, "--trust-domain", TD, "--node", NODE])?;
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    ensure!(out.status.success(), "dev-ca failed: {stderr}");
    ensure!(
        stderr.contains("NOT FOR PRODUCTION"),
        "the warning: {stderr}"
    );
    let listed = String::from_utf8_lossy(&out.stdout).to_string();
    for f in [
        "bundle.pem",
        "hub.pem",
        "hub.key.pem",
        "gw-1.pem",
        "gw-1.key.pem",
    ] {
        ensure!(pki_dir.join(f).is_file(), "{f} written");
        ensure!(listed.contains(f), "{f} listed: {listed}");
    }
    // Never overwritten, and bad input named.
    let before = std::fs::read(pki_dir.join("hub.key.pem"))?;
    for (args, want) in [
        (vec!["--node", "gw-9"], "bundle.pem: exists already"),
        (vec!["--node", "bad/id"], "node \"bad/id\""),
        (vec!["--node", "gw-2", "--node", "gw-2"], "given twice"),
        (vec!["--node", "hub"], "taken"),
    ] {
        let mut a = vec!["--dir", dir_arg.as_str()];
        a.extend(args);
        let out = run(&a)?;
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        ensure!(!out.status.success() && err.contains(want), "{a:?}: {err}");
    }
    ensure!(
        std::fs::read(pki_dir.join("hub.key.pem"))? == before,
        "hub key untouched"
    );

    // A hub and an agent on those files connect.
    let cfg = harness::hub_toml(
        tmp.path(),
        "127.0.0.1:0",
        "127.0.0.1:0",
        TD,
        &pki_dir.join("hub.pem"),
        &pki_dir.join("hub.key.pem"),
        &pki_dir.join("bundle.pem"),
        None,
    )?;
    let hub = Proc::spawn_env(
        &hub_bin,
        &["run", "--config", &cfg.display().to_string()],
        &tmp.path().join("hub.log"),
        Some("edgesync-hub listening"),
        &[],
    )
    .await?;
    let (tunnel, http) = harness::hub_addrs(hub.ready_line.as_deref().unwrap_or_default())?;
    let api = Api::new(&http);
    let sim = edgesync_testkit::sim::SimHandle::start(
        "127.0.0.1:0".parse()?,
        edgesync_testkit::sim::SimConfig::with_units([1]),
    )
    .await?;
    let dir = tmp.path().join(NODE);
    std::fs::create_dir_all(&dir)?;
    std::fs::copy(pki_dir.join("gw-1.pem"), dir.join("agent.pem"))?;
    std::fs::copy(pki_dir.join("gw-1.key.pem"), dir.join("agent.key.pem"))?;
    let agent = start_agent(
        &dir,
        &pki_dir.join("bundle.pem"),
        &tunnel,
        &sim.local_addr().to_string(),
    )
    .await?;
    flowing_past(&api, 0, Duration::from_secs(30))
        .await
        .with_context(|| agent.log_text())?;
    drop(agent);
    drop(hub);
    Ok(())
}

/// Rewrites the `[identity]` file keys of a generated config to read the Workload API at
/// `endpoint` instead.
fn use_workload_api(
    config: &std::path::Path,
    cert: &std::path::Path,
    key: &std::path::Path,
    bundle: &std::path::Path,
    endpoint: &str,
) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(config)?;
    let files = format!(
        "cert = {:?}\nkey = {:?}\nbundle = {:?}",
        cert.display().to_string(),
        key.display().to_string(),
        bundle.display().to_string()
    );
    ensure!(text.contains(&files), "no identity files in {text}");
    let api = format!(
        "source = \"workload_api\"\nworkload_api_socket = {endpoint:?}\nworkload_api_timeout_ms = 10000"
    );
    std::fs::write(config, text.replace(&files, &api))?;
    Ok(())
}

/// Both ends take their SVIDs from a SPIFFE Workload API (the testkit's, speaking the real
/// gRPC protocol to the binaries' real `X509Source` client). For two minutes, every 3 s, one
/// of: the node SVID is reissued, the hub SVID is reissued, a new CA joins both bundles, both
/// SVIDs are reissued by the new CA, the old CA leaves the bundles. SVIDs live 20 s, so a
/// rotation that is not followed ends the session. Records flow all along: none is lost or
/// stored twice, and the agent never falls back to a reconnect (make-before-break).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn svids_and_cas_rotating_through_the_workload_api_lose_and_duplicate_nothing()
-> anyhow::Result<()> {
    use edgesync_cloud::devca::DevCa;
    use edgesync_testkit::workload_api::{WorkloadApi, X509Update};
    const RUN: Duration = Duration::from_secs(120);
    const STEP: Duration = Duration::from_secs(3);
    let setup = Setup::new("svid-wapi").await?;
    let tmp = &setup.tmp;
    let hub_id = format!("spiffe://{TD}/hub");
    let node_id = format!("spiffe://{TD}/edge/{NODE}");
    let life = Duration::from_secs(20);
    let hub_api = WorkloadApi::start(&tmp.path().join("h.sock")).await?;
    let agent_api = WorkloadApi::start(&tmp.path().join("a.sock")).await?;
    let mut cas: Vec<DevCa> = vec![DevCa::new(TD)?];
    let mut hub_svid = cas[0].mint(&hub_id, life)?;
    let mut node_svid = cas[0].mint(&node_id, life)?;
    let push = |cas: &[DevCa], hub_svid: &Svid, node_svid: &Svid| {
        let refs: Vec<&DevCa> = cas.iter().collect();
        hub_api.set(X509Update::single(hub_svid, &refs));
        agent_api.set(X509Update::single(node_svid, &refs));
    };
    push(&cas, &hub_svid, &node_svid);

    // Configs as generated for files, then switched to the Workload API.
    let unused = tmp.path().join("unused.pem");
    let hub_cfg = harness::hub_toml(
        tmp.path(),
        "127.0.0.1:0",
        "127.0.0.1:0",
        TD,
        &unused,
        &unused,
        &unused,
        None,
    )?;
    use_workload_api(&hub_cfg, &unused, &unused, &unused, &hub_api.endpoint())?;
    let hub = Proc::spawn_env(
        &harness::bin("edgesync-hub")?,
        &["run", "--config", &hub_cfg.display().to_string()],
        &tmp.path().join("hub.log"),
        Some("edgesync-hub listening"),
        &[],
    )
    .await?;
    let (tunnel, http) = harness::hub_addrs(hub.ready_line.as_deref().unwrap_or_default())?;
    let api = Api::new(&http);
    let agent = setup.agent_via_api(&tunnel, &agent_api.endpoint()).await?;
    let logs = |agent: &Proc| setup.logs(agent);
    let mut seq = flowing_past(&api, 0, Duration::from_secs(30))
        .await
        .with_context(|| logs(&agent))?;

    let started = Instant::now();
    let mut step = 0u32;
    let mut node_rotations = 0u32;
    while started.elapsed() < RUN {
        tokio::time::sleep(STEP).await;
        let what = match step % 5 {
            0 => {
                node_svid = cas[cas.len() - 1].mint(&node_id, life)?;
                node_rotations += 1;
                "node SVID reissued"
            }
            1 => {
                hub_svid = cas[cas.len() - 1].mint(&hub_id, life)?;
                "hub SVID reissued"
            }
            2 => {
                cas.push(DevCa::new(TD)?);
                "a new CA joins the bundles"
            }
            3 => {
                let ca = &cas[cas.len() - 1];
                hub_svid = ca.mint(&hub_id, life)?;
                node_svid = ca.mint(&node_id, life)?;
                node_rotations += 1;
                "both SVIDs reissued by the new CA"
            }
            _ => {
                cas.remove(0);
                "the old CA leaves the bundles"
            }
        };
        push(&cas, &hub_svid, &node_svid);
        step += 1;
        seq = flowing_past(&api, seq, Duration::from_secs(10))
            .await
            .with_context(|| format!("values flow after step {step} ({what})\n{}", logs(&agent)))?;
    }
    // The hub shows the expiry of the node's latest SVID.
    let want = not_after(&node_svid)? * 1000;
    api.wait_for(Duration::from_secs(10), move |api| async move {
        Ok(node_status(&api)
            .await?
            .filter(|n| n["connected"] == true && n["svid_expires_ms"].as_u64() == Some(want)))
    })
    .await
    .with_context(|| format!("the hub shows the latest node SVID\n{}", logs(&agent)))?;

    for s in &setup.scripts {
        setup.sim.remove_script(*s);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let last = flowing_past(&api, seq, Duration::from_secs(10))
        .await
        .unwrap_or(seq);
    let agent_log = agent.log_text();
    ensure!(agent.terminate().await?, "agent exits 0\n{agent_log}");
    let hub_log = std::fs::read_to_string(tmp.path().join("hub.log"))?;
    ensure!(hub.terminate().await?, "hub exits 0\n{hub_log}");
    hub_api.stop().await;
    agent_api.stop().await;
    // Every node rotation replaced the connection without a disconnect in between.
    let switched = agent_log
        .matches("the session continues on a connection that presents it")
        .count();
    ensure!(
        switched as u32 >= node_rotations,
        "{switched} switches for {node_rotations} node rotations\n{agent_log}"
    );
    ensure!(
        !agent_log.contains("uplink down"),
        "the agent lost its connection at some point\n{agent_log}"
    );
    hub_stored_all(tmp.path(), last, false, &format!("{agent_log}\n{hub_log}"))
}

/// A withdrawn identity (its registration entry removed) stops the agent from connecting;
/// a new SVID brings it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_svid_withdrawn_by_the_workload_api_disconnects_the_agent_until_reissued()
-> anyhow::Result<()> {
    use edgesync_testkit::workload_api::{WorkloadApi, X509Update};
    let setup = Setup::new("svid-withdraw").await?;
    let (tmp, pki) = (&setup.tmp, &setup.pki);
    let (hub, api, tunnel) = start_hub(
        tmp.path(),
        pki,
        &pki.ca
            .mint(&format!("spiffe://{TD}/hub"), Duration::from_secs(3600))?,
    )
    .await?;
    let node_id = format!("spiffe://{TD}/edge/{NODE}");
    let wapi = WorkloadApi::start(&tmp.path().join("a.sock")).await?;
    wapi.set(X509Update::single(
        &pki.ca.mint(&node_id, Duration::from_secs(3600))?,
        &[&pki.ca],
    ));
    let agent = setup.agent_via_api(&tunnel, &wapi.endpoint()).await?;
    let logs = |agent: &Proc| setup.logs(agent);
    let seq = flowing_past(&api, 0, Duration::from_secs(30))
        .await
        .with_context(|| logs(&agent))?;

    wapi.withdraw();
    api.wait_for(Duration::from_secs(10), |api| async move {
        Ok(node_status(&api).await?.filter(|n| n["connected"] == false))
    })
    .await
    .with_context(|| format!("the agent disconnects\n{}", logs(&agent)))?;
    // It stays away while withdrawn.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let n = node_status(&api).await?.context("status")?;
    ensure!(
        n["connected"] == false,
        "reconnected while withdrawn: {n}\n{}",
        logs(&agent)
    );
    ensure!(agent.log_text().contains("withdrawn"), "{}", logs(&agent));

    wapi.set(X509Update::single(
        &pki.ca.mint(&node_id, Duration::from_secs(3600))?,
        &[&pki.ca],
    ));
    flowing_past(&api, seq, Duration::from_secs(15))
        .await
        .with_context(|| format!("the agent is back after reissue\n{}", logs(&agent)))?;
    ensure!(agent.terminate().await?, "agent exits 0");
    ensure!(hub.terminate().await?, "hub exits 0");
    wapi.stop().await;
    Ok(())
}

/// A Workload API that sends what must not be used: another node's SVID, a key that does not
/// belong to the chain, a chain that is not a certificate. None of it is installed (the
/// previous SVID stays in use) and a good rotation afterwards is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_or_hostile_workload_api_update_is_not_installed() -> anyhow::Result<()> {
    use edgesync_protocol::workload_api::ApiWatcher;
    use edgesync_testkit::workload_api::{SvidEntry, WorkloadApi, X509Update};
    let tmp = TempDir::new("svid-wapi-bad")?;
    let pki = Pki::new(&tmp.path().join("pki"), TD)?;
    let node_id = format!("spiffe://{TD}/edge/{NODE}");
    let hour = Duration::from_secs(3600);
    let api = WorkloadApi::start(&tmp.path().join("w.sock")).await?;
    let first = pki.ca.mint(&node_id, hour)?;
    api.set(X509Update::single(&first, &[&pki.ca]));
    let want = node_id.clone();
    let accept: Accept = Arc::new(move |i: &Identity| {
        if i.id.to_string() == want {
            Ok(())
        } else {
            Err(format!("{} is not {want}", i.id))
        }
    });
    let (store, watcher) = ApiWatcher::start(
        Some(api.endpoint()),
        Vec::new(),
        accept,
        Duration::from_secs(10),
    )
    .await?;
    let mut rotated = watcher.subscribe();
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(watcher.run(stop.clone().cancelled_owned()));
    let kept = not_after(&first)?;

    let other_key = pki.ca.mint(&node_id, hour)?;
    let mut mismatched = SvidEntry::new(&pki.ca.mint(&node_id, hour)?, &[&pki.ca]);
    mismatched.key_pkcs8_der = other_key.private_key_der().secret_der().to_vec();
    let mut garbage = SvidEntry::new(&pki.ca.mint(&node_id, hour)?, &[&pki.ca]);
    garbage.chain_der = vec![b"not a certificate".to_vec()];
    let bad = [
        (
            "another node's SVID",
            X509Update::single(
                &pki.ca.mint(&format!("spiffe://{TD}/edge/other"), hour)?,
                &[&pki.ca],
            ),
        ),
        (
            "a key of another chain",
            X509Update {
                svids: vec![mismatched],
                federated: vec![],
            },
        ),
        (
            "a chain that is no certificate",
            X509Update {
                svids: vec![garbage],
                federated: vec![],
            },
        ),
    ];
    for (what, update) in bad {
        api.set(update);
        tokio::time::sleep(Duration::from_millis(700)).await;
        ensure!(
            store.id().to_string() == node_id
                && store.validity().1 == kept
                && !store.is_withdrawn(),
            "{what} was installed"
        );
    }
    ensure!(
        *rotated.borrow_and_update() == 0,
        "no rotation was announced"
    );
    // A good rotation is installed and announced.
    let second = pki.ca.mint(&node_id, Duration::from_secs(7200))?;
    api.set(X509Update::single(&second, &[&pki.ca]));
    tokio::time::timeout(Duration::from_secs(10), rotated.changed()).await??;
    ensure!(store.validity().1 == not_after(&second)?);
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    api.stop().await;
    Ok(())
}
