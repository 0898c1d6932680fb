//! Access to the hub API against a real `edgesync-hub` process: token files rotated with and
//! without SIGHUP (the old secret is refused at once, an unusable file keeps the previous one),
//! and HTTPS on the API listener (`[api] tls_cert`/`tls_key`) with its certificate rotated,
//! plain HTTP refused, and silent clients dropped within the head timeout.

use std::io::{Read as _, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use edgesync_testkit::harness::{self, Api, Pki, Proc, TempDir};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::AsyncReadExt;

use crate::support::TD;

const OLD: &str = "old-ops-secret-0123456789";
const NEW: &str = "new-ops-secret-0123456789";

/// Writes `content` to `path` through a temporary file and a rename, as a secret manager does.
fn write_atomically(path: &Path, content: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, content)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Starts the hub binary with `hub_extra` in `[hub]`, `api_extra` in `[api]` and the token
/// `ops` (admin) read from `dir/ops.token` next to the harness token. Returns the process and
/// its HTTP address.
async fn start_hub(
    dir: &Path,
    pki: &Pki,
    hub_extra: &str,
    api_extra: &str,
) -> anyhow::Result<(Proc, String)> {
    let (cert, key) = pki.svid(&format!("spiffe://{TD}/hub"), "hub")?;
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
    let token_file = dir.join("ops.token");
    let text = std::fs::read_to_string(&cfg)?
        .replacen("[hub]\n", &format!("[hub]\n{hub_extra}\n"), 1)
        .replacen(
            "\n[[api.tokens]]",
            &format!("\n[api]\n{api_extra}\n\n[[api.tokens]]"),
            1,
        );
    let text = format!(
        "{text}\n[[api.tokens]]\nname = \"ops\"\ntoken_file = {:?}\nrole = \"admin\"\n",
        token_file.display().to_string()
    );
    std::fs::write(&cfg, text)?;
    let hub = Proc::spawn(
        &harness::bin("edgesync-hub")?,
        &["run", "--config", &cfg.display().to_string()],
        &dir.join("hub.log"),
        Some("edgesync-hub listening"),
    )
    .await?;
    let (_, http) = harness::hub_addrs(hub.ready_line.as_deref().unwrap_or_default())?;
    Ok((hub, http))
}

/// The status of `GET /api/v1/nodes` over plain HTTP with `token`.
async fn status_with(http: &str, token: &str) -> anyhow::Result<u16> {
    let r = reqwest::Client::new()
        .get(format!("http://{http}/api/v1/nodes"))
        .bearer_auth(token)
        .timeout(Duration::from_secs(5))
        .send()
        .await?;
    Ok(r.status().as_u16())
}

/// Waits (up to `within`) until `token` gets `want`; returns how long that took.
async fn wait_status(
    http: &str,
    token: &str,
    want: u16,
    within: Duration,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    loop {
        let got = status_with(http, token).await?;
        if got == want {
            return Ok(started.elapsed());
        }
        if started.elapsed() > within {
            bail!("the token still gets {got}, not {want}, after {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The sum of the samples of `name` in a Prometheus text.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn sighup(hub: &Proc) -> anyhow::Result<()> {
    let pid = hub.pid().context("the hub has exited")?;
    let status = std::process::Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()?;
    ensure!(status.success(), "kill -HUP {pid}: {status}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_file_rotated_with_sighup_refuses_the_old_secret_at_once() -> anyhow::Result<()> {
    let tmp = TempDir::new("api-access")?;
    let pki = Pki::new(&tmp.path().join("pki"), TD)?;
    let token_file = tmp.path().join("ops.token");
    std::fs::write(&token_file, format!("{OLD}\n"))?;
    let (hub, http) = start_hub(tmp.path(), &pki, "", "").await?;
    let api = Api::new(&http);
    assert_eq!(status_with(&http, OLD).await?, 200);
    assert_eq!(status_with(&http, NEW).await?, 401);

    // An unusable file (too short): SIGHUP reports it at once, naming the token and the file,
    // and the previous secret keeps working. (The periodic check alone would wait for three
    // checks of the same content, about 2 s.)
    let hup = Instant::now();
    write_atomically(&token_file, b"short\n")?;
    sighup(&hub)?;
    let errors = loop {
        let errors = metric(
            &api.metrics().await?,
            "edgesync_hub_api_token_reload_errors_total",
        );
        if errors >= 1.0 || hup.elapsed() > Duration::from_secs(5) {
            break errors;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(errors, 1.0, "{}", hub.log_text());
    assert!(
        hup.elapsed() < Duration::from_millis(1500),
        "the error was counted {:?} after SIGHUP",
        hup.elapsed()
    );
    let log = hub.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("cannot be used") && l.contains("ops.token"))
        .with_context(|| format!("no error line about ops.token in\n{log}"))?;
    assert!(line.contains("ERROR"), "{line}");
    assert!(line.contains("\"ops\""), "{line}");
    assert!(line.contains("shorter than 16"), "{line}");
    assert_eq!(status_with(&http, OLD).await?, 200);

    // The new secret, then SIGHUP: the old one is refused, the new one accepted.
    write_atomically(&token_file, format!("{NEW}\n").as_bytes())?;
    sighup(&hub)?;
    let took = wait_status(&http, NEW, 200, Duration::from_secs(5)).await?;
    assert!(took < Duration::from_secs(2), "took {took:?}");
    assert_eq!(status_with(&http, OLD).await?, 401);
    // The harness's inline token is not affected.
    assert_eq!(status_with(&http, harness::TOKEN).await?, 200);
    let text = api.metrics().await?;
    assert_eq!(
        metric(&text, "edgesync_hub_api_token_reloads_total"),
        1.0,
        "{text}"
    );
    assert!(hub.log_text().contains("SIGHUP: reloading"));
    // Still running after the signals.
    assert!(hub.terminate().await?, "the hub did not stop cleanly");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_file_rotated_without_a_signal_is_picked_up_by_the_periodic_check()
-> anyhow::Result<()> {
    let tmp = TempDir::new("api-access")?;
    let pki = Pki::new(&tmp.path().join("pki"), TD)?;
    let token_file = tmp.path().join("ops.token");
    std::fs::write(&token_file, OLD)?;
    let (hub, http) = start_hub(tmp.path(), &pki, "", "").await?;
    assert_eq!(status_with(&http, OLD).await?, 200);
    write_atomically(&token_file, format!("  {NEW}\n").as_bytes())?;
    let took = wait_status(&http, OLD, 401, Duration::from_secs(5)).await?;
    assert!(took < Duration::from_secs(3), "took {took:?}");
    assert_eq!(status_with(&http, NEW).await?, 200);
    // The file removed: the token keeps its secret.
    std::fs::remove_file(&token_file)?;
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert_eq!(status_with(&http, NEW).await?, 200);
    let text = Api::new(&http).metrics().await?;
    assert_eq!(metric(&text, "edgesync_hub_api_token_reloads_total"), 1.0);
    assert_eq!(
        metric(&text, "edgesync_hub_api_token_reload_errors_total"),
        1.0,
        "{text}\n{}",
        hub.log_text()
    );
    Ok(())
}

// ---- HTTPS ----

/// A CA and a server certificate it signed for 127.0.0.1.
struct ServerCert {
    ca: CertificateDer<'static>,
    cert_pem: String,
    key_pem: String,
}

fn mint_server_cert() -> anyhow::Result<ServerCert> {
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate()?;
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_owned()])?.signed_by(&key, &issuer)?;
    Ok(ServerCert {
        ca: ca.der().clone(),
        cert_pem: leaf.pem(),
        key_pem: key.serialize_pem(),
    })
}

impl ServerCert {
    /// Writes the key, then the certificate (each atomically).
    fn write(&self, cert: &Path, key: &Path) -> anyhow::Result<()> {
        write_atomically(key, self.key_pem.as_bytes())?;
        write_atomically(cert, self.cert_pem.as_bytes())
    }
}

/// `GET path` over HTTPS to `addr` (an IP address), trusting only `ca` (rustls with ring);
/// the status and the body.
async fn https_get(
    addr: &str,
    ca: &CertificateDer<'static>,
    path: &str,
    token: Option<&str>,
) -> anyhow::Result<(u16, String)> {
    let (addr, ca, path) = (addr.parse::<SocketAddr>()?, ca.clone(), path.to_owned());
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    tokio::task::spawn_blocking(move || -> anyhow::Result<(u16, String)> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca)?;
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let conn = rustls::ClientConnection::new(
            Arc::new(config),
            ServerName::IpAddress(addr.ip().into()),
        )?;
        let tcp = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
        tcp.set_write_timeout(Some(Duration::from_secs(5)))?;
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        write!(
            tls,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{auth}\r\n"
        )?;
        tls.flush()?;
        let mut buf = Vec::new();
        if let Err(e) = tls.read_to_end(&mut buf) {
            // A server may close without close_notify once the response is complete.
            if buf.is_empty() || e.kind() != std::io::ErrorKind::UnexpectedEof {
                return Err(e.into());
            }
        }
        let text = String::from_utf8_lossy(&buf).into_owned();
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("not an HTTP response: {text:?}"))?;
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        Ok((status, body))
    })
    .await?
}

/// Whether the server closes `s` within `within`.
async fn closed_within(s: &mut tokio::net::TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 1024];
    tokio::time::timeout(within, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_on_the_api_listener_with_a_rotated_certificate_and_silent_clients_dropped()
-> anyhow::Result<()> {
    let tmp = TempDir::new("api-tls")?;
    let pki = Pki::new(&tmp.path().join("pki"), TD)?;
    std::fs::write(tmp.path().join("ops.token"), OLD)?;
    let (cert_path, key_path): (PathBuf, PathBuf) =
        (tmp.path().join("api.crt"), tmp.path().join("api.key"));
    let first = mint_server_cert()?;
    first.write(&cert_path, &key_path)?;
    let (hub, addr) = start_hub(
        tmp.path(),
        &pki,
        "http_head_timeout_ms = 1000",
        "tls_cert = \"api.crt\"\ntls_key = \"api.key\"",
    )
    .await?;

    // HTTPS answers, for a client that trusts the CA; the API's tokens work over it.
    let (status, body) = https_get(&addr, &first.ca, "/healthz", None).await?;
    assert_eq!((status, body.trim()), (200, "ok"));
    let (status, _) = https_get(&addr, &first.ca, "/api/v1/nodes", Some(OLD)).await?;
    assert_eq!(status, 200);
    let (status, _) = https_get(&addr, &first.ca, "/api/v1/nodes", Some(NEW)).await?;
    assert_eq!(status, 401);

    // Plain HTTP on the TLS port gets no HTTP answer.
    let plain = reqwest::Client::new()
        .get(format!("http://{addr}/healthz"))
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    assert!(plain.is_err(), "plain HTTP was answered: {plain:?}");

    // A client that opens TCP and never sends a ClientHello is dropped within the head
    // timeout (1 s), while /healthz keeps answering.
    let mut silent = tokio::net::TcpStream::connect(&addr).await?;
    let opened = Instant::now();
    for _ in 0..3 {
        let (status, _) = https_get(&addr, &first.ca, "/healthz", None).await?;
        assert_eq!(status, 200);
    }
    assert!(
        closed_within(&mut silent, Duration::from_secs(5)).await,
        "the silent client was not dropped"
    );
    let held = opened.elapsed();
    assert!(
        held >= Duration::from_millis(800) && held < Duration::from_millis(3000),
        "the silent client was dropped after {held:?}"
    );
    let (_, metrics) = https_get(&addr, &first.ca, "/metrics", None).await?;
    assert!(
        metric(
            &metrics,
            "edgesync_hub_http_connections_closed_total{reason=\"tls_handshake_timeout\"}"
        ) >= 1.0,
        "{metrics}"
    );

    // A new certificate from another CA, then SIGHUP: new connections get it.
    let second = mint_server_cert()?;
    second.write(&cert_path, &key_path)?;
    sighup(&hub)?;
    let started = Instant::now();
    loop {
        if let Ok((200, _)) = https_get(&addr, &second.ca, "/healthz", None).await {
            break;
        }
        ensure!(
            started.elapsed() < Duration::from_secs(5),
            "the new certificate is not presented\n{}",
            hub.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(https_get(&addr, &first.ca, "/healthz", None).await.is_err());

    // A key that does not match: the certificate in use stays.
    write_atomically(&key_path, first.key_pem.as_bytes())?;
    sighup(&hub)?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, metrics) = https_get(&addr, &second.ca, "/metrics", None).await?;
    assert_eq!(status, 200);
    assert_eq!(metric(&metrics, "edgesync_hub_api_tls_reloads_total"), 1.0);
    assert!(
        metric(&metrics, "edgesync_hub_api_tls_reload_errors_total") >= 1.0,
        "{metrics}"
    );
    let log = hub.log_text();
    assert!(
        log.contains("does not belong to the first certificate"),
        "{log}"
    );
    assert!(hub.terminate().await?, "the hub did not stop cleanly");
    Ok(())
}
