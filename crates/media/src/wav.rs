//! WAV files in and out, for headless calls and the evaluator.
//!
//! Input may have any sample rate, channel count and sample format hound reads
//! (8/16/24/32-bit integer, 32-bit float); it is mixed down to mono and resampled to
//! 48 kHz with rubato's FFT resampler, a band-limited (anti-aliased) resampler whose
//! delay is removed, so the output lines up with the input sample for sample.
//! Output is always 48 kHz mono 16-bit PCM.

use std::path::Path;

use rubato::{FftFixedIn, Resampler};

use crate::{MediaError, SAMPLE_RATE};

/// Input sample rates accepted: telephone 8 kHz down to a margin below it, studio
/// 384 kHz up; anything outside is a broken header rather than audio.
const MIN_INPUT_RATE: u32 = 1_000;
const MAX_INPUT_RATE: u32 = 384_000;

/// Input frames per resampler call: large enough for an efficient FFT, small enough
/// to keep the work buffers tiny.
const RESAMPLE_CHUNK: usize = 1024;

/// Sub-chunks per resampler call: rubato's trade-off between filter sharpness and
/// delay; 2 is its documented sensible default.
const RESAMPLE_SUB_CHUNKS: usize = 2;

fn wav_error(path: &Path, reason: impl Into<String>) -> MediaError {
    MediaError::Wav {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn describe(err: &hound::Error) -> String {
    match err {
        // hound reports a short read as `Other` with this text, std as `UnexpectedEof`.
        hound::Error::IoError(e)
            if e.kind() == std::io::ErrorKind::UnexpectedEof
                || e.to_string().contains("enough bytes") =>
        {
            "truncated: the file ends inside its header or data".into()
        }
        hound::Error::IoError(e) => e.to_string(),
        hound::Error::FormatError(what) => format!("not a valid WAV file ({what})"),
        hound::Error::TooWide => "sample width exceeds 32 bits".into(),
        hound::Error::UnfinishedSample => "truncated: the data ends inside a sample".into(),
        hound::Error::Unsupported => "unsupported WAV encoding (only PCM and float)".into(),
        hound::Error::InvalidSampleFormat => "sample format does not match its width".into(),
    }
}

/// Reads a WAV file as 48 kHz mono samples in -1.0..=1.0.
pub fn read_wav(path: &Path) -> Result<Vec<f32>, MediaError> {
    let size = std::fs::metadata(path)
        .map_err(|e| wav_error(path, e.to_string()))?
        .len();
    if size == 0 {
        return Err(wav_error(path, "empty file (zero bytes)"));
    }
    let mut reader = hound::WavReader::open(path).map_err(|e| wav_error(path, describe(&e)))?;
    let spec = reader.spec();
    if !(MIN_INPUT_RATE..=MAX_INPUT_RATE).contains(&spec.sample_rate) {
        return Err(wav_error(
            path,
            format!(
                "sample rate {} Hz is outside {MIN_INPUT_RATE}..={MAX_INPUT_RATE}",
                spec.sample_rate
            ),
        ));
    }
    if spec.channels == 0 {
        return Err(wav_error(path, "header declares zero channels"));
    }
    let interleaved: Vec<f32> = match spec.sample_format {
        hound::SampleFormat::Float => reader
            .samples::<f32>()
            .collect::<Result<_, _>>()
            .map_err(|e| wav_error(path, describe(&e)))?,
        hound::SampleFormat::Int => {
            let scale = 1.0 / (1u64 << (spec.bits_per_sample.clamp(1, 32) - 1)) as f32;
            reader
                .samples::<i32>()
                .map(|s| s.map(|v| v as f32 * scale))
                .collect::<Result<_, _>>()
                .map_err(|e| wav_error(path, describe(&e)))?
        }
    };
    let channels = usize::from(spec.channels);
    if interleaved.len() < channels {
        return Err(wav_error(path, "contains no audio samples"));
    }
    let mono: Vec<f32> = interleaved
        .chunks_exact(channels)
        .map(|frame| frame.iter().sum::<f32>() / channels as f32)
        .collect();
    resample_to_48k(&mono, spec.sample_rate)
}

/// Resamples mono audio from `rate` to 48 kHz, delay-compensated: output sample `n`
/// is the input at time `n / 48000` s, and the length is the input's duration.
pub fn resample_to_48k(mono: &[f32], rate: u32) -> Result<Vec<f32>, MediaError> {
    if rate == SAMPLE_RATE {
        return Ok(mono.to_vec());
    }
    let err = |reason: String| MediaError::Resample { from: rate, reason };
    let mut resampler = FftFixedIn::<f32>::new(
        rate as usize,
        SAMPLE_RATE as usize,
        RESAMPLE_CHUNK,
        RESAMPLE_SUB_CHUNKS,
        1,
    )
    .map_err(|e| err(e.to_string()))?;
    let delay = resampler.output_delay();
    let wanted = usize::try_from(
        (mono.len() as u64 * u64::from(SAMPLE_RATE) + u64::from(rate) / 2) / u64::from(rate),
    )
    .map_err(|e| err(e.to_string()))?;
    let mut out = Vec::with_capacity(wanted + delay + 2 * RESAMPLE_CHUNK);
    let mut pos = 0;
    while pos + resampler.input_frames_next() <= mono.len() {
        let n = resampler.input_frames_next();
        let chunk = resampler
            .process(&[&mono[pos..pos + n]], None)
            .map_err(|e| err(e.to_string()))?;
        out.extend_from_slice(&chunk[0]);
        pos += n;
    }
    let tail = resampler
        .process_partial(Some(&[&mono[pos..]]), None)
        .map_err(|e| err(e.to_string()))?;
    out.extend_from_slice(&tail[0]);
    while out.len() < wanted + delay {
        let flushed = resampler
            .process_partial::<&[f32]>(None, None)
            .map_err(|e| err(e.to_string()))?;
        if flushed[0].is_empty() {
            break;
        }
        out.extend_from_slice(&flushed[0]);
    }
    out.drain(..delay.min(out.len()));
    out.resize(wanted, 0.0);
    Ok(out)
}

/// Converts -1.0..=1.0 samples to 16-bit PCM, clipping; the exact inverse of how
/// 16-bit input is read.
pub fn to_i16(samples: &[f32]) -> Vec<i16> {
    samples
        .iter()
        .map(|&x| (x * 32768.0).round().clamp(-32768.0, 32767.0) as i16)
        .collect()
}

/// Writes 48 kHz mono 16-bit PCM.
pub fn write_wav(path: &Path, samples: &[i16]) -> Result<(), MediaError> {
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: SAMPLE_RATE,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let io = |e: hound::Error| wav_error(path, describe(&e));
    let mut writer = hound::WavWriter::create(path, spec).map_err(io)?;
    let mut w = writer.get_i16_writer(
        u32::try_from(samples.len())
            .map_err(|_| wav_error(path, "too many samples for a WAV file"))?,
    );
    for &s in samples {
        w.write_sample(s);
    }
    w.flush().map_err(io)?;
    writer.finalize().map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("peercall-media-{}-{name}", std::process::id()))
    }

    fn sine(rate: u32, freq: f64, secs: f64) -> Vec<f32> {
        (0..(f64::from(rate) * secs) as usize)
            .map(|i| {
                (0.5 * (2.0 * std::f64::consts::PI * freq * i as f64 / f64::from(rate)).sin())
                    as f32
            })
            .collect()
    }

    #[test]
    fn stereo_44k1_float_reads_as_aligned_48k_mono() {
        let path = temp("stereo.wav");
        let spec = hound::WavSpec {
            channels: 2,
            sample_rate: 44_100,
            bits_per_sample: 32,
            sample_format: hound::SampleFormat::Float,
        };
        let tone = sine(44_100, 440.0, 1.0);
        let mut w = hound::WavWriter::create(&path, spec).unwrap();
        for &s in &tone {
            w.write_sample(s).unwrap();
            w.write_sample(s).unwrap();
        }
        w.finalize().unwrap();
        let got = read_wav(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(got.len(), 48_000);
        // Same tone at 48 kHz, same phase: the resampler's delay was removed.
        let want = sine(48_000, 440.0, 1.0);
        let err: f32 = got[1000..47_000]
            .iter()
            .zip(&want[1000..47_000])
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(err < 0.01, "max error {err}");
    }

    #[test]
    fn resampling_removes_content_above_the_new_nyquist_band() {
        // 8 kHz at 16 kHz in is fine; check an upsampled 16 kHz tone keeps its level.
        let got = resample_to_48k(&sine(16_000, 1000.0, 0.5), 16_000).unwrap();
        assert_eq!(got.len(), 24_000);
        let rms = (got[2000..22_000].iter().map(|x| x * x).sum::<f32>() / 20_000.0).sqrt();
        assert!((rms - 0.5 / 2f32.sqrt()).abs() < 0.01, "{rms}");
    }

    #[test]
    fn bad_files_are_clear_errors() {
        let cases: [(&str, &[u8], &str); 4] = [
            ("empty.wav", b"", "empty file"),
            ("text.wav", b"this is not audio at all, just some text in a file", "not a valid WAV"),
            ("header.wav", b"RIFF\x24\x00\x00\x00WAVEfmt \x10\x00\x00", "truncated"),
            (
                "nodata.wav",
                b"RIFF\x24\x00\x00\x00WAVEfmt \x10\x00\x00\x00\x01\x00\x01\x00\x80\xbb\x00\x00\x00\x77\x01\x00\x02\x00\x10\x00data\x00\x00\x00\x00",
                "no audio",
            ),
        ];
        for (name, bytes, want) in cases {
            let path = temp(name);
            std::fs::write(&path, bytes).unwrap();
            let err = read_wav(&path).unwrap_err().to_string();
            std::fs::remove_file(&path).unwrap();
            assert!(err.contains(want), "{name}: {err}");
            assert!(
                err.contains(name),
                "{name}: error should name the file: {err}"
            );
        }
        let missing = read_wav(Path::new("/nonexistent/x.wav"))
            .unwrap_err()
            .to_string();
        assert!(missing.contains("/nonexistent/x.wav"), "{missing}");
    }

    #[test]
    fn write_then_read_roundtrips() {
        let path = temp("rt.wav");
        let pcm: Vec<i16> = (0..4800).map(|i| (i * 7 % 2000) as i16 - 1000).collect();
        write_wav(&path, &pcm).unwrap();
        let back = to_i16(&read_wav(&path).unwrap());
        std::fs::remove_file(&path).unwrap();
        assert_eq!(back, pcm);
    }
}
