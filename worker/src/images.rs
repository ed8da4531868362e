//! A worker's images: a task's image fetched from the managers, blob by
//! blob, over the node's mTLS identity (`Dispatcher.FetchBlob`, which hands
//! out only the blobs of the image of one of this node's live tasks), and
//! unpacked into the node's root filesystem cache ([`RootfsCache`]).
//!
//! Nothing the managers send is taken on trust: the manifest must hash to the
//! digest the task's spec pins, the config to the manifest's descriptor, and
//! each layer to its descriptor (sha256 and size) and, uncompressed, to the
//! config's DiffID — checked while it is unpacked, by the unpacker that
//! confines every entry to the tree ([`swarmd_image::apply_layer`]).
//!
//! The cache lives in `$SWARMD_IMAGE_DIR/<node ID>` (default
//! `/var/cache/swarmd/images`), not in the data dir: a task in its own user
//! namespace must be able to reach its root filesystem, so the directories
//! down to it are searchable (0711), never listable — and what they lead to
//! is a read-only, `nosuid`, `nodev` bind mount of the tree, which itself
//! stays in a 0700 directory: a local user who learns the path (a task's
//! mountinfo shows it) can neither plant files in the tree every task of the
//! image shares nor run its set-ID files as their owner. Trees are shared
//! read-only by every task of the image on this node, owned as the image
//! says (without idmapped mounts one tree cannot be shifted into every task's
//! own block of IDs: a task in a user namespace reads the image's files
//! through their permission bits for others, as with a host directory).
//! A tree no task has used for [`TREE_GRACE`] is removed.

use std::path::{Path, PathBuf};
use std::time::Duration;

use swarmd_image::cache::Exposure;
use swarmd_image::{Digest, LayerRef, Owners, Rootfs, RootfsCache};
use swarmd_proto::dispatcher::dispatcher_client::DispatcherClient;
use swarmd_proto::dispatcher::FetchTaskBlobRequest;
use tokio::io::AsyncWriteExt;
use tonic::transport::Channel;

use crate::executor::BoxFuture;

/// How long an unused tree is kept for the next task of its image.
pub const TREE_GRACE: Duration = Duration::from_secs(10 * 60);

/// How long a manager may leave a blob stream silent.
const CHUNK_TIMEOUT: Duration = Duration::from_secs(30);

/// What an image brings to a task that does not say otherwise.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct ImageDefaults {
    /// `Entrypoint`.
    pub(crate) entrypoint: Vec<String>,
    /// `Cmd`.
    pub(crate) cmd: Vec<String>,
    /// `Env`, `KEY=VALUE`.
    pub(crate) env: Vec<String>,
    /// `WorkingDir`.
    pub(crate) cwd: Option<String>,
}

impl ImageDefaults {
    /// The command a task runs: its own args replace the image's `Cmd`
    /// (after the `Entrypoint`), as Docker does; `None` if there is none.
    pub(crate) fn command(&self, args: &[String]) -> Option<Vec<String>> {
        let mut c = self.entrypoint.clone();
        c.extend(if args.is_empty() { self.cmd.iter() } else { args.iter() }.cloned());
        (!c.is_empty()).then_some(c)
    }

    /// The image's environment, then the task's (which wins).
    pub(crate) fn env(&self, task_env: &[String]) -> Vec<String> {
        let key = |e: &String| e.split('=').next().unwrap_or_default().to_owned();
        let mine: std::collections::HashSet<String> = task_env.iter().map(key).collect();
        let mut out: Vec<String> = self.env.iter().filter(|e| !mine.contains(&key(e))).cloned().collect();
        out.extend(task_env.iter().cloned());
        out
    }
}

/// A task's image, ready: its tree (held until dropped) and its defaults.
pub(crate) struct Prepared {
    /// The tree, held for the task's life.
    pub(crate) rootfs: Rootfs,
    /// What the image brings.
    pub(crate) defaults: ImageDefaults,
}

/// Where the task agent gets images: the managers, or a fake in unit tests.
pub(crate) trait ImageSource: Send + Sync {
    /// The image `digest` of task `task`, unpacked.
    fn prepare(&self, task: &str, digest: &str, trust: Option<Trust>) -> BoxFuture<'static, Result<Prepared, String>>;
}

/// The signatures a task's image must be vouched for by, under content trust.
pub(crate) type Trust = Vec<swarmd_proto::dispatcher::TrustedSignature>;

/// Whether one of `sigs` verifies under its key and its payload names
/// `manifest` (the bytes fetched, hashed here).
pub(crate) fn check_trust(sigs: &Trust, manifest: &Digest) -> Result<(), String> {
    use swarmd_image::trust::{parse_payload, PublicKey};
    let ok = sigs.iter().any(|s| {
        PublicKey::from_spki_der(&s.public_key).is_ok_and(|k| k.verifies(&s.payload, &s.signature))
            && parse_payload(&s.payload).is_ok_and(|c| c.digest == *manifest)
    });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "content trust: none of the {} signature(s) sent verifies and names manifest {manifest}",
            sigs.len()
        ))
    }
}

/// Where the caches are when `SWARMD_IMAGE_DIR` does not say.
const DEFAULT_IMAGE_DIR: &str = "/var/cache/swarmd/images";

/// This node's image cache directory.
pub fn image_dir(node: &swarmd_certs::NodeId) -> PathBuf {
    PathBuf::from(std::env::var("SWARMD_IMAGE_DIR").unwrap_or_else(|_| DEFAULT_IMAGE_DIR.into())).join(node.as_str())
}

/// The real [`ImageSource`].
pub(crate) struct DispatcherImages {
    channel: Channel,
    cache: Result<RootfsCache, String>,
}

impl DispatcherImages {
    /// Fetches over `channel`; caches in `dir` (created, searchable only).
    pub(crate) fn new(channel: Channel, dir: &Path) -> Self {
        let cache = open_cache(dir).map_err(|e| format!("image cache {}: {e}", dir.display()));
        if let Err(e) = &cache {
            tracing::warn!(error = %e, "no image cache: tasks of images will fail");
        }
        Self { channel, cache }
    }

    /// Removes trees no task has used for [`TREE_GRACE`], every minute, until `stop`.
    pub(crate) async fn collect_garbage(cache: RootfsCache, stop: tokio_util::sync::CancellationToken) {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(60)) => {}
            }
            let c = cache.clone();
            match tokio::task::spawn_blocking(move || c.collect_garbage(TREE_GRACE)).await {
                Ok(Ok(n)) if n > 0 => tracing::info!(trees = n, "unused image trees removed"),
                Ok(Err(e)) => tracing::warn!(error = %e, "cannot remove unused image trees"),
                _ => {}
            }
        }
    }

    /// The cache, if it opened.
    pub fn cache(&self) -> Option<RootfsCache> {
        self.cache.as_ref().ok().cloned()
    }
}

fn open_cache(dir: &Path) -> Result<RootfsCache, String> {
    use std::os::unix::fs::PermissionsExt;
    // Directories made here are 0711 whatever the umask (swarmd runs with
    // 077); so are the default parents, which are ours even if they existed.
    // Parents of a SWARMD_IMAGE_DIR that existed are left as the operator made them.
    let mut open_up: Vec<PathBuf> = dir.ancestors().skip(1).take_while(|d| !d.exists()).map(Path::to_owned).collect();
    std::fs::create_dir_all(dir.parent().unwrap_or(dir)).map_err(|e| format!("{}: {e}", dir.display()))?;
    if std::env::var_os("SWARMD_IMAGE_DIR").is_none() {
        let default = Path::new(DEFAULT_IMAGE_DIR);
        open_up.extend(default.ancestors().take(2).map(Path::to_owned));
    }
    let cache = RootfsCache::open_with(dir, Exposure::ReadOnlyBind).map_err(|e| e.to_string())?;
    open_up.extend([dir.to_owned(), dir.join("rootfs")]);
    for d in open_up {
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o711))
            .map_err(|e| format!("{}: {e}", d.display()))?;
    }
    Ok(cache)
}

impl ImageSource for DispatcherImages {
    fn prepare(&self, task: &str, digest: &str, trust: Option<Trust>) -> BoxFuture<'static, Result<Prepared, String>> {
        let (channel, cache, task, digest) =
            (self.channel.clone(), self.cache.clone(), task.to_owned(), digest.to_owned());
        Box::pin(async move {
            let cache = cache?;
            let fetcher = Fetcher { client: DispatcherClient::new(channel), task };
            prepare(&fetcher, &cache, &digest, trust.as_ref()).await
        })
    }
}

struct Fetcher {
    client: DispatcherClient<Channel>,
    task: String,
}

impl Fetcher {
    /// Streams blob `digest` to `sink`, at most `max` bytes.
    async fn fetch<W: tokio::io::AsyncWrite + Unpin>(
        &self,
        digest: &str,
        max: u64,
        sink: &mut W,
    ) -> Result<u64, String> {
        let mut client = self.client.clone();
        let req = FetchTaskBlobRequest { task_id: self.task.clone(), digest: digest.to_owned() };
        let mut stream = tokio::time::timeout(CHUNK_TIMEOUT, client.fetch_blob(req))
            .await
            .map_err(|_| format!("blob {digest}: the manager did not answer"))?
            .map_err(|s| format!("blob {digest}: {}: {}", s.code(), s.message()))?
            .into_inner();
        let mut n = 0u64;
        loop {
            let next = tokio::time::timeout(CHUNK_TIMEOUT, stream.message())
                .await
                .map_err(|_| format!("blob {digest}: the manager stopped sending"))?
                .map_err(|s| format!("blob {digest}: {}: {}", s.code(), s.message()))?;
            let Some(chunk) = next else { break };
            n += chunk.data.len() as u64;
            if n > max {
                return Err(format!("blob {digest}: more than the {max} bytes its descriptor says"));
            }
            sink.write_all(&chunk.data).await.map_err(|e| format!("blob {digest}: {e}"))?;
        }
        sink.flush().await.map_err(|e| format!("blob {digest}: {e}"))?;
        Ok(n)
    }

    async fn document(&self, digest: &Digest, max: u64) -> Result<Vec<u8>, String> {
        let mut buf = Vec::new();
        self.fetch(digest.as_str(), max, &mut buf).await?;
        let actual = Digest::of(&buf);
        if actual != *digest {
            return Err(format!("blob {digest}: the manager sent bytes that hash to {actual}"));
        }
        Ok(buf)
    }
}

async fn prepare(
    fetcher: &Fetcher,
    cache: &RootfsCache,
    digest: &str,
    trust: Option<&Trust>,
) -> Result<Prepared, String> {
    let digest: Digest = digest.parse().map_err(|e| format!("image digest {digest:?}: {e}"))?;
    let max_doc = swarmd_image::layout::MAX_DOCUMENT;
    let manifest = fetcher.document(&digest, max_doc).await?;
    // `document` checked that these bytes hash to `digest`: the signed
    // payload must name exactly them.
    if let Some(sigs) = trust {
        check_trust(sigs, &Digest::of(&manifest))?;
    }
    let parsed_manifest: oci_spec::image::ImageManifest =
        serde_json::from_slice(&manifest).map_err(|e| format!("manifest {digest}: {e}"))?;
    let config_digest: Digest =
        parsed_manifest.config().digest().to_string().parse().map_err(|e| format!("manifest {digest}: {e}"))?;
    let config = fetcher.document(&config_digest, max_doc.min(parsed_manifest.config().size())).await?;
    let parsed = swarmd_image::parse(&manifest, &config).map_err(|e| format!("image {digest}: {e}"))?;
    if parsed.platform.os != "linux" {
        return Err(format!("image {digest} is for {}, not linux", parsed.platform));
    }
    let layers: Vec<LayerRef> =
        parsed.layers.iter().map(|l| LayerRef::of(l).expect("parse accepts only layers the cache reads")).collect();
    let owners = Owners::Shift(0);
    // Downloaded first (the gRPC stream is async, the unpacker is not), then
    // checked and unpacked from the files, which go at the end.
    let mut files: Vec<(Digest, PathBuf)> = Vec::new();
    let result = async {
        if !cache.has(&layers, owners) {
            for l in &layers {
                let path = cache.scratch_dir().join(format!("blob-{}-{:016x}", l.digest.hex(), rand::random::<u64>()));
                let mut f = tokio::fs::File::create(&path).await.map_err(|e| format!("{}: {e}", path.display()))?;
                files.push((l.digest.clone(), path));
                fetcher.fetch(l.digest.as_str(), l.size, &mut f).await?;
            }
        }
        let (cache, layers, paths) = (cache.clone(), layers.clone(), files.clone());
        tokio::task::spawn_blocking(move || {
            cache.acquire(&layers, owners, |l| {
                let p =
                    paths.iter().find(|(d, _)| *d == l.digest).map(|(_, p)| p.clone()).ok_or_else(|| {
                        std::io::Error::new(std::io::ErrorKind::NotFound, "the blob was not downloaded")
                    })?;
                Ok(Box::new(std::io::BufReader::new(std::fs::File::open(p)?)) as Box<dyn std::io::Read>)
            })
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("image {digest}: {e}"))
    }
    .await;
    for (_, p) in &files {
        let _ = std::fs::remove_file(p);
    }
    let rootfs = result?;
    let defaults = parsed
        .config
        .config()
        .as_ref()
        .map(|c| ImageDefaults {
            entrypoint: c.entrypoint().clone().unwrap_or_default(),
            cmd: c.cmd().clone().unwrap_or_default(),
            env: c.env().clone().unwrap_or_default(),
            cwd: c.working_dir().clone().filter(|w| !w.is_empty()),
        })
        .unwrap_or_default();
    Ok(Prepared { rootfs, defaults })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn a_task_s_args_replace_the_image_s_cmd_after_its_entrypoint() {
        let d = ImageDefaults { entrypoint: s(&["/init"]), cmd: s(&["serve"]), ..Default::default() };
        assert_eq!(d.command(&[]), Some(s(&["/init", "serve"])));
        assert_eq!(d.command(&s(&["check"])), Some(s(&["/init", "check"])));
        assert_eq!(ImageDefaults::default().command(&[]), None);
    }

    #[test]
    fn under_content_trust_the_signed_payload_must_name_the_manifest_fetched() {
        use swarmd_image::trust::{payload, sign};
        use swarmd_proto::dispatcher::TrustedSignature;
        let rng = ring::rand::SystemRandom::new();
        let doc = ring::signature::EcdsaKeyPair::generate_pkcs8(&ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING, &rng)
            .unwrap();
        let b64 = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, doc.as_ref());
        let pem = format!("-----BEGIN PRIVATE KEY-----\n{b64}\n-----END PRIVATE KEY-----\n");
        let (good, other) = (Digest::of(b"manifest"), Digest::of(b"another manifest"));
        let p = payload(&good, "app");
        let (sig, key) = sign(&pem, &p).unwrap();
        let s = TrustedSignature { payload: p, signature: sig.clone(), public_key: key.spki_der() };
        assert!(check_trust(&vec![s.clone()], &good).is_ok());
        // A manager that hands out another manifest with this signature is refused.
        assert!(check_trust(&vec![s.clone()], &other).is_err());
        // So is a signature that does not verify, or none at all.
        let mut bad = s.clone();
        bad.payload = payload(&other, "app");
        assert!(check_trust(&vec![bad], &other).is_err());
        assert!(check_trust(&vec![], &good).is_err());
    }

    #[test]
    fn a_task_s_environment_wins_over_the_image_s() {
        let d = ImageDefaults { env: s(&["PATH=/bin", "MODE=image"]), ..Default::default() };
        assert_eq!(d.env(&s(&["MODE=task"])), s(&["PATH=/bin", "MODE=task"]));
    }
}
