//! swarmd's images: OCI image layouts read and verified by digest, and
//! layers applied onto a root filesystem as the hostile input they are.
//!
//! Nothing here talks to the network; the callers (secretctl, the managers'
//! blob store, the workers' rootfs cache) bring the bytes.

pub mod build;
pub mod cache;
pub mod digest;
pub mod layout;
pub mod store;
pub mod trust;
pub mod unpack;

pub use build::build_layout;
pub use cache::{chain_id, CacheError, LayerRef, Rootfs, RootfsCache};
pub use digest::Digest;
pub use layout::{load, parse, Compression, Image, Layer, LayoutError, Parsed, Platform, Source};
pub use store::{BlobStore, BlobWriter, StoreError};
pub use unpack::{apply_layer, Budget, LayerStats, Owners, UnpackError};
