//! The codec must never panic on bad bytes: a panic would take down a connection task with an
//! unhelpful error (and, in a worse place, the process). This feeds it mutated valid packets and
//! random bytes, deterministically, and checks that every outcome is a packet or an error.

use bytes::BytesMut;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{Connect, Packet, Publish, Subscribe};

/// xorshift64*: deterministic, so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn seeds() -> Vec<Vec<u8>> {
    let mut connect = Connect::new("a2c4e6f8-0000-4000-8000-000000000000");
    connect.set_login("a2c4e6f8-0000-4000-8000-000000000000", "token.token.token");
    let packets = [
        Packet::Connect(connect),
        Packet::Publish(Publish::new(
            "telemetry",
            QoS::AtLeastOnce,
            br#"{"temp":21.5}"#.to_vec(),
        )),
        Packet::Publish(Publish::new("event", QoS::ExactlyOnce, vec![0u8; 40])),
        Packet::Subscribe(Subscribe::new("command/req/#", QoS::AtLeastOnce)),
        Packet::PingReq,
        Packet::Disconnect,
    ];
    packets
        .iter()
        .map(|p| {
            let mut buf = BytesMut::new();
            let mut p = p.clone();
            if let Packet::Publish(publish) = &mut p {
                publish.pkid = 7;
            }
            p.write(&mut buf, usize::MAX).expect("encode seed");
            buf.to_vec()
        })
        .collect()
}

/// Decodes everything in `bytes`; returns how many packets decoded before an error or the end.
fn decode_all(bytes: &[u8]) -> usize {
    let mut buf = BytesMut::from(bytes);
    let mut decoded = 0;
    while !buf.is_empty() {
        match Packet::read(&mut buf, 1024) {
            Ok(_) => decoded += 1,
            Err(_) => break,
        }
    }
    decoded
}

#[test]
fn seeds_decode() {
    for seed in seeds() {
        assert_eq!(decode_all(&seed), 1, "{seed:?}");
    }
}

#[test]
fn mutated_and_random_bytes_never_panic() {
    let seeds = seeds();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for round in 0..200_000 {
        let mut bytes = if round % 4 == 0 {
            (0..rng.below(64)).map(|_| rng.next() as u8).collect()
        } else {
            seeds[rng.below(seeds.len())].clone()
        };
        // Flip, insert, delete or truncate a few bytes.
        for _ in 0..1 + rng.below(4) {
            if bytes.is_empty() {
                break;
            }
            let at = rng.below(bytes.len());
            match rng.below(4) {
                0 => bytes[at] ^= 1 << rng.below(8),
                1 => bytes[at] = rng.next() as u8,
                2 => bytes.insert(at, rng.next() as u8),
                _ => bytes.truncate(at),
            }
        }
        let outcome = std::panic::catch_unwind(|| decode_all(&bytes));
        assert!(outcome.is_ok(), "the codec panicked on {bytes:?}");
    }
}

#[test]
fn oversized_frames_are_refused_from_the_header() {
    // A PUBLISH announcing 10 MB: refused before any payload arrives.
    let header = [0x30, 0x80, 0xad, 0xe2, 0x04];
    let mut buf = BytesMut::from(&header[..]);
    assert!(matches!(
        Packet::read(&mut buf, 1024),
        Err(rumqttc::mqttbytes::Error::PayloadSizeLimitExceeded(_))
    ));
}

/// The checked-in seeds of the `mqtt_codec` fuzz target (fuzz/corpus) stay valid streams:
/// a CONNECT, then every packet read to the end.
#[test]
fn fuzz_corpus_seeds_are_whole_valid_streams() {
    use crate::codec::{read, read_connect};
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/mqtt_codec");
    for (name, packets) in [
        ("v311_session", 5),
        ("v5_session", 5),
        ("v5_topic_alias", 2),
        ("v5_user_property", 1),
        ("v311_puback_pubrel", 2),
    ] {
        let bytes = std::fs::read(dir.join(name)).expect("seed file");
        let mut buf = BytesMut::from(&bytes[..]);
        let connect = read_connect(&mut buf, 1 << 20).expect(name);
        let mut read_packets = 0;
        while !buf.is_empty() {
            read(&mut buf, connect.version, 1 << 20).unwrap_or_else(|e| panic!("{name}: {e}"));
            read_packets += 1;
        }
        assert_eq!(read_packets, packets, "{name}");
    }
}
