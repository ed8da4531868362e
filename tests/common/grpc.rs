//! Calling any RPC by its path with raw protobuf bytes, and listing every RPC
//! of a service from the generated file-descriptor set, so that a test can
//! sweep a whole service instead of sampling it.

use bytes::{Buf, BufMut};
use prost::Message;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::Channel;
use tonic::Status;

/// A codec that passes message bytes through untouched.
#[derive(Clone, Copy, Debug, Default)]
pub struct Raw;

impl Encoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining()).to_vec()))
    }
}

impl Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

/// Calls unary RPC `path` (`/package.Service/Method`) with `body` as its request.
pub async fn call(ch: Channel, path: &str, body: Vec<u8>) -> Result<Vec<u8>, Status> {
    let mut g = tonic::client::Grpc::new(ch);
    g.ready().await.map_err(|e| Status::unavailable(e.to_string()))?;
    let path = http::uri::PathAndQuery::try_from(path.to_owned()).expect("RPC path");
    g.unary(tonic::Request::new(body), path, Raw).await.map(|r| r.into_inner())
}

/// Every method of `service` (e.g. `swarmd.control.Control`), as RPC paths.
pub fn methods(service: &str) -> Vec<String> {
    let fds = prost_types::FileDescriptorSet::decode(swarmd_proto::FILE_DESCRIPTOR_SET).expect("descriptor set");
    let mut out = Vec::new();
    for f in &fds.file {
        for s in &f.service {
            if format!("{}.{}", f.package(), s.name()) == service {
                out.extend(s.method.iter().map(|m| format!("/{service}/{}", m.name())));
            }
        }
    }
    assert!(!out.is_empty(), "no service {service} in the descriptor set");
    out
}

/// Calls RPC `path` with a request whose body starts with `first` (one gRPC
/// message) and then never ends: only a server that answers before reading
/// the whole body (an authorization gate on the headers) answers at all.
pub async fn call_with_endless_body(ch: Channel, path: &str, first: Vec<u8>) -> Result<Vec<u8>, Status> {
    use futures::StreamExt;
    let mut g = tonic::client::Grpc::new(ch);
    g.ready().await.map_err(|e| Status::unavailable(e.to_string()))?;
    let path = http::uri::PathAndQuery::try_from(path.to_owned()).expect("RPC path");
    let body = futures::stream::once(async move { first }).chain(futures::stream::pending());
    g.client_streaming(tonic::Request::new(body), path, Raw).await.map(|r| r.into_inner())
}
