//! Calls in the daemon: the audio clock that feeds the engine's calls from WAV
//! files and records what they hear, and the JSON shape of a call for the admin
//! API and the CLI.
//!
//! The engine owns everything of a call but the audio; the daemon drives it on a
//! 20 ms clock. Per active call, every tick pushes one frame of the WAV being played
//! (48 kHz mono after `peercall_media`'s reader and resampler; silence when there is
//! none or it has ended) and pulls one frame of playout into the WAV being recorded
//! (48 kHz mono 16-bit, written as it comes, finalized when the call ends and at
//! shutdown). The clock counts frames against the time the call's audio started,
//! so a late tick is caught up (a few frames at once, which the far end's jitter
//! buffer absorbs) instead of drifting; a stall longer than [`MAX_CATCH_UP`]
//! frames skips ahead and is counted.

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use peercall_engine::{CallStats, FRAME_SAMPLES};
use serde::{Deserialize, Serialize};

/// The audio clock's period: one Opus frame.
pub const FRAME: Duration = Duration::from_millis(20);
/// Frames a late tick may catch up at once: 100 ms, within a jitter buffer's reach.
/// A longer stall (a suspended process) skips ahead instead: sending a second of
/// stale audio in a burst would only be discarded as late by the far end.
pub const MAX_CATCH_UP: u64 = 5;
/// 48 kHz mono 16-bit: the recorded format (the engine's playout format).
const RECORD_SPEC: hound::WavSpec = hound::WavSpec {
    channels: 1,
    sample_rate: peercall_media::SAMPLE_RATE,
    bits_per_sample: 16,
    sample_format: hound::SampleFormat::Int,
};

/// A WAV file loaded for playing: 48 kHz mono samples.
#[derive(Debug, Clone)]
pub struct Playback {
    /// Where it came from.
    pub path: PathBuf,
    /// The samples.
    pub samples: Arc<Vec<i16>>,
}

impl Playback {
    /// Reads, mixes down and resamples a WAV file (blocking: call it off the
    /// engine task).
    pub fn load(path: &Path) -> Result<Playback, peercall_media::MediaError> {
        let samples = peercall_media::wav::read_wav(path)?;
        Ok(Playback {
            path: path.to_owned(),
            samples: Arc::new(peercall_media::wav::to_i16(&samples)),
        })
    }
}

/// A WAV file being written as a call plays out.
pub struct Recorder {
    path: PathBuf,
    writer: hound::WavWriter<BufWriter<File>>,
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder")
            .field("path", &self.path)
            .finish()
    }
}

impl Recorder {
    /// Creates (or truncates) `path` as a 48 kHz mono 16-bit WAV file.
    pub fn create(path: &Path) -> Result<Recorder, String> {
        let writer = hound::WavWriter::create(path, RECORD_SPEC)
            .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
        Ok(Recorder {
            path: path.to_owned(),
            writer,
        })
    }

    /// Appends one frame.
    fn write(&mut self, frame: &[i16; FRAME_SAMPLES]) -> Result<(), hound::Error> {
        let mut w = self.writer.get_i16_writer(FRAME_SAMPLES as u32);
        for &s in frame {
            w.write_sample(s);
        }
        w.flush()
    }

    /// Writes the header's final sizes and closes the file.
    pub fn finish(self) -> Result<PathBuf, String> {
        let path = self.path;
        self.writer
            .finalize()
            .map_err(|e| format!("cannot finish {}: {e}", path.display()))?;
        Ok(path)
    }
}

/// What a call plays and records.
#[derive(Debug, Default)]
pub struct MediaFiles {
    /// The WAV played into the call (silence without one).
    pub play: Option<Playback>,
    /// Where the call is recorded.
    pub record: Option<Recorder>,
}

/// The daemon's side of a call's audio, for the API.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AudioInfo {
    /// The WAV played into the call.
    pub play: Option<String>,
    /// The WAV the call is recorded to.
    pub record: Option<String>,
    /// Frames pushed to the engine (20 ms each).
    pub frames_pushed: u64,
    /// Frames pulled from the engine and recorded.
    pub frames_pulled: u64,
    /// Frames the clock skipped after a stall.
    pub frames_skipped: u64,
    /// Whether the played WAV has ended (silence since).
    pub play_ended: bool,
    /// A recording error, if writing failed (the call goes on).
    pub record_error: Option<String>,
}

/// One call's audio on the clock.
#[derive(Debug)]
pub struct CallAudio {
    play: Option<Playback>,
    pos: usize,
    record: Option<Recorder>,
    started: Instant,
    /// Frames done since `started`.
    done: u64,
    /// What the API shows.
    pub info: AudioInfo,
}

impl CallAudio {
    /// Audio for a call that starts now.
    pub fn new(files: MediaFiles, now: Instant) -> CallAudio {
        let info = AudioInfo {
            play: files.play.as_ref().map(|p| p.path.display().to_string()),
            record: files.record.as_ref().map(|r| r.path.display().to_string()),
            ..AudioInfo::default()
        };
        CallAudio {
            play: files.play,
            pos: 0,
            record: files.record,
            started: now,
            done: 0,
            info,
        }
    }

    /// Frames due at `now` that have not been done, capped at [`MAX_CATCH_UP`]; a
    /// longer backlog is skipped (counted in `frames_skipped`).
    pub fn due(&mut self, now: Instant) -> u64 {
        let elapsed = now.saturating_duration_since(self.started);
        // The first frame is due at once, then one per period.
        let due = (elapsed.as_micros() / FRAME.as_micros()) as u64 + 1;
        let behind = due.saturating_sub(self.done);
        if behind > MAX_CATCH_UP {
            let skip = behind - MAX_CATCH_UP;
            self.done += skip;
            self.info.frames_skipped += skip;
            // Skipped time is skipped in the played file too, so it stays in step.
            self.pos = self.pos.saturating_add(skip as usize * FRAME_SAMPLES);
        }
        due.saturating_sub(self.done)
    }

    /// The next frame to play (silence when there is nothing, or no more).
    pub fn next_capture(&mut self, out: &mut [i16; FRAME_SAMPLES]) {
        out.fill(0);
        if let Some(play) = &self.play {
            let samples = &play.samples[..];
            if self.pos < samples.len() {
                let n = (samples.len() - self.pos).min(FRAME_SAMPLES);
                out[..n].copy_from_slice(&samples[self.pos..self.pos + n]);
            } else {
                self.info.play_ended = true;
            }
        }
        self.pos = self.pos.saturating_add(FRAME_SAMPLES);
        self.info.frames_pushed += 1;
        self.done += 1;
    }

    /// Records one frame of playout.
    pub fn playout(&mut self, frame: &[i16; FRAME_SAMPLES]) {
        self.info.frames_pulled += 1;
        if let Some(r) = &mut self.record
            && let Err(e) = r.write(frame)
        {
            // Stop writing (a full disk stays full); the file is finished at the end.
            let e = format!("writing {} failed: {e}", r.path.display());
            tracing::warn!(error = %e, "call recording stopped");
            self.info.record_error = Some(e);
            self.record = None;
        }
    }

    /// Finishes the recording, if any; returns its path.
    pub fn finish(&mut self) -> Option<Result<PathBuf, String>> {
        self.record.take().map(Recorder::finish)
    }
}

/// One path of a call, as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PathBody {
    /// Path id (shared by both ends).
    pub id: u16,
    /// `direct`, `relay1` or `relay2`.
    pub kind: String,
    /// `active`, `redundant`, `standby`, ...
    pub state: String,
    /// Round-trip time, ms (unknown until measured).
    pub rtt_ms: Option<f64>,
    /// Jitter, ms.
    pub jitter_ms: f64,
    /// Loss fraction, 0..=1.
    pub loss: f64,
    /// E-model R factor.
    pub r: f64,
    /// MOS estimate from R.
    pub mos: f64,
}

/// A call, as `GET /v1/calls/{id}` shows it (and `peercall call --json` prints).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallBody {
    /// The node's call id.
    pub call: u64,
    /// `resolving`, `connecting`, `ringing`, `incoming`, `active` or `ended`.
    pub state: String,
    /// Placed by this node.
    pub outgoing: bool,
    /// The other user's id.
    pub peer: Option<String>,
    /// The other user's handle.
    pub handle: Option<String>,
    /// The active path's kind.
    pub path_kind: Option<String>,
    /// Every path with its measurements.
    pub paths: Vec<PathBody>,
    /// Active path changes.
    pub path_switches: u64,
    /// Kinds of path media went over, in order of first use.
    pub paths_used: Vec<String>,
    /// Media frames sent.
    pub frames_sent: u64,
    /// Media frames received.
    pub frames_received: u64,
    /// Audio concealed (lost or late), ms.
    pub concealed_ms: u64,
    /// Longest run of concealed audio once audio had started, ms.
    pub max_gap_ms: u64,
    /// From placing (or receiving) the call to it being connected, ms.
    pub setup_ms: Option<u64>,
    /// From placing (or receiving) the call to the first decoded audio, ms.
    pub first_audio_ms: Option<u64>,
    /// Connected time, seconds.
    pub duration_s: f64,
    /// E-model MOS estimate of what this side hears.
    pub mos_estimate: Option<f64>,
    /// Outcome label once ended: `completed`, `not_found`, `unreachable`, ...
    pub outcome: Option<String>,
    /// Why it ended, in words.
    pub end_reason: Option<String>,
    /// The daemon's audio: files, frames.
    pub audio: Option<AudioInfo>,
}

/// A millisecond figure from a duration.
fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

impl CallBody {
    /// The API view of an engine snapshot and the daemon's audio.
    pub fn new(s: &CallStats, audio: Option<AudioInfo>) -> CallBody {
        CallBody {
            call: s.id.0,
            state: s.state.label().to_owned(),
            outgoing: s.outgoing,
            peer: s.peer_user.map(|u| u.to_string()),
            handle: s.peer_handle.as_ref().map(|h| h.as_str().to_owned()),
            path_kind: s.active_path.map(|k| k.label().to_owned()),
            paths: s
                .paths
                .iter()
                .map(|p| PathBody {
                    id: p.id,
                    kind: p.kind.label().to_owned(),
                    state: p.state.label().to_owned(),
                    rtt_ms: p.rtt.map(ms),
                    jitter_ms: ms(p.jitter),
                    loss: p.loss,
                    r: p.r,
                    mos: p.mos,
                })
                .collect(),
            path_switches: s.path_switches,
            paths_used: s.paths_used.iter().map(|k| k.label().to_owned()).collect(),
            frames_sent: s.frames_sent,
            frames_received: s.frames_received,
            concealed_ms: s.concealed_ms,
            max_gap_ms: s.max_gap_ms,
            setup_ms: s.setup_ms,
            first_audio_ms: s.first_audio_ms,
            duration_s: s.duration_s,
            mos_estimate: s.mos_estimate,
            outcome: s.end.map(|r| r.label().to_owned()),
            end_reason: s.end.map(|r| r.to_string()),
            audio,
        }
    }

    /// The active path's measurements.
    pub fn active(&self) -> Option<&PathBody> {
        self.paths.iter().find(|p| p.state == "active")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clock_catches_up_a_little_and_skips_a_stall() {
        let t0 = Instant::now();
        let mut a = CallAudio::new(MediaFiles::default(), t0);
        assert_eq!(a.due(t0), 1, "the first frame is due at once");
        let mut f = [0i16; FRAME_SAMPLES];
        a.next_capture(&mut f);
        assert_eq!(a.due(t0 + Duration::from_millis(19)), 0);
        assert_eq!(a.due(t0 + Duration::from_millis(61)), 3, "late: catch up");
        for _ in 0..3 {
            a.next_capture(&mut f);
        }
        // A one-second stall: only MAX_CATCH_UP frames are done, the rest skipped.
        let due = a.due(t0 + Duration::from_millis(1_060));
        assert_eq!(due, MAX_CATCH_UP);
        assert_eq!(a.info.frames_skipped, 54 - 4 - MAX_CATCH_UP);
        for _ in 0..due {
            a.next_capture(&mut f);
        }
        assert_eq!(a.due(t0 + Duration::from_millis(1_061)), 0, "no drift");
    }

    #[test]
    fn plays_the_file_then_silence_and_records_every_frame() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("rec.wav");
        let samples: Vec<i16> = (0..FRAME_SAMPLES + 100).map(|i| i as i16).collect();
        let files = MediaFiles {
            play: Some(Playback {
                path: "in.wav".into(),
                samples: Arc::new(samples),
            }),
            record: Some(Recorder::create(&out).unwrap()),
        };
        let mut a = CallAudio::new(files, Instant::now());
        let mut f = [0i16; FRAME_SAMPLES];
        a.next_capture(&mut f);
        assert_eq!(f[5], 5);
        a.next_capture(&mut f);
        assert_eq!((f[99], f[100]), (1059, 0), "the tail, then silence");
        a.next_capture(&mut f);
        assert!(f.iter().all(|&s| s == 0) && a.info.play_ended);
        a.playout(&[7; FRAME_SAMPLES]);
        a.playout(&[8; FRAME_SAMPLES]);
        assert_eq!(a.finish().unwrap().unwrap(), out);
        let r = hound::WavReader::open(&out).unwrap();
        assert_eq!(r.spec(), RECORD_SPEC);
        assert_eq!(r.duration() as usize, 2 * FRAME_SAMPLES);
        assert!(a.finish().is_none());
    }
}
