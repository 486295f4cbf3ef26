//! Framing of one forwarded request on a QUIC stream.
//!
//! Each frame is a 4-byte big-endian length, then a 1-byte frame type, then
//! the payload (protobuf for heads and trailers, raw bytes for bodies).
//! Length-delimiting is tokio-util's codec, with a hard maximum so a peer
//! cannot make a node buffer an arbitrary amount; the type byte and payload
//! checks are here, sans-IO, so they are tested without sockets.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::Message;
use tokio_util::codec::{Decoder, Encoder, LengthDelimitedCodec};

use crate::{RequestHead, ResponseHead, Trailer};

/// Largest frame accepted: body chunks are split below this.
pub const MAX_FRAME_BYTES: usize = 1024 * 1024;
/// Largest head or trailer accepted; they are small protobufs.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

const REQUEST_HEAD: u8 = 1;
const RESPONSE_HEAD: u8 = 2;
const BODY: u8 = 3;
const TRAILER: u8 = 4;
const STARTED: u8 = 5;

/// One frame of the data-plane protocol.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    /// Opens a request (client to server, first frame).
    RequestHead(RequestHead),
    /// Opens a response (server to client, first frame).
    ResponseHead(ResponseHead),
    /// Body bytes, as received or produced.
    Body(Bytes),
    /// Ends a response: usage, or the error that cut it short.
    Trailer(Trailer),
    /// A reserved request just took a slot on the serving node and runs
    /// (server to client, before the response head): the entry node
    /// cancels its other reservations.
    Started,
}

/// A frame that breaks the protocol.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// Reading or writing the stream failed.
    #[error("stream error: {0}")]
    Io(#[from] std::io::Error),
    /// The frame is larger than allowed.
    #[error("frame of {0} bytes exceeds the limit")]
    TooLarge(usize),
    /// An empty frame or an unknown type byte.
    #[error("unknown frame type {0}")]
    UnknownType(u8),
    /// A head or trailer that does not decode.
    #[error("malformed frame: {0}")]
    Malformed(String),
}

/// Encodes and decodes [`Frame`]s.
#[derive(Debug)]
pub struct FrameCodec {
    inner: LengthDelimitedCodec,
}

impl Default for FrameCodec {
    fn default() -> Self {
        FrameCodec { inner: LengthDelimitedCodec::builder().max_frame_length(MAX_FRAME_BYTES + 1).new_codec() }
    }
}

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        let frame = match self.inner.decode(src) {
            Ok(Some(frame)) => frame,
            Ok(None) => return Ok(None),
            Err(err) if err.kind() == std::io::ErrorKind::InvalidData => return Err(FrameError::TooLarge(src.len())),
            Err(err) => return Err(FrameError::Io(err)),
        };
        decode_payload(frame).map(Some)
    }
}

fn decode_payload(mut frame: BytesMut) -> Result<Frame, FrameError> {
    if frame.is_empty() {
        return Err(FrameError::UnknownType(0));
    }
    let kind = frame.get_u8();
    let payload = frame.freeze();
    let small = |payload: &Bytes| {
        if payload.len() > MAX_HEAD_BYTES { Err(FrameError::TooLarge(payload.len())) } else { Ok(()) }
    };
    let malformed = |e: prost::DecodeError| FrameError::Malformed(e.to_string());
    Ok(match kind {
        REQUEST_HEAD => {
            small(&payload)?;
            Frame::RequestHead(RequestHead::decode(payload).map_err(malformed)?)
        }
        RESPONSE_HEAD => {
            small(&payload)?;
            Frame::ResponseHead(ResponseHead::decode(payload).map_err(malformed)?)
        }
        BODY => Frame::Body(payload),
        TRAILER => {
            small(&payload)?;
            Frame::Trailer(Trailer::decode(payload).map_err(malformed)?)
        }
        STARTED if payload.is_empty() => Frame::Started,
        STARTED => return Err(FrameError::Malformed("a started frame carries nothing".into())),
        other => return Err(FrameError::UnknownType(other)),
    })
}

impl Encoder<Frame> for FrameCodec {
    type Error = FrameError;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), FrameError> {
        let mut payload = BytesMut::new();
        match frame {
            Frame::RequestHead(head) => {
                payload.put_u8(REQUEST_HEAD);
                head.encode(&mut payload).map_err(|e| FrameError::Malformed(e.to_string()))?;
            }
            Frame::ResponseHead(head) => {
                payload.put_u8(RESPONSE_HEAD);
                head.encode(&mut payload).map_err(|e| FrameError::Malformed(e.to_string()))?;
            }
            Frame::Body(bytes) => {
                if bytes.len() > MAX_FRAME_BYTES {
                    return Err(FrameError::TooLarge(bytes.len()));
                }
                payload.reserve(1 + bytes.len());
                payload.put_u8(BODY);
                payload.extend_from_slice(&bytes);
            }
            Frame::Trailer(trailer) => {
                payload.put_u8(TRAILER);
                trailer.encode(&mut payload).map_err(|e| FrameError::Malformed(e.to_string()))?;
            }
            Frame::Started => payload.put_u8(STARTED),
        }
        self.inner.encode(payload.freeze(), dst).map_err(FrameError::Io)
    }
}

/// Splits a body into frames no larger than [`MAX_FRAME_BYTES`].
pub fn body_frames(bytes: Bytes) -> impl Iterator<Item = Frame> {
    let mut rest = bytes;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let take = rest.len().min(MAX_FRAME_BYTES);
        Some(Frame::Body(rest.split_to(take)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ApiKind;
    use proptest::prelude::*;

    fn round_trip(frames: Vec<Frame>) -> Vec<Frame> {
        let mut codec = FrameCodec::default();
        let mut wire = BytesMut::new();
        for frame in frames {
            codec.encode(frame, &mut wire).expect("encodes");
        }
        let mut out = Vec::new();
        while let Some(frame) = codec.decode(&mut wire).expect("decodes") {
            out.push(frame);
        }
        assert!(wire.is_empty());
        out
    }

    #[test]
    fn every_frame_kind_round_trips() {
        let frames = vec![
            Frame::RequestHead(RequestHead {
                request_id: "r".into(),
                api: ApiKind::OpenaiChat as i32,
                ..Default::default()
            }),
            Frame::ResponseHead(ResponseHead {
                status: 200,
                content_type: "text/event-stream".into(),
                ..Default::default()
            }),
            Frame::Started,
            Frame::Body(Bytes::from_static(b"data: x\n\n")),
            Frame::Trailer(Trailer { error: "cut short".into() }),
        ];
        assert_eq!(round_trip(frames.clone()), frames);
    }

    #[test]
    fn oversized_and_unknown_frames_are_refused() {
        let mut codec = FrameCodec::default();
        let mut wire = BytesMut::new();
        wire.put_u32((MAX_FRAME_BYTES + 10) as u32);
        wire.put_u8(BODY);
        assert!(matches!(codec.decode(&mut wire), Err(FrameError::TooLarge(_))));
        let mut wire = BytesMut::new();
        wire.put_u32(1);
        wire.put_u8(9);
        assert!(matches!(FrameCodec::default().decode(&mut wire), Err(FrameError::UnknownType(9))));
        let mut wire = BytesMut::new();
        wire.put_u32(2);
        wire.put_u8(STARTED);
        wire.put_u8(1);
        assert!(matches!(FrameCodec::default().decode(&mut wire), Err(FrameError::Malformed(_))));
        let mut wire = BytesMut::new();
        wire.put_u32(3);
        wire.put_u8(REQUEST_HEAD);
        wire.put_u16(0xffff);
        assert!(matches!(FrameCodec::default().decode(&mut wire), Err(FrameError::Malformed(_))));
        assert!(
            FrameCodec::default()
                .encode(Frame::Body(Bytes::from(vec![0; MAX_FRAME_BYTES + 1])), &mut BytesMut::new())
                .is_err()
        );
    }

    #[test]
    fn large_bodies_split_into_bounded_frames() {
        let body = Bytes::from(vec![7u8; MAX_FRAME_BYTES * 2 + 5]);
        let frames: Vec<Frame> = body_frames(body.clone()).collect();
        assert_eq!(frames.len(), 3);
        let joined: Vec<u8> =
            frames.iter().flat_map(|f| if let Frame::Body(b) = f { b.to_vec() } else { vec![] }).collect();
        assert_eq!(joined, body.to_vec());
    }

    proptest! {
        #[test]
        fn bodies_round_trip_in_any_split(chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..512), 0..8), cut in 0usize..4096) {
            let frames: Vec<Frame> = chunks.iter().map(|c| Frame::Body(Bytes::from(c.clone()))).collect();
            let mut codec = FrameCodec::default();
            let mut wire = BytesMut::new();
            for frame in frames.clone() {
                codec.encode(frame, &mut wire).expect("encodes");
            }
            // Deliver the bytes in two pieces cut anywhere.
            let cut = cut.min(wire.len());
            let mut first = wire.split_to(cut);
            let mut out = Vec::new();
            while let Some(frame) = codec.decode(&mut first).expect("decodes") { out.push(frame); }
            first.unsplit(wire);
            while let Some(frame) = codec.decode(&mut first).expect("decodes") { out.push(frame); }
            prop_assert_eq!(out, frames);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let mut codec = FrameCodec::default();
            let mut buf = BytesMut::from(&bytes[..]);
            while let Ok(Some(_)) = codec.decode(&mut buf) {}
        }
    }
}
