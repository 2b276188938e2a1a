//! Records the commit `meet` is built from (and whether its sources differed from it) for the
//! provenance that experiment results carry (`meet::provenance`).
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn main() {
    // Rerun on a new commit or staged change, and on any change to the sources built.
    for p in
        [".git/HEAD", ".git/index", ".git/refs", ".git/packed-refs", "src", "third_party", "Cargo.toml", "Cargo.lock"]
    {
        println!("cargo:rerun-if-changed={p}");
    }
    let commit = git(&["rev-parse", "HEAD"]).unwrap_or_else(|| "unknown".into());
    // Only the files that make the binary count: results do not depend on tests or docs.
    let dirty = git(&["status", "--porcelain", "--", "src", "third_party", "Cargo.toml", "Cargo.lock", "build.rs"])
        .map(|s| !s.is_empty());
    println!("cargo:rustc-env=MEET_COMMIT={commit}");
    println!(
        "cargo:rustc-env=MEET_COMMIT_DIRTY={}",
        match dirty {
            Some(true) => "true",
            Some(false) => "false",
            None => "unknown",
        }
    );
}
