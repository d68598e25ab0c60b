//! Key encoding shared by the embedded store's keyspaces. Components are separated by 0x00, which
//! is refused inside components, so one tenant's or device's prefix never covers another's
//! (`t1` vs `t10`). Timestamps are stored sign-flipped big-endian so byte order is time order.

use crate::StoreError;

pub(crate) fn component<'a>(field: &'static str, value: &'a str) -> Result<&'a str, StoreError> {
    if value.is_empty() || value.len() > 256 || value.bytes().any(|b| b == 0) {
        return Err(StoreError::Invalid {
            field,
            reason: "must be 1..=256 bytes without NUL".into(),
        });
    }
    Ok(value)
}

/// `a 0 b 0 c 0 ...` for the given components.
pub(crate) fn prefix(parts: &[&str]) -> Vec<u8> {
    let mut key = Vec::with_capacity(parts.iter().map(|p| p.len() + 1).sum::<usize>() + 16);
    for part in parts {
        key.extend_from_slice(part.as_bytes());
        key.push(0);
    }
    key
}

pub(crate) fn encode_ts(ts_ms: i64) -> [u8; 8] {
    ((ts_ms as u64) ^ (1 << 63)).to_be_bytes()
}

pub(crate) fn decode_ts(bytes: &[u8]) -> Option<i64> {
    let array: [u8; 8] = bytes.try_into().ok()?;
    Some((u64::from_be_bytes(array) ^ (1 << 63)) as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_sort_in_time_order() {
        let times = [i64::MIN, -5, 0, 1, 1_700_000_000_000, i64::MAX];
        for pair in times.windows(2) {
            assert!(encode_ts(pair[0]) < encode_ts(pair[1]));
        }
        for t in times {
            assert_eq!(decode_ts(&encode_ts(t)), Some(t));
        }
    }

    #[test]
    fn components_with_nul_are_refused() {
        assert!(component("tenant", "a\0b").is_err());
        assert!(component("tenant", "").is_err());
        assert!(component("tenant", "acme").is_ok());
    }
}
