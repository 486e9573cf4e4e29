//! `agentwatch top`: a live view of every agent for the person on call.
//!
//! It asks the daemon over the control socket once a second (status rows and the latest audit
//! lines) and draws one row per agent, the selected agent's signals (rate against baseline with
//! a sparkline of the last minute), the API calls held for a human, and the latest audit
//! events. Keys act on the selected agent (freeze, thaw, kill, approve, and approve or deny its
//! oldest held API call), each only after a confirmation.

use std::{
    collections::{BTreeMap, VecDeque},
    io,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use crossterm::{
    event::{self, Event, KeyCode, KeyEventKind, KeyModifiers},
    execute,
    terminal::{EnterAlternateScreen, LeaveAlternateScreen, disable_raw_mode, enable_raw_mode},
};
use ratatui::{
    Frame, Terminal,
    backend::CrosstermBackend,
    layout::{Constraint, Layout},
    style::{Color, Modifier, Style},
    text::{Line, Span},
    widgets::{Block, Borders, Cell, Paragraph, Row, Sparkline, Table, TableState},
};
use serde_json::Value;

use crate::{
    breaker::{SIGNALS, Signal},
    control::{self, Request},
};

/// Rates kept per agent and signal for the sparklines (one per refresh).
const HISTORY: usize = 60;
/// Audit lines shown.
const EVENTS: usize = 12;
/// Held API calls listed (the oldest first; the rest are counted in the HELD column).
const HELD_SHOWN: usize = 5;

/// An action on the selected agent, waiting for `y`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Freeze,
    Thaw,
    Kill,
    Approve,
    /// Its held API call with this id, let through or refused.
    ApproveCall(u64),
    DenyCall(u64),
}

impl Action {
    fn verb(self) -> String {
        match self {
            Self::Freeze => "freeze".into(),
            Self::Thaw => "thaw".into(),
            Self::Kill => "kill".into(),
            Self::Approve => "approve".into(),
            Self::ApproveCall(id) => format!("approve call {id} of"),
            Self::DenyCall(id) => format!("deny call {id} of"),
        }
    }

    fn request(self, agent: String) -> Request {
        match self {
            Self::Freeze => Request::Freeze { agent },
            Self::Thaw => Request::Thaw { agent },
            Self::Kill => Request::Kill { agent },
            Self::Approve => Request::Approve {
                agent,
                keep_baseline: false,
                call: None,
            },
            Self::ApproveCall(id) => Request::Approve {
                agent,
                keep_baseline: false,
                call: Some(id),
            },
            Self::DenyCall(id) => Request::Deny { agent, call: id },
        }
    }
}

/// One held API call as `status` lists it, with its agent and scope.
struct HeldRow {
    agent: String,
    scope: String,
    id: u64,
    method: String,
    path: String,
}

/// Every held call in the status rows, the oldest (lowest id) first.
fn held_calls(rows: &[Value]) -> Vec<HeldRow> {
    let mut out = Vec::new();
    for r in rows {
        let agent = r["name"].as_str().unwrap_or("?");
        let Some(scopes) = r["apis"].as_object() else {
            continue;
        };
        for (scope, s) in scopes {
            for h in s["held"].as_array().into_iter().flatten() {
                out.push(HeldRow {
                    agent: agent.to_owned(),
                    scope: scope.clone(),
                    id: h["call"].as_u64().unwrap_or(0),
                    method: h["method"].as_str().unwrap_or("?").to_owned(),
                    path: h["path"].as_str().unwrap_or("?").to_owned(),
                });
            }
        }
    }
    out.sort_by_key(|h| h.id);
    out
}

/// Calls through the gateway of every scope of a status row.
fn api_calls(row: &Value) -> u64 {
    row["apis"]
        .as_object()
        .map(|scopes| {
            scopes
                .values()
                .filter_map(|s| s["calls"].as_object())
                .flat_map(|c| c.values().filter_map(Value::as_u64))
                .sum()
        })
        .unwrap_or(0)
}

struct App {
    socket: PathBuf,
    rows: Vec<Value>,
    events: Vec<Value>,
    /// agent -> signal -> recent rates.
    history: BTreeMap<String, [VecDeque<u64>; SIGNALS]>,
    table: TableState,
    pending: Option<(Action, String)>,
    message: String,
}

impl App {
    fn selected(&self) -> Option<&Value> {
        self.table.selected().and_then(|i| self.rows.get(i))
    }

    fn selected_name(&self) -> Option<String> {
        self.selected()
            .and_then(|r| r["name"].as_str())
            .map(str::to_owned)
    }

    /// Asks the daemon for fresh rows and events.
    fn refresh(&mut self) {
        match ask(&self.socket, Request::Status { rules: false }) {
            Ok(data) => {
                self.rows = data["agents"].as_array().cloned().unwrap_or_default();
                for r in &self.rows {
                    let name = r["name"].as_str().unwrap_or_default().to_owned();
                    let h = self.history.entry(name).or_default();
                    for (i, s) in Signal::ALL.map(Signal::name).iter().enumerate() {
                        // Sparklines draw integers: keep tenths, so slow signals still show.
                        let rate = r["rates"][s].as_f64().unwrap_or(0.0);
                        h[i].push_back((rate * 10.0).round() as u64);
                        if h[i].len() > HISTORY {
                            h[i].pop_front();
                        }
                    }
                }
                let names: Vec<&str> = self
                    .rows
                    .iter()
                    .filter_map(|r| r["name"].as_str())
                    .collect();
                self.history.retain(|n, _| names.contains(&n.as_str()));
                match self.table.selected() {
                    _ if self.rows.is_empty() => self.table.select(None),
                    None => self.table.select(Some(0)),
                    Some(i) if i >= self.rows.len() => self.table.select(Some(self.rows.len() - 1)),
                    Some(_) => {}
                }
            }
            Err(e) => self.message = format!("daemon: {e:#}"),
        }
        if let Ok(data) = ask(&self.socket, Request::Recent { lines: EVENTS }) {
            self.events = data["lines"].as_array().cloned().unwrap_or_default();
        }
    }

    /// Handles a key; false: quit.
    fn key(&mut self, code: KeyCode, modifiers: KeyModifiers) -> bool {
        if let Some((action, agent)) = self.pending.take() {
            if matches!(code, KeyCode::Char('y') | KeyCode::Char('Y')) {
                self.message = match ask(&self.socket, action.request(agent.clone())) {
                    Ok(_) => format!("{} {agent}: done", action.verb()),
                    Err(e) => format!("{} {agent}: {e:#}", action.verb()),
                };
                self.refresh();
            } else {
                self.message = format!("{} {agent}: cancelled", action.verb());
            }
            return true;
        }
        let action = match code {
            KeyCode::Char('q') | KeyCode::Esc => return false,
            KeyCode::Char('c') if modifiers.contains(KeyModifiers::CONTROL) => return false,
            KeyCode::Down | KeyCode::Char('j') => {
                if !self.rows.is_empty() {
                    let i = self
                        .table
                        .selected()
                        .map_or(0, |i| (i + 1) % self.rows.len());
                    self.table.select(Some(i));
                }
                return true;
            }
            KeyCode::Up | KeyCode::Char('k') => {
                if !self.rows.is_empty() {
                    let n = self.rows.len();
                    let i = self.table.selected().map_or(0, |i| (i + n - 1) % n);
                    self.table.select(Some(i));
                }
                return true;
            }
            KeyCode::Char('f') => Action::Freeze,
            KeyCode::Char('t') => Action::Thaw,
            KeyCode::Char('x') => Action::Kill,
            KeyCode::Char('a') => Action::Approve,
            KeyCode::Char('c' | 'd') => {
                let Some(agent) = self.selected_name() else {
                    return true;
                };
                let held = held_calls(&self.rows);
                let Some(call) = held.iter().find(|h| h.agent == agent) else {
                    self.message = format!("`{agent}` has no API call held");
                    return true;
                };
                let action = if code == KeyCode::Char('c') {
                    Action::ApproveCall(call.id)
                } else {
                    Action::DenyCall(call.id)
                };
                self.message = format!(
                    "{} `{agent}` ({} {} of {})? y to confirm, any other key to cancel",
                    action.verb(),
                    call.method,
                    call.path,
                    call.scope
                );
                self.pending = Some((action, agent));
                return true;
            }
            _ => return true,
        };
        if let Some(agent) = self.selected_name() {
            self.message = format!(
                "{} agent `{agent}`? y to confirm, any other key to cancel",
                action.verb()
            );
            self.pending = Some((action, agent));
        }
        true
    }

    fn draw(&mut self, f: &mut Frame<'_>) {
        let held = held_calls(&self.rows);
        // The held-calls pane only while something waits for a human.
        let held_height = if held.is_empty() {
            0
        } else {
            held.len().min(HELD_SHOWN) as u16 + 2
        };
        let [head, table, detail, held_area, events, foot] = Layout::vertical([
            Constraint::Length(1),
            Constraint::Min(5),
            Constraint::Length(SIGNALS as u16 + 2),
            Constraint::Length(held_height),
            Constraint::Length(EVENTS as u16 + 2),
            Constraint::Length(1),
        ])
        .areas(f.area());
        f.render_widget(
            Paragraph::new(format!(
                "agentwatch top - {} agent(s) - {}   keys: up/down select, f freeze, t thaw, x kill, a approve, c/d approve/deny held call, q quit",
                self.rows.len(),
                self.socket.display()
            ))
            .style(Style::default().add_modifier(Modifier::BOLD)),
            head,
        );
        let header = Row::new(
            [
                "AGENT",
                "STATE",
                "PROCS",
                "ALLOWED",
                "DENIED",
                "CAPPED",
                "DNS DENIED",
                "ESCAPES",
                "BREAKER",
                "SCORE",
                "LEASE",
                "API",
                "HELD",
            ]
            .map(Cell::from),
        )
        .style(Style::default().add_modifier(Modifier::BOLD));
        let rows: Vec<Row<'_>> = self
            .rows
            .iter()
            .map(|r| {
                let state = r["state"].as_str().unwrap_or("?");
                let colour = match state {
                    "running" => Color::Green,
                    "frozen" | "tripped" => Color::Yellow,
                    _ => Color::Red,
                };
                let escapes: u64 = r["escape_attempts"]
                    .as_object()
                    .map(|m| m.values().filter_map(Value::as_u64).sum())
                    .unwrap_or(0);
                Row::new(vec![
                    Cell::from(r["name"].as_str().unwrap_or("?").to_owned()),
                    Cell::from(state.to_owned()).style(Style::default().fg(colour)),
                    Cell::from(r["processes"].to_string()),
                    Cell::from(r["allowed"].to_string()),
                    Cell::from(r["denied"].to_string()),
                    Cell::from(r["capped"].to_string()),
                    Cell::from(r["dns"]["denied"].to_string()),
                    Cell::from(escapes.to_string()),
                    Cell::from(r["breaker"].as_str().unwrap_or("?").to_owned()),
                    Cell::from(
                        r["anomaly_score"]
                            .as_f64()
                            .map_or("-".to_owned(), |s| format!("{s:.1}")),
                    ),
                    Cell::from(lease_cell(&r["lease"])),
                    Cell::from(api_calls(r).to_string()),
                    Cell::from(
                        held.iter()
                            .filter(|h| r["name"].as_str() == Some(h.agent.as_str()))
                            .count()
                            .to_string(),
                    ),
                ])
            })
            .collect();
        let widths = [
            Constraint::Length(20),
            Constraint::Length(9),
            Constraint::Length(6),
            Constraint::Length(9),
            Constraint::Length(8),
            Constraint::Length(8),
            Constraint::Length(11),
            Constraint::Length(8),
            Constraint::Length(10),
            Constraint::Length(6),
            Constraint::Length(12),
            Constraint::Length(7),
            Constraint::Length(5),
        ];
        f.render_stateful_widget(
            Table::new(rows, widths)
                .header(header)
                .block(Block::default().borders(Borders::ALL).title("agents"))
                .row_highlight_style(Style::default().add_modifier(Modifier::REVERSED)),
            table,
            &mut self.table,
        );
        self.draw_detail(f, detail);
        if !held.is_empty() {
            let lines: Vec<Line<'_>> = held
                .iter()
                .take(HELD_SHOWN)
                .map(|h| {
                    Line::from(format!(
                        "call {:<6} {:<20} {:<12} {} {}",
                        h.id, h.agent, h.scope, h.method, h.path
                    ))
                })
                .collect();
            f.render_widget(
                Paragraph::new(lines).block(
                    Block::default()
                        .borders(Borders::ALL)
                        .title(format!("API calls held for a human ({})", held.len())),
                ),
                held_area,
            );
        }
        let lines: Vec<Line<'_>> = self.events.iter().map(event_line).collect();
        f.render_widget(
            Paragraph::new(lines).block(
                Block::default()
                    .borders(Borders::ALL)
                    .title("latest audit events"),
            ),
            events,
        );
        f.render_widget(Paragraph::new(self.message.clone()), foot);
    }

    fn draw_detail(&self, f: &mut Frame<'_>, area: ratatui::layout::Rect) {
        let Some(row) = self.selected() else {
            f.render_widget(
                Block::default().borders(Borders::ALL).title("no agent"),
                area,
            );
            return;
        };
        let name = row["name"].as_str().unwrap_or("?");
        let block = Block::default().borders(Borders::ALL).title(format!(
            "{name}: rate vs baseline per signal (last {HISTORY} s)"
        ));
        let inner = block.inner(area);
        f.render_widget(block, area);
        let lines = Layout::vertical([Constraint::Length(1); SIGNALS]).split(inner);
        for (i, s) in Signal::ALL.map(Signal::name).iter().enumerate() {
            let [label, spark] =
                Layout::horizontal([Constraint::Length(48), Constraint::Min(10)]).areas(lines[i]);
            let rate = row["rates"][s].as_f64();
            let base = row["baselines"][s].as_f64();
            let text = match (rate, base) {
                // Null: the kernel does not count it for this agent (no syscall monitor, or
                // no breaker to judge destinations).
                (None, _) => format!("{s:<13}  not counted"),
                (Some(rate), Some(b)) => format!("{s:<13} {rate:>9.1}/s  baseline {b:>9.1}/s"),
                (Some(rate), None) => format!("{s:<13} {rate:>9.1}/s  baseline  learning"),
            };
            f.render_widget(Paragraph::new(text), label);
            let data: Vec<u64> = self
                .history
                .get(name)
                .map(|h| h[i].iter().copied().collect())
                .unwrap_or_default();
            f.render_widget(
                Sparkline::default()
                    .data(&data)
                    .style(Style::default().fg(Color::Cyan)),
                spark,
            );
        }
    }
}

/// The lease column: time left, `expired`, or `-` without a lease.
fn lease_cell(lease: &Value) -> String {
    if lease.is_null() {
        return "-".to_owned();
    }
    if lease["expired"].as_bool() == Some(true) {
        return "expired".to_owned();
    }
    let secs = lease["seconds_left"].as_f64().unwrap_or(0.0) as u64;
    humantime::format_duration(Duration::from_secs(secs)).to_string()
}

/// One audit line, short: time, agent, kind and the fields that say what happened.
fn event_line(v: &Value) -> Line<'static> {
    let ts = v["ts"]
        .as_str()
        .unwrap_or("")
        .get(11..19)
        .unwrap_or("")
        .to_owned();
    let agent = v["agent"].as_str().unwrap_or("-").to_owned();
    let kind = v["kind"].as_str().unwrap_or("?").to_owned();
    let detail: Vec<String> = v
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(k, _)| {
            !matches!(
                k.as_str(),
                "ts" | "agent" | "kind" | "prev" | "kernel_ts_ns"
            )
        })
        .map(|(k, val)| {
            format!(
                "{k}={}",
                val.as_str().map_or_else(|| val.to_string(), str::to_owned)
            )
        })
        .collect();
    let colour = if kind.contains("denied")
        || kind.contains("escape")
        || kind == "breaker_tripped"
        || kind == "killed"
    {
        Color::Red
    } else {
        Color::Reset
    };
    Line::from(vec![
        Span::raw(format!("{ts} {agent:<16} ")),
        Span::styled(format!("{kind:<22}"), Style::default().fg(colour)),
        Span::raw(format!(" {}", detail.join(" "))),
    ])
}

fn ask(socket: &Path, request: Request) -> Result<Value> {
    control::call(socket, &request, Duration::from_secs(30))?
        .into_result()
        .map_err(anyhow::Error::msg)
}

/// Puts the terminal back however `top` ends.
struct Screen;

impl Drop for Screen {
    fn drop(&mut self) {
        let _ = disable_raw_mode();
        let _ = execute!(io::stdout(), LeaveAlternateScreen);
    }
}

/// Runs the view until `q`.
pub fn run(socket: &Path, interval: Duration) -> Result<()> {
    // Fail before taking the screen over when the daemon is not there.
    ask(socket, Request::Status { rules: false }).context("is the daemon running?")?;
    enable_raw_mode().context("the terminal cannot go into raw mode (is this a terminal?)")?;
    let _screen = Screen;
    execute!(io::stdout(), EnterAlternateScreen)?;
    let mut terminal = Terminal::new(CrosstermBackend::new(io::stdout()))?;
    let mut app = App {
        socket: socket.to_owned(),
        rows: Vec::new(),
        events: Vec::new(),
        history: BTreeMap::new(),
        table: TableState::default(),
        pending: None,
        message: String::new(),
    };
    app.refresh();
    let mut last = Instant::now();
    loop {
        terminal.draw(|f| app.draw(f))?;
        let wait = interval.saturating_sub(last.elapsed());
        if event::poll(wait)? {
            if let Event::Key(k) = event::read()?
                && k.kind == KeyEventKind::Press
                && !app.key(k.code, k.modifiers)
            {
                return Ok(());
            }
        } else {
            app.refresh();
            last = Instant::now();
        }
    }
}
