//! Entry points for `cargo fuzz` (the `fuzz/` crate, run by `make fuzz`); compiled only with
//! the `fuzzing` feature.

use bytes::BytesMut;

use crate::codec::{self, Version};

/// Large enough that size limits do not hide parser paths.
const MAX_PACKET: usize = 1 << 20;

/// Feeds `data` to the codec as a connection's byte stream would: a CONNECT (which decides
/// the version), then packets until the bytes run out or one is refused; and, separately, as
/// packets of an established 3.1.1 and 5 connection. Every packet read is written back in its
/// version. Any outcome but a panic is fine.
pub fn mqtt_stream(data: &[u8]) {
    let mut buf = BytesMut::from(data);
    if let Ok(connect) = codec::read_connect(&mut buf, MAX_PACKET) {
        drain(&mut buf, connect.version);
    }
    for version in [Version::V311, Version::V5] {
        drain(&mut BytesMut::from(data), version);
    }
}

fn drain(buf: &mut BytesMut, version: Version) {
    while let Ok(incoming) = codec::read(buf, version, MAX_PACKET) {
        if let codec::Incoming::Packet(packet) = incoming {
            let mut out = BytesMut::new();
            let _ = codec::write(&packet, version, &mut out);
        }
    }
}
