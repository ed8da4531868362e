//! `secretctl image load | ls | inspect | rm | build-rootfs`.
//!
//! `load` reads an OCI image layout (a directory, an OCI archive tar, or a
//! `docker save` tar), verifies every blob here first (sha256, size, DiffID),
//! then streams the manifest, the config and the layers to the manager, which
//! verifies them all again. `build-rootfs` makes a layout from a root
//! filesystem directory, without a registry or a container engine.

use std::io::Read;
use std::path::PathBuf;

use clap::Subcommand;
use serde::Serialize;
use swarmd_proto::control::load_image_chunk::Part;
use swarmd_proto::control::{GetImageRequest, Image, ListImagesRequest, LoadImageChunk, LoadImageHeader};
use tonic::transport::Channel;

use super::client::explain;
use super::output::{json, table, timestamp};
use super::Format;

#[derive(Subcommand, Debug)]
pub(super) enum ImageCmd {
    /// Load an image into the cluster from an OCI image layout directory, an
    /// OCI archive tar or a `docker save` tar; prints its digest.
    Load {
        /// The layout or archive.
        source: PathBuf,
        /// REPO[:TAG] to give it (default: the name the layout gives it, if any).
        #[arg(long)]
        name: Option<String>,
        /// OS/ARCH[/VARIANT] to pick from a multi-platform image.
        #[arg(long, default_value = "linux/amd64")]
        platform: String,
    },
    /// Have a manager pull an image from its registry (anonymous; plain
    /// HTTP only for a loopback registry); prints its digest.
    Pull {
        /// HOST[:PORT]/REPOSITORY[:TAG][@sha256:…]
        reference: String,
        /// REPO[:TAG] to give it (default: the reference without its digest).
        #[arg(long)]
        name: Option<String>,
        /// OS/ARCH to pick from a multi-platform image.
        #[arg(long, default_value = "linux/amd64")]
        platform: String,
    },
    /// List the cluster's images.
    Ls {
        /// Only digests.
        #[arg(short, long)]
        quiet: bool,
    },
    /// Show images: NAME[:TAG], NAME@sha256:… or sha256:….
    Inspect {
        #[arg(required = true)]
        images: Vec<String>,
    },
    /// Remove images (refused while a service uses one).
    Rm {
        #[arg(required = true)]
        images: Vec<String>,
    },
    /// Sign an image with a P-256 private key (PKCS#8 PEM, as `openssl
    /// genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256` writes): a
    /// cosign simple signing payload for its digest, kept by the cluster.
    Sign {
        /// NAME[:TAG], NAME@sha256:… or sha256:….
        image: String,
        #[arg(long, value_name = "KEY.pem")]
        key: PathBuf,
        /// The repository the signature vouches for (default: the image's
        /// name without its tag).
        #[arg(long)]
        repository: Option<String>,
    },
    /// Write an OCI image layout of DIR (one gzip layer, linux/amd64) into
    /// --out (created, or a layout to add to) named --name; prints the
    /// manifest digest. Files, directories and symlinks are taken with their
    /// modes, owners and times; anything else is refused. Needs no manager.
    BuildRootfs {
        /// The root filesystem.
        dir: PathBuf,
        /// The layout directory to write.
        #[arg(long, value_name = "LAYOUT")]
        out: PathBuf,
        /// The image's name in the layout (org.opencontainers.image.ref.name), e.g. app:1.
        #[arg(long)]
        name: String,
    },
}

impl ImageCmd {
    /// Whether the command needs no manager.
    pub(super) fn is_offline(&self) -> bool {
        matches!(self, ImageCmd::BuildRootfs { .. })
    }
}

pub(super) fn run_offline(cmd: ImageCmd) -> anyhow::Result<()> {
    match cmd {
        ImageCmd::BuildRootfs { dir, out, name } => {
            if !dir.is_dir() {
                anyhow::bail!("{}: not a directory", dir.display());
            }
            if name.is_empty() || name.len() > 255 || name.chars().any(|c| c.is_whitespace() || c.is_control()) {
                anyhow::bail!("--name {name:?}: a name such as app:1 (no spaces, at most 255 bytes)");
            }
            let digest = swarmd_image::build_layout(&dir, &out, &name)
                .map_err(|e| anyhow::anyhow!("{} → {}: {e}", dir.display(), out.display()))?;
            println!("{digest}");
            Ok(())
        }
        _ => unreachable!("needs a manager"),
    }
}

#[derive(Serialize)]
struct ImageView {
    digest: String,
    names: Vec<String>,
    platform: String,
    size: u64,
    created_at: String,
    config_digest: String,
    layers: Vec<LayerView>,
    holders: Vec<String>,
    services: Vec<String>,
    signatures: Vec<SignatureView>,
    untrusted_signatures: u32,
}

#[derive(Serialize)]
struct SignatureView {
    key: String,
    repository: String,
}

#[derive(Serialize)]
struct LayerView {
    digest: String,
    size: u64,
    media_type: String,
    diff_id: String,
}

impl From<Image> for ImageView {
    fn from(i: Image) -> Self {
        Self {
            created_at: timestamp(i.created_at),
            digest: i.digest,
            names: i.names,
            platform: i.platform,
            size: i.size,
            config_digest: i.config_digest,
            layers: i
                .layers
                .into_iter()
                .map(|l| LayerView { digest: l.digest, size: l.size, media_type: l.media_type, diff_id: l.diff_id })
                .collect(),
            holders: i.holders,
            services: i.services,
            signatures: i
                .signatures
                .into_iter()
                .map(|s| SignatureView { key: s.key, repository: s.repository })
                .collect(),
            untrusted_signatures: i.untrusted_signatures,
        }
    }
}

/// Bytes in a human unit.
fn size_text(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.1} GiB", n as f64 / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}

/// Reads and verifies the image at `source`, then streams it: header first,
/// then each layer's bytes in order.
fn load_stream(
    source: PathBuf,
    name: Option<String>,
    platform: String,
) -> anyhow::Result<(swarmd_image::Image, Signatures, tokio::sync::mpsc::Receiver<LoadImageChunk>)> {
    let want: swarmd_image::Platform = platform.parse().map_err(|e| anyhow::anyhow!("--platform {platform:?}: {e}"))?;
    let src = swarmd_image::Source::open(&source).map_err(|e| anyhow::anyhow!("{}: {e}", source.display()))?;
    // Verified here first: a broken or tampered layout fails before a byte is sent.
    let image = swarmd_image::load(&src, &want, None).map_err(|e| anyhow::anyhow!("{}: {e}", source.display()))?;
    let signatures = swarmd_image::layout::cosign_signatures(&src, &image.digest)
        .map_err(|e| anyhow::anyhow!("{}: cosign signatures: {e}", source.display()))?;
    let name = name.or_else(|| image.name.clone()).unwrap_or_default();
    let header = LoadImageHeader {
        manifest: image.manifest.clone(),
        config: image.config.clone(),
        name,
        platform: image.platform.to_string(),
    };
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let layers: Vec<_> = image.layers.iter().map(|l| (image.blob_file(&l.digest), l.size)).collect();
    std::thread::spawn(move || {
        if tx.blocking_send(LoadImageChunk { part: Some(Part::Header(header)) }).is_err() {
            return;
        }
        for (path, size) in layers {
            let Ok((mut r, _)) = src.file(&path) else { return };
            let mut left = size;
            while left > 0 {
                let mut buf = vec![0u8; (1usize << 20).min(left as usize)];
                match r.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        buf.truncate(n);
                        left -= n as u64;
                        if tx.blocking_send(LoadImageChunk { part: Some(Part::Data(buf.into())) }).is_err() {
                            return;
                        }
                    }
                }
            }
        }
    });
    Ok((image, signatures, rx))
}

/// Cosign signatures found beside an image: payload and base64 signature.
type Signatures = Vec<(Vec<u8>, String)>;

pub(super) async fn run(channel: Channel, cmd: ImageCmd, format: Format) -> anyhow::Result<()> {
    let mut client = super::client::control(channel);
    match cmd {
        ImageCmd::Load { source, name, platform } => {
            let (image, signatures, rx) =
                tokio::task::spawn_blocking(move || load_stream(source, name, platform)).await??;
            let r =
                client.load_image(tokio_stream::wrappers::ReceiverStream::new(rx)).await.map_err(explain)?.into_inner();
            if r.digest != image.digest.as_str() {
                anyhow::bail!("the manager recorded {}, not {}", r.digest, image.digest);
            }
            println!("{}", r.digest);
            // Cosign signatures stored in the layout go with it (kept only if
            // a trusted key verifies them; the load stands either way).
            for (payload, b64) in signatures {
                use base64::Engine;
                let Ok(signature) = base64::engine::general_purpose::STANDARD.decode(b64.trim()) else {
                    eprintln!("warning: a cosign signature in the layout is not base64: not imported");
                    continue;
                };
                let req =
                    swarmd_proto::control::AddImageSignatureRequest { reference: r.digest.clone(), payload, signature };
                match client.add_image_signature(req).await {
                    Ok(_) => eprintln!("imported a cosign signature of {}", r.digest),
                    Err(e) => eprintln!("warning: cosign signature not imported: {}", explain(e)),
                }
            }
        }
        ImageCmd::Pull { reference, name, platform } => {
            let req = swarmd_proto::control::PullImageRequest { reference, platform, name: name.unwrap_or_default() };
            let i = client.pull_image(req).await.map_err(explain)?.into_inner();
            println!("{}", i.digest);
        }
        ImageCmd::Ls { quiet } => {
            let images = client.list_images(ListImagesRequest {}).await.map_err(explain)?.into_inner().images;
            if quiet {
                for i in &images {
                    println!("{}", i.digest);
                }
            } else if format == Format::Json {
                json(&images.into_iter().map(ImageView::from).collect::<Vec<_>>())?;
            } else {
                let rows: Vec<Vec<String>> = images
                    .iter()
                    .map(|i| {
                        vec![
                            i.digest.clone(),
                            i.names.join(","),
                            i.platform.clone(),
                            size_text(i.size),
                            format!("{}", i.holders.len()),
                            timestamp(i.created_at),
                        ]
                    })
                    .collect();
                table(&["DIGEST", "NAMES", "PLATFORM", "SIZE", "MANAGERS", "CREATED"], &rows);
            }
        }
        ImageCmd::Inspect { images } => {
            let mut out = Vec::new();
            for reference in images {
                let i = client.get_image(GetImageRequest { reference }).await.map_err(explain)?.into_inner();
                out.push(ImageView::from(i));
            }
            if format == Format::Json {
                if out.len() == 1 {
                    json(&out[0])?;
                } else {
                    json(&out)?;
                }
            } else {
                for i in out {
                    let mut rows = vec![
                        vec!["Digest".into(), i.digest.clone()],
                        vec!["Names".into(), i.names.join(" ")],
                        vec!["Platform".into(), i.platform.clone()],
                        vec!["Size".into(), size_text(i.size)],
                        vec!["Created".into(), i.created_at.clone()],
                        vec!["Config".into(), i.config_digest.clone()],
                        vec!["Held by".into(), i.holders.join(" ")],
                        vec!["Services".into(), i.services.join(" ")],
                        vec![
                            "Signed by".into(),
                            i.signatures
                                .iter()
                                .map(|s| format!("{} ({})", s.key, s.repository))
                                .collect::<Vec<_>>()
                                .join(" "),
                        ],
                    ];
                    for (n, l) in i.layers.iter().enumerate() {
                        rows.push(vec![format!("Layer {n}"), format!("{} ({})", l.digest, size_text(l.size))]);
                    }
                    table(&["FIELD", "VALUE"], &rows);
                }
            }
        }
        ImageCmd::Rm { images } => {
            let mut failed = 0;
            for reference in images {
                match client.remove_image(GetImageRequest { reference: reference.clone() }).await {
                    Ok(r) => println!("{}", r.into_inner().digest),
                    Err(e) => {
                        eprintln!("error: {reference}: {}", explain(e));
                        failed += 1;
                    }
                }
            }
            if failed > 0 {
                anyhow::bail!("{failed} image(s) not removed");
            }
        }
        ImageCmd::Sign { image, key, repository } => {
            let i = client.get_image(GetImageRequest { reference: image.clone() }).await.map_err(explain)?.into_inner();
            let repository = match repository {
                Some(r) => r,
                None if !image.starts_with("sha256:") => swarmd_image::trust::repository_of(&image).to_owned(),
                None => match i.names.first() {
                    Some(n) => swarmd_image::trust::repository_of(n).to_owned(),
                    None => anyhow::bail!("{image} has no name: give --repository"),
                },
            };
            let digest: swarmd_image::Digest = i.digest.parse().map_err(|e| anyhow::anyhow!("{e}"))?;
            let pem = zeroize::Zeroizing::new(
                std::fs::read_to_string(&key).map_err(|e| anyhow::anyhow!("{}: {e}", key.display()))?,
            );
            let payload = swarmd_image::trust::payload(&digest, &repository);
            let (signature, _) =
                swarmd_image::trust::sign(&pem, &payload).map_err(|e| anyhow::anyhow!("{}: {e}", key.display()))?;
            let req =
                swarmd_proto::control::AddImageSignatureRequest { reference: i.digest.clone(), payload, signature };
            client.add_image_signature(req).await.map_err(explain)?;
            println!("{} signed as {repository}", i.digest);
        }
        ImageCmd::BuildRootfs { .. } => unreachable!("offline"),
    }
    Ok(())
}
