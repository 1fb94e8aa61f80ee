//! Progress of the long commands (`backup`, `restore`, `verify`, `prune`): a bar on
//! stderr when stderr is a terminal, JSON lines on stdout with `--json`.
//!
//! # JSON lines (one object per line, the same shape for every command)
//!
//! - `{"event":"started","command":"backup",...}`: backup only, once the daemon took it.
//! - `{"event":"progress","command":C,"done":N,"total":M,"unit":"bytes"|"chunks",
//!   "elapsed_ms":T}` (plus `"phase"` where a command has several, e.g. verify's
//!   `"verify"` then `"repair"`; backup adds its daemon status fields): at most one per
//!   [`INTERVAL`]; `done` never goes back within a phase and never exceeds `total`.
//! - `{"event":"result","command":C,"ok":BOOL,...}`: the last line, exactly once, with
//!   the command's report flattened in (backup: its status, `state` `"complete"` or
//!   `"failed"`); a command that fails with an error prints `"ok":false,"error":MSG`
//!   (see [`error_result`]). The exit status is as without `--json`.
//!
//! Updates come from the core operations' callbacks (per chunk, possibly from several
//! threads): an update takes one uncontended mutex and compares two instants; printing
//! happens at most every [`INTERVAL`], so the data path is not slowed.
//!
//! Without `--json` and without a terminal on stderr nothing is shown until the
//! command's final lines.

use serde::Serialize;
use serde_json::{json, Map, Value};
use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The shortest time between two progress lines (at most 4 a second).
pub const INTERVAL: Duration = Duration::from_millis(250);

/// What `done` and `total` count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// Bytes of the disk.
    Bytes,
    /// Chunks (index entries, damaged chunks, ...).
    Chunks,
}

impl Unit {
    /// "bytes" or "chunks".
    pub fn as_str(self) -> &'static str {
        match self {
            Unit::Bytes => "bytes",
            Unit::Chunks => "chunks",
        }
    }
}

/// Lets one event through per interval (the first at once).
#[derive(Debug)]
pub struct RateLimit {
    interval: Duration,
    last: Option<Instant>,
}

impl RateLimit {
    /// At most one event per `interval`.
    pub fn new(interval: Duration) -> RateLimit {
        RateLimit {
            interval,
            last: None,
        }
    }

    /// Whether an event may go out at `now` (and if so, it counts as sent).
    pub fn ready(&mut self, now: Instant) -> bool {
        match self.last {
            Some(l) if now.saturating_duration_since(l) < self.interval => false,
            _ => {
                self.last = Some(now);
                true
            }
        }
    }
}

/// A progress event line.
pub fn progress_event(
    command: &str,
    phase: Option<&str>,
    done: u64,
    total: u64,
    unit: Unit,
    elapsed: Duration,
) -> Value {
    let mut v = json!({
        "event": "progress",
        "command": command,
        "done": done.min(total),
        "total": total,
        "unit": unit.as_str(),
        "elapsed_ms": elapsed.as_millis() as u64,
    });
    if let (Some(p), Some(o)) = (phase, v.as_object_mut()) {
        o.insert("phase".into(), Value::from(p));
    }
    v
}

/// An event line `{"event":EVENT,"command":C,...fields of report}`: a report that is not
/// a JSON object goes under `"report"`. `event` and `command` win over the report's own
/// fields of those names.
pub fn event_with<T: Serialize>(event: &str, command: &str, report: &T) -> Value {
    let mut o = match serde_json::to_value(report) {
        Ok(Value::Object(m)) => m,
        Ok(Value::Null) => Map::new(),
        Ok(other) => Map::from_iter([("report".to_string(), other)]),
        Err(e) => Map::from_iter([("report_error".to_string(), Value::from(e.to_string()))]),
    };
    o.insert("event".into(), Value::from(event));
    o.insert("command".into(), Value::from(command));
    Value::Object(o)
}

/// The result line: the report's fields, `ok` as given.
pub fn result_event<T: Serialize>(command: &str, ok: bool, report: &T) -> Value {
    let mut v = event_with("result", command, report);
    if let Some(o) = v.as_object_mut() {
        o.insert("ok".into(), Value::from(ok));
    }
    v
}

/// The command printing JSON lines in this process, if any (see [`error_result`]).
static JSON_COMMAND: OnceLock<&'static str> = OnceLock::new();
static RESULT_PRINTED: AtomicBool = AtomicBool::new(false);

/// This process prints JSON lines for `command`.
pub fn set_json(command: &'static str) {
    let _ = JSON_COMMAND.set(command);
}

/// Print one JSON line on stdout. A closed stdout is not an error worth dying for in
/// the middle of a restore: the exit status still tells the outcome.
pub fn emit(v: &Value) {
    if v.get("event").and_then(Value::as_str) == Some("result") {
        RESULT_PRINTED.store(true, Ordering::SeqCst);
    }
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{v}").and_then(|_| out.flush());
}

/// A command printing JSON lines failed with `msg` before its result line: print
/// `{"event":"result","command":C,"ok":false,"error":MSG}`, so the last line is always
/// the result. Nothing when no JSON command runs or its result is out.
pub fn error_result(msg: &str) {
    if let Some(c) = JSON_COMMAND.get() {
        if !RESULT_PRINTED.load(Ordering::SeqCst) {
            emit(&result_event(c, false, &json!({ "error": msg })));
        }
    }
}

struct State {
    limit: RateLimit,
    phase: Option<&'static str>,
    done: u64,
    total: u64,
    /// `done` of the last progress line printed in this phase.
    emitted_done: Option<u64>,
}

/// Progress of one command: a bar (terminal, no `--json`) or JSON lines (`--json`).
pub struct Reporter {
    command: &'static str,
    unit: Unit,
    json: bool,
    bar: Option<indicatif::ProgressBar>,
    started: Instant,
    state: Mutex<State>,
}

impl Reporter {
    /// A reporter counting in `unit`; a bar only when `json` is off and stderr is a
    /// terminal.
    pub fn new(command: &'static str, unit: Unit, json: bool) -> Reporter {
        Self::build(command, unit, json, false)
    }

    /// A reporter for a command with no counts to show: a spinner with the elapsed time
    /// on a terminal, no progress lines.
    pub fn spinner(command: &'static str, json: bool) -> Reporter {
        Self::build(command, Unit::Chunks, json, true)
    }

    fn build(command: &'static str, unit: Unit, json: bool, spin: bool) -> Reporter {
        if json {
            set_json(command);
        }
        let bar = (!json && std::io::stderr().is_terminal()).then(|| {
            let (pb, tpl) = if spin {
                (
                    indicatif::ProgressBar::new_spinner(),
                    "{spinner} [{elapsed_precise}] {prefix} {msg}",
                )
            } else if unit == Unit::Bytes {
                (
                    indicatif::ProgressBar::new(0),
                    "[{elapsed_precise}] {prefix} {wide_bar} {percent:>3}% {bytes}/{total_bytes} {bytes_per_sec} ETA {eta} {msg}",
                )
            } else {
                (
                    indicatif::ProgressBar::new(0),
                    "[{elapsed_precise}] {prefix} {wide_bar} {percent:>3}% {human_pos}/{human_len} chunks ETA {eta} {msg}",
                )
            };
            pb.set_draw_target(indicatif::ProgressDrawTarget::stderr_with_hz(10));
            pb.set_style(
                indicatif::ProgressStyle::with_template(tpl)
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            pb.set_prefix(command);
            if spin {
                pb.enable_steady_tick(Duration::from_millis(200));
            }
            pb
        });
        Reporter {
            command,
            unit,
            json,
            bar,
            started: Instant::now(),
            state: Mutex::new(State {
                limit: RateLimit::new(INTERVAL),
                phase: None,
                done: 0,
                total: 0,
                emitted_done: None,
            }),
        }
    }

    /// `done` of `total` (in the reporter's unit).
    pub fn update(&self, done: u64, total: u64) {
        self.update_phase(None, done, total);
    }

    /// `done` of `total` in `phase`; a new phase starts counting afresh.
    pub fn update_phase(&self, phase: Option<&'static str>, done: u64, total: u64) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let new_phase = st.phase != phase;
        if new_phase {
            st.phase = phase;
            st.done = 0;
            st.emitted_done = None;
            st.limit = RateLimit::new(INTERVAL);
            if let (Some(b), Some(p)) = (&self.bar, phase) {
                b.set_message(p);
            }
        }
        // Callers on several threads may report slightly out of order: never go back.
        st.done = st.done.max(done);
        st.total = total.max(st.done);
        if let Some(b) = &self.bar {
            if new_phase || b.length() != Some(st.total) {
                b.set_length(st.total);
            }
            b.set_position(st.done);
        }
        // The line that reaches the total always goes out (whatever the rate), once.
        let last = st.total > 0 && st.done == st.total && st.emitted_done != Some(st.done);
        if self.json && (st.limit.ready(Instant::now()) || last) {
            st.emitted_done = Some(st.done);
            emit(&progress_event(
                self.command,
                st.phase,
                st.done,
                st.total,
                self.unit,
                self.started.elapsed(),
            ));
        }
    }

    /// Take the bar off the terminal (before the command's final lines).
    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }

    /// Finish; with `--json` print the result line.
    pub fn result<T: Serialize>(&self, ok: bool, report: &T) {
        self.finish();
        if self.json {
            emit(&result_event(self.command, ok, report));
        }
    }
}

impl Drop for Reporter {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limit_lets_one_event_through_per_interval() {
        let t0 = Instant::now();
        let mut r = RateLimit::new(Duration::from_millis(250));
        assert!(r.ready(t0), "the first event goes out at once");
        assert!(!r.ready(t0));
        assert!(!r.ready(t0 + Duration::from_millis(249)));
        assert!(r.ready(t0 + Duration::from_millis(250)));
        assert!(!r.ready(t0 + Duration::from_millis(300)));
        // A clock that seems to go back never lets a burst through.
        assert!(!r.ready(t0));
        // Over 10 s of updates every millisecond: at most 4 a second.
        let mut r = RateLimit::new(INTERVAL);
        let n = (0..10_000)
            .filter(|ms| r.ready(t0 + Duration::from_millis(*ms)))
            .count();
        assert_eq!(n, 40);
    }

    #[test]
    fn progress_lines_have_the_common_schema() {
        let v = progress_event(
            "restore",
            None,
            5,
            10,
            Unit::Bytes,
            Duration::from_millis(1500),
        );
        assert_eq!(
            v,
            json!({"event":"progress","command":"restore","done":5,"total":10,"unit":"bytes","elapsed_ms":1500})
        );
        let line = v.to_string();
        assert!(!line.contains('\n'), "one line: {line}");
        let v = progress_event(
            "verify",
            Some("repair"),
            12,
            3,
            Unit::Chunks,
            Duration::ZERO,
        );
        assert_eq!(v["phase"], "repair");
        assert_eq!(v["unit"], "chunks");
        assert_eq!(v["done"], 3, "done never exceeds total");
    }

    #[test]
    fn result_lines_flatten_the_report_and_say_ok() {
        #[derive(Serialize)]
        struct Rep {
            generation: &'static str,
            bytes_written: u64,
            ok: bool,
            event: &'static str,
        }
        let r = Rep {
            generation: "g1",
            bytes_written: 7,
            ok: true,
            event: "not mine",
        };
        let v = result_event("verify", false, &r);
        assert_eq!(
            v,
            json!({"event":"result","command":"verify","ok":false,"generation":"g1","bytes_written":7})
        );
        // Not an object: kept whole under "report".
        let v = result_event("prune", true, &vec![1, 2]);
        assert_eq!(
            v,
            json!({"event":"result","command":"prune","ok":true,"report":[1,2]})
        );
        let v = event_with("started", "backup", &json!({"id": 3}));
        assert_eq!(v, json!({"event":"started","command":"backup","id":3}));
    }

    #[test]
    fn updates_never_go_back_within_a_phase() {
        let r = Reporter::new("restore", Unit::Bytes, false);
        r.update(10, 100);
        r.update(5, 100); // a slower thread reporting late
        {
            let st = r.state.lock().unwrap();
            assert_eq!((st.done, st.total), (10, 100));
        }
        r.update_phase(Some("repair"), 1, 4);
        let st = r.state.lock().unwrap();
        assert_eq!((st.phase, st.done, st.total), (Some("repair"), 1, 4));
    }
}
