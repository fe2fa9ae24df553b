//! The progress line on stderr. Off in library use (the server's tests), and indicatif draws
//! nothing when stderr is not a terminal, so logs of scripted runs stay clean.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How often the spinner redraws on its own while setup steps run.
const SPINNER_TICK: Duration = Duration::from_millis(120);

#[derive(Clone)]
pub struct Progress {
    bar: Option<ProgressBar>,
}

impl Progress {
    pub fn new(enabled: bool) -> Self {
        let bar = enabled.then(|| {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
            bar.set_style(spinner_style());
            bar.enable_steady_tick(SPINNER_TICK);
            bar
        });
        Self { bar }
    }

    pub fn hidden() -> Self {
        Self { bar: None }
    }

    /// A setup step without a known length.
    pub fn stage(&self, msg: impl Into<String>) {
        if let Some(b) = &self.bar {
            b.set_style(spinner_style());
            b.unset_length();
            b.set_message(msg.into());
        }
    }

    /// A step of `len` units (seconds of a phase, connections to open).
    pub fn bar(&self, len: u64, msg: impl Into<String>) {
        if let Some(b) = &self.bar {
            b.set_style(bar_style());
            b.set_length(len);
            b.set_position(0);
            b.set_message(msg.into());
        }
    }

    pub fn set(&self, pos: u64, msg: impl Into<String>) {
        if let Some(b) = &self.bar {
            b.set_position(pos);
            b.set_message(msg.into());
        }
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

fn spinner_style() -> ProgressStyle {
    ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_spinner())
}

fn bar_style() -> ProgressStyle {
    ProgressStyle::with_template("[{elapsed_precise}] {bar:30} {pos}/{len} {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
}
