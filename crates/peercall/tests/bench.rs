//! `peercall bench relay` end to end: a real relay process, real Noise clients,
//! voice-paced streams through it on loopback, one JSON report.

mod common;

use std::process::Stdio;

/// Streams per call (one each way) × packets per second × seconds.
const EXPECTED_PACKETS: u64 = 5 * 2 * 50 * 2;

#[test]
fn bench_relay_relays_every_packet_on_loopback() {
    let out = common::peercall()
        .args([
            "bench",
            "relay",
            "--calls",
            "5",
            "--duration",
            "2",
            "--json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .expect("peercall runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench failed: {stderr}");
    let stdout = String::from_utf8(out.stdout).expect("UTF-8");
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON object");
    let num = |k: &str| {
        report[k]
            .as_f64()
            .unwrap_or_else(|| panic!("{k} is a number in {report}"))
    };
    assert_eq!(report["calls"], 5);
    assert_eq!(num("duration_s"), 2.0);
    assert_eq!(num("loss"), 0.0, "{report}");
    assert_eq!(num("baseline_loss"), 0.0, "{report}");
    // The window's edges may cut a packet or two of each stream.
    let packets = report["packets"].as_u64().expect("packets");
    assert!(
        packets.abs_diff(EXPECTED_PACKETS) <= 40,
        "{packets} packets relayed: {report}"
    );
    let cpu = num("relay_cpu_us_per_packet");
    assert!(cpu.is_finite() && cpu >= 0.0, "{report}");
    for k in [
        "relay_latency_us_p50",
        "relay_latency_us_p99",
        "baseline_latency_us_p50",
    ] {
        let v = num(k);
        assert!(v > 0.0 && v < 1e6, "{k} = {v}");
    }
    assert!(num("relay_latency_us_p99") >= num("relay_latency_us_p50"));
    for k in ["added_latency_us_p50", "added_latency_us_p99"] {
        assert!(num(k).is_finite(), "{k}");
    }
}
