//! Software updates: download (resuming with HTTP range requests after an interruption),
//! verify (SHA-256, and the tenant's Ed25519 signature over the digest when a key is
//! configured), write to the inactive slot, switch `{root}/current` to it atomically, and
//! switch back if the health check fails.
//!
//! Layout: `{root}/slots/{a,b}/artifact` and `.../version`, `{root}/current` a symlink to the
//! active slot, `{root}/downloads/{sha256}.part` while downloading.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use aws_lc_rs::digest;
use aws_lc_rs::signature::{ED25519, UnparsedPublicKey};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use reqwest::{Client, StatusCode, header};
use tokio::io::AsyncWriteExt;

/// Why an update did not happen; each is reported with its step.
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    #[error("download failed: {0:#}")]
    Download(anyhow::Error),
    #[error("verification failed: {0}")]
    Verify(String),
    #[error("installation failed: {0:#}")]
    Install(anyhow::Error),
    #[error("health check failed, rolled back to the previous version: {0}")]
    RolledBack(String),
}

impl UpdateError {
    /// The progress state the device reports for this failure.
    pub fn state(&self) -> &'static str {
        match self {
            Self::RolledBack(_) => "rolled_back",
            _ => "failed",
        }
    }
}

/// The server refused the download for good (4xx other than 408 and 429): not retried.
#[derive(Debug, thiserror::Error)]
#[error("the server answered {0}")]
pub struct Refused(pub StatusCode);

pub fn parse_public_key(base64: &str) -> anyhow::Result<Vec<u8>> {
    let key = STANDARD.decode(base64.trim()).context("base64 expected")?;
    if key.len() != 32 {
        bail!("an Ed25519 public key is 32 bytes, got {}", key.len());
    }
    Ok(key)
}

/// Downloads `url` into `part`, continuing from what `part` already holds. Tries `attempts`
/// times; every attempt resumes.
pub async fn download(
    http: &Client,
    url: &str,
    bearer: Option<&str>,
    part: &Path,
    max_bytes: u64,
    attempts: u32,
) -> anyhow::Result<()> {
    let mut last = None;
    for attempt in 0..attempts {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(500 << attempt.min(5))).await;
        }
        match download_once(http, url, bearer, part, max_bytes).await {
            Ok(()) => return Ok(()),
            Err(e) if e.downcast_ref::<Refused>().is_some() => return Err(e),
            Err(e) => {
                tracing::warn!(attempt, error = %format!("{e:#}"), "download interrupted");
                last = Some(e);
            }
        }
    }
    Err(last.expect("at least one attempt"))
}

async fn download_once(
    http: &Client,
    url: &str,
    bearer: Option<&str>,
    part: &Path,
    max_bytes: u64,
) -> anyhow::Result<()> {
    let have = tokio::fs::metadata(part).await.map_or(0, |m| m.len());
    let mut request = http.get(url);
    if let Some(token) = bearer {
        request = request.bearer_auth(token);
    }
    if have > 0 {
        request = request.header(header::RANGE, format!("bytes={have}-"));
    }
    let mut response = request.send().await.context("request")?;
    let mut file = tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(part)
        .await
        .with_context(|| format!("cannot write {}", part.display()))?;
    let mut written = match response.status() {
        StatusCode::PARTIAL_CONTENT => {
            let range = response
                .headers()
                .get(header::CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            if !range.starts_with(&format!("bytes {have}-")) {
                bail!("the server resumed at the wrong place ({range:?}, expected byte {have})");
            }
            have
        }
        // The whole file: the server ignores ranges, or this is the first attempt.
        StatusCode::OK => {
            file.set_len(0).await?;
            0
        }
        // Nothing left after `have`: a previous attempt got everything.
        StatusCode::RANGE_NOT_SATISFIABLE if have > 0 => return Ok(()),
        status if status.is_client_error() && !matches!(status.as_u16(), 408 | 429) => {
            return Err(Refused(status).into());
        }
        status => bail!("the server answered {status}"),
    };
    while let Some(chunk) = response.chunk().await.context("reading the body")? {
        written += chunk.len() as u64;
        if written > max_bytes {
            drop(file);
            let _ = tokio::fs::remove_file(part).await;
            bail!("the artifact is larger than update.max_artifact_bytes ({max_bytes})");
        }
        file.write_all(&chunk).await?;
    }
    file.sync_all().await?;
    Ok(())
}

/// The file's SHA-256 digest.
pub fn sha256_file(path: &Path) -> anyhow::Result<Vec<u8>> {
    use std::io::Read;
    let mut file =
        std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut context = digest::Context::new(&digest::SHA256);
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        context.update(&buffer[..n]);
    }
    Ok(context.finish().as_ref().to_vec())
}

/// Checks the digest against the expected hex, and the signature (base64 Ed25519 over the
/// 32 digest bytes) against the key when there is one.
pub fn verify(
    digest: &[u8],
    expected_hex: &str,
    signature: Option<&str>,
    public_key: Option<&[u8]>,
) -> Result<(), UpdateError> {
    let actual = hex(digest);
    if !actual.eq_ignore_ascii_case(expected_hex) {
        return Err(UpdateError::Verify(format!(
            "SHA-256 is {actual}, the update says {expected_hex}"
        )));
    }
    let Some(key) = public_key else {
        return Ok(());
    };
    let signature = signature.ok_or_else(|| {
        UpdateError::Verify("the update is not signed and this device requires signatures".into())
    })?;
    let signature = STANDARD
        .decode(signature.trim())
        .map_err(|_| UpdateError::Verify("the signature is not base64".into()))?;
    UnparsedPublicKey::new(&ED25519, key)
        .verify(digest, &signature)
        .map_err(|_| UpdateError::Verify("the signature does not match the tenant's key".into()))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The A/B slots under the root.
pub struct Slots {
    root: PathBuf,
}

impl Slots {
    pub fn new(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
        }
    }

    fn current_link(&self) -> PathBuf {
        self.root.join("current")
    }

    /// The active slot's name, if any update was ever installed.
    pub fn active(&self) -> Option<String> {
        let target = std::fs::read_link(self.current_link()).ok()?;
        Some(target.file_name()?.to_str()?.to_string())
    }

    pub fn inactive(&self) -> &'static str {
        match self.active().as_deref() {
            Some("a") => "b",
            _ => "a",
        }
    }

    pub fn dir(&self, slot: &str) -> PathBuf {
        self.root.join("slots").join(slot)
    }

    /// Moves the verified artifact into `slot`, replacing what was there.
    pub fn fill(&self, slot: &str, artifact: &Path, version: &str) -> anyhow::Result<PathBuf> {
        let dir = self.dir(slot);
        if dir.exists() {
            std::fs::remove_dir_all(&dir)
                .with_context(|| format!("cannot clear {}", dir.display()))?;
        }
        std::fs::create_dir_all(&dir)?;
        let target = dir.join("artifact");
        std::fs::rename(artifact, &target)
            .with_context(|| format!("cannot move the artifact to {}", target.display()))?;
        std::fs::write(dir.join("version"), version)?;
        Ok(target)
    }

    /// Points `current` at `slot` (or nowhere) in one rename, so a crash leaves either the old
    /// or the new target.
    pub fn switch(&self, slot: Option<&str>) -> anyhow::Result<()> {
        let link = self.current_link();
        let Some(slot) = slot else {
            return match std::fs::remove_file(&link) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
                _ => Ok(()),
            };
        };
        let temporary = self.root.join("current.new");
        let _ = std::fs::remove_file(&temporary);
        std::os::unix::fs::symlink(Path::new("slots").join(slot), &temporary)?;
        std::fs::rename(&temporary, &link)
            .with_context(|| format!("cannot switch {}", link.display()))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};
    use axum::body::Body;
    use axum::http::{HeaderMap, Response};

    use super::*;

    /// An HTTP server (axum, on loopback) that serves `body` with range support, and cuts the
    /// first response off after `cut` bytes, as a dropped network connection would.
    async fn artifact_server(body: Vec<u8>, cut: usize) -> (String, Arc<AtomicUsize>) {
        let requests = Arc::new(AtomicUsize::new(0));
        let seen = requests.clone();
        let app = axum::Router::new().route(
            "/artifact",
            axum::routing::get(move |headers: HeaderMap| {
                let body = body.clone();
                let n = seen.fetch_add(1, Ordering::SeqCst);
                async move {
                    let start = headers
                        .get("range")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.strip_prefix("bytes="))
                        .and_then(|v| v.strip_suffix('-'))
                        .and_then(|v| v.parse::<usize>().ok());
                    let (status, from) = match start {
                        Some(start) => (206, start),
                        None => (200, 0),
                    };
                    let rest = body[from..].to_vec();
                    let total = body.len();
                    let builder = Response::builder().status(status).header(
                        "content-range",
                        format!("bytes {from}-{}/{total}", total - 1),
                    );
                    if n == 0 {
                        // Promise everything, send `cut` bytes, then fail the stream.
                        let stream = futures_util::stream::iter(vec![
                            Ok(rest[..cut].to_vec()),
                            Err(std::io::Error::other("connection lost")),
                        ]);
                        return builder
                            .header("content-length", rest.len())
                            .body(Body::from_stream(stream))
                            .expect("response");
                    }
                    builder.body(Body::from(rest)).expect("response")
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}/artifact", listener.local_addr().expect("addr"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        (url, requests)
    }

    #[tokio::test]
    async fn an_interrupted_download_resumes_where_it_stopped() {
        let body: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let (url, requests) = artifact_server(body.clone(), 50_000).await;
        let dir = tempfile::tempdir().expect("tempdir");
        let part = dir.path().join("x.part");
        download(&Client::new(), &url, None, &part, 1 << 20, 3)
            .await
            .expect("download");
        assert_eq!(std::fs::read(&part).expect("read"), body);
        assert_eq!(requests.load(Ordering::SeqCst), 2, "one cut, one resumed");
    }

    #[test]
    fn digests_and_signatures_are_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("artifact");
        std::fs::write(&path, b"firmware 2.0").expect("write");
        let digest = sha256_file(&path).expect("digest");
        let good = hex(&digest);
        assert!(verify(&digest, &good, None, None).is_ok());
        assert!(matches!(
            verify(&digest, &"0".repeat(64), None, None),
            Err(UpdateError::Verify(m)) if m.contains("SHA-256")
        ));

        let rng = aws_lc_rs::rand::SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).expect("key");
        let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).expect("pair");
        let key = pair.public_key().as_ref().to_vec();
        let signature = STANDARD.encode(pair.sign(&digest).as_ref());
        assert!(verify(&digest, &good, Some(&signature), Some(&key)).is_ok());
        let unsigned = verify(&digest, &good, None, Some(&key));
        assert!(matches!(unsigned, Err(UpdateError::Verify(m)) if m.contains("not signed")));
        let other = STANDARD.encode(pair.sign(b"something else").as_ref());
        let forged = verify(&digest, &good, Some(&other), Some(&key));
        assert!(matches!(forged, Err(UpdateError::Verify(m)) if m.contains("does not match")));
    }

    #[test]
    fn slots_alternate_and_switch_back() {
        let root = tempfile::tempdir().expect("tempdir");
        let slots = Slots::new(root.path());
        assert_eq!(slots.active(), None);
        assert_eq!(slots.inactive(), "a");
        let artifact = root.path().join("download");
        std::fs::write(&artifact, b"v1").expect("write");
        slots.fill("a", &artifact, "1.0").expect("fill");
        slots.switch(Some("a")).expect("switch");
        assert_eq!(slots.active().as_deref(), Some("a"));
        assert_eq!(slots.inactive(), "b");
        assert_eq!(
            std::fs::read(root.path().join("current/artifact")).expect("through the link"),
            b"v1"
        );
        slots.switch(None).expect("switch off");
        assert_eq!(slots.active(), None);
    }
}
