//! Test support: a real Kafka-protocol broker for the Kafka log's tests and the end-to-end
//! tests. `tansu` (crates.io; `make deps` installs it) keeps everything in memory and starts in
//! well under a second, so each test gets its own broker on a free loopback port.

use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A tansu broker, killed when dropped.
pub struct Tansu {
    child: Child,
    /// `127.0.0.1:{port}`, for `bootstrap.servers`.
    pub address: String,
}

impl Tansu {
    /// Starts a broker and waits until it accepts connections.
    ///
    /// # Panics
    /// When tansu is not installed or does not listen within 20 s: the test cannot run.
    pub fn start() -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        let url = format!("tcp://127.0.0.1:{port}");
        let mut child = Command::new("tansu")
            .args(["broker", "--listener-url", &url])
            .args(["--advertised-listener-url", &url])
            .args(["--storage-engine", "memory://tansu/"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("tansu is not installed: run `make deps`");
        let address = format!("127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(&address).is_err() {
            if Instant::now() > deadline || child.try_wait().ok().flatten().is_some() {
                let _ = child.kill();
                panic!("tansu did not listen on {address}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { child, address }
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
