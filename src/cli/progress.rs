//! Progress bars and log lines, written once for every subcommand.

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A bar of `len` steps drawn with `template`, hidden with `quiet`.
pub fn bar(len: u64, template: &str, quiet: bool) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(len), target(quiet));
    bar.set_style(style(template));
    bar
}

/// Several bars drawn together, hidden with `quiet`.
pub fn multi(quiet: bool) -> MultiProgress {
    MultiProgress::with_draw_target(target(quiet))
}

fn target(quiet: bool) -> ProgressDrawTarget {
    if quiet {
        ProgressDrawTarget::hidden()
    } else {
        ProgressDrawTarget::stderr()
    }
}

/// The bar style every subcommand uses.
pub fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ")
}

/// Prints a line above the bars. A hidden draw target (`--quiet`, or stderr not a terminal)
/// would swallow `println`, so the line then goes straight to stderr.
pub fn say(bars: &MultiProgress, line: &str) {
    if bars.is_hidden() {
        eprintln!("{line}");
    } else {
        let _ = bars.println(line);
    }
}
