//! A real browser for the pages the audit tools write: headless Chromium (Debian's
//! `chromium`, installed by `.ci/run`) opens a page from its file and takes a screenshot;
//! anything it logs to the page's console (a script error, a resource it could not or was
//! not allowed to load) is a failure, since the pages have no script and load nothing.

#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

/// Renders `page` (an HTML file) to `png` at 1280 px wide; returns the console messages.
pub fn render(page: &Path, png: &Path) -> Vec<String> {
    let profile = tempfile::tempdir().unwrap();
    let out = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--enable-logging=stderr",
            "--v=0",
            "--hide-scrollbars",
            "--window-size=1280,1800",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("--screenshot={}", png.display()))
        .arg(format!("file://{}", page.display()))
        .output()
        .expect("run chromium (apt-get install chromium; .ci/run does)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && png.exists(),
        "chromium failed ({}): {stderr}",
        out.status
    );
    stderr
        .lines()
        .filter(|l| l.contains(":CONSOLE"))
        .map(str::to_string)
        .collect()
}
