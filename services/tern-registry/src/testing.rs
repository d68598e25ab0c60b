//! Test support: a real NATS server (Debian's `nats-server`, which `make deps` installs) for the
//! routing tests and the end-to-end tests, one per test on a free loopback port.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use tern_eventlog::testing::{free_ports, listening};

/// A nats-server, killed when dropped.
pub struct NatsServer {
    child: Child,
    config: PathBuf,
    /// `nats://127.0.0.1:{port}`.
    pub url: String,
    /// The server's monitoring endpoint, `http://127.0.0.1:{port}` (`/subsz`, `/varz`).
    pub monitor_url: String,
}

impl NatsServer {
    /// Starts a server and waits until it accepts connections.
    ///
    /// # Panics
    /// When nats-server is not installed or does not listen: the test cannot run.
    pub fn start() -> Self {
        Self::start_with_config("")
    }

    /// Starts a server with `config` (nats-server's configuration format: `tls { ... }`,
    /// `authorization { ... }`); its listen and monitoring ports are picked here.
    ///
    /// # Panics
    /// As [`NatsServer::start`].
    pub fn start_with_config(config: &str) -> Self {
        static STARTED: AtomicU32 = AtomicU32::new(0);
        let file = std::env::temp_dir().join(format!(
            "tern-nats-{}-{}.conf",
            std::process::id(),
            STARTED.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&file, config).expect("nats-server config");
        // A server that dies at start-up (a port taken between the pick and its bind: once,
        // in a CI run, it was gone right after answering) is started again on other ports.
        for _ in 0..3 {
            let [port, monitor] = free_ports();
            let mut child = Command::new("nats-server")
                .args(["--addr", "127.0.0.1", "--port", &port.to_string()])
                .args(["--http_port", &monitor.to_string()])
                .arg("--config")
                .arg(&file)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("nats-server is not installed: run `make deps`");
            let address = format!("127.0.0.1:{port}");
            let monitoring = format!("127.0.0.1:{monitor}");
            if listening(&mut child, &address) && listening(&mut child, &monitoring) {
                std::thread::sleep(std::time::Duration::from_millis(50));
                if child.try_wait().ok().flatten().is_none() {
                    return Self {
                        child,
                        config: file,
                        url: format!("nats://{address}"),
                        monitor_url: format!("http://{monitoring}"),
                    };
                }
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("nats-server did not start on three pairs of free ports");
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.config);
    }
}
