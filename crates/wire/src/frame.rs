//! Inner frames: the plaintext of one transport packet.
//!
//! A frame is a type byte followed by its body; all integers are big-endian:
//!
//! ```text
//! 1 keepalive  |                                                            (empty)
//! 2 close      | reason 1 |
//! 3 control    | body 1.. |                                   overlay message bytes
//! 4 relay      | channel 4 | packet 1.. |         a whole outer packet to forward
//! 5 probe      | path 2 | seq 4 | sent_at 8 |
//! 6 probe ack  | path 2 | seq 4 | echo 8 | held_us 4 |
//! 7 media      | path 2 | path_seq 4 | seq 4 | timestamp 4 | flags 1 | opus 1..=1275 |
//! 8 report     | path 2 | highest_seq 4 | lost 4 | jitter_us 4 |
//! 9 call       | body 1.. |                         end-to-end call control bytes
//! 10 relay ctl | body 1.. |            relay service and signalling message bytes
//! ```
//!
//! `call` bodies travel on the end-to-end session between two callers (invite,
//! ringing, accept, hang-up, path offers); `relay ctl` bodies travel on a hop
//! session with a supernode (relay channel requests, signalling, links between
//! relays). Both are versioned message sets defined by the engine.
//!
//! Path fields name the path a frame was sent on, so the receiver measures each
//! path on its own; `seq` and `timestamp` of media belong to the audio stream
//! (48 kHz units) and survive a path switch, which is what de-duplicates frames
//! sent on two paths at once.

use crate::WireError;
use crate::codec::{Reader, Writer};
use crate::packet::MAX_TRANSPORT_PLAINTEXT;

/// The largest Opus packet (RFC 6716 §3.4, R2).
pub const MAX_OPUS_PACKET: usize = 1275;

/// Why a session was closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CloseReason(pub u8);

impl CloseReason {
    /// The peer is shutting down.
    pub const SHUTDOWN: CloseReason = CloseReason(1);
    /// The peer replaced this session with a newer one.
    pub const REPLACED: CloseReason = CloseReason(2);
    /// The peer hit a protocol error.
    pub const PROTOCOL_ERROR: CloseReason = CloseReason(3);
}

/// A frame asking a relay to forward `packet`, or a relay delivering it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Relay<'a> {
    /// The relay channel: a permission the relay granted for one peer pair.
    pub channel: u32,
    /// An outer peercall packet of the end-to-end session, opaque to the relay.
    pub packet: &'a [u8],
}

/// A path probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    /// The sender's path id.
    pub path: u16,
    /// Probe sequence number on that path.
    pub seq: u32,
    /// Sender's time, microseconds; echoed back.
    pub sent_at: u64,
}

/// The answer to a [`Probe`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeAck {
    /// The path id from the probe.
    pub path: u16,
    /// The sequence number from the probe.
    pub seq: u32,
    /// The probe's `sent_at`, echoed.
    pub echo: u64,
    /// How long the answerer held the probe before answering, microseconds.
    pub held_us: u32,
}

/// One Opus frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Media<'a> {
    /// The path it was sent on.
    pub path: u16,
    /// Per-path sequence number, for that path's loss and jitter.
    pub path_seq: u32,
    /// Stream sequence number.
    pub seq: u32,
    /// RTP-style timestamp in 48 kHz samples.
    pub timestamp: u32,
    /// [`Media::FLAG_REDUNDANT`], [`Media::FLAG_TALKSPURT`].
    pub flags: u8,
    /// The Opus packet.
    pub payload: &'a [u8],
}

impl Media<'_> {
    /// This copy is a redundant one, also sent on another path.
    pub const FLAG_REDUNDANT: u8 = 0x01;
    /// First frame of a talkspurt (after silence).
    pub const FLAG_TALKSPURT: u8 = 0x02;
    const KNOWN_FLAGS: u8 = Self::FLAG_REDUNDANT | Self::FLAG_TALKSPURT;
}

/// A receiver report for one path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Report {
    /// The path the report is about.
    pub path: u16,
    /// Highest per-path sequence number received.
    pub highest_seq: u32,
    /// Cumulative frames lost on the path.
    pub lost: u32,
    /// Inter-arrival jitter, microseconds (RFC 3550 §6.4.1).
    pub jitter_us: u32,
}

/// The plaintext of one transport packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame<'a> {
    /// Keeps NAT mappings and liveness; carries nothing.
    Keepalive,
    /// The sender is closing the session.
    Close(CloseReason),
    /// An overlay control message.
    Control(&'a [u8]),
    /// Relay forwarding.
    Relay(Relay<'a>),
    /// Path probe.
    Probe(Probe),
    /// Path probe answer.
    ProbeAck(ProbeAck),
    /// Audio.
    Media(Media<'a>),
    /// Receiver report.
    Report(Report),
    /// End-to-end call control (between the two callers).
    Call(&'a [u8]),
    /// Relay service control and signalling (between a node and a supernode, or two
    /// supernodes).
    RelayControl(&'a [u8]),
}

mod tag {
    pub const KEEPALIVE: u8 = 1;
    pub const CLOSE: u8 = 2;
    pub const CONTROL: u8 = 3;
    pub const RELAY: u8 = 4;
    pub const PROBE: u8 = 5;
    pub const PROBE_ACK: u8 = 6;
    pub const MEDIA: u8 = 7;
    pub const REPORT: u8 = 8;
    pub const CALL: u8 = 9;
    pub const RELAY_CONTROL: u8 = 10;
}

const MEDIA_HEADER_LEN: usize = 1 + 2 + 4 + 4 + 4 + 1;

impl<'a> Frame<'a> {
    /// Parses a decrypted transport plaintext.
    pub fn parse(bytes: &'a [u8]) -> Result<Frame<'a>, WireError> {
        if bytes.len() > MAX_TRANSPORT_PLAINTEXT {
            return Err(WireError::Length {
                field: "frame",
                len: bytes.len(),
            });
        }
        let mut r = Reader::new(bytes);
        let t = r.u8()?;
        let frame = match t {
            tag::KEEPALIVE => Frame::Keepalive,
            tag::CLOSE => Frame::Close(CloseReason(r.u8()?)),
            tag::CONTROL => Frame::Control(r.rest("control", 1, MAX_TRANSPORT_PLAINTEXT)?),
            tag::RELAY => Frame::Relay(Relay {
                channel: r.u32()?,
                packet: r.rest("packet", 1, MAX_TRANSPORT_PLAINTEXT)?,
            }),
            tag::PROBE => Frame::Probe(Probe {
                path: r.u16()?,
                seq: r.u32()?,
                sent_at: r.u64()?,
            }),
            tag::PROBE_ACK => Frame::ProbeAck(ProbeAck {
                path: r.u16()?,
                seq: r.u32()?,
                echo: r.u64()?,
                held_us: r.u32()?,
            }),
            tag::MEDIA => {
                let path = r.u16()?;
                let path_seq = r.u32()?;
                let seq = r.u32()?;
                let timestamp = r.u32()?;
                let flags = r.u8()?;
                if flags & !Media::KNOWN_FLAGS != 0 {
                    return Err(WireError::Reserved);
                }
                Frame::Media(Media {
                    path,
                    path_seq,
                    seq,
                    timestamp,
                    flags,
                    payload: r.rest("opus", 1, MAX_OPUS_PACKET)?,
                })
            }
            tag::REPORT => Frame::Report(Report {
                path: r.u16()?,
                highest_seq: r.u32()?,
                lost: r.u32()?,
                jitter_us: r.u32()?,
            }),
            tag::CALL => Frame::Call(r.rest("call", 1, MAX_TRANSPORT_PLAINTEXT)?),
            tag::RELAY_CONTROL => {
                Frame::RelayControl(r.rest("relay control", 1, MAX_TRANSPORT_PLAINTEXT)?)
            }
            other => return Err(WireError::UnknownFrame(other)),
        };
        r.finish()?;
        Ok(frame)
    }

    /// A stable label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Frame::Keepalive => "keepalive",
            Frame::Close(_) => "close",
            Frame::Control(_) => "control",
            Frame::Relay(_) => "relay",
            Frame::Probe(_) => "probe",
            Frame::ProbeAck(_) => "probe_ack",
            Frame::Media(_) => "media",
            Frame::Report(_) => "report",
            Frame::Call(_) => "call",
            Frame::RelayControl(_) => "relay_control",
        }
    }

    /// The number of bytes [`Frame::encode`] writes.
    pub fn encoded_len(&self) -> usize {
        match self {
            Frame::Keepalive => 1,
            Frame::Close(_) => 2,
            Frame::Control(body) => 1 + body.len(),
            Frame::Relay(r) => 5 + r.packet.len(),
            Frame::Probe(_) => 15,
            Frame::ProbeAck(_) => 19,
            Frame::Media(m) => MEDIA_HEADER_LEN + m.payload.len(),
            Frame::Report(_) => 15,
            Frame::Call(body) | Frame::RelayControl(body) => 1 + body.len(),
        }
    }

    /// Writes the frame into `out` and returns its length. Frames that would not parse
    /// (empty or oversize bodies, unknown media flags) are refused.
    pub fn encode(&self, out: &mut [u8]) -> Result<usize, WireError> {
        let check = |field, len: usize, max: usize| {
            if (1..=max).contains(&len) {
                Ok(())
            } else {
                Err(WireError::Length { field, len })
            }
        };
        match self {
            Frame::Control(body) => check("control", body.len(), MAX_TRANSPORT_PLAINTEXT - 1)?,
            Frame::Call(body) => check("call", body.len(), MAX_TRANSPORT_PLAINTEXT - 1)?,
            Frame::RelayControl(body) => {
                check("relay control", body.len(), MAX_TRANSPORT_PLAINTEXT - 1)?
            }
            Frame::Relay(r) => check("packet", r.packet.len(), MAX_TRANSPORT_PLAINTEXT - 5)?,
            Frame::Media(m) => {
                check("opus", m.payload.len(), MAX_OPUS_PACKET)?;
                if m.flags & !Media::KNOWN_FLAGS != 0 {
                    return Err(WireError::Reserved);
                }
            }
            _ => {}
        }
        let mut w = Writer::new(out, self.encoded_len())?;
        match self {
            Frame::Keepalive => w.u8(tag::KEEPALIVE),
            Frame::Close(reason) => {
                w.u8(tag::CLOSE);
                w.u8(reason.0);
            }
            Frame::Control(body) => {
                w.u8(tag::CONTROL);
                w.put(body);
            }
            Frame::Relay(r) => {
                w.u8(tag::RELAY);
                w.u32(r.channel);
                w.put(r.packet);
            }
            Frame::Probe(p) => {
                w.u8(tag::PROBE);
                w.u16(p.path);
                w.u32(p.seq);
                w.u64(p.sent_at);
            }
            Frame::ProbeAck(a) => {
                w.u8(tag::PROBE_ACK);
                w.u16(a.path);
                w.u32(a.seq);
                w.u64(a.echo);
                w.u32(a.held_us);
            }
            Frame::Media(m) => {
                w.u8(tag::MEDIA);
                w.u16(m.path);
                w.u32(m.path_seq);
                w.u32(m.seq);
                w.u32(m.timestamp);
                w.u8(m.flags);
                w.put(m.payload);
            }
            Frame::Report(rep) => {
                w.u8(tag::REPORT);
                w.u16(rep.path);
                w.u32(rep.highest_seq);
                w.u32(rep.lost);
                w.u32(rep.jitter_us);
            }
            Frame::Call(body) => {
                w.u8(tag::CALL);
                w.put(body);
            }
            Frame::RelayControl(body) => {
                w.u8(tag::RELAY_CONTROL);
                w.put(body);
            }
        }
        Ok(w.done())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_frames_are_errors() {
        assert_eq!(Frame::parse(&[]), Err(WireError::Truncated { needed: 1 }));
        assert_eq!(Frame::parse(&[99]), Err(WireError::UnknownFrame(99)));
        assert!(matches!(
            Frame::parse(&[tag::CALL]),
            Err(WireError::Length { .. })
        ));
        assert!(matches!(
            Frame::parse(&[tag::RELAY_CONTROL]),
            Err(WireError::Length { .. })
        ));
        assert_eq!(Frame::parse(&[tag::CALL, 1]), Ok(Frame::Call(&[1])));
        assert_eq!(
            Frame::parse(&[tag::KEEPALIVE, 0]),
            Err(WireError::Trailing(1))
        );
        assert!(matches!(
            Frame::parse(&[tag::CONTROL]),
            Err(WireError::Length { .. })
        ));
        assert!(matches!(
            Frame::parse(&[tag::RELAY, 0, 0, 0, 1]),
            Err(WireError::Length { .. })
        ));
        let mut media = [0u8; MEDIA_HEADER_LEN + 1];
        media[0] = tag::MEDIA;
        media[MEDIA_HEADER_LEN - 1] = 0x80;
        assert_eq!(Frame::parse(&media), Err(WireError::Reserved));
        media[MEDIA_HEADER_LEN - 1] = Media::FLAG_TALKSPURT;
        assert!(Frame::parse(&media).is_ok());
        let oversize = vec![tag::CONTROL; MAX_TRANSPORT_PLAINTEXT + 1];
        assert!(Frame::parse(&oversize).is_err());
    }
}
