//! `peercall call` and `peercall answer`: a call through the local node.
//!
//! Both find the node like `peercall lookup` (its data directory's `admin.addr` and
//! `admin.token`), hand it the WAV files to play and record (as absolute paths: the
//! node resolves them, not this process), then follow the call by polling
//! `GET /v1/calls/{id}`, with a live one-line status on stderr (state, path kind,
//! RTT, loss, MOS estimate, switches). The call is hung up after `--duration`
//! seconds of conversation, or on Ctrl-C; then a summary is printed (with
//! `--json`: exactly one JSON object on stdout). A call that does not complete
//! (unknown user, no answer, rejected, busy, unreachable, lost) is an error: its
//! reason on stderr and a non-zero exit status.
//!
//! `peercall answer` waits on the node's event stream for the next incoming call
//! (or takes one already ringing) and answers it.

use std::fmt::Write as _;
use std::io::{IsTerminal, Write as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use serde::Serialize;

use crate::admin::{self, CallsBody, PlacedBody};
use crate::calls::CallBody;
use crate::cli::{NodeApi, NodeRef, block_on, explain};
use crate::client::EventStream;

/// How often the call is polled for the status line: four times a second reads
/// live without loading the node.
const POLL: Duration = Duration::from_millis(250);
/// Timeout of one admin request (they answer within milliseconds).
const QUICK: Duration = Duration::from_secs(5);
/// How long the call may take to end after the hang-up before giving up on it.
const HANGUP_WAIT: Duration = Duration::from_secs(10);
/// Longest wait for an incoming call (a day: `answer` is meant to wait).
const ANSWER_WAIT: Duration = Duration::from_secs(86_400);

/// Arguments of `peercall call`.
#[derive(Debug, Clone, clap::Args)]
pub struct CallArgs {
    /// Whom to call: a handle (such as `alice`) or a user id (52 base32 characters).
    #[arg(value_name = "HANDLE|USER_ID")]
    pub target: String,
    #[command(flatten)]
    pub media: MediaArgs,
}

/// Arguments of `peercall answer`.
#[derive(Debug, Clone, clap::Args)]
pub struct AnswerArgs {
    #[command(flatten)]
    pub media: MediaArgs,
}

/// What both commands share.
#[derive(Debug, Clone, clap::Args)]
pub struct MediaArgs {
    /// A WAV file to play into the call (any rate and channel count; silence when
    /// it ends).
    #[arg(long, value_name = "IN.wav")]
    pub play: Option<PathBuf>,
    /// Record what the call sounds like here to this WAV file (48 kHz mono).
    #[arg(long, value_name = "OUT.wav")]
    pub record: Option<PathBuf>,
    /// Hang up after this many seconds of conversation (default: when the other
    /// side hangs up, or on Ctrl-C).
    #[arg(long, value_name = "SECS", value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Print the summary as one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub node: NodeRef,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if !(secs > 0.0 && secs <= 86_400.0) {
        return Err(format!("{s} is not between 0 and 86400 seconds"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// The `peercall call --json` object.
#[derive(Debug, Serialize)]
pub struct Summary {
    /// The node's call id.
    pub call: u64,
    /// The other user.
    pub peer: Option<String>,
    /// Their handle.
    pub handle: Option<String>,
    /// `completed`, `not_found`, `unreachable`, `no_answer`, `rejected`, `busy`, `lost`.
    pub outcome: Option<String>,
    /// Why it ended, in words.
    pub end_reason: Option<String>,
    /// Placing (or receiving) to connected, ms.
    pub setup_ms: Option<u64>,
    /// Placing (or receiving) to the first audio heard, ms.
    pub first_audio_ms: Option<u64>,
    /// Connected time, s.
    pub duration_s: f64,
    /// Path kinds media went over, in order of first use.
    pub paths_used: Vec<String>,
    /// Active path changes.
    pub path_switches: u64,
    /// Media frames sent.
    pub frames_sent: u64,
    /// Media frames received.
    pub frames_received: u64,
    /// Audio concealed, ms.
    pub concealed_ms: u64,
    /// Longest gap once audio had started, ms.
    pub max_gap_ms: u64,
    /// E-model MOS estimate of what this side heard.
    pub mos_estimate: Option<f64>,
    /// The recorded WAV.
    pub record: Option<String>,
}

impl Summary {
    /// The summary of a call's last snapshot.
    pub fn of(c: &CallBody) -> Summary {
        Summary {
            call: c.call,
            peer: c.peer.clone(),
            handle: c.handle.clone(),
            outcome: c.outcome.clone(),
            end_reason: c.end_reason.clone(),
            setup_ms: c.setup_ms,
            first_audio_ms: c.first_audio_ms,
            duration_s: c.duration_s,
            paths_used: c.paths_used.clone(),
            path_switches: c.path_switches,
            frames_sent: c.frames_sent,
            frames_received: c.frames_received,
            concealed_ms: c.concealed_ms,
            max_gap_ms: c.max_gap_ms,
            mos_estimate: c.mos_estimate,
            record: c.audio.as_ref().and_then(|a| a.record.clone()),
        }
    }
}

/// Runs `peercall call`.
pub fn call(args: CallArgs) -> anyhow::Result<()> {
    admin::parse_query(&args.target).map_err(|e| anyhow!(e))?;
    let media = request_media(&args.media)?;
    let api = NodeApi::find(&args.media.node)?;
    block_on(async move {
        let mut body = media;
        body["to"] = serde_json::Value::from(args.target.trim());
        let (placed, _): (PlacedBody, String) = api
            .json("POST", "/v1/calls", Some(&body.to_string()), QUICK)
            .await
            .with_context(|| format!("cannot call {}", args.target.trim()))?;
        let shown = args.target.trim().to_owned();
        follow(&api, placed.call, &shown, &args.media).await
    })
}

/// Runs `peercall answer`.
pub fn answer(args: AnswerArgs) -> anyhow::Result<()> {
    let media = request_media(&args.media)?;
    let api = NodeApi::find(&args.media.node)?;
    block_on(async move {
        let (addr, token) = api.endpoint();
        let mut events = EventStream::open(addr, "/v1/events", token, QUICK)
            .await
            .context("cannot follow the node's events")?;
        // Subscribed: a call arriving from now on is seen. One ringing already is
        // taken first.
        let (list, _): (CallsBody, String) = api.json("GET", "/v1/calls", None, QUICK).await?;
        let waiting = list.calls.iter().find(|c| c.state == "incoming");
        let call = match waiting {
            Some(c) => c.call,
            None => {
                status_line("waiting for an incoming call (Ctrl-C to stop)");
                wait_incoming(&mut events).await?
            }
        };
        let path = format!("/v1/calls/{call}/answer");
        let r = api
            .call("POST", &path, Some(&media.to_string()), QUICK)
            .await?;
        if !r.is_success() {
            bail!("cannot answer call {call}: {}", explain(&r));
        }
        follow(&api, call, "the caller", &args.media).await
    })
}

/// Waits for a `call_incoming` event; its call id.
async fn wait_incoming(events: &mut EventStream) -> anyhow::Result<u64> {
    let wait = async {
        loop {
            let Some(event) = events.next().await.context("event stream")? else {
                bail!("the node stopped while waiting for a call");
            };
            if event.kind != "call_incoming" {
                continue;
            }
            let data: serde_json::Value =
                serde_json::from_str(&event.data).context("call_incoming event")?;
            if let Some(call) = data["call"].as_u64() {
                return Ok(call);
            }
        }
    };
    tokio::select! {
        r = tokio::time::timeout(ANSWER_WAIT, wait) => r.map_err(|_| anyhow!("no call within a day"))?,
        _ = tokio::signal::ctrl_c() => bail!("interrupted while waiting for a call"),
    }
}

/// The play/record part of a call request, with absolute paths.
fn request_media(args: &MediaArgs) -> anyhow::Result<serde_json::Value> {
    let mut body = serde_json::json!({});
    if let Some(play) = &args.play {
        let path = std::fs::canonicalize(play)
            .with_context(|| format!("cannot play {}", play.display()))?;
        body["play"] = serde_json::Value::from(path_text(&path)?);
    }
    if let Some(record) = &args.record {
        body["record"] = serde_json::Value::from(path_text(&absolute(record)?)?);
    }
    Ok(body)
}

/// `path` made absolute against the working directory (it need not exist yet).
fn absolute(path: &Path) -> anyhow::Result<PathBuf> {
    std::path::absolute(path).with_context(|| format!("bad path {}", path.display()))
}

fn path_text(path: &Path) -> anyhow::Result<&str> {
    path.to_str()
        .ok_or_else(|| anyhow!("{} is not UTF-8, which the node API needs", path.display()))
}

/// Follows call `id` until it ends: status line, hang-up after the duration or on
/// Ctrl-C, summary. An error unless it completed.
async fn follow(api: &NodeApi, id: u64, shown: &str, args: &MediaArgs) -> anyhow::Result<()> {
    let path = format!("/v1/calls/{id}");
    let mut connected: Option<Instant> = None;
    let mut hung_up: Option<Instant> = None;
    let mut interrupted = false;
    let mut tick = tokio::time::interval(POLL);
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let last = loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = &mut ctrl_c, if !interrupted => {
                interrupted = true;
            }
        }
        let (call, _): (CallBody, String) = api.json("GET", &path, None, QUICK).await?;
        if call.state == "ended" {
            break call;
        }
        if call.state == "active" && connected.is_none() {
            connected = Some(Instant::now());
        }
        let due = match (connected, args.duration) {
            (Some(at), Some(d)) => at.elapsed() >= d,
            _ => false,
        };
        if (due || interrupted) && hung_up.is_none() {
            hung_up = Some(Instant::now());
            let r = api.call("DELETE", &path, None, QUICK).await?;
            // 409: it ended in between, which the next poll shows.
            if !r.is_success() && r.status != 409 {
                bail!("cannot hang up: {}", explain(&r));
            }
        }
        if hung_up.is_some_and(|at| at.elapsed() > HANGUP_WAIT) {
            bail!("call {id} did not end within {HANGUP_WAIT:?} of hanging up");
        }
        status_line(&live_status(&call));
    };
    finish_status();
    let summary = Summary::of(&last);
    if args.json {
        let text = serde_json::to_string(&summary).context("summary as JSON")?;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{text}");
        let _ = out.flush();
    } else {
        print!("{}", format_summary(&summary));
    }
    match last.outcome.as_deref() {
        Some("completed") => Ok(()),
        _ => {
            let reason = last.end_reason.as_deref().unwrap_or("ended");
            bail!("call to {shown} failed: {reason}")
        }
    }
}

/// The live status: state, path kind, RTT, loss, MOS estimate, switches.
fn live_status(c: &CallBody) -> String {
    let mut s = format!("call {}: {}", c.call, c.state);
    if let Some(kind) = &c.path_kind {
        let _ = write!(s, " via {kind}");
    }
    if let Some(p) = c.active() {
        if let Some(rtt) = p.rtt_ms {
            let _ = write!(s, ", RTT {rtt:.0} ms");
        }
        let _ = write!(s, ", loss {:.1} %", p.loss * 100.0);
    }
    if let Some(mos) = c.mos_estimate {
        let _ = write!(s, ", MOS {mos:.2}");
    }
    if c.state == "active" {
        let _ = write!(s, ", {} switches, {:.0} s", c.path_switches, c.duration_s);
    }
    s
}

/// Shows the status on stderr: rewritten in place on a terminal, else one line
/// per change.
fn status_line(text: &str) {
    use std::sync::Mutex;
    static LAST: Mutex<String> = Mutex::new(String::new());
    let mut last = LAST.lock().unwrap_or_else(|e| e.into_inner());
    let stderr = std::io::stderr();
    if stderr.is_terminal() {
        let _ = write!(stderr.lock(), "\r\x1b[2K{text}");
    } else {
        // Without a terminal only changes are worth a line; the seconds counter
        // would make every poll one.
        let key = text
            .split(", ")
            .filter(|p| !p.ends_with(" s"))
            .collect::<Vec<_>>()
            .join(", ");
        if *last != key {
            let _ = writeln!(stderr.lock(), "{text}");
            *last = key;
        }
    }
}

/// Ends the in-place status line.
fn finish_status() {
    let stderr = std::io::stderr();
    if stderr.is_terminal() {
        let _ = writeln!(stderr.lock());
    }
}

fn opt<T: std::fmt::Display>(v: Option<T>, unit: &str) -> String {
    v.map_or_else(|| "-".to_owned(), |v| format!("{v}{unit}"))
}

/// The human summary.
fn format_summary(s: &Summary) -> String {
    let mut out = String::new();
    let who = s.handle.as_deref().unwrap_or("(no handle)");
    let _ = writeln!(
        out,
        "call {} with {who}: {}",
        s.call,
        s.end_reason.as_deref().unwrap_or("ended")
    );
    let _ = writeln!(out, "  set-up            {}", opt(s.setup_ms, " ms"));
    let _ = writeln!(out, "  first audio       {}", opt(s.first_audio_ms, " ms"));
    let _ = writeln!(out, "  duration          {:.1} s", s.duration_s);
    let paths = if s.paths_used.is_empty() {
        "none".to_owned()
    } else {
        s.paths_used.join(", ")
    };
    let _ = writeln!(
        out,
        "  paths used        {paths} ({} switches)",
        s.path_switches
    );
    let _ = writeln!(
        out,
        "  frames            {} sent, {} received",
        s.frames_sent, s.frames_received
    );
    let _ = writeln!(
        out,
        "  concealed         {} ms (longest gap {} ms)",
        s.concealed_ms, s.max_gap_ms
    );
    let _ = writeln!(
        out,
        "  MOS estimate      {}",
        opt(s.mos_estimate.map(|m| format!("{m:.2}")), "")
    );
    if let Some(r) = &s.record {
        let _ = writeln!(out, "  recorded to       {r}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_positive_seconds() {
        assert_eq!(parse_duration("2.5").unwrap(), Duration::from_millis(2500));
        assert!(parse_duration("0").is_err());
        assert!(parse_duration("-1").is_err());
        assert!(parse_duration("soon").is_err());
    }
}
