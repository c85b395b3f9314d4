//! Config: `check`, `routes`, `${VAR}` interpolation and startup failures.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::*;

const HEAD: &str = "listeners:\n  - address: 127.0.0.1:0\n";

/// Writes `yaml` to a fresh file and runs `portcullis check -c` on it.
fn check(yaml: &str) -> (i32, String, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), yaml);
    let p = path.display().to_string();
    let (code, out, err) = run_cli(&["check", "-c", &p], &[]);
    (code, out, err, p)
}

/// `check` fails with one error line at `file:line:` that mentions every one of `needles`.
#[track_caller]
fn assert_check_error(yaml: &str, line: u32, needles: &[&str]) {
    let (code, out, err, path) = check(yaml);
    assert_eq!(code, 1, "stdout: {out}\nstderr: {err}");
    assert!(!out.contains("OK"), "{out}");
    let prefix = format!("error: {path}:{line}:");
    let hit = err.lines().find(|l| l.starts_with(&prefix));
    let Some(hit) = hit else {
        panic!("no error at {path}:{line}: in stderr:\n{err}");
    };
    for n in needles {
        assert!(hit.contains(n), "{n:?} missing from {hit:?}");
    }
}

#[test]
fn check_accepts_a_valid_file() {
    let yaml = format!(
        r#"{HEAD}admin:
  address: 127.0.0.1:0
server:
  max_request_body: 1MiB
  shutdown_grace: 5s
auth:
  open: true
  tokens: ["${{PORTCULLIS_TEST_TOKEN_UNSET_Q:-}}"]
upstreams:
  api:
    url: http://127.0.0.1:9/base
routes:
  - name: api
    hosts: [api.example.com, "*.api.example.com"]
    path_prefix: /api
    methods: [GET, POST]
    proxy:
      upstream: api
      strip_prefix: true
      timeouts: {{connect: 2s, response: 1m, idle: 500ms}}
  - name: user
    path: /users/{{id}}
    proxy: {{upstream: "http://127.0.0.1:9", rewrite: "/v2/{{id}}"}}
  - name: fn
    path_prefix: /fn/{{name}}
    proxy: {{upstream: "http://{{name}}:8080", strip_prefix: true}}
  - name: hello
    path: /hello
    respond: {{body: hi}}
  - name: moved
    path: /old/{{*rest}}
    redirect: {{to: "/new/{{rest}}", status: 308}}
"#
    );
    let (code, out, err, path) = check(&yaml);
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
    assert!(out.contains("OK"), "{out}");
    assert!(out.contains(&path), "{out}");
    assert!(out.contains("5 routes"), "{out}");
    assert!(!err.contains("error"), "{err}");
}

#[test]
fn check_reports_unknown_field_with_line() {
    let yaml =
        format!("{HEAD}routes:\n  - path: /x\n    proxi:\n      upstream: http://127.0.0.1:1\n");
    assert_check_error(&yaml, 5, &["proxi", "unknown field"]);
}

#[test]
fn check_reports_bad_duration_with_line_and_field() {
    let yaml = format!(
        "{HEAD}routes:\n  - path: /x\n    proxy:\n      upstream: http://127.0.0.1:1\n      timeouts: {{connect: soon}}\n"
    );
    assert_check_error(&yaml, 7, &["connect", "soon", "duration"]);
}

#[test]
fn check_reports_unset_variable_with_line_and_field() {
    let yaml = format!(
        "{HEAD}routes:\n  - path: /x\n    proxy:\n      upstream: ${{PORTCULLIS_TEST_SURELY_UNSET_VAR}}\n"
    );
    assert_check_error(
        &yaml,
        6,
        &["upstream", "PORTCULLIS_TEST_SURELY_UNSET_VAR", "not set"],
    );
}

#[test]
fn check_reports_bad_upstream_url() {
    let yaml = format!("{HEAD}routes:\n  - path: /x\n    proxy:\n      upstream: ftp://x\n");
    assert_check_error(&yaml, 6, &["routes[0].proxy.upstream", "ftp://x"]);
}

#[test]
fn check_reports_route_without_or_with_two_actions() {
    let none = format!("{HEAD}routes:\n  - name: a\n    path: /x\n");
    assert_check_error(&none, 4, &["routes[0]", "exactly one"]);
    let two = format!(
        "{HEAD}routes:\n  - name: a\n    path: /x\n    respond: {{body: a}}\n    redirect: {{to: /y}}\n"
    );
    assert_check_error(&two, 4, &["routes[0]", "exactly one"]);
}

#[test]
fn check_reports_bad_listener_address() {
    let yaml =
        "listeners:\n  - address: localhost:http\nroutes:\n  - path: /x\n    respond: {body: a}\n";
    assert_check_error(yaml, 2, &["listeners[0].address", "localhost:http"]);
}

#[test]
fn check_reports_bad_path() {
    let yaml = format!("{HEAD}routes:\n  - path: /ok\n    respond: {{body: a}}\n  - path: x\n    respond: {{body: a}}\n");
    assert_check_error(&yaml, 6, &["routes[1].path", "must start with `/`"]);
    let yaml = format!("{HEAD}routes:\n  - path_prefix: api\n    respond: {{body: a}}\n");
    assert_check_error(&yaml, 4, &["routes[0].path_prefix"]);
}

#[test]
fn check_reports_uncaptured_template_param() {
    let yaml = format!(
        "{HEAD}routes:\n  - path: /u/{{id}}\n    proxy:\n      upstream: http://127.0.0.1:1\n      rewrite: /v2/{{uid}}\n"
    );
    assert_check_error(&yaml, 7, &["routes[0].proxy.rewrite", "{uid}"]);
    let yaml = format!(
        "{HEAD}routes:\n  - path: /u/{{id}}\n    proxy:\n      upstream: http://{{name}}:8080\n"
    );
    assert_check_error(&yaml, 6, &["routes[0].proxy.upstream", "{name}"]);
    let yaml = format!("{HEAD}routes:\n  - path: /u\n    redirect: {{to: \"/v/{{id}}\"}}\n");
    assert_check_error(&yaml, 5, &["routes[0].redirect.to", "{id}"]);
}

#[test]
fn check_reports_conflicting_routes() {
    let yaml = format!(
        "{HEAD}routes:\n  - path: /u/{{id}}\n    respond: {{body: a}}\n  - path: /u/{{name}}\n    respond: {{body: b}}\n"
    );
    assert_check_error(&yaml, 6, &["routes[1]", "conflicts", "/u/{id}"]);
    // The same path twice is a duplicate.
    let yaml = format!(
        "{HEAD}routes:\n  - path: /same\n    respond: {{body: a}}\n  - path: /same\n    respond: {{body: b}}\n"
    );
    assert_check_error(&yaml, 6, &["routes[1]", "/same"]);
}

#[test]
fn check_reports_bad_host_pattern() {
    let yaml = format!(
        "{HEAD}routes:\n  - path: /x\n    hosts: [ok.com, \"a.*.com\"]\n    respond: {{body: a}}\n"
    );
    assert_check_error(&yaml, 5, &["routes[0].hosts[1]", "a.*.com"]);
}

#[test]
fn check_reports_bad_method() {
    let yaml = format!(
        "{HEAD}routes:\n  - path: /x\n    methods: [GET, \"FETCH!\"]\n    respond: {{body: a}}\n"
    );
    assert_check_error(&yaml, 5, &["routes[0].methods[1]", "FETCH!"]);
}

#[test]
fn check_reports_every_semantic_error() {
    let yaml = r#"listeners:
  - address: not-an-address
routes:
  - path: /a
    proxy: {upstream: "ftp://x"}
  - path: b
    respond: {body: b}
  - path: /c
  - path: /d
    hosts: ["*bad.com"]
    respond: {body: d}
  - path: /e
    methods: ["G E T"]
    respond: {body: e}
"#;
    let (code, out, err, path) = check(yaml);
    assert_eq!(code, 1, "stdout: {out}\nstderr: {err}");
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert!(errors.len() >= 6, "expected every error:\n{err}");
    for (line, field) in [
        (2, "listeners[0].address"),
        (5, "routes[0].proxy.upstream"),
        (6, "routes[1].path"),
        (8, "routes[2]"),
        (10, "routes[3].hosts[0]"),
        (13, "routes[4].methods[0]"),
    ] {
        let prefix = format!("error: {path}:{line}:");
        assert!(
            errors
                .iter()
                .any(|l| l.starts_with(&prefix) && l.contains(field)),
            "no {field} error at line {line}:\n{err}"
        );
    }
}

#[test]
fn check_missing_file_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nope.yaml").display().to_string();
    let (code, out, err) = run_cli(&["check", "-c", &path], &[]);
    assert_eq!(code, 1, "stdout: {out}\nstderr: {err}");
    assert!(err.contains(&path), "{err}");
    assert!(err.contains("cannot read"), "{err}");
    assert!(!out.contains("OK"), "{out}");
}

#[tokio::test]
async fn env_interpolation_reaches_runtime_and_values_stay_intact() {
    let up = Upstream::echo().await;
    let yaml = r#"listeners:
  - address: ${PC_IT_ADDR:-127.0.0.1:0}
auth:
  tokens: ["${PC_IT_TOKEN}"]
routes:
  - name: api
    path_prefix: /api
    proxy:
      upstream: ${PC_IT_UPSTREAM}
  - name: msg
    path: /msg
    public: true
    respond:
      body: ${PC_IT_MSG}
      headers:
        x-default: ${PC_IT_SURELY_UNSET:-fallback value}
        x-empty-default: "${PC_IT_EMPTY:-was empty}"
        x-dollar: "cost $$5"
"#;
    let token = "tok#en: with spaces";
    let msg = "hello # not a comment: really, {x: 1}";
    let url = up.url();
    let gw = Gateway::start_with_env(
        yaml,
        &[
            ("PC_IT_UPSTREAM", url.as_str()),
            ("PC_IT_TOKEN", token),
            ("PC_IT_MSG", msg),
            ("PC_IT_EMPTY", ""),
        ],
    );
    let c = client();

    let res = c.get(gw.url("/msg")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["x-default"], "fallback value");
    assert_eq!(res.headers()["x-empty-default"], "was empty");
    assert_eq!(res.headers()["x-dollar"], "cost $5");
    assert_eq!(res.text().await.unwrap(), msg);

    // Upstream and token from the environment.
    let res = c.get(gw.url("/api/x")).send().await.unwrap();
    assert_error(res, 401, "UNAUTHORIZED").await;
    let res = c
        .get(gw.url("/api/x"))
        .bearer_auth("tok")
        .send()
        .await
        .unwrap();
    assert_error(res, 401, "UNAUTHORIZED").await;
    let res = c
        .get(gw.url("/api/x"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["path"], "/api/x");
    assert_eq!(body["headers"]["host"][0], up.addr.to_string());
}

#[test]
fn routes_prints_the_table_in_match_order() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        r#"{HEAD}routes:
  - name: catchall
    path_prefix: /
    respond: {{body: any}}
  - name: api
    path_prefix: /api/v1
    proxy: {{upstream: "http://127.0.0.1:9/base"}}
  - name: user
    path: /users/{{id}}
    redirect: {{to: "/u/{{id}}", status: 301}}
  - name: status
    path: /status
    methods: [GET, POST]
    respond: {{body: ok, status: 204}}
  - name: wild
    hosts: ["*.example.com"]
    path: /
    respond: {{body: w}}
  - name: exact-host
    hosts: [x.com]
    path: /
    respond: {{body: x}}
  - name: fn
    path_prefix: /fn/{{name}}
    proxy: {{upstream: "http://{{name}}:8080"}}
"#
    );
    let path = write_config(dir.path(), &yaml);
    let (code, out, err) = run_cli(&["routes", "-c", &path.display().to_string()], &[]);
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
    let lines: Vec<&str> = out.lines().filter(|l| !l.trim().is_empty()).collect();
    let header: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(
        header,
        ["NAME", "HOST", "PATH", "METHODS", "AUTH", "ACTION"],
        "{out}"
    );
    let rows: Vec<Vec<&str>> = lines[1..]
        .iter()
        .map(|l| l.split_whitespace().collect())
        .collect();
    let names: Vec<&str> = rows.iter().map(|r| r[0]).collect();
    assert_eq!(
        names,
        [
            "exact-host",
            "wild",
            "status",
            "user",
            "fn",
            "api",
            "catchall"
        ],
        "{out}"
    );
    let row = |name: &str| rows.iter().find(|r| r[0] == name).unwrap().join(" ");
    assert_eq!(row("exact-host"), "exact-host x.com / * open respond 200");
    assert_eq!(row("wild"), "wild *.example.com / * open respond 200");
    assert_eq!(row("status"), "status * /status GET,POST open respond 204");
    assert_eq!(row("user"), "user * /users/{id} * open redirect 301");
    assert_eq!(
        row("api"),
        "api * /api/v1/** * open proxy http://127.0.0.1:9/base"
    );
    assert_eq!(row("catchall"), "catchall * /** * open respond 200");
    assert!(row("fn").contains("/fn/{name}/**"), "{out}");
}

#[test]
fn routes_fails_on_an_invalid_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        dir.path(),
        &format!("{HEAD}routes:\n  - path: x\n    respond: {{body: a}}\n"),
    );
    let (code, out, err) = run_cli(&["routes", "-c", &path.display().to_string()], &[]);
    assert_eq!(code, 1, "stdout: {out}\nstderr: {err}");
    assert!(!out.contains("NAME"), "{out}");
    assert!(err.contains("routes[0].path"), "{err}");
}

#[test]
fn run_with_an_invalid_config_exits_quickly_with_the_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        dir.path(),
        &format!("{HEAD}routes:\n  - path: /x\n    proxy:\n      upstream: ftp://nowhere\n"),
    );
    let started = Instant::now();
    let mut child = Command::new(BIN)
        .arg("run")
        .arg("-c")
        .arg(&path)
        .env_remove("PORTCULLIS_WORKERS")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        // It exits in milliseconds; the bound only tells "exits" from "serves".
        if started.elapsed() > Duration::from_secs(15) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("gateway with an invalid config still running after 15s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!status.success(), "{status}");
    assert!(
        stderr.contains(&format!("{}:6:", path.display())),
        "stderr: {stderr}\nstdout: {stdout}"
    );
    assert!(stderr.contains("routes[0].proxy.upstream"), "{stderr}");
    assert!(!stdout.contains("\"listening\""), "{stdout}");

    // A YAML syntax error, too.
    let path = write_config(dir.path(), "listeners: [\n  - address: 127.0.0.1:0\n");
    let (code, _out, err) = run_cli(&["run", "-c", &path.display().to_string()], &[]);
    assert_ne!(code, 0);
    assert!(err.contains(&path.display().to_string()), "{err}");
}

#[test]
fn check_rejects_credentials_in_upstream_urls() {
    let dir = tempfile::tempdir().unwrap();
    let p = write_config(
        dir.path(),
        "listeners:\n  - address: 127.0.0.1:0\nroutes:\n  - path: /x\n    proxy:\n      upstream: http://user:pw@127.0.0.1:1\n",
    );
    let (code, _, err) = run_cli(&["check", "-c", p.to_str().unwrap()], &[]);
    assert_eq!(code, 1);
    assert!(
        err.contains("routes[0].proxy.upstream") && err.contains("credentials"),
        "{err}"
    );
    assert!(
        !err.contains("pw@"),
        "the password must not be echoed: {err}"
    );
}
