//! A throwaway SPIFFE trust-domain CA and X.509-SVIDs, for trying edgesync without SPIRE
//! (`edgesync-hub dev-ca`) and for the tests. **Not for production**: keys are generated and
//! written in the clear, nothing rotates them, and nobody attests who gets an SVID.
//!
//! [`DevCa::new`] creates a self-signed root for a trust domain (ECDSA P-256, URI SAN
//! `spiffe://<trust-domain>`, basic constraints CA, key usage cert-sign). [`DevCa::mint`]
//! issues leaf X.509-SVIDs as the SPIFFE X.509-SVID specification describes them: exactly one
//! URI SAN (the SPIFFE ID), key usage digitalSignature, extended key usage serverAuth and
//! clientAuth, basic constraints not a CA. [`DevCa::intermediate`] adds a signing CA below
//! the root, whose SVIDs carry it as a chain certificate.
//!
//! [`Svid::write`] and [`DevCa::write_bundle`] lay the material out as spiffe-helper does:
//! `<name>.pem` (leaf then intermediates), `<name>.key.pem` (PKCS#8) and `bundle.pem`.

use std::{
    fs,
    io::Write,
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, bail, ensure};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType, string::Ia5String,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// How far back from "now" [`DevCa::mint`] starts validity, to tolerate clock skew.
const BACKDATE: Duration = Duration::from_secs(60);

/// Validity of CA certificates created by [`DevCa::new`] and [`DevCa::intermediate`].
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Latest time an X.509 certificate can express: 9999-12-31T23:59:59Z.
const MAX_X509_UNIX_SECS: u64 = 253_402_300_799;

/// A CA of a SPIFFE trust domain that signs X.509-SVIDs. Root or intermediate.
pub struct DevCa {
    trust_domain: String,
    issuer: Issuer<'static, KeyPair>,
    /// This CA's own certificate.
    cert_der: CertificateDer<'static>,
    /// This CA's own certificate, PEM.
    cert_pem: String,
    /// Certificates between a leaf signed by this CA and the root, nearest first (empty for
    /// a root).
    chain: Vec<(CertificateDer<'static>, String)>,
    /// The root of the trust domain, PEM.
    root_pem: String,
    /// The root of the trust domain, DER.
    root_der: CertificateDer<'static>,
}

impl std::fmt::Debug for DevCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevCa")
            .field("trust_domain", &self.trust_domain)
            .field("intermediates", &self.chain.len())
            .finish_non_exhaustive()
    }
}

/// A leaf X.509-SVID and its private key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Svid {
    /// The SPIFFE ID in the URI SAN.
    pub spiffe_id: String,
    /// The leaf certificate followed by any intermediate CA certificates, PEM.
    pub cert_pem: String,
    /// The leaf's private key, PKCS#8 PEM.
    pub key_pem: String,
    /// The leaf certificate followed by any intermediate CA certificates, DER.
    pub chain_der: Vec<CertificateDer<'static>>,
    /// The leaf's private key, PKCS#8 DER.
    pub key_pkcs8_der: Vec<u8>,
}

impl Svid {
    /// The leaf certificate, DER.
    #[must_use]
    pub fn leaf_der(&self) -> Option<&CertificateDer<'static>> {
        self.chain_der.first()
    }

    /// The private key in the form rustls takes.
    #[must_use]
    pub fn private_key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_pkcs8_der.clone()))
    }

    /// Write `<dir>/<name>.pem` (leaf then intermediates) and `<dir>/<name>.key.pem`
    /// (PKCS#8, mode 0600 on Unix) and return their paths, certificate first.
    ///
    /// Each file is written to a temporary name and renamed into place, so a watcher never
    /// reads a half-written file; the key is replaced before the certificate.
    ///
    /// # Errors
    /// The files cannot be written.
    pub fn write(&self, dir: &Path, name: &str) -> anyhow::Result<(PathBuf, PathBuf)> {
        let cert_path = dir.join(format!("{name}.pem"));
        let key_path = dir.join(format!("{name}.key.pem"));
        write_atomically(&key_path, self.key_pem.as_bytes(), true)?;
        write_atomically(&cert_path, self.cert_pem.as_bytes(), false)?;
        Ok((cert_path, key_path))
    }
}

impl DevCa {
    /// A new self-signed root CA for `trust_domain` (e.g. `example.org`), valid for ten years
    /// from one minute ago.
    ///
    /// # Errors
    /// The trust domain is not a valid SPIFFE trust domain name, or certificate generation
    /// failed.
    pub fn new(trust_domain: &str) -> anyhow::Result<DevCa> {
        validate_trust_domain(trust_domain)?;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).context("generate CA key")?;
        let params = ca_params(trust_domain, "root")?;
        let cert = params
            .self_signed(&key)
            .context("self-sign CA certificate")?;
        let cert_der = cert.der().clone();
        let cert_pem = cert.pem();
        Ok(DevCa {
            trust_domain: trust_domain.to_owned(),
            issuer: Issuer::new(params, key),
            root_pem: cert_pem.clone(),
            root_der: cert_der.clone(),
            cert_der,
            cert_pem,
            chain: Vec::new(),
        })
    }

    /// A new intermediate CA signed by this CA, in the same trust domain. SVIDs it mints carry
    /// it (and any CA between it and the root) after the leaf.
    ///
    /// # Errors
    /// Certificate generation failed.
    pub fn intermediate(&self) -> anyhow::Result<DevCa> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).context("generate CA key")?;
        let level = format!("intermediate {}", self.chain.len() + 1);
        let params = ca_params(&self.trust_domain, &level)?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .context("sign intermediate CA certificate")?;
        let cert_der = cert.der().clone();
        let cert_pem = cert.pem();
        let mut chain = vec![(cert_der.clone(), cert_pem.clone())];
        chain.extend(self.chain.iter().cloned());
        Ok(DevCa {
            trust_domain: self.trust_domain.clone(),
            issuer: Issuer::new(params, key),
            cert_der,
            cert_pem,
            chain,
            root_pem: self.root_pem.clone(),
            root_der: self.root_der.clone(),
        })
    }

    /// The trust domain name, without the `spiffe://` scheme.
    #[must_use]
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// `spiffe://<trust-domain><path>`, e.g. `ca.id("/edge/node-1")`.
    #[must_use]
    pub fn id(&self, path: &str) -> String {
        format!("spiffe://{}{path}", self.trust_domain)
    }

    /// This CA's own certificate, PEM (the root itself for a root CA).
    #[must_use]
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// This CA's own certificate, DER.
    #[must_use]
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// The trust bundle: the root certificate of the trust domain, PEM.
    #[must_use]
    pub fn bundle_pem(&self) -> String {
        self.root_pem.clone()
    }

    /// The trust bundle: the root certificate of the trust domain, DER.
    #[must_use]
    pub fn bundle_der(&self) -> &CertificateDer<'static> {
        &self.root_der
    }

    /// Write [`DevCa::bundle_pem`] to `<dir>/bundle.pem` and return the path.
    ///
    /// # Errors
    /// The file cannot be written.
    pub fn write_bundle(&self, dir: &Path) -> anyhow::Result<PathBuf> {
        let path = dir.join("bundle.pem");
        write_atomically(&path, self.root_pem.as_bytes(), false)?;
        Ok(path)
    }

    /// Mint an X.509-SVID for `spiffe_id`, valid from one minute ago until `validity` from now.
    ///
    /// # Errors
    /// `spiffe_id` is not an IA5 (ASCII) URI, or certificate generation failed.
    pub fn mint(&self, spiffe_id: &str, validity: Duration) -> anyhow::Result<Svid> {
        let now = SystemTime::now();
        let not_before = now.checked_sub(BACKDATE).unwrap_or(UNIX_EPOCH);
        let not_after = now
            .checked_add(validity)
            .context("validity reaches past the year 9999")?;
        self.mint_with_validity(spiffe_id, not_before, not_after)
    }

    /// Mint an X.509-SVID for `spiffe_id` with explicit validity bounds, which may lie in the
    /// past (an expired SVID) or the future (not yet valid). The ID is not required to belong
    /// to this CA's trust domain, so tests can mint foreign or malformed IDs.
    ///
    /// # Errors
    /// An empty or non-ASCII `spiffe_id`, bounds before 1970 or after 9999, `not_after`
    /// before `not_before`, or certificate generation failed.
    pub fn mint_with_validity(
        &self,
        spiffe_id: &str,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> anyhow::Result<Svid> {
        self.mint_with_key_usages(
            spiffe_id,
            not_before,
            not_after,
            vec![KeyUsagePurpose::DigitalSignature],
        )
    }

    /// [`mint_with_validity`](Self::mint_with_validity) with the leaf's key usages given (an
    /// X.509-SVID leaf must have exactly `DigitalSignature` among the signing ones; tests mint
    /// leaves that break the rule).
    ///
    /// # Errors
    /// As [`mint_with_validity`](Self::mint_with_validity).
    pub fn mint_with_key_usages(
        &self,
        spiffe_id: &str,
        not_before: SystemTime,
        not_after: SystemTime,
        key_usages: Vec<KeyUsagePurpose>,
    ) -> anyhow::Result<Svid> {
        ensure!(!spiffe_id.is_empty(), "the SPIFFE ID is empty");
        let uri = Ia5String::try_from(spiffe_id)
            .with_context(|| format!("{spiffe_id:?} is not an ASCII URI"))?;

        let mut params = CertificateParams::default();
        set_validity(&mut params, not_before, not_after)?;
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::OrganizationName, "edgesync test");
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = key_usages;
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;

        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).context("generate SVID key")?;
        let leaf = params
            .signed_by(&key, &self.issuer)
            .context("sign SVID certificate")?;

        let mut cert_pem = leaf.pem();
        let mut chain_der = vec![leaf.der().clone()];
        for (der, pem) in &self.chain {
            cert_pem.push_str(pem);
            chain_der.push(der.clone());
        }
        Ok(Svid {
            spiffe_id: spiffe_id.to_owned(),
            cert_pem,
            key_pem: key.serialize_pem(),
            chain_der,
            key_pkcs8_der: key.serialize_der(),
        })
    }
}

/// Parameters of a CA certificate for `trust_domain`.
fn ca_params(trust_domain: &str, level: &str) -> anyhow::Result<CertificateParams> {
    let uri = Ia5String::try_from(format!("spiffe://{trust_domain}"))
        .context("trust domain is not ASCII")?;
    let now = SystemTime::now();
    let mut params = CertificateParams::default();
    set_validity(
        &mut params,
        now.checked_sub(BACKDATE).unwrap_or(UNIX_EPOCH),
        now.checked_add(CA_VALIDITY)
            .context("CA validity reaches past the year 9999")?,
    )?;
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, "edgesync test");
    params.distinguished_name.push(
        DnType::CommonName,
        format!("edgesync test {level} CA {trust_domain}"),
    );
    params.subject_alt_names = vec![SanType::URI(uri)];
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

/// A SPIFFE trust domain name: lowercase letters, digits, `.`, `-`, `_`; not empty.
fn validate_trust_domain(trust_domain: &str) -> anyhow::Result<()> {
    ensure!(!trust_domain.is_empty(), "the trust domain is empty");
    if let Some(bad) = trust_domain
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(*c)))
    {
        bail!(
            "trust domain {trust_domain:?} contains {bad:?}; only a-z, 0-9, '.', '-', '_' are allowed"
        );
    }
    Ok(())
}

/// What `edgesync-hub dev-ca` writes into `dir` (created if missing): `bundle.pem` (a new CA
/// of `trust_domain`), `hub.pem` / `hub.key.pem` (`spiffe://<trust_domain>/hub`) and, per node,
/// `<node>.pem` / `<node>.key.pem` (`spiffe://<trust_domain>/edge/<node>`), the SVIDs valid for
/// `lifetime`. Returns the paths written. Never overwrites a file: every name is checked before
/// anything is written.
///
/// # Errors
/// A bad trust domain or node id (named), a node given twice or named `hub` or `bundle`, a file that
/// exists already, or a write that failed.
pub fn write_dev_pki(
    dir: &Path,
    trust_domain: &str,
    nodes: &[String],
    lifetime: Duration,
) -> anyhow::Result<Vec<PathBuf>> {
    validate_trust_domain(trust_domain)?;
    let mut names: Vec<String> = ["bundle.pem", "hub.pem", "hub.key.pem"]
        .map(String::from)
        .to_vec();
    let mut seen = std::collections::BTreeSet::new();
    for node in nodes {
        edgesync_protocol::NodeId::new(node).with_context(|| format!("node {node:?}"))?;
        ensure!(
            node != "hub" && node != "bundle",
            "node {node:?}: that name is taken by the hub's or the bundle's files"
        );
        ensure!(seen.insert(node.as_str()), "node {node:?} is given twice");
        names.push(format!("{node}.pem"));
        names.push(format!("{node}.key.pem"));
    }
    for name in &names {
        let p = dir.join(name);
        ensure!(
            !p.exists(),
            "{}: exists already; dev-ca never overwrites a file (choose an empty directory)",
            p.display()
        );
    }
    fs::create_dir_all(dir).with_context(|| dir.display().to_string())?;
    let ca = DevCa::new(trust_domain)?;
    let mut written = vec![ca.write_bundle(dir)?];
    let (c, k) = ca.mint(&ca.id("/hub"), lifetime)?.write(dir, "hub")?;
    written.extend([c, k]);
    for node in nodes {
        let (c, k) = ca
            .mint(&ca.id(&format!("/edge/{node}")), lifetime)?
            .write(dir, node)?;
        written.extend([c, k]);
    }
    Ok(written)
}

/// Set the validity of `params`, for times X.509 can express (1970 to 9999).
fn set_validity(
    params: &mut CertificateParams,
    not_before: SystemTime,
    not_after: SystemTime,
) -> anyhow::Result<()> {
    ensure!(not_before <= not_after, "not_after lies before not_before");
    let since_epoch = |t: SystemTime| -> anyhow::Result<Duration> {
        let d = t
            .duration_since(UNIX_EPOCH)
            .map_err(|_| anyhow::anyhow!("certificate times before 1970 are not supported"))?;
        ensure!(
            d.as_secs() <= MAX_X509_UNIX_SECS,
            "certificate times after 9999 cannot be expressed"
        );
        Ok(d)
    };
    let (nb, na) = (since_epoch(not_before)?, since_epoch(not_after)?);
    // Both are in range, so the additions cannot overflow.
    params.not_before = rcgen::date_time_ymd(1970, 1, 1) + nb;
    params.not_after = rcgen::date_time_ymd(1970, 1, 1) + na;
    Ok(())
}

/// Write `contents` to a temporary file next to `path`, then rename it into place.
fn write_atomically(path: &Path, contents: &[u8], private: bool) -> anyhow::Result<()> {
    let file_name = path
        .file_name()
        .with_context(|| format!("{} has no file name", path.display()))?;
    let mut tmp_name = file_name.to_os_string();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = private;
    let mut file = options
        .open(&tmp)
        .with_context(|| format!("create {}", tmp.display()))?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("write {}", tmp.display()))?;
    drop(file);
    fs::rename(&tmp, path).with_context(|| format!("rename to {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::time::{Duration, SystemTime};

    use rustls_pki_types::{CertificateDer, UnixTime};
    use webpki::{EndEntityCert, KeyUsage, anchor_from_trusted_cert};
    use x509_parser::{extensions::GeneralName, prelude::*};

    use super::*;

    const DAY: Duration = Duration::from_secs(24 * 3600);

    /// Verify `svid` against the root of `ca` for `usage` at `at`.
    fn verify(
        root: &CertificateDer<'static>,
        svid: &Svid,
        usage: KeyUsage,
        at: SystemTime,
    ) -> Result<(), webpki::Error> {
        let anchors = [anchor_from_trusted_cert(root).unwrap().to_owned()];
        let leaf = EndEntityCert::try_from(&svid.chain_der[0]).unwrap();
        let time = UnixTime::since_unix_epoch(at.duration_since(UNIX_EPOCH).unwrap());
        leaf.verify_for_usage(
            &[webpki::ring::ECDSA_P256_SHA256],
            &anchors,
            &svid.chain_der[1..],
            time,
            usage,
            None,
            None,
        )
        .map(|_| ())
    }

    fn uri_sans(cert: &X509Certificate<'_>) -> Vec<String> {
        let san = cert.subject_alternative_name().unwrap().expect("has SANs");
        san.value
            .general_names
            .iter()
            .map(|name| match name {
                GeneralName::URI(uri) => (*uri).to_owned(),
                other => panic!("unexpected SAN {other:?}"),
            })
            .collect()
    }

    #[test]
    fn ca_is_a_spiffe_trust_domain_root() {
        let ca = DevCa::new("example.org").unwrap();
        let (_, cert) = X509Certificate::from_der(ca.bundle_der()).unwrap();
        assert_eq!(uri_sans(&cert), vec!["spiffe://example.org".to_owned()]);
        assert!(cert.is_ca());
        let usage = cert.key_usage().unwrap().expect("key usage").value;
        assert!(usage.key_cert_sign());
        assert_eq!(cert.subject(), cert.issuer(), "self-signed");
        assert_eq!(ca.trust_domain(), "example.org");
        assert_eq!(ca.id("/hub"), "spiffe://example.org/hub");
        assert!(ca.bundle_pem().starts_with("-----BEGIN CERTIFICATE-----"));
    }

    #[test]
    fn rejects_bad_trust_domains() {
        assert!(DevCa::new("").is_err());
        assert!(DevCa::new("Example.org").is_err());
        assert!(DevCa::new("example.org/path").is_err());
    }

    #[test]
    fn minted_svid_has_the_spiffe_shape_and_chains_to_the_root() {
        let ca = DevCa::new("example.org").unwrap();
        let id = ca.id("/edge/node-1");
        let svid = ca.mint(&id, DAY).unwrap();
        assert_eq!(svid.spiffe_id, id);
        assert_eq!(svid.chain_der.len(), 1);

        let (_, leaf) = X509Certificate::from_der(&svid.chain_der[0]).unwrap();
        assert_eq!(uri_sans(&leaf), vec![id.clone()]);
        assert!(!leaf.is_ca());
        let constraints = leaf
            .basic_constraints()
            .unwrap()
            .expect("basic constraints");
        assert!(!constraints.value.ca);
        let usage = leaf.key_usage().unwrap().expect("key usage").value;
        assert!(usage.digital_signature());
        assert!(!usage.key_cert_sign());
        let eku = leaf.extended_key_usage().unwrap().expect("eku").value;
        assert!(eku.server_auth && eku.client_auth);
        let validity = leaf.validity();
        assert!(validity.is_valid());
        let lifetime = validity.time_to_expiration().unwrap();
        assert!(lifetime <= DAY && lifetime > DAY - Duration::from_secs(120));

        let now = SystemTime::now();
        verify(ca.bundle_der(), &svid, KeyUsage::server_auth(), now).unwrap();
        verify(ca.bundle_der(), &svid, KeyUsage::client_auth(), now).unwrap();

        // The PEM forms carry the same material.
        let pem = x509_parser::pem::Pem::iter_from_buffer(svid.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        assert_eq!(pem.len(), 1);
        assert_eq!(pem[0].contents, svid.chain_der[0].as_ref());
        assert!(svid.key_pem.starts_with("-----BEGIN PRIVATE KEY-----"));
        let key = KeyPair::from_pem(&svid.key_pem).unwrap();
        assert_eq!(key.serialize_der(), svid.key_pkcs8_der);
        assert_eq!(
            leaf.public_key().subject_public_key.data.as_ref(),
            key.public_key_raw()
        );
    }

    #[test]
    fn expired_and_not_yet_valid_svids_fail_verification() {
        let ca = DevCa::new("example.org").unwrap();
        let now = SystemTime::now();
        let expired = ca
            .mint_with_validity(&ca.id("/edge/old"), now - 2 * DAY, now - DAY)
            .unwrap();
        assert!(matches!(
            verify(ca.bundle_der(), &expired, KeyUsage::client_auth(), now),
            Err(webpki::Error::CertExpired { .. })
        ));
        let future = ca
            .mint_with_validity(&ca.id("/edge/new"), now + DAY, now + 2 * DAY)
            .unwrap();
        assert!(matches!(
            verify(ca.bundle_der(), &future, KeyUsage::server_auth(), now),
            Err(webpki::Error::CertNotValidYet { .. })
        ));
        assert!(
            ca.mint_with_validity("spiffe://example.org/x", now, now - DAY)
                .is_err()
        );
        assert!(ca.mint("", DAY).is_err());
    }

    #[test]
    fn svid_from_another_trust_domain_does_not_chain() {
        let ca = DevCa::new("example.org").unwrap();
        let other = DevCa::new("example.org").unwrap();
        let svid = other.mint(&other.id("/edge/intruder"), DAY).unwrap();
        // Same subject name as the trusted root, different key: the signature check fails.
        let res = verify(
            ca.bundle_der(),
            &svid,
            KeyUsage::client_auth(),
            SystemTime::now(),
        );
        assert!(res.is_err(), "{res:?}");
    }

    #[test]
    fn intermediate_ca_svids_carry_the_chain() {
        let root = DevCa::new("example.org").unwrap();
        let mid = root.intermediate().unwrap();
        let low = mid.intermediate().unwrap();
        let svid = low.mint(&low.id("/hub"), DAY).unwrap();
        assert_eq!(svid.chain_der.len(), 3);
        assert_eq!(&svid.chain_der[1], low.cert_der());
        assert_eq!(&svid.chain_der[2], mid.cert_der());
        assert_eq!(low.bundle_der(), root.bundle_der());
        let pem_count = svid.cert_pem.matches("BEGIN CERTIFICATE").count();
        assert_eq!(pem_count, 3);
        verify(
            root.bundle_der(),
            &svid,
            KeyUsage::server_auth(),
            SystemTime::now(),
        )
        .unwrap();
        // Without the intermediates the leaf does not chain.
        let leaf_only = Svid {
            chain_der: svid.chain_der[..1].to_vec(),
            ..svid.clone()
        };
        assert!(
            verify(
                root.bundle_der(),
                &leaf_only,
                KeyUsage::server_auth(),
                SystemTime::now()
            )
            .is_err()
        );
    }

    #[test]
    fn writes_svid_and_bundle_files() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let ca = DevCa::new("example.org").unwrap();
        let svid = ca.mint(&ca.id("/edge/node-1"), DAY).unwrap();

        let (cert_path, key_path) = svid.write(&dir, "svid").unwrap();
        assert_eq!(cert_path, dir.join("svid.pem"));
        assert_eq!(key_path, dir.join("svid.key.pem"));
        assert_eq!(fs::read_to_string(&cert_path).unwrap(), svid.cert_pem);
        assert_eq!(fs::read_to_string(&key_path).unwrap(), svid.key_pem);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&key_path).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "key readable by others: {mode:o}");
        }
        let bundle = ca.write_bundle(&dir).unwrap();
        assert_eq!(bundle, dir.join("bundle.pem"));
        assert_eq!(fs::read_to_string(&bundle).unwrap(), ca.bundle_pem());

        // Rewriting (rotation) replaces the files in place.
        let rotated = ca.mint(&ca.id("/edge/node-1"), DAY).unwrap();
        rotated.write(&dir, "svid").unwrap();
        assert_eq!(fs::read_to_string(&cert_path).unwrap(), rotated.cert_pem);
        let leftovers: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| n.to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }
}
