//! The user directory's LDAP backend against a real OpenLDAP server (Debian's slapd, started
//! here on a free port): people sign in with their directory password, their groups give their
//! roles, people the directory does not know fall back to local users, and a directory that is
//! down is an error of its own.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::harness::{Tern, free_port};

const SUFFIX: &str = "dc=example,dc=com";
const ADMIN_DN: &str = "cn=admin,dc=example,dc=com";
const ADMIN_PASSWORD: &str = "directory-admin-secret";

/// A slapd with one mdb database, stopped when dropped.
struct Slapd {
    child: Child,
    url: String,
}

impl Drop for Slapd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Slapd {
    fn start(dir: &Path) -> Self {
        let db = dir.join("db");
        std::fs::create_dir_all(&db).expect("db dir");
        let config = dir.join("slapd.conf");
        std::fs::write(
            &config,
            format!(
                "include /etc/ldap/schema/core.schema\n\
                 include /etc/ldap/schema/cosine.schema\n\
                 include /etc/ldap/schema/inetorgperson.schema\n\
                 modulepath /usr/lib/ldap\n\
                 moduleload back_mdb\n\
                 pidfile {pid}\n\
                 database mdb\n\
                 suffix \"{SUFFIX}\"\n\
                 rootdn \"{ADMIN_DN}\"\n\
                 rootpw {ADMIN_PASSWORD}\n\
                 directory {db}\n",
                pid = dir.join("slapd.pid").display(),
                db = db.display(),
            ),
        )
        .expect("slapd.conf");
        let url = format!("ldap://127.0.0.1:{}", free_port());
        let child = Command::new("/usr/sbin/slapd")
            .arg("-f")
            .arg(&config)
            .args(["-h", &format!("{url}/"), "-d", "0"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start slapd (make deps installs Debian's slapd)");
        let slapd = Self { child, url };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !slapd.ldap("ldapwhoami", &[]).status.success() {
            assert!(Instant::now() < deadline, "slapd did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        slapd
    }

    fn ldap(&self, tool: &str, extra: &[&str]) -> std::process::Output {
        Command::new(tool)
            .args(["-x", "-H", &self.url, "-D", ADMIN_DN, "-w", ADMIN_PASSWORD])
            .args(extra)
            .output()
            .expect("run an OpenLDAP tool (make deps installs ldap-utils)")
    }

    fn add(&self, dir: &Path, ldif: &str) {
        let file = dir.join("entries.ldif");
        std::fs::write(&file, ldif).expect("ldif");
        let out = self.ldap("ldapadd", &["-f", file.to_str().expect("path")]);
        assert!(
            out.status.success(),
            "ldapadd: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn person(uid: &str, password: &str) -> String {
    format!(
        "dn: uid={uid},ou=people,{SUFFIX}\nobjectClass: inetOrgPerson\nuid: {uid}\ncn: {uid}\n\
         sn: {uid}\nmail: {uid}@example.com\nuserPassword: {password}\n\n"
    )
}

fn group(name: &str, members: &[&str]) -> String {
    let members: String = members
        .iter()
        .map(|m| format!("member: uid={m},ou=people,{SUFFIX}\n"))
        .collect();
    format!("dn: cn={name},ou=groups,{SUFFIX}\nobjectClass: groupOfNames\ncn: {name}\n{members}\n")
}

/// `tern token approve` for a fresh device code of `client`; returns the CLI's output and the
/// device code.
async fn approve(
    tern: &Tern,
    client: &str,
    user: &str,
    password: &str,
) -> (std::process::Output, String) {
    let device: Value = reqwest::Client::new()
        .post(format!("{}/oauth2/acme/device_authorization", tern.http()))
        .form(&[("client_id", client), ("scope", "tern:read tern:write")])
        .send()
        .await
        .expect("device authorization")
        .json()
        .await
        .expect("json");
    let out = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args([
            "token",
            "approve",
            device["user_code"].as_str().expect("code"),
            "--user",
            user,
        ])
        .args(["--tenant", "acme", "--output", "json"])
        .env("TERN_SERVER", tern.http())
        .env("TERN_PASSWORD", password)
        .output()
        .expect("tern token approve");
    (
        out,
        device["device_code"]
            .as_str()
            .expect("device code")
            .to_string(),
    )
}

async fn redeem(tern: &Tern, client: &str, device_code: &str) -> Value {
    tokio::time::sleep(Duration::from_millis(1_050)).await; // the polling interval
    reqwest::Client::new()
        .post(format!("{}/oauth2/acme/token", tern.http()))
        .form(&[
            ("grant_type", "urn:ietf:params:oauth:grant-type:device_code"),
            ("device_code", device_code),
            ("client_id", client),
        ])
        .send()
        .await
        .expect("token")
        .json()
        .await
        .expect("json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn people_sign_in_against_openldap_and_their_groups_give_roles() {
    let dir = tempfile::tempdir().expect("tempdir");
    let slapd = Slapd::start(dir.path());
    let mut ldif = format!(
        "dn: {SUFFIX}\nobjectClass: dcObject\nobjectClass: organization\no: Example\ndc: example\n\n\
         dn: ou=people,{SUFFIX}\nobjectClass: organizationalUnit\nou: people\n\n\
         dn: ou=groups,{SUFFIX}\nobjectClass: organizationalUnit\nou: groups\n\n"
    );
    ldif += &person("carol", "carols-ldap-password");
    ldif += &person("dave", "daves-ldap-password");
    ldif += &group("tern-admins", &["carol"]);
    ldif += &group("staff", &["carol", "dave"]);
    slapd.add(dir.path(), &ldif);

    let password_file = dir.path().join("bind.pw");
    std::fs::write(&password_file, format!("{ADMIN_PASSWORD}\n")).expect("password file");
    let config = dir.path().join("tern.toml");
    std::fs::write(
        &config,
        format!(
            "[identity]\ndevice_poll_interval_secs = 1\n\n[identity.ldap.acme]\nurl = \"{url}\"\nbind_dn = \"{ADMIN_DN}\"\n\
             bind_password_file = \"{pw}\"\nuser_base_dn = \"ou=people,{SUFFIX}\"\n\
             group_base_dn = \"ou=groups,{SUFFIX}\"\nadmin_groups = [\"tern-admins\"]\n\
             viewer_groups = [\"staff\"]\n",
            url = slapd.url,
            pw = password_file.display(),
        ),
    )
    .expect("config");
    let tern = Tern::start_with_env(&[("TERN_CONFIG", config.to_str().expect("path"))]);
    tern.cli_json(&["tenant", "create", "acme"]);
    let app = tern.cli_json(&[
        "client",
        "create",
        "--tenant",
        "acme",
        "--name",
        "cli",
        "--public",
        "--grant",
        "device_code",
        "--scope",
        "tern:read tern:write",
    ]);
    let app = app["client_id"].as_str().expect("id").to_string();

    // carol: in tern-admins and staff.
    let (out, code) = approve(&tern, &app, "carol", "carols-ldap-password").await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = redeem(&tern, &app, &code).await;
    assert_eq!(token["scope"], "tern:read tern:write", "{token}");
    let carol = tern.cli_json(&["user", "show", "carol", "--tenant", "acme"]);
    assert_eq!(
        carol["directory_dn"],
        format!("uid=carol,ou=people,{SUFFIX}")
    );
    assert_eq!(carol["groups"], json!(["staff", "tern-admins"]));
    assert_eq!(carol["roles"], json!(["admin", "viewer"]));
    assert_eq!(carol["email"], "carol@example.com");

    // dave: staff only, so a viewer: the write scope he asked for is not his to grant.
    let (out, code) = approve(&tern, &app, "dave", "daves-ldap-password").await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(redeem(&tern, &app, &code).await["scope"], "tern:read");

    // The directory decides passwords; a local user it does not know still signs in.
    let (out, _) = approve(&tern, &app, "carol", "not-her-password").await;
    assert!(String::from_utf8_lossy(&out.stderr).contains("401"));
    let local = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args([
            "user", "create", "erin", "--role", "editor", "--tenant", "acme",
        ])
        .env("TERN_SERVER", tern.http())
        .env("TERN_TOKEN_FILE", tern.data_dir().join("admin.token"))
        .env("TERN_PASSWORD", "erins-local-password")
        .output()
        .expect("tern user create");
    assert!(local.status.success());
    let (out, _) = approve(&tern, &app, "erin", "erins-local-password").await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // With the directory down, its people get "unavailable", not "wrong password".
    drop(slapd);
    let (out, _) = approve(&tern, &app, "carol", "carols-ldap-password").await;
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("503"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
