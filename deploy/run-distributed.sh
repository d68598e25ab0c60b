#!/usr/bin/env bash
# `make run-distributed`: the distributed backends on one machine. Starts nats-server (:4222), a
# Kafka-protocol broker (tansu, :9092, in memory) and the served store (`tern store`, :50052),
# then Tern on them: the event log on Kafka, command routing over NATS, the store served.
# Ctrl-C stops them all.
#
# Today the services still run as one process (`tern up`); they become separate processes here
# as the per-service commands arrive (#8).
set -euo pipefail
cd "$(dirname "$0")/.."

NATS_PORT=${NATS_PORT:-4222}
KAFKA_PORT=${KAFKA_PORT:-9092}
STORE_PORT=${STORE_PORT:-50052}
DATA=${DATA:-./data-distributed}
mkdir -p "$DATA"

pids=()
stop() {
	trap - INT TERM EXIT
	for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
	wait 2>/dev/null || true
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
TERN_EVENTLOG__BACKEND=kafka \
TERN_EVENTLOG__KAFKA__BROKERS="127.0.0.1:$KAFKA_PORT" \
TERN_EVENTLOG__KAFKA__REPLICATION_FACTOR=1 \
TERN_EVENTLOG__KAFKA__FETCH_WAIT_MAX_MS=10 \
TERN_ROUTING__BACKEND=nats \
TERN_ROUTING__NATS__URL="nats://127.0.0.1:$NATS_PORT" \
TERN_STORE__URL="http://127.0.0.1:$STORE_PORT" \
TERN_STORE__TOKEN_FILE="$DATA/store.token" \
	bin/tern up --data-dir "$DATA/tern" "$@" &
pids+=($!)
wait "${pids[-1]}"
