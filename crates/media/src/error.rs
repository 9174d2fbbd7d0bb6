use std::path::PathBuf;

/// Errors of the media layer. None of them leaves shared state half-changed: a failed
/// call can simply be retried or reported.
#[derive(Debug, thiserror::Error)]
pub enum MediaError {
    /// libopus refused a call (bad argument, internal error). The codec object is
    /// unchanged; for a decoder the frame is concealed instead.
    #[error("libopus {call}: {message}")]
    Codec {
        /// The libopus call.
        call: &'static str,
        /// libopus's description of the error.
        message: &'static str,
    },

    /// A configuration value is out of range; names the setting and why.
    #[error("bad media setting `{key}`: {reason}")]
    Config {
        /// The setting.
        key: &'static str,
        /// Why it was refused.
        reason: String,
    },

    /// A WAV file could not be read or written (not audio, truncated, unsupported).
    #[error("{}: {reason}", path.display())]
    Wav {
        /// The file.
        path: PathBuf,
        /// What went wrong, in words.
        reason: String,
    },

    /// The resampler could not be built or failed on the input.
    #[error("resampling from {from} Hz: {reason}")]
    Resample {
        /// The input sample rate.
        from: u32,
        /// What went wrong.
        reason: String,
    },
}
