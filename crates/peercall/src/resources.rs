//! What the host offers the overlay: its local addresses (the directory record's
//! local endpoints) and its CPU headroom (for the supernode election).
//!
//! Both come from `/proc`, which needs no extra crate and no `unsafe`:
//! - IPv4 interface addresses from `/proc/net/fib_trie` (the kernel's local routing
//!   table lists every address assigned to this host as a `/32 host LOCAL` leaf),
//!   IPv6 from `/proc/net/if_inet6` (global scope, neither tentative, deprecated nor
//!   failed duplicate detection). Loopback, link-local (records cannot carry scope
//!   ids) and unspecified addresses are left out. Chosen over the "connect a UDP
//!   socket and read its local address" trick, which finds only the one address of
//!   the default route and nothing without one.
//! - CPU headroom from `/proc/stat` (idle and I/O-wait share of all CPU time since
//!   the last sample) and `/proc/loadavg` (one-minute load per CPU): the lower of
//!   the two, so a host busy for the last minute is not judged idle by one quiet
//!   sample, and one whose load is waiting on I/O is not judged busy.
//!
//! Bandwidth is not measured: it comes from config (`bandwidth_mbps`), since a
//! node cannot measure its uplink honestly without a peer to measure against.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::config::{LocalAddrs, MAX_LOCAL_ADDRS};

/// `/proc/net/if_inet6` flags that make an address unusable: tentative (duplicate
/// address detection running), deprecated (being retired), DAD failed.
const IFA_F_UNUSABLE: u32 = 0x40 | 0x20 | 0x08;
/// `/proc/net/if_inet6` scope of global addresses.
const SCOPE_GLOBAL: u32 = 0;

/// The local endpoints to list in the record for a socket bound to `bound`.
pub fn local_endpoints(setting: &LocalAddrs, bound: SocketAddr) -> Vec<SocketAddr> {
    let mut out: Vec<SocketAddr> = match setting {
        LocalAddrs::List(addrs) => addrs
            .iter()
            .map(|a| match a.port() {
                0 => SocketAddr::new(a.ip(), bound.port()),
                _ => *a,
            })
            .collect(),
        LocalAddrs::Auto if !bound.ip().is_unspecified() => vec![bound],
        LocalAddrs::Auto => {
            let v4 = std::fs::read_to_string("/proc/net/fib_trie")
                .map(|t| ipv4_from_fib_trie(&t))
                .unwrap_or_default();
            // An IPv6 socket bound to [::] also receives IPv4 (Linux's default
            // dual stack); an IPv4 socket cannot use IPv6 addresses.
            let v6 = if bound.is_ipv6() {
                std::fs::read_to_string("/proc/net/if_inet6")
                    .map(|t| ipv6_from_if_inet6(&t))
                    .unwrap_or_default()
            } else {
                Vec::new()
            };
            v4.into_iter()
                .map(IpAddr::V4)
                .chain(v6.into_iter().map(IpAddr::V6))
                .map(|ip| SocketAddr::new(ip, bound.port()))
                .collect()
        }
    };
    let mut seen = Vec::new();
    out.retain(|a| {
        let fresh = !seen.contains(a) && a.port() != 0 && !a.ip().is_unspecified();
        seen.push(*a);
        fresh
    });
    out.truncate(MAX_LOCAL_ADDRS);
    out
}

fn usable_v4(ip: &Ipv4Addr) -> bool {
    !(ip.is_loopback()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast())
}

/// The host's IPv4 addresses in `/proc/net/fib_trie` text, in order, without
/// repeats (the trie lists them once per routing table).
pub fn ipv4_from_fib_trie(text: &str) -> Vec<Ipv4Addr> {
    let mut out = Vec::new();
    let mut last: Option<Ipv4Addr> = None;
    for line in text.lines() {
        let line = line.trim();
        if let Some(addr) = line.strip_prefix("|-- ") {
            last = addr.trim().parse().ok();
        } else if line.starts_with("/32 host LOCAL")
            && let Some(ip) = last.take()
            && usable_v4(&ip)
            && !out.contains(&ip)
        {
            out.push(ip);
        }
    }
    out
}

/// The host's usable global IPv6 addresses in `/proc/net/if_inet6` text.
pub fn ipv6_from_if_inet6(text: &str) -> Vec<Ipv6Addr> {
    let mut out = Vec::new();
    for line in text.lines() {
        let cols: Vec<&str> = line.split_whitespace().collect();
        let [addr, _index, _prefix, scope, flags, ..] = cols[..] else {
            continue;
        };
        let (Ok(bits), Ok(scope), Ok(flags)) = (
            u128::from_str_radix(addr, 16),
            u32::from_str_radix(scope, 16),
            u32::from_str_radix(flags, 16),
        ) else {
            continue;
        };
        let ip = Ipv6Addr::from(bits);
        if addr.len() == 32
            && scope == SCOPE_GLOBAL
            && flags & IFA_F_UNUSABLE == 0
            && !ip.is_loopback()
            && !ip.is_unspecified()
            && !ip.is_multicast()
            && ip.to_ipv4_mapped().is_none()
            && !out.contains(&ip)
        {
            out.push(ip);
        }
    }
    out
}

/// Cumulative CPU time from the `cpu` line of `/proc/stat`: (all, idle + iowait),
/// in clock ticks. Guest time is already inside user time, so it is not added.
pub fn parse_proc_stat(text: &str) -> Option<(u64, u64)> {
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    // user nice system idle iowait irq softirq steal [guest guest_nice]
    let counted = fields.get(..8).or(fields.get(..4))?;
    let total = counted.iter().sum();
    let idle = fields[3] + fields.get(4).copied().unwrap_or(0);
    Some((total, idle))
}

/// The one-minute load average from `/proc/loadavg`.
pub fn parse_loadavg(text: &str) -> Option<f64> {
    text.split_whitespace().next()?.parse().ok()
}

/// CPU headroom from successive `/proc/stat` and `/proc/loadavg` readings.
#[derive(Debug, Clone, Default)]
pub struct CpuSampler {
    last: Option<(u64, u64)>,
}

impl CpuSampler {
    /// A sampler with no reading yet.
    pub fn new() -> CpuSampler {
        CpuSampler::default()
    }

    /// Takes a reading; returns the headroom in percent since the previous one
    /// (`None` on the first reading, or if the texts do not parse).
    pub fn sample(&mut self, stat: &str, loadavg: &str, cpus: usize) -> Option<u8> {
        let now = parse_proc_stat(stat)?;
        let last = self.last.replace(now)?;
        let total = now.0.checked_sub(last.0)?;
        let idle = now.1.checked_sub(last.1)?;
        if total == 0 {
            return None;
        }
        let idle_pct = (idle.min(total) * 100 / total) as f64;
        let load_pct = parse_loadavg(loadavg).map_or(0.0, |l| l * 100.0 / cpus.max(1) as f64);
        let headroom = idle_pct.min(100.0 - load_pct.clamp(0.0, 100.0));
        // In [0, 100] by construction.
        Some(headroom.round() as u8)
    }

    /// Reads the files now.
    pub fn sample_proc(&mut self) -> Option<u8> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let loadavg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        self.sample(&stat, &loadavg, cpus)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIB_TRIE: &str = "Main:
  +-- 0.0.0.0/0 3 0 5
     |-- 0.0.0.0
        /0 universe UNICAST
     +-- 127.0.0.0/8 2 0 2
        +-- 127.0.0.0/31 1 0 0
           |-- 127.0.0.0
              /8 host LOCAL
           |-- 127.0.0.1
              /32 host LOCAL
        |-- 127.255.255.255
           /32 link BROADCAST
     +-- 192.0.2.0/24 2 0 2
           |-- 192.0.2.0
              /24 link UNICAST
           |-- 192.0.2.2
              /32 host LOCAL
        |-- 192.0.2.255
           /32 link BROADCAST
     |-- 169.254.1.1
        /32 host LOCAL
Local:
           |-- 192.0.2.2
              /32 host LOCAL
           |-- 10.1.2.3
              /32 host LOCAL
";

    const IF_INET6: &str = "\
fd000000000000000000000000000002 04 40 00 82     eth0
00000000000000000000000000000001 01 80 10 80       lo
fe8000000000000000fc00fffe000001 04 40 20 80     eth0
20010db8000000000000000000000005 04 40 00 c0     eth0
20010db8000000000000000000000006 04 40 00 20     eth0
20010db8000000000000000000000007 04 40 00 00     eth0
garbage line
";

    #[test]
    fn finds_host_addresses_in_proc_text() {
        assert_eq!(
            ipv4_from_fib_trie(FIB_TRIE),
            vec![Ipv4Addr::new(192, 0, 2, 2), Ipv4Addr::new(10, 1, 2, 3)]
        );
        assert_eq!(
            ipv6_from_if_inet6(IF_INET6),
            vec![
                "fd00::2".parse::<Ipv6Addr>().unwrap(),
                "2001:db8::7".parse().unwrap()
            ]
        );
        assert!(ipv4_from_fib_trie("").is_empty());
        assert!(ipv6_from_if_inet6("zz 1 2 3 4 5\n").is_empty());
    }

    #[test]
    fn endpoints_follow_the_setting() {
        let bound: SocketAddr = "127.0.0.1:7600".parse().unwrap();
        assert_eq!(local_endpoints(&LocalAddrs::Auto, bound), vec![bound]);
        let list = LocalAddrs::List(vec![
            "10.0.0.2:0".parse().unwrap(),
            "198.51.100.1:9000".parse().unwrap(),
            "10.0.0.2:0".parse().unwrap(),
        ]);
        assert_eq!(
            local_endpoints(&list, bound),
            vec![
                "10.0.0.2:7600".parse().unwrap(),
                "198.51.100.1:9000".parse().unwrap()
            ]
        );
        assert!(local_endpoints(&LocalAddrs::List(vec![]), bound).is_empty());
        // Unspecified: the host's addresses, with the bound port, never loopback.
        let any: SocketAddr = "0.0.0.0:7600".parse().unwrap();
        for a in local_endpoints(&LocalAddrs::Auto, any) {
            assert!(
                a.is_ipv4() && a.port() == 7600 && !a.ip().is_loopback(),
                "{a}"
            );
        }
    }

    #[test]
    fn headroom_is_the_lower_of_idle_time_and_load() {
        let mut s = CpuSampler::new();
        let stat = |idle: u64| format!("cpu  100 0 100 {idle} 0 0 0 0 0 0\ncpu0 1 2 3\n");
        assert_eq!(s.sample(&stat(800), "0.00 0.1 0.1 1/100 5", 2), None);
        // 200 ticks more, 150 of them idle: 75% idle; load 0.5 of 2 CPUs: 75%.
        let later = "cpu  125 0 125 950 0 0 0 0 0 0\n";
        assert_eq!(s.sample(later, "0.50 0.1 0.1 1/100 5", 2), Some(75));
        // Idle, but the last minute's load saturates both CPUs.
        let idle = "cpu  125 0 125 1950 0 0 0 0 0 0\n";
        assert_eq!(s.sample(idle, "2.50 2 2 1/100 5", 2), Some(0));
        // No load figure: idle time alone.
        let idle2 = "cpu  125 0 125 2950 0 0 0 0 0 0\n";
        assert_eq!(s.sample(idle2, "", 2), Some(100));
        // Nothing elapsed, or garbage: no figure.
        assert_eq!(s.sample(idle2, "", 2), None);
        assert_eq!(s.sample("intr 5\n", "", 2), None);
        assert_eq!(parse_proc_stat("cpu  1 2 3\n"), None);
        assert_eq!(parse_proc_stat("cpu  1 2 3 4\n"), Some((10, 4)));
        assert!(CpuSampler::new().sample_proc().is_none(), "first reading");
    }
}
