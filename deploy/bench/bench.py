#!/usr/bin/env python3
"""`make bench`: Tern side by side with Mosquitto and nats-server (MQTT) on this machine.

Each scenario starts a fresh server on free loopback ports, drives it with tern-sim (the same
generator and load for every server), samples the server's CPU time and peak RSS from /proc,
and stops it. Results go to docs/benchmarks.json and docs/benchmarks.md.

  bench.py [--duration SECONDS] [--scale FACTOR] [--only S2d,S4,E1,K1] [--servers tern]

E1 is the rule engine alone and K1 the Kafka log's producer against a bare librdkafka one
(cargo bench each); S7 loads a year of per-minute data over MQTT.

--scale multiplies device and connection counts (0.1 for a quick look, 10 on a big machine).
"""

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.expanduser("~/.cache/tern/target"))
TERN = os.path.join(TARGET, "release", "tern")
SIM = os.path.join(TARGET, "release", "tern-sim")
TICKS = os.sysconf("SC_CLK_TCK")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raise_fd_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def memory_kib(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def wait_port(port, proc, what):
    deadline = time.time() + 30
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited during start-up")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not open port {port}")


class Server:
    """A broker under test: start() returns the MQTT port; stop() ends it."""

    def __init__(self, name, durable, env=None):
        self.name, self.durable, self.env = name, durable, env or {}
        self.dir = tempfile.mkdtemp(prefix=f"bench-{name}-")
        self.proc = None
        self.broker = None
        self.extra = {}

    @property
    def is_tern(self):
        return self.name.startswith("tern")

    def start(self):
        self.mqtt = free_port()
        log = open(os.path.join(self.dir, "server.log"), "w")
        if self.name == "tern-kafka":
            # Tern on the Kafka event log, against tansu (a Kafka-protocol broker, in memory:
            # no fsync, unlike the embedded log). tansu holds every fetch for fetch.wait.max.ms
            # even when records arrive, hence the short wait (libs/tern-eventlog/tests/kafka.rs).
            kafka = free_port()
            url = f"tcp://127.0.0.1:{kafka}"
            self.broker = subprocess.Popen(["tansu", "broker", "--listener-url", url,
                                            "--advertised-listener-url", url,
                                            "--storage-engine", "memory://tansu/"],
                                           stdout=subprocess.DEVNULL, stderr=log)
            wait_port(kafka, self.broker, "tansu")
            self.env = dict(self.env, TERN_EVENTLOG__BACKEND="kafka",
                            TERN_EVENTLOG__KAFKA__BROKERS=f"127.0.0.1:{kafka}",
                            TERN_EVENTLOG__KAFKA__REPLICATION_FACTOR="1",
                            TERN_EVENTLOG__KAFKA__PARTITIONS="4",
                            TERN_EVENTLOG__KAFKA__FETCH_WAIT_MAX_MS="10")
        if self.is_tern:
            self.http = free_port()
            cmd = [TERN, "up", "--bind", "127.0.0.1", "--data-dir", os.path.join(self.dir, "data"),
                   "--mqtt-port", str(self.mqtt), "--http-port", str(self.http),
                   "--grpc-port", str(free_port()), "--coap-port", str(free_port())]
            env = dict(os.environ, RUST_LOG="warn", **self.env)
        elif self.name == "mosquitto":
            conf = os.path.join(self.dir, "mosquitto.conf")
            with open(conf, "w") as f:
                f.write(f"listener {self.mqtt} 127.0.0.1\nallow_anonymous true\n")
                f.write("max_queued_messages 100000\n")
                if self.durable:
                    f.write(f"persistence true\npersistence_location {self.dir}/\n")
            cmd, env = ["mosquitto", "-c", conf], dict(os.environ)
        else:
            conf = os.path.join(self.dir, "nats.conf")
            with open(conf, "w") as f:
                f.write(f'server_name: bench\nlisten: "127.0.0.1:{free_port()}"\n')
                f.write(f'jetstream {{ store_dir: "{self.dir}/js" }}\n')
                f.write(f'mqtt {{ listen: "127.0.0.1:{self.mqtt}" }}\n')
            cmd, env = ["nats-server", "-c", conf], dict(os.environ)
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=env)
        wait_port(self.mqtt, self.proc, self.name)
        if self.is_tern:
            wait_port(self.http, self.proc, "tern http")
            with open(os.path.join(self.dir, "data", "admin.token")) as f:
                self.token = f.read().strip()
        return self.mqtt

    def api(self, method, path, body=None):
        """A call to Tern's REST API with the operator token; returns the JSON answer."""
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"http://127.0.0.1:{self.http}{path}", data=data, method=method,
                                         headers={"Authorization": f"Bearer {self.token}",
                                                  "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request) as r:
                return json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            if e.code == 409:
                return None
            raise

    def histogram(self, name):
        """A Tern histogram from /metrics: (bucket upper bounds with counts, sum, count)."""
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.http}/metrics").read().decode()
        buckets, total, count = [], 0.0, 0
        for line in text.splitlines():
            if line.startswith(name + "_bucket{"):
                le = line.split('le="', 1)[1].split('"', 1)[0]
                buckets.append((float("inf") if le == "+Inf" else float(le), int(float(line.split()[-1]))))
            elif line.startswith(name + "_sum"):
                total = float(line.split()[-1])
            elif line.startswith(name + "_count"):
                count = int(float(line.split()[-1]))
        return buckets, total, count

    def metric(self, name):
        """A Tern metric from /metrics (sum over labels)."""
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.http}/metrics").read().decode()
        return sum(float(l.split()[-1]) for l in text.splitlines()
                   if l.startswith(name) and (l[len(name)] in " {"))

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if self.broker:
            self.broker.kill()
            self.broker.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def sim(server, args, label, on_provisioned=None):
    """Runs tern-sim; `on_provisioned` is called once its clients are provisioned (before any
    connects), so that a scenario can sample the server between the two phases."""
    cmd = [SIM, "--broker", f"127.0.0.1:{server.mqtt}", "--label", label] + args
    if server.is_tern:
        cmd += ["--tern-server", f"http://127.0.0.1:{server.http}", "--tern-tenant", "bench"]
    env = dict(os.environ)
    if server.is_tern:
        env["TERN_TOKEN"] = server.token
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    errors = []

    def watch_stderr():
        for line in proc.stderr:
            errors.append(line)
            if on_provisioned and line.startswith("provisioned "):
                on_provisioned()

    watcher = threading.Thread(target=watch_stderr)
    watcher.start()
    stdout = proc.stdout.read()
    proc.wait(timeout=3600)
    watcher.join()
    if proc.returncode != 0:
        raise RuntimeError(f"tern-sim failed: {''.join(errors).strip()[-2000:]}")
    return json.loads(stdout)


def measure(server_name, durable, fn):
    server = Server(server_name, durable, getattr(fn, "server_env", None))
    try:
        server.start()
        pid = server.proc.pid
        rss_before = memory_kib(pid, "VmRSS")
        cpu_before = cpu_seconds(pid)
        broker_cpu_before = cpu_seconds(server.broker.pid) if server.broker else 0
        result = fn(server)
        result["server_cpu_s"] = round(cpu_seconds(pid) - cpu_before, 2)
        result["server_peak_rss_kib"] = memory_kib(pid, "VmHWM")
        result["server_rss_before_kib"] = rss_before
        if server.broker:
            result["broker_cpu_s"] = round(cpu_seconds(server.broker.pid) - broker_cpu_before, 2)
        return result
    finally:
        server.stop()


def quantile_bound(buckets, count, q):
    """The upper bound of the histogram bucket holding the q-quantile (cumulative buckets)."""
    for bound, cumulative in buckets:
        if count and cumulative >= q * count:
            return bound
    return None


def percentiles(samples_ms):
    samples = sorted(samples_ms)
    pick = lambda q: samples[min(len(samples) - 1, int(q * len(samples)))]
    return {"p50_ms": round(pick(0.50), 2), "p99_ms": round(pick(0.99), 2), "max_ms": round(samples[-1], 2)}


def load_year(server, device_token, device_id, metric):
    """Publishes a year of per-minute samples over MQTT (load_history.py, Debian's paho)."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "load_history.py")
    out = subprocess.run(["/usr/bin/python3", script, "127.0.0.1", str(server.mqtt), device_id, device_token,
                          metric, "365"], capture_output=True, text=True, timeout=1900)
    if out.returncode != 0:
        raise RuntimeError(f"load_history.py failed: {out.stderr.strip()[-500:]}")
    start, end, total = map(int, out.stdout.split())
    return start, end, total


def scenarios(duration, scale):
    n = lambda base: max(1, int(base * scale))
    d = str(duration)
    pub100 = ["--devices", str(n(100)), "--payload-size", "100", "--duration", d]
    peers_topic = ["--topic", "bench/{device}"]

    def pub_sub(args, subscribers=0, qos="0", sub_topic="bench/#"):
        def run(server):
            return sim(server, args + peers_topic + ["--qos", qos, "--payload", "binary",
                       "--subscribers", str(subscribers), "--sub-topic", sub_topic], "")
        return run

    def no_loss(qos):
        """The highest rate the publishers (n(100), `--rate` each) sustain with every message
        reaching the one wildcard subscriber: offered rates double from 10,000 msg/s until a
        run loses one, then four bisection steps; each trial runs half the duration (at least
        2 s). The result is the best lossless run, with every trial listed."""
        publishers = n(100)
        trial_args = ["--devices", str(publishers), "--payload-size", "100",
                      "--duration", str(max(2.0, duration / 2))]

        def run(server):
            trials = []

            def trial(offered):
                per_device = max(1, offered // publishers)
                inflight = ["--inflight", "16"] if qos != "0" else []
                r = sim(server, trial_args + peers_topic + inflight + [
                    "--qos", qos, "--payload", "binary", "--subscribers", "1",
                    "--sub-topic", "bench/#", "--rate", str(per_device)], "")
                expected = r.get("sent", 0) * r.get("subscribed", 1)
                lossless = expected > 0 and r.get("received", 0) >= expected
                sent = r.get("throughput_msgs_per_s", 0)
                trials.append({"offered": per_device * publishers, "sent_per_s": round(sent),
                               "received_share": round(r.get("received", 0) / expected, 4) if expected else 0,
                               "lossless": lossless})
                # The publishers could not send what was offered: the server (or the
                # generator) paces them, so offering more finds nothing new.
                r["saturated"] = sent < 0.9 * per_device * publishers
                return lossless, r

            good, bad, best, last = 0, None, None, None
            offered = 10_000
            while offered <= 5_120_000:
                lossless, last = trial(offered)
                if not lossless:
                    bad = offered
                    break
                good, best = offered, last
                if last["saturated"]:
                    break
                offered *= 2
            for _ in range(4 if bad and good else 0):
                middle = (good + bad) // 2
                lossless, last = trial(middle)
                if lossless:
                    good, best = middle, last
                else:
                    bad = middle
            result = dict(best or last)
            result["no_loss_offered"] = good
            result["trials"] = trials
            return result
        return run

    def durable_publish(rate=None):
        def run(server):
            args = pub100 + ["--qos", "1"]
            if rate:
                args += ["--rate", str(rate)]
            if not server.is_tern:
                args += peers_topic
            return sim(server, args, "")
        return run

    def ingest(server):
        devices = n(10000)
        before = server.metric("tern_analytics_points_written_total")
        rolled_before = server.metric("tern_analytics_rollup_points_total")
        t0 = time.time()
        result = sim(server, ["--devices", str(devices), "--rate", "10", "--qos", "1",
                              "--payload-size", "100", "--duration", d, "--source-addrs", "4",
                              "--inflight", "16"], "")
        # Until everything acknowledged is stored.
        deadline = time.time() + 120
        while server.metric("tern_analytics_consumer_lag") > 0 and time.time() < deadline:
            time.sleep(0.05)
        stored = server.metric("tern_analytics_points_written_total") - before
        # From the start of publishing until the last acknowledged message was stored.
        busy = time.time() - t0 - result["provision_s"] - result["connect_phase_s"]
        result["points_stored"] = stored
        result["points_stored_per_s"] = stored / busy
        result["drain_after_publish_s"] = round(busy - result["duration_s"], 3)
        # Rollups trail the stored points by their merge interval (about a second).
        while (server.metric("tern_analytics_rollup_points_total") - rolled_before < stored
               and time.time() < deadline):
            time.sleep(0.05)
        result["rollups_after_publish_s"] = round(time.time() - t0 - result["provision_s"]
                                                  - result["connect_phase_s"] - result["duration_s"], 3)
        return result

    def commands(server):
        # Round trip of synchronous REST commands answered by MQTT devices that keep
        # publishing telemetry meanwhile (S3's load at a tenth of the devices).
        result = sim(server, ["--devices", str(n(1000)), "--rate", "10", "--qos", "1",
                              "--payload-size", "100", "--duration", d, "--inflight", "16",
                              "--answer-commands", "--command-rate", str(n(200))], "")
        result["commands_per_s"] = result["commands"]["rate_per_s"]
        return result

    def connections(server):
        conns = n(10000)
        # Offered at 5,000 connects/s, above what any server here sustains, rather than all at
        # once: an instantaneous storm measures the clients' SYN retransmission back-off more
        # than the server.
        pid = server.proc.pid
        provisioned = {}
        # Memory per connection counts from after provisioning: Tern's device records and
        # tokens are not connections (the peers have none).
        result = sim(server, ["--devices", str(conns), "--idle", "--keepalive", "60",
                              "--duration", "3", "--source-addrs", "8", "--ramp", "5000"], "",
                     on_provisioned=lambda: provisioned.setdefault("rss", memory_kib(pid, "VmRSS")))
        result["server_rss_with_connections_kib"] = memory_kib(pid, "VmRSS")
        result["server_rss_provisioned_kib"] = provisioned.get("rss")
        return result

    def fan_out(server):
        return sim(server, ["--devices", "1", "--rate", "10", "--qos", "0", "--payload", "binary",
                            "--payload-size", "100", "--duration", d, "--subscribers", str(n(10000)),
                            "--sub-topic", "bench/#", "--source-addrs", "8", "--ramp", "5000"]
                   + peers_topic, "")

    def year_query(server):
        # S7: a year of per-minute data for one metric, then chart queries over it.
        server.api("POST", "/api/v1/tenants", {"name": "bench"})
        device = server.api("POST", "/api/v1/tenants/bench/devices", {"name": "year"})
        tokens = server.api("POST", f"/api/v1/tenants/bench/devices/{device['id']}/tokens")
        before = server.metric("tern_analytics_points_written_total")
        t0 = time.time()
        start, end, total = load_year(server, tokens["access_token"], device["id"], "kwh")
        while server.metric("tern_analytics_points_written_total") - before < total and time.time() < t0 + 600:
            time.sleep(0.1)
        load_s = time.time() - t0
        # The chart queries read rollups, which trail raw points by about a second.
        while server.metric("tern_analytics_rollup_points_total") < total and time.time() < t0 + 660:
            time.sleep(0.1)
        path = f"/api/v1/tenants/bench/devices/{device['id']}/telemetry?metric=kwh"
        result = {"points_loaded": total, "load_s": round(load_s, 1), "throughput_msgs_per_s": total / load_s}
        for name, query in [("auto", f"&from={start}&to={end}&resolution=auto"),
                            ("1h", f"&from={start}&to={end}&resolution=1h&limit=10000"),
                            ("raw_10k", f"&from={start}&to={end}&resolution=raw&limit=10000&order=desc")]:
            samples, answer = [], None
            for _ in range(200):
                q0 = time.perf_counter()
                answer = server.api("GET", path + query)
                samples.append((time.perf_counter() - q0) * 1000)
            result[f"query_{name}"] = dict(percentiles(samples), points=len(answer["points"]),
                                           resolution=answer["resolution"])
        return result

    # One device publishes the whole year: with the default 64 publishes in flight per
    # connection, one fsync round trip per 64 messages bounds the load rate.
    year_query.server_env = {"TERN_MQTT__MAX_INFLIGHT": "1000"}

    def rules(devices):
        return lambda server: run_rules(server, devices)

    def run_rules(server, devices):
        # S3's shape with fewer devices, with two rules running: a filter that raises an alert
        # on 1% of messages, and a per-device one-minute average.
        server.api("POST", "/api/v1/tenants", {"name": "bench"})
        server.api("POST", "/api/v1/tenants/bench/rules", {
            "name": "hot", "sql": "SELECT device, value FROM telemetry WHERE value % 100 > 99",
            "actions": ["alert"]})
        server.api("POST", "/api/v1/tenants/bench/rules", {
            "name": "per-minute", "actions": ["alert:info"],
            "sql": "SELECT device, avg(value) AS v FROM telemetry "
                   "GROUP BY device, TUMBLE(ts, INTERVAL '1' MINUTE) HAVING avg(value) > 10000"})
        result = sim(server, ["--devices", str(devices), "--rate", "10", "--qos", "1",
                              "--payload-size", "100", "--duration", d, "--inflight", "16"], "")
        deadline = time.time() + 60
        while server.metric("tern_rules_messages_total") < result.get("acked", 0) and time.time() < deadline:
            time.sleep(0.1)
        buckets, total, count = server.histogram("tern_rules_publish_to_action_seconds")
        result["rules"] = {
            "messages": server.metric("tern_rules_messages_total"),
            "firings": server.metric("tern_rules_firings_total"),
            "actions": count,
            "mean_ms": round(1000 * total / count, 2) if count else None,
            "p50_le_ms": (quantile_bound(buckets, count, 0.5) or 0) * 1000,
            "p99_le_ms": (quantile_bound(buckets, count, 0.99) or 0) * 1000,
        }
        return result

    peers = ["mosquitto", "nats"]
    return [
        ("S1", f"pub→sub QoS 0, {n(100)} publishers, 1 wildcard subscriber", "throughput_msgs_per_s",
         "tern", peers, False, pub_sub(pub100, subscribers=1, qos="0")),
        ("S1-nl", f"pub→sub QoS 0, {n(100)} publishers, 1 wildcard subscriber: the highest rate with "
         "no loss at the subscriber", "throughput_msgs_per_s", "tern", peers, False, no_loss("0")),
        ("S2", f"pub→sub QoS 1, {n(100)} publishers, 1 wildcard subscriber", "throughput_msgs_per_s",
         "tern", peers, False, pub_sub(pub100 + ["--inflight", "16"], subscribers=1, qos="1")),
        ("S2-nl", f"pub→sub QoS 1, {n(100)} publishers, 1 wildcard subscriber: the highest rate with "
         "no loss at the subscriber", "throughput_msgs_per_s", "tern", peers, False, no_loss("1")),
        ("S5", f"fan-out: 1 publisher at 10 msg/s QoS 0 to {n(10000):,} subscribers of bench/#",
         "receive_rate_msgs_per_s", "tern", peers, False, fan_out),
        ("S2d", f"QoS 1 publish, durable before PUBACK, {n(100)} publishers at full speed", "throughput_msgs_per_s",
         "tern", peers + ["tern-kafka"], True, durable_publish()),
        ("S2d-fixed", f"QoS 1 durable publish at a fixed {n(100) * 100:,} msg/s ({n(100)} × 100/s): latency at equal load",
         "throughput_msgs_per_s", "tern", peers + ["tern-kafka"], True, durable_publish(rate=100)),
        ("S3", f"ingest: {n(10000):,} devices × 10 msg/s JSON telemetry (QoS 1) until stored as time series",
         "points_stored_per_s", "tern", ["tern-kafka"], True, ingest),
        ("S6", f"command round trip: {n(200):,} REST commands/s (synchronous) to {n(1000):,} devices "
         f"that publish 10 msg/s of telemetry meanwhile", "commands_per_s", "tern", [], True, commands),
        ("S7", "query: a year of per-minute data for one metric (525,600 points), chart queries at "
         "resolution auto, 1h and raw", "throughput_msgs_per_s", "tern", [], True, year_query),
        ("R1", f"rules: {n(1000):,} devices × 10 msg/s JSON telemetry (QoS 1) with a filter rule (alert on 1%) "
         "and a per-device 1-minute average running", "throughput_msgs_per_s", "tern", [], True, rules(n(1000))),
        ("R1-light", f"rules as R1 at a tenth of the load: {n(100):,} devices × 10 msg/s",
         "throughput_msgs_per_s", "tern", [], True, rules(n(100))),
        ("S4", f"{n(10000):,} idle connections, keepalive 60 s, offered at 5,000 connects/s (Tern: token-authenticated)", "connects_per_s",
         "tern", peers, False, connections),
    ]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--only", default="")
    parser.add_argument("--servers", default="", help="only these servers, e.g. tern (quick before/after checks)")
    parser.add_argument("--out", default=os.path.join(ROOT, "docs"))
    opts = parser.parse_args()
    limit = raise_fd_limit()
    only = set(filter(None, opts.only.split(",")))
    servers = set(filter(None, opts.servers.split(",")))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    with open("/proc/meminfo") as f:
        mem_gib = int(f.readline().split()[1]) / 1024 / 1024
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_gib, 1),
        "kernel": platform.release(),
        "duration_s": opts.duration,
        "scale": opts.scale,
        "fd_limit": limit,
        "versions": {
            "mosquitto": subprocess.run(["mosquitto", "-h"], capture_output=True, text=True).stdout.splitlines()[0],
            "nats-server": subprocess.run(["nats-server", "--version"], capture_output=True, text=True).stdout.strip(),
        },
    }
    results = []
    for sid, title, key, tern, peers, durable, fn in scenarios(opts.duration, opts.scale):
        if only and sid not in only:
            continue
        row = {"id": sid, "title": title, "key": key, "runs": {}}
        for name in ([tern] if tern else []) + peers:
            if servers and name not in servers:
                continue
            print(f"{sid} on {name} ...", file=sys.stderr, flush=True)
            try:
                row["runs"][name] = measure(name, durable, fn)
            except Exception as e:  # a failed run is reported, not hidden
                row["runs"][name] = {"error": str(e)}
        results.append(row)
    engine = None
    if not only or "E1" in only:
        print("E1 (rule engine, one core) ...", file=sys.stderr, flush=True)
        engine = rule_engine()
    kafka = None
    if not only or "K1" in only:
        print("K1 (Kafka log against a bare librdkafka producer) ...", file=sys.stderr, flush=True)
        kafka = cargo_bench("tern-eventlog", "kafka_producer")
    with open(os.path.join(opts.out, "benchmarks.json"), "w") as f:
        json.dump({"meta": meta, "results": results, "rule_engine": engine, "kafka_producer": kafka},
                  f, indent=2)
    with open(os.path.join(opts.out, "benchmarks.md"), "w") as f:
        f.write(render(meta, results, engine, kafka))
    print(f"wrote {opts.out}/benchmarks.md and benchmarks.json", file=sys.stderr)


def rule_engine():
    """E1: the rule state machine alone on one core (cargo bench, services/tern-analytics)."""
    return cargo_bench("tern-analytics", "rules")


def cargo_bench(package, bench):
    """Runs a `harness = false` cargo bench that prints its result as JSON on its last line."""
    out = subprocess.run(["cargo", "bench", "--locked", "-q", "-p", package, "--bench", bench],
                         cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": out.stderr.strip()[-500:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def render_kafka(k):
    """K1: Tern's Kafka producer path against a bare librdkafka producer (cargo bench)."""
    if not k:
        return []
    title = "## K1: the Kafka log's appends against a bare librdkafka producer"
    if "error" in k:
        return [title, "", f"failed: {k['error']}", ""]
    lines = [
        title,
        "",
        f"`cargo bench -p tern-eventlog --bench kafka_producer`: {fmt(k['records'])} records of "
        f"{k['value_bytes']} bytes keyed by 1,000 devices per load, from concurrent senders that",
        "each wait for their record's acknowledgement before sending the next (as devices wait for",
        "PUBACK), to one tansu broker in memory (no fsync), with the same producer settings on both",
        "sides (idempotent, `acks=all`, lz4, `linger.ms` 5). Goal from the issue: at least 80% of",
        "the bare producer's throughput, adding under 2 ms at p99.",
        "",
        "| senders | producer | records/s | ack p50 / p99 / p999 (ms) | Tern/bare | p99 added (ms) |",
        "|---|---|---|---|---|---|",
    ]
    for load in k["loads"]:
        b, t = load["bare"], load["tern"]
        lines += [
            f"| {fmt(load['senders'])} | bare librdkafka (`FutureProducer`) | {fmt(b['records_per_s'])} | "
            f"{b['p50_ms']} / {b['p99_ms']} / {b['p999_ms']} | | |",
            f"| {fmt(load['senders'])} | Tern's `KafkaLog::append` | {fmt(t['records_per_s'])} | "
            f"{t['p50_ms']} / {t['p99_ms']} / {t['p999_ms']} | {load['throughput_ratio']:.2f} | "
            f"{load['added_p99_ms']} |",
        ]
    return lines + [""]


def render_engine(e):
    if not e:
        return []
    if "error" in e:
        return ["## E1: rule engine, one core", "", f"failed: {e['error']}", ""]
    a = e["absence_5m"]
    return [
        "## E1: rule engine, one core",
        "",
        "The rule state machine alone (`cargo bench -p tern-analytics --bench rules`: no log, store",
        "or network), one thread. Goals from the issue: a filter above 5M events/s per core, a",
        "keyed window above 1M events/s per core.",
        "",
        "| rule | events/s | rows emitted | state per device |",
        "|---|---|---|---|",
        f"| filter `WHERE temp > 90`, 10,000 devices | {fmt(e['filter']['events_per_s'])} | "
        f"{fmt(e['filter']['rows'])} | none |",
        f"| 1-minute tumbling `avg(temp)` by device, 10,000 devices at 1 msg/s (60 per window) | "
        f"{fmt(e['tumbling_1m_avg']['events_per_s'])} | "
        f"{fmt(e['tumbling_1m_avg']['rows'])} | {fmt(e['state_bytes_per_device']['tumbling_1m_avg'])} bytes |",
    ] + ([
        f"| the same, one message per window (each closes one: a row per message) | "
        f"{fmt(e['tumbling_1m_avg_row_per_message']['events_per_s'])} | "
        f"{fmt(e['tumbling_1m_avg_row_per_message']['rows'])} | |",
    ] if "tumbling_1m_avg_row_per_message" in e else []) + [
        f"| `ABSENCE(INTERVAL '5' MINUTE)` by device, 100,000 devices | {fmt(a['events_per_s'])} | "
        f"{fmt(a['silent_reported'])} (one sweep) | {fmt(e['state_bytes_per_device']['absence_5m'])} bytes |",
        "",
        f"The absence rule's once-a-second sweep over 100,000 devices takes {a['sweep_nothing_new_ms']:.1f} ms when",
        f"nothing is new and {a['sweep_reporting_all_ms']:.1f} ms when it reports all of them silent.",
        "State per device is resident memory added per device (one open window, or one watched",
        "device), measured from /proc.",
        "",
    ]


def fmt(v, digits=0):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return f"{v:,}"


def received(r):
    """Deliveries to the subscriber(s), with the share of what was sent when there are any."""
    if not r.get("subscribers"):
        return "-"
    expected = r.get("sent", 0) * r.get("subscribed", r["subscribers"])
    share = f" ({100 * r['received'] / expected:.0f}% of sent)" if expected else ""
    missing = r["subscribers"] - r.get("subscribed", r["subscribers"])
    failed = f"; {missing:,} subscribers failed to subscribe" if missing else ""
    return f"{fmt(r.get('received'))}{share}{failed}"


def render(meta, results, engine=None, kafka=None):
    lines = [
        "# Benchmarks",
        "",
        "Generated by `make bench` (deploy/bench/bench.py); do not edit by hand. Every number below",
        "comes from one run on one machine, with the generator (tern-sim) on the same machine.",
        "",
        f"- date: {meta['date']}, commit `{meta['commit']}`",
        f"- machine: {meta['cores']} cores, {meta['memory_gib']} GiB, Linux {meta['kernel']}",
        f"- peers: {meta['versions']['mosquitto']}; {meta['versions']['nats-server']} (MQTT, JetStream)",
        f"- duration {meta['duration_s']} s per run, scale {meta['scale']}",
        "",
        "Durability differs between servers: Tern fsyncs the event log before every PUBACK (group",
        "commit); Mosquitto with `persistence true` saves its in-memory state periodically and on",
        "exit, not per message; nats-server stores MQTT QoS 1 messages in JetStream, which syncs",
        "to disk on an interval. The S2d rows are therefore Tern's durable path against the peers'",
        "best-effort persistence, which is the comparison a user makes when choosing, not a like",
        "for like one.",
        "",
    ]
    for row in results:
        lines += [f"## {row['id']}: {row['title']}", ""]
        lines += ["| server | rate (msg/s) | PUBACK p50 / p99 / p999 (µs) | sub p99 (µs) | received | connects/s |"
                  " server CPU (s) | server peak RSS (MiB) | generator CPU (% of a core) | notes |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        tern = row["runs"].get("tern", {})
        for name, r in row["runs"].items():
            if "error" in r:
                lines.append(f"| {name} | failed: {r['error'][:120]} | | | | | | | | |")
                continue
            ack = r.get("ack_latency") or {}
            e2e = r.get("end_to_end_latency") or {}
            note = ""
            if row["key"] == "points_stored_per_s":
                note = (f"{fmt(r.get('points_stored'))} points stored of {fmt(r.get('acked'))} acknowledged, "
                        f"{fmt(r.get('points_stored_per_s'))}/s from first publish to last stored; "
                        f"ingest caught up {r.get('drain_after_publish_s')} s after publishing stopped"
                        + (f", rollups {r['rollups_after_publish_s']} s" if "rollups_after_publish_s" in r else ""))
            if r.get("commands"):
                c = r["commands"]
                rtt = c.get("round_trip") or {}
                note = (f"{fmt(c.get('succeeded'))} of {fmt(c.get('sent'))} commands answered; round trip "
                        f"p50 {fmt(rtt.get('p50_us'))} µs, p99 {fmt(rtt.get('p99_us'))} µs, "
                        f"p999 {fmt(rtt.get('p999_us'))} µs")
                phases = c.get("phases") or {}
                if phases:
                    ms = lambda h, q: f"{round((h.get(q) or 0) / 1000):,}"
                    note += "; p50 / p99 ms of each step (the command's own history, ms clock): " + ", ".join(
                        f"{name} {ms(phases[key], 'p50_us')} / {ms(phases[key], 'p99_us')}"
                        for key, name in [("created", "request to created"), ("delivered", "to delivered"),
                                          ("answered", "to answered"), ("returned", "to REST answer")]
                        if key in phases)
            if r.get("query_auto"):
                q = lambda k: r[f"query_{k}"]
                note = (f"{fmt(r['points_loaded'])} points loaded in {r['load_s']} s; a year at `auto` "
                        f"({q('auto')['resolution']}, {q('auto')['points']} points): p50 {q('auto')['p50_ms']} ms, "
                        f"p99 {q('auto')['p99_ms']} ms; at 1h ({q('1h')['points']:,} points): p50 "
                        f"{q('1h')['p50_ms']} ms, p99 {q('1h')['p99_ms']} ms; the newest 10,000 raw points: "
                        f"p50 {q('raw_10k')['p50_ms']} ms, p99 {q('raw_10k')['p99_ms']} ms")
            if r.get("rules"):
                ru = r["rules"]
                note = (f"{fmt(ru['messages'])} messages evaluated by 2 rules, {fmt(ru['firings'])} rows acted on; "
                        f"publish to action (alert stored): mean {fmt(ru['mean_ms'], 2)} ms, p50 ≤ {fmt(ru['p50_le_ms'], 1)} ms, "
                        f"p99 ≤ {fmt(ru['p99_le_ms'], 1)} ms (histogram bucket bounds)")
            if "server_rss_with_connections_kib" in r and r.get("connected"):
                base = r.get("server_rss_provisioned_kib") or r["server_rss_before_kib"]
                per = (r["server_rss_with_connections_kib"] - base) / r["connected"]
                note = f"{r['connected']:,} connected; {per:.2f} KiB server RSS per connection"
            if r.get("trials"):
                def shown(t):
                    short = "" if t["lossless"] else " (%.1f%%)" % (100 * t["received_share"])
                    return f"{t['offered']:,}{short}"
                tried = ", ".join(shown(t) for t in r["trials"])
                top = (f"publishers paced at {fmt(r.get('throughput_msgs_per_s'))} msg/s with nothing lost"
                       if r.get("saturated") else f"lossless up to {fmt(r['no_loss_offered'])} msg/s offered")
                note = f"{top}; trials (offered msg/s, share received when short): {tried}"
            if r.get("broker_cpu_s") is not None:
                note += f"{'; ' if note else ''}tansu CPU {r['broker_cpu_s']} s (not in server CPU)"
            if name != "tern" and tern and "error" not in tern and tern.get(row["key"]) and r.get(row["key"]):
                note += f"{'; ' if note else ''}Tern/{name} = {tern[row['key']] / r[row['key']]:.2f}"
            lines.append(
                f"| {name} | {fmt(r.get('throughput_msgs_per_s'))} | "
                f"{fmt(ack.get('p50_us'))} / {fmt(ack.get('p99_us'))} / {fmt(ack.get('p999_us'))} | "
                f"{fmt(e2e.get('p99_us'))} | {received(r)} | {fmt(r.get('connects_per_s'))} | "
                f"{fmt(r.get('server_cpu_s'), 2)} | {fmt(r.get('server_peak_rss_kib', 0) / 1024, 1)} | "
                f"{fmt(r.get('generator_cpu_percent_of_one_core'))} | {note} |")
        lines.append("")
    lines += render_engine(engine)
    lines += render_kafka(kafka)
    notes = os.path.join(os.path.dirname(os.path.abspath(__file__)), "profiling-notes.md")
    if os.path.exists(notes):
        with open(notes) as f:
            lines += [f.read().rstrip(), ""]
    lines += [
        "## Not measured yet",
        "",
        "- S6 runs at 1,000 devices, not the issue's 100,000 connected devices.",
        "- In S1 and S2 the rate is what the publishers sent (QoS 0) or had acknowledged (QoS 1) at",
        "  full speed; `received` is what the one subscriber got. S1-nl and S2-nl search for the",
        "  highest rate without loss at the subscriber.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
