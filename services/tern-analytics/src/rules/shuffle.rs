//! The log between the two stages of fleet-wide rules on a shared store.
//!
//! A fleet-wide rule's groups (a label's value, or the whole fleet) gather messages from
//! devices on every partition of a stream. Stage one runs beside the per-device rules, on each
//! stream partition: it applies the rule's filter and appends each message that passes to the
//! topic `rules-shuffle`, keyed by rule and group, so that a group's messages meet in one
//! partition. Stage two reads that topic, split by partition across the analytics processes
//! like the streams, and runs the windows and patterns.
//!
//! A crash in stage one appends some messages again. Each carries the stream partition and
//! offset it came from, and stage one appends a partition's messages in offset order, so
//! stage two skips any at or below the newest offset it has folded in from that source.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tern_core::TenantId;
use tern_eventlog::Record;
use uuid::Uuid;

use super::expr::Value;
use super::window::{Message, TwinDocuments};

/// The topic between the stages.
pub const SHUFFLE_TOPIC: &str = "rules-shuffle";

/// A message on its way to one fleet-wide rule: what the rule reads of it, as stage one saw it
/// (labels and twin included, so that both stages evaluate the same row).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Shuffled {
    pub tenant: TenantId,
    pub rule: Uuid,
    pub version: u64,
    /// The stream partition the message came from (`telemetry/2`) and its offset there.
    pub source: String,
    pub offset: u64,
    pub device: String,
    pub message_id: String,
    pub ts_ms: i64,
    pub arrived_ms: i64,
    pub metrics: Vec<(String, f64)>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fields: Vec<(String, Value)>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub twin: Option<TwinDocuments>,
}

impl Shuffled {
    /// The record for the topic: keyed by rule and group.
    pub fn record(&self, group: &str) -> Record {
        let value = serde_json::to_vec(self).unwrap_or_default();
        Record::new(SHUFFLE_TOPIC, format!("{}/{group}", self.rule), value)
    }

    pub fn decode(value: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(value)
    }

    /// Where stage two remembers how far it has read this message's source, for this rule.
    pub fn source_key(&self) -> String {
        format!("{}/{}", self.rule, self.source)
    }

    pub fn message(&self) -> Message<'_> {
        Message {
            device: &self.device,
            message_id: &self.message_id,
            ts_ms: self.ts_ms,
            arrived_ms: self.arrived_ms,
            metrics: &self.metrics,
            fields: &self.fields,
            labels: &self.labels,
            twin: self.twin.as_ref(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn a_message_survives_the_topic_unchanged_and_keyed_by_rule_and_group() {
        let shuffled = Shuffled {
            tenant: TenantId::random(),
            rule: Uuid::now_v7(),
            version: 3,
            source: "telemetry/2".into(),
            offset: 41,
            device: "pump".into(),
            message_id: "m1".into(),
            ts_ms: 1_000,
            arrived_ms: 1_005,
            metrics: vec![("temp".into(), 21.5)],
            fields: vec![("state".into(), Value::Text("on".into()))],
            labels: BTreeMap::from([("site".into(), "north".into())]),
            twin: None,
        };
        let record = shuffled.record("\"north\"");
        assert_eq!(record.topic, SHUFFLE_TOPIC);
        assert_eq!(
            record.key,
            Bytes::from(format!("{}/\"north\"", shuffled.rule))
        );
        assert_eq!(Shuffled::decode(&record.value).unwrap(), shuffled);
        assert_eq!(
            shuffled.source_key(),
            format!("{}/telemetry/2", shuffled.rule)
        );
    }
}
