#!/usr/bin/python3
"""Publishes a year of per-minute samples of one metric for one device (device timestamps)
over MQTT QoS 1, for S7. Runs under Debian's python3 with python3-paho-mqtt (make deps).

  load_history.py HOST PORT DEVICE_ID TOKEN METRIC DAYS

Prints `start end count` (ms, ms, messages) once every message is acknowledged.
"""

import sys
import threading
import time

import paho.mqtt.client as mqtt

host, port, device, token, metric, days = sys.argv[1:7]
MINUTE = 60_000
end = int(time.time() * 1000) // MINUTE * MINUTE
start = end - int(days) * 24 * 60 * MINUTE
count = (end - start) // MINUTE
done = threading.Event()
acked = 0
# Paho numbers messages 1..65535 and reuses numbers of queued messages when more are queued,
# so the number queued but not acknowledged stays well below that.
room = threading.Semaphore(10_000)


def on_publish(client, userdata, mid):
    global acked
    acked += 1
    room.release()
    if acked == count:
        done.set()


client = mqtt.Client(client_id=device)
client.username_pw_set(device, token)
client.max_inflight_messages_set(1000)
client.max_queued_messages_set(0)
client.on_publish = on_publish
client.connect(host, int(port))
client.loop_start()
for ts in range(start, end, MINUTE):
    value = 20 + 10 * ((ts // MINUTE) % 1440) / 1440
    room.acquire()
    client.publish("telemetry", f'{{"{metric}": {value:.3f}, "ts": {ts}}}', qos=1)
if not done.wait(timeout=1800):
    sys.exit(f"only {acked} of {count} acknowledged")
client.loop_stop()
client.disconnect()
print(start, end, count)
