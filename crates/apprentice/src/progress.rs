//! Progress of long commands: an indicatif bar on a terminal, and plain lines when stderr is not
//! one (a log file, CI, the demo's stage log), where indicatif draws nothing and a 12-minute
//! evaluation would otherwise print nothing until it ends.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

/// Without a terminal, a line at least this often while work advances...
const PLAIN_EVERY: Duration = Duration::from_secs(30);
/// ...and at every tenth of the total.
const PLAIN_FRACTIONS: u64 = 10;

/// Counts finished units (episodes, calls) of one named job.
pub struct Progress {
    bar: ProgressBar,
    plain: Option<Mutex<PlainState>>,
}

struct PlainState {
    started: Instant,
    last_line: Instant,
}

impl Progress {
    /// A bar of `len` `unit`s named `name`, added to `group` when given.
    pub fn new(name: &str, len: u64, unit: &str, group: Option<&MultiProgress>) -> Self {
        let template = format!("{{msg:>24}} [{{bar:30}}] {{pos}}/{{len}} {unit} ({{elapsed}}, eta {{eta}})");
        let style = ProgressStyle::with_template(&template)
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
        let mut bar = ProgressBar::new(len).with_style(style);
        if let Some(group) = group {
            bar = group.add(bar);
        }
        bar.set_message(name.to_string());
        let plain = (!std::io::stderr().is_terminal()).then(|| {
            let now = Instant::now();
            Mutex::new(PlainState { started: now, last_line: now })
        });
        Progress { bar, plain }
    }

    /// One more unit done.
    pub fn inc(&self) {
        self.bar.inc(1);
        let Some(plain) = &self.plain else { return };
        let mut state = plain.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let (done, len) = (self.bar.position(), self.bar.length().unwrap_or(0));
        let step = (len / PLAIN_FRACTIONS).max(1);
        if done == len || done % step == 0 || state.last_line.elapsed() >= PLAIN_EVERY {
            state.last_line = Instant::now();
            eprintln!("{}: {done}/{len} ({:.0} s)", self.bar.message(), state.started.elapsed().as_secs_f64());
        }
    }

    pub fn finish(&self) {
        self.bar.finish();
    }
}

/// Says when to print a plain status line: never on a terminal (the bars show it), else at most
/// every [`PLAIN_EVERY`].
pub struct PlainTicker {
    last: Option<Instant>,
}

impl PlainTicker {
    pub fn new() -> Self {
        let now = Instant::now();
        PlainTicker { last: (!std::io::stderr().is_terminal()).then(|| now.checked_sub(PLAIN_EVERY).unwrap_or(now)) }
    }

    /// Whether a line is due now (and, if so, the next one in [`PLAIN_EVERY`]).
    pub fn due(&mut self) -> bool {
        match &mut self.last {
            Some(last) if last.elapsed() >= PLAIN_EVERY => {
                *last = Instant::now();
                true
            }
            _ => false,
        }
    }
}
