//! Device client certificates (mTLS): each tenant registers the CA certificates that issue its
//! devices' certificates; a device presenting a certificate that chains to one of them is that
//! tenant's device named by the certificate's subject Common Name (its id or name).
//!
//! The CAs are kept in memory for the TLS handshake (which cannot wait for a store read) and in
//! the store (`tenant_ca` records) for restarts. A CA is verified against on its own, never
//! pooled with other tenants' CAs, so a tenant cannot vouch for another tenant's devices by
//! registering a CA with the same name; the same CA cannot be registered by two tenants.

use std::sync::{Arc, RwLock};

use bytes::Bytes;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, UnixTime};
use serde::{Deserialize, Serialize};
use tern_core::{TenantId, ValidationError, now_ms};
use tern_store::Store;
use webpki::{EndEntityCert, KeyUsage, anchor_from_trusted_cert};
use x509_cert::Certificate;
use x509_cert::der::oid::AssociatedOid;
use x509_cert::der::{Decode, Encode};
use x509_cert::ext::pkix::BasicConstraints;

use crate::IdentityError;

const RECORD_KIND: &str = "tenant_ca";
/// Object identifier of the Common Name attribute (2.5.4.3).
const COMMON_NAME: x509_cert::der::asn1::ObjectIdentifier =
    x509_cert::der::asn1::ObjectIdentifier::new_unwrap("2.5.4.3");

/// A tenant's CA, as listed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TenantCa {
    /// SHA-256 fingerprint of the certificate, hex.
    pub id: String,
    pub tenant_id: TenantId,
    pub subject: String,
    pub not_after_ms: i64,
}

#[derive(Serialize, Deserialize)]
struct Record {
    ca: TenantCa,
    pem: String,
}

struct Loaded {
    ca: TenantCa,
    der: CertificateDer<'static>,
}

/// The registered CAs of every tenant.
pub(crate) struct TenantCas {
    store: Arc<dyn Store>,
    loaded: RwLock<Vec<Loaded>>,
}

impl TenantCas {
    pub async fn load(store: Arc<dyn Store>) -> Result<Self, IdentityError> {
        let mut loaded = Vec::new();
        for (key, value) in store
            .list_records(RECORD_KIND, "", None, usize::MAX)
            .await?
        {
            match serde_json::from_slice::<Record>(&value)
                .ok()
                .and_then(|r| Some((CertificateDer::from_pem_slice(r.pem.as_bytes()).ok()?, r.ca)))
            {
                Some((der, ca)) => loaded.push(Loaded { ca, der }),
                None => tracing::warn!(key, "skipping an unreadable tenant CA record"),
            }
        }
        Ok(Self {
            store,
            loaded: RwLock::new(loaded),
        })
    }

    /// Registers a CA certificate (PEM) for a tenant; it must be a CA (basic constraints).
    pub async fn add(&self, tenant: TenantId, pem: &str) -> Result<TenantCa, IdentityError> {
        let invalid = |why: &str| ValidationError::new("certificate", why.to_string());
        let der = CertificateDer::from_pem_slice(pem.as_bytes())
            .map_err(|_| invalid("expected one PEM certificate (-----BEGIN CERTIFICATE-----)"))?;
        let cert = Certificate::from_der(&der).map_err(|_| invalid("not an X.509 certificate"))?;
        if !is_ca(&cert) {
            return Err(invalid("not a CA certificate (basic constraints CA:TRUE)").into());
        }
        anchor_from_trusted_cert(&der).map_err(|_| invalid("not usable as a trust anchor"))?;
        let not_after_ms = i64::try_from(
            cert.tbs_certificate
                .validity
                .not_after
                .to_unix_duration()
                .as_millis(),
        )
        .unwrap_or(i64::MAX);
        if not_after_ms <= now_ms() {
            return Err(invalid("the certificate has expired").into());
        }
        let id = fingerprint(&der);
        if let Some(other) = self.read().iter().find(|l| l.ca.id == id) {
            return Err(if other.ca.tenant_id == tenant {
                IdentityError::Invalid(invalid("this CA is already registered"))
            } else {
                IdentityError::Invalid(invalid("this CA is registered by another tenant"))
            });
        }
        let ca = TenantCa {
            id: id.clone(),
            tenant_id: tenant,
            subject: cert.tbs_certificate.subject.to_string(),
            not_after_ms,
        };
        let record = Record {
            ca: ca.clone(),
            pem: pem.trim().to_string(),
        };
        let value = serde_json::to_vec(&record).map_err(|e| IdentityError::Keys(e.to_string()))?;
        self.store
            .put_record(RECORD_KIND, &format!("{tenant}/{id}"), Bytes::from(value))
            .await?;
        self.write().push(Loaded {
            ca: ca.clone(),
            der: der.into_owned(),
        });
        Ok(ca)
    }

    pub fn list(&self, tenant: TenantId) -> Vec<TenantCa> {
        self.read()
            .iter()
            .filter(|l| l.ca.tenant_id == tenant)
            .map(|l| l.ca.clone())
            .collect()
    }

    /// Returns whether the CA existed. Devices whose certificates it issued cannot connect with
    /// them any more (connections already open stay until they end).
    pub async fn delete(&self, tenant: TenantId, id: &str) -> Result<bool, IdentityError> {
        let existed = self
            .store
            .delete_record(RECORD_KIND, &format!("{tenant}/{id}"))
            .await?;
        self.write()
            .retain(|l| !(l.ca.tenant_id == tenant && l.ca.id == id));
        Ok(existed)
    }

    /// Whether any tenant has registered a CA (client certificates are only asked for then).
    pub fn any(&self) -> bool {
        !self.read().is_empty()
    }

    /// The tenant whose CA issued `chain` (leaf first, valid now, for client authentication),
    /// and the device the leaf names (its subject Common Name).
    pub fn identify(&self, chain: &[CertificateDer<'_>]) -> Option<(TenantId, String)> {
        let (leaf, intermediates) = chain.split_first()?;
        let end_entity = EndEntityCert::try_from(leaf).ok()?;
        let now = UnixTime::now();
        let tenant = self.read().iter().find_map(|loaded| {
            let anchor = anchor_from_trusted_cert(&loaded.der).ok()?;
            end_entity
                .verify_for_usage(
                    webpki::ALL_VERIFICATION_ALGS,
                    &[anchor],
                    intermediates,
                    now,
                    KeyUsage::client_auth(),
                    None,
                    None,
                )
                .ok()
                .map(|_| loaded.ca.tenant_id)
        })?;
        let cert = Certificate::from_der(leaf).ok()?;
        Some((tenant, common_name(&cert)?))
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<Loaded>> {
        self.loaded.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Vec<Loaded>> {
        self.loaded.write().unwrap_or_else(|e| e.into_inner())
    }
}

fn is_ca(cert: &Certificate) -> bool {
    cert.tbs_certificate
        .extensions
        .iter()
        .flatten()
        .filter(|e| e.extn_id == BasicConstraints::OID)
        .filter_map(|e| BasicConstraints::from_der(e.extn_value.as_bytes()).ok())
        .any(|bc| bc.ca)
}

fn common_name(cert: &Certificate) -> Option<String> {
    cert.tbs_certificate
        .subject
        .0
        .iter()
        .flat_map(|rdn| rdn.0.iter())
        .find(|attribute| attribute.oid == COMMON_NAME)
        .and_then(|attribute| {
            let der = attribute.value.to_der().ok()?;
            x509_cert::der::asn1::Utf8StringRef::from_der(&der)
                .map(|s| s.as_str().to_string())
                .or_else(|_| {
                    x509_cert::der::asn1::PrintableStringRef::from_der(&der)
                        .map(|s| s.as_str().to_string())
                })
                .ok()
        })
}

fn fingerprint(der: &[u8]) -> String {
    use aws_lc_rs::digest::{SHA256, digest};
    digest(&SHA256, der)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
