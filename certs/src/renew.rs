//! When to renew a certificate, and how to back off when renewal fails.
//!
//! Like Docker Swarm, a node renews at a random point between 50 % and 80 % of
//! its certificate's remaining lifetime, so a cluster issued at one moment does
//! not renew at one moment. Unlike Swarm, the schedule is computed at second
//! granularity, which matters for short certificates (30 s minimum).

use std::time::Duration;

/// Lower bound of the renewal window, as a fraction of the lifetime.
pub const LOWER: f64 = 0.5;
/// Upper bound of the renewal window.
pub const UPPER: f64 = 0.8;

/// How long to wait before renewing a certificate that was received at `now`
/// (unix seconds) and expires at `not_after`, given `u` drawn uniformly from
/// [0, 1). An expired certificate is renewed at once.
pub fn renewal_delay(now: i64, not_after: i64, u: f64) -> Duration {
    let remaining = (not_after - now).max(0) as f64;
    let frac = LOWER + (UPPER - LOWER) * u.clamp(0.0, 1.0);
    Duration::from_secs_f64(remaining * frac)
}

/// [`renewal_delay`] with a random `u`.
pub fn random_renewal_delay(now: i64, not_after: i64) -> Duration {
    renewal_delay(now, not_after, rand::random::<f64>())
}

/// Exponential backoff after failed attempts: 1 s, 2 s, 4 s … capped at `max`,
/// and never later than `deadline` (so a certificate about to expire is retried
/// before it does).
#[derive(Clone, Debug)]
pub struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    /// Starts at `first`, doubles up to `max`.
    pub fn new(first: Duration, max: Duration) -> Self {
        Self { next: first, max }
    }
    /// The next delay (with ±20 % jitter) and advances.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d.mul_f64(0.8 + 0.4 * rand::random::<f64>())
    }
    /// Back to the first delay.
    pub fn reset(&mut self, first: Duration) {
        self.next = first;
    }
}

/// A renewed certificate, and the roots to trust with it if they changed.
#[derive(Clone, Debug)]
pub struct Renewed {
    /// The leaf, then any certificate it chains through, PEM.
    pub cert_pem: String,
    /// The roots to trust from now on, PEM; `None`: keep the current ones.
    pub ca_bundle_pem: Option<String>,
}

/// Something that turns a CSR into a signed certificate (PEM): the local CA on a
/// manager, the `RenewNodeCertificate` RPC on a worker.
pub trait CertIssuer: Send + Sync + 'static {
    /// Issues a certificate for this node's identity with the key in `csr_pem`.
    fn issue(&self, csr_pem: String) -> impl std::future::Future<Output = Result<Renewed, String>> + Send;
}

/// Tells a running [`Renewer`] to renew now, or to trust other roots (a root
/// CA rotation does both). Cheap to clone.
#[derive(Clone, Debug)]
pub struct RenewControl {
    now: std::sync::Arc<tokio::sync::Notify>,
    trust: std::sync::Arc<tokio::sync::watch::Sender<Option<String>>>,
}

impl Default for RenewControl {
    fn default() -> Self {
        Self { now: Default::default(), trust: std::sync::Arc::new(tokio::sync::watch::Sender::new(None)) }
    }
}

impl RenewControl {
    /// Renew at once (once, however often it is called before the renewal).
    pub fn renew_now(&self) {
        self.now.notify_one();
    }

    /// Trust the roots in `bundle_pem` from now on (the renewer re-publishes
    /// and stores the identity if they differ from the current ones).
    pub fn trust(&self, bundle_pem: String) {
        self.trust.send_if_modified(|cur| {
            if cur.as_deref() == Some(bundle_pem.as_str()) {
                return false;
            }
            *cur = Some(bundle_pem);
            true
        });
    }
}

/// Renews this node's certificate on schedule, for as long as it runs.
///
/// Each renewal uses a new key. The new certificate is validated (same node
/// and cluster, key matches), written to `certs/` (key first), and only then
/// published to acceptors and connectors; live connections are untouched.
pub struct Renewer<I> {
    creds: std::sync::Arc<crate::tls::TlsCredentials>,
    certs_dir: std::path::PathBuf,
    issuer: I,
    wrap: Option<std::sync::Arc<dyn crate::KeyWrap>>,
    control: RenewControl,
}

impl<I: CertIssuer> Renewer<I> {
    /// A renewer for the identity in `creds`, stored in `certs_dir`.
    pub fn new(creds: std::sync::Arc<crate::tls::TlsCredentials>, certs_dir: std::path::PathBuf, issuer: I) -> Self {
        Self { creds, certs_dir, issuer, wrap: None, control: RenewControl::default() }
    }

    /// The handle that asks this renewer to renew now or trust other roots.
    pub fn control(&self) -> RenewControl {
        self.control.clone()
    }

    /// Stores renewed keys through `wrap` (sealed while the cluster is autolocked).
    pub fn with_key_wrap(mut self, wrap: std::sync::Arc<dyn crate::KeyWrap>) -> Self {
        self.wrap = Some(wrap);
        self
    }

    async fn renew_once(&self) -> Result<String, String> {
        let (key, csr) = crate::generate_key_and_csr().map_err(|e| e.to_string())?;
        let renewed = self.issuer.issue(csr).await?;
        let current = self.creds.identity();
        let ca_pem = renewed.ca_bundle_pem.unwrap_or_else(|| current.ca_pem.clone());
        let fresh = crate::NodeIdentity::new(ca_pem, renewed.cert_pem, key).map_err(|e| e.to_string())?;
        fresh.save_with(&self.certs_dir, self.wrap.as_deref()).map_err(|e| e.to_string())?;
        let serial = fresh.info.serial.clone();
        self.creds.publish(fresh).map_err(|e| e.to_string())?;
        Ok(serial)
    }

    /// Keeps the identity, with the roots in `bundle_pem` trusted instead of
    /// the current ones: stored, then published. Nothing changes on error.
    fn retrust(&self, bundle_pem: &str) -> Result<bool, String> {
        let current = self.creds.identity();
        if current.ca_pem == bundle_pem {
            return Ok(false);
        }
        crate::tls::roots_from_pem(bundle_pem).map_err(|e| e.to_string())?;
        let fresh = crate::NodeIdentity::new(bundle_pem.to_owned(), current.cert_pem.clone(), current.key_pem.clone())
            .map_err(|e| e.to_string())?;
        fresh.save_with(&self.certs_dir, self.wrap.as_deref()).map_err(|e| e.to_string())?;
        self.creds.publish(fresh).map_err(|e| e.to_string())?;
        Ok(true)
    }

    /// Runs until `shutdown` is cancelled.
    pub async fn run(self, shutdown: tokio_util::sync::CancellationToken) {
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(300));
        let mut wait = {
            let id = self.creds.identity();
            random_renewal_delay(now_unix(), id.info.not_after)
        };
        let mut trust = self.control.trust.subscribe();
        loop {
            tracing::debug!(in_secs = wait.as_secs_f64(), "next certificate renewal");
            let started = std::time::Instant::now();
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.control.now.notified() => tracing::info!("certificate renewal asked for now"),
                r = trust.changed() => {
                    if r.is_err() { return }
                    let bundle = trust.borrow_and_update().clone();
                    if let Some(bundle) = bundle {
                        match self.retrust(&bundle) {
                            Ok(true) => tracing::info!("trusted root CAs updated"),
                            Ok(false) => {}
                            Err(e) => tracing::warn!(error = %e, "cannot update the trusted root CAs"),
                        }
                    }
                    wait = wait.saturating_sub(started.elapsed());
                    continue;
                }
                _ = shutdown.cancelled() => return,
            }
            match self.renew_once().await {
                Ok(serial) => {
                    backoff.reset(Duration::from_secs(1));
                    let id = self.creds.identity();
                    tracing::info!(%serial, not_after = id.info.not_after, "certificate renewed");
                    wait = random_renewal_delay(now_unix(), id.info.not_after);
                }
                Err(e) => {
                    wait = backoff.next_delay();
                    tracing::warn!(error = %e, retry_in = wait.as_secs_f64(), "certificate renewal failed");
                }
            }
        }
    }
}

/// Seconds since the epoch.
pub fn now_unix() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_falls_between_half_and_four_fifths() {
        let now = 1_000;
        let exp = now + 100;
        assert_eq!(renewal_delay(now, exp, 0.0), Duration::from_secs(50));
        assert_eq!(renewal_delay(now, exp, 0.999_999).as_secs(), 79);
        for _ in 0..1000 {
            let d = random_renewal_delay(now, exp);
            assert!(d >= Duration::from_secs(50) && d < Duration::from_secs(80), "{d:?}");
        }
    }

    #[test]
    fn expired_certificate_renews_now() {
        assert_eq!(renewal_delay(100, 50, 0.5), Duration::ZERO);
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(4));
        let ds: Vec<_> = (0..5).map(|_| b.next_delay().as_secs_f64()).collect();
        assert!(ds[0] >= 0.8 && ds[0] <= 1.2);
        assert!(ds[1] >= 1.6 && ds[1] <= 2.4);
        assert!(ds[4] >= 3.2 && ds[4] <= 4.8);
    }
}
