//! Reads a server's Prometheus `/metrics` page before and after a configuration, so the
//! report can set the server's own counts beside the client's. Each series keeps its labels;
//! counters (and histogram/summary sums and counts) are reported as the change over the
//! configuration, gauges as their values before and after.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use crate::stats::{GaugeChange, ServerMetrics};

/// Kind of a metric family, from its `# TYPE` line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    /// Histogram or summary: `_sum` and `_count` are counters; buckets and quantiles are
    /// left out (too many series to read in a report).
    Distribution,
    Untyped,
}

/// One page of samples: series name with its labels (as written) -> value and kind.
pub type Samples = BTreeMap<String, (Kind, f64)>;

/// Reads every `dimple_*` sample from an `http://host:port/path` address. Errors come back
/// as text; a sweep goes on without server numbers.
pub fn scrape(url: &str) -> Result<Samples, String> {
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

/// Parses the Prometheus text format, keeping `dimple_*` series with their labels.
pub fn parse(text: &str) -> Samples {
    let mut kinds: BTreeMap<&str, Kind> = BTreeMap::new();
    let mut out = Samples::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut words = rest.split_whitespace();
            if let (Some(name), Some(kind)) = (words.next(), words.next()) {
                let kind = match kind {
                    "counter" => Kind::Counter,
                    "gauge" => Kind::Gauge,
                    "histogram" | "summary" => Kind::Distribution,
                    _ => Kind::Untyped,
                };
                kinds.insert(name, kind);
            }
            continue;
        }
        if line.starts_with('#') || !line.starts_with("dimple_") {
            continue;
        }
        // The value follows the series (whose label values may hold spaces) after the
        // closing brace, or after the name when there are no labels.
        let series_end = match line.find('{') {
            Some(_) => line.rfind('}').map_or(line.len(), |i| i + 1),
            None => line.find(' ').unwrap_or(line.len()),
        };
        let series = &line[..series_end];
        let name = &series[..series.find('{').unwrap_or(series.len())];
        let Some(value) = line[series_end..]
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
        else {
            continue;
        };
        let family = |suffix: &str| name.strip_suffix(suffix).and_then(|f| kinds.get(f));
        let kind = match kinds.get(name) {
            Some(&k) => k,
            None => match (family("_sum"), family("_count"), family("_bucket")) {
                (Some(Kind::Distribution), _, _) | (_, Some(Kind::Distribution), _) => {
                    Kind::Counter
                }
                (_, _, Some(Kind::Distribution)) => continue,
                _ => Kind::Untyped,
            },
        };
        if kind == Kind::Distribution {
            // Summary quantile series carry the family's own name.
            continue;
        }
        out.insert(series.to_string(), (kind, value));
    }
    out
}

/// Counters as `after - before`, gauges as both values. Untyped series are read as
/// counters when their names say so (`_total`, `_count`, `_sum`), else as gauges.
pub fn compare(before: &Samples, after: &Samples) -> ServerMetrics {
    let mut m = ServerMetrics::default();
    let names: std::collections::BTreeSet<&String> = before.keys().chain(after.keys()).collect();
    for name in names {
        let (b, a) = (before.get(name), after.get(name));
        let Some(&(kind, _)) = a.or(b) else { continue };
        let counter = match kind {
            Kind::Counter => true,
            Kind::Untyped => {
                let base = &name[..name.find('{').unwrap_or(name.len())];
                base.ends_with("_total") || base.ends_with("_count") || base.ends_with("_sum")
            }
            Kind::Gauge | Kind::Distribution => false,
        };
        if counter {
            if let Some(&(_, after)) = a {
                m.counters
                    .insert(name.clone(), after - b.map_or(0.0, |&(_, v)| v));
            }
        } else {
            m.gauges.insert(
                name.clone(),
                GaugeChange {
                    before: b.map(|&(_, v)| v),
                    after: a.map(|&(_, v)| v),
                },
            );
        }
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_labels_and_tells_gauges_from_counters() {
        let a = parse(concat!(
            "# HELP dimple_requests_total x\n",
            "# TYPE dimple_requests_total counter\n",
            "dimple_requests_total{outcome=\"ok\"} 3\n",
            "dimple_requests_total{outcome=\"err\"} 1\n",
            "# TYPE dimple_queue_depth gauge\n",
            "dimple_queue_depth 5\n",
            "# TYPE dimple_latency_seconds histogram\n",
            "dimple_latency_seconds_bucket{le=\"0.1\"} 2\n",
            "dimple_latency_seconds_sum 0.5\n",
            "dimple_latency_seconds_count 4\n",
            "other 9\n",
        ));
        assert_eq!(a["dimple_requests_total{outcome=\"ok\"}"].1, 3.0);
        assert_eq!(a["dimple_requests_total{outcome=\"err\"}"].1, 1.0);
        assert!(!a.contains_key("other"));
        assert!(
            !a.keys().any(|k| k.contains("_bucket")),
            "buckets are left out"
        );
        let b = parse(concat!(
            "# TYPE dimple_requests_total counter\n",
            "dimple_requests_total{outcome=\"ok\"} 10\n",
            "dimple_requests_total{outcome=\"err\"} 1\n",
            "# TYPE dimple_queue_depth gauge\n",
            "dimple_queue_depth 2\n",
            "# TYPE dimple_latency_seconds histogram\n",
            "dimple_latency_seconds_sum 1.5\n",
            "dimple_latency_seconds_count 9\n",
        ));
        let m = compare(&a, &b);
        assert_eq!(m.counters["dimple_requests_total{outcome=\"ok\"}"], 7.0);
        assert_eq!(m.counters["dimple_requests_total{outcome=\"err\"}"], 0.0);
        assert_eq!(m.counters["dimple_latency_seconds_count"], 5.0);
        assert_eq!(m.counters["dimple_latency_seconds_sum"], 1.0);
        assert!(!m.counters.contains_key("dimple_queue_depth"));
        assert_eq!(
            m.gauges["dimple_queue_depth"],
            GaugeChange {
                before: Some(5.0),
                after: Some(2.0)
            }
        );
    }

    #[test]
    fn label_values_with_spaces() {
        let s = parse("# TYPE dimple_x_total counter\ndimple_x_total{m=\"a b\"} 4 1700000000\n");
        assert_eq!(s["dimple_x_total{m=\"a b\"}"].1, 4.0);
    }
}
