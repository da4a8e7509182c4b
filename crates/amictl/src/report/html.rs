//! The report as one self-contained HTML page: inline CSS, inline SVG charts, no script and no
//! reference to anything outside the file, so it opens offline and reads the same years later.
//! Every text that comes from AWS or the policy (group, stage and parameter names, reasons,
//! operators' words) goes through [`esc`]. Each figure a person reads carries `data-stage` and
//! `data-figure` attributes (each chart segment `data-count`), so a test reads the rendered page
//! as a browser built it and checks it against `amictl status --json`.

use std::fmt::Write;

use super::{Report, StageReport};
use crate::compliance::{AmiClass, InstanceCounts};
use crate::trace::short_time;

/// The page's style: plain, printable, readable without colour (every bar is also a number).
const STYLE: &str = r#"
*{box-sizing:border-box}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d2327;margin:0 auto;padding:24px;max-width:1200px}
h1{font-size:24px;margin:0 0 4px}h2{font-size:19px;margin:32px 0 8px;border-bottom:1px solid #ccd0d4;padding-bottom:4px}
h3{font-size:15px;margin:20px 0 6px}
.meta{color:#50575e;margin:0 0 16px}
table{border-collapse:collapse;margin:6px 0 12px;width:100%}
th,td{border:1px solid #dcdcde;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f6f7f7;font-weight:600}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
code,.id{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:12.5px;white-space:nowrap}
.id.wrap{white-space:normal;overflow-wrap:anywhere}
.attention{border-left:4px solid #b32d2e;background:#fcf0f1;padding:8px 12px;margin:12px 0}
.ok{border-left:4px solid #00a32a;background:#edfaef;padding:8px 12px;margin:12px 0}
.chip{display:inline-block;padding:0 6px;border-radius:3px;color:#fff;font-size:12px}
.golden{background:#2e7d32}.previous-golden{background:#f0a30a;color:#1d2327}.older-golden{background:#c62828}.other{background:#757575}
.state-current{color:#2e7d32}.state-failed,.state-rolled-back{color:#b32d2e;font-weight:600}
.state-stale,.state-refreshing{color:#996800}.state-skipped{color:#50575e}
svg text{font:12px system-ui,sans-serif;fill:#1d2327}
svg .in{fill:#fff}
.note{color:#50575e;font-size:12.5px}
@media print{body{padding:0}h2{break-after:avoid}table{break-inside:auto}tr{break-inside:avoid}}
"#;

/// Escape text for HTML content and quoted attribute values.
pub fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The four kinds of AMI an instance runs, as the charts colour them.
const CLASSES: [(AmiClass, &str, &str); 4] = [
    (AmiClass::Golden, "golden (N)", "#2e7d32"),
    (AmiClass::PreviousGolden, "previous golden (N-1)", "#f0a30a"),
    (AmiClass::OlderGolden, "older golden", "#c62828"),
    (AmiClass::Other, "other AMI", "#757575"),
];

/// The AMI age buckets' colours, youngest first, then "unknown".
const AGE_COLOURS: [&str; 5] = ["#2e7d32", "#8bc34a", "#f0a30a", "#c62828", "#9e9e9e"];

fn percent(part: usize, whole: usize) -> String {
    if whole == 0 {
        "-".into()
    } else {
        format!("{:.1}%", part as f64 * 100.0 / whole as f64)
    }
}

/// A day, for an AMI's creation.
fn day(at: Option<chrono::DateTime<chrono::Utc>>) -> Option<String> {
    at.map(|t| t.format("%Y-%m-%d").to_string())
}

fn or_dash(value: Option<&str>) -> String {
    value.map_or_else(|| "-".into(), esc)
}

pub fn render(report: &Report) -> String {
    let mut page = String::new();
    let s = &report.summary;
    let _ = write!(
        page,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n<title>amiflow compliance report {}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n",
        esc(&report.generated_at.format("%Y-%m-%d %H:%M UTC").to_string())
    );
    let _ = write!(
        page,
        "<header>\n<h1>Golden AMI compliance</h1>\n<p class=\"meta\">Made <time id=\"generated-at\" datetime=\"{at}\">{shown}</time> by <code>amictl report</code> from {scope}, report version <span id=\"report-version\">{version}</span>; window history {since}.</p>\n</header>\n",
        at = esc(&report.generated_at.to_rfc3339()),
        shown = report.generated_at.format("%Y-%m-%d %H:%M:%S UTC"),
        scope = esc(&report.scope),
        version = report.version,
        since = report.since.map_or_else(
            || "as far back as recorded".to_owned(),
            |t| format!("since {}", t.format("%Y-%m-%d %H:%M:%S UTC"))
        ),
    );
    match &s.attention {
        Some(why) => {
            let _ = writeln!(
                page,
                "<p class=\"attention\" id=\"attention\"><strong>Needs a person:</strong> {}</p>",
                esc(why)
            );
        }
        None => page.push_str(
            "<p class=\"ok\" id=\"attention\">Nothing needs a person: no stage is halted and no group's last refresh failed or rolled back.</p>\n",
        ),
    }
    page.push_str(&at_a_glance(report));
    page.push_str("<h2>Charts</h2>\n<h3>Share of instances on the golden AMI (N), the previous one (N-1), older golden AMIs and other AMIs, per stage</h3>\n");
    page.push_str(&stacked_bars("chart-share", &report.stages, |st| {
        CLASSES
            .iter()
            .map(|&(class, label, colour)| Segment {
                key: class.as_str(),
                label,
                count: st.instances_by_ami.of_class(class),
                colour,
            })
            .collect()
    }));
    page.push_str("<h3>Age of the AMI each instance runs, per stage</h3>\n");
    page.push_str(&stacked_bars("chart-age", &report.stages, |st| {
        st.instances_by_ami_age
            .iter()
            .zip(AGE_COLOURS)
            .map(|(bucket, colour)| Segment {
                key: bucket.label,
                label: bucket.label,
                count: bucket.instances,
                colour,
            })
            .collect()
    }));
    page.push_str("<p class=\"note\">The charts count the instances of the Auto Scaling groups of a golden family, each by the AMI it runs (not the one its group's configuration names); groups of no golden family are listed below, not charted.</p>\n");
    for (index, st) in report.stages.iter().enumerate() {
        page.push_str(&stage_section(index, st));
    }
    page.push_str("<footer><p class=\"note\">Read from AWS: each stage account's golden parameters and their history (SSM), Auto Scaling groups and instances, AMIs' creation dates (EC2), the refresh-worker's mark on each group; from the hub: the gates' promotion records (/amiflow/gate), the operators' decisions in force (/amiflow/control) and the audit log (/amiflow/audit). Judged with amiflow's own code, as <code>amictl status</code> and <code>amictl plan</code> judge.</p></footer>\n</body>\n</html>\n");
    page
}

/// Per stage (and in total): the figures a person looks at first, each with its `data-figure`.
fn at_a_glance(report: &Report) -> String {
    let mut t = String::from(
        "<h2>At a glance</h2>\n<table id=\"at-a-glance\">\n<thead><tr><th>stage</th><th>account</th><th class=\"n\">groups</th><th class=\"n\">left behind</th><th class=\"n\">instances</th><th class=\"n\">on golden (N)</th><th class=\"n\">on previous (N-1)</th><th class=\"n\">on older golden</th><th class=\"n\">on other AMIs</th><th class=\"n\">share on golden</th></tr></thead>\n<tbody>\n",
    );
    let row = |stage: &str,
               attr: &str,
               account: &str,
               groups: usize,
               behind: usize,
               counts: &InstanceCounts| {
        let total = counts.total();
        let cell = |figure: &str, value: String| {
            format!("<td class=\"n\" data-figure=\"{figure}\">{value}</td>")
        };
        format!(
            "<tr data-stage=\"{attr}\"><th>{stage}</th><td class=\"id\">{account}</td>{}{}{}{}{}{}{}{}</tr>\n",
            cell("groups", groups.to_string()),
            cell("groups-left-behind", behind.to_string()),
            cell("instances", total.to_string()),
            cell("golden", counts.golden.to_string()),
            cell("previous-golden", counts.previous_golden.to_string()),
            cell("older-golden", counts.older_golden.to_string()),
            cell("other", counts.other.to_string()),
            cell("golden-share", percent(counts.golden, total)),
        )
    };
    for st in &report.stages {
        t.push_str(&row(
            &esc(&st.stage),
            &esc(&st.stage),
            &esc(&st.account),
            st.groups.len(),
            st.groups_left_behind,
            &st.instances_by_ami,
        ));
    }
    let s = &report.summary;
    t.push_str("</tbody>\n<tfoot>\n");
    t.push_str(&row(
        "all stages",
        "*",
        "",
        s.groups,
        s.groups_left_behind,
        &s.instances_by_ami,
    ));
    t.push_str("</tfoot>\n</table>\n");
    let _ = writeln!(
        t,
        "<p class=\"note\">Instances of groups of no golden family: <span data-figure=\"instances-of-other-groups\">{}</span>. Oldest AMI a charted instance runs: <span data-figure=\"oldest-ami-age-days\">{}</span>.</p>",
        s.instances_of_other_groups,
        s.oldest_ami_age_days
            .map_or_else(|| "unknown".to_owned(), |d| format!("{d} days"))
    );
    t
}

/// One part of a bar.
struct Segment {
    key: &'static str,
    label: &'static str,
    count: usize,
    colour: &'static str,
}

/// One horizontal bar per row (a stage), split into its segments in proportion, each with its
/// count, share and a tooltip; then a legend. An empty row is an outline saying so.
fn stacked_bars(
    id: &str,
    stages: &[StageReport],
    segments: impl Fn(&StageReport) -> Vec<Segment>,
) -> String {
    let rows: Vec<(&str, Vec<Segment>)> = stages
        .iter()
        .map(|st| (st.stage.as_str(), segments(st)))
        .collect();
    const LABEL: f64 = 150.0;
    const BAR: f64 = 600.0;
    const ROW: f64 = 30.0;
    let legend_y = rows.len() as f64 * ROW + 10.0;
    let height = legend_y + 24.0;
    let width = LABEL + BAR + 120.0;
    let mut svg = format!(
        "<svg id=\"{id}\" xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 {width} {height}\" width=\"{width}\" height=\"{height}\" role=\"img\" aria-labelledby=\"{id}-title\">\n<title id=\"{id}-title\">{}</title>\n",
        if id == "chart-share" {
            "Share of instances by AMI, per stage"
        } else {
            "Instances by AMI age, per stage"
        }
    );
    for (index, (stage, segments)) in rows.iter().enumerate() {
        let y = index as f64 * ROW;
        let total: usize = segments.iter().map(|s| s.count).sum();
        let _ = writeln!(
            svg,
            "<g data-stage=\"{}\" data-total=\"{total}\">\n<text x=\"0\" y=\"{:.1}\">{}</text>",
            esc(stage),
            y + 18.0,
            esc(stage)
        );
        if total == 0 {
            let _ = writeln!(
                svg,
                "<rect x=\"{LABEL}\" y=\"{:.1}\" width=\"{BAR}\" height=\"22\" fill=\"none\" stroke=\"#9e9e9e\"/><text x=\"{:.1}\" y=\"{:.1}\">no instances</text>",
                y + 2.0,
                LABEL + 8.0,
                y + 18.0
            );
        }
        let mut x = LABEL;
        for seg in segments.iter().filter(|s| s.count > 0) {
            let w = BAR * seg.count as f64 / total as f64;
            let share = percent(seg.count, total);
            let _ = writeln!(
                svg,
                "<rect x=\"{x:.2}\" y=\"{:.1}\" width=\"{w:.2}\" height=\"22\" fill=\"{}\" data-key=\"{}\" data-count=\"{}\"><title>{}: {} of {total} instances ({share})</title></rect>",
                y + 2.0,
                seg.colour,
                esc(seg.key),
                seg.count,
                esc(stage),
                seg.count,
            );
            // The share inside the segment when it fits, so the chart reads without hovering.
            if w >= 44.0 {
                let _ = writeln!(
                    svg,
                    "<text class=\"in\" x=\"{:.2}\" y=\"{:.1}\">{share}</text>",
                    x + 4.0,
                    y + 18.0
                );
            }
            x += w;
        }
        let _ = writeln!(
            svg,
            "<text x=\"{:.1}\" y=\"{:.1}\">{total} instances</text>\n</g>",
            LABEL + BAR + 8.0,
            y + 18.0
        );
    }
    // The legend: every segment kind, in order.
    let mut x = 0.0;
    if let Some((_, segments)) = rows.first() {
        for seg in segments {
            let _ = writeln!(
                svg,
                "<rect x=\"{x:.1}\" y=\"{legend_y:.1}\" width=\"12\" height=\"12\" fill=\"{}\"/><text x=\"{:.1}\" y=\"{:.1}\">{}</text>",
                seg.colour,
                x + 16.0,
                legend_y + 11.0,
                esc(seg.label)
            );
            x += 24.0 + 7.0 * seg.label.len() as f64;
        }
    }
    svg.push_str("</svg>\n");
    svg
}

fn stage_section(index: usize, st: &StageReport) -> String {
    let mut h = String::new();
    let _ = write!(
        h,
        "<section class=\"stage\" id=\"stage-{index}\" data-stage=\"{stage}\">\n<h2>Stage {stage} <span class=\"note\">account <span class=\"id\">{account}</span></span></h2>\n",
        stage = esc(&st.stage),
        account = esc(&st.account)
    );
    h.push_str("<h3>Golden parameters</h3>\n<table><thead><tr><th>parameter</th><th>golden AMI (N)</th><th class=\"n\">version</th><th>AMI created</th><th class=\"n\">AMI age (days)</th><th>previous golden AMI (N-1)</th></tr></thead><tbody>\n");
    for p in &st.parameters {
        let _ = writeln!(
            h,
            "<tr><td class=\"id\">{}</td><td class=\"id\">{}</td><td class=\"n\">{}</td><td>{}</td><td class=\"n\" data-figure=\"golden-ami-age-days\">{}</td><td class=\"id\">{}</td></tr>",
            esc(&p.name),
            or_dash(p.ami.as_deref()),
            p.version.map_or_else(|| "-".into(), |v| v.to_string()),
            or_dash(day(p.ami_created_at).as_deref()),
            p.ami_age_days.map_or_else(|| "-".into(), |d| d.to_string()),
            or_dash(p.previous_ami.as_deref()),
        );
    }
    h.push_str("</tbody></table>\n");
    if !st.gates.is_empty() {
        h.push_str("<h3>Gates now</h3>\n<table><thead><tr><th>rollout</th><th>gate</th><th>why</th></tr></thead><tbody>\n");
        for g in &st.gates {
            let _ = writeln!(
                h,
                "<tr><td class=\"id\">{}@{}</td><td>{}</td><td>{}</td></tr>",
                esc(&g.parameter),
                or_dash(g.ami.as_deref()),
                esc(g.state),
                esc(&g.detail)
            );
        }
        h.push_str("</tbody></table>\n");
    }
    let behind: Vec<_> = st.groups.iter().filter(|g| g.left_behind).collect();
    let _ = writeln!(
        h,
        "<h3>Groups left behind: <span data-figure=\"groups-left-behind\">{}</span></h3>",
        behind.len()
    );
    if behind.is_empty() {
        h.push_str("<p>Every group of a golden family is current on its golden AMI.</p>\n");
    } else {
        h.push_str("<table class=\"left-behind\"><thead><tr><th>group</th><th>state</th><th>AMI it launches</th><th class=\"n\">instances N / N-1 / older / other</th><th>why</th></tr></thead><tbody>\n");
        for g in behind {
            let n = &g.instances_by_ami;
            let _ = writeln!(
                h,
                "<tr><td class=\"id\">{name}</td><td class=\"state-{state}\">{state}</td><td class=\"id\">{}</td><td class=\"n\">{} / {} / {} / {}</td><td>{}</td></tr>",
                or_dash(g.ami.as_deref()),
                n.golden,
                n.previous_golden,
                n.older_golden,
                n.other,
                esc(&g.reason),
                name = esc(&g.name),
                state = g.state.as_str(),
            );
        }
        h.push_str("</tbody></table>\n");
    }
    h.push_str("<h3>Groups and their last refresh</h3>\n<table class=\"groups\"><thead><tr><th>group</th><th>state</th><th class=\"n\">instances</th><th>last rollout</th><th>outcome</th><th>instance refresh</th><th>window closes (UTC)</th><th>finished (UTC)</th></tr></thead><tbody>\n");
    for g in &st.groups {
        let last = g.last_refresh.as_ref();
        let _ = writeln!(
            h,
            "<tr><td class=\"id\">{name}</td><td class=\"state-{state}\">{state}</td><td class=\"n\">{}</td><td class=\"id\">{}</td><td>{}</td><td class=\"id wrap\">{}</td><td>{}</td><td>{}</td></tr>",
            g.instances.len(),
            or_dash(last.map(|l| l.rollout_id.as_str())),
            or_dash(last.map(|l| l.outcome.as_str())),
            or_dash(last.and_then(|l| l.instance_refresh_id.as_deref())),
            or_dash(
                last.and_then(|l| l.window_closes_at.as_deref())
                    .map(short_time)
                    .as_deref()
            ),
            or_dash(
                last.and_then(|l| l.finished_at.as_deref())
                    .map(short_time)
                    .as_deref()
            ),
            name = esc(&g.name),
            state = g.state.as_str(),
        );
    }
    h.push_str("</tbody></table>\n");
    h.push_str("<h3>Instances</h3>\n<table class=\"instances\"><thead><tr><th>group</th><th>instance</th><th>AMI</th><th>the AMI is</th><th>AMI created</th><th class=\"n\">AMI age (days)</th></tr></thead><tbody>\n");
    for g in &st.groups {
        for i in &g.instances {
            let _ = writeln!(
                h,
                "<tr data-ami-is=\"{is}\"><td class=\"id\">{}</td><td class=\"id\">{}</td><td class=\"id\">{}</td><td><span class=\"chip {is}\">{is}</span></td><td>{}</td><td class=\"n\">{}</td></tr>",
                esc(&g.name),
                esc(&i.id),
                or_dash(i.ami.as_deref()),
                or_dash(day(i.ami_created_at).as_deref()),
                i.ami_age_days.map_or_else(|| "-".into(), |d| d.to_string()),
                is = i.ami_is.as_str(),
            );
        }
    }
    h.push_str("</tbody></table>\n");
    let _ = writeln!(
        h,
        "<h3>Window history: <span data-figure=\"history-entries\">{}</span> recorded</h3>",
        st.history.len()
    );
    if st.history.is_empty() {
        h.push_str("<p>Nothing recorded in this period.</p>\n");
    } else {
        h.push_str("<table class=\"history\"><thead><tr><th>when (UTC)</th><th>what</th><th>rollout</th><th>on</th><th>result</th></tr></thead><tbody>\n");
        for e in &st.history {
            let _ = writeln!(
                h,
                "<tr><td class=\"id\">{}</td><td>{}</td><td class=\"id\">{}</td><td class=\"id\">{}</td><td>{}</td></tr>",
                esc(&short_time(&e.at)),
                esc(&e.step),
                esc(&e.rollout_id),
                esc(&e.subject),
                esc(&e.result)
            );
        }
        h.push_str("</tbody></table>\n");
    }
    h.push_str("</section>\n");
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::tests::fixture;

    #[test]
    fn text_is_escaped_for_content_and_attributes() {
        assert_eq!(
            esc(r#"<script>alert("x") & 'y'</script>"#),
            "&lt;script&gt;alert(&quot;x&quot;) &amp; &#39;y&#39;&lt;/script&gt;"
        );
    }

    #[test]
    fn user_text_never_becomes_markup() {
        let page = render(&fixture());
        assert!(!page.contains("<script"), "a group name became a script");
        assert!(!page.contains("<b>fix</b>"), "a reason became markup");
        assert!(page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(page.contains(
            "the stack &quot;payments&quot; hard-codes ImageId, &lt;b&gt;fix&lt;/b&gt; &amp; retry"
        ));
        assert!(page.contains("uat passed &lt;all&gt; groups"));
    }

    #[test]
    fn the_page_is_self_contained() {
        let page = render(&fixture());
        for outside in [
            "http://", "https://", "src=", "href=", "@import", "url(", "<script", "<link",
        ] {
            // The SVG namespace is a name, not a fetch.
            let found = page
                .replace("xmlns=\"http://www.w3.org/2000/svg\"", "")
                .contains(outside);
            assert!(!found, "the page refers to something outside it: {outside}");
        }
    }

    #[test]
    fn the_figures_and_the_charts_agree_with_the_model() {
        let page = render(&fixture());
        assert!(page.contains("<tr data-stage=\"prod\"><th>prod</th><td class=\"id\">333333333333</td><td class=\"n\" data-figure=\"groups\">3</td><td class=\"n\" data-figure=\"groups-left-behind\">1</td><td class=\"n\" data-figure=\"instances\">4</td><td class=\"n\" data-figure=\"golden\">2</td><td class=\"n\" data-figure=\"previous-golden\">1</td><td class=\"n\" data-figure=\"older-golden\">1</td><td class=\"n\" data-figure=\"other\">0</td><td class=\"n\" data-figure=\"golden-share\">50.0%</td></tr>"), "{page}");
        // Half the bar golden, a quarter each previous and older; no empty segment for other.
        assert!(page.contains("<rect x=\"150.00\" y=\"2.0\" width=\"300.00\" height=\"22\" fill=\"#2e7d32\" data-key=\"golden\" data-count=\"2\">"));
        assert!(page.contains("<rect x=\"450.00\" y=\"2.0\" width=\"150.00\" height=\"22\" fill=\"#f0a30a\" data-key=\"previous-golden\" data-count=\"1\">"));
        assert!(!page.contains("data-key=\"other\""));
        assert!(page.contains("data-key=\"90 days or more\" data-count=\"1\""));
        // With the crate's other snapshots.
        insta::with_settings!({ snapshot_path => "../snapshots" }, {
            insta::assert_snapshot!("report_html", page);
        });
    }
}
