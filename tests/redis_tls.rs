//! TLS to Redis (`rediss://`) against `redis-server`s this test starts on private ports with
//! certificates it makes (a CA, a server certificate for `localhost`, a client certificate):
//! the client verifies the server (a certificate from an unknown CA, or for another name, is
//! refused and said so), presents its own certificate where the server wants one, and `sluice
//! enrich` runs end to end over TLS. Skipped (saying so) when `redis-server` is missing, unless
//! SLUICE_REQUIRE_REDIS=1.

mod real_redis;

use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};
use real_redis::{enrich_files, free_port, redis_server_installed};
use sluice::redis::{ClientConfig, Endpoint, RedisClient};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// PEM files of a CA, a server certificate for `localhost` and a client certificate.
struct Certs {
    dir: tempfile::TempDir,
}

impl Certs {
    fn make() -> Certs {
        let dir = tempfile::tempdir().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "sluice test CA");
        let ca_key = KeyPair::generate().unwrap();
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let write = |name: &str, pem: String| std::fs::write(dir.path().join(name), pem).unwrap();
        write("ca.pem", ca_cert.pem());
        for (name, purpose) in [
            ("server", ExtendedKeyUsagePurpose::ServerAuth),
            ("client", ExtendedKeyUsagePurpose::ClientAuth),
        ] {
            let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
            params.extended_key_usages = vec![purpose];
            let key = KeyPair::generate().unwrap();
            let cert = params.signed_by(&key, &ca_cert, &ca_key).unwrap();
            write(&format!("{name}.pem"), cert.pem());
            write(&format!("{name}-key.pem"), key.serialize_pem());
        }
        Certs { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

struct TlsRedis {
    child: Child,
    port: u16,
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TLS-only `redis-server`; `clients` is its `--tls-auth-clients` (`yes`, `optional`).
fn tls_redis(certs: &Certs, clients: &str) -> TlsRedis {
    let port = free_port();
    let p = |name: &str| certs.path(name).to_str().unwrap().to_string();
    let child = Command::new("redis-server")
        .args([
            "--port",
            "0",
            "--tls-port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
        ])
        .args(["--save", "", "--appendonly", "no"])
        .args([
            "--tls-cert-file",
            &p("server.pem"),
            "--tls-key-file",
            &p("server-key.pem"),
        ])
        .args([
            "--tls-ca-cert-file",
            &p("ca.pem"),
            "--tls-auth-clients",
            clients,
        ])
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-server starts");
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "redis-server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    TlsRedis { child, port }
}

fn endpoint(url: &str, ca: Option<&Path>, client: Option<(&Path, &Path)>) -> Endpoint {
    let mut e = Endpoint::parse(url).unwrap();
    let tls = e.tls.as_mut().expect("a rediss:// URL");
    tls.ca_file = ca.map(Path::to_path_buf);
    tls.cert_file = client.map(|c| c.0.to_path_buf());
    tls.key_file = client.map(|c| c.1.to_path_buf());
    e
}

/// SET then GET through the client; the GET's value, or the error.
fn set_get(endpoint: Endpoint) -> Result<Option<Vec<u8>>, String> {
    glommio::LocalExecutorBuilder::default()
        .io_memory(sluice::DEFAULT_IO_MEMORY)
        .spawn(move || async move {
            let client = RedisClient::new(endpoint, &ClientConfig::default());
            client
                .command(&[b"SET", b"tls-key", b"over tls"])
                .await
                .map_err(|e| e.to_string())?;
            client.get(b"tls-key").await.map_err(|e| e.to_string())
        })
        .unwrap()
        .join()
        .unwrap()
}

#[test]
fn the_client_verifies_the_server_and_presents_its_certificate() {
    if !redis_server_installed() {
        return;
    }
    let certs = Certs::make();
    let ca = certs.path("ca.pem");
    let redis = tls_redis(&certs, "optional");
    let url = format!("rediss://localhost:{}", redis.port);
    let ok = set_get(endpoint(&url, Some(&ca), None));
    assert_eq!(ok.unwrap().as_deref(), Some(&b"over tls"[..]));
    // Not our CA among the system's roots: refused, and said so.
    let unknown = set_get(endpoint(&url, None, None)).unwrap_err();
    assert!(
        unknown.contains("TLS handshake") && unknown.contains("UnknownIssuer"),
        "{unknown}"
    );
    // The certificate is for localhost, not for 127.0.0.1.
    let ip = format!("rediss://127.0.0.1:{}", redis.port);
    let name = set_get(endpoint(&ip, Some(&ca), None)).unwrap_err();
    assert!(name.contains("not valid for name \"127.0.0.1\""), "{name}");
    // A server that wants a client certificate.
    let strict = tls_redis(&certs, "yes");
    let url = format!("rediss://localhost:{}", strict.port);
    assert!(set_get(endpoint(&url, Some(&ca), None)).is_err());
    let client = (certs.path("client.pem"), certs.path("client-key.pem"));
    let with_cert = set_get(endpoint(&url, Some(&ca), Some((&client.0, &client.1))));
    assert_eq!(with_cert.unwrap().as_deref(), Some(&b"over tls"[..]));
    // A CA file that is not there is named.
    let missing = set_get(endpoint(&url, Some(Path::new("/nonexistent/ca.pem")), None));
    assert!(missing.unwrap_err().contains("/nonexistent/ca.pem"));
}

#[test]
fn enrich_over_tls_and_an_untrusted_server_refused_before_writing() {
    if !redis_server_installed() {
        return;
    }
    let certs = Certs::make();
    let redis = tls_redis(&certs, "optional");
    let url = format!("rediss://localhost:{}", redis.port);
    assert!(set_get(endpoint(&url, Some(&certs.path("ca.pem")), None)).is_ok());
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    let mut f = std::fs::File::create(&input).unwrap();
    writeln!(f, r#"{{"k":"tls-key"}}"#).unwrap();
    drop(f);
    let output = dir.path().join("out.jsonl");
    let sluice = env!("CARGO_BIN_EXE_sluice");
    let enrich = |extra: &[&str]| enrich_files(sluice, &url, "{k}", &input, &output, extra);
    let ca = certs.path("ca.pem");
    let run = enrich(&["--tls-ca", ca.to_str().unwrap()]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(&output).unwrap(),
        "{\"k\":\"tls-key\",\"value\":\"over tls\"}\n"
    );
    std::fs::remove_file(&output).unwrap();
    let run = enrich(&[]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success());
    assert!(
        stderr.contains("TLS handshake") && stderr.contains("UnknownIssuer"),
        "{stderr}"
    );
    assert!(!output.exists(), "nothing written before the refusal");
}
