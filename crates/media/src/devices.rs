//! Real audio devices through cpal (cargo feature `devices`).
//!
//! [`Microphone`] delivers 20 ms frames of 48 kHz mono from the default input device
//! and [`Speaker`] plays them on the default output device. The device callbacks run
//! on cpal's audio threads and only move whole frames through bounded queues, so a
//! slow consumer drops frames (counted) instead of growing memory or blocking the
//! audio thread. The microphone's frame rhythm is the natural clock for the sender;
//! the speaker's queue level tells the receiver when to pull.
//!
//! Devices must run at 48 kHz (every common sound server and USB headset offers it)
//! in `i16` or `f32` samples; other channel counts are mixed down or duplicated.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::time::Duration;

use cpal::traits::{DeviceTrait, HostTrait, StreamTrait};
use cpal::{BufferSize, SampleFormat, StreamConfig};

use crate::{FRAME_SAMPLES, MediaError, SAMPLE_RATE};

/// Frames queued between an audio thread and its consumer: 200 ms, ten times the
/// frame, enough to ride out a scheduling hiccup without adding steady delay.
const QUEUE_FRAMES: usize = 10;

/// One 20 ms frame of 48 kHz mono.
pub type Frame = [i16; FRAME_SAMPLES];

fn device_error(key: &'static str, reason: impl ToString) -> MediaError {
    MediaError::Config {
        key,
        reason: reason.to_string(),
    }
}

fn config(channels: u16) -> StreamConfig {
    StreamConfig {
        channels,
        sample_rate: SAMPLE_RATE,
        buffer_size: BufferSize::Default,
    }
}

/// Accumulates interleaved device samples into mono frames.
struct Framer {
    channels: usize,
    frame: Frame,
    fill: usize,
    tx: SyncSender<Frame>,
    dropped: Arc<AtomicU64>,
}

impl Framer {
    fn push(&mut self, data: impl Iterator<Item = f32>) {
        let mut acc = 0.0;
        for (i, s) in data.enumerate() {
            acc += s;
            if (i + 1) % self.channels == 0 {
                let mono = acc / self.channels as f32;
                acc = 0.0;
                self.frame[self.fill] = (mono * 32768.0).clamp(-32768.0, 32767.0) as i16;
                self.fill += 1;
                if self.fill == FRAME_SAMPLES {
                    self.fill = 0;
                    if let Err(TrySendError::Full(_)) = self.tx.try_send(self.frame) {
                        self.dropped.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
    }
}

/// The default input device, delivering 20 ms frames.
pub struct Microphone {
    _stream: cpal::Stream,
    frames: Receiver<Frame>,
    dropped: Arc<AtomicU64>,
}

impl Microphone {
    /// Opens and starts the default input device at 48 kHz.
    pub fn open_default() -> Result<Self, MediaError> {
        let device = cpal::default_host()
            .default_input_device()
            .ok_or_else(|| device_error("input_device", "no default input device"))?;
        let supported = device
            .default_input_config()
            .map_err(|e| device_error("input_device", e))?;
        let (tx, frames) = sync_channel(QUEUE_FRAMES);
        let dropped = Arc::new(AtomicU64::new(0));
        let mut framer = Framer {
            channels: usize::from(supported.channels().max(1)),
            frame: [0; FRAME_SAMPLES],
            fill: 0,
            tx,
            dropped: Arc::clone(&dropped),
        };
        let cfg = config(supported.channels());
        let on_error = |e: cpal::Error| tracing_free_log("input", &e);
        let stream = match supported.sample_format() {
            SampleFormat::F32 => device.build_input_stream::<f32, _, _>(
                cfg,
                move |data, _| framer.push(data.iter().copied()),
                on_error,
                None,
            ),
            SampleFormat::I16 => device.build_input_stream::<i16, _, _>(
                cfg,
                move |data, _| framer.push(data.iter().map(|&s| f32::from(s) / 32768.0)),
                on_error,
                None,
            ),
            other => {
                return Err(device_error(
                    "input_device",
                    format!("sample format {other} (need i16 or f32)"),
                ));
            }
        }
        .map_err(|e| device_error("input_device", e))?;
        stream.play().map_err(|e| device_error("input_device", e))?;
        Ok(Microphone {
            _stream: stream,
            frames,
            dropped,
        })
    }

    /// The next captured frame, waiting up to `timeout`.
    pub fn next_frame(&self, timeout: Duration) -> Option<Frame> {
        self.frames.recv_timeout(timeout).ok()
    }

    /// Frames dropped because nobody took them in time.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// The default output device, playing 20 ms frames.
pub struct Speaker {
    _stream: cpal::Stream,
    frames: SyncSender<Frame>,
    underruns: Arc<AtomicU64>,
}

/// Feeds the output callback from the frame queue, silence when it runs dry.
struct Unframer {
    channels: usize,
    frame: Frame,
    pos: usize,
    rx: Receiver<Frame>,
    underruns: Arc<AtomicU64>,
}

impl Unframer {
    fn next_sample(&mut self) -> f32 {
        if self.pos == FRAME_SAMPLES {
            self.pos = 0;
            match self.rx.try_recv() {
                Ok(frame) => self.frame = frame,
                Err(_) => {
                    self.frame = [0; FRAME_SAMPLES];
                    self.underruns.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        let s = f32::from(self.frame[self.pos]) / 32768.0;
        self.pos += 1;
        s
    }

    fn fill<T: Copy>(&mut self, data: &mut [T], convert: impl Fn(f32) -> T) {
        for chunk in data.chunks_mut(self.channels) {
            let s = convert(self.next_sample());
            for out in chunk {
                *out = s;
            }
        }
    }
}

impl Speaker {
    /// Opens and starts the default output device at 48 kHz.
    pub fn open_default() -> Result<Self, MediaError> {
        let device = cpal::default_host()
            .default_output_device()
            .ok_or_else(|| device_error("output_device", "no default output device"))?;
        let supported = device
            .default_output_config()
            .map_err(|e| device_error("output_device", e))?;
        let (frames, rx) = sync_channel(QUEUE_FRAMES);
        let underruns = Arc::new(AtomicU64::new(0));
        let mut unframer = Unframer {
            channels: usize::from(supported.channels().max(1)),
            frame: [0; FRAME_SAMPLES],
            pos: FRAME_SAMPLES,
            rx,
            underruns: Arc::clone(&underruns),
        };
        let cfg = config(supported.channels());
        let on_error = |e: cpal::Error| tracing_free_log("output", &e);
        let stream = match supported.sample_format() {
            SampleFormat::F32 => device.build_output_stream::<f32, _, _>(
                cfg,
                move |data, _| unframer.fill(data, |s| s),
                on_error,
                None,
            ),
            SampleFormat::I16 => device.build_output_stream::<i16, _, _>(
                cfg,
                move |data, _| {
                    unframer.fill(data, |s| (s * 32768.0).clamp(-32768.0, 32767.0) as i16)
                },
                on_error,
                None,
            ),
            other => {
                return Err(device_error(
                    "output_device",
                    format!("sample format {other} (need i16 or f32)"),
                ));
            }
        }
        .map_err(|e| device_error("output_device", e))?;
        stream
            .play()
            .map_err(|e| device_error("output_device", e))?;
        Ok(Speaker {
            _stream: stream,
            frames,
            underruns,
        })
    }

    /// Queues a frame; `false` when the queue is full (the frame is dropped).
    pub fn play(&self, frame: Frame) -> bool {
        self.frames.try_send(frame).is_ok()
    }

    /// Times the device found nothing to play.
    pub fn underruns(&self) -> u64 {
        self.underruns.load(Ordering::Relaxed)
    }
}

/// Device errors happen on audio threads with nowhere to return them; they are
/// written to stderr (the media crate has no logging dependency).
fn tracing_free_log(direction: &str, err: &cpal::Error) {
    eprintln!("audio {direction} device: {err}");
}
