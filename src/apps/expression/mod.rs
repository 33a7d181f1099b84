//! The expression-from-morphology pipeline (Wakui et al. 2023): images →
//! patches → VQ-VAE-2 codes → code-frequency profiles → per-gene SVR →
//! evaluation and patch-wise maps.

pub mod demo;
pub mod evaluate;
pub mod init;
pub mod map;
pub mod prepare;
pub mod profile;
pub mod synth;

/// A progress bar on stderr (hidden when stderr is not a terminal, so logs
/// stay clean).
pub(crate) fn progress(len: u64, what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{msg:>10} [{bar:40}] {pos}/{len} {per_sec} eta {eta}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(what.to_string());
    bar
}
