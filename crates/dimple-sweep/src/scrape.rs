//! Reads a server's Prometheus `/metrics` page before and after a configuration, so the
//! report can set the server's own counts beside the client's.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// Sums every `dimple_*` sample by metric name (labels folded) from an `http://host:port/path`
/// address. Errors come back as text; a sweep goes on without server numbers.
pub fn scrape(url: &str) -> Result<BTreeMap<String, f64>, String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url}: only http:// is supported"))?;
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/metrics"),
    };
    let addr = std::net::ToSocketAddrs::to_socket_addrs(host)
        .map_err(|e| format!("{host}: {e}"))?
        .next()
        .ok_or_else(|| format!("{host}: no address"))?;
    let mut s =
        TcpStream::connect_timeout(&addr, Duration::from_secs(3)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").map_err(|e| e.to_string())?;
    let mut body = String::new();
    s.take(32 << 20)
        .read_to_string(&mut body)
        .map_err(|e| e.to_string())?;
    let text = body
        .split_once("\r\n\r\n")
        .map_or(body.as_str(), |(_, b)| b);
    Ok(parse(text))
}

pub fn parse(text: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        if line.starts_with('#') || !line.starts_with("dimple_") {
            continue;
        }
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let name = &line[..name_end];
        if let Some(v) = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) {
            *out.entry(name.to_string()).or_insert(0.0) += v;
        }
    }
    out
}

/// `after - before` for counters (names ending in `_total`, `_count` or `_sum`).
pub fn delta(
    before: &BTreeMap<String, f64>,
    after: &BTreeMap<String, f64>,
) -> BTreeMap<String, f64> {
    after
        .iter()
        .filter(|(k, _)| k.ends_with("_total") || k.ends_with("_count") || k.ends_with("_sum"))
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0.0)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_diffs_counters() {
        let a = parse(
            "# HELP x\ndimple_requests_total{outcome=\"ok\"} 3\ndimple_requests_total{outcome=\"err\"} 1\ndimple_queue_depth 5\nother 9\n",
        );
        assert_eq!(a["dimple_requests_total"], 4.0);
        assert!(!a.contains_key("other"));
        let b = parse("dimple_requests_total{outcome=\"ok\"} 10\ndimple_queue_depth 2\n");
        let d = delta(&a, &b);
        assert_eq!(d["dimple_requests_total"], 6.0);
        assert!(!d.contains_key("dimple_queue_depth"));
    }
}
