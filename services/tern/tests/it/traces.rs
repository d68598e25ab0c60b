//! Traces: one device message is one trace across the bridge, the event log, analytics and the
//! store, continuing the trace the device sent (MQTT 5 user property `traceparent`). The
//! spans are exported over OTLP/gRPC to a collector this test runs itself. With each service
//! its own process, the trace crosses processes: the bridge, Kafka, analytics and the served
//! store (its gRPC metadata carries the context).

use std::collections::HashMap;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::PublishProperties;
use rumqttc::v5::{Event, Incoming};
use tokio::sync::mpsc;

use crate::harness::{PATIENCE, Provisioned, Tern, free_port};
use crate::revocation::{connect, options};
use crate::services::Platform;

/// A span and the `service.name` of the process that exported it.
type Exported = (String, Span);

/// An OTLP/gRPC trace receiver: every exported span goes to the channel.
struct Collector(mpsc::UnboundedSender<Exported>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        for resource in request.into_inner().resource_spans {
            let service = resource
                .resource
                .as_ref()
                .and_then(|r| r.attributes.iter().find(|kv| kv.key == "service.name"))
                .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                    AnyValue::StringValue(s) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for scope in resource.scope_spans {
                for span in scope.spans {
                    let _ = self.0.send((service.clone(), span));
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

fn start_collector() -> (String, mpsc::UnboundedReceiver<Exported>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let address = format!("127.0.0.1:{}", free_port());
    let server = tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(Collector(tx)))
        .serve(address.parse().expect("address"));
    tokio::spawn(server);
    (format!("http://{address}"), rx)
}

fn attribute(span: &Span, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
            AnyValue::StringValue(s) => Some(s.clone()),
            _ => None,
        })
}

/// Receives spans until one of each `wanted` span of `trace` is in; by name, with the
/// service that exported it.
async fn spans_of(
    rx: &mut mpsc::UnboundedReceiver<Exported>,
    trace: &[u8],
    wanted: &[&str],
) -> HashMap<String, Exported> {
    let mut got = HashMap::new();
    while got.len() < wanted.len() {
        let (service, span) = tokio::time::timeout(PATIENCE, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("spans missing; got {:?}", got.keys()))
            .expect("collector running");
        if span.trace_id == trace && wanted.contains(&span.name.as_str()) {
            got.insert(span.name.clone(), (service, span));
        }
    }
    got
}

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const DEVICE_SPAN: &str = "00f067aa0ba902b7";

/// Publishes one reading over MQTT 5 to `bridge` with the device's own trace context, and
/// waits for its PUBACK.
async fn publish_traced(bridge: &Tern, p: &Provisioned) {
    let (client, mut events) = connect(options(bridge, &p.device_id, &p.access_token))
        .await
        .expect("connect");
    let properties = PublishProperties {
        user_properties: vec![(
            "traceparent".into(),
            format!("00-{TRACE_ID}-{DEVICE_SPAN}-01"),
        )],
        ..PublishProperties::default()
    };
    client
        .publish_with_properties(
            "telemetry",
            QoS::AtLeastOnce,
            false,
            r#"{"kwh": 3.5}"#,
            properties,
        )
        .await
        .expect("publish");
    loop {
        match tokio::time::timeout(PATIENCE, events.poll()).await {
            Ok(Ok(Event::Incoming(Incoming::PubAck(_)))) => break,
            Ok(Ok(_)) => {}
            other => panic!("no PUBACK: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_message_is_one_trace_across_bridge_log_analytics_and_store() {
    let (endpoint, mut spans) = start_collector();
    let tern = Tern::start_with_env(&[
        ("TERN_TRACING__OTLP_ENDPOINT", endpoint.as_str()),
        // Export every 100 ms instead of every 5 s.
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ]);
    let p = tern.provision("acme", "meter");
    publish_traced(&tern, &p).await;

    let wanted = [
        "tern.publish",
        "tern.eventlog.append",
        "tern.ingest",
        "tern.store.write",
    ];
    let got: HashMap<String, Span> = spans_of(&mut spans, &hex(TRACE_ID), &wanted)
        .await
        .into_iter()
        .map(|(name, (_, span))| (name, span))
        .collect();
    let (publish, append, ingest, store) = (
        &got["tern.publish"],
        &got["tern.eventlog.append"],
        &got["tern.ingest"],
        &got["tern.store.write"],
    );
    assert_eq!(
        publish.parent_span_id,
        hex(DEVICE_SPAN),
        "continues the device's trace"
    );
    assert_eq!(append.parent_span_id, publish.span_id);
    assert_eq!(ingest.parent_span_id, publish.span_id);
    assert_eq!(store.parent_span_id, ingest.span_id);
    let services: Vec<_> = [publish, append, ingest, store]
        .iter()
        .map(|s| attribute(s, "tern.service").unwrap_or_default())
        .collect();
    assert_eq!(services, ["bridge", "eventlog", "analytics", "store"]);
    assert_eq!(
        attribute(publish, "device").as_deref(),
        Some(p.device_id.as_str())
    );
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_message_is_one_trace_across_the_bridge_analytics_and_store_processes() {
    let (endpoint, mut spans) = start_collector();
    let platform = Platform::start(&[
        ("TERN_TRACING__OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ]);
    let _identity = platform.service("identity");
    let gateway = platform.service("gateway");
    let bridge = platform.service("bridge");
    let _analytics = platform.service("analytics");
    let p = gateway.provision("acme", "meter");
    publish_traced(&bridge, &p).await;

    let wanted = [
        "tern.publish",
        "tern.ingest",
        "tern.store.write",
        "tern.store.serve",
    ];
    let got = spans_of(&mut spans, &hex(TRACE_ID), &wanted).await;
    let (publish, ingest, write, serve) = (
        &got["tern.publish"],
        &got["tern.ingest"],
        &got["tern.store.write"],
        &got["tern.store.serve"],
    );
    // Three processes, each naming itself; one trace, each span the child of the one before.
    assert_eq!(
        [&publish.0, &ingest.0, &write.0, &serve.0],
        [
            "tern-bridge",
            "tern-analytics",
            "tern-analytics",
            "tern-store"
        ]
    );
    assert_eq!(publish.1.parent_span_id, hex(DEVICE_SPAN));
    assert_eq!(ingest.1.parent_span_id, publish.1.span_id);
    assert_eq!(write.1.parent_span_id, ingest.1.span_id);
    assert_eq!(
        serve.1.parent_span_id, write.1.span_id,
        "across gRPC to the store"
    );
}
