//! The managers' images: blobs on each manager's disk, records in raft.
//!
//! - **Load** (`Control.LoadImage`): the manager reads the header (manifest,
//!   config, name), checks the config against the manifest, then streams each
//!   layer into its blob store — sha256 and size checked as it is written,
//!   the DiffID after it is decompressed — and asks every other manager that
//!   is a raft member to hold the image (`Cluster.HoldImage`: each fetches
//!   what it lacks from this one and checks every digest). Once a majority
//!   holds every blob, the record is proposed (`PutImage`; the state machine
//!   counts the holders again). Blobs never enter the raft log.
//! - **Catch-up**: every manager looks at the records now and then; one
//!   that lacks an image's blobs (it was down, or joined later) fetches them
//!   from a holder and says it holds them (`ImageHeld`).
//! - **Garbage**: a blob no record names, older than [`GC_GRACE`], is removed,
//!   never while a load or hold is running here.
//! - **Serving**: to managers (`Cluster.FetchBlob`), and to nodes
//!   (`Dispatcher.FetchBlob`) only the blobs of the image of one of their own
//!   live tasks ([`authorize_task_blob`]), fetched from a holder first if this
//!   manager has not got them yet.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use swarmd_certs::{now_unix, NodeId, TaskId};
use swarmd_image::{BlobStore, Digest, Platform, StoreError};
use swarmd_proto::cluster::cluster_client::ClusterClient;
use swarmd_proto::cluster::{FetchBlobRequest, HoldImageRequest};
use swarmd_proto::control::load_image_chunk::Part;
use swarmd_proto::control::LoadImageChunk;
use tokio::sync::{mpsc, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Status, Streaming};

use crate::state::{
    check_image_name, normalize_image_name, pinned_digest, Command, ImageBlob, ImageRecord, TaskRecord,
};
use crate::status::internal;
use crate::store::{Peers, Store};

/// Bytes per streamed chunk.
pub const CHUNK: usize = 1 << 20;

/// Most bytes one image may hold (manifest, config and compressed layers).
pub const MAX_IMAGE_BYTES: u64 = 8 << 30;

/// How old a blob no record names must be before it is removed.
pub const GC_GRACE: Duration = Duration::from_secs(15 * 60);

/// How often a manager checks that it holds every image's blobs.
const CATCH_UP_EVERY: Duration = Duration::from_secs(5);

/// How long a silent peer may keep a blob stream waiting for its next chunk.
const CHUNK_TIMEOUT: Duration = Duration::from_secs(30);

/// Blob streams served at once to nodes, and to managers (separately: nodes
/// cannot starve replication).
const SERVING: usize = 32;

/// Blob streams one node may hold open at once (a worker fetches one at a time).
const PER_NODE: usize = 4;

/// How long a stream may wait for a free slot, or for its reader to take
/// the next chunk, before it is dropped.
const STALL: Duration = Duration::from_secs(30);

struct Inner {
    store: Store,
    blobs: BlobStore,
    peers: Peers,
    me: NodeId,
    /// One load at a time on this manager.
    loading: Semaphore,
    /// Streams being served to nodes.
    serving: Arc<Semaphore>,
    /// Streams being served to managers.
    serving_managers: Arc<Semaphore>,
    /// Streams open per node.
    per_node: Arc<std::sync::Mutex<std::collections::HashMap<NodeId, usize>>>,
    /// Loads and holds running (garbage is not collected meanwhile).
    busy: AtomicUsize,
}

/// The image half of a manager.
#[derive(Clone)]
pub struct Images(Arc<Inner>);

fn store_status(e: StoreError) -> Status {
    match e {
        StoreError::Mismatch { .. } => Status::invalid_argument(e.to_string()),
        other => Status::internal(other.to_string()),
    }
}

fn parse_digest(d: &str) -> Result<Digest, Status> {
    d.parse::<Digest>().map_err(|e| Status::invalid_argument(format!("digest {d:?}: {e}")))
}

/// A blob on its way out: its slot (in the pool, and of its node) is held
/// until the stream is read to its end or dropped, not merely buffered.
pub(crate) struct BlobStream {
    chunks: ReceiverStream<Result<Bytes, Status>>,
    _permit: tokio::sync::OwnedSemaphorePermit,
    _slot: Option<NodeSlot>,
}

impl tokio_stream::Stream for BlobStream {
    type Item = Result<Bytes, Status>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        std::pin::Pin::new(&mut self.chunks).poll_next(cx)
    }
}

/// One of a node's [`PER_NODE`] streams, given back on drop.
struct NodeSlot {
    counts: Arc<std::sync::Mutex<std::collections::HashMap<NodeId, usize>>>,
    node: NodeId,
}

impl NodeSlot {
    fn take(
        counts: &Arc<std::sync::Mutex<std::collections::HashMap<NodeId, usize>>>,
        node: &NodeId,
    ) -> Result<Self, Status> {
        let mut c = counts.lock().expect("slots lock");
        let n = c.entry(node.clone()).or_default();
        if *n >= PER_NODE {
            return Err(Status::resource_exhausted(format!("node {node} has {PER_NODE} blob streams open already")));
        }
        *n += 1;
        Ok(Self { counts: counts.clone(), node: node.clone() })
    }
}

impl Drop for NodeSlot {
    fn drop(&mut self) {
        let mut c = self.counts.lock().expect("slots lock");
        if let Some(n) = c.get_mut(&self.node) {
            *n -= 1;
            if *n == 0 {
                c.remove(&self.node);
            }
        }
    }
}

/// Counts a load or hold as running for as long as it lives.
struct Busy<'a>(&'a AtomicUsize);

impl<'a> Busy<'a> {
    fn new(n: &'a AtomicUsize) -> Self {
        n.fetch_add(1, Ordering::SeqCst);
        Self(n)
    }
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Whether `node` may fetch blob `digest` for task `task`: the task is
/// placed on `node`, should run and has not ended, and its image (pinned
/// by digest) names the blob. Every refusal is the same to the caller.
pub(crate) fn authorize_task_blob(
    task: Option<&TaskRecord>,
    node: &NodeId,
    image: Option<&ImageRecord>,
    digest: &str,
) -> bool {
    let Some(t) = task else { return false };
    if t.node != *node || !t.desired_running || t.state.is_terminal() {
        return false;
    }
    let Some(img) = image else { return false };
    pinned_digest(&t.spec.image) == Some(img.digest.as_str()) && img.blobs().contains(&digest)
}

impl Images {
    /// The images of manager `me`, blobs in `blobs`.
    pub(crate) fn new(store: Store, blobs: BlobStore, peers: Peers, me: NodeId) -> Self {
        Self(Arc::new(Inner {
            store,
            blobs,
            peers,
            me,
            loading: Semaphore::new(1),
            serving: Arc::new(Semaphore::new(SERVING)),
            serving_managers: Arc::new(Semaphore::new(SERVING)),
            per_node: Arc::default(),
            busy: AtomicUsize::new(0),
        }))
    }

    /// Checks a manifest and config (the config is the manifest's, the
    /// platform the one wanted, the name well formed, the sizes bounded)
    /// and stores both; the layers come next ([`Ingest::layer`]).
    fn ingest(&self, manifest: &[u8], config: &[u8], name: &str, platform: &str) -> Result<Ingest<'_>, Status> {
        let parsed =
            swarmd_image::parse(manifest, config).map_err(|e| Status::invalid_argument(format!("image: {e}")))?;
        let want: Platform = if platform.is_empty() {
            Platform::default()
        } else {
            platform.parse().map_err(|e| Status::invalid_argument(format!("platform: {e}")))?
        };
        if parsed.platform.os != want.os || parsed.platform.arch != want.arch {
            return Err(Status::invalid_argument(format!("the image is for {}, not {want}", parsed.platform)));
        }
        let name = match name {
            "" => None,
            n => {
                let n = normalize_image_name(n);
                check_image_name(&n).map_err(Status::invalid_argument)?;
                Some(n)
            }
        };
        let total =
            parsed.layers.iter().fold(manifest.len() as u64 + config.len() as u64, |a, l| a.saturating_add(l.size));
        if total > MAX_IMAGE_BYTES {
            return Err(Status::invalid_argument(format!("the image holds more than {} GiB", MAX_IMAGE_BYTES >> 30)));
        }
        let digest = Digest::of(manifest);
        let config_media_type = serde_json::from_slice::<oci_spec::image::ImageManifest>(manifest)
            .map(|m| m.config().media_type().to_string())
            .map_err(|e| Status::invalid_argument(format!("manifest: {e}")))?;
        let record = ImageRecord {
            digest: digest.to_string(),
            manifest_size: manifest.len() as u64,
            platform: parsed.platform.to_string(),
            config: ImageBlob {
                digest: parsed.config_digest.to_string(),
                size: config.len() as u64,
                media_type: config_media_type,
                diff_id: String::new(),
            },
            layers: parsed
                .layers
                .iter()
                .map(|l| ImageBlob {
                    digest: l.digest.to_string(),
                    size: l.size,
                    media_type: l.media_type.clone(),
                    diff_id: l.diff_id.to_string(),
                })
                .collect(),
            holders: vec![self.0.me.clone()],
            created_at: now_unix(),
        };
        let mut ingest = Ingest {
            images: self,
            layers: parsed.layers,
            record,
            name,
            created: Vec::new(),
            budget: swarmd_image::layout::MAX_UNCOMPRESSED,
            done: false,
        };
        for (d, bytes) in [(&digest, manifest), (&parsed.config_digest, config)] {
            // A blob already here is fresh again: collection counts its grace from now.
            self.0.blobs.touch(d);
            if !self.0.blobs.has(d) {
                let blobs = &self.0.blobs;
                tokio::task::block_in_place(|| blobs.put(d, bytes)).map_err(store_status)?;
                ingest.created.push(d.clone());
            }
        }
        Ok(ingest)
    }

    /// `Control.LoadImage`: see the module doc. Returns the record and the
    /// name it was given.
    pub(crate) async fn load(
        &self,
        mut input: Streaming<LoadImageChunk>,
    ) -> Result<(ImageRecord, Option<String>), Status> {
        let _one = self.0.loading.acquire().await.map_err(internal)?;
        let _busy = Busy::new(&self.0.busy);
        let header = match next_message(&mut input).await? {
            Some(LoadImageChunk { part: Some(Part::Header(h)) }) => h,
            _ => return Err(Status::invalid_argument("an image load starts with its header (manifest and config)")),
        };
        let mut ingest = self.ingest(&header.manifest, &header.config, &header.name, &header.platform)?;
        let mut carry = Bytes::new();
        for l in ingest.layers.clone() {
            let mut w = ingest.layer(&l)?;
            while w.written() < l.size {
                if carry.is_empty() {
                    carry = match next_message(&mut input).await? {
                        Some(LoadImageChunk { part: Some(Part::Data(d)) }) => d,
                        Some(_) => return Err(Status::invalid_argument("a second header in one load")),
                        None => {
                            return Err(Status::invalid_argument(format!(
                                "layer {}: the stream ended after {} of its {} bytes",
                                l.digest,
                                w.written(),
                                l.size
                            )))
                        }
                    };
                }
                let take = carry.len().min(usize::try_from(l.size - w.written()).unwrap_or(usize::MAX));
                let chunk = carry.split_to(take);
                tokio::task::block_in_place(|| w.write_chunk(&chunk)).map_err(store_status)?;
            }
            ingest.finish_layer(&l, w).await?;
        }
        if !carry.is_empty() || next_message(&mut input).await?.is_some() {
            return Err(Status::invalid_argument("more bytes than the manifest's layers hold"));
        }
        ingest.record().await
    }

    /// `Control.PullImage`: the image `reference` names, from its registry
    /// (see [`crate::registry`]), checked and recorded as a load is.
    pub(crate) async fn pull(
        &self,
        reference: &str,
        platform: &str,
        name: &str,
    ) -> Result<(ImageRecord, Option<String>), Status> {
        let bad = |e: String| Status::invalid_argument(e);
        let unavailable = |e: String| Status::unavailable(format!("pull {reference}: {e}"));
        let r = crate::registry::Reference::parse(reference).map_err(bad)?;
        let want: Platform = if platform.is_empty() {
            Platform::default()
        } else {
            platform.parse().map_err(|e| Status::invalid_argument(format!("platform: {e}")))?
        };
        let _one = self.0.loading.acquire().await.map_err(internal)?;
        let _busy = Busy::new(&self.0.busy);
        let registry = crate::registry::Registry::new(r.clone()).map_err(unavailable)?;
        let asked = r.digest.clone().or(r.tag.clone()).unwrap_or_default();
        let (mut manifest, media_type) = registry.manifest(&asked).await.map_err(unavailable)?;
        if let Some(d) = &r.digest {
            let actual = Digest::of(&manifest);
            if actual.as_str() != d {
                return Err(Status::invalid_argument(format!("the registry's {d} hashes to {actual}")));
            }
        }
        let is_index = media_type.contains("index") || media_type.contains("list") || {
            serde_json::from_slice::<serde_json::Value>(&manifest).is_ok_and(|v| v.get("manifests").is_some())
        };
        if is_index {
            let index: oci_spec::image::ImageIndex =
                serde_json::from_slice(&manifest).map_err(|e| bad(format!("{reference}: index: {e}")))?;
            let pick = index
                .manifests()
                .iter()
                .find(|m| {
                    m.platform()
                        .as_ref()
                        .is_some_and(|p| p.os().to_string() == want.os && p.architecture().to_string() == want.arch)
                })
                .ok_or_else(|| bad(format!("{reference}: the index has no image for {want}")))?;
            let d = pick.digest().to_string();
            let (bytes, _) = registry.manifest(&d).await.map_err(unavailable)?;
            let actual = Digest::of(&bytes);
            if actual.as_str() != d || bytes.len() as u64 != pick.size() {
                return Err(bad(format!(
                    "{reference}: the registry's {d} is {} bytes hashing to {actual}",
                    bytes.len()
                )));
            }
            manifest = bytes;
        }
        let m: oci_spec::image::ImageManifest =
            serde_json::from_slice(&manifest).map_err(|e| bad(format!("{reference}: manifest: {e}")))?;
        let cd = m.config().digest().to_string();
        if m.config().size() > swarmd_image::layout::MAX_DOCUMENT {
            return Err(bad(format!("{reference}: a config larger than 4 MiB")));
        }
        let body = registry.blob(&cd).await.map_err(unavailable)?;
        let config =
            crate::registry::read_document(body.body, crate::registry::MAX_DOCUMENT).await.map_err(unavailable)?;
        let name = if name.is_empty() { r.name().unwrap_or_default() } else { name.to_owned() };
        let mut ingest = self.ingest(&manifest, &config, &name, platform)?;
        for l in ingest.layers.clone() {
            let mut w = ingest.layer(&l)?;
            let mut answer = registry.blob(l.digest.as_str()).await.map_err(unavailable)?;
            // At least 256 KiB/s on average: a registry that trickles cannot
            // hold the one load slot for long.
            let deadline = Duration::from_secs(60) + Duration::from_secs(l.size / (256 << 10));
            let download = async {
                while let Some(chunk) = crate::registry::next_chunk(&mut answer.body).await.map_err(unavailable)? {
                    tokio::task::block_in_place(|| w.write_chunk(&chunk)).map_err(store_status)?;
                }
                Ok::<_, Status>(())
            };
            tokio::time::timeout(deadline, download)
                .await
                .map_err(|_| unavailable(format!("layer {}: slower than 256 KiB/s", l.digest)))??;
            ingest.finish_layer(&l, w).await?;
        }
        ingest.record().await
    }

    /// Removes blobs in `digests` that no record names.
    fn forget_unreferenced(&self, digests: &[Digest]) {
        let Some(named) = self.named_blobs() else { return };
        for d in digests.iter().filter(|d| !named.contains(d.as_str())) {
            let _ = self.0.blobs.remove(d);
        }
    }

    /// Every blob a record names; `None` if the records cannot be read
    /// (then nothing is collected).
    fn named_blobs(&self) -> Option<HashSet<String>> {
        let images = self.0.store.view().images().ok()?;
        Some(images.iter().flat_map(|i| i.blobs().into_iter().map(str::to_owned)).collect())
    }

    /// Asks every other manager that is a raft member to hold `record`'s
    /// blobs; returns those that do.
    async fn replicate(&self, record: &ImageRecord) -> Vec<NodeId> {
        let view = self.0.store.view();
        let Ok(Some(mine)) = view.node(&self.0.me) else { return Vec::new() };
        let others: Vec<_> = view
            .managers()
            .unwrap_or_default()
            .into_iter()
            .filter(|m| m.raft_id.is_some() && m.id != self.0.me)
            .collect();
        let encoded = bincode::serialize(record).expect("an image record encodes");
        let asks = others.into_iter().map(|m| {
            let req = HoldImageRequest { source: mine.addr.clone(), record: encoded.clone() };
            let mut client = ClusterClient::new(self.0.peers.channel(&m.addr));
            async move {
                // Long enough for the image's bytes at a slow disk's pace.
                let limit = Duration::from_secs(60) + Duration::from_millis(record.size() / (1 << 10));
                match tokio::time::timeout(limit, client.hold_image(req)).await {
                    Ok(Ok(_)) => Some(m.id),
                    Ok(Err(s)) => {
                        tracing::warn!(manager = %m.id, error = %s.message(), "a manager could not hold the image");
                        None
                    }
                    Err(_) => {
                        tracing::warn!(manager = %m.id, "a manager took too long to hold the image");
                        None
                    }
                }
            }
        });
        futures::future::join_all(asks).await.into_iter().flatten().collect()
    }

    /// `Cluster.HoldImage`: fetches what this manager lacks of `record`
    /// from `source`.
    pub(crate) async fn hold(&self, source: &str, record: &[u8]) -> Result<(), Status> {
        let _busy = Busy::new(&self.0.busy);
        let record: ImageRecord =
            bincode::deserialize(record).map_err(|e| Status::invalid_argument(format!("image record: {e}")))?;
        for (d, size) in blob_sizes(&record)? {
            self.fetch_from(source, &d, size).await?;
        }
        Ok(())
    }

    /// Fetches blob `d` (`size` bytes) from the manager at `addr` into the
    /// store, unless it is there.
    async fn fetch_from(&self, addr: &str, d: &Digest, size: u64) -> Result<(), Status> {
        if self.0.blobs.has(d) {
            // Fresh again: garbage collection counts its grace from now.
            self.0.blobs.touch(d);
            return Ok(());
        }
        let mut client = ClusterClient::new(self.0.peers.channel(addr));
        let stream = tokio::time::timeout(CHUNK_TIMEOUT, client.fetch_blob(FetchBlobRequest { digest: d.to_string() }))
            .await
            .map_err(|_| Status::deadline_exceeded(format!("blob {d}: {addr} did not answer")))??;
        let mut stream = stream.into_inner();
        let mut w = self.0.blobs.writer(d, size).map_err(store_status)?;
        loop {
            let next = tokio::time::timeout(CHUNK_TIMEOUT, stream.message())
                .await
                .map_err(|_| Status::deadline_exceeded(format!("blob {d}: {addr} stopped sending")))??;
            let Some(chunk) = next else { break };
            tokio::task::block_in_place(|| w.write_chunk(&chunk.data)).map_err(store_status)?;
        }
        tokio::task::block_in_place(|| w.commit()).map_err(store_status)
    }

    /// Fetches blob `d` from any manager holding `record`, unless it is here.
    async fn fetch_from_holders(&self, record: &ImageRecord, d: &Digest, size: u64) -> Result<(), Status> {
        if self.0.blobs.has(d) {
            return Ok(());
        }
        let view = self.0.store.view();
        let mut last = Status::unavailable(format!("no manager holding image {} answers", record.digest));
        for h in record.holders.iter().filter(|h| **h != self.0.me) {
            let Ok(Some(n)) = view.node(h) else { continue };
            let _busy = Busy::new(&self.0.busy);
            match self.fetch_from(&n.addr, d, size).await {
                Ok(()) => return Ok(()),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// Streams blob `d` to a manager.
    pub(crate) async fn serve(&self, d: &Digest) -> Result<BlobStream, Status> {
        self.stream(d, self.0.serving_managers.clone(), None).await
    }

    /// Streams blob `d` from this manager's store, in a slot of `pool` (and
    /// of `node`'s own allowance): a stream whose reader stops taking chunks
    /// for [`STALL`] is dropped, and one that finds no slot within it is
    /// refused.
    async fn stream(&self, d: &Digest, pool: Arc<Semaphore>, node: Option<&NodeId>) -> Result<BlobStream, Status> {
        let slot = match node {
            Some(n) => Some(NodeSlot::take(&self.0.per_node, n)?),
            None => None,
        };
        let permit = tokio::time::timeout(STALL, pool.acquire_owned())
            .await
            .map_err(|_| Status::resource_exhausted("this manager is serving as many blobs as it can: retry"))?
            .map_err(internal)?;
        let file = match self.0.blobs.open_blob(d) {
            Ok(f) => f,
            Err(StoreError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                return Err(Status::not_found(format!("blob {d} is not on this manager")))
            }
            Err(e) => return Err(internal(e)),
        };
        let (tx, rx) = mpsc::channel(4);
        let handle = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || {
            use std::io::Read;
            let mut file = file;
            // A reader that takes nothing for STALL loses its stream (and the slot).
            let send = |item| handle.block_on(async { tokio::time::timeout(STALL, tx.send(item)).await });
            loop {
                let mut buf = vec![0u8; CHUNK];
                match file.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        buf.truncate(n);
                        if !matches!(send(Ok(Bytes::from(buf))), Ok(Ok(()))) {
                            break;
                        }
                    }
                    Err(e) => {
                        let _ = send(Err(Status::internal(e.to_string())));
                        break;
                    }
                }
            }
        });
        Ok(BlobStream { chunks: ReceiverStream::new(rx), _permit: permit, _slot: slot })
    }

    /// `Dispatcher.FetchBlob` for `node`: see [`authorize_task_blob`].
    pub(crate) async fn serve_task_blob(&self, node: &NodeId, task: &str, digest: &str) -> Result<BlobStream, Status> {
        let d = parse_digest(digest)?;
        let task_id: TaskId = task.parse().map_err(crate::status::bad_id)?;
        let view = self.0.store.view();
        let t = view.task(&task_id).map_err(internal)?;
        let image = match t.as_ref().and_then(|t| pinned_digest(&t.spec.image)) {
            Some(i) => view.image(i).map_err(internal)?,
            None => None,
        };
        if !authorize_task_blob(t.as_ref(), node, image.as_ref(), d.as_str()) {
            tracing::warn!(node.id = %node, task.id = %task_id, blob = %d, "blob refused to a node");
            return Err(Status::permission_denied(format!(
                "blob {d} is not part of the image of a live task of node {node}"
            )));
        }
        let image = image.expect("authorized");
        // Content trust: the image must be vouched for now (a key removed
        // since the task was placed stops its blobs).
        if view.content_trust_required().map_err(internal)? {
            let pinned = t.as_ref().map(|t| t.spec.image.clone()).unwrap_or_default();
            if let Err(why) = view.trust_verdict(&pinned).map_err(internal)? {
                tracing::warn!(node.id = %node, task.id = %task_id, image = %image.digest, "image refused: content trust");
                return Err(Status::permission_denied(format!("content trust: {why}")));
            }
        }
        let size = blob_sizes(&image)?.into_iter().find(|(b, _)| *b == d).map(|(_, s)| s).unwrap_or(0);
        self.fetch_from_holders(&image, &d, size).await?;
        self.stream(&d, self.0.serving.clone(), Some(node)).await
    }

    /// Catch-up and garbage collection, until `stop`.
    pub(crate) async fn run(self, stop: CancellationToken) {
        loop {
            self.catch_up().await;
            self.collect_garbage();
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(CATCH_UP_EVERY) => {}
            }
        }
    }

    async fn catch_up(&self) {
        let view = self.0.store.view();
        let member = view.node(&self.0.me).ok().flatten().is_some_and(|n| n.raft_id.is_some());
        if !member {
            return;
        }
        for record in view.images().unwrap_or_default() {
            let Ok(blobs) = blob_sizes(&record) else { continue };
            let mut complete = true;
            for (d, size) in &blobs {
                if let Err(e) = self.fetch_from_holders(&record, d, *size).await {
                    tracing::warn!(image = %record.digest, blob = %d, error = %e.message(), "cannot fetch an image's blob yet");
                    complete = false;
                    break;
                }
            }
            if complete && !record.holders.contains(&self.0.me) {
                let cmd = Command::ImageHeld { digest: record.digest.clone(), node: self.0.me.clone() };
                match self.0.store.propose(cmd).await {
                    Ok(()) => tracing::info!(image = %record.digest, "this manager now holds the image"),
                    Err(e) => {
                        tracing::debug!(image = %record.digest, error = %e, "cannot record holding the image yet")
                    }
                }
            }
        }
    }

    fn collect_garbage(&self) {
        if self.0.busy.load(Ordering::SeqCst) > 0 {
            return;
        }
        let Some(named) = self.named_blobs() else { return };
        for d in self.0.blobs.list().unwrap_or_default() {
            if named.contains(d.as_str()) {
                continue;
            }
            if self.0.blobs.age(&d).is_some_and(|a| a >= GC_GRACE) {
                match self.0.blobs.remove(&d) {
                    Ok(()) => tracing::info!(blob = %d, "unused blob removed"),
                    Err(e) => tracing::warn!(blob = %d, error = %e, "cannot remove an unused blob"),
                }
            }
        }
    }
}

/// An image coming in (loaded or pulled): what it wrote so far, removed
/// again unless it ends in a record.
struct Ingest<'a> {
    images: &'a Images,
    layers: Vec<swarmd_image::Layer>,
    record: ImageRecord,
    name: Option<String>,
    created: Vec<Digest>,
    budget: u64,
    done: bool,
}

impl Ingest<'_> {
    /// A writer for layer `l`.
    fn layer(&mut self, l: &swarmd_image::Layer) -> Result<swarmd_image::BlobWriter, Status> {
        self.images.0.blobs.writer(&l.digest, l.size).map_err(store_status)
    }

    /// Commits layer `l` (its sha256 and size) and checks its DiffID on
    /// what was stored.
    async fn finish_layer(&mut self, l: &swarmd_image::Layer, w: swarmd_image::BlobWriter) -> Result<(), Status> {
        let existed = self.images.0.blobs.has(&l.digest);
        tokio::task::block_in_place(|| w.commit()).map_err(store_status)?;
        if existed {
            self.images.0.blobs.touch(&l.digest);
        } else {
            self.created.push(l.digest.clone());
        }
        let (blobs, layer, budget) = (self.images.0.blobs.clone(), l.clone(), self.budget);
        let used = tokio::task::spawn_blocking(move || {
            let compression = swarmd_image::Compression::of_media_type(&layer.media_type)
                .ok_or_else(|| format!("layer {}: media type {:?}", layer.digest, layer.media_type))?;
            let f = blobs.open_blob(&layer.digest).map_err(|e| e.to_string())?;
            swarmd_image::layout::verify_layer(
                std::io::BufReader::new(f),
                &layer.digest,
                layer.size,
                compression,
                &layer.diff_id,
                budget,
            )
            .map_err(|e| e.to_string())
        })
        .await
        .map_err(internal)?
        .map_err(Status::invalid_argument)?;
        self.budget -= used;
        Ok(())
    }

    /// Has a majority of managers hold the image, then records it.
    async fn record(mut self) -> Result<(ImageRecord, Option<String>), Status> {
        let mut record = self.record.clone();
        record.holders.extend(self.images.replicate(&record).await);
        tracing::info!(image = %record.digest, holders = record.holders.len(), "image loaded");
        let name = self.name.clone();
        self.images.0.store.propose(Command::PutImage { image: Box::new(record.clone()), name: name.clone() }).await?;
        self.done = true;
        Ok((record, name))
    }
}

impl Drop for Ingest<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.images.forget_unreferenced(&self.created);
        }
    }
}

/// The next message of a load, or DEADLINE_EXCEEDED after [`CHUNK_TIMEOUT`]
/// of silence (a stalled client must not hold the one load slot).
async fn next_message(input: &mut Streaming<LoadImageChunk>) -> Result<Option<LoadImageChunk>, Status> {
    tokio::time::timeout(CHUNK_TIMEOUT, input.message())
        .await
        .map_err(|_| Status::deadline_exceeded("the image load stalled: nothing for 30 s"))?
}

/// Every blob of `record` with its size: manifest, config, layers.
fn blob_sizes(record: &ImageRecord) -> Result<Vec<(Digest, u64)>, Status> {
    let mut out = vec![
        (parse_digest(&record.digest)?, record.manifest_size),
        (parse_digest(&record.config.digest)?, record.config.size),
    ];
    for l in &record.layers {
        out.push((parse_digest(&l.digest)?, l.size));
    }
    Ok(out)
}
