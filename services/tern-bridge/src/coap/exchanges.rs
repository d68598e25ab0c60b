//! Message deduplication (RFC 7252 section 4.5): a retransmitted request (same peer, same
//! message id, within EXCHANGE_LIFETIME) is answered with the response already sent, or
//! ignored while the first copy is still being handled, so a retransmitted telemetry POST is
//! never stored twice.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// RFC 7252 section 4.8.2, with the default transmission parameters.
const EXCHANGE_LIFETIME: Duration = Duration::from_secs(247);
/// How often old exchanges are swept out.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// What a request's message id says about it.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Seen {
    New,
    /// A retransmission; the response to send again, if the first copy has been answered.
    Again(Option<Vec<u8>>),
    /// Too many exchanges are remembered: the request is refused (5.03) rather than let the
    /// table grow without bound.
    Full,
}

/// When an exchange began, and the response once sent.
type Exchange = (Instant, Option<Vec<u8>>);

pub(crate) struct Exchanges {
    entries: HashMap<(SocketAddr, u16), Exchange>,
    max: usize,
    swept: Instant,
}

impl Exchanges {
    pub fn new(max: usize) -> Self {
        Self {
            entries: HashMap::new(),
            max,
            swept: Instant::now(),
        }
    }

    pub fn begin(&mut self, peer: SocketAddr, message_id: u16, now: Instant) -> Seen {
        if now.duration_since(self.swept) >= SWEEP_EVERY {
            self.entries
                .retain(|_, (at, _)| now.duration_since(*at) < EXCHANGE_LIFETIME);
            self.swept = now;
        }
        if let Some((_, response)) = self.entries.get(&(peer, message_id)) {
            return Seen::Again(response.clone());
        }
        if self.entries.len() >= self.max {
            return Seen::Full;
        }
        self.entries.insert((peer, message_id), (now, None));
        Seen::New
    }

    /// Remembers the response sent, for retransmissions of the request.
    pub fn answered(&mut self, peer: SocketAddr, message_id: u16, response: Vec<u8>) {
        if let Some(entry) = self.entries.get_mut(&(peer, message_id)) {
            entry.1 = Some(response);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retransmissions_get_the_same_answer_until_the_exchange_lifetime_ends() {
        let peer: SocketAddr = "127.0.0.1:5000".parse().expect("addr");
        let other: SocketAddr = "127.0.0.1:5001".parse().expect("addr");
        let mut exchanges = Exchanges::new(2);
        let t0 = Instant::now();
        assert_eq!(exchanges.begin(peer, 7, t0), Seen::New);
        assert_eq!(
            exchanges.begin(peer, 7, t0),
            Seen::Again(None),
            "in progress"
        );
        exchanges.answered(peer, 7, b"ack".to_vec());
        assert_eq!(
            exchanges.begin(peer, 7, t0),
            Seen::Again(Some(b"ack".to_vec()))
        );
        assert_eq!(exchanges.begin(other, 7, t0), Seen::New, "ids are per peer");
        assert_eq!(exchanges.begin(peer, 8, t0), Seen::Full);
        let later = t0 + EXCHANGE_LIFETIME;
        assert_eq!(exchanges.begin(peer, 7, later), Seen::New, "forgotten");
    }
}
