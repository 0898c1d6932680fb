//! rustls configurations that present and verify SPIFFE X.509-SVIDs (feature `tls`).
//!
//! Pure: callers read the PEM files and pass bytes in; rustls passes the verification time in.
//!
//! - [`Identity`]: our SVID (chain + key), checked to be a valid X.509-SVID.
//! - [`TrustBundle`]: a trust domain's CA certificates; [`TrustBundles`]: one per trusted
//!   domain (ours and federated ones). A peer is verified only against the bundle of the
//!   trust domain its SPIFFE ID claims.
//! - [`client_config`]: the agent's side; accepts exactly the configured hub id.
//! - [`server_config`]: the hub's side; requires a client SVID from the trust bundle and of the
//!   form `spiffe://<td>/edge/<node>` ([`NodeIds`]), so a foreign trust domain or a non-edge path fails the
//!   handshake. [`peer_node`] then takes the node id from the verified certificate.
//!
//! Both verifiers also apply the X.509-SVID rules for a leaf that webpki leaves out (key usage
//! `digitalSignature`, no `keyCertSign` or `cRLSign`, not a CA).
//!
//! Both sides hold their SVID and bundle in [`SvidStore`]s, which a driver can update when the
//! files rotate: new handshakes use the new material.

use std::sync::{Arc, RwLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use spiffe::{SpiffeId, TrustDomain};

use crate::ids::NodeId;
use crate::spiffe_id::{NodeIds, PeerIdError, expect_id};

/// ALPN protocol id of the tunnel.
pub const ALPN: &[u8] = b"edgesync/1";

/// What can go wrong building TLS material.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A PEM input holds no certificate.
    #[error("no certificate found in {what}")]
    NoCertificate {
        /// Which input.
        what: &'static str,
    },
    /// PEM could not be parsed.
    #[error("cannot parse {what}: {reason}")]
    Pem {
        /// Which input.
        what: &'static str,
        /// Parser message.
        reason: String,
    },
    /// The certificate and key are not a valid X.509-SVID.
    #[error("not a valid X.509-SVID: {0}")]
    Svid(String),
    /// A bundle certificate is not usable as a trust anchor.
    #[error("bundle certificate {index} is not a usable CA: {reason}")]
    Anchor {
        /// Position in the bundle.
        index: usize,
        /// Why.
        reason: String,
    },
    /// rustls refused the configuration.
    #[error("tls: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The crypto provider used everywhere: rustls with `ring`.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Our own X.509-SVID.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The SPIFFE ID in the leaf's URI SAN.
    pub id: SpiffeId,
    /// Leaf first, then intermediates.
    pub chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
    /// The leaf's validity (`notBefore`, `notAfter`), in seconds since the Unix epoch.
    validity: (u64, u64),
}

/// A certificate's validity (`notBefore`, `notAfter`) in seconds since the Unix epoch (times
/// before 1970 count as 0).
pub fn cert_validity(der: &CertificateDer<'_>) -> Result<(u64, u64), TlsError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|e| TlsError::Svid(format!("leaf certificate: {e}")))?;
    let v = cert.validity();
    let secs = |t: i64| u64::try_from(t).unwrap_or(0);
    Ok((
        secs(v.not_before.timestamp()),
        secs(v.not_after.timestamp()),
    ))
}

impl Identity {
    /// Parses and checks an SVID from PEM certificate chain and PKCS#8 key.
    pub fn from_pem(cert_pem: &[u8], key_pem: &[u8]) -> Result<Identity, TlsError> {
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
            .collect::<Result<_, _>>()
            .map_err(|e| TlsError::Pem {
                what: "certificate file",
                reason: e.to_string(),
            })?;
        if chain.is_empty() {
            return Err(TlsError::NoCertificate {
                what: "certificate file",
            });
        }
        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| TlsError::Pem {
            what: "key file",
            reason: e.to_string(),
        })?;
        Identity::from_der(chain, key)
    }

    /// Checks an SVID given as DER certificates (leaf first) and its private key.
    pub fn from_der(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Identity, TlsError> {
        if chain.is_empty() {
            return Err(TlsError::NoCertificate { what: "SVID" });
        }
        let chain_der: Vec<u8> = chain
            .iter()
            .flat_map(|c| c.as_ref().iter().copied())
            .collect();
        let svid = spiffe::X509Svid::parse_from_der(&chain_der, key.secret_der())
            .map_err(|e| TlsError::Svid(e.to_string()))?;
        let validity = cert_validity(&chain[0])?;
        let identity = Identity {
            id: svid.spiffe_id().clone(),
            chain,
            key: Arc::new(key),
            validity,
        };
        // A chain and key from different rotations (files caught mid-write) must never be
        // presented: the handshake would fail for every peer.
        match identity.certified_key(&provider())?.keys_match() {
            Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
            Err(_) => {
                return Err(TlsError::Svid(
                    "the private key does not belong to the leaf certificate".into(),
                ));
            }
        }
        Ok(identity)
    }

    /// The leaf's validity (`notBefore`, `notAfter`), in seconds since the Unix epoch.
    pub fn validity(&self) -> (u64, u64) {
        self.validity
    }

    fn certified_key(&self, provider: &CryptoProvider) -> Result<Arc<CertifiedKey>, TlsError> {
        let signing = provider
            .key_provider
            .load_private_key(self.key.clone_key())
            .map_err(TlsError::Rustls)?;
        Ok(Arc::new(CertifiedKey::new(self.chain.clone(), signing)))
    }
}

/// The trust-domain CA certificates.
#[derive(Debug, Clone)]
pub struct TrustBundle {
    anchors: Vec<rustls::pki_types::TrustAnchor<'static>>,
}

impl TrustBundle {
    /// Parses one or more PEM CA certificates.
    pub fn from_pem(bundle_pem: &[u8]) -> Result<TrustBundle, TlsError> {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(bundle_pem)
            .collect::<Result<_, _>>()
            .map_err(|e| TlsError::Pem {
                what: "bundle file",
                reason: e.to_string(),
            })?;
        if certs.is_empty() {
            return Err(TlsError::NoCertificate {
                what: "bundle file",
            });
        }
        let mut anchors = Vec::with_capacity(certs.len());
        for (index, c) in certs.iter().enumerate() {
            let a = webpki::anchor_from_trusted_cert(c)
                .map_err(|e| TlsError::Anchor {
                    index,
                    reason: format!("{e:?}"),
                })?
                .to_owned();
            anchors.push(a);
        }
        Ok(TrustBundle { anchors })
    }

    /// Builds a bundle from DER CA certificates (as the Workload API delivers them).
    pub fn from_der<'a>(
        certs: impl IntoIterator<Item = &'a [u8]>,
    ) -> Result<TrustBundle, TlsError> {
        let mut anchors = Vec::new();
        for (index, c) in certs.into_iter().enumerate() {
            let der = CertificateDer::from(c);
            let a = webpki::anchor_from_trusted_cert(&der)
                .map_err(|e| TlsError::Anchor {
                    index,
                    reason: format!("{e:?}"),
                })?
                .to_owned();
            anchors.push(a);
        }
        if anchors.is_empty() {
            return Err(TlsError::NoCertificate { what: "bundle" });
        }
        Ok(TrustBundle { anchors })
    }

    /// How many CA certificates the bundle holds.
    pub fn len(&self) -> usize {
        self.anchors.len()
    }

    /// Whether the bundle is empty (never true for a parsed bundle).
    pub fn is_empty(&self) -> bool {
        self.anchors.is_empty()
    }
}

/// One trust bundle per trust domain. A peer is verified only against the bundle of the trust
/// domain its SPIFFE ID claims, so a CA of a federated domain can never vouch for an identity
/// of ours, and a domain without a bundle here is not trusted at all.
#[derive(Debug, Clone, Default)]
pub struct TrustBundles {
    by_domain: std::collections::BTreeMap<String, Arc<TrustBundle>>,
}

impl TrustBundles {
    /// Bundles of `td` only.
    pub fn single(td: &TrustDomain, bundle: TrustBundle) -> TrustBundles {
        let mut b = TrustBundles::default();
        b.insert(td, bundle);
        b
    }

    /// Adds or replaces the bundle of `td`.
    pub fn insert(&mut self, td: &TrustDomain, bundle: TrustBundle) {
        self.by_domain
            .insert(td.as_str().to_owned(), Arc::new(bundle));
    }

    /// The bundle of `td`, if trusted.
    pub fn get(&self, td: &TrustDomain) -> Option<&TrustBundle> {
        self.by_domain.get(td.as_str()).map(|b| &**b)
    }

    /// The trusted trust domains.
    pub fn domains(&self) -> impl Iterator<Item = &str> {
        self.by_domain.keys().map(String::as_str)
    }
}

/// Our SVID and trust bundles, replaceable at run time (rotation): new handshakes use the
/// current material. A withdrawn identity (the Workload API revoked it) is neither presented
/// nor used to verify peers until new material arrives.
#[derive(Debug)]
pub struct SvidStore {
    provider: Arc<CryptoProvider>,
    inner: RwLock<Material>,
}

#[derive(Debug, Clone)]
struct Material {
    identity: Identity,
    key: Arc<CertifiedKey>,
    bundles: Arc<TrustBundles>,
    withdrawn: bool,
}

impl SvidStore {
    /// Builds a store that trusts only our own trust domain (the SVID's) with `bundle`.
    pub fn new(identity: Identity, bundle: TrustBundle) -> Result<Arc<SvidStore>, TlsError> {
        let bundles = TrustBundles::single(identity.id.trust_domain(), bundle);
        SvidStore::with_bundles(identity, bundles)
    }

    /// Builds a store from parsed material, with a bundle per trusted trust domain.
    pub fn with_bundles(
        identity: Identity,
        bundles: TrustBundles,
    ) -> Result<Arc<SvidStore>, TlsError> {
        let provider = provider();
        let key = identity.certified_key(&provider)?;
        Ok(Arc::new(SvidStore {
            provider,
            inner: RwLock::new(Material {
                identity,
                key,
                bundles: Arc::new(bundles),
                withdrawn: false,
            }),
        }))
    }

    /// Replaces the material (after a rotation); ends a withdrawal.
    pub fn update(&self, identity: Identity, bundles: TrustBundles) -> Result<(), TlsError> {
        let key = identity.certified_key(&self.provider)?;
        let mut g = self.inner.write().unwrap_or_else(|p| p.into_inner());
        *g = Material {
            identity,
            key,
            bundles: Arc::new(bundles),
            withdrawn: false,
        };
        Ok(())
    }

    /// Withdraws the identity: new handshakes fail on both sides until [`SvidStore::update`].
    pub fn withdraw(&self) {
        self.inner
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .withdrawn = true;
    }

    /// Whether the identity is withdrawn.
    pub fn is_withdrawn(&self) -> bool {
        self.inner
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .withdrawn
    }

    /// The trust domains we hold a bundle for.
    pub fn trusted_domains(&self) -> Vec<String> {
        self.material()
            .bundles
            .domains()
            .map(str::to_owned)
            .collect()
    }

    /// Our current SPIFFE ID.
    pub fn id(&self) -> SpiffeId {
        self.material().identity.id.clone()
    }

    /// Our current identity.
    pub fn identity(&self) -> Identity {
        self.material().identity
    }

    /// The validity of our current SVID's leaf (see [`Identity::validity`]).
    pub fn validity(&self) -> (u64, u64) {
        self.inner
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .identity
            .validity
    }

    fn material(&self) -> Material {
        self.inner.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl rustls::client::ResolvesClientCert for SvidStore {
    fn resolve(
        &self,
        _issuers: &[&[u8]],
        _schemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        let m = self.material();
        (!m.withdrawn).then_some(m.key)
    }
    fn has_certs(&self) -> bool {
        true
    }
}

impl rustls::server::ResolvesServerCert for SvidStore {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let m = self.material();
        (!m.withdrawn).then_some(m.key)
    }
}

fn cert_error(e: impl std::error::Error + Send + Sync + 'static) -> rustls::Error {
    rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
        Arc::new(e),
    )))
}

fn webpki_error(e: webpki::Error) -> rustls::Error {
    use rustls::CertificateError as C;
    let c = match e {
        webpki::Error::CertExpired { .. } => C::Expired,
        webpki::Error::CertNotValidYet { .. } => C::NotValidYet,
        webpki::Error::UnknownIssuer => C::UnknownIssuer,
        webpki::Error::InvalidSignatureForPublicKey => C::BadSignature,
        webpki::Error::RequiredEkuNotFoundContext(_) => C::InvalidPurpose,
        other => C::Other(rustls::OtherError(Arc::new(WebpkiError(format!(
            "{other:?}"
        ))))),
    };
    rustls::Error::InvalidCertificate(c)
}

#[derive(Debug, thiserror::Error)]
#[error("certificate rejected: {0}")]
struct WebpkiError(String);

/// The rules of the X.509-SVID specification for a leaf that webpki does not check: a key
/// usage extension with `digitalSignature` and without `keyCertSign` or `cRLSign`, and not a CA.
fn check_svid_leaf(end_entity: &CertificateDer<'_>) -> Result<(), rustls::Error> {
    let refuse = |why: String| cert_error(WebpkiError(format!("not an X.509-SVID leaf: {why}")));
    let (_, cert) = x509_parser::parse_x509_certificate(end_entity.as_ref())
        .map_err(|e| refuse(e.to_string()))?;
    match cert.key_usage() {
        Ok(Some(ku)) => {
            let k = ku.value;
            if !k.digital_signature() {
                return Err(refuse("its key usage lacks digitalSignature".into()));
            }
            if k.key_cert_sign() || k.crl_sign() {
                return Err(refuse(
                    "its key usage allows signing certificates or CRLs".into(),
                ));
            }
        }
        Ok(None) => return Err(refuse("it has no key usage extension".into())),
        Err(e) => return Err(refuse(format!("key usage: {e}"))),
    }
    match cert.basic_constraints() {
        Ok(Some(bc)) if bc.value.ca => Err(refuse("it is a CA certificate".into())),
        Ok(_) => Ok(()),
        Err(e) => Err(refuse(format!("basic constraints: {e}"))),
    }
}

/// Verifies a peer's chain against the bundle of the trust domain its SPIFFE ID claims (and
/// only that one) and returns the ID.
fn verify_chain(
    algs: &WebPkiSupportedAlgorithms,
    m: &Material,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
    usage: webpki::KeyUsage,
) -> Result<SpiffeId, rustls::Error> {
    if m.withdrawn {
        return Err(cert_error(WebpkiError(
            "our own identity is withdrawn: no peer is verified until it is reissued".into(),
        )));
    }
    let claimed = spiffe::cert::spiffe_id_from_der(end_entity.as_ref()).map_err(cert_error)?;
    let bundle = m.bundles.get(claimed.trust_domain()).ok_or_else(|| {
        cert_error(WebpkiError(format!(
            "{claimed}: trust domain {} is not trusted (no bundle for it; trusted: {})",
            claimed.trust_domain(),
            m.bundles.domains().collect::<Vec<_>>().join(", ")
        )))
    })?;
    let ee = webpki::EndEntityCert::try_from(end_entity).map_err(webpki_error)?;
    ee.verify_for_usage(
        algs.all,
        &bundle.anchors,
        intermediates,
        now,
        usage,
        None,
        None,
    )
    .map_err(webpki_error)?;
    check_svid_leaf(end_entity)?;
    Ok(claimed)
}

/// The handshake-signature half of a verifier: the same for both ends (the provider's
/// algorithms), so both verifiers expand it.
macro_rules! signature_checks {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            let algs = &self.store.provider.signature_verification_algorithms;
            rustls::crypto::verify_tls12_signature(message, cert, dss, algs)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            let algs = &self.store.provider.signature_verification_algorithms;
            rustls::crypto::verify_tls13_signature(message, cert, dss, algs)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.store
                .provider
                .signature_verification_algorithms
                .supported_schemes()
        }
    };
}

/// Agent side: verifies that the server is `expected` (and chains to the bundle).
#[derive(Debug)]
struct HubVerifier {
    store: Arc<SvidStore>,
    expected: SpiffeId,
}

impl ServerCertVerifier for HubVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let m = self.store.material();
        let id = verify_chain(
            &self.store.provider.signature_verification_algorithms,
            &m,
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
        )?;
        expect_id(&id, &self.expected).map_err(cert_error)?;
        Ok(ServerCertVerified::assertion())
    }

    signature_checks!();
}

/// Hub side: requires an accepted node SVID (see [`NodeIds`]).
#[derive(Debug)]
struct EdgeVerifier {
    store: Arc<SvidStore>,
    nodes: NodeIds,
}

impl ClientCertVerifier for EdgeVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Hints are optional; an empty list lets clients send their only SVID.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let m = self.store.material();
        let id = verify_chain(
            &self.store.provider.signature_verification_algorithms,
            &m,
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::client_auth(),
        )?;
        self.nodes.node(&id).map_err(cert_error)?;
        Ok(ClientCertVerified::assertion())
    }

    signature_checks!();
}

/// The agent's TLS 1.3 client config: presents our SVID, accepts only `hub_id`.
pub fn client_config(
    store: Arc<SvidStore>,
    hub_id: SpiffeId,
) -> Result<rustls::ClientConfig, TlsError> {
    let provider = store.provider.clone();
    let verifier = Arc::new(HubVerifier {
        store: store.clone(),
        expected: hub_id,
    });
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(store);
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    Ok(cfg)
}

/// The hub's TLS 1.3 server config: presents our SVID, requires a node SVID that `nodes`
/// accepts.
pub fn server_config(
    store: Arc<SvidStore>,
    nodes: NodeIds,
) -> Result<rustls::ServerConfig, TlsError> {
    let provider = store.provider.clone();
    let verifier = Arc::new(EdgeVerifier {
        store: store.clone(),
        nodes,
    });
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(store);
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    Ok(cfg)
}

/// The node id and trust domain of a verified peer (leaf first), re-checked against `nodes`.
pub fn peer_node(
    certs: &[CertificateDer<'_>],
    nodes: &NodeIds,
) -> Result<(NodeId, TrustDomain), PeerIdError> {
    let leaf = certs.first().ok_or_else(|| PeerIdError::NotSpiffe {
        id: String::new(),
        reason: "peer presented no certificate".into(),
    })?;
    let id =
        spiffe::cert::spiffe_id_from_der(leaf.as_ref()).map_err(|e| PeerIdError::NotSpiffe {
            id: String::new(),
            reason: e.to_string(),
        })?;
    let node = nodes.node(&id)?;
    Ok((node, id.trust_domain().clone()))
}
