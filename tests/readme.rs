//! Keeps the README true: every command block of its Usage section runs, in order, on the real
//! SmolLM2 model, as a newcomer would type it (from a scratch folder that holds the repository's
//! `models/`, `examples/`, `tests/` and the fetched `data/sentiment`, so outputs stay out of the
//! checkout). Commands that would take minutes are shortened by the rules in [`shorten`] — fewer
//! optimizer steps, tokens or prompts, the experiment's `--quick` profile — never otherwise
//! changed. A few commands also have their promised effect checked ([`check`]).

mod common;

use std::path::{Path, PathBuf};

/// The command blocks (```sh) of the README section headed `## Usage`, as commands: continuation
/// lines joined, comments dropped, `a && b` split.
fn usage_commands(readme: &str) -> Vec<String> {
    let start = readme.find("\n## Usage").expect("README has a Usage section");
    let rest = &readme[start + 1..];
    let section = &rest[..rest[3..].find("\n## ").map_or(rest.len(), |i| i + 3)];
    let mut out = Vec::new();
    let mut in_block = false;
    let mut current = String::new();
    for line in section.lines() {
        if line.starts_with("```") {
            in_block = !in_block && line.trim() == "```sh";
            continue;
        }
        if !in_block {
            continue;
        }
        let code = strip_comment(line);
        let (code, more) = match code.trim_end().strip_suffix('\\') {
            Some(c) => (c.to_string(), true),
            None => (code.trim_end().to_string(), false),
        };
        current.push_str(&code);
        current.push(' ');
        if !more {
            for part in current.split("&&") {
                if !part.trim().is_empty() {
                    out.push(part.trim().to_string());
                }
            }
            current.clear();
        }
    }
    out
}

/// A line without its `# comment` (a `#` after whitespace, outside quotes).
fn strip_comment(line: &str) -> String {
    let (mut quote, mut prev) = (None, ' ');
    for (i, c) in line.char_indices() {
        match (quote, c) {
            (None, '"' | '\'') => quote = Some(c),
            (Some(q), _) if c == q => quote = None,
            (None, '#') if prev.is_whitespace() => return line[..i].to_string(),
            _ => {}
        }
        prev = c;
    }
    line.to_string()
}

/// Shell words: double quotes keep backslashes except before `"`, `\` and `$`; single quotes
/// keep everything.
fn words(cmd: &str) -> Vec<String> {
    let mut out = Vec::new();
    let (mut cur, mut any) = (String::new(), false);
    let mut chars = cmd.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                any = true;
                while let Some(d) = chars.next() {
                    match d {
                        '"' => break,
                        '\\' if matches!(chars.peek(), Some('"' | '\\' | '$')) => cur.push(chars.next().unwrap()),
                        _ => cur.push(d),
                    }
                }
            }
            '\'' => {
                any = true;
                for d in chars.by_ref() {
                    if d == '\'' {
                        break;
                    }
                    cur.push(d);
                }
            }
            c if c.is_whitespace() => {
                if any || !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            _ => cur.push(c),
        }
    }
    if any || !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Sets `flag` to `value` (replacing the value given, or appending both).
fn set(args: &mut Vec<String>, flag: &str, value: &str) {
    match args.iter().position(|a| a == flag) {
        Some(i) => args[i + 1] = value.into(),
        None => args.extend([flag.to_string(), value.to_string()]),
    }
}

/// The shortening rules, by subcommand (`args` starts after `meet`).
fn shorten(args: &mut Vec<String>) {
    let sub: Vec<&str> = args.iter().take(2).map(String::as_str).collect();
    match sub.as_slice() {
        ["train", ..] => set(args, "--max-steps", "1"),
        ["eval", ..] => set(args, "--max-new-tokens", "8"),
        ["pairs", ..] => {
            set(args, "--max-new-tokens", "8");
            set(args, "--samples", "2");
        }
        ["prepare-sentiment", ..] => {
            set(args, "--train", "16");
            set(args, "--eval", "8");
            set(args, "--pairs", "16");
        }
        ["experiment", ..] if !args.iter().any(|a| a == "--quick") => args.push("--quick".into()),
        ["bench", "train" | "dpo"] => {
            set(args, "--steps", "1");
            set(args, "--warmup", "0");
        }
        ["bench", "generate"] => {
            set(args, "--batches", "1");
            set(args, "--new-tokens", "4");
            set(args, "--reps", "1");
        }
        ["bench", "serve"] => {
            set(args, "--clients", "1,2");
            set(args, "--requests", "2");
            set(args, "--max-tokens", "4");
        }
        // A free port; the test stops the server once it answers (see `serve`).
        ["serve", ..] => set(args, "--addr", "127.0.0.1:0"),
        ["bench", "prefill"] => {
            set(args, "--lengths", "64");
            set(args, "--reps", "1");
        }
        _ => {}
    }
}

/// What some commands promise, checked on their output.
fn check(args: &[String], stdout: &str, stderr: &str) {
    let has = |flag: &str| args.iter().any(|a| a == flag);
    if args[0] == "generate" && has("--stop-strings") {
        let text = stdout.strip_suffix('\n').unwrap_or(stdout);
        assert!(!text.contains('\n'), "--stop-strings \"\\n\" did not stop at the newline: {text:?}");
        assert!(!text.is_empty());
    }
    if args[0] == "train" && args.iter().any(|a| a.starts_with("data.eval")) {
        assert!(stderr.contains("held-out"), "no held-out data read: {stderr}");
    }
    if args[0] == "train" && has("--resume") {
        assert!(stderr.contains("finished earlier; nothing to do"), "{stderr}");
    }
    if args[0] == "experiment" {
        for phase in ["[1/5]", "[2/5]", "[3/5]", "[4/5]", "[5/5]"] {
            assert!(stderr.contains(phase), "the experiment did not show phase {phase}: {stderr}");
        }
    }
    if args[0] == "compare" {
        let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
        assert!(v["win_rate"]["value"].is_f64(), "{stdout}");
    }
}

/// Runs `meet serve`, waits until it listens, checks `/health` and a completion, then stops it
/// with SIGTERM (a clean exit).
fn serve(args: &[String], dir: &Path) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_meet"));
    cmd.args(args).current_dir(dir);
    let mut server = common::listening(cmd);
    let url = server.url.clone();
    let client = reqwest::blocking::Client::new();
    assert!(client.get(format!("{url}/health")).send().unwrap().status().is_success());
    let name = args.iter().position(|a| a == "--served-model-name").map_or("", |i| args[i + 1].as_str());
    let body = serde_json::json!({"model": format!("{name}:good"), "messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 4});
    let r = client.post(format!("{url}/v1/chat/completions")).json(&body).send().unwrap();
    assert!(r.status().is_success(), "{}", r.text().unwrap());
    // SAFETY: a signal to our own child process.
    unsafe { libc::kill(server.child.id() as i32, libc::SIGTERM) };
    assert!(server.child.wait().unwrap().success());
}

fn link(from: &Path, to: &Path) {
    std::os::unix::fs::symlink(from, to).unwrap();
}

#[test]
fn every_usage_command_of_the_readme_runs_as_written() {
    common::smollm2();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let commands = usage_commands(&readme);
    assert!(commands.len() >= 30, "only {} commands found in the Usage section", commands.len());
    let work = tempfile::tempdir().unwrap();
    for d in ["models", "examples", "tests"] {
        link(&root.join(d), &work.path().join(d));
    }
    std::fs::create_dir_all(work.path().join("data")).unwrap();
    let mut ran = 0;
    for cmd in &commands {
        let w = words(cmd);
        // Leading `NAME=value` words set the command's environment, as in a shell.
        let is_env = |x: &String| {
            x.split_once('=')
                .is_some_and(|(k, _)| !k.is_empty() && k.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
        };
        let env: Vec<(String, String)> = w
            .iter()
            .take_while(|x| is_env(x))
            .map(|x| x.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())).unwrap())
            .collect();
        let w = w[env.len()..].to_vec();
        let started = std::time::Instant::now();
        let out = match w[0].as_str() {
            "meet" if w.get(1).map(String::as_str) == Some("serve") => {
                let mut args = w[1..].to_vec();
                shorten(&mut args);
                serve(&args, work.path());
                ran += 1;
                continue;
            }
            "meet" => {
                let mut args = w[1..].to_vec();
                shorten(&mut args);
                let out = std::process::Command::new(env!("CARGO_BIN_EXE_meet"))
                    .args(&args)
                    .current_dir(work.path())
                    .env("RAYON_NUM_THREADS", "2")
                    .envs(env.iter().map(|(k, v)| (k, v)))
                    .output()
                    .unwrap();
                let (so, se) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
                assert!(out.status.success() && !se.contains("panicked"), "`{cmd}` (run as {args:?}) failed:\n{se}");
                check(&args, &so, &se);
                out
            }
            // Set-up scripts work on the checkout itself (they fetch into its data/).
            s if s.starts_with("./scripts/") => {
                let out = std::process::Command::new("bash").args(&w).current_dir(&root).output().unwrap();
                assert!(out.status.success(), "`{cmd}` failed:\n{}", String::from_utf8_lossy(&out.stderr));
                let sentiment = work.path().join("data/sentiment");
                if !sentiment.exists() {
                    link(&root.join("data/sentiment"), &sentiment);
                }
                out
            }
            other => panic!("the README's Usage section runs `{other}`, which this test does not know"),
        };
        let _ = out;
        ran += 1;
        eprintln!("readme: {:>5.1}s  {cmd}", started.elapsed().as_secs_f64());
    }
    assert_eq!(ran, commands.len());
}

#[test]
fn the_readme_parser_reads_blocks_as_a_shell_would() {
    let md = "# x\n## Usage\ntext\n```sh\nmeet a --x \"1 2\" \\\n    --y '\\n' # note\nmeet b && meet c\n```\n```toml\nk = 1\n```\n## Next\n```sh\nmeet d\n```\n";
    let c = usage_commands(md);
    assert_eq!(c.len(), 3);
    assert_eq!(words(&c[0]), ["meet", "a", "--x", "1 2", "--y", "\\n"]);
    assert_eq!(words("meet g --stop-strings \"\\n\""), ["meet", "g", "--stop-strings", "\\n"]);
    assert_eq!(words(&c[2]), ["meet", "c"]);
    let mut a = vec!["train".to_string(), "x.toml".into(), "--max-steps".into(), "9".into()];
    shorten(&mut a);
    assert_eq!(a, ["train", "x.toml", "--max-steps", "1"]);
}
