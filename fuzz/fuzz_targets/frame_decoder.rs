//! Bytes from a tunnel peer, pushed in arbitrary chunks into the frame decoder.
//!
//! Checks:
//! - `FrameDecoder::push` / `next_frame` never panic and never buffer more than what was
//!   pushed, whatever the bytes and chunking; decoding stops at the first error that puts the
//!   stream out of sync (`TooLarge`, `Malformed`, ...), as a real connection closes then, and
//!   goes on after `UnknownMessage` (which concerns one frame only);
//! - the frames decoded do not depend on how the bytes were chunked (the same bytes in one
//!   piece give the same frames);
//! - every decoded frame re-encodes, and the re-encoding decodes to the same frame;
//! - `decode_samples` (outbox and hub log entries) never panics on the same bytes.

#![no_main]

use arbitrary::Arbitrary;
use edgesync_protocol::frame::{Body, Frame, FrameDecoder, FrameError, decode_samples, frame_bytes};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
struct Input {
    /// Largest frame accepted (kept small so that "too large" is reachable).
    max_frame_len: u16,
    /// Chunk sizes, cycled.
    chunks: Vec<u8>,
    bytes: Vec<u8>,
}

/// What a connection sees: the frames (or unknown-message markers) up to the first fatal error.
fn run(max: usize, bytes: &[u8], chunks: &[u8]) -> (Vec<Option<Body>>, Option<String>) {
    let mut decoder = FrameDecoder::new(max);
    let mut out = Vec::new();
    let mut rest = bytes;
    let mut pushed = 0usize;
    let mut sizes = chunks.iter().cycle();
    while !rest.is_empty() {
        let n = match sizes.next() {
            Some(&n) => usize::from(n).clamp(1, rest.len()),
            None => rest.len(),
        };
        let (chunk, tail) = rest.split_at(n);
        rest = tail;
        decoder.push(chunk);
        pushed += chunk.len();
        loop {
            assert!(decoder.buffered() <= pushed, "decoder buffers more than it was given");
            match decoder.next_frame() {
                Ok(Some(body)) => out.push(Some(body)),
                Ok(None) => break,
                Err(FrameError::UnknownMessage) => out.push(None),
                Err(e) => return (out, Some(e.to_string())),
            }
        }
    }
    (out, None)
}

fuzz_target!(|input: Input| {
    let max = usize::from(input.max_frame_len);
    let (chunked, chunked_err) = run(max, &input.bytes, &input.chunks);
    let (whole, whole_err) = run(max, &input.bytes, &[]);
    assert!(chunked == whole, "frames depend on chunking");
    assert_eq!(chunked_err.is_some(), whole_err.is_some(), "errors depend on chunking");

    for body in chunked.into_iter().flatten() {
        let frame = Frame { body: Some(body) };
        // A frame that was accepted at `max` re-encodes within `max`.
        let Ok(bytes) = frame_bytes(&frame, max) else {
            panic!("decoded frame does not re-encode within {max} bytes");
        };
        let mut again = FrameDecoder::new(max);
        again.push(&bytes);
        match again.next_frame() {
            Ok(Some(body)) => assert!(Some(body) == frame.body, "re-encoded frame differs"),
            other => panic!("re-encoded frame does not decode: {:?}", other.map(|b| b.is_some())),
        }
        assert_eq!(again.buffered(), 0);
    }

    let _ = decode_samples(&input.bytes);
});
