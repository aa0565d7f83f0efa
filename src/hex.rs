//! Lower-case hex for ids and digests in object names, manifests and messages.

pub fn encode(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Exactly `2 * N` hex digits, else `None`.
pub fn decode<const N: usize>(text: &str) -> Option<[u8; N]> {
    if text.len() != 2 * N || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn round_trips_and_refuses_wrong_lengths_and_digits() {
        let id = [0x00, 0x7f, 0xab, 0xff];
        assert_eq!(super::encode(&id), "007fabff");
        assert_eq!(super::decode::<4>("007fabff"), Some(id));
        assert_eq!(super::decode::<4>("007fab"), None);
        assert_eq!(super::decode::<2>("0g00"), None);
        assert_eq!(super::decode::<2>("+1ff"), None);
    }
}
