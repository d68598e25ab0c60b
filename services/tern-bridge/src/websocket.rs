//! MQTT over WebSocket (MQTT 5.0 section 6, 3.1.1 section 6): `GET /mqtt` on the HTTP port,
//! subprotocol `mqtt`, MQTT packets in binary messages. This is how browsers connect. The same
//! route is served over TLS (WSS) on its own port, with the MQTT TLS certificate.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tern_runtime::Shutdown;
use tokio_util::io::{CopyToBytes, SinkWriter, StreamReader};

use crate::Bridge;
use crate::connection::{self, AsyncStream, Io};

/// The WebSocket path and subprotocol MQTT clients use.
pub const WEBSOCKET_PATH: &str = "/mqtt";
const SUBPROTOCOL: &str = "mqtt";

type Shared = State<(Arc<Bridge>, Shutdown, &'static str)>;

/// The `/mqtt` route, to merge into the HTTP server. The server must be run with
/// `into_make_service_with_connect_info::<SocketAddr>()`. Connections end on `shutdown`.
pub fn websocket_routes(bridge: Arc<Bridge>, shutdown: Shutdown) -> Router {
    routes(bridge, shutdown, "websocket")
}

fn routes(bridge: Arc<Bridge>, shutdown: Shutdown, transport: &'static str) -> Router {
    Router::new()
        .route(WEBSOCKET_PATH, get(upgrade))
        .with_state((bridge, shutdown, transport))
}

/// Serves `/mqtt` (HTTP/1.1 and its upgrade) on one TLS connection of the WSS port.
pub(crate) async fn serve_wss(
    bridge: Arc<Bridge>,
    stream: impl AsyncStream + 'static,
    peer: SocketAddr,
    shutdown: Shutdown,
) {
    let service =
        routes(bridge, shutdown, "websocket_tls").layer(axum::Extension(ConnectInfo(peer)));
    let served = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(stream), TowerToHyperService::new(service))
        .with_upgrades()
        .await;
    if let Err(e) = served {
        tracing::debug!(%peer, error = %e, "WSS connection ended with an error");
    }
}

async fn upgrade(
    State((bridge, shutdown, transport)): Shared,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    ws: WebSocketUpgrade,
) -> Response {
    let ws = ws.protocols([SUBPROTOCOL]);
    if ws.selected_protocol() != Some(&HeaderValue::from_static(SUBPROTOCOL)) {
        // 6.0 (5.0): the client MUST include "mqtt" in the subprotocols it offers.
        return (
            StatusCode::BAD_REQUEST,
            "MQTT over WebSocket needs the `mqtt` subprotocol (Sec-WebSocket-Protocol: mqtt)\n",
        )
            .into_response();
    }
    if shutdown.is_cancelled() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response();
    }
    let Some(permit) = bridge.admit(peer) else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "connection limit reached\n",
        )
            .into_response();
    };
    // A WebSocket message may carry at most one maximum MQTT packet (plus its fixed header).
    let max = bridge.config.max_packet_size + 5;
    ws.max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| {
            // Tracked with the other connections, so that shutdown waits for it to drain.
            let tracker = bridge.connections.clone();
            tracker.track_future(async move {
                let io = Io::stream(byte_stream(socket));
                connection::run(bridge, io, peer, transport, shutdown).await;
                drop(permit);
            })
        })
}

/// The WebSocket as a byte stream: binary messages in, one binary message per write out.
fn byte_stream(socket: WebSocket) -> impl AsyncStream {
    let (sink, stream) = socket.split();
    let incoming = stream.filter_map(|message| async move {
        match message {
            Ok(Message::Binary(bytes)) => Some(Ok(bytes)),
            Ok(Message::Text(_)) => Some(Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "MQTT over WebSocket uses binary messages, not text",
            ))),
            // Pings are answered by the WebSocket layer; a close ends the stream after it.
            Ok(Message::Ping(_) | Message::Pong(_) | Message::Close(_)) => None,
            Err(e) => Some(Err(io::Error::other(e))),
        }
    });
    let outgoing = sink
        .with(|bytes: Bytes| async move { Ok::<_, axum::Error>(Message::Binary(bytes)) })
        .sink_map_err(io::Error::other);
    tokio::io::join(
        StreamReader::new(Box::pin(incoming)),
        SinkWriter::new(CopyToBytes::new(Box::pin(outgoing))),
    )
}
