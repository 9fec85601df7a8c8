//! A run's results: `results.json` (the checker's verdict and counts) and `report.html`,
//! one page a person would rather look at than read logs: the verdict and the anomaly
//! table, acknowledged sends per second and send latency over time, with every fault
//! interval shaded and labelled and every leader change marked.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write;
use std::path::Path;

use crate::history::{Event, Kind, Op};
use crate::runner::RunSummary;

/// A chart series: name, colour, points (seconds, value).
type Series<'a> = (&'a str, &'a str, Vec<(f64, f64)>);

const WIDTH: f64 = 1000.0;
const HEIGHT: f64 = 220.0;
const MARGIN: f64 = 40.0;

/// Per second of the run: sends completed by kind, and send latencies (ms).
#[derive(Default)]
struct Second {
    ok: u64,
    info: u64,
    fail: u64,
    latencies_ms: Vec<f64>,
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// Writes `results.json` and `report.html` into `dir`.
pub fn write(dir: &Path, summary: &RunSummary, events: &[Event]) -> std::io::Result<()> {
    std::fs::write(dir.join("results.json"), serde_json::to_string_pretty(summary).expect("results encode"))?;
    std::fs::write(dir.join("report.html"), html(summary, events))
}

fn html(summary: &RunSummary, events: &[Event]) -> String {
    let end_s = events.last().map_or(1.0, |e| e.time as f64 / 1e9).max(1.0);
    let mut seconds: BTreeMap<u64, Second> = BTreeMap::new();
    let mut invoked: HashMap<u64, u64> = HashMap::new();
    let mut faults: Vec<(String, f64, f64)> = Vec::new();
    let mut open: HashMap<String, f64> = HashMap::new();
    let mut leader_changes: Vec<f64> = Vec::new();
    let mut last_leader: HashMap<(String, u32), Option<u64>> = HashMap::new();
    for e in events {
        let t = e.time as f64 / 1e9;
        match (&e.op, e.kind) {
            (Op::Send(_), Kind::Invoke) => {
                invoked.insert(e.id, e.time);
            }
            (Op::Send(_), kind) => {
                let s = seconds.entry(e.time / 1_000_000_000).or_default();
                match kind {
                    Kind::Ok => {
                        s.ok += 1;
                        if let Some(start) = invoked.get(&e.id) {
                            s.latencies_ms.push((e.time - start) as f64 / 1e6);
                        }
                    }
                    Kind::Info => s.info += 1,
                    _ => s.fail += 1,
                }
            }
            (Op::Fault(f), _) => {
                let key = format!("{} {}", f.name, f.detail);
                if f.phase == "start" {
                    open.insert(key, t);
                } else if f.phase == "stop" {
                    if let Some(start) = open.remove(&key) {
                        faults.push((format!("{} {}", f.name, f.detail["nodes"]), start, t));
                    }
                }
            }
            (Op::Leader(l), _) => {
                let key = (l.topic.clone(), l.partition);
                if let Some(prev) = last_leader.insert(key, l.leader) {
                    if prev != l.leader {
                        leader_changes.push(t);
                    }
                }
            }
            _ => {}
        }
    }
    for (name, start) in open {
        faults.push((name, start, end_s));
    }
    let x = |t: f64| MARGIN + (t / end_s) * (WIDTH - 2.0 * MARGIN);
    let chart = |title: &str, series: &[Series], unit: &str| -> String {
        let max = series.iter().flat_map(|(_, _, pts)| pts.iter().map(|p| p.1)).fold(1.0f64, f64::max) * 1.1;
        let y = |v: f64| HEIGHT - MARGIN / 2.0 - (v / max) * (HEIGHT - MARGIN);
        let mut svg = String::new();
        let _ = write!(svg, r#"<h2>{}</h2><svg width="{WIDTH}" height="{HEIGHT}" style="background:#fff;border:1px solid #ccc">"#, escape(title));
        for (i, (name, a, b)) in faults.iter().enumerate() {
            let color = ["#fde2e2", "#e2ecfd", "#e6f5e0", "#fdf3d8", "#efe2fd"][i % 5];
            let _ = write!(
                svg,
                r#"<rect x="{:.1}" y="0" width="{:.1}" height="{HEIGHT}" fill="{color}"><title>{}</title></rect>"#,
                x(*a),
                (x(*b) - x(*a)).max(1.0),
                escape(name)
            );
            let _ = write!(
                svg,
                r##"<text x="{:.1}" y="{}" font-size="9" fill="#666">{}</text>"##,
                x(*a) + 2.0,
                10 + (i % 4) * 10,
                escape(name.split(' ').next().unwrap_or(""))
            );
        }
        for t in &leader_changes {
            let _ = write!(
                svg,
                r##"<line x1="{0:.1}" x2="{0:.1}" y1="{1}" y2="{2}" stroke="#999" stroke-dasharray="2,2"><title>leader change at {3:.1} s</title></line>"##,
                x(*t),
                HEIGHT - MARGIN / 2.0,
                HEIGHT - MARGIN / 2.0 - 12.0,
                t
            );
        }
        for (name, color, pts) in series {
            let path: Vec<String> = pts.iter().map(|(t, v)| format!("{:.1},{:.1}", x(*t), y(*v))).collect();
            let _ = write!(
                svg,
                r#"<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{}"><title>{}</title></polyline>"#,
                path.join(" "),
                escape(name)
            );
        }
        let _ = write!(svg, r##"<text x="4" y="12" font-size="10">{max:.0} {unit}</text><text x="4" y="{}" font-size="10">0</text>"##, HEIGHT - MARGIN / 2.0);
        let _ = write!(svg, r##"<text x="{}" y="{}" font-size="10">{end_s:.0} s</text>"##, WIDTH - MARGIN, HEIGHT - 4.0);
        let legend: Vec<String> = series.iter().map(|(n, c, _)| format!(r#"<span style="color:{c}">■ {}</span>"#, escape(n))).collect();
        svg + "</svg><p>" + &legend.join(" &nbsp; ") + "</p>"
    };
    let mut ok = Vec::new();
    let mut info = Vec::new();
    let mut fail = Vec::new();
    let mut p50 = Vec::new();
    let mut p99 = Vec::new();
    for (s, sec) in &mut seconds {
        let t = *s as f64 + 0.5;
        ok.push((t, sec.ok as f64));
        info.push((t, sec.info as f64));
        fail.push((t, sec.fail as f64));
        sec.latencies_ms.sort_by(f64::total_cmp);
        p50.push((t, percentile(&sec.latencies_ms, 0.5)));
        p99.push((t, percentile(&sec.latencies_ms, 0.99)));
    }
    let r = &summary.results;
    let mut page = String::new();
    let verdict = if r.valid { r#"<span style="color:#1a7f37">VALID</span>"# } else { r#"<span style="color:#cf222e">INVALID</span>"# };
    let _ = write!(
        page,
        r#"<!doctype html><html><head><meta charset="utf-8"><title>keel-jepsen run {}</title></head><body style="font-family:sans-serif;max-width:1040px;margin:auto">"#,
        summary.seed
    );
    let _ = write!(page, "<h1>keel-jepsen run: {verdict}</h1>");
    if let Some(m) = &summary.sabotage {
        let _ =
            write!(page, "<p style=\"color:#cf222e\">Sabotage <b>{}</b>: the nodes ran with this deliberate bug; the checker should find it.</p>", escape(m));
    }
    let _ = write!(
        page,
        "<p>seed {} · {:.0} s · {} · faults: {}</p>",
        summary.seed,
        summary.seconds,
        if summary.netns { "nodes in network namespaces" } else { "nodes on loopback (no network faults)" },
        escape(&summary.faults_enabled.join(", "))
    );
    let s = &r.stats;
    let _ = write!(
        page,
        "<p>sends {} (acknowledged {}, failed {}, unknown {}) · polls {} · distinct messages read {} · faults injected {} · leader changes {} · node dumps {}</p>\
         <p>retries recognised as duplicates and stored once {} · messages stored twice {} · longest time without an acknowledgement {} ms</p>",
        s.sends,
        s.acked,
        s.failed,
        s.unknown,
        s.polls,
        s.distinct_read,
        s.faults,
        s.leader_changes,
        s.dumps,
        s.retries_deduplicated,
        s.duplicates_stored,
        s.longest_ack_gap_ms
    );
    if !r.vacuous.is_empty() {
        let _ = write!(page, "<p style=\"color:#cf222e\">Invalid (floors or final phase): {}</p>", escape(&r.vacuous.join("; ")));
    }
    page += &chart("Sends completed per second", &[("ok", "#1a7f37", ok), ("info (unknown)", "#bf8700", info), ("fail", "#cf222e", fail)], "/s");
    page += &chart("Latency of acknowledged sends", &[("p50", "#0969da", p50), ("p99", "#8250df", p99)], "ms");
    page += "<h2>Anomalies</h2><table border=\"1\" cellpadding=\"4\" style=\"border-collapse:collapse\"><tr><th>anomaly</th><th>verdict</th><th>count</th><th>examples</th></tr>";
    for a in &r.anomalies {
        let style = if a.count > 0 && a.verdict == crate::checker::Verdict::Forbidden { " style=\"background:#fde2e2\"" } else { "" };
        let examples: Vec<String> = a.examples.iter().map(|e| escape(e)).collect();
        let _ = write!(page, "<tr{style}><td>{}</td><td>{:?}</td><td>{}</td><td>{}</td></tr>", a.name, a.verdict, a.count, examples.join("<br>"));
    }
    page += "</table><h2>Faults</h2><ul>";
    for (name, a, b) in &faults {
        let _ = write!(page, "<li>{:.1}–{:.1} s: {}</li>", a, b, escape(name));
    }
    page += "</ul></body></html>\n";
    page
}
