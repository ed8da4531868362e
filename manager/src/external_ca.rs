//! An external CA: managers forward node CSRs to a cfssl signer over HTTPS
//! instead of signing them, so the CA key never exists in the cluster
//! (`swarmd manager init --external-ca protocol=cfssl,url=https://…`).
//!
//! The request is cfssl's authenticated `POST /api/v1/cfssl/authsign`: the
//! CSR, the subject (CN node ID, OU role, O cluster ID) and the DNS SANs the
//! cluster's own CA would write ([`NodeSubject`]), with an HMAC-SHA256 token
//! over it made with the signer's auth key (cfssl's `auth_keys`, type
//! `standard`) — so that only managers, which hold that key sealed in the
//! replicated state (in the cluster record's CA key field), can have it
//! sign; without it, anyone who reaches the signer could mint a manager.
//! The answer is trusted for nothing until [`RootCa::accept_signed_node`]
//! has checked it: that subject and those names, the CSR's key, server and
//! client auth, issued by the cluster's root, and a lifetime within the
//! bound asked for. The signer's TLS certificate must chain to the
//! configured roots (by default the cluster's root); the answer is bounded
//! in size and time. The signer's profile decides the lifetime, within
//! that bound.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use swarmd_certs::{CertError, IssuedCert, NodeId, NodeSubject, Role, RootCa};

use crate::state::ExternalCaRecord;

/// The most an answer may hold.
const MAX_ANSWER: usize = 256 << 10;
/// How long one signing request may take, connection included.
const TIMEOUT: Duration = Duration::from_secs(10);
/// cfssl's authenticated signing endpoint, when the URL names no path.
const CFSSL_SIGN_PATH: &str = "/api/v1/cfssl/authsign";
/// The shortest auth key accepted, bytes.
pub const MIN_AUTH_KEY: usize = 16;

/// Why a certificate was not signed.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    /// The request itself is bad (the CSR), or the local CA refused.
    #[error(transparent)]
    Local(#[from] CertError),
    /// The external CA could not be reached, refused, or answered with
    /// something unusable.
    #[error("external CA {url}: {reason}")]
    External { url: String, reason: String },
}

impl From<SignError> for tonic::Status {
    fn from(e: SignError) -> Self {
        match e {
            SignError::Local(e) => tonic::Status::invalid_argument(e.to_string()),
            e @ SignError::External { .. } => {
                tonic::Status::unavailable(format!("{e}; nodes keep their current certificates"))
            }
        }
    }
}

/// A connection's worth of what the signer is.
pub struct ExternalCa {
    url: String,
    host: String,
    port: u16,
    authority: String,
    path: String,
    server_name: ServerName<'static>,
    tls: Arc<rustls::ClientConfig>,
    auth: ring::hmac::Key,
}

impl std::fmt::Debug for ExternalCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExternalCa").field("url", &self.url).finish_non_exhaustive()
    }
}

/// An `https://host[:port][/path]` URL split: host (without IPv6
/// brackets), port, authority and path (cfssl's sign endpoint if none).
pub fn parse_url(url: &str) -> Result<(String, u16, String, String), String> {
    let uri: http::Uri = url.parse().map_err(|e| format!("external CA URL {url:?}: {e}"))?;
    if uri.scheme_str() != Some("https") {
        return Err(format!("external CA URL {url:?}: must be https://"));
    }
    let authority = uri.authority().ok_or_else(|| format!("external CA URL {url:?}: no host"))?;
    if authority.as_str().contains('@') {
        return Err(format!("external CA URL {url:?}: credentials in the URL are not supported"));
    }
    let host = authority.host().trim_start_matches('[').trim_end_matches(']').to_owned();
    let port = authority.port_u16().unwrap_or(443);
    let path = match uri.path_and_query().map(|p| p.as_str()) {
        None | Some("") | Some("/") => CFSSL_SIGN_PATH.to_owned(),
        Some(p) => p.to_owned(),
    };
    Ok((host, port, authority.as_str().to_owned(), path))
}

impl ExternalCa {
    /// The signer `record` names, authenticated to with `auth_key`; its TLS
    /// certificate is checked against the record's roots, or
    /// `cluster_root_pem` if it has none.
    pub fn new(record: &ExternalCaRecord, cluster_root_pem: &str, auth_key: &[u8]) -> Result<Self, String> {
        if auth_key.len() < MIN_AUTH_KEY {
            return Err(format!("the external CA's auth key must be at least {MIN_AUTH_KEY} bytes (32 hex digits)"));
        }
        let auth = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, auth_key);
        let (host, port, authority, path) = parse_url(&record.url)?;
        let server_name =
            ServerName::try_from(host.clone()).map_err(|e| format!("external CA URL {:?}: {e}", record.url))?;
        let roots_pem = if record.tls_roots_pem.is_empty() { cluster_root_pem } else { &record.tls_roots_pem };
        let roots = swarmd_certs::tls::roots_from_pem(roots_pem).map_err(|e| format!("external CA TLS roots: {e}"))?;
        let tls = swarmd_certs::tls::http1_client_config(roots).map_err(|e| e.to_string())?;
        Ok(Self { url: record.url.clone(), host, port, authority, path, server_name, tls: Arc::new(tls), auth })
    }

    /// The signer's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Has the signer sign `csr_pem` for `node` in `role`, and checks the
    /// answer against `ca` (the cluster's CA, without its key), refusing a
    /// certificate that lives longer than `longest` from now.
    pub async fn sign(
        &self,
        ca: &RootCa,
        csr_pem: &str,
        node: &NodeId,
        role: Role,
        longest: Duration,
    ) -> Result<IssuedCert, SignError> {
        // The CSR is checked here first (size, key type, signature): the
        // signer gets nothing the cluster's own CA would refuse.
        swarmd_certs::check_csr(csr_pem)?;
        let subject = NodeSubject::new(node, role, ca.cluster_id());
        let request = serde_json::json!({
            "certificate_request": csr_pem,
            "hosts": subject.dns_names,
            "subject": {
                "CN": subject.common_name,
                "names": [{ "OU": subject.org_unit, "O": subject.organization }],
            },
        });
        let fail = |reason: String| SignError::External { url: self.url.clone(), reason };
        let request = request.to_string();
        let token = ring::hmac::sign(&self.auth, request.as_bytes());
        let b64 = |b: &[u8]| base64::engine::Engine::encode(&base64::engine::general_purpose::STANDARD, b);
        let authenticated = serde_json::json!({ "token": b64(token.as_ref()), "request": b64(request.as_bytes()) });
        let body = tokio::time::timeout(TIMEOUT, self.post(authenticated.to_string()))
            .await
            .map_err(|_| fail(format!("no answer within {} s", TIMEOUT.as_secs())))?
            .map_err(fail)?;
        let answer = parse_answer(&body).map_err(fail)?;
        let latest = swarmd_certs::now_unix().saturating_add(longest.as_secs().min(i64::MAX as u64) as i64);
        ca.accept_signed_node(&answer, csr_pem, node, role, latest).map_err(|e| fail(e.to_string()))
    }

    /// Refuses a signer that would also sign without the auth key: beside
    /// `authsign`, its `newcert` (which `cfssl serve` keeps open whatever the
    /// profile's auth key, cfssl#250) and `sign` endpoints must answer 404.
    /// `multirootca` serves only `authsign`.
    pub async fn check_only_authenticated(&self) -> Result<(), SignError> {
        let fail = |reason: String| SignError::External { url: self.url.clone(), reason };
        let base = self.path.rsplit_once('/').map_or("", |(b, _)| b);
        for endpoint in ["newcert", "sign"] {
            let path = format!("{base}/{endpoint}");
            let (status, _) = tokio::time::timeout(TIMEOUT, self.post_to(&path, "{}".into()))
                .await
                .map_err(|_| fail(format!("no answer within {} s", TIMEOUT.as_secs())))?
                .map_err(fail)?;
            if status != http::StatusCode::NOT_FOUND {
                return Err(fail(format!(
                    "it also serves {path} without the auth key (HTTP {status}): anyone who reaches it could have \
                     it sign a certificate; serve only authsign (multirootca does)"
                )));
            }
        }
        Ok(())
    }

    /// POSTs `body` to the signing endpoint.
    async fn post(&self, body: String) -> Result<(http::StatusCode, Bytes), String> {
        self.post_to(&self.path, body).await
    }

    /// POSTs `body` to `path` and returns the answer's body, whatever its
    /// status (cfssl explains refusals in the JSON of a 4xx answer).
    async fn post_to(&self, path: &str, body: String) -> Result<(http::StatusCode, Bytes), String> {
        let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| format!("unreachable: {e}"))?;
        let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.map_err(|e| format!("HTTP: {e}"))?;
        let conn = tokio::spawn(conn);
        let _stop = AbortOnDrop(conn);
        let req = http::Request::post(path)
            .header(http::header::HOST, self.authority.as_str())
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| format!("request: {e}"))?;
        let resp = send.send_request(req).await.map_err(|e| format!("HTTP: {e}"))?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| format!("answer (HTTP {status}): {e}"))?
            .to_bytes();
        Ok((status, body))
    }
}

struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The certificate in a cfssl answer, or what it says went wrong.
fn parse_answer((status, body): &(http::StatusCode, Bytes)) -> Result<String, String> {
    #[derive(serde::Deserialize)]
    struct Answer {
        #[serde(default)]
        success: bool,
        #[serde(default)]
        result: Option<AnswerResult>,
        #[serde(default)]
        errors: Vec<AnswerError>,
    }
    #[derive(serde::Deserialize)]
    struct AnswerResult {
        #[serde(default)]
        certificate: String,
    }
    #[derive(serde::Deserialize)]
    struct AnswerError {
        #[serde(default)]
        code: i64,
        #[serde(default)]
        message: String,
    }
    let answer: Answer =
        serde_json::from_slice(body).map_err(|_| format!("HTTP {status} with no cfssl answer in the body"))?;
    if !answer.success {
        let said: Vec<String> = answer
            .errors
            .iter()
            .take(4)
            .map(|e| format!("{} (code {})", e.message.chars().take(200).collect::<String>(), e.code))
            .collect();
        return Err(format!("refused to sign (HTTP {status}): {}", said.join("; ")));
    }
    match answer.result {
        Some(r) if !r.certificate.is_empty() => Ok(r.certificate),
        _ => Err(format!("HTTP {status}: the answer holds no certificate")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_https_with_the_sign_path_by_default() {
        let (host, port, authority, path) = parse_url("https://127.0.0.1:8888").unwrap();
        assert_eq!(
            (host.as_str(), port, authority.as_str(), path.as_str()),
            ("127.0.0.1", 8888, "127.0.0.1:8888", CFSSL_SIGN_PATH)
        );
        let (host, port, _, path) = parse_url("https://[::1]/sign").unwrap();
        assert_eq!((host.as_str(), port, path.as_str()), ("::1", 443, "/sign"));
        for bad in ["http://127.0.0.1:8888", "ca.example.com", "https://user:pw@ca.example.com/", "https://"] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn answers_give_the_certificate_or_the_signers_reason() {
        let ok = (http::StatusCode::OK, Bytes::from(r#"{"success":true,"result":{"certificate":"PEM"},"errors":[]}"#));
        assert_eq!(parse_answer(&ok).unwrap(), "PEM");
        let refused = (
            http::StatusCode::BAD_REQUEST,
            Bytes::from(r#"{"success":false,"result":null,"errors":[{"code":2000,"message":"Invalid request"}]}"#),
        );
        let e = parse_answer(&refused).unwrap_err();
        assert!(e.contains("Invalid request (code 2000)") && e.contains("400"), "{e}");
        let html = (http::StatusCode::BAD_GATEWAY, Bytes::from("<html>"));
        assert!(parse_answer(&html).unwrap_err().contains("502"));
        let empty = (http::StatusCode::OK, Bytes::from(r#"{"success":true,"result":{}}"#));
        assert!(parse_answer(&empty).unwrap_err().contains("no certificate"));
    }
}
