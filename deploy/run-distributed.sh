#!/usr/bin/env bash
# `make run-distributed`: the distributed shape on one machine. Starts nats-server (:4222), a
# Kafka-protocol broker (tansu, :9092, in memory) and the served store (`tern store`, :50052),
# then every service as its own process on them: the event log on Kafka, command routing over
# NATS, the store served. Ctrl-C stops them all.
#
# Where to reach them (docs/distributed.md):
#   REST API  http://127.0.0.1:8080 (tern gateway)   MQTT 1883, CoAP 5683 (tern bridge)
#   OAuth     http://127.0.0.1:8081 (tern identity)  gRPC Registry 50051 (tern registry)
#   Pages     http://127.0.0.1:8086 (tern dashboard)
# In a cluster one ingress puts these under one origin (the chart's `ingress` values); on
# loopback they keep their own ports, so the dashboard's pages (which call /api/v1 on their own
# origin) and the OAuth issuer (named after the gateway's URL) are whole only behind such a
# front. `make run` has everything on :8080.
set -euo pipefail
cd "$(dirname "$0")/.."

NATS_PORT=${NATS_PORT:-4222}
KAFKA_PORT=${KAFKA_PORT:-9092}
STORE_PORT=${STORE_PORT:-50052}
DATA=${DATA:-./data-distributed}
mkdir -p "$DATA"

pids=()
# Last started, first stopped: the services drain into the brokers and the store before those go.
stop() {
	trap - INT TERM EXIT
	for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
		kill "${pids[i]}" 2>/dev/null || true
		wait "${pids[i]}" 2>/dev/null || true
	done
}
trap stop INT TERM EXIT

wait_port() {
	for _ in $(seq 100); do
		(exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
		sleep 0.1
	done
	echo "$2 did not listen on :$1" >&2
	exit 1
}

nats-server --addr 127.0.0.1 --port "$NATS_PORT" >"$DATA/nats.log" 2>&1 &
pids+=($!)
wait_port "$NATS_PORT" nats-server
tansu broker --listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
	--advertised-listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
	--storage-engine memory://tansu/ >"$DATA/kafka.log" 2>&1 &
pids+=($!)
wait_port "$KAFKA_PORT" tansu
# The store's shared secret: made once, kept with the data.
if [ ! -s "$DATA/store.token" ]; then
	(umask 077 && head -c 32 /dev/urandom | base64 >"$DATA/store.token")
fi
bin/tern store --data-dir "$DATA/store" --listen "127.0.0.1:$STORE_PORT" \
	--token-file "$DATA/store.token" >"$DATA/store.log" 2>&1 &
pids+=($!)
wait_port "$STORE_PORT" "tern store"
echo "nats-server on :$NATS_PORT, Kafka (tansu) on :$KAFKA_PORT, the store on :$STORE_PORT; logs in $DATA" >&2

# One broker: replication 1. tansu holds fetches for the whole wait, so keep it short.
export TERN_EVENTLOG__BACKEND=kafka \
	TERN_EVENTLOG__KAFKA__BROKERS="127.0.0.1:$KAFKA_PORT" \
	TERN_EVENTLOG__KAFKA__REPLICATION_FACTOR=1 \
	TERN_EVENTLOG__KAFKA__FETCH_WAIT_MAX_MS=10 \
	TERN_ROUTING__BACKEND=nats \
	TERN_ROUTING__NATS__URL="nats://127.0.0.1:$NATS_PORT" \
	TERN_STORE__URL="http://127.0.0.1:$STORE_PORT" \
	TERN_STORE__TOKEN_FILE="$DATA/store.token" \
	TERN_IDENTITY__PUBLIC_URL=${TERN_IDENTITY__PUBLIC_URL:-http://localhost:8080}

# service NAME HTTP_PORT GRPC_PORT [flags]: `tern NAME` on loopback, its log in $DATA/NAME.log.
# They share $DATA/tern, where `tern identity` writes the operator token (admin.token).
service() {
	local name=$1 http=$2 grpc=$3
	shift 3
	bin/tern "$name" --bind 127.0.0.1 --data-dir "$DATA/tern" --http-port "$http" \
		--grpc-port "$grpc" "$@" >"$DATA/$name.log" 2>&1 &
	pids+=($!)
	wait_port "$http" "tern $name"
}
service identity 8081 50054
service registry 8082 50051
service gateway 8080 50055
service analytics 8083 50056
service bridge 8085 50057 --mqtt-port 1883 --coap-port 5683
service dashboard 8086 50058
echo "every service is up; logs in $DATA; the operator token is $DATA/tern/admin.token" >&2
wait -n "${pids[@]}"
echo "a process stopped; stopping the others" >&2
