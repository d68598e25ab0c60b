"""MQTT 5 interoperability with the Eclipse Paho Python client (Debian's python3-paho-mqtt).

Usage: paho_mqtt5.py PORT SUB_DEVICE SUB_TOKEN PUB_DEVICE PUB_TOKEN

Checks, against a running Tern: a CONNECT with a bad token is refused with reason code 134
(bad user name or password); a subscription with a subscription identifier receives a QoS 1
publish carrying a response topic, correlation data and a user property unaltered, plus the
identifier. Prints "ok" and exits 0, or prints what went wrong and exits 1.
"""

import sys
import threading

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

TIMEOUT = 15


def client(device, token):
    c = mqtt.Client(client_id=device, protocol=mqtt.MQTTv5)
    c.username_pw_set(device, token)
    return c


def connect(c, port):
    """Connects and returns the CONNACK reason code (an int)."""
    done = threading.Event()
    result = {}

    def on_connect(_client, _userdata, _flags, reason, _properties):
        result["rc"] = reason.value
        done.set()

    c.on_connect = on_connect
    c.connect("127.0.0.1", port, keepalive=30, clean_start=True)
    c.loop_start()
    if not done.wait(TIMEOUT):
        fail("no CONNACK")
    return result["rc"]


def fail(why):
    print(why)
    sys.exit(1)


def main():
    port = int(sys.argv[1])
    sub_device, sub_token, pub_device, pub_token = sys.argv[2:6]

    refused = client(pub_device, "not-a-token")
    rc = connect(refused, port)
    refused.loop_stop()
    if rc != 134:
        fail(f"bad token: expected reason code 134, got {rc}")

    sub = client(sub_device, sub_token)
    if connect(sub, port) != 0:
        fail("subscriber refused")
    subscribed = threading.Event()
    received = threading.Event()
    messages = []
    sub.on_subscribe = lambda *_args: subscribed.set()

    def on_message(_client, _userdata, message):
        messages.append(message)
        received.set()

    sub.on_message = on_message
    sub_props = Properties(PacketTypes.SUBSCRIBE)
    sub_props.SubscriptionIdentifier = 5
    sub.subscribe(("paho/#", SubscribeOptions(qos=1)), properties=sub_props)
    if not subscribed.wait(TIMEOUT):
        fail("no SUBACK")

    pub = client(pub_device, pub_token)
    if connect(pub, port) != 0:
        fail("publisher refused")
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = "paho/answers"
    props.CorrelationData = b"corr-1"
    props.UserProperty = ("origin", "paho")
    info = pub.publish("paho/ask", b"question", qos=1, properties=props)
    info.wait_for_publish(TIMEOUT)
    if not info.is_published():
        fail("no PUBACK")

    if not received.wait(TIMEOUT):
        fail("the subscriber received nothing")
    m = messages[0]
    got = {
        "topic": m.topic,
        "payload": m.payload,
        "qos": m.qos,
        "response_topic": getattr(m.properties, "ResponseTopic", None),
        "correlation": getattr(m.properties, "CorrelationData", None),
        "user": getattr(m.properties, "UserProperty", None),
        "ids": getattr(m.properties, "SubscriptionIdentifier", None),
    }
    expected = {
        "topic": "paho/ask",
        "payload": b"question",
        "qos": 1,
        "response_topic": "paho/answers",
        "correlation": b"corr-1",
        "user": [("origin", "paho")],
        "ids": [5],
    }
    if got != expected:
        fail(f"received {got}, expected {expected}")
    for c in (sub, pub):
        c.disconnect()
        c.loop_stop()
    print("ok")


if __name__ == "__main__":
    main()
