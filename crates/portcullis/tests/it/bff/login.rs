//! OpenID Connect login against a real provider: the redirect, PKCE, state and
//! nonce, the callback, the session cookie, `/auth/me`, identity headers on proxied
//! routes, logout — and the attacks on each step.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::idp::{Idp, IdpOptions};
use crate::harness::{assert_error, client, free_port, run_cli, write_config, Gateway, Upstream};

/// Base64 of 32 bytes, the sessions' encryption key in these tests.
const KEY: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";
pub const APP: &str = "http://app.example.test:5173";

/// A provider and a gateway that logs in with it, an echo upstream behind `/api`.
pub struct Setup {
    pub idp: Idp,
    pub gw: Gateway,
    pub _upstream: Upstream,
    pub _ws: Upstream,
    pub base: String,
}

pub async fn setup(extra_oidc: &str) -> Setup {
    setup_with(IdpOptions::default(), extra_oidc, "portcullis").await
}

/// A provider started with `opts` (its redirect URIs are set here) and a gateway
/// logging in as client `client_id`.
pub async fn setup_with(opts: IdpOptions, extra_oidc: &str, client_id: &str) -> Setup {
    setup_tuned(opts, extra_oidc, client_id, |y| y).await
}

/// As [`setup_with`], with the gateway's YAML passed through `tune` first.
pub async fn setup_tuned(
    mut opts: IdpOptions,
    extra_oidc: &str,
    client_id: &str,
    tune: impl Fn(String) -> String,
) -> Setup {
    let (gw_port, idp_port) = (free_port(), free_port());
    let base = format!("http://127.0.0.1:{gw_port}");
    opts.redirect_uris = vec![format!("{base}/auth/callback")];
    opts.post_logout_uris = vec![format!("{base}/")];
    let idp = Idp::start(idp_port, &opts);
    let upstream = Upstream::echo().await;
    let ws = Upstream::ws_echo().await;
    let routes = format!(
        "  - path: /ws\n    auth: {{authenticators: [web]}}\n    proxy: {{upstream: \"{}\"}}\n  - path: /deadws\n    auth: {{authenticators: [web]}}\n    proxy: {{upstream: \"http://{}\"}}\n",
        ws.url(),
        crate::harness::dead_upstream()
    );
    let gw = Gateway::start(&tune(format!(
        "{}{routes}",
        gateway_yaml(
            gw_port,
            &idp.issuer(),
            &upstream.url(),
            client_id,
            "{{dir}}/data",
            extra_oidc,
        )
    )));
    Setup {
        idp,
        gw,
        _upstream: upstream,
        _ws: ws,
        base,
    }
}

/// A gateway on `port` with the `web` oidc authenticator and `/api` proxied to
/// `upstream` behind it.
pub fn gateway_yaml(
    port: u16,
    issuer: &str,
    upstream: &str,
    client_id: &str,
    data_dir: &str,
    extra_oidc: &str,
) -> String {
    format!(
        r#"
listeners:
  - address: 127.0.0.1:{port}
store: {{data_dir: "{data_dir}"}}
authenticators:
  web:
    oidc:
      issuer: "{issuer}"
      client_id: {client_id}
      client_secret: test-secret-test-secret-test-secret
      public_url: "http://127.0.0.1:{port}"
      allowed_origins: ["{APP}"]
      session: {{encryption_key: "{KEY}", cookie_secure: false}}
{extra_oidc}
routes:
  - path_prefix: /api
    auth: {{authenticators: [web]}}
    proxy: {{upstream: "{upstream}"}}
  - path_prefix: /pub
    public: true
    proxy: {{upstream: "{upstream}"}}
"#
    )
}

/// A browser without JavaScript: one cookie jar (cookies ignore ports, as in
/// browsers), redirects followed by hand.
#[derive(Default)]
pub struct Browser {
    jar: Mutex<BTreeMap<String, String>>,
}

impl Browser {
    pub fn cookie(&self, name: &str) -> Option<String> {
        self.jar.lock().unwrap().get(name).cloned()
    }

    pub fn set_cookie(&self, name: &str, value: &str) {
        self.jar
            .lock()
            .unwrap()
            .insert(name.to_owned(), value.to_owned());
    }

    fn cookie_header(&self) -> String {
        self.jar
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    fn keep(&self, res: &reqwest::Response) {
        let mut jar = self.jar.lock().unwrap();
        for v in res.headers().get_all("set-cookie") {
            let v = v.to_str().unwrap_or_default();
            let pair = v.split(';').next().unwrap_or_default();
            let Some((name, value)) = pair.split_once('=') else {
                continue;
            };
            let expired = v.to_ascii_lowercase().contains("max-age=0")
                || v.to_ascii_lowercase().contains("expires=thu, 01 jan 1970");
            if expired || value.is_empty() {
                jar.remove(name.trim());
            } else {
                jar.insert(name.trim().to_owned(), value.to_owned());
            }
        }
    }

    pub async fn get(&self, url: &str, headers: &[(&str, &str)]) -> reqwest::Response {
        let mut req = client().get(url).header("cookie", self.cookie_header());
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let res = req.send().await.expect("request");
        self.keep(&res);
        res
    }

    pub async fn post_form(&self, url: &str, form: &[(String, String)]) -> reqwest::Response {
        let body = form
            .iter()
            .map(|(k, v)| format!("{}={}", enc(k), enc(v)))
            .collect::<Vec<_>>()
            .join("&");
        let res = client()
            .post(url)
            .header("cookie", self.cookie_header())
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body)
            .send()
            .await
            .expect("post");
        self.keep(&res);
        res
    }

    pub async fn post(&self, url: &str, headers: &[(&str, &str)]) -> reqwest::Response {
        let mut req = client().post(url).header("cookie", self.cookie_header());
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let res = req.send().await.expect("post");
        self.keep(&res);
        res
    }
}

fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn absolute(base: &str, location: &str) -> String {
    if location.starts_with("http://") || location.starts_with("https://") {
        return location.to_owned();
    }
    let origin_end = base[8..].find('/').map_or(base.len(), |i| i + 8);
    format!("{}{}", &base[..origin_end], location)
}

/// The attribute `attr="…"` of the first tag in `html` starting at `from`.
fn attr(tag: &str, attr: &str) -> Option<String> {
    let key = format!("{attr}=\"");
    let start = tag.find(&key)? + key.len();
    let end = tag[start..].find('"')? + start;
    Some(tag[start..end].replace("&amp;", "&"))
}

/// Fills the provider's page: its form's hidden inputs, the user name and any
/// password.
fn form_of(html: &str, user: &str) -> Option<(String, Vec<(String, String)>)> {
    let form_start = html.find("<form")?;
    let form_tag = &html[form_start..form_start + html[form_start..].find('>')?];
    let action = attr(form_tag, "action")?;
    let mut fields = Vec::new();
    let mut rest = &html[form_start..];
    while let Some(i) = rest.find("<input") {
        let end = rest[i..].find('>').map_or(rest.len(), |e| i + e);
        let tag = &rest[i..end];
        if let Some(name) = attr(tag, "name") {
            match name.as_str() {
                "login" => fields.push((name, user.to_owned())),
                "password" => fields.push((name, "any".to_owned())),
                _ => {
                    if tag.contains("type=\"hidden\"") {
                        fields.push((name, attr(tag, "value").unwrap_or_default()));
                    }
                }
            }
        }
        rest = &rest[end..];
    }
    Some((action, fields))
}

/// Follows the login from the provider's redirect to the gateway's callback URL
/// (not fetched): the provider's pages are filled in as `user`.
pub async fn to_callback(
    b: &Browser,
    authorize: &str,
    callback_prefix: &str,
    user: &str,
) -> String {
    let mut url = authorize.to_owned();
    let mut res = b.get(&url, &[]).await;
    for _ in 0..12 {
        if res.status().is_redirection() {
            let loc = res.headers()["location"].to_str().unwrap().to_owned();
            url = absolute(&url, &loc);
            if url.starts_with(callback_prefix) {
                return url;
            }
            res = b.get(&url, &[]).await;
            continue;
        }
        let status = res.status();
        let html = res.text().await.unwrap_or_default();
        let (action, fields) = form_of(&html, user)
            .unwrap_or_else(|| panic!("provider page without a form ({status}): {html}"));
        let target = absolute(&url, &action);
        res = b.post_form(&target, &fields).await;
        url = target;
    }
    panic!("the login did not reach the callback");
}

/// A whole login as `user`: returns the callback's response (302 with the cookie).
pub async fn login(s: &Setup, b: &Browser, user: &str, query: &str) -> reqwest::Response {
    let res = b.get(&format!("{}/auth/login{query}", s.base), &[]).await;
    assert_eq!(res.status(), 302, "login: {}", s.gw.logs());
    let authorize = res.headers()["location"].to_str().unwrap().to_owned();
    let callback = to_callback(b, &authorize, &format!("{}/auth/callback", s.base), user).await;
    b.get(&callback, &[]).await
}

fn set_cookies(res: &reqwest::Response) -> Vec<String> {
    res.headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn login_gives_a_session_that_proxied_routes_see() {
    let s = setup("").await;
    let b = Browser::default();
    // The redirect to the provider: code + PKCE S256, state, nonce, our callback.
    let res = b
        .get(&format!("{}/auth/login?next=/app%3Fx%3D1", s.base), &[])
        .await;
    assert_eq!(res.status(), 302);
    let authorize = res.headers()["location"].to_str().unwrap().to_owned();
    assert!(
        authorize.starts_with(&format!("{}/auth?", s.idp.issuer())),
        "{authorize}"
    );
    for part in [
        "response_type=code",
        "code_challenge_method=S256",
        "code_challenge=",
        "state=",
        "nonce=",
        "client_id=portcullis",
        "scope=openid+profile+email+offline_access",
    ] {
        assert!(authorize.contains(part), "{part} missing in {authorize}");
    }
    assert!(authorize.contains(&format!(
        "redirect_uri={}",
        enc(&format!("{}/auth/callback", s.base))
    )));
    assert_eq!(res.headers()["cache-control"], "no-store");
    let callback = to_callback(
        &b,
        &authorize,
        &format!("{}/auth/callback", s.base),
        "alice",
    )
    .await;
    let res = b.get(&callback, &[]).await;
    assert_eq!(res.status(), 302, "{}", s.gw.logs());
    assert_eq!(res.headers()["location"], format!("{}/app?x=1", s.base));
    let cookies = set_cookies(&res);
    let session = cookies
        .iter()
        .find(|c| c.starts_with("sid="))
        .expect("session cookie");
    assert!(session.contains("; HttpOnly"), "{session}");
    assert!(session.contains("; SameSite=Lax"), "{session}");
    assert!(session.contains("; Path=/"), "{session}");
    assert!(session.contains("; Max-Age=86400"), "{session}");
    assert!(!session.contains("Domain"), "{session}");
    let sid = b.cookie("sid").expect("sid kept");
    assert_eq!(sid.len(), 43, "a session id of 256 random bits");
    assert!(b.cookie("sid_login").is_none(), "binding cookie cleared");

    for path in ["/auth/me", "/whoami/me"] {
        let me = b.get(&format!("{}{path}", s.base), &[]).await;
        assert_eq!(me.status(), 200);
        assert_eq!(me.headers()["cache-control"], "no-store");
        let me: serde_json::Value = me.json().await.unwrap();
        assert_eq!(me["sub"], "alice");
        assert_eq!(me["email"], "alice@example.test");
        assert_eq!(me["name"], "User alice");
        assert_eq!(me["picture"], "https://img.example.test/alice.png");
    }

    // Proxied: the user's identity as headers, a client's own copy dropped, the
    // session cookie never reaches the upstream (other cookies do).
    b.set_cookie("pref", "1");
    let res = b
        .get(&format!("{}/api/x", s.base), &[("x-user-sub", "admin")])
        .await;
    assert_eq!(res.status(), 200, "{}", s.gw.logs());
    let echo: serde_json::Value = res.json().await.unwrap();
    assert_eq!(echo["headers"]["x-user-sub"], serde_json::json!(["alice"]));
    assert_eq!(
        echo["headers"]["x-user-email"],
        serde_json::json!(["alice@example.test"])
    );
    assert_eq!(
        echo["headers"]["x-user-name"],
        serde_json::json!(["User alice"])
    );
    let cookie = echo["headers"]["cookie"].to_string();
    assert!(cookie.contains("pref=1"), "{cookie}");
    assert!(
        !cookie.contains(&sid),
        "the session id reached the upstream: {cookie}"
    );

    // A public route never receives the session either (nor the login cookie).
    b.set_cookie("sid_login", "planted");
    let echo: serde_json::Value = b
        .get(&format!("{}/pub/x", s.base), &[])
        .await
        .json()
        .await
        .unwrap();
    let cookie = echo["headers"]["cookie"].to_string();
    assert!(cookie.contains("pref=1"), "{cookie}");
    assert!(
        !cookie.contains(&sid) && !cookie.contains("planted"),
        "{cookie}"
    );

    // An address the provider did not verify is not sent as identity.
    let b2 = Browser::default();
    assert_eq!(login(&s, &b2, "unverified-zed", "").await.status(), 302);
    let echo: serde_json::Value = b2
        .get(&format!("{}/api/x", s.base), &[])
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        echo["headers"]["x-user-sub"],
        serde_json::json!(["unverified-zed"])
    );
    assert!(echo["headers"]["x-user-email"].is_null(), "{echo}");
    let me: serde_json::Value = b2
        .get(&format!("{}/auth/me", s.base), &[])
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(me["email_verified"], false);

    // Without a session, or with a forged one: 401.
    let anon = client()
        .get(format!("{}/api/x", s.base))
        .send()
        .await
        .unwrap();
    assert_error(anon, 401, "UNAUTHORIZED").await;
    let forged = client()
        .get(format!("{}/auth/me", s.base))
        .header("cookie", format!("sid={}", "A".repeat(43)))
        .send()
        .await
        .unwrap();
    assert_error(forged, 401, "UNAUTHORIZED").await;
    // Nothing secret in the gateway's log.
    let logs = s.gw.logs();
    assert!(!logs.contains(&sid), "the session id was logged");
    assert!(
        !logs.contains("test-secret-test-secret"),
        "the client secret was logged"
    );
}

#[tokio::test]
async fn login_state_is_single_use_and_bound_to_its_browser() {
    let s = setup("").await;
    let callback_prefix = format!("{}/auth/callback", s.base);
    // A callback replayed: the second use is refused.
    let b = Browser::default();
    let res = b.get(&format!("{}/auth/login", s.base), &[]).await;
    let authorize = res.headers()["location"].to_str().unwrap().to_owned();
    let callback = to_callback(&b, &authorize, &callback_prefix, "bob").await;
    assert_eq!(b.get(&callback, &[]).await.status(), 302);
    let replay = b.get(&callback, &[]).await;
    assert_error(replay, 400, "BAD_REQUEST").await;

    // A callback URL taken to another browser (login CSRF, a stolen code): refused,
    // and the state is spent.
    let victim = Browser::default();
    let res = victim.get(&format!("{}/auth/login", s.base), &[]).await;
    let authorize = res.headers()["location"].to_str().unwrap().to_owned();
    let callback = to_callback(&victim, &authorize, &callback_prefix, "carol").await;
    let attacker = Browser::default();
    assert_error(attacker.get(&callback, &[]).await, 400, "BAD_REQUEST").await;
    assert_error(victim.get(&callback, &[]).await, 400, "BAD_REQUEST").await;
    assert!(victim.cookie("sid").is_none());

    // Missing, unknown and junk states; another issuer named in the response.
    for q in [
        "",
        "?code=x",
        "?state=unknown&code=x",
        "?state=%00%0a&code=x",
    ] {
        let res = b.get(&format!("{callback_prefix}{q}"), &[]).await;
        assert_error(res, 400, "BAD_REQUEST").await;
    }
    let b2 = Browser::default();
    let res = b2.get(&format!("{}/auth/login", s.base), &[]).await;
    let authorize = res.headers()["location"].to_str().unwrap().to_owned();
    let callback = to_callback(&b2, &authorize, &callback_prefix, "dave").await;
    let forged_iss = callback.replace(
        &format!("iss={}", enc(&s.idp.issuer())),
        "iss=http%3A%2F%2Fevil.test",
    );
    assert_ne!(forged_iss, callback, "the provider sends iss (RFC 9207)");
    assert_error(b2.get(&forged_iss, &[]).await, 400, "BAD_REQUEST").await;
    assert!(b2.cookie("sid").is_none());
}

#[tokio::test]
async fn no_open_redirect_and_allowed_origins_only() {
    let s = setup("").await;
    let b = Browser::default();
    let login = format!("{}/auth/login", s.base);
    for q in [
        "?next=//evil.test",
        "?next=https://evil.test",
        "?next=/%5Cevil.test",
        "?next=javascript:alert(1)",
        "?next=/a%0d%0aSet-Cookie:x=y",
        "?frontend_host=evil.test",
        "?frontend_host=app.example.test:444",
        "?frontend_host=app.example.test%40evil.test",
        "?frontend_host=https://evil.test",
    ] {
        let res = b.get(&format!("{login}{q}"), &[]).await;
        assert!(res.headers().get("location").is_none(), "{q}");
        assert_error(res, 400, "BAD_REQUEST").await;
    }
    for (h, v) in [
        ("origin", "https://evil.test"),
        ("referer", "https://evil.test/x"),
    ] {
        let res = b.get(&login, &[(h, v)]).await;
        assert_error(res, 400, "BAD_REQUEST").await;
    }
    // An allowed origin, port included: the login returns there.
    let res = login_to(
        &s,
        &b,
        "erin",
        "?next=/home&frontend_host=app.example.test:5173",
    )
    .await;
    assert_eq!(res.headers()["location"], format!("{APP}/home"));
}

async fn login_to(s: &Setup, b: &Browser, user: &str, query: &str) -> reqwest::Response {
    let res = login(s, b, user, query).await;
    assert_eq!(res.status(), 302, "{}", s.gw.logs());
    res
}

#[tokio::test]
async fn a_new_login_replaces_the_session_and_logout_ends_it() {
    let s = setup("").await;
    let b = Browser::default();
    login_to(&s, &b, "frank", "").await;
    let first = b.cookie("sid").unwrap();
    // A session id planted before login (fixation) or held from before is
    // replaced, and the old one stops working.
    login_to(&s, &b, "frank", "").await;
    let second = b.cookie("sid").unwrap();
    assert_ne!(first, second);
    let old = client()
        .get(format!("{}/auth/me", s.base))
        .header("cookie", format!("sid={first}"))
        .send()
        .await
        .unwrap();
    assert_error(old, 401, "UNAUTHORIZED").await;

    // Logout from another site is refused; from the app it ends the session.
    let logout = format!("{}/auth/logout", s.base);
    let res = b.post(&logout, &[("origin", "https://evil.test")]).await;
    assert_error(res, 403, "CSRF_REJECTED").await;
    // `Origin: null` (a sandboxed frame) is refused even with an allowed Referer.
    let res = b
        .post(
            &logout,
            &[("origin", "null"), ("referer", &format!("{}/app", s.base))],
        )
        .await;
    assert_error(res, 403, "CSRF_REJECTED").await;
    assert_eq!(
        b.get(&format!("{}/auth/me", s.base), &[]).await.status(),
        200
    );
    let res = b.post(&logout, &[("origin", &s.base)]).await;
    assert_eq!(res.status(), 204);
    assert!(set_cookies(&res)
        .iter()
        .any(|c| c.starts_with("sid=;") && c.contains("Max-Age=0")));
    let after = client()
        .get(format!("{}/auth/me", s.base))
        .header("cookie", format!("sid={second}"))
        .send()
        .await
        .unwrap();
    assert_error(after, 401, "UNAUTHORIZED").await;
    // The grant was revoked at the provider (its refresh token).
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.idp.count("grant.revoked", None) < 1 {
        assert!(
            Instant::now() < deadline,
            "tokens not revoked: {}\n{:?}",
            s.gw.logs(),
            s.idp.events()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // GET is not a logout.
    assert_eq!(b.get(&logout, &[]).await.status(), 405);
}

#[tokio::test]
async fn rp_initiated_logout_redirects_to_the_provider() {
    let s = setup("      end_session: true\n").await;
    let b = Browser::default();
    login_to(&s, &b, "gina", "").await;
    let res = b
        .post(&format!("{}/auth/logout", s.base), &[("origin", &s.base)])
        .await;
    assert_eq!(res.status(), 302);
    let loc = res.headers()["location"].to_str().unwrap();
    assert!(
        loc.starts_with(&format!("{}/session/end?", s.idp.issuer())),
        "{loc}"
    );
    assert!(loc.contains("id_token_hint="), "{loc}");
    assert!(loc.contains(&format!(
        "post_logout_redirect_uri={}",
        enc(&format!("{}/", s.base))
    )));
}

#[tokio::test]
async fn a_dead_provider_is_a_502_and_the_gateway_stays_up() {
    // The provider is never started: discovery fails.
    let (gw_port, idp_port) = (free_port(), free_port());
    let yaml = format!(
        r#"
listeners:
  - address: 127.0.0.1:{gw_port}
authenticators:
  web:
    oidc:
      issuer: "http://127.0.0.1:{idp_port}"
      client_id: portcullis
      client_secret: s
      public_url: "http://127.0.0.1:{gw_port}"
      timeout: 2s
      session: {{encryption_key: "{KEY}", cookie_secure: false}}
routes:
  - path: /ok
    public: true
    respond: {{body: ok}}
"#
    );
    let gw = Gateway::start(&yaml);
    let res = client()
        .get(format!("http://127.0.0.1:{gw_port}/auth/login"))
        .send()
        .await
        .unwrap();
    let body = assert_error(res, 502, "IDP_ERROR").await;
    assert!(!body.to_string().contains(&idp_port.to_string()), "{body}");
    let ok = client()
        .get(format!("http://127.0.0.1:{gw_port}/ok"))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    drop(gw);
}

#[test]
fn config_mistakes_fail_closed_with_their_fields() {
    let dir = tempfile::tempdir().unwrap();
    let base = |oidc: &str| {
        format!(
            "listeners: [{{address: 127.0.0.1:0}}]\nauthenticators:\n  web:\n    oidc:\n      issuer: http://127.0.0.1:1\n      client_id: c\n      public_url: http://127.0.0.1:2\n{oidc}routes:\n  - path: /x\n    respond: {{body: x}}\n"
        )
    };
    for (oidc, field) in [
        // an empty secret never authenticates to the provider
        (format!("      client_secret: \"\"\n      session: {{encryption_key: \"{KEY}\"}}\n"), "oidc.client_secret"),
        ("      client_secret: s\n".to_owned(), "oidc.session.encryption_key"),
        ("      client_secret: s\n      session: {encryption_key: short}\n".to_owned(), "oidc.session.encryption_key"),
        (format!("      client_secret: s\n      allowed_origins: [\"*\"]\n      session: {{encryption_key: \"{KEY}\"}}\n"), "oidc.allowed_origins[0]"),
        (format!("      client_secret: s\n      scopes: profile\n      session: {{encryption_key: \"{KEY}\"}}\n"), "oidc.scopes"),
        (format!("      client_secret: s\n      authorize_params: {{redirect_uri: http://evil.test}}\n      session: {{encryption_key: \"{KEY}\"}}\n"), "oidc.authorize_params.redirect_uri"),
        (format!("      client_secret: s\n      session: {{encryption_key: \"{KEY}\", cookie_same_site: none, cookie_secure: false}}\n"), "oidc.session.cookie_name"),
        // an ID token's audience (the client) is not an API audience
        (format!("      client_secret: s\n      bearer_audience: [c]\n      session: {{encryption_key: \"{KEY}\"}}\n"), "oidc.bearer_audience"),
    ] {
        let path = write_config(dir.path(), &base(&oidc));
        let (code, out, err) = run_cli(&["check", "-c", &path.display().to_string()], &[]);
        assert_ne!(code, 0, "accepted: {oidc}\n{out}");
        assert!(err.contains(field), "{field} not named for {oidc}:\n{err}");
        assert!(!err.contains(KEY), "the key was printed");
    }
}

#[tokio::test]
async fn login_endpoints_are_rate_limited_per_client() {
    let s = setup("      rate_limits: [{requests: 3, per: 1m}]\n").await;
    let login_url = format!("{}/auth/login", s.base);
    for _ in 0..3 {
        assert_eq!(client().get(&login_url).send().await.unwrap().status(), 302);
    }
    let res = client().get(&login_url).send().await.unwrap();
    assert!(res.headers().contains_key("retry-after"));
    assert_error(res, 429, "RATE_LIMITED").await;
    // The callback and logout share the budget; the session user does not.
    let res = client()
        .get(format!("{}/auth/callback?state=x&code=y", s.base))
        .send()
        .await
        .unwrap();
    assert_error(res, 429, "RATE_LIMITED").await;
    let me = client()
        .get(format!("{}/auth/me", s.base))
        .send()
        .await
        .unwrap();
    assert_error(me, 401, "UNAUTHORIZED").await;
}

#[tokio::test]
async fn client_secret_post_and_a_refused_code() {
    let s = setup_with(
        IdpOptions {
            client_secret_post: true,
            ..Default::default()
        },
        "      client_auth: client_secret_post\n",
        "portcullis",
    )
    .await;
    let b = Browser::default();
    assert_eq!(
        login(&s, &b, "hank", "").await.status(),
        302,
        "{}",
        s.gw.logs()
    );
    // A code the provider never issued (or one already used): the exchange fails.
    let b2 = Browser::default();
    let res = b2.get(&format!("{}/auth/login", s.base), &[]).await;
    let authorize = res.headers()["location"].to_str().unwrap().to_owned();
    let callback = to_callback(&b2, &authorize, &format!("{}/auth/callback", s.base), "ivy").await;
    let code = callback
        .split(['?', '&'])
        .find_map(|p| p.strip_prefix("code="))
        .unwrap()
        .to_owned();
    let forged = callback.replace(&format!("code={code}"), "code=forged-code");
    assert_error(b2.get(&forged, &[]).await, 502, "IDP_ERROR").await;
    assert!(b2.cookie("sid").is_none());
}

#[tokio::test]
async fn sessions_roll_while_used_and_end_at_their_limits() {
    let s = setup_tuned(IdpOptions::default(), "", "portcullis", |y| {
        y.replace(
            "cookie_secure: false}",
            "cookie_secure: false, idle_ttl: 2s, max_lifetime: 5s}",
        )
    })
    .await;
    let me = |sid: String| {
        client()
            .get(format!("{}/auth/me", s.base))
            .header("cookie", format!("sid={sid}"))
            .send()
    };
    // Used every 500 ms for 3 s: alive past its 2 s idle time.
    let b = Browser::default();
    assert_eq!(login(&s, &b, "jane", "").await.status(), 302);
    let start = Instant::now();
    let sid = b.cookie("sid").unwrap();
    while start.elapsed() < Duration::from_secs(3) {
        assert_eq!(me(sid.clone()).await.unwrap().status(), 200);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Left alone for longer than idle_ttl: gone.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_error(me(sid).await.unwrap(), 401, "UNAUTHORIZED").await;

    // Used all the time, it still ends at max_lifetime.
    let b = Browser::default();
    assert_eq!(login(&s, &b, "kate", "").await.status(), 302);
    let start = Instant::now();
    let sid = b.cookie("sid").unwrap();
    let mut ended = false;
    while start.elapsed() < Duration::from_secs(9) {
        if me(sid.clone()).await.unwrap().status() == 401 {
            ended = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(ended, "the session outlived max_lifetime");
    assert!(start.elapsed() >= Duration::from_secs(3), "ended too early");
}
