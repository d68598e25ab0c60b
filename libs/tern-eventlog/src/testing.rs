//! Test support for the tests that run real servers (here and in the crates above): a real
//! Kafka-protocol broker, free ports, waiting for a server to listen, and waiting for a
//! condition. `tansu` (crates.io; `make deps` installs it) keeps everything in memory and
//! starts in well under a second, so each test gets its own broker on a free loopback port.

use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A free loopback port (TCP and UDP) for a server a test starts. Taken from below the
/// kernel's ephemeral range, so that no outgoing connection of a test running beside it can
/// take the port between this check and the server's bind (port 0 would pick from that
/// range); handed out once per process, from a start that differs between processes.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const LOW: u32 = 10_000;
    let high = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768)
        .clamp(LOW + 1_000, 65_535);
    let span = high - LOW;
    let _ = NEXT.compare_exchange(
        0,
        std::process::id() * 97 % span,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    for _ in 0..span {
        let port = (LOW + NEXT.fetch_add(1, Ordering::Relaxed) % span) as u16;
        let free = TcpListener::bind(("127.0.0.1", port)).is_ok()
            && std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok();
        if free {
            return port;
        }
    }
    panic!("no free port in {LOW}..{high}");
}

/// `N` distinct free loopback ports.
pub fn free_ports<const N: usize>() -> [u16; N] {
    std::array::from_fn(|_| free_port())
}

/// Waits until `child` accepts connections on `address`.
///
/// # Panics
/// When it exits or does not listen within 20 s (killing it): the test cannot run.
pub fn wait_listening(child: &mut Child, address: &str, what: &str) {
    if !listening(child, address) {
        let _ = child.kill();
        panic!("{what} did not listen on {address}");
    }
}

/// Whether `child` accepts connections on `address` within 20 s (false once it exits).
pub fn listening(child: &mut Child, address: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(address).is_err() {
        if Instant::now() > deadline || child.try_wait().ok().flatten().is_some() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
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
