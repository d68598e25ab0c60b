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
SERVICES = ["analytics", "bridge", "dashboard", "gateway", "identity", "registry"]
DISTRIBUTED = {
    "mode": "distributed",
    "kafka": {"brokers": "kafka-0.kafka:9092,kafka-1.kafka:9092"},
    "nats": {"url": "nats://nats:4222"},
    "tls": {"secretName": "tern-mqtt-tls"},
    "publicUrl": "https://iot.example.com",
    "ingress": {"enabled": True, "host": "iot.example.com", "className": "nginx",
                "tlsSecretName": "iot-example-com"},
    "serviceMonitor": {"enabled": True},
}

BAD_VALUES = [
    ({"ports": {"mqtt": 70000, "mqtts": 8883, "wss": 8084, "coap": 5683, "http": 8080, "grpc": 50051}},
     "ports.mqtt above 65535"),
    ({"kafka": {"brokers": "kafka without port"}}, "kafka.brokers not host:port"),
    ({"tracing": {"otlpEndpoint": "https://collector:4317"}}, "OTLP over TLS is not supported"),
    ({"replicas": 3}, "an unknown key"),
    ({"deviceService": {"type": "Ingress"}}, "a Service type that does not exist"),
    ({"mode": "distributed", "nats": {"url": "nats://nats:4222"}},
     "distributed mode without Kafka brokers"),
    ({"mode": "distributed", "kafka": {"brokers": "kafka:9092"}}, "distributed mode without NATS"),
    ({"services": {"bridge": {"replicas": 2, "resources": {},
                              "autoscaling": {"enabled": True, "minReplicas": 0, "maxReplicas": 3,
                                              "targetCPUUtilizationPercentage": 70}}}},
     "an autoscaler that may scale to nothing"),
    ({"ingress": {"enabled": True}}, "an ingress without a host"),
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


def container_env(docs, workload="StatefulSet"):
    (sts,) = by_kind(docs, workload)
    container = sts["spec"]["template"]["spec"]["containers"][0]
    return container, {e["name"]: e.get("value") for e in container["env"]}


def check_distributed(chart):
    docs = render(chart, DISTRIBUTED)
    validate(docs, "distributed values")
    deployments = {d["metadata"]["labels"]["app.kubernetes.io/component"]: d
                   for d in by_kind(docs, "Deployment")}
    if sorted(deployments) != SERVICES:
        fail(f"distributed: one Deployment per service expected, got {sorted(deployments)}")
    (store,) = by_kind(docs, "StatefulSet")
    if store["spec"]["template"]["spec"]["containers"][0]["args"][0] != "store":
        fail("distributed: the one StatefulSet runs `tern store`")
    for name, deployment in deployments.items():
        pod = deployment["spec"]["template"]["spec"]
        container = pod["containers"][0]
        env = {e["name"]: e.get("value") for e in container["env"]}
        if container["args"][0] != name:
            fail(f"distributed: the {name} Deployment runs `tern {container['args'][0]}`")
        if container["readinessProbe"]["httpGet"]["path"] != "/readyz":
            fail(f"distributed: {name} is ready by /readyz")
        has_store = env.get("TERN_STORE__URL") == "http://tern-store:50052"
        if has_store == (name == "dashboard"):
            fail(f"distributed: {name} {'must not get' if name == 'dashboard' else 'needs'} the store")
        if name != "dashboard" and (env.get("TERN_EVENTLOG__BACKEND"), env.get("TERN_ROUTING__BACKEND")) != ("kafka", "nats"):
            fail(f"distributed: {name} needs the Kafka log and NATS routing")
    identity_env = {e["name"]: e.get("value") for e in
                    deployments["identity"]["spec"]["template"]["spec"]["containers"][0]["env"]}
    if identity_env.get("TERN_IDENTITY__OPERATOR_TOKEN_FILE") != "/etc/tern/operator/token":
        fail("distributed: identity adopts the operator token from its Secret")
    secrets = {s["metadata"]["name"]: s for s in by_kind(docs, "Secret")}
    import base64
    operator = base64.b64decode(secrets["tern-operator-token"]["data"]["token"]).decode()
    if not operator.startswith("tern_op_") or len(operator) < 40:
        fail("distributed: the operator token Secret holds a tern_op_ token")
    if len(base64.b64decode(secrets["tern-store-token"]["data"]["token"])) < 16:
        fail("distributed: the store token has at least 16 characters")
    pdbs = {p["metadata"]["name"] for p in by_kind(docs, "PodDisruptionBudget")}
    if pdbs != {f"tern-{n}" for n in SERVICES}:
        fail(f"distributed: a PodDisruptionBudget per service, got {sorted(pdbs)}")
    (ingress,) = by_kind(docs, "Ingress")
    routes = {p["path"]: p["backend"]["service"]["name"]
              for p in ingress["spec"]["rules"][0]["http"]["paths"]}
    for path, service in {"/api": "tern-gateway", "/oauth2": "tern-identity",
                          "/.well-known": "tern-identity", "/mqtt": "tern-bridge",
                          "/": "tern-dashboard"}.items():
        if routes.get(path) != service:
            fail(f"distributed: the ingress sends {path} to {routes.get(path)}, expected {service}")
    (devices,) = [s for s in by_kind(docs, "Service") if s["metadata"]["name"] == "tern-devices"]
    if devices["spec"]["selector"].get("app.kubernetes.io/component") != "bridge":
        fail("distributed: devices reach the bridges")
    if len(by_kind(docs, "NetworkPolicy")) != 2:
        fail("distributed: a NetworkPolicy for the services and one keeping the store private")

    mutual = dict(DISTRIBUTED, store={"tls": {"serverSecret": "store-server-tls",
                                             "clientSecret": "store-client-tls"}})
    docs = render(chart, mutual)
    validate(docs, "distributed values with mutual TLS to the store")
    (store,) = by_kind(docs, "StatefulSet")
    args = store["spec"]["template"]["spec"]["containers"][0]["args"]
    if "--client-ca" not in args or "--tls-cert" not in args:
        fail("store TLS: tern store serves mutual TLS")
    if "tcpSocket" not in store["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]:
        fail("store TLS: the kubelet's gRPC probe cannot speak TLS; probe the port")
    gateway = [d for d in by_kind(docs, "Deployment") if d["metadata"]["name"] == "tern-gateway"][0]
    env = {e["name"]: e.get("value") for e in gateway["spec"]["template"]["spec"]["containers"][0]["env"]}
    if env.get("TERN_STORE__URL") != "https://tern-store:50052" or not env.get("TERN_STORE__CERT_FILE"):
        fail("store TLS: the services call https:// with their client certificate")

    signed_in = dict(DISTRIBUTED, nats=dict(DISTRIBUTED["nats"], tokenSecret="nats-token",
                                            tlsSecret="nats-client-tls", clientCertificate=True))
    docs = render(chart, signed_in)
    validate(docs, "distributed values with a NATS token and client certificate")
    for deployment in by_kind(docs, "Deployment"):
        name = deployment["metadata"]["labels"]["app.kubernetes.io/component"]
        pod = deployment["spec"]["template"]["spec"]
        env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
        mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
        volumes = {v["name"]: v.get("secret", {}).get("secretName") for v in pod["volumes"]}
        if name == "dashboard":
            if "nats-token" in volumes or "nats-tls" in volumes:
                fail("NATS sign-in: the dashboard gets no NATS secrets")
            continue
        files = [env.get(f"TERN_ROUTING__NATS__{k}") for k in ("TOKEN_FILE", "CA_FILE", "CERT_FILE", "KEY_FILE")]
        if files != ["/etc/tern/nats-token/token", "/etc/tern/nats-tls/ca.crt",
                     "/etc/tern/nats-tls/tls.crt", "/etc/tern/nats-tls/tls.key"]:
            fail(f"NATS sign-in: {name} reads the token and certificates from files, got {files}")
        if (mounts.get("/etc/tern/nats-token"), volumes.get("nats-token"), volumes.get("nats-tls")) != (
                "nats-token", "nats-token", "nats-client-tls"):
            fail(f"NATS sign-in: {name} mounts the NATS Secrets")

    scaled = dict(DISTRIBUTED, services={
        "bridge": {"replicas": 2, "resources": {},
                   "autoscaling": {"enabled": True, "minReplicas": 3, "maxReplicas": 20,
                                   "targetCPUUtilizationPercentage": 60}}})
    docs = render(chart, scaled)
    validate(docs, "distributed values with autoscaling")
    (hpa,) = by_kind(docs, "HorizontalPodAutoscaler")
    if (hpa["spec"]["scaleTargetRef"]["name"], hpa["spec"]["maxReplicas"]) != ("tern-bridge", 20):
        fail("distributed: the bridge's HorizontalPodAutoscaler")
    (bridge,) = [d for d in by_kind(docs, "Deployment") if d["metadata"]["name"] == "tern-bridge"]
    if "replicas" in bridge["spec"]:
        fail("distributed: an autoscaled Deployment leaves replicas to its autoscaler")


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

    check_distributed(chart)

    for values, why in BAD_VALUES:
        try:
            chart.validate_schema(values)
        except helm.HelmValuesError:
            continue
        fail(f"values.schema.json accepted {why}: {values}")

    print(f"chart ok: lint, 7 value sets rendered and valid for Kubernetes {KUBE_VERSION}, "
          f"{len(BAD_VALUES)} bad value sets refused")


if __name__ == "__main__":
    main()
