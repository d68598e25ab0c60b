//! Running hooks and telemetry scripts: a hook is a command line (run by `sh -c`) to which
//! the agent appends its arguments; it may get standard input and environment, and is killed
//! after the time limit.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("cannot start `{hook}`: {source}")]
    Start {
        hook: String,
        source: std::io::Error,
    },
    #[error("`{hook}` did not finish within {secs} s")]
    Timeout { hook: String, secs: u64 },
    #[error("`{hook}` failed ({status}): {stderr}")]
    Failed {
        hook: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
}

/// What a hook gets besides its text.
#[derive(Default)]
pub struct Invocation<'a> {
    pub args: &'a [&'a str],
    pub stdin: Option<&'a [u8]>,
    pub env: &'a [(&'a str, &'a str)],
}

/// Runs `hook` and returns its standard output when it exits with status 0.
pub async fn run(hook: &str, call: Invocation<'_>, timeout: Duration) -> Result<String, HookError> {
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg(format!("{hook} \"$@\""))
        .arg("tern-agent-hook")
        .args(call.args)
        .envs(call.env.iter().copied())
        .stdin(if call.stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = command.spawn().map_err(|source| HookError::Start {
        hook: hook.to_string(),
        source,
    })?;
    if let (Some(input), Some(mut stdin)) = (call.stdin, child.stdin.take()) {
        // A hook that does not read its input is not an error.
        let _ = stdin.write_all(input).await;
    }
    let output = tokio::time::timeout(timeout, child.wait_with_output())
        .await
        .map_err(|_| HookError::Timeout {
            hook: hook.to_string(),
            secs: timeout.as_secs(),
        })?
        .map_err(|source| HookError::Start {
            hook: hook.to_string(),
            source,
        })?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(HookError::Failed {
            hook: hook.to_string(),
            status: output.status,
            stderr: stderr.trim().chars().take(500).collect(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hooks_get_arguments_input_and_environment() {
        let dir = tempfile::tempdir().expect("tempdir");
        let script = dir.path().join("hook.sh");
        std::fs::write(&script, "read line; echo \"$1:$2:$line:$X\"").expect("write");
        let out = run(
            &format!("sh {}", script.display()),
            Invocation {
                args: &["camera", "on"],
                stdin: Some(b"hello\n"),
                env: &[("X", "y")],
            },
            Duration::from_secs(10),
        )
        .await
        .expect("hook");
        assert_eq!(out.trim(), "camera:on:hello:y");
    }

    #[tokio::test]
    async fn failures_and_timeouts_are_told_apart() {
        let failed = run(
            "echo broken >&2; exit 3",
            Invocation::default(),
            Duration::from_secs(10),
        )
        .await
        .expect_err("fails");
        assert!(matches!(&failed, HookError::Failed { stderr, .. } if stderr == "broken"));
        let slow = run("sleep 5", Invocation::default(), Duration::from_millis(100))
            .await
            .expect_err("times out");
        assert!(matches!(slow, HookError::Timeout { .. }));
    }
}
