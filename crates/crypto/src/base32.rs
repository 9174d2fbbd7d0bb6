//! RFC 4648 base32, lowercase, no padding: readable and unambiguous when spoken.

const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";

pub(crate) fn encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(5) * 8);
    let (mut acc, mut bits) = (0u32, 0u32);
    for &b in bytes {
        acc = (acc << 8) | u32::from(b);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(char::from(ALPHABET[((acc >> bits) & 31) as usize]));
        }
    }
    if bits > 0 {
        out.push(char::from(ALPHABET[((acc << (5 - bits)) & 31) as usize]));
    }
    out
}

/// Decodes exactly `N` bytes, rejecting other lengths, foreign characters and
/// non-zero padding bits (so every value has one spelling).
pub(crate) fn decode<const N: usize>(text: &str) -> Option<[u8; N]> {
    if text.len() != (N * 8).div_ceil(5) {
        return None;
    }
    let mut out = [0u8; N];
    let (mut acc, mut bits, mut i) = (0u32, 0u32, 0usize);
    for c in text.bytes() {
        let v = ALPHABET.iter().position(|&a| a == c.to_ascii_lowercase())? as u32;
        acc = (acc << 5) | v;
        bits += 5;
        if bits >= 8 {
            bits -= 8;
            *out.get_mut(i)? = (acc >> bits) as u8;
            i += 1;
        }
        acc &= (1 << bits) - 1;
    }
    (acc == 0 && i == N).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_noise() {
        let bytes: [u8; 32] = core::array::from_fn(|i| (i * 37) as u8);
        let text = encode(&bytes);
        assert_eq!(text.len(), 52);
        assert_eq!(decode::<32>(&text), Some(bytes));
        assert_eq!(decode::<32>(&text.to_uppercase()), Some(bytes));
        assert_eq!(decode::<32>(&text[1..]), None);
        assert_eq!(decode::<32>(&text.replace('a', "1")), None);
        // The last character carries 2 padding bits that must be zero.
        let mut bad = text.clone();
        bad.pop();
        bad.push('7');
        assert_eq!(decode::<32>(&bad), None);
    }
}
