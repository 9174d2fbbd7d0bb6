//! Seeds: every simulation is built from one `u64` and replays exactly from it.

use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};

use crate::SimError;

/// The environment variable that overrides a test's default seed, so a seed printed
/// by a failing CI run can be replayed locally.
pub const SEED_ENV: &str = "PEERCALL_SIM_SEED";

/// The seed in [`SEED_ENV`] when it is set, else `default`.
///
/// The value is decimal or `0x`-prefixed hexadecimal. An unset or empty variable
/// gives `default`; anything else that is not a u64 is an error naming the value.
pub fn seed_from_env(default: u64) -> Result<u64, SimError> {
    parse_seed(std::env::var(SEED_ENV).ok().as_deref(), default)
}

pub(crate) fn parse_seed(value: Option<&str>, default: u64) -> Result<u64, SimError> {
    let Some(raw) = value else {
        return Ok(default);
    };
    let text = raw.trim();
    if text.is_empty() {
        return Ok(default);
    }
    let parsed = match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => text.parse::<u64>(),
    };
    parsed.map_err(|e| SimError::BadSeed {
        value: raw.to_owned(),
        reason: e.to_string(),
    })
}

/// Independent random streams derived from one simulation seed.
///
/// Stream 0 drives the network; [`Seeds::derive`] hands out per-node seeds from a
/// separate key, so how many node seeds a test draws never shifts the network's
/// random choices.
#[derive(Debug, Clone)]
pub(crate) struct Seeds {
    derive_key: [u8; 32],
}

impl Seeds {
    /// Which ChaCha stream of the seed's key holds the derivation key.
    const DERIVE_KEY_STREAM: u64 = 1;

    pub(crate) fn new(seed: u64) -> Seeds {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        rng.set_stream(Self::DERIVE_KEY_STREAM);
        let mut derive_key = [0u8; 32];
        rng.fill_bytes(&mut derive_key);
        Seeds { derive_key }
    }

    /// The network's generator.
    pub(crate) fn network(seed: u64) -> ChaCha20Rng {
        ChaCha20Rng::seed_from_u64(seed)
    }

    /// 32 bytes for `label`, the same for the same seed and label.
    pub(crate) fn derive(&self, label: u64) -> [u8; 32] {
        let mut rng = ChaCha20Rng::from_seed(self.derive_key);
        rng.set_stream(label);
        let mut out = [0u8; 32];
        rng.fill_bytes(&mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_decimal_hex_and_default() {
        assert_eq!(parse_seed(None, 7), Ok(7));
        assert_eq!(parse_seed(Some(""), 7), Ok(7));
        assert_eq!(parse_seed(Some(" 42 "), 7), Ok(42));
        assert_eq!(parse_seed(Some("0xff"), 7), Ok(255));
        assert_eq!(parse_seed(Some("18446744073709551615"), 7), Ok(u64::MAX));
    }

    #[test]
    fn rejects_garbage_naming_the_value() {
        let err = parse_seed(Some("12abc"), 7).expect_err("not a number");
        assert!(matches!(&err, SimError::BadSeed { value, .. } if value == "12abc"));
        assert!(err.to_string().contains("PEERCALL_SIM_SEED"));
        assert!(parse_seed(Some("-1"), 7).is_err());
        assert!(parse_seed(Some("18446744073709551616"), 7).is_err());
    }

    #[test]
    fn derived_seeds_are_stable_and_distinct() {
        let a = Seeds::new(1);
        assert_eq!(a.derive(5), Seeds::new(1).derive(5));
        assert_ne!(a.derive(5), a.derive(6));
        assert_ne!(a.derive(5), Seeds::new(2).derive(5));
    }
}
