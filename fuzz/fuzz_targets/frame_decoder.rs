//! The data-plane frame decoder on arbitrary bytes from a peer: it may
//! refuse them, never panic; whatever it accepts re-encodes to a frame that
//! decodes to the same value.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use llmesh_proto::frame::FrameCodec;
use tokio_util::codec::{Decoder, Encoder};

fuzz_target!(|data: &[u8]| {
    let mut codec = FrameCodec::default();
    // Fed in two pieces, as a stream arrives.
    let split = data.first().map_or(0, |b| usize::from(*b) % (data.len() + 1));
    let mut buf = BytesMut::from(&data[..split]);
    let mut frames = Vec::new();
    for piece in [&data[split..], &[][..]] {
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) => break,
                Err(_) => return,
            }
        }
        buf.extend_from_slice(piece);
    }
    for frame in frames {
        let mut encoded = BytesMut::new();
        FrameCodec::default().encode(frame.clone(), &mut encoded).expect("a decoded frame re-encodes");
        let again = FrameCodec::default().decode(&mut encoded).expect("re-encoded frame decodes");
        assert_eq!(again, Some(frame));
    }
});
