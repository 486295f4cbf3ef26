//! The entry node's side of one forwarded request after it was sent: the
//! peer's "started" signal (for a request queued at several nodes), its
//! response head, then the body frames and trailer.

use std::time::{Duration, Instant};

use futures::StreamExt;
use llmesh_proto::ResponseHead;
use llmesh_proto::frame::{Frame, FrameCodec};
use tokio_util::codec::{FramedRead, FramedWrite};

use super::{Forwarded, InFlight};
use crate::{InferenceRequest, InferenceResponse, ServeError, StreamError};

/// A request a peer has received and not yet answered. Dropping it
/// cancels the request there (and frees its place in the peer's queue).
pub struct Pending {
    node_id: String,
    writer: FramedWrite<quinn::SendStream, FrameCodec>,
    reader: FramedRead<quinn::RecvStream, FrameCodec>,
    /// Keeps the connection open until the response ends.
    in_flight: InFlight,
    /// The head, when it came while waiting for the start.
    head: Option<ResponseHead>,
    head_timeout: Duration,
    deadline: Option<Instant>,
    queue_until: Option<Instant>,
}

impl Pending {
    pub(super) fn new(
        node_id: &str,
        (writer, reader, in_flight): (
            FramedWrite<quinn::SendStream, FrameCodec>,
            FramedRead<quinn::RecvStream, FrameCodec>,
            InFlight,
        ),
        req: &InferenceRequest,
        head_timeout: Duration,
    ) -> Pending {
        Pending {
            node_id: node_id.to_string(),
            writer,
            reader,
            in_flight,
            head: None,
            head_timeout,
            deadline: req.deadline,
            queue_until: req.queue_until,
        }
    }

    /// The peer the request went to.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// How long the next frame may take: the wait for a slot the request
    /// may have there, plus the backend's head timeout, within the
    /// request's deadline.
    fn budget(&self) -> Duration {
        let queue = self.queue_until.map_or(Duration::ZERO, |q| q.saturating_duration_since(Instant::now()));
        let allowed = self.head_timeout + queue;
        self.deadline.map_or(allowed, |d| d.saturating_duration_since(Instant::now()).min(allowed))
    }

    async fn next_frame(&mut self) -> Result<Frame, ServeError> {
        let budget = self.budget();
        let node_id = &self.node_id;
        match tokio::time::timeout(budget, self.reader.next()).await {
            Err(_) => Err(ServeError::Timeout(format!("node {node_id} sent no response within {budget:?}"))),
            Ok(None) => Err(ServeError::BackendUnreachable("peer closed the stream before answering".into())),
            Ok(Some(Err(e))) => Err(ServeError::BackendUnreachable(format!("peer stream failed: {e}"))),
            Ok(Some(Ok(frame))) => Ok(frame),
        }
    }

    /// Waits until the peer gave the request a slot: its started signal,
    /// or its response head (a peer that does not send the signal). An
    /// error head (refused, its queue timed out) is the error.
    pub async fn started(&mut self) -> Result<(), ServeError> {
        if self.head.is_some() {
            return Ok(());
        }
        match self.next_frame().await? {
            Frame::Started => Ok(()),
            Frame::ResponseHead(head) => {
                if !head.error_code.is_empty() {
                    return Err(ServeError::from_code(&head.error_code, head.error_message));
                }
                self.head = Some(head);
                Ok(())
            }
            other => {
                Err(ServeError::BackendUnreachable(format!("protocol error: expected a response head, got {other:?}")))
            }
        }
    }

    /// The response, once its head arrives.
    pub async fn response(mut self) -> Result<Forwarded, ServeError> {
        let head = match self.head.take() {
            Some(head) => head,
            None => loop {
                match self.next_frame().await? {
                    Frame::Started => continue,
                    Frame::ResponseHead(head) => break head,
                    other => {
                        return Err(ServeError::BackendUnreachable(format!(
                            "protocol error: expected a response head, got {other:?}"
                        )));
                    }
                }
            },
        };
        if !head.error_code.is_empty() {
            return Err(ServeError::from_code(&head.error_code, head.error_message));
        }
        let Pending { writer, mut reader, in_flight, .. } = self;
        let body = async_stream::stream! {
            // Keep the send half until the response ends: dropping it early
            // is harmless after finish(), but this documents the pairing.
            let _writer = writer;
            let _in_flight = in_flight;
            loop {
                match reader.next().await {
                    Some(Ok(Frame::Body(bytes))) => yield Ok(bytes),
                    Some(Ok(Frame::Trailer(trailer))) => {
                        if !trailer.error.is_empty() {
                            yield Err(StreamError::Remote(trailer.error));
                        }
                        return;
                    }
                    Some(Ok(other)) => {
                        yield Err(StreamError::Peer(format!("protocol error: unexpected {other:?} in a response body")));
                        return;
                    }
                    Some(Err(e)) => {
                        yield Err(StreamError::Peer(format!("peer stream broke: {e}")));
                        return;
                    }
                    None => {
                        yield Err(StreamError::Peer("peer closed the stream before the response ended".to_string()));
                        return;
                    }
                }
            }
        };
        let response =
            InferenceResponse { status: head.status as u16, content_type: head.content_type, body: Box::pin(body) };
        Ok(Forwarded { response, node: head.node })
    }
}
