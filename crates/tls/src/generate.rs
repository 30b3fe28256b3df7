//! Making certificates: a CA, node certificates (server and client authentication, for the
//! names and addresses of the hosts that run nodes) and client certificates (client
//! authentication only). `portmesh tls init` and the tests use this; a team with its own CA
//! issues the same kinds of certificates with its own tools.

use std::net::IpAddr;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, SanType,
};
use time::OffsetDateTime;

use crate::TlsError;

fn fail(e: rcgen::Error) -> TlsError {
    TlsError::Generate(e.to_string())
}

/// A certificate and its private key, PEM.
#[derive(Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued").field("cert_pem", &self.cert_pem).finish_non_exhaustive()
    }
}

/// What a certificate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A node: serves TLS and authenticates to other members.
    Node,
    /// A client: authenticates to nodes that require client certificates.
    Client,
}

/// The certificate to issue.
#[derive(Debug, Clone)]
pub struct Spec {
    pub kind: Kind,
    /// The subject's common name.
    pub name: String,
    /// DNS names it is valid for (nodes).
    pub hosts: Vec<String>,
    /// IP addresses it is valid for (nodes).
    pub ips: Vec<IpAddr>,
    /// Valid from this long ago...
    pub valid_since: Duration,
    /// ...until this long from now. Zero makes a certificate that expired a second ago (tests).
    pub valid_for: Duration,
}

impl Spec {
    /// A node certificate for these names and addresses, valid for a year.
    pub fn node(hosts: Vec<String>, ips: Vec<IpAddr>) -> Self {
        Spec {
            kind: Kind::Node,
            name: hosts.first().cloned().unwrap_or_else(|| "portmesh node".into()),
            hosts,
            ips,
            valid_since: Duration::from_secs(3600),
            valid_for: Duration::from_secs(365 * 86_400),
        }
    }

    /// A client certificate, valid for a year.
    pub fn client(name: &str) -> Self {
        Spec {
            kind: Kind::Client,
            name: name.to_string(),
            hosts: Vec::new(),
            ips: Vec::new(),
            valid_since: Duration::from_secs(3600),
            valid_for: Duration::from_secs(365 * 86_400),
        }
    }
}

fn validity(params: &mut CertificateParams, since: Duration, valid_for: Duration) {
    let now = OffsetDateTime::now_utc();
    params.not_before = now - since;
    params.not_after = if valid_for.is_zero() { now - time::Duration::seconds(1) } else { now + valid_for };
}

/// A certificate authority that signs node and client certificates.
#[derive(Debug)]
pub struct Authority {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    key_pem: String,
}

impl Authority {
    /// A new CA named `name`, valid for ten years.
    pub fn new(name: &str) -> Result<Self, TlsError> {
        let key = KeyPair::generate().map_err(fail)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        validity(&mut params, Duration::from_secs(3600), Duration::from_secs(10 * 365 * 86_400));
        let cert = params.self_signed(&key).map_err(fail)?;
        let key_pem = key.serialize_pem();
        Ok(Authority { issuer: Issuer::new(params, key), cert_pem: cert.pem(), key_pem })
    }

    /// An existing CA, from its certificate and key (PEM).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, TlsError> {
        let key = KeyPair::from_pem(key_pem).map_err(fail)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key).map_err(fail)?;
        Ok(Authority { issuer, cert_pem: cert_pem.to_string(), key_pem: key_pem.to_string() })
    }

    /// The CA's certificate, PEM: what nodes and clients trust (`--tls-ca`).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA's private key, PEM: keep it off the nodes.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// Issues a certificate with a new key.
    pub fn issue(&self, spec: &Spec) -> Result<Issued, TlsError> {
        let key = KeyPair::generate().map_err(fail)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, spec.name.as_str());
        params.distinguished_name = dn;
        for host in &spec.hosts {
            let name = host.clone().try_into().map_err(fail)?;
            params.subject_alt_names.push(SanType::DnsName(name));
        }
        params.subject_alt_names.extend(spec.ips.iter().map(|ip| SanType::IpAddress(*ip)));
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = match spec.kind {
            Kind::Node => vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth],
            Kind::Client => vec![ExtendedKeyUsagePurpose::ClientAuth],
        };
        params.use_authority_key_identifier_extension = true;
        validity(&mut params, spec.valid_since, spec.valid_for);
        let cert = params.signed_by(&key, &self.issuer).map_err(fail)?;
        Ok(Issued { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }
}
