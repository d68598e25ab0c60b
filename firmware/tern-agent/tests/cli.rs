//! The `tern-agent` binary's start-up errors. (This file also makes `cargo test --workspace`
//! build the binary, which the end-to-end tests in services/tern run against `tern up`.)

use std::process::Command;

fn agent(dir: &std::path::Path, config: &str, args: &[&str]) -> (bool, String) {
    let path = dir.join("agent.toml");
    std::fs::write(&path, config).expect("config");
    let out = Command::new(env!("CARGO_BIN_EXE_tern-agent"))
        .args(args)
        .arg("--config")
        .arg(&path)
        .output()
        .expect("tern-agent");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_bad_key_or_a_missing_enrolment_stops_start_up_with_a_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = format!("root_dir = \"{}\"\n", dir.path().join("root").display());
    let (ok, stderr) = agent(dir.path(), &format!("{root}mqtt = \"tcp://x\"\n"), &["run"]);
    assert!(!ok);
    assert!(stderr.contains("mqtt: mqtt:// or mqtts://"), "{stderr}");
    let (ok, stderr) = agent(dir.path(), &root, &["run"]);
    assert!(!ok);
    assert!(stderr.contains("not enrolled"), "{stderr}");
}
