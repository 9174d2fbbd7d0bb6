//! Wire format: parse and encode costs of the packets on the hot path.

use criterion::{Criterion, criterion_group, criterion_main};
use peercall_wire::frame::{Frame, Media};
use peercall_wire::packet::{Packet, Transport};
use std::hint::black_box;

fn wire(c: &mut Criterion) {
    let opus = [0x5au8; 80];
    let media = Frame::Media(Media {
        path: 1,
        path_seq: 77,
        seq: 1234,
        timestamp: 960 * 1234,
        flags: 0,
        payload: &opus,
    });
    let mut frame_buf = [0u8; 256];
    let frame_len = media.encode(&mut frame_buf).expect("fits");

    let mut packet = [0u8; 256];
    let n = Transport::encode_header(42, 9, &mut packet).expect("fits");
    let packet_len = n + 160;

    let mut g = c.benchmark_group("wire");
    g.bench_function("parse_transport_160", |b| {
        b.iter(|| Packet::parse(black_box(&packet[..packet_len])))
    });
    g.bench_function("encode_transport_header", |b| {
        let mut out = [0u8; 64];
        b.iter(|| Transport::encode_header(black_box(42), black_box(9), &mut out))
    });
    g.bench_function("parse_media_frame", |b| {
        b.iter(|| Frame::parse(black_box(&frame_buf[..frame_len])))
    });
    g.bench_function("encode_media_frame", |b| {
        let mut out = [0u8; 256];
        b.iter(|| black_box(&media).encode(&mut out))
    });
    g.finish();
}

criterion_group!(benches, wire);
criterion_main!(benches);
