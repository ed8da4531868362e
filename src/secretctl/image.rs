//! `secretctl image build-rootfs`: an OCI image layout from a root
//! filesystem directory, made here without a registry or a container engine.

use std::path::PathBuf;

use clap::Subcommand;

#[derive(Subcommand, Debug)]
pub(super) enum ImageCmd {
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
    }
}
