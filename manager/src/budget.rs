//! The bytes of request bodies a manager holds before it has decoded them
//! (invariant 12).
//!
//! tonic buffers a request's whole message before the handler runs, so a
//! client that declares a large message and sends all of it but the last byte
//! makes the manager hold it for as long as it likes — once per stream, per
//! connection, per identity. Every byte read from the body of a request from a
//! worker or an anonymous client is counted against its connection's budget
//! and against a budget shared by all such connections; past either, the
//! request fails with RESOURCE_EXHAUSTED and its bytes are given back (so are
//! they when the request ends). Managers and administrators are not counted:
//! raft's messages are large and their certificates are trusted with more.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::body::Body;
use tonic::Status;

use crate::auth::ConnInfo;

/// A connection's share: bytes its requests may hold undecoded at once.
#[derive(Clone, Debug)]
pub struct ConnBudget(Arc<Semaphore>);

impl ConnBudget {
    /// A budget of `bytes`.
    pub fn new(bytes: usize) -> Self {
        Self(Arc::new(Semaphore::new(bytes)))
    }
}

/// Counts request bodies against their connection's [`ConnBudget`] (found in
/// the request's [`ConnInfo`]) and a budget shared by every connection of
/// this server.
#[derive(Clone, Debug)]
pub struct BudgetLayer {
    shared: Arc<Semaphore>,
}

impl BudgetLayer {
    /// A layer whose connections share `bytes`.
    pub fn new(bytes: usize) -> Self {
        Self { shared: Arc::new(Semaphore::new(bytes)) }
    }
}

impl<S> tower::Layer<S> for BudgetLayer {
    type Service = Budgeted<S>;
    fn layer(&self, inner: S) -> Budgeted<S> {
        Budgeted { inner, shared: self.shared.clone() }
    }
}

/// See [`BudgetLayer`].
#[derive(Clone, Debug)]
pub struct Budgeted<S> {
    inner: S,
    shared: Arc<Semaphore>,
}

impl<S> tower::Service<http::Request<Body>> for Budgeted<S>
where
    S: tower::Service<http::Request<Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let Some(conn) = req.extensions().get::<ConnInfo>().and_then(|i| i.budget.clone()) else {
            return self.inner.call(req);
        };
        let shared = self.shared.clone();
        self.inner.call(req.map(|inner| Body::new(Counted { inner, conn: conn.0, shared, held: None })))
    }
}

/// A request body whose bytes are held against two budgets until it is dropped.
struct Counted {
    inner: Body,
    conn: Arc<Semaphore>,
    shared: Arc<Semaphore>,
    held: Option<(OwnedSemaphorePermit, OwnedSemaphorePermit)>,
}

impl Counted {
    fn hold(&mut self, n: usize) -> Result<(), Status> {
        let n = u32::try_from(n).map_err(|_| Status::resource_exhausted("request frame too large"))?;
        let refused = || {
            Status::resource_exhausted(
                "this manager holds no more undecoded request bytes from this connection or from all nodes now; retry",
            )
        };
        let c = self.conn.clone().try_acquire_many_owned(n).map_err(|_| refused())?;
        let s = self.shared.clone().try_acquire_many_owned(n).map_err(|_| refused())?;
        match &mut self.held {
            Some((hc, hs)) => {
                hc.merge(c);
                hs.merge(s);
            }
            None => self.held = Some((c, s)),
        }
        Ok(())
    }
}

impl http_body::Body for Counted {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    if let Err(s) = this.hold(data.len()) {
                        // Give back at once what this request held.
                        this.held = None;
                        return Poll::Ready(Some(Err(s)));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn counted(conn: &ConnBudget, shared: &Arc<Semaphore>, chunks: Vec<&'static [u8]>) -> Counted {
        let stream =
            futures::stream::iter(chunks.into_iter().map(|c| Ok::<_, Status>(Frame::data(Bytes::from_static(c)))));
        Counted {
            inner: Body::new(http_body_util::StreamBody::new(stream)),
            conn: conn.0.clone(),
            shared: shared.clone(),
            held: None,
        }
    }

    #[tokio::test]
    async fn invariant_12_undecoded_request_bytes_are_bounded_per_connection_and_in_all() {
        let shared = Arc::new(Semaphore::new(100));
        let (a, b) = (ConnBudget::new(60), ConnBudget::new(60));
        // Within budget: held while the body lives, given back when it ends.
        let mut first = counted(&a, &shared, vec![&[0; 30], &[0; 30]]);
        while let Some(f) = first.frame().await {
            f.unwrap();
        }
        assert_eq!((a.0.available_permits(), shared.available_permits()), (0, 40));
        // Past the connection's budget: refused, and what it held given back.
        let mut over = counted(&b, &shared, vec![&[0; 30], &[0; 31]]);
        assert!(over.frame().await.unwrap().is_ok());
        let refused = over.frame().await.unwrap().unwrap_err();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert_eq!(b.0.available_permits(), 60);
        // Past the shared budget, whatever the connection's.
        let c = ConnBudget::new(1000);
        let mut big = counted(&c, &shared, vec![&[0; 41]]);
        assert_eq!(big.frame().await.unwrap().unwrap_err().code(), tonic::Code::ResourceExhausted);
        drop(first);
        assert_eq!((a.0.available_permits(), shared.available_permits()), (60, 100));
    }
}
