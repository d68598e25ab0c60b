//! Test support: a real NATS server (Debian's `nats-server`, which `make deps` installs) for the
//! routing tests and the end-to-end tests, one per test on a free loopback port.

use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A nats-server, killed when dropped.
pub struct NatsServer {
    child: Child,
    /// `nats://127.0.0.1:{port}`.
    pub url: String,
    /// The server's monitoring endpoint, `http://127.0.0.1:{port}` (`/subsz`, `/varz`).
    pub monitor_url: String,
}

impl NatsServer {
    /// Starts a server and waits until it accepts connections.
    ///
    /// # Panics
    /// When nats-server is not installed or does not listen within 20 s: the test cannot run.
    pub fn start() -> Self {
        // Both listeners held at once, so the two ports differ.
        let listeners = [(); 2].map(|()| TcpListener::bind("127.0.0.1:0").expect("a free port"));
        let [port, monitor] = listeners
            .each_ref()
            .map(|l| l.local_addr().expect("bound").port());
        drop(listeners);
        let mut child = Command::new("nats-server")
            .args(["--addr", "127.0.0.1", "--port", &port.to_string()])
            .args(["--http_port", &monitor.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server is not installed: run `make deps`");
        let address = format!("127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(&address).is_err() {
            if Instant::now() > deadline || child.try_wait().ok().flatten().is_some() {
                let _ = child.kill();
                panic!("nats-server did not listen on {address}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Self {
            child,
            url: format!("nats://{address}"),
            monitor_url: format!("http://127.0.0.1:{monitor}"),
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
