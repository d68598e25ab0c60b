//! End-to-end tests: the real `tern` binary on free loopback ports in a temporary directory,
//! driven by the CLI, real MQTT clients (Debian's mosquitto_pub and rumqttc), raw TCP, reqwest
//! and a tonic gRPC client.

mod harness;

mod agent;
mod anonymous;
mod browser;
mod coap;
mod commands;
mod config_errors;
mod dashboard;
mod device_edge;
mod device_http;
mod durability;
mod gateways;
mod grpc;
mod kafka;
mod ldap;
mod mqtt311;
mod mqtt5;
mod nats;
mod oauth;
mod policies;
mod pubsub;
mod quotas;
mod reauth;
mod rest_api;
mod revocation;
mod rollups;
mod rules;
mod selectors;
mod served_store;
mod services;
mod sessions;
mod simulator;
mod tenancy;
mod tls;
mod traces;
mod twins;
mod webdriver;
mod websocket;
