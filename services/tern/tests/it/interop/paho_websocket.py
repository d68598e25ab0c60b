"""MQTT over WebSocket with the Eclipse Paho Python client (Debian's python3-paho-mqtt).

Usage: paho_websocket.py PORT DEVICE TOKEN [CA_FILE]

Connects to ws://127.0.0.1:PORT/mqtt (subprotocol "mqtt"), or with CA_FILE to
wss://localhost:PORT/mqtt trusting that CA, with MQTT 3.1.1 and again with
MQTT 5, subscribes to its own topic, publishes QoS 1 and expects the message back; publishes
telemetry {"ws": 1} for the caller to find in the store. Prints "ok" or what went wrong.
"""

import sys
import threading

import paho.mqtt.client as mqtt

TIMEOUT = 15


def fail(why):
    print(why)
    sys.exit(1)


def round_trip(port, device, token, protocol, ca):
    c = mqtt.Client(client_id=device, protocol=protocol, transport="websockets")
    c.ws_set_options(path="/mqtt")
    if ca:
        c.tls_set(ca_certs=ca)
    c.username_pw_set(device, token)
    connected, subscribed, received = threading.Event(), threading.Event(), threading.Event()
    got = []
    c.on_connect = lambda *args: connected.set()
    c.on_subscribe = lambda *args: subscribed.set()

    def on_message(_client, _userdata, message):
        got.append((message.topic, message.payload))
        received.set()

    c.on_message = on_message
    c.connect("localhost" if ca else "127.0.0.1", port, keepalive=30)
    c.loop_start()
    if not connected.wait(TIMEOUT):
        fail(f"no CONNACK over WebSocket ({protocol})")
    c.subscribe("ws/echo", qos=1)
    if not subscribed.wait(TIMEOUT):
        fail("no SUBACK")
    c.publish("ws/echo", b"over websocket", qos=1).wait_for_publish(TIMEOUT)
    if not received.wait(TIMEOUT):
        fail("the message did not come back")
    if got[0] != ("ws/echo", b"over websocket"):
        fail(f"received {got[0]}")
    c.publish("telemetry", b'{"ws": 1}', qos=1).wait_for_publish(TIMEOUT)
    c.disconnect()
    c.loop_stop()


def main():
    port = int(sys.argv[1])
    device, token = sys.argv[2], sys.argv[3]
    ca = sys.argv[4] if len(sys.argv) > 4 else None
    round_trip(port, device, token, mqtt.MQTTv311, ca)
    round_trip(port, device, token, mqtt.MQTTv5, ca)
    print("ok")


if __name__ == "__main__":
    main()
