//! The directory store at a million records: bytes per record (printed at set-up,
//! from the store's own accounting and from the process's resident memory), and
//! the cost of inserts and reads.
//!
//! Records are layout-valid 243-byte records (handle, static key, one endpoint, two
//! home supernodes: a typical record) with random keys; the store does not verify
//! signatures (its caller does), so none are computed here.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use peercall_crypto::UserId;
use peercall_overlay::store::Store;
use peercall_overlay::util::KeyedState;
use peercall_wire::Time;
use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};

const RECORDS: usize = 1_000_000;
const NOW: Time = Time::from_secs(1_700_000_000);

fn record(rng: &mut ChaCha20Rng, n: usize, seq: u64) -> Vec<u8> {
    let handle = format!("user{n}");
    let mut body = Vec::new();
    body.push(handle.len() as u8);
    body.extend_from_slice(handle.as_bytes());
    let mut key = [0u8; 32];
    rng.fill_bytes(&mut key);
    body.extend_from_slice(&key);
    body.push(1);
    body.extend_from_slice(&[4, 203, 0, 113, 7, 0x1d, 0xb0]);
    body.push(2);
    for _ in 0..2 {
        rng.fill_bytes(&mut key);
        body.extend_from_slice(&key);
        body.extend_from_slice(&[4, 198, 51, 100, 1, 0x1d, 0xb0]);
    }
    let mut out = vec![1u8];
    rng.fill_bytes(&mut key);
    out.extend_from_slice(&key);
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(&(NOW.as_secs() + 3600).to_be_bytes());
    out.extend_from_slice(&(body.len() as u16).to_be_bytes());
    out.extend_from_slice(&body);
    out.extend_from_slice(&[7u8; 64]);
    out
}

fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

fn bench(c: &mut Criterion) {
    let mut rng = ChaCha20Rng::seed_from_u64(1);
    let users: Vec<UserId> = (0..RECORDS)
        .map(|_| {
            let mut u = [0u8; 32];
            rng.fill_bytes(&mut u);
            UserId(u)
        })
        .collect();
    let records: Vec<Vec<u8>> = (0..RECORDS).map(|n| record(&mut rng, n, 1)).collect();
    let before = rss_bytes();
    let mut store = Store::new(KeyedState::fixed(1, 2));
    for (u, r) in users.iter().zip(&records) {
        store.insert(NOW, *u, r).expect("stores");
    }
    let after = rss_bytes();
    let n = store.len() as f64;
    eprintln!(
        "directory: {} records, {:.0} bytes of signed record each, {:.1} bytes of index overhead each (slab, free list, both indexes)",
        store.len(),
        store.record_bytes() as f64 / n,
        store.overhead_bytes() as f64 / n
    );
    if let (Some(b), Some(a)) = (before, after) {
        let per = a.saturating_sub(b) as f64 / n;
        eprintln!(
            "directory: resident memory grew {:.0} bytes per record in all ({:.0} beyond the signed bytes, allocator rounding included)",
            per,
            per - store.record_bytes() as f64 / n
        );
    }
    drop(records);

    let mut i = 0usize;
    c.bench_function("directory/get by user id (1M records)", |b| {
        b.iter(|| {
            i = (i + 7919) % RECORDS;
            black_box(store.get(&users[i]))
        })
    });
    let mut j = 0usize;
    c.bench_function("directory/get by handle (1M records)", |b| {
        b.iter(|| {
            j = (j + 7919) % RECORDS;
            black_box(store.get_by_handle(&format!("user{j}")))
        })
    });
    let mut seq = 2u64;
    let mut k = 0usize;
    let mut rng2 = ChaCha20Rng::seed_from_u64(2);
    let fresh: Vec<Vec<u8>> = (0..1024).map(|n| record(&mut rng2, n, 0)).collect();
    c.bench_function("directory/replace a record (1M records)", |b| {
        b.iter(|| {
            k = (k + 1) % 1024;
            seq += 1;
            let mut r = fresh[k].clone();
            r[33..41].copy_from_slice(&seq.to_be_bytes());
            // Same handle as the record it replaces, so the handle rule passes.
            let user = users[k];
            let held = store.get(&user).expect("held").to_vec();
            let hl = usize::from(held[51]);
            r.truncate(51);
            r.extend_from_slice(&held[51..51 + 1 + hl]);
            r.extend_from_slice(&fresh[k][51 + 1 + usize::from(fresh[k][51])..]);
            let body_len = (r.len() - 51 - 64) as u16;
            r[49..51].copy_from_slice(&body_len.to_be_bytes());
            black_box(store.insert(NOW, user, &r).expect("stores"))
        })
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20);
    targets = bench
}
criterion_main!(benches);
