//! api/openapi.yaml against the server: the document names exactly the routes baton serves,
//! and a real baton, driven through every VM state (and through a snapshot, a restore and a
//! migration to a second baton), answers each endpoint with the success and error codes the
//! document lists for it.
//!
//! There is no YAML crate in the workspace, so a small extractor reads the subset of YAML the
//! document keeps to (see its header): block mappings by indentation, `- ` sequence items,
//! `|`/`>` block scalars and `[flow, lists]`. A line outside that subset fails the test, so the
//! document cannot drift into something the extractor would misread.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

use baton_tests::{baton_bin, guest_config_json, ApiVmm, NetNs, TempDir, READY};
use serde_json::Value;

const BOOT: Duration = Duration::from_secs(30);
const EXIT: Duration = Duration::from_secs(30);

/// Documented codes no test can provoke, with the reason; each must still be documented.
const NOT_PROVOKED: &[(&str, u16, &str)] = &[
    (
        "vm.power-button",
        500,
        "needs a VM whose ACPI event cannot be delivered",
    ),
    (
        "vm.add-net",
        204,
        "opens a TAP, which tests do only in a network namespace of their own \
         (tests/tests/net_fds.rs)",
    ),
];

/// One `key: value` line: the keys leading to it (`-` for a sequence item) and its value,
/// empty for a key that opens a nested block.
type Entry = (Vec<String>, String);

fn unquote(s: &str) -> &str {
    let s = s.trim();
    for q in ['"', '\''] {
        if let Some(inner) = s.strip_prefix(q).and_then(|s| s.strip_suffix(q)) {
            return inner;
        }
    }
    s
}

/// `[a, "b"]` as its items.
fn flow_list(s: &str) -> Vec<String> {
    let inner = s
        .trim()
        .strip_prefix('[')
        .and_then(|s| s.strip_suffix(']'))
        .unwrap_or_else(|| panic!("not a [flow, list]: {s}"));
    inner
        .split(',')
        .map(|i| unquote(i).to_string())
        .filter(|i| !i.is_empty())
        .collect()
}

/// The document's `key: value` lines, or the first line outside the subset.
fn entries(text: &str) -> Result<Vec<Entry>, String> {
    let mut out = Vec::new();
    let mut stack: Vec<(usize, String)> = Vec::new();
    // Inside a block scalar: the indentation of the key that owns it.
    let mut block: Option<usize> = None;
    for (n, raw) in text.lines().enumerate() {
        let indent = raw.len() - raw.trim_start_matches(' ').len();
        let line = raw.trim();
        if let Some(owner) = block {
            if line.is_empty() || indent > owner {
                continue;
            }
            block = None;
        }
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (indent, line) = match line.strip_prefix("- ") {
            Some(rest) => {
                stack.retain(|(i, _)| *i < indent);
                stack.push((indent, "-".to_string()));
                (indent + 2, rest)
            }
            None => (indent, line),
        };
        let (key, value) = match line.split_once(": ") {
            Some((k, v)) => (k, v.trim()),
            None => match line.strip_suffix(':') {
                Some(k) => (k, ""),
                None => {
                    return Err(format!(
                        "line {}: not a `key: value` line (keep long text in > blocks): {raw}",
                        n + 1
                    ))
                }
            },
        };
        stack.retain(|(i, _)| *i < indent);
        stack.push((indent, unquote(key).to_string()));
        if matches!(value, "|" | "|-" | ">" | ">-") {
            block = Some(indent);
        }
        let value = if block == Some(indent) { "" } else { value };
        let keys = stack.iter().map(|(_, k)| k.clone()).collect();
        out.push((keys, unquote(value).to_string()));
    }
    Ok(out)
}

/// One documented operation.
#[derive(Debug, Default)]
struct Operation {
    codes: BTreeSet<u16>,
    /// The schema of the 200 answer, if there is one.
    ok_schema: Option<String>,
}

/// What the test needs from the document.
#[derive(Debug, Default)]
struct Document {
    /// By (endpoint name without `/`, upper-case method).
    operations: BTreeMap<(String, String), Operation>,
    /// `required` of each schema.
    required: BTreeMap<String, Vec<String>>,
    /// `enum` of each schema.
    enums: BTreeMap<String, Vec<String>>,
    servers: Vec<String>,
}

impl Document {
    fn parse(text: &str) -> Self {
        let mut doc = Document::default();
        let lines = entries(text).unwrap_or_else(|e| panic!("api/openapi.yaml {e}"));
        for (keys, value) in lines {
            let k: Vec<&str> = keys.iter().map(String::as_str).collect();
            match k.as_slice() {
                ["servers", "-", "url"] => doc.servers.push(value),
                ["paths", path, method] => {
                    let name = path
                        .strip_prefix('/')
                        .unwrap_or_else(|| panic!("path {path} does not start with /"));
                    let key = (name.to_string(), method.to_ascii_uppercase());
                    assert!(
                        doc.operations.insert(key, Operation::default()).is_none(),
                        "{method} {path} documented twice"
                    );
                }
                ["paths", path, method, "responses", code, rest @ ..] => {
                    let op = doc
                        .operations
                        .get_mut(&(path[1..].to_string(), method.to_ascii_uppercase()))
                        .expect("operation line came first");
                    let code: u16 = code
                        .parse()
                        .unwrap_or_else(|_| panic!("{method} {path}: bad status {code}"));
                    op.codes.insert(code);
                    if code == 200 && rest == ["content", "application/json", "schema", "$ref"] {
                        op.ok_schema = Some(value.rsplit('/').next().expect("split").to_string());
                    }
                }
                ["components", "schemas", schema, "required"] => {
                    doc.required.insert(schema.to_string(), flow_list(&value));
                }
                ["components", "schemas", schema, "enum"] => {
                    doc.enums.insert(schema.to_string(), flow_list(&value));
                }
                _ => {}
            }
        }
        doc
    }

    fn load() -> Self {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../api/openapi.yaml");
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        Document::parse(&text)
    }

    /// The operation on `endpoint`, whatever its method.
    fn operation(&self, endpoint: &str) -> (&str, &Operation) {
        self.operations
            .iter()
            .find(|((name, _), _)| name == endpoint)
            .map(|((_, method), op)| (method.as_str(), op))
            .unwrap_or_else(|| panic!("{endpoint} is not documented"))
    }
}

/// Sends requests, checks each answer against the document, and remembers which
/// (endpoint, status) pairs were seen.
struct Checker {
    doc: Document,
    seen: BTreeSet<(String, u16)>,
}

impl Checker {
    /// Sends `method endpoint` and checks that baton answers `want`, that the document lists
    /// `want` for the endpoint, and that the body has the documented shape.
    fn call(
        &mut self,
        vmm: &ApiVmm,
        method: &str,
        endpoint: &str,
        body: Option<&str>,
        want: u16,
    ) -> Option<Value> {
        let r = vmm.http(method, endpoint, body);
        self.check(method, endpoint, &r, want)
    }

    /// Checks an answer `r` to `method endpoint` as [`Checker::call`] does.
    fn check(
        &mut self,
        method: &str,
        endpoint: &str,
        r: &api::client::Response,
        want: u16,
    ) -> Option<Value> {
        let (_, op) = self.doc.operation(endpoint);
        assert!(
            op.codes.contains(&want),
            "{method} {endpoint} answers {want}, which the document does not list (it lists \
             {:?})",
            op.codes
        );
        let text = String::from_utf8_lossy(&r.body);
        assert_eq!(r.status, want, "{method} {endpoint}: {text}");
        self.seen.insert((endpoint.to_string(), want));
        match want {
            200 => {
                let v: Value = serde_json::from_slice(&r.body)
                    .unwrap_or_else(|e| panic!("{method} {endpoint}: not JSON ({e}): {text}"));
                let schema = op
                    .ok_schema
                    .as_deref()
                    .unwrap_or_else(|| panic!("{endpoint}: the document gives no schema for 200"));
                let required = self.doc.required.get(schema).unwrap_or_else(|| {
                    panic!("schema {schema} lists no required fields in the document")
                });
                for field in required {
                    assert!(
                        v.get(field).is_some(),
                        "{method} {endpoint}: answer lacks {field}, required by {schema}: {v}"
                    );
                }
                Some(v)
            }
            204 => {
                assert!(r.body.is_empty(), "{method} {endpoint}: 204 with a body");
                None
            }
            _ => {
                let chain = r.error_chain().unwrap_or_else(|| {
                    panic!("{method} {endpoint}: {want} body is not an ErrorChain: {text}")
                });
                assert!(
                    !chain.is_empty() && chain.iter().all(|l| !l.is_empty()),
                    "{method} {endpoint}: empty error chain {chain:?}"
                );
                None
            }
        }
    }

    /// Checks `vm.info` reports `state`, a value of the documented VmState enum.
    fn expect_state(&mut self, vmm: &ApiVmm, state: &str) {
        let states = &self.doc.enums["VmState"];
        assert!(
            states.iter().any(|s| s == state),
            "{state} not in {states:?}"
        );
        let info = self
            .call(vmm, "GET", "vm.info", None, 200)
            .expect("200 has a body");
        assert_eq!(info["state"], state, "{info}");
    }
}

/// Sends `method endpoint` with `body` to the baton on `socket` on a thread of its own: for
/// requests that answer only when a migration ends.
fn in_background(
    socket: &Path,
    endpoint: &'static str,
    body: String,
) -> std::thread::JoinHandle<api::client::Response> {
    let socket = socket.to_owned();
    std::thread::spawn(move || {
        api::client::request(&socket, "PUT", endpoint, Some(body.as_bytes()))
            .unwrap_or_else(|e| panic!("PUT {endpoint}: {e}"))
    })
}

/// Waits until `path` exists (a migration listener was bound there).
fn wait_for_path(path: &Path) {
    let deadline = Instant::now() + BOOT;
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A `{"<field>": "<url>"}` body.
fn url_body(field: &str, url: &str) -> String {
    serde_json::json!({ field: url }).to_string()
}

/// The test guest's configuration with its kernel at `kernel`.
fn config_with_kernel(serial: &Path, kernel: &Path) -> String {
    let mut config: Value =
        serde_json::from_str(&guest_config_json(serial, 1, "heartbeat_ms=0")).expect("JSON");
    config["payload"]["kernel"] = kernel.to_string_lossy().into();
    config.to_string()
}

#[test]
fn document_matches_the_routes_and_the_server() {
    let doc = Document::load();

    // The document's server is where baton's routes live.
    assert_eq!(
        doc.servers,
        [format!(
            "http://localhost{}",
            api::routes::PREFIX.trim_end_matches('/')
        )]
    );

    // (a) Exactly the routes baton serves, both ways.
    let documented: BTreeSet<(String, String)> = doc.operations.keys().cloned().collect();
    let routed: BTreeSet<(String, String)> = api::routes::ROUTES
        .iter()
        .map(|(name, method, _)| (name.to_string(), method.to_string()))
        .collect();
    assert_eq!(
        documented.difference(&routed).collect::<Vec<_>>(),
        Vec::<&(String, String)>::new(),
        "documented but not routed"
    );
    assert_eq!(
        routed.difference(&documented).collect::<Vec<_>>(),
        Vec::<&(String, String)>::new(),
        "routed but not documented"
    );

    let mut c = Checker {
        doc,
        seen: BTreeSet::new(),
    };

    // (b) The power button ends baton (the guest powers off), so it gets a baton of its own.
    let mut vmm = ApiVmm::start(&[]);
    let serial = vmm.dir().join("serial.sock");
    let config = guest_config_json(&serial, 1, "heartbeat_ms=0");
    c.call(&vmm, "PUT", "vm.create", Some(&config), 204);
    c.call(&vmm, "PUT", "vm.boot", None, 204);
    let mut console = vmm.console(&serial);
    console.wait_for(READY, BOOT);
    c.call(&vmm, "PUT", "vm.power-button", None, 204);
    console.wait_for("power-button: pressed", BOOT);
    let (status, stderr) = vmm.wait_exit(EXIT);
    assert_eq!(status.code(), Some(0), "{stderr}");

    // Everything else on one baton, through every state; in a network namespace of its
    // own, for the card it hot-plugs.
    let ns = NetNs::new("openapi");
    let mut vmm = ApiVmm::start_in(Some(&ns), &[]);
    c.call(&vmm, "GET", "vmm.ping", None, 200);
    c.call(&vmm, "GET", "vmm.backend-transfer-support", None, 200);

    // The wrong method, on every endpoint.
    let names: Vec<(String, String)> = c.doc.operations.keys().cloned().collect();
    for (name, method) in &names {
        let wrong = if method == "GET" { "PUT" } else { "GET" };
        c.call(&vmm, wrong, name, None, 405);
    }

    // No VM yet.
    for name in [
        "vm.boot",
        "vm.info",
        "vm.counters",
        "vm.pause",
        "vm.resume",
        "vm.shutdown",
        "vm.reboot",
        "vm.power-button",
        "vm.delete",
    ] {
        let method = c.doc.operation(name).0.to_string();
        c.call(&vmm, &method, name, None, 404);
    }

    c.call(&vmm, "PUT", "vm.add-net", Some("{}"), 404);
    c.call(&vmm, "PUT", "vm.add-disk", Some(r#"{"path":"/x"}"#), 404);
    c.call(&vmm, "PUT", "vm.remove-device", Some(r#"{"id":"x"}"#), 404);

    // Snapshots and outgoing migrations need a VM; restore and receive-migration refuse a VM.
    let snap = vmm.dir().join("snap");
    let snap_url = format!("file://{}", snap.display());
    let snapshot = url_body("destination_url", &snap_url);
    let restore = url_body("source_url", &snap_url);
    let nobody = url_body(
        "destination_url",
        &format!("unix:{}", vmm.dir().join("nobody.sock").display()),
    );
    let migration_sock = vmm.dir().join("m.sock");
    let migration_url = format!("unix:{}", migration_sock.display());
    let receive = url_body("receiver_url", &migration_url);
    c.call(&vmm, "PUT", "vm.snapshot", Some(&snapshot), 404);
    c.call(&vmm, "PUT", "vm.send-migration", Some(&nobody), 404);
    let upgrade = serde_json::json!({ "binary": baton_bin() }).to_string();
    c.call(&vmm, "PUT", "vmm.live-upgrade", Some(&upgrade), 404);
    c.call(
        &vmm,
        "PUT",
        "vmm.live-upgrade",
        Some(r#"{"binary":"baton"}"#),
        400,
    );
    // Nothing was written there yet.
    c.call(&vmm, "PUT", "vm.restore", Some(&restore), 400);
    for (name, field) in [
        ("vm.snapshot", "destination_url"),
        ("vm.send-migration", "destination_url"),
        ("vm.receive-migration", "receiver_url"),
    ] {
        c.call(&vmm, "PUT", name, Some(&url_body(field, "/no/scheme")), 400);
    }

    // A migration being received: only vmm.ping, vm.info and vm.counters are served until it
    // ends; a source that abandons it leaves the baton empty and usable.
    let receiving = in_background(&vmm.socket, "vm.receive-migration", receive.clone());
    wait_for_path(&migration_sock);
    let url: migration::MigrationUrl = migration_url.parse().expect("a unix: URL");
    let mut source = migration::Channel::connect(&url).expect("connect to the receiver");
    c.call(&vmm, "GET", "vmm.ping", None, 200);
    c.call(&vmm, "GET", "vm.info", None, 404);
    for (name, body) in [
        ("vmm.shutdown", None),
        ("vm.delete", None),
        ("vm.create", Some(config.as_str())),
        ("vm.snapshot", Some(snapshot.as_str())),
        ("vm.restore", Some(restore.as_str())),
        ("vm.send-migration", Some(nobody.as_str())),
        ("vm.receive-migration", Some(receive.as_str())),
        ("vm.add-net", Some(r#"{"tap":"tap0"}"#)),
        ("vm.add-disk", Some(r#"{"path":"/x"}"#)),
        ("vm.remove-device", Some(r#"{"id":"disk0"}"#)),
    ] {
        c.call(&vmm, "PUT", name, body, 409);
    }
    source
        .request(migration::Command::Abandon, &[])
        .expect("the receiver takes Abandon");
    let r = receiving.join().expect("receive-migration thread");
    c.check("PUT", "vm.receive-migration", &r, 500);
    c.call(&vmm, "GET", "vm.info", None, 404);

    // Bodies baton refuses.
    c.call(&vmm, "PUT", "vm.create", Some("{not json"), 400);
    let too_big = format!("{{\"pad\":\"{}\"}}", "x".repeat(api::http::MAX_BODY_BYTES));
    c.call(&vmm, "PUT", "vm.create", Some(&too_big), 413);

    // A VM whose kernel is missing is created but does not boot, and stays Created.
    let missing = vmm.dir().join("no-such-kernel");
    // The serial socket outlives this baton: the VM's console moves with it, and its
    // directory must still be there when the destination binds it.
    let files = TempDir::new("openapi");
    let serial = files.path().join("serial.sock");
    c.call(
        &vmm,
        "PUT",
        "vm.create",
        Some(&config_with_kernel(&serial, &missing)),
        204,
    );
    c.call(&vmm, "PUT", "vm.boot", None, 500);
    c.expect_state(&vmm, "Created");
    c.call(&vmm, "PUT", "vm.delete", None, 204);

    // A kernel of its own, which the test removes later to make a reboot fail.
    let kernel = vmm.dir().join("kernel");
    std::fs::copy(baton_tests::guest_bin(), &kernel).expect("copy the test guest");
    let config = config_with_kernel(&serial, &kernel);
    c.call(&vmm, "PUT", "vm.create", Some(&config), 204);
    c.call(&vmm, "PUT", "vm.create", Some(&config), 409);
    c.call(&vmm, "PUT", "vm.add-net", Some(r#"{"turbo":true}"#), 400);
    // A disk comes and goes before boot.
    let image = vmm.dir().join("disk.img");
    std::fs::write(&image, vec![0u8; 4096]).expect("write a disk image");
    let disk = serde_json::json!({"id": "extra", "path": image}).to_string();
    c.call(
        &vmm,
        "PUT",
        "vm.add-disk",
        Some(r#"{"path":"/x","turbo":1}"#),
        400,
    );
    c.call(&vmm, "PUT", "vm.add-disk", Some(&disk), 204);
    c.call(&vmm, "PUT", "vm.remove-device", Some(r#"{"id":5}"#), 400);
    c.call(
        &vmm,
        "PUT",
        "vm.remove-device",
        Some(r#"{"id":"extra"}"#),
        204,
    );
    c.call(
        &vmm,
        "PUT",
        "vm.remove-device",
        Some(r#"{"id":"extra"}"#),
        404,
    );
    c.expect_state(&vmm, "Created");
    for name in [
        "vm.pause",
        "vm.resume",
        "vm.shutdown",
        "vm.reboot",
        "vm.power-button",
    ] {
        c.call(&vmm, "PUT", name, None, 409);
    }
    c.call(&vmm, "PUT", "vm.snapshot", Some(&snapshot), 409);
    c.call(&vmm, "PUT", "vm.send-migration", Some(&nobody), 409);
    c.call(&vmm, "PUT", "vm.restore", Some(&restore), 409);
    c.call(&vmm, "PUT", "vm.receive-migration", Some(&receive), 409);

    c.call(&vmm, "PUT", "vm.boot", None, 204);
    let mut console = vmm.console(&serial);
    console.wait_for(READY, BOOT);
    c.expect_state(&vmm, "Running");
    c.call(&vmm, "GET", "vm.counters", None, 200);
    // Hot-plug: a card and a disk arrive, and the disk is asked back.
    c.call(
        &vmm,
        "PUT",
        "vm.add-net",
        Some(r#"{"tap":"tap0","num_queues":3}"#),
        400,
    );
    c.call(&vmm, "PUT", "vm.add-net", Some(r#"{"tap":"hot0"}"#), 200);
    console.wait_for("hotplug: added", BOOT);
    c.call(&vmm, "PUT", "vm.add-disk", Some(&disk), 200);
    console.wait_for("hotplug: added", BOOT);
    c.call(
        &vmm,
        "PUT",
        "vm.remove-device",
        Some(r#"{"id":"extra"}"#),
        204,
    );
    console.wait_for("hotplug: ejected", BOOT);
    c.call(&vmm, "PUT", "vm.boot", None, 409);
    c.call(&vmm, "PUT", "vm.resume", None, 409);
    // Nobody listens: the VM runs on.
    c.call(&vmm, "PUT", "vm.send-migration", Some(&nobody), 500);
    c.expect_state(&vmm, "Running");

    c.call(&vmm, "PUT", "vm.pause", None, 204);
    c.expect_state(&vmm, "Paused");
    c.call(&vmm, "PUT", "vm.pause", None, 409);
    c.call(&vmm, "PUT", "vm.send-migration", Some(&nobody), 409);
    c.call(&vmm, "PUT", "vm.snapshot", Some(&snapshot), 204);
    c.call(&vmm, "PUT", "vm.snapshot", Some(&snapshot), 409);
    let under_a_file = format!("file://{}", kernel.join("snap").display());
    c.call(
        &vmm,
        "PUT",
        "vm.snapshot",
        Some(&url_body("destination_url", &under_a_file)),
        500,
    );
    c.expect_state(&vmm, "Paused");
    c.call(&vmm, "PUT", "vm.power-button", None, 409);
    c.call(&vmm, "PUT", "vm.boot", None, 409);
    c.call(&vmm, "PUT", "vm.resume", None, 204);

    c.call(&vmm, "PUT", "vm.reboot", None, 204);
    console.wait_for(READY, BOOT);
    c.expect_state(&vmm, "Running");

    c.call(&vmm, "PUT", "vm.shutdown", None, 204);
    c.expect_state(&vmm, "Shutdown");
    c.call(&vmm, "PUT", "vm.shutdown", None, 409);
    c.call(&vmm, "PUT", "vm.reboot", None, 409);
    c.call(&vmm, "PUT", "vm.boot", None, 204);
    c.expect_state(&vmm, "Running");

    // Hot-plug until bus 0 is full: the device that does not fit is refused, and the VM
    // runs on.
    for i in 0..32 {
        let body = serde_json::json!({"id": format!("fill{i}"), "path": image}).to_string();
        let r = vmm.http("PUT", "vm.add-disk", Some(&body));
        if r.status == 500 {
            break;
        }
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    }
    let last = serde_json::json!({"id": "one-too-many", "path": image}).to_string();
    c.call(&vmm, "PUT", "vm.add-disk", Some(&last), 500);
    c.call(&vmm, "PUT", "vm.add-net", Some(r#"{"tap":"hot1"}"#), 500);
    c.expect_state(&vmm, "Running");

    // The VM is stopped for the reboot, and the new one cannot load its kernel.
    std::fs::remove_file(&kernel).expect("remove the kernel");
    c.call(&vmm, "PUT", "vm.reboot", None, 500);
    c.call(&vmm, "PUT", "vm.delete", None, 204);
    c.call(&vmm, "GET", "vm.info", None, 404);

    // A snapshot whose configuration no longer fits its state is refused (the caller's
    // input: 400); one whose serial socket another process serves cannot be built (500).
    let bad = vmm.dir().join("snap-bad");
    std::fs::create_dir(&bad).expect("mkdir");
    for file in ["state.bin", "memory.bin"] {
        std::fs::hard_link(snap.join(file), bad.join(file)).expect("link the snapshot");
    }
    let config: Value = serde_json::from_slice(
        &std::fs::read(snap.join("config.json")).expect("the snapshot's config.json"),
    )
    .expect("config.json is JSON");
    let bad_url = format!("file://{}", bad.display());
    let mut bad_config = config.clone();
    bad_config["cpus"] = serde_json::json!({"boot_vcpus": 2, "max_vcpus": 2});
    std::fs::write(bad.join("config.json"), bad_config.to_string()).expect("write");
    c.call(
        &vmm,
        "PUT",
        "vm.restore",
        Some(&url_body("source_url", &bad_url)),
        400,
    );
    c.call(&vmm, "GET", "vm.info", None, 404);
    let taken = vmm.dir().join("taken.sock");
    let _other = std::os::unix::net::UnixListener::bind(&taken).expect("another serial server");
    let mut bad_config = config;
    bad_config["serial"] = serde_json::json!({"mode": "Socket", "socket": taken});
    std::fs::write(bad.join("config.json"), bad_config.to_string()).expect("write");
    c.call(
        &vmm,
        "PUT",
        "vm.restore",
        Some(&url_body("source_url", &bad_url)),
        500,
    );
    c.call(&vmm, "GET", "vm.info", None, 404);

    // The snapshot itself comes back paused (its kernel file is gone: it is not read again).
    c.call(&vmm, "PUT", "vm.restore", Some(&restore), 204);
    c.expect_state(&vmm, "Paused");
    c.call(&vmm, "PUT", "vm.resume", None, 204);

    // It moves to another baton, and this one ends.
    let dst = ApiVmm::start(&[]);
    let dst_sock = dst.dir().join("m.sock");
    let dst_url = format!("unix:{}", dst_sock.display());
    let receiving = in_background(
        &dst.socket,
        "vm.receive-migration",
        url_body("receiver_url", &dst_url),
    );
    wait_for_path(&dst_sock);
    let stats = c
        .call(
            &vmm,
            "PUT",
            "vm.send-migration",
            Some(&url_body("destination_url", &dst_url)),
            200,
        )
        .expect("200 has a body");
    assert!(stats["iterations"].as_u64() >= Some(1), "{stats}");
    let r = receiving.join().expect("receive-migration thread");
    c.check("PUT", "vm.receive-migration", &r, 204);
    let (status, stderr) = vmm.wait_exit(EXIT);
    assert_eq!(status.code(), Some(0), "{stderr}");
    c.expect_state(&dst, "Running");

    // A live upgrade: a binary that is no baton fails and the VM runs on; baton itself
    // takes it over (the VM paused cannot be handed over).
    let mut dst = dst;
    c.call(&dst, "PUT", "vm.pause", None, 204);
    c.call(&dst, "PUT", "vmm.live-upgrade", Some(&upgrade), 409);
    c.call(&dst, "PUT", "vm.resume", None, 204);
    let not_baton = serde_json::json!({ "binary": "/bin/sleep" }).to_string();
    c.call(&dst, "PUT", "vmm.live-upgrade", Some(&not_baton), 500);
    c.expect_state(&dst, "Running");
    let upgraded = c
        .call(&dst, "PUT", "vmm.live-upgrade", Some(&upgrade), 200)
        .expect("200 has a body");
    dst.follow(upgraded["pid"].as_u64().expect("the new pid") as u32);
    c.expect_state(&dst, "Running");

    c.call(&dst, "PUT", "vmm.shutdown", None, 204);
    let (status, stderr) = dst.wait_exit(EXIT);
    assert_eq!(status.code(), Some(0), "{stderr}");

    // Every documented code was checked, but the ones no test can provoke.
    for ((name, method), op) in &c.doc.operations {
        for code in &op.codes {
            let exempt = NOT_PROVOKED.iter().find(|(n, s, _)| n == name && s == code);
            let seen = c.seen.contains(&(name.clone(), *code));
            match exempt {
                Some((_, _, why)) => assert!(!seen, "{name} {code} is exempt ({why}) yet seen"),
                None => assert!(seen, "{method} {name} documents {code}, never checked"),
            }
        }
    }
    for (name, code, _) in NOT_PROVOKED {
        assert!(
            c.doc.operation(name).1.codes.contains(code),
            "{name} {code} is exempt but not documented"
        );
    }
}

#[test]
fn extractor_reads_the_documents_subset() {
    let text = "\
# comment
servers:
  - url: http://localhost/api/v1
paths:
  /vm.info:
    get:
      description: >
        text: with a colon
        - and a dash
      responses:
        \"200\":
          content:
            application/json:
              schema:
                $ref: \"#/components/schemas/Info\"
        \"404\":
          description: none
components:
  schemas:
    Info:
      required: [a, \"b\"]
      enum: [X, Y]
";
    let doc = Document::parse(text);
    assert_eq!(doc.servers, ["http://localhost/api/v1"]);
    let op = &doc.operations[&("vm.info".to_string(), "GET".to_string())];
    assert_eq!(op.codes, BTreeSet::from([200, 404]));
    assert_eq!(op.ok_schema.as_deref(), Some("Info"));
    assert_eq!(doc.required["Info"], ["a", "b"]);
    assert_eq!(doc.enums["Info"], ["X", "Y"]);
    let bad = entries("a:\n  b: c\n  plain text that goes on\n").unwrap_err();
    assert!(bad.starts_with("line 3:"), "{bad}");
}
