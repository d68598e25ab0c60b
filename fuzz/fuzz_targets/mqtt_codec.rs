//! The MQTT codec on arbitrary bytes: CONNECT, then packets of either version. Seeds in
//! fuzz/corpus/mqtt_codec are valid packets of both versions.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tern_bridge::fuzzing::mqtt_stream(data));
