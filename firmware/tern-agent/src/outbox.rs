//! Everything the agent publishes goes through this on-disk queue: telemetry, command answers
//! and twin reports. A message is a file (`{seq:020}.msg`: the topic, a newline, the payload)
//! written before it is sent and deleted once the platform acknowledged it, so messages
//! survive network loss and restarts and are sent in the order they were made. Past
//! `max_messages` the oldest are dropped (and counted) so a long outage cannot fill the disk.

use std::collections::VecDeque;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context;
use tokio::sync::Notify;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub seq: u64,
    pub topic: String,
    pub payload: Vec<u8>,
}

pub struct Outbox {
    dir: PathBuf,
    max_messages: usize,
    queue: Mutex<Queue>,
    dropped: AtomicU64,
    /// Woken when a message is added (the sender) or removed (waiters for delivery).
    changed: Notify,
}

struct Queue {
    messages: VecDeque<Message>,
    next_seq: u64,
}

impl Outbox {
    pub fn open(dir: &Path, max_messages: usize) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let mut messages = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            let Some(seq) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".msg"))
                .and_then(|n| n.parse::<u64>().ok())
            else {
                // Half-written files of a crash, or foreign files: not messages.
                continue;
            };
            let bytes =
                std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
            let Some(newline) = bytes.iter().position(|b| *b == b'\n') else {
                tracing::warn!(file = %path.display(), "dropping a malformed buffered message");
                let _ = std::fs::remove_file(&path);
                continue;
            };
            messages.push(Message {
                seq,
                topic: String::from_utf8_lossy(&bytes[..newline]).into_owned(),
                payload: bytes[newline + 1..].to_vec(),
            });
        }
        messages.sort_by_key(|m| m.seq);
        let next_seq = messages.last().map_or(1, |m| m.seq + 1);
        Ok(Self {
            dir: dir.to_path_buf(),
            max_messages,
            queue: Mutex::new(Queue {
                messages: messages.into(),
                next_seq,
            }),
            dropped: AtomicU64::new(0),
            changed: Notify::new(),
        })
    }

    fn file(&self, seq: u64) -> PathBuf {
        self.dir.join(format!("{seq:020}.msg"))
    }

    /// Stores a message durably and queues it; returns its sequence number.
    pub fn push(&self, topic: &str, payload: &[u8]) -> anyhow::Result<u64> {
        let mut queue = self.queue.lock().expect("outbox lock");
        let seq = queue.next_seq;
        let temporary = self.dir.join(format!("{seq:020}.tmp"));
        let mut file = std::fs::File::create(&temporary)
            .with_context(|| format!("cannot write {}", temporary.display()))?;
        file.write_all(topic.as_bytes())?;
        file.write_all(b"\n")?;
        file.write_all(payload)?;
        file.sync_data()?;
        std::fs::rename(&temporary, self.file(seq))?;
        queue.next_seq += 1;
        queue.messages.push_back(Message {
            seq,
            topic: topic.to_string(),
            payload: payload.to_vec(),
        });
        while queue.messages.len() > self.max_messages {
            let oldest = queue.messages.pop_front().expect("over the bound");
            let _ = std::fs::remove_file(self.file(oldest.seq));
            self.dropped.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(topic = %oldest.topic, "buffer full: dropped the oldest message");
        }
        drop(queue);
        self.changed.notify_waiters();
        Ok(seq)
    }

    /// Up to `n` messages after `after` (all from the start with `None`), oldest first.
    pub fn after(&self, after: Option<u64>, n: usize) -> Vec<Message> {
        let queue = self.queue.lock().expect("outbox lock");
        queue
            .messages
            .iter()
            .filter(|m| after.is_none_or(|a| m.seq > a))
            .take(n)
            .cloned()
            .collect()
    }

    /// Forgets a delivered message.
    pub fn remove(&self, seq: u64) {
        let mut queue = self.queue.lock().expect("outbox lock");
        if let Some(at) = queue.messages.iter().position(|m| m.seq == seq) {
            queue.messages.remove(at);
            let _ = std::fs::remove_file(self.file(seq));
        }
        drop(queue);
        self.changed.notify_waiters();
    }

    pub fn len(&self) -> usize {
        self.queue.lock().expect("outbox lock").messages.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    fn holds(&self, seq: u64) -> bool {
        let queue = self.queue.lock().expect("outbox lock");
        queue.messages.iter().any(|m| m.seq == seq)
    }

    /// Completes when something is added or removed after this call.
    pub fn changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.changed.notified()
    }

    /// Waits until message `seq` has been delivered (or dropped).
    pub async fn delivered(&self, seq: u64) {
        loop {
            let changed = self.changed.notified();
            if !self.holds(seq) {
                return;
            }
            changed.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_survive_a_reopen_in_order_until_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let outbox = Outbox::open(dir.path(), 100).expect("open");
        let a = outbox.push("telemetry", b"{\"n\":1}").expect("push");
        let b = outbox
            .push("command/res/x/200", b"ok\nwith newline")
            .expect("push");
        outbox.push("telemetry", b"{\"n\":3}").expect("push");
        outbox.remove(a);
        drop(outbox);

        let outbox = Outbox::open(dir.path(), 100).expect("reopen");
        let all = outbox.after(None, 10);
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].seq, b);
        assert_eq!(all[0].topic, "command/res/x/200");
        assert_eq!(all[0].payload, b"ok\nwith newline");
        assert_eq!(outbox.after(Some(b), 10).len(), 1);
        let c = outbox.push("telemetry", b"{}").expect("push");
        assert!(
            c > all[1].seq,
            "sequence numbers keep growing after a reopen"
        );
    }

    #[test]
    fn past_the_bound_the_oldest_go_first() {
        let dir = tempfile::tempdir().expect("tempdir");
        let outbox = Outbox::open(dir.path(), 3).expect("open");
        for n in 0..5 {
            outbox
                .push("telemetry", format!("{n}").as_bytes())
                .expect("push");
        }
        let kept: Vec<_> = outbox
            .after(None, 10)
            .into_iter()
            .map(|m| String::from_utf8(m.payload).expect("utf8"))
            .collect();
        assert_eq!(kept, ["2", "3", "4"]);
        assert_eq!(outbox.dropped(), 2);
        assert_eq!(std::fs::read_dir(dir.path()).expect("dir").count(), 3);
    }
}
