//! Test support for the tests that run real servers (here and in the crates above): a real
//! Kafka-protocol broker, free ports, waiting for a server to listen, and waiting for a
//! condition. `tansu` (crates.io; `make deps` installs it) keeps everything in memory and
//! starts in well under a second, so each test gets its own broker on a free loopback port.

use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// `N` distinct free loopback ports (all held at once while picked, so none repeats).
pub fn free_ports<const N: usize>() -> [u16; N] {
    let listeners = [(); N].map(|()| TcpListener::bind("127.0.0.1:0").expect("a free port"));
    listeners
        .each_ref()
        .map(|l| l.local_addr().expect("bound").port())
}

/// Waits until `child` accepts connections on `address`.
///
/// # Panics
/// When it exits or does not listen within 20 s (killing it): the test cannot run.
pub fn wait_listening(child: &mut Child, address: &str, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(address).is_err() {
        if Instant::now() > deadline || child.try_wait().ok().flatten().is_some() {
            let _ = child.kill();
            panic!("{what} did not listen on {address}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Retries `condition` until it holds or 10 s pass (what happens in another task or process
/// takes effect asynchronously); returns whether it held.
pub async fn eventually<F: AsyncFnMut() -> bool>(mut condition: F) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if condition().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

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
    /// When tansu is not installed or does not listen: the test cannot run.
    pub fn start() -> Self {
        let [port] = free_ports();
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
        wait_listening(&mut child, &address, "tansu");
        Self { child, address }
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
