//! Arbitrary text as an agent config file: `edgesync_edge::config::parse` must report
//! problems, never panic. The base directory does not exist, so `[[kubeedge]]` entries
//! exercise the "file cannot be read" path without touching the file system.

#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    if let Err(errors) = edgesync_edge::config::parse(
        "fuzz.toml",
        text,
        Path::new("/nonexistent/edgesync-fuzz"),
    ) {
        // Rendering the errors is what `edgesync-agent validate` does with them.
        let _ = edgesync_edge::config::render_errors(&errors);
    }
});
