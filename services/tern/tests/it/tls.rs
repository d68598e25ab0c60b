//! MQTT over TLS: a real TLS client (Debian's mosquitto_pub, OpenSSL) against certificates made
//! with the openssl CLI, and a certificate renewal picked up without a restart.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::harness::{PATIENCE, Provisioned, Tern};

/// A CA and a server certificate for `localhost` signed by it, under `dir/name-*`.
pub(crate) struct Pki {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl must be installed (make deps)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub(crate) fn pki(dir: &Path, name: &str) -> Pki {
    let f = |suffix: &str| format!("{name}-{suffix}");
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    openssl(
        dir,
        &[
            &["req", "-x509"][..],
            &ec,
            &[
                "-keyout",
                &f("ca.key"),
                "-out",
                &f("ca.pem"),
                "-days",
                "2",
                "-subj",
                &format!("/CN={name} test CA"),
            ],
        ]
        .concat(),
    );
    openssl(
        dir,
        &[
            &["req"][..],
            &ec,
            &[
                "-keyout",
                &f("key.pem"),
                "-out",
                &f("csr.pem"),
                "-subj",
                "/CN=localhost",
            ],
        ]
        .concat(),
    );
    std::fs::write(
        dir.join(f("ext.cnf")),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    .expect("ext");
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &f("csr.pem"),
            "-CA",
            &f("ca.pem"),
            "-CAkey",
            &f("ca.key"),
            "-CAcreateserial",
            "-out",
            &f("cert.pem"),
            "-days",
            "2",
            "-extfile",
            &f("ext.cnf"),
        ],
    );
    Pki {
        ca: dir.join(f("ca.pem")),
        cert: dir.join(f("cert.pem")),
        key: dir.join(f("key.pem")),
    }
}

/// Installs a certificate and key where the server reads them, each by an atomic rename.
fn install(pki: &Pki, cert: &Path, key: &Path) {
    for (from, to) in [(&pki.key, key), (&pki.cert, cert)] {
        let staging = to.with_extension("new");
        std::fs::copy(from, &staging).expect("copy");
        std::fs::rename(&staging, to).expect("rename");
    }
}

/// mosquitto_pub over TLS trusting `ca`; returns whether it succeeded.
fn tls_pub(port: u16, p: &Provisioned, ca: Option<&Path>, payload: &str) -> bool {
    let mut cmd = Command::new("mosquitto_pub");
    cmd.args(["-h", "localhost", "-p", &port.to_string()])
        .args([
            "-i",
            &p.device_id,
            "-u",
            &p.device_id,
            "-P",
            &p.access_token,
        ])
        .args(["-q", "1", "-t", "telemetry", "-m", payload]);
    if let Some(ca) = ca {
        cmd.arg("--cafile").arg(ca);
    }
    cmd.output().expect("mosquitto_pub").status.success()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_over_tls_with_mosquitto_and_a_renewed_certificate_without_restart() {
    let certs = tempfile::tempdir().expect("tempdir");
    let (first, second) = (pki(certs.path(), "first"), pki(certs.path(), "second"));
    let (cert, key) = (certs.path().join("tls.crt"), certs.path().join("tls.key"));
    install(&first, &cert, &key);
    let tern = Tern::start_with_env(&[
        ("TERN_MQTT__TLS__CERT_FILE", cert.to_str().expect("utf-8")),
        ("TERN_MQTT__TLS__KEY_FILE", key.to_str().expect("utf-8")),
        ("TERN_MQTT__TLS__RELOAD_INTERVAL_SECS", "1"),
    ]);
    let p = tern.provision("acme", "a");
    let port = tern.mqtts_port;

    assert!(
        tls_pub(port, &p, Some(&first.ca), r#"{"temp": 1}"#),
        "TLS publish"
    );
    assert_eq!(tern.wait_points(&p, "temp", 1).await.len(), 1);
    assert!(
        !tls_pub(port, &p, Some(&second.ca), "{}"),
        "an untrusted server certificate"
    );
    assert!(!tls_pub(port, &p, None, "{}"), "plain MQTT on the TLS port");

    install(&second, &cert, &key);
    let deadline = Instant::now() + PATIENCE;
    while !tls_pub(port, &p, Some(&second.ca), r#"{"temp": 2}"#) {
        assert!(
            Instant::now() < deadline,
            "the renewed certificate was never served"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        !tls_pub(port, &p, Some(&first.ca), "{}"),
        "the old certificate is gone"
    );
    assert_eq!(tern.wait_points(&p, "temp", 2).await.len(), 2);
    // Plain MQTT on its own port is unaffected.
    assert!(
        crate::harness::mosquitto_pub(
            tern.mqtt_port,
            &p.device_id,
            &p.access_token,
            "telemetry",
            "{}"
        )
        .status
        .success()
    );
    assert!(tern.log().contains("TLS certificate reloaded"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paho_speaks_mqtt_over_websocket_over_tls() {
    let certs = tempfile::tempdir().expect("tempdir");
    let pki = pki(certs.path(), "wss");
    let tern = Tern::start_with_env(&[
        (
            "TERN_MQTT__TLS__CERT_FILE",
            pki.cert.to_str().expect("utf-8"),
        ),
        ("TERN_MQTT__TLS__KEY_FILE", pki.key.to_str().expect("utf-8")),
    ]);
    let p = tern.provision("acme", "browser");
    crate::harness::paho_websocket(tern.wss_port, &p, Some(&pki.ca));
    assert_eq!(tern.wait_points(&p, "ws", 2).await.len(), 2);
    // The lifecycle says how the device came in.
    let (_, events) = tern
        .get(
            &p.api_token,
            "/api/v1/tenants/acme/devices/browser/events?kind=lifecycle&from=0",
        )
        .await;
    assert!(events.to_string().contains("websocket_tls"), "{events}");
}

/// `tern up` with MQTT over TLS (on `Tern::mqtts_port`), serving `server`'s certificate, and
/// `extra` env.
fn tls_tern(server: &Pki, extra: &[(&str, &str)]) -> Tern {
    let mut env = vec![
        (
            "TERN_MQTT__TLS__CERT_FILE",
            server.cert.to_str().expect("utf-8"),
        ),
        (
            "TERN_MQTT__TLS__KEY_FILE",
            server.key.to_str().expect("utf-8"),
        ),
    ];
    env.extend_from_slice(extra);
    Tern::start_with_env(&env)
}

/// A client certificate for `cn` signed by the CA of `pki` (EC P-256, clientAuth).
pub(crate) fn client_cert(dir: &Path, pki: &Pki, cn: &str) -> (PathBuf, PathBuf) {
    let (key, csr, cert) = (
        dir.join(format!("{cn}.key")),
        dir.join(format!("{cn}.csr")),
        dir.join(format!("{cn}.pem")),
    );
    let ext = dir.join(format!("{cn}.cnf"));
    std::fs::write(
        &ext,
        "extendedKeyUsage=clientAuth\nkeyUsage=digitalSignature\n",
    )
    .expect("ext");
    let path = |p: &Path| p.to_str().expect("utf-8").to_string();
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &path(&key),
            "-out",
            &path(&csr),
            "-subj",
            &format!("/CN={cn}"),
        ],
    );
    let ca_key = pki.ca.with_file_name(
        pki.ca
            .file_name()
            .and_then(|n| n.to_str())
            .expect("name")
            .replace("ca.pem", "ca.key"),
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &path(&csr),
            "-CA",
            &path(&pki.ca),
            "-CAkey",
            &path(&ca_key),
            "-CAcreateserial",
            "-out",
            &path(&cert),
            "-days",
            "2",
            "-extfile",
            &path(&ext),
        ],
    );
    (cert, key)
}

/// mosquitto_pub over TLS with a client certificate and no user name or password.
fn mtls_pub(
    port: u16,
    server_ca: &Path,
    client: &(PathBuf, PathBuf),
    id: &str,
    payload: &str,
) -> bool {
    Command::new("mosquitto_pub")
        .args(["-h", "localhost", "-p", &port.to_string(), "-i", id])
        .arg("--cafile")
        .arg(server_ca)
        .arg("--cert")
        .arg(&client.0)
        .arg("--key")
        .arg(&client.1)
        .args(["-q", "1", "-t", "telemetry", "-m", payload])
        .output()
        .expect("mosquitto_pub")
        .status
        .success()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_devices_connect_with_certificates_from_their_tenants_ca_only() {
    let certs = tempfile::tempdir().expect("tempdir");
    let dir = certs.path();
    let server = pki(dir, "server");
    let (acme_ca, globex_ca, stranger_ca) =
        (pki(dir, "acme"), pki(dir, "globex"), pki(dir, "stranger"));
    let tern = tls_tern(&server, &[]);
    let port = tern.mqtts_port;
    let meter = tern.provision("acme", "meter");
    let _globex = tern.provision("globex", "other");
    let ca_path = |p: &Pki| p.ca.to_str().expect("utf-8").to_string();
    let added = tern.cli_json(&["ca", "add", &ca_path(&acme_ca), "--tenant", "acme"]);
    assert!(
        added["subject"]
            .as_str()
            .expect("subject")
            .contains("acme test CA")
    );
    tern.cli_json(&["ca", "add", &ca_path(&globex_ca), "--tenant", "globex"]);
    // The same CA for a second tenant, and a certificate that is not a CA, are refused.
    let twice = tern.cli(&["ca", "add", &ca_path(&acme_ca), "--tenant", "globex"]);
    assert!(!twice.status.success());
    let leaf = tern.cli(&[
        "ca",
        "add",
        server.cert.to_str().expect("utf-8"),
        "--tenant",
        "acme",
    ]);
    assert!(
        String::from_utf8_lossy(&leaf.stderr).contains("not a CA"),
        "{leaf:?}"
    );

    // acme's CA vouches for "meter": no token needed.
    let by_acme = client_cert(dir, &acme_ca, "meter");
    assert!(mtls_pub(
        port,
        &server.ca,
        &by_acme,
        &meter.device_id,
        r#"{"kwh": 1}"#
    ));
    assert_eq!(tern.wait_points(&meter, "kwh", 1).await.len(), 1);
    // globex's CA cannot vouch for acme's device (the name is looked up in globex), and an
    // unregistered CA is refused in the TLS handshake.
    let by_globex = client_cert(dir, &globex_ca, "meter");
    assert!(!mtls_pub(
        port,
        &server.ca,
        &by_globex,
        &meter.device_id,
        r#"{"kwh": 2}"#
    ));
    let by_stranger = client_cert(dir, &stranger_ca, "meter");
    assert!(!mtls_pub(
        port,
        &server.ca,
        &by_stranger,
        &meter.device_id,
        r#"{"kwh": 3}"#
    ));
    // Devices without certificates still use tokens on the same port.
    assert!(tls_pub(port, &meter, Some(&server.ca), r#"{"kwh": 4}"#));

    // A deleted CA no longer admits its devices.
    let id = added["id"].as_str().expect("id").to_string();
    assert!(
        tern.cli(&["ca", "delete", &id, "--tenant", "acme"])
            .status
            .success()
    );
    assert_eq!(
        tern.cli_json(&["ca", "list", "--tenant", "acme"]),
        serde_json::json!([])
    );
    assert!(!mtls_pub(
        port,
        &server.ca,
        &by_acme,
        &meter.device_id,
        r#"{"kwh": 5}"#
    ));
    let points = tern.wait_points(&meter, "kwh", 2).await;
    let values = crate::harness::values(&points);
    assert_eq!(
        values,
        [1.0, 4.0],
        "only the admitted publishes were stored"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_require_client_certificate_a_token_alone_does_not_get_through() {
    let certs = tempfile::tempdir().expect("tempdir");
    let dir = certs.path();
    let (server, acme_ca) = (pki(dir, "server"), pki(dir, "acme"));
    let tern = tls_tern(
        &server,
        &[("TERN_MQTT__TLS__REQUIRE_CLIENT_CERTIFICATE", "true")],
    );
    let port = tern.mqtts_port;
    let meter = tern.provision("acme", "meter");
    tern.cli_json(&[
        "ca",
        "add",
        acme_ca.ca.to_str().expect("utf-8"),
        "--tenant",
        "acme",
    ]);
    assert!(
        !tls_pub(port, &meter, Some(&server.ca), r#"{"kwh": 1}"#),
        "a valid token without a certificate is refused in the handshake"
    );
    let cert = client_cert(dir, &acme_ca, "meter");
    assert!(mtls_pub(
        port,
        &server.ca,
        &cert,
        &meter.device_id,
        r#"{"kwh": 2}"#
    ));
    assert_eq!(
        crate::harness::values(&tern.wait_points(&meter, "kwh", 1).await),
        [2.0]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_simulator_publishes_over_tls() {
    let certs = tempfile::tempdir().expect("tempdir");
    let server = pki(certs.path(), "server");
    let tern = tls_tern(&server, &[]);
    let port = tern.mqtts_port;
    let token = tern.operator_token();
    let ca = server.ca.to_str().expect("utf-8").to_string();
    let args = crate::harness::sim_args(
        &tern,
        port,
        &[
            "--tls-ca",
            &ca,
            "--devices",
            "3",
            "--qos",
            "1",
            "--rate",
            "20",
            "--duration",
            "1",
        ],
    );
    let (report, _) = crate::harness::run_sim_all_acked(args).await;
    assert_eq!(report["connected"], 3, "{report}");
    // The bridge's lifecycle events say how the simulator came in.
    let path = "/api/v1/tenants/sim/devices/sim-0/events?kind=lifecycle&from=0";
    let deadline = Instant::now() + PATIENCE;
    loop {
        let (_, events) = tern.get(&token, path).await;
        if events.to_string().contains("connected") {
            assert!(events.to_string().contains("tls"), "{events}");
            break;
        }
        assert!(Instant::now() < deadline, "no lifecycle event: {events}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
