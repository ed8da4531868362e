//! A small client of the OCI distribution API, for `secretctl image pull`:
//! manifests and blobs by `GET /v2/<name>/manifests/<ref>` and
//! `GET /v2/<name>/blobs/<digest>`, anonymous or with the anonymous bearer
//! token a registry's `WWW-Authenticate` challenge points to.
//!
//! Nothing a registry says is trusted: a manifest asked for by digest must
//! hash to it, one asked for by tag is identified by its own hash (never by
//! `Docker-Content-Digest`), and the caller checks every blob against its
//! descriptor. Documents are bounded to 4 MiB, redirects to one hop, each
//! read to 30 s of silence. Plain HTTP only for loopback registries
//! (`localhost`, 127.0.0.0/8, ::1), as Docker allows them; HTTPS otherwise,
//! verified against the system's roots (`/etc/ssl/certs/ca-certificates.crt`).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;

/// Most bytes of a manifest or index.
pub const MAX_DOCUMENT: usize = 4 << 20;

/// How long a registry may stay silent.
const SILENCE: Duration = Duration::from_secs(30);

/// The media types a manifest request accepts.
const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, \
                      application/vnd.docker.distribution.manifest.list.v2+json, \
                      application/vnd.docker.distribution.manifest.v2+json";

/// A parsed image reference: `HOST[:PORT]/PATH[:TAG][@sha256:…]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reference {
    /// Registry host and port.
    pub registry: String,
    /// Repository path.
    pub repository: String,
    /// Tag (`latest` when neither tag nor digest is given).
    pub tag: Option<String>,
    /// Digest.
    pub digest: Option<String>,
}

impl Reference {
    /// Parses `r`; the first component must name a registry (it holds a `.`
    /// or `:`, or is `localhost`): there is no default registry here.
    pub fn parse(r: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("image reference {r:?}: {why}");
        if r.is_empty() || r.len() > 512 || r.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(bad("1 to 512 bytes, no spaces"));
        }
        let (rest, digest) = match r.split_once('@') {
            Some((a, d)) => {
                d.parse::<swarmd_image::Digest>().map_err(|e| bad(&e.to_string()))?;
                (a, Some(d.to_owned()))
            }
            None => (r, None),
        };
        let (registry, path) =
            rest.split_once('/').ok_or_else(|| bad("give the registry: HOST[:PORT]/REPOSITORY[:TAG]"))?;
        if !(registry.contains('.') || registry.contains(':') || registry == "localhost") {
            return Err(bad("the first component must be a registry host (HOST[:PORT]/…)"));
        }
        let (repository, tag) = match path.rsplit_once(':') {
            Some((p, t)) if !t.contains('/') => (p.to_owned(), Some(t.to_owned())),
            _ => (path.to_owned(), None),
        };
        let ok = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-' | '/');
        if repository.is_empty() || !repository.chars().all(ok) || repository.contains("..") {
            return Err(bad("a repository of lowercase letters, digits, '.', '_', '-' and '/'"));
        }
        if let Some(t) = &tag {
            let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
            if t.is_empty() || t.len() > 128 || !t.chars().all(ok) {
                return Err(bad("a tag of 1 to 128 letters, digits, '.', '_' or '-'"));
            }
        }
        let tag = if tag.is_none() && digest.is_none() { Some("latest".to_owned()) } else { tag };
        Ok(Self { registry: registry.to_owned(), repository, tag, digest })
    }

    /// The name the cluster gives the image: `HOST/PATH:TAG` (none when
    /// pulled by digest alone).
    pub fn name(&self) -> Option<String> {
        self.tag.as_ref().map(|t| format!("{}/{}:{t}", self.registry, self.repository))
    }

    fn loopback(&self) -> bool {
        let host = self.registry.rsplit_once(':').map_or(self.registry.as_str(), |(h, _)| h);
        is_loopback(host)
    }
}

/// Whether `host` (a name or an address, maybe in brackets) is this machine.
fn is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Refuses a URL a registry sends us to (a redirect, a token realm) unless
/// it is `https`, or `http` to this machine itself.
fn check_target(to: &http::Uri) -> Result<(), String> {
    match (to.scheme_str(), to.host()) {
        (Some("https"), Some(_)) => Ok(()),
        (Some("http"), Some(h)) if is_loopback(h) => Ok(()),
        _ => Err(format!("the registry sent us to {to}: only https, or http to this machine")),
    }
}

/// A connection's worth of settings for one registry.
pub struct Registry {
    reference: Reference,
    tls: Option<Arc<rustls::ClientConfig>>,
    token: tokio::sync::Mutex<Option<String>>,
}

/// A response's status, headers and body.
pub struct Answer {
    pub status: http::StatusCode,
    pub headers: http::HeaderMap,
    pub body: hyper::body::Incoming,
    _conn: AbortOnDrop,
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

impl Registry {
    /// A client for `reference`'s registry.
    pub fn new(reference: Reference) -> Result<Self, String> {
        let tls = if reference.loopback() {
            None
        } else {
            let pem = std::fs::read_to_string("/etc/ssl/certs/ca-certificates.crt")
                .map_err(|e| format!("the system's CA roots (/etc/ssl/certs/ca-certificates.crt): {e}"))?;
            let roots = swarmd_certs::tls::roots_from_pem(&pem).map_err(|e| format!("the system's CA roots: {e}"))?;
            Some(Arc::new(swarmd_certs::tls::http1_client_config(roots).map_err(|e| e.to_string())?))
        };
        Ok(Self { reference, tls, token: tokio::sync::Mutex::new(None) })
    }

    async fn connect(&self, url: &http::Uri) -> Result<Answer, String> {
        self.get_url(url, None).await
    }

    async fn get_url(&self, url: &http::Uri, accept: Option<&str>) -> Result<Answer, String> {
        let host = url.host().ok_or("a URL without a host")?.trim_start_matches('[').trim_end_matches(']').to_owned();
        let https = url.scheme_str() == Some("https");
        let port = url.port_u16().unwrap_or(if https { 443 } else { 80 });
        let tcp = tokio::time::timeout(SILENCE, tokio::net::TcpStream::connect((host.as_str(), port)))
            .await
            .map_err(|_| format!("{host}:{port}: no connection within 30 s"))?
            .map_err(|e| format!("{host}:{port}: {e}"))?;
        let io: Box<dyn Io> = if https {
            let tls = self.tls.clone().ok_or("HTTPS to a loopback registry: use http")?;
            let name = ServerName::try_from(host.clone()).map_err(|e| format!("{host}: {e}"))?;
            Box::new(
                tokio_rustls::TlsConnector::from(tls)
                    .connect(name, tcp)
                    .await
                    .map_err(|e| format!("{host}: TLS: {e}"))?,
            )
        } else {
            Box::new(tcp)
        };
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(io)).await.map_err(|e| format!("HTTP: {e}"))?;
        let conn = AbortOnDrop(tokio::spawn(async move {
            let _ = conn.await;
        }));
        let mut req = http::Request::get(url.path_and_query().map_or("/", |p| p.as_str()))
            .header(http::header::HOST, url.authority().map_or("", |a| a.as_str()))
            .header(http::header::USER_AGENT, "swarmd");
        if let Some(a) = accept {
            req = req.header(http::header::ACCEPT, a);
        }
        if let Some(t) = self.token.lock().await.as_ref() {
            // Only to the registry itself: same scheme, host and port.
            let base = http::Uri::try_from(self.base()).ok();
            let same = base.as_ref().is_some_and(|b| b.scheme() == url.scheme() && b.authority() == url.authority());
            if same {
                req = req.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
            }
        }
        let req = req.body(Empty::<Bytes>::new()).map_err(|e| format!("request: {e}"))?;
        let resp = tokio::time::timeout(SILENCE, send.send_request(req))
            .await
            .map_err(|_| format!("{host}: no answer within 30 s"))?
            .map_err(|e| format!("{host}: {e}"))?;
        let (parts, body) = resp.into_parts();
        Ok(Answer { status: parts.status, headers: parts.headers, body, _conn: conn })
    }

    fn base(&self) -> String {
        let scheme = if self.reference.loopback() { "http" } else { "https" };
        format!("{scheme}://{}", self.reference.registry)
    }

    /// GETs `path` of the registry, following one redirect and answering one
    /// bearer challenge; the final answer (any status).
    pub async fn get(&self, path: &str, accept: Option<&str>) -> Result<Answer, String> {
        let url: http::Uri = format!("{}{path}", self.base()).parse().map_err(|e| format!("{path}: {e}"))?;
        let mut a = self.get_url(&url, accept).await?;
        if a.status == http::StatusCode::UNAUTHORIZED {
            self.authenticate(&a.headers).await?;
            a = self.get_url(&url, accept).await?;
        }
        if a.status.is_redirection() {
            let to = a
                .headers
                .get(http::header::LOCATION)
                .and_then(|l| l.to_str().ok())
                .ok_or("a redirect without a location")?;
            let to: http::Uri = if to.starts_with('/') { format!("{}{to}", self.base()) } else { to.to_owned() }
                .parse()
                .map_err(|e| format!("redirect: {e}"))?;
            check_target(&to)?;
            a = self.connect(&to).await?;
        }
        Ok(a)
    }

    /// Fetches an anonymous token from the realm a `WWW-Authenticate: Bearer` challenge names.
    async fn authenticate(&self, headers: &http::HeaderMap) -> Result<(), String> {
        let challenge = headers
            .get(http::header::WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .ok_or("the registry asks for credentials (only anonymous pulls are supported)")?;
        let rest = challenge
            .strip_prefix("Bearer ")
            .ok_or("the registry asks for credentials (basic auth is not supported)")?;
        let mut params = std::collections::HashMap::new();
        for part in rest.split(',') {
            if let Some((k, v)) = part.trim().split_once('=') {
                params.insert(k.to_owned(), v.trim_matches('"').to_owned());
            }
        }
        let realm = params.get("realm").ok_or("a bearer challenge without a realm")?;
        let mut url = realm.clone();
        let mut sep = if url.contains('?') { '&' } else { '?' };
        for k in ["service", "scope"] {
            if let Some(v) = params.get(k) {
                url.push(sep);
                url.push_str(&format!("{k}={}", v.replace(' ', "%20")));
                sep = '&';
            }
        }
        let uri: http::Uri = url.parse().map_err(|e| format!("token realm: {e}"))?;
        check_target(&uri)?;
        let a = self.connect(&uri).await?;
        if !a.status.is_success() {
            return Err(format!("the token service answered {}: only anonymous pulls are supported", a.status));
        }
        let body = read_document(a.body, 64 << 10).await?;
        let v: serde_json::Value = serde_json::from_slice(&body).map_err(|e| format!("token: {e}"))?;
        let token = v["token"].as_str().or(v["access_token"].as_str()).ok_or("no token in the answer")?;
        *self.token.lock().await = Some(token.to_owned());
        Ok(())
    }

    /// The manifest or index `reference` names: its bytes and media type.
    pub async fn manifest(&self, reference: &str) -> Result<(Vec<u8>, String), String> {
        let path = format!("/v2/{}/manifests/{reference}", self.reference.repository);
        let a = self.get(&path, Some(ACCEPT)).await?;
        if !a.status.is_success() {
            return Err(format!(
                "{}/{}:{reference}: the registry answered {}",
                self.reference.registry, self.reference.repository, a.status
            ));
        }
        let media_type = a
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_owned();
        Ok((read_document(a.body, MAX_DOCUMENT).await?, media_type))
    }

    /// Blob `digest`: the answer, whose body the caller streams (the
    /// connection lives as long as the answer).
    pub async fn blob(&self, digest: &str) -> Result<Answer, String> {
        let a = self.get(&format!("/v2/{}/blobs/{digest}", self.reference.repository), None).await?;
        if !a.status.is_success() {
            return Err(format!("blob {digest}: the registry answered {}", a.status));
        }
        Ok(a)
    }
}

/// Reads a whole body of at most `max` bytes.
pub async fn read_document(body: hyper::body::Incoming, max: usize) -> Result<Vec<u8>, String> {
    let limited = http_body_util::Limited::new(body, max);
    let bytes = tokio::time::timeout(SILENCE * 2, limited.collect())
        .await
        .map_err(|_| "the registry stopped sending".to_owned())?
        .map_err(|e| format!("more than {max} bytes, or: {e}"))?
        .to_bytes();
    Ok(bytes.to_vec())
}

/// The next chunk of a blob body (`None` at its end).
pub async fn next_chunk(body: &mut hyper::body::Incoming) -> Result<Option<Bytes>, String> {
    loop {
        let frame =
            tokio::time::timeout(SILENCE, body.frame()).await.map_err(|_| "the registry stopped sending".to_owned())?;
        match frame {
            None => return Ok(None),
            Some(Err(e)) => return Err(e.to_string()),
            Some(Ok(f)) => {
                if let Ok(data) = f.into_data() {
                    return Ok(Some(data));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_registry_sends_us_only_to_https_or_to_this_machine() {
        for ok in
            ["https://storage.example.com/blob", "http://127.0.0.1:5000/x", "http://localhost/x", "http://[::1]:1/x"]
        {
            assert!(check_target(&ok.parse().unwrap()).is_ok(), "{ok}");
        }
        for bad in [
            "http://192.0.2.2:5099/latest/meta-data/",
            "http://169.254.169.254/",
            "file://host/etc/passwd",
            "ftp://h/x",
        ] {
            assert!(check_target(&bad.parse().unwrap()).is_err(), "{bad}");
        }
    }

    #[test]
    fn references_name_a_registry_and_a_repository() {
        let r = Reference::parse("127.0.0.1:5000/acme/app:1").unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str(), r.tag.as_deref()),
            ("127.0.0.1:5000", "acme/app", Some("1"))
        );
        assert!(r.loopback());
        assert_eq!(r.name().unwrap(), "127.0.0.1:5000/acme/app:1");
        let r = Reference::parse("registry.example.com/app").unwrap();
        assert_eq!(r.tag.as_deref(), Some("latest"));
        assert!(!r.loopback());
        let d = format!("sha256:{}", "a".repeat(64));
        let r = Reference::parse(&format!("localhost:5000/app@{d}")).unwrap();
        assert_eq!((r.tag, r.digest.as_deref()), (None, Some(d.as_str())));
        for bad in ["app:1", "busybox", "host.io/../x", "host.io/App", "host.io/app:bad tag", "", "h.io/app@sha256:12"]
        {
            assert!(Reference::parse(bad).is_err(), "{bad}");
        }
    }
}
