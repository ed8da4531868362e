//! swarmd's images: OCI image layouts read and verified by digest, and
//! layers applied onto a root filesystem as the hostile input they are.
//!
//! Nothing here talks to the network; the callers (secretctl, the managers'
//! blob store, the workers' rootfs cache) bring the bytes.

pub mod unpack;

pub use unpack::{apply_layer, Budget, LayerStats, Owners, UnpackError};
