//! Frames from arbitrary bytes: never a panic, never an error offset past the input,
//! and every frame that decodes re-encodes to a frame that decodes to the same value.
#![no_main]

use bytes::BytesMut;
use keel_protocol::frame::Frame;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    loop {
        let before = buf.len();
        match Frame::split_from(&mut buf) {
            Ok(Some(frame)) => {
                let mut again = BytesMut::new();
                frame.encode(&mut again);
                let decoded = Frame::split_from(&mut again).expect("a re-encoded frame decodes").expect("whole");
                assert_eq!(decoded, frame);
                assert!(again.is_empty());
            }
            Ok(None) => break,
            Err(e) => {
                assert!(e.offset() <= before, "error offset {} beyond input of {before}", e.offset());
                break;
            }
        }
    }
});
