use thiserror::Error;

/// Why bytes could not be parsed or encoded. Parsing never changes any state, so every
/// variant means only "this datagram or frame is dropped".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum WireError {
    /// The input ended before the message did.
    #[error("truncated: {needed} more bytes needed")]
    Truncated {
        /// How many bytes were missing at the point the parser stopped.
        needed: usize,
    },
    /// The message ended but input bytes remained.
    #[error("{0} trailing bytes after the message")]
    Trailing(usize),
    /// The first byte is not one of peercall's packet types.
    #[error("first byte {0} is not a peercall packet type")]
    NotPeercall(u8),
    /// A peercall packet with a protocol version this build does not speak.
    #[error("unsupported protocol version {0}")]
    Version(u8),
    /// Reserved header bits were not zero.
    #[error("reserved header bits are set")]
    Reserved,
    /// An inner frame type this build does not know.
    #[error("unknown frame type {0}")]
    UnknownFrame(u8),
    /// A variable-length field is empty or longer than allowed.
    #[error("field `{field}` has invalid length {len}")]
    Length {
        /// The field's name.
        field: &'static str,
        /// Its length in bytes.
        len: usize,
    },
    /// A field holds a value outside its domain.
    #[error("field `{0}` has an invalid value")]
    Value(&'static str),
    /// The caller's output buffer is too small for the encoding.
    #[error("output buffer too small: {needed} bytes needed, {have} available")]
    BufferTooSmall {
        /// Bytes the encoding needs.
        needed: usize,
        /// Bytes the buffer has.
        have: usize,
    },
}

impl WireError {
    /// A short, stable label for metrics (`reason="..."`): bounded cardinality.
    pub fn reason(&self) -> &'static str {
        match self {
            WireError::Truncated { .. } => "truncated",
            WireError::Trailing(_) => "trailing",
            WireError::NotPeercall(_) => "not_peercall",
            WireError::Version(_) => "version",
            WireError::Reserved => "reserved",
            WireError::UnknownFrame(_) => "unknown_frame",
            WireError::Length { .. } => "length",
            WireError::Value(_) => "value",
            WireError::BufferTooSmall { .. } => "buffer",
        }
    }
}
