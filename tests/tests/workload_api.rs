//! The fake SPIFFE Workload API (`edgesync_testkit::workload_api`) driven by the `spiffe`
//! crate's real `X509Source`, and by a raw tonic client for what `X509Source` never sends.

use std::future::Future;
use std::time::Duration;

use anyhow::{Context, bail};
use edgesync_testkit::harness::TempDir;
use edgesync_testkit::pki::{Svid, TestCa};
use edgesync_testkit::workload_api::{
    FETCH_X509_BUNDLES_PATH, FETCH_X509_SVID_PATH, NO_IDENTITY_ISSUED, SECURITY_HEADER,
    SECURITY_HEADER_MISSING, WorkloadApi, X509Update, pb,
};
use spiffe::{TrustDomain, WorkloadApiError, X509Source, X509SourceError};
use tonic::Code;
use tonic_prost::ProstCodec;

const TD: &str = "example.org";
const HOUR: Duration = Duration::from_secs(3600);
/// Bound of every wait in these tests.
const WAIT: Duration = Duration::from_secs(15);

/// `fut`, failing after [`WAIT`].
async fn bounded<T>(what: &str, fut: impl Future<Output = T>) -> anyhow::Result<T> {
    tokio::time::timeout(WAIT, fut)
        .await
        .with_context(|| format!("timed out: {what}"))
}

/// A started fake Workload API in its own temporary directory.
async fn api() -> anyhow::Result<(TempDir, WorkloadApi)> {
    let dir = TempDir::new("wlapi")?;
    let api = WorkloadApi::start(&dir.path().join("api.sock")).await?;
    Ok((dir, api))
}

/// An `X509Source` on `api` that reconnects quickly.
async fn source(api: &WorkloadApi) -> anyhow::Result<X509Source> {
    let source = X509Source::builder()
        .endpoint(api.endpoint())
        .reconnect_backoff(Duration::from_millis(50), Duration::from_millis(500))
        .build();
    Ok(bounded("X509Source initial sync", source).await??)
}

fn leaf(svid: &Svid) -> &[u8] {
    svid.chain_der[0].as_ref()
}

/// The authorities of `td` in `source`'s bundle set, DER.
fn authorities(source: &X509Source, td: &str) -> anyhow::Result<Vec<Vec<u8>>> {
    let set = source.bundle_set()?;
    let bundle = set
        .get(&TrustDomain::new(td)?)
        .with_context(|| format!("no bundle for {td}"))?;
    Ok(bundle
        .authorities()
        .iter()
        .map(|c| c.as_bytes().to_vec())
        .collect())
}

/// Polls `cond` every 20 ms until it holds, for at most [`WAIT`].
async fn until(what: &str, mut cond: impl FnMut() -> bool) -> anyhow::Result<()> {
    bounded(what, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

#[tokio::test]
async fn initial_sync_yields_the_svid_and_its_bundle() -> anyhow::Result<()> {
    let (_dir, api) = api().await?;
    assert!(api.endpoint().starts_with("unix:///"), "{}", api.endpoint());
    let ca = TestCa::new(TD)?;
    let fed = TestCa::new("example.com")?;
    let svid = ca.mint(&ca.id("/edge/node-1"), HOUR)?;
    api.set(X509Update::single(&svid, &[&ca]).with_federated("example.com", &[&fed]));

    let source = source(&api).await?;
    let got = source.svid()?;
    assert_eq!(got.spiffe_id().to_string(), ca.id("/edge/node-1"));
    assert_eq!(got.leaf().as_bytes(), leaf(&svid));
    assert_eq!(
        got.private_key().as_ref(),
        svid.key_pkcs8_der.as_slice(),
        "PKCS#8 key"
    );
    assert_eq!(authorities(&source, TD)?, vec![ca.bundle_der().to_vec()]);
    assert_eq!(
        authorities(&source, "example.com")?,
        vec![fed.bundle_der().to_vec()]
    );
    until("the source's stream is counted", || api.open_streams() == 1).await?;

    // The one-shot bundle RPC sees the same trust domains.
    let client = spiffe::WorkloadApiClient::connect_to(api.endpoint()).await?;
    let bundles = bounded("fetch_x509_bundles", client.fetch_x509_bundles()).await??;
    assert_eq!(bundles.len(), 2);

    source.shutdown().await;
    until("the stream closes with the source", || {
        api.open_streams() == 0
    })
    .await?;
    api.stop().await;
    Ok(())
}

#[tokio::test]
async fn svid_rotation_reaches_open_streams() -> anyhow::Result<()> {
    let (_dir, api) = api().await?;
    let ca = TestCa::new(TD)?;
    let id = ca.id("/hub");
    let first = ca.mint(&id, HOUR)?;
    api.set(X509Update::single(&first, &[&ca]));
    let source = source(&api).await?;
    assert_eq!(source.svid()?.leaf().as_bytes(), leaf(&first));

    let mut updates = source.updated();
    let rotated = ca.mint(&id, HOUR)?;
    api.set(X509Update::single(&rotated, &[&ca]));
    bounded("rotation notified", updates.changed()).await??;
    let got = source.svid()?;
    assert_eq!(got.leaf().as_bytes(), leaf(&rotated));
    assert_eq!(got.spiffe_id().to_string(), id);
    // Pushed on the open stream: no reconnect.
    assert_eq!(api.open_streams(), 1);
    api.stop().await;
    Ok(())
}

#[tokio::test]
async fn ca_rotation_with_an_overlapping_bundle() -> anyhow::Result<()> {
    let (_dir, api) = api().await?;
    let old = TestCa::new(TD)?;
    let new = TestCa::new(TD)?;
    let id = old.id("/edge/node-1");
    api.set(X509Update::single(&old.mint(&id, HOUR)?, &[&old]));
    let source = source(&api).await?;
    assert_eq!(authorities(&source, TD)?.len(), 1);

    // The new CA is announced while the SVID is still the old CA's, then signs the next SVID.
    let mut updates = source.updated();
    api.set(X509Update::single(&old.mint(&id, HOUR)?, &[&old, &new]));
    bounded("overlapping bundle notified", updates.changed()).await??;
    let both = authorities(&source, TD)?;
    assert_eq!(both.len(), 2);
    assert!(both.contains(&old.bundle_der().to_vec()));
    assert!(both.contains(&new.bundle_der().to_vec()));

    let next = new.mint(&id, HOUR)?;
    api.set(X509Update::single(&next, &[&old, &new]));
    bounded("SVID of the new CA notified", updates.changed()).await??;
    assert_eq!(source.svid()?.leaf().as_bytes(), leaf(&next));
    assert_eq!(authorities(&source, TD)?.len(), 2);

    // The old CA retires.
    api.set(X509Update::single(&next, &[&new]));
    bounded("old CA removed", updates.changed()).await??;
    assert_eq!(authorities(&source, TD)?, vec![new.bundle_der().to_vec()]);
    api.stop().await;
    Ok(())
}

#[tokio::test]
async fn withdrawal_and_reissue() -> anyhow::Result<()> {
    let (_dir, api) = api().await?;
    let ca = TestCa::new(TD)?;
    let id = ca.id("/edge/node-1");
    api.set(X509Update::single(&ca.mint(&id, HOUR)?, &[&ca]));
    let source = source(&api).await?;
    let mut updates = source.updated();

    api.withdraw();
    bounded("withdrawal notified", updates.changed()).await??;
    match source.svid() {
        Err(X509SourceError::Withdrawn(reason)) => {
            assert!(
                matches!(*reason, WorkloadApiError::NoIdentityIssued),
                "{reason:?}"
            );
        }
        other => bail!("expected a withdrawn SVID, got {other:?}"),
    }
    assert!(source.state().withdrawal().is_some());
    until("the withdrawn stream is closed", || api.open_streams() == 0).await?;

    // New clients are refused the same way.
    let client = spiffe::WorkloadApiClient::connect_to(api.endpoint()).await?;
    let refused = bounded("fetch while withdrawn", client.fetch_x509_svid()).await?;
    assert!(
        matches!(refused, Err(WorkloadApiError::NoIdentityIssued)),
        "{refused:?}"
    );

    // Reissued: the source reconnects (with backoff) and is permitted again.
    let reissued = ca.mint(&id, HOUR)?;
    api.set(X509Update::single(&reissued, &[&ca]));
    bounded("reissue notified", updates.changed()).await??;
    assert_eq!(source.svid()?.leaf().as_bytes(), leaf(&reissued));
    assert!(source.state().withdrawal().is_none());
    api.stop().await;
    Ok(())
}

/// A raw tonic client on `api`'s socket.
async fn raw_client(
    api: &WorkloadApi,
) -> anyhow::Result<tonic::client::Grpc<tonic::transport::Channel>> {
    let path = api.path().to_owned();
    let connector = tower::service_fn(move |_: http::Uri| {
        let path = path.clone();
        async move {
            let stream = tokio::net::UnixStream::connect(path).await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
        }
    });
    let endpoint = tonic::transport::Endpoint::from_static("http://localhost");
    let channel = endpoint.connect_with_connector(connector);
    let mut grpc = tonic::client::Grpc::new(bounded("raw connect", channel).await??);
    bounded("raw client ready", grpc.ready()).await??;
    Ok(grpc)
}

async fn fetch_svid_raw(
    api: &WorkloadApi,
    with_header: bool,
) -> anyhow::Result<Result<pb::X509SvidResponse, tonic::Status>> {
    let mut grpc = raw_client(api).await?;
    let mut request = tonic::Request::new(pb::X509SvidRequest {});
    if with_header {
        request.metadata_mut().insert(
            SECURITY_HEADER,
            tonic::metadata::MetadataValue::from_static("true"),
        );
    }
    let call = grpc.server_streaming(
        request,
        http::uri::PathAndQuery::from_static(FETCH_X509_SVID_PATH),
        ProstCodec::<pb::X509SvidRequest, pb::X509SvidResponse>::default(),
    );
    let mut stream = match bounded("raw FetchX509SVID", call).await? {
        Ok(response) => response.into_inner(),
        Err(status) => return Ok(Err(status)),
    };
    let first = bounded("first message", stream.message()).await?;
    Ok(first.and_then(|m| m.ok_or_else(|| tonic::Status::internal("stream ended"))))
}

#[tokio::test]
async fn requests_without_the_security_header_are_refused() -> anyhow::Result<()> {
    let (_dir, api) = api().await?;
    let ca = TestCa::new(TD)?;
    let svid = ca.mint(&ca.id("/edge/node-1"), HOUR)?;
    api.set(X509Update::single(&svid, &[&ca]));

    let refused = fetch_svid_raw(&api, false).await?;
    let status = refused
        .err()
        .context("served without the security header")?;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(status.message(), SECURITY_HEADER_MISSING);
    assert_eq!(api.open_streams(), 0);

    // The same request with the header is served.
    let served = fetch_svid_raw(&api, true).await??;
    assert_eq!(served.svids.len(), 1);
    assert_eq!(served.svids[0].spiffe_id, ca.id("/edge/node-1"));
    assert_eq!(served.svids[0].x509_svid.as_ref(), leaf(&svid));

    // FetchX509Bundles checks the header too.
    let mut grpc = raw_client(&api).await?;
    let call = grpc.server_streaming(
        tonic::Request::new(pb::X509BundlesRequest {}),
        http::uri::PathAndQuery::from_static(FETCH_X509_BUNDLES_PATH),
        ProstCodec::<pb::X509BundlesRequest, pb::X509BundlesResponse>::default(),
    );
    let status = bounded("raw FetchX509Bundles", call)
        .await?
        .err()
        .context("bundles served without the security header")?;
    assert_eq!(status.code(), Code::InvalidArgument);

    // The JWT RPCs are not implemented.
    let mut grpc = raw_client(&api).await?;
    let mut request = tonic::Request::new(pb::X509BundlesRequest {});
    request.metadata_mut().insert(
        SECURITY_HEADER,
        tonic::metadata::MetadataValue::from_static("true"),
    );
    let call = grpc.server_streaming(
        request,
        http::uri::PathAndQuery::from_static("/SpiffeWorkloadAPI/FetchJWTBundles"),
        ProstCodec::<pb::X509BundlesRequest, pb::X509BundlesResponse>::default(),
    );
    let status = bounded("raw FetchJWTBundles", call)
        .await?
        .err()
        .context("JWT bundles served")?;
    assert_eq!(status.code(), Code::Unimplemented);

    // Withdrawn: PermissionDenied with SPIRE's message.
    api.withdraw();
    let status = fetch_svid_raw(&api, true)
        .await?
        .err()
        .context("served while withdrawn")?;
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_eq!(status.message(), NO_IDENTITY_ISSUED);
    api.stop().await;
    Ok(())
}

#[tokio::test]
async fn stop_ends_open_streams_and_removes_the_socket() -> anyhow::Result<()> {
    let (_dir, api) = api().await?;
    let ca = TestCa::new(TD)?;
    api.set(X509Update::single(&ca.mint(&ca.id("/hub"), HOUR)?, &[&ca]));
    let source = source(&api).await?;
    until("the source's stream is counted", || api.open_streams() == 1).await?;
    let path = api.path().to_owned();
    bounded("stop", api.stop()).await?;
    assert!(!path.exists(), "socket file left behind");
    // The source keeps the material it had.
    assert!(source.svid().is_ok());
    Ok(())
}
