#!/usr/bin/env python3
"""Checks the Helm chart (helm/tern) with a real Helm engine (helm-python-sdk, Helm's Go SDK):
lint, render with several value sets, validate every manifest against the Kubernetes OpenAPI
schemas (kubernetes-validate, strict), and check that values.schema.json refuses bad values.
Run by `make test`; exits non-zero with the reason on the first failure."""

import os
import sys

import helm_python as helm
import kubernetes_validate
import yaml

CHART = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "helm", "tern")
KUBE_VERSION = "1.30.0"

PRODUCTION = {
    "image": {"repository": "registry.example.com/tern", "tag": "0.1.0"},
    "config": "[mqtt]\nmax_connections = 200000\n",
    "extraEnv": [{"name": "TERN_RULES__MAX_RULES_PER_TENANT", "value": "500"}],
    "persistence": {"size": "200Gi", "storageClass": "fast-ssd"},
    "resources": {"requests": {"cpu": "4", "memory": "8Gi"}, "limits": {"memory": "16Gi"}},
    "deviceService": {"type": "LoadBalancer",
                      "annotations": {"service.beta.kubernetes.io/aws-load-balancer-type": "nlb"}},
    "tls": {"secretName": "tern-mqtt-tls"},
    "kafka": {"brokers": "kafka-0.kafka:9092,kafka-1.kafka:9092", "replicationFactor": 3},
    "nats": {"url": "nats://nats:4222"},
    "tracing": {"otlpEndpoint": "http://otel-collector:4317", "samplingRatio": 0.1},
    "publicUrl": "https://iot.example.com",
    "networkPolicy": {"enabled": True,
                      "apiFrom": [{"namespaceSelector": {"matchLabels": {"name": "ingress"}}}]},
    "serviceMonitor": {"enabled": True},
}
MINIMAL = {"networkPolicy": {"enabled": False}, "log": {"format": "text"}}

BAD_VALUES = [
    ({"ports": {"mqtt": 70000, "mqtts": 8883, "wss": 8084, "coap": 5683, "http": 8080, "grpc": 50051}},
     "ports.mqtt above 65535"),
    ({"kafka": {"brokers": "kafka without port"}}, "kafka.brokers not host:port"),
    ({"tracing": {"otlpEndpoint": "https://collector:4317"}}, "OTLP over TLS is not supported"),
    ({"replicas": 3}, "an unknown key"),
    ({"deviceService": {"type": "Ingress"}}, "a Service type that does not exist"),
]


def fail(why):
    print(f"chart check failed: {why}", file=sys.stderr)
    sys.exit(1)


def render(chart, values):
    chart.validate_schema(values)
    manifests = chart.render(values, name="tern", namespace="iot", is_install=True)
    docs = []
    for path, text in sorted(manifests.items()):
        if not path.endswith(".yaml"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                docs.append((path, doc))
    return docs


def validate(docs, label):
    for path, doc in docs:
        if doc["kind"] == "ServiceMonitor":
            # A CRD: not in the Kubernetes schemas; check what the Prometheus Operator needs.
            endpoint = doc["spec"]["endpoints"][0]
            if endpoint["port"] != "http" or endpoint["path"] != "/metrics":
                fail(f"{label}: the ServiceMonitor does not scrape http /metrics")
            continue
        try:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            fail(f"{label}: {path} ({doc['kind']}) is not a valid Kubernetes object: {e.message}")


def by_kind(docs, kind):
    return [doc for _, doc in docs if doc["kind"] == kind]


def container_env(docs):
    (sts,) = by_kind(docs, "StatefulSet")
    container = sts["spec"]["template"]["spec"]["containers"][0]
    return container, {e["name"]: e.get("value") for e in container["env"]}


def main():
    report = helm.lint(CHART, strict=True, kube_version=f"v{KUBE_VERSION}")
    problems = [m for m in report.get("messages", []) if m.get("severity", 0) >= 2]
    if report.get("errors") or problems:
        fail(f"helm lint: {report.get('errors')} {problems}")
    chart = helm.Chart.load(CHART)

    default = render(chart, None)
    validate(default, "default values")
    container, env = container_env(default)
    if any(k.startswith(("TERN_EVENTLOG__", "TERN_ROUTING__", "TERN_TRACING__")) for k in env):
        fail("default values must keep the embedded log, in-process routing and no tracing")
    security = container["securityContext"]
    if security.get("readOnlyRootFilesystem") is not True or security["capabilities"]["drop"] != ["ALL"]:
        fail("the container must run with a read-only root and no capabilities")
    if not by_kind(default, "NetworkPolicy"):
        fail("a NetworkPolicy is rendered by default")
    if by_kind(default, "ServiceMonitor") or by_kind(default, "ConfigMap"):
        fail("no ServiceMonitor or ConfigMap unless asked for")

    production = render(chart, PRODUCTION)
    validate(production, "production values")
    container, env = container_env(production)
    expected = {
        "TERN_EVENTLOG__BACKEND": "kafka",
        "TERN_EVENTLOG__KAFKA__BROKERS": PRODUCTION["kafka"]["brokers"],
        "TERN_ROUTING__BACKEND": "nats",
        "TERN_ROUTING__NATS__URL": "nats://nats:4222",
        "TERN_TRACING__OTLP_ENDPOINT": "http://otel-collector:4317",
        "TERN_IDENTITY__PUBLIC_URL": "https://iot.example.com",
        "TERN_MQTT__TLS__CERT_FILE": "/etc/tern/tls/tls.crt",
        "TERN_RULES__MAX_RULES_PER_TENANT": "500",
    }
    for key, value in expected.items():
        if env.get(key) != value:
            fail(f"production values: {key} is {env.get(key)!r}, expected {value!r}")
    if container["args"][2] != "/etc/tern/custom/tern.toml":
        fail("a config value must be the file the container reads")
    (devices,) = [s for s in by_kind(production, "Service") if s["metadata"]["name"].endswith("-devices")]
    if devices["spec"]["type"] != "LoadBalancer" or "mqtts" not in [p["name"] for p in devices["spec"]["ports"]]:
        fail("production values: the device Service is a LoadBalancer with MQTTS")
    if not by_kind(production, "ServiceMonitor"):
        fail("production values: the ServiceMonitor is rendered")

    minimal = render(chart, MINIMAL)
    validate(minimal, "minimal values")
    if by_kind(minimal, "NetworkPolicy"):
        fail("networkPolicy.enabled=false renders no NetworkPolicy")

    for values, why in BAD_VALUES:
        try:
            chart.validate_schema(values)
        except helm.HelmValuesError:
            continue
        fail(f"values.schema.json accepted {why}: {values}")

    print(f"chart ok: lint, 3 value sets rendered and valid for Kubernetes {KUBE_VERSION}, "
          f"{len(BAD_VALUES)} bad value sets refused")


if __name__ == "__main__":
    main()
