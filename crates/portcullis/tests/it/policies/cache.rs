//! Response cache: MISS/HIT, freshness rules, Vary, principals, coalescing, purge.

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};

use crate::harness::*;

type Res = hyper::Response<http_body_util::combinators::BoxBody<Bytes, Infallible>>;

/// An upstream scripted by the query: `cc=` Cache-Control, `vary=` Vary,
/// `cookie=1` Set-Cookie, `delay_ms=`, `size=` body length. The body is
/// `n=<count> lang=<accept-language>` (padded to `size`), `n` counting the requests
/// this upstream answered.
async fn scripted() -> Upstream {
    let count = Arc::new(AtomicUsize::new(0));
    Upstream::serve(false, move |req| {
        let count = count.clone();
        async move {
            let n = count.fetch_add(1, Ordering::SeqCst) + 1;
            let mut res = hyper::Response::builder().header("content-type", "text/plain");
            let mut size = 0usize;
            for pair in req.uri().query().unwrap_or("").split('&') {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                let v = v.replace("%20", " ").replace("%2C", ",");
                match k {
                    "cc" => res = res.header("cache-control", v),
                    "vary" => res = res.header("vary", v),
                    "cookie" => res = res.header("set-cookie", "session=abc"),
                    "delay_ms" => {
                        tokio::time::sleep(Duration::from_millis(v.parse().unwrap())).await
                    }
                    "size" => size = v.parse().unwrap(),
                    _ => {}
                }
            }
            let lang = req
                .headers()
                .get("accept-language")
                .map(|v| v.to_str().unwrap().to_owned())
                .unwrap_or_default();
            let mut body = format!("n={n} lang={lang} method={}", req.method());
            while body.len() < size {
                body.push('.');
            }
            let res: Res = res.body(Full::new(Bytes::from(body)).boxed()).unwrap();
            res
        }
    })
    .await
}

fn config(upstream: &str, extra_routes: &str) -> String {
    format!(
        r#"
listeners:
  - address: 127.0.0.1:0
admin:
  address: 127.0.0.1:0
  token: "admin-S3cret"
authenticators:
  alice: {{static_token: {{tokens: ["alice-token"], principal: alice}}}}
  bob: {{static_token: {{tokens: ["bob-token"], principal: bob}}}}
routes:
  - name: private
    path_prefix: /private
    auth: {{authenticators: [alice, bob]}}
    cache: {{ttl: 60s}}
    proxy: {{upstream: "{upstream}"}}
  - name: shared
    path_prefix: /shared
    auth: {{authenticators: [alice, bob]}}
    cache: {{ttl: 60s, shared: true}}
    proxy: {{upstream: "{upstream}"}}
  - name: cookies
    path_prefix: /cookies
    public: true
    cache: {{cache_set_cookie: true}}
    proxy: {{upstream: "{upstream}"}}
  - name: small
    path_prefix: /small
    public: true
    cache: {{max_body: 100}}
    proxy: {{upstream: "{upstream}"}}
  - name: swr
    path_prefix: /swr
    public: true
    cache: {{ttl: 1s, stale_while_revalidate: 60s}}
    proxy: {{upstream: "{upstream}"}}
{extra_routes}  - name: cached
    path_prefix: /
    public: true
    cache: {{ttl: 60s}}
    proxy: {{upstream: "{upstream}"}}
"#
    )
}

fn x_cache(res: &reqwest::Response) -> String {
    res.headers()
        .get("x-cache")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

/// Sends a GET and returns (X-Cache, Age, body).
async fn get(
    c: &reqwest::Client,
    url: &str,
    headers: &[(&str, &str)],
) -> (String, Option<u64>, String) {
    let mut req = c.get(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let res = req.send().await.unwrap();
    assert_eq!(res.status(), 200, "{url}");
    let xc = x_cache(&res);
    let age = res
        .headers()
        .get("age")
        .map(|v| v.to_str().unwrap().parse().unwrap());
    (xc, age, res.text().await.unwrap())
}

#[tokio::test]
async fn miss_then_hit_with_age_and_head_from_the_get_entry() {
    let up = scripted().await;
    let gw = Gateway::start(&config(&up.url(), ""));
    let c = client();
    let url = gw.url("/items?id=1");
    let (xc, age, first) = get(&c, &url, &[]).await;
    assert_eq!((xc.as_str(), age), ("MISS", None));
    assert!(first.starts_with("n=1 "), "{first}");
    let (xc, age, second) = get(&c, &url, &[]).await;
    assert_eq!(xc, "HIT");
    assert!(age.is_some_and(|a| a < 60), "{age:?}");
    assert_eq!(second, first);

    // HEAD is answered from the GET's entry, with its length.
    let res = c.head(&url).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(x_cache(&res), "HIT");
    assert_eq!(
        res.headers()["content-length"].to_str().unwrap(),
        first.len().to_string()
    );
    assert_eq!(up.requests.load(Ordering::SeqCst), 1);

    // Another query is another entry.
    let (xc, _, other) = get(&c, &gw.url("/items?id=2"), &[]).await;
    assert_eq!(xc, "MISS");
    assert!(other.starts_with("n=2 "), "{other}");

    // Age grows with time in the cache.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, age, _) = get(&c, &url, &[]).await;
        if age.unwrap() >= 1 {
            break;
        }
        assert!(Instant::now() < deadline, "Age never grew");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(up.requests.load(Ordering::SeqCst), 2);
    gw.wait_metrics(&[
        r#"portcullis_cache_requests_total{route="cached",result="hit"}"#,
        r#"portcullis_cache_requests_total{route="cached",result="miss"} 2"#,
    ])
    .await;
}

#[tokio::test]
async fn upstream_directives_that_forbid_storing_are_honoured() {
    let up = scripted().await;
    let gw = Gateway::start(&config(&up.url(), ""));
    let c = client();
    let mut expected = 0;
    for cc in [
        "no-store",
        "private",
        "max-age=0",
        "no-cache",
        "public,%20no-store",
    ] {
        let url = gw.url(&format!("/d?cc={cc}"));
        for _ in 0..2 {
            let (xc, _, _) = get(&c, &url, &[]).await;
            assert_eq!(xc, "MISS", "{cc}");
            expected += 1;
        }
        assert_eq!(up.requests.load(Ordering::SeqCst), expected, "{cc}");
    }
    // `max-age` on its own is stored.
    let url = gw.url("/d?cc=max-age=30");
    assert_eq!(get(&c, &url, &[]).await.0, "MISS");
    assert_eq!(get(&c, &url, &[]).await.0, "HIT");
}

#[tokio::test]
async fn s_maxage_beats_ttl_and_max_age() {
    let up = scripted().await;
    let gw = Gateway::start(&config(&up.url(), ""));
    let c = client();
    // ttl 60 s and max-age 60 s, but s-maxage (for shared caches) says 1 s.
    let url = gw.url("/s?cc=max-age=60,%20s-maxage=1");
    assert_eq!(get(&c, &url, &[]).await.0, "MISS");
    assert_eq!(get(&c, &url, &[]).await.0, "HIT");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (xc, _, _) = get(&c, &url, &[]).await;
        if xc == "MISS" {
            break;
        }
        assert!(Instant::now() < deadline, "s-maxage=1 entry never expired");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn set_cookie_responses_are_not_stored_unless_the_route_allows() {
    let up = scripted().await;
    let gw = Gateway::start(&config(&up.url(), ""));
    let c = client();
    let url = gw.url("/cookie?cookie=1");
    assert_eq!(get(&c, &url, &[]).await.0, "MISS");
    assert_eq!(get(&c, &url, &[]).await.0, "MISS");
    assert_eq!(up.requests.load(Ordering::SeqCst), 2);
    // `cache_set_cookie: true`.
    let url = gw.url("/cookies?cookie=1");
    assert_eq!(get(&c, &url, &[]).await.0, "MISS");
    assert_eq!(get(&c, &url, &[]).await.0, "HIT");
    assert_eq!(up.requests.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn vary_keeps_variants_apart() {
    let up = scripted().await;
    let gw = Gateway::start(&config(&up.url(), ""));
    let c = client();
    let url = gw.url("/v?vary=Accept-Language");
    let en = [("accept-language", "en")];
    let fr = [("accept-language", "fr")];
    let (xc, _, body_en) = get(&c, &url, &en).await;
    assert_eq!(xc, "MISS");
    assert!(body_en.contains("lang=en"), "{body_en}");
    let (xc, _, body_fr) = get(&c, &url, &fr).await;
    assert_eq!(xc, "MISS");
    assert!(body_fr.contains("lang=fr"), "{body_fr}");
    let (xc, _, again_en) = get(&c, &url, &en).await;
    assert_eq!((xc.as_str(), again_en.as_str()), ("HIT", body_en.as_str()));
    let (xc, _, again_fr) = get(&c, &url, &fr).await;
    assert_eq!((xc.as_str(), again_fr.as_str()), ("HIT", body_fr.as_str()));
    // No Accept-Language at all is a third variant.
    assert_eq!(get(&c, &url, &[]).await.0, "MISS");
    assert_eq!(up.requests.load(Ordering::SeqCst), 3);
    // `Vary: *` is never stored.
    let url = gw.url("/v?vary=*");
    assert_eq!(get(&c, &url, &[]).await.0, "MISS");
    assert_eq!(get(&c, &url, &[]).await.0, "MISS");
}

#[tokio::test]
async fn principals_never_see_each_others_responses_unless_shared() {
    let up = scripted().await;
    let gw = Gateway::start(&config(&up.url(), ""));
    let c = client();
    let url = gw.url("/private/me");
    let alice = [("authorization", "Bearer alice-token")];
    let bob = [("authorization", "Bearer bob-token")];
    let (xc, _, a1) = get(&c, &url, &alice).await;
    assert_eq!(xc, "MISS");
    let (xc, _, b1) = get(&c, &url, &bob).await;
    assert_eq!(xc, "MISS", "bob must not get alice's entry");
    assert_ne!(a1, b1);
    assert_eq!(get(&c, &url, &alice).await.2, a1);
    assert_eq!(get(&c, &url, &bob).await.2, b1);
    assert_eq!(up.requests.load(Ordering::SeqCst), 2);
    // Without credentials: 401, never a cached answer.
    let res = c.get(&url).send().await.unwrap();
    assert_error(res, 401, "UNAUTHORIZED").await;

    // `shared: true`: one entry for every principal.
    let url = gw.url("/shared/catalog");
    let (xc, _, a) = get(&c, &url, &alice).await;
    assert_eq!(xc, "MISS");
    let (xc, _, b) = get(&c, &url, &bob).await;
    assert_eq!((xc.as_str(), b.as_str()), ("HIT", a.as_str()));
    assert_eq!(up.requests.load(Ordering::SeqCst), 3);
}

/// On a route without auth the gateway cannot tell whose credential it passed on:
/// a response to a request with `Authorization` is stored only when it says so
/// (`public`, `s-maxage`, `must-revalidate`), so one caller never gets another's.
#[tokio::test]
async fn credentials_on_a_public_route_keep_responses_private() {
    let up = scripted().await;
    let gw = Gateway::start(&config(&up.url(), ""));
    let c = client();
    let url = gw.url("/mine");
    let alice = [("authorization", "Bearer upstream-checks-this")];
    let (xc, _, a) = get(&c, &url, &alice).await;
    assert_eq!(xc, "MISS");
    let (xc, _, b) = get(&c, &url, &[]).await;
    assert_eq!(
        xc, "MISS",
        "an anonymous caller got the credentialed response"
    );
    assert_ne!(a, b);
    // The anonymous response was stored; it is what the path serves (the route
    // has no auth, so the gateway keys no credential).
    let (xc, _, body) = get(&c, &url, &alice).await;
    assert_eq!((xc.as_str(), body.as_str()), ("HIT", b.as_str()));
    // `Cache-Control: public` from the upstream allows it.
    let url = gw.url("/open?cc=public");
    assert_eq!(get(&c, &url, &alice).await.0, "MISS");
    assert_eq!(get(&c, &url, &[]).await.0, "HIT");
}

#[tokio::test]
async fn concurrent_misses_make_one_upstream_request() {
    let up = scripted().await;
    let gw = Gateway::start(&config(&up.url(), ""));
    let c = client();
    let url = gw.url("/slow?delay_ms=500");
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let c = c.clone();
        let url = url.clone();
        tasks.push(tokio::spawn(async move { get(&c, &url, &[]).await }));
    }
    let mut misses = 0;
    let mut bodies = std::collections::HashSet::new();
    for t in tasks {
        let (xc, _, body) = t.await.unwrap();
        if xc == "MISS" {
            misses += 1;
        } else {
            assert_eq!(xc, "HIT");
        }
        bodies.insert(body);
    }
    assert_eq!(up.requests.load(Ordering::SeqCst), 1);
    assert_eq!(misses, 1);
    assert_eq!(bodies.len(), 1);
}

#[tokio::test]
async fn uncacheable_leader_lets_the_waiting_requests_through() {
    let up = scripted().await;
    let gw = Gateway::start(&config(&up.url(), ""));
    let c = client();
    let url = gw.url("/nostore?delay_ms=200&cc=no-store");
    let mut tasks = Vec::new();
    for _ in 0..5 {
        let c = c.clone();
        let url = url.clone();
        tasks.push(tokio::spawn(async move { get(&c, &url, &[]).await }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().0, "MISS");
    }
    assert_eq!(up.requests.load(Ordering::SeqCst), 5);
}

/// The admin listener's envelopes carry no request id.
async fn assert_admin_error(res: reqwest::Response, status: u16, code: &str) {
    assert_eq!(res.status().as_u16(), status);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["error"]["code"], code, "{body}");
}

#[tokio::test]
async fn admin_purge_by_path_and_by_route() {
    let up = scripted().await;
    let gw = Gateway::start(&config(&up.url(), ""));
    let c = client();
    let a = gw.url("/p/a?x=1");
    let b = gw.url("/p/b");
    for url in [&a, &b] {
        assert_eq!(get(&c, url, &[]).await.0, "MISS");
        assert_eq!(get(&c, url, &[]).await.0, "HIT");
    }
    // The admin token is required.
    let res = c.delete(gw.admin_url("/admin/cache")).send().await.unwrap();
    assert_admin_error(res, 401, "UNAUTHORIZED").await;
    let res = c
        .delete(gw.admin_url("/admin/cache?route=nope"))
        .bearer_auth("admin-S3cret")
        .send()
        .await
        .unwrap();
    assert_admin_error(res, 404, "NOT_FOUND").await;

    // One path: the other stays.
    let res = c
        .delete(gw.admin_url("/admin/cache?route=cached&path=%2Fp%2Fa%3Fx%3D1"))
        .bearer_auth("admin-S3cret")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(get(&c, &a, &[]).await.0, "MISS");
    assert_eq!(get(&c, &b, &[]).await.0, "HIT");

    // The whole route.
    let res = c
        .delete(gw.admin_url("/admin/cache?route=cached"))
        .bearer_auth("admin-S3cret")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(get(&c, &a, &[]).await.0, "MISS");
    assert_eq!(get(&c, &b, &[]).await.0, "MISS");

    // Everything.
    let res = c
        .delete(gw.admin_url("/admin/cache"))
        .bearer_auth("admin-S3cret")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(get(&c, &b, &[]).await.0, "MISS");
    assert_eq!(up.requests.load(Ordering::SeqCst), 6);
}

#[tokio::test]
async fn other_methods_bypass_the_cache() {
    let up = scripted().await;
    let gw = Gateway::start(&config(&up.url(), ""));
    let c = client();
    for _ in 0..2 {
        let res = c.post(gw.url("/post")).body("x").send().await.unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(x_cache(&res), "BYPASS");
    }
    assert_eq!(up.requests.load(Ordering::SeqCst), 2);
    // A POST does not fill the entry a GET reads.
    assert_eq!(get(&c, &gw.url("/post"), &[]).await.0, "MISS");
    gw.wait_metrics(&[r#"portcullis_cache_requests_total{route="cached",result="bypass"} 2"#])
        .await;
}

#[tokio::test]
async fn client_no_cache_is_served_from_cache_and_no_store_is_not_stored() {
    let up = scripted().await;
    let gw = Gateway::start(&config(&up.url(), ""));
    let c = client();
    let url = gw.url("/cc");
    // A client's no-store: fetched, not stored.
    assert_eq!(
        get(&c, &url, &[("cache-control", "no-store")]).await.0,
        "MISS"
    );
    assert_eq!(get(&c, &url, &[]).await.0, "MISS");
    // A client cannot force a refetch.
    assert_eq!(
        get(&c, &url, &[("cache-control", "no-cache")]).await.0,
        "HIT"
    );
    assert_eq!(
        get(&c, &url, &[("cache-control", "max-age=0")]).await.0,
        "HIT"
    );
    assert_eq!(up.requests.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn bodies_over_max_body_pass_through_uncached() {
    let up = scripted().await;
    let gw = Gateway::start(&config(&up.url(), ""));
    let c = client();
    let url = gw.url("/small/big?size=5000");
    for _ in 0..2 {
        let (xc, _, body) = get(&c, &url, &[]).await;
        assert_eq!(xc, "MISS");
        assert_eq!(body.len(), 5000);
    }
    let url = gw.url("/small/tiny?size=50");
    assert_eq!(get(&c, &url, &[]).await.0, "MISS");
    assert_eq!(get(&c, &url, &[]).await.0, "HIT");
}

#[tokio::test]
async fn stale_while_revalidate_serves_stale_while_one_request_refreshes() {
    let up = scripted().await;
    let gw = Gateway::start(&config(&up.url(), ""));
    let c = client();
    let url = gw.url("/swr/x?delay_ms=300");
    assert_eq!(get(&c, &url, &[]).await.0, "MISS");
    // Wait for the 1 s ttl to pass (condition: no longer a HIT).
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut refresher = None;
    while refresher.is_none() {
        assert!(Instant::now() < deadline, "entry never went stale");
        let c2 = c.clone();
        let u2 = url.clone();
        // The first request after expiry refreshes (MISS, slow); others get STALE.
        let task = tokio::spawn(async move { get(&c2, &u2, &[]).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        if task.is_finished() {
            let (xc, _, _) = task.await.unwrap();
            assert_eq!(xc, "HIT");
            tokio::time::sleep(Duration::from_millis(100)).await;
        } else {
            refresher = Some(task);
        }
    }
    let (xc, _, body) = get(&c, &url, &[]).await;
    assert_eq!(xc, "STALE");
    assert!(body.starts_with("n=1 "), "{body}");
    let (xc, _, body) = refresher.unwrap().await.unwrap();
    assert_eq!(xc, "MISS");
    assert!(body.starts_with("n=2 "), "{body}");
    let (xc, _, body) = get(&c, &url, &[]).await;
    assert_eq!(xc, "HIT");
    assert!(body.starts_with("n=2 "), "{body}");
    gw.wait_metrics(&[r#"portcullis_cache_requests_total{route="swr",result="stale"}"#])
        .await;
}

#[tokio::test]
async fn cluster_scope_stores_in_the_store() {
    let up = scripted().await;
    let extra = format!(
        "  - name: cluster\n    path_prefix: /cluster\n    public: true\n    cache: {{scope: cluster}}\n    proxy: {{upstream: \"{}\"}}\n",
        up.url()
    );
    let gw = Gateway::start(&config(&up.url(), &extra));
    let c = client();
    let url = gw.url("/cluster/a?vary=Accept-Language");
    assert_eq!(get(&c, &url, &[("accept-language", "en")]).await.0, "MISS");
    // The store write happens after the body: wait for it.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (xc, _, body) = get(&c, &url, &[("accept-language", "en")]).await;
        if xc == "HIT" {
            assert!(body.contains("lang=en"), "{body}");
            break;
        }
        assert!(Instant::now() < deadline, "never a HIT");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before = up.requests.load(Ordering::SeqCst);
    assert_eq!(get(&c, &url, &[("accept-language", "fr")]).await.0, "MISS");
    let res = c
        .delete(gw.admin_url("/admin/cache?route=cluster"))
        .bearer_auth("admin-S3cret")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let body: serde_json::Value = res.json().await.unwrap();
    assert!(
        body["store_entries_deleted"].as_u64().unwrap() >= 2,
        "{body}"
    );
    assert_eq!(get(&c, &url, &[("accept-language", "en")]).await.0, "MISS");
    assert_eq!(up.requests.load(Ordering::SeqCst), before + 2);
}

#[test]
fn cache_and_compression_settings_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let p = write_config(
        dir.path(),
        "listeners: [{address: \"127.0.0.1:0\"}]\ndefaults:\n  cache: {ttl: 0s}\nroutes:\n  - path_prefix: /\n    public: true\n    cache: {max_body: 0}\n    compression: {algorithms: [lz4]}\n    proxy: {upstream: \"http://127.0.0.1:9\"}\n  - path: /other\n    public: true\n    cache: true\n    proxy: {upstream: \"http://127.0.0.1:9\"}\n",
    );
    let (code, _, err) = run_cli(&["check", "-c", p.to_str().unwrap()], &[]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("routes[0].cache.max_body"), "{err}");
    assert!(
        err.contains("routes[0].compression.algorithms[0]") && err.contains("lz4"),
        "{err}"
    );
    // `cache: true` takes the built-in defaults, not `defaults.cache`'s settings.
    assert!(!err.contains("routes[1]"), "{err}");
}

/// A leader whose client stops reading must not stall the requests waiting on it:
/// once its response head is in, they wait at most a second before going
/// upstream themselves.
#[tokio::test]
async fn a_slow_reader_does_not_stall_the_others() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = scripted().await;
    let extra = format!(
        "  - name: big\n    path_prefix: /big\n    public: true\n    cache: {{max_body: 64MiB}}\n    proxy: {{upstream: \"{}\"}}\n",
        up.url()
    );
    let gw = Gateway::start(&config(&up.url(), &extra));
    let path = "/big/file?size=16777216";
    let mut slow = tcp_connect(gw.addr()).await;
    slow.write_all(format!("GET {path} HTTP/1.1\r\nHost: gw.test\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut head = [0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(10), slow.read(&mut head))
        .await
        .expect("head in time")
        .unwrap();
    assert!(String::from_utf8_lossy(&head[..n]).starts_with("HTTP/1.1 200"));
    // The slow client reads nothing more; another client asks for the same URL.
    let started = Instant::now();
    let res = client()
        .get(gw.url(path))
        .header("host", "gw.test")
        .send()
        .await
        .unwrap();
    let body = res.bytes().await.unwrap();
    assert_eq!(body.len(), 16_777_216);
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "waited {:?} behind a slow reader",
        started.elapsed()
    );
    drop(slow);
}

/// `Vary` on a header the gateway sets (X-Forwarded-*, header transforms) would key
/// variants by the client's copy, not the value the upstream saw: never stored.
#[tokio::test]
async fn responses_varying_on_gateway_set_headers_are_not_stored() {
    let up = scripted().await;
    let extra = format!(
        "  - name: tenant\n    path_prefix: /tenant\n    public: true\n    headers: {{request: {{set: {{x-client: \"{{client_ip}}\"}}}}}}\n    cache: {{ttl: 60s}}\n    proxy: {{upstream: \"{}\"}}\n",
        up.url()
    );
    let gw = Gateway::start(&config(&up.url(), &extra));
    let c = client();
    for url in [
        gw.url("/v?vary=X-Forwarded-For"),
        gw.url("/v?vary=X-Real-IP"),
        gw.url("/tenant/t?vary=X-Client"),
    ] {
        assert_eq!(get(&c, &url, &[]).await.0, "MISS", "{url}");
        assert_eq!(get(&c, &url, &[]).await.0, "MISS", "{url} was stored");
    }
    // A header the client sends as it is (Accept-Language) still varies normally.
    let url = gw.url("/v?vary=Accept-Language");
    assert_eq!(get(&c, &url, &[("accept-language", "de")]).await.0, "MISS");
    assert_eq!(get(&c, &url, &[("accept-language", "de")]).await.0, "HIT");
}

/// A shared cache never serves a `must-revalidate` or `s-maxage` response stale.
#[tokio::test]
async fn must_revalidate_is_never_served_stale() {
    let up = scripted().await;
    let gw = Gateway::start(&config(&up.url(), ""));
    let c = client();
    let url = gw.url("/swr/mr?cc=max-age=1%2C%20must-revalidate");
    assert_eq!(get(&c, &url, &[]).await.0, "MISS");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (xc, _, _) = get(&c, &url, &[]).await;
        assert_ne!(xc, "STALE");
        if xc == "MISS" {
            break;
        }
        assert!(Instant::now() < deadline, "never expired");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// On an `auth.optional` route whose authenticator reads a cookie, an
/// `Authorization` header is not the route's credential: it reaches the upstream
/// unchecked, so a response to it is not stored for everyone.
#[tokio::test]
async fn an_unverified_authorization_keeps_the_response_private() {
    let up = scripted().await;
    let gw = Gateway::start(&format!(
        r#"listeners: [{{address: "127.0.0.1:0"}}]
authenticators:
  session:
    jwt:
      algorithms: [HS256]
      secret: "cache-secret-0123456789abcdef012"
      token_sources: {{header: false, cookie: session}}
routes:
  - path_prefix: /
    auth: {{authenticators: [session], optional: true, forward_credential: true}}
    cache: {{ttl: 60s}}
    proxy: {{upstream: "{}"}}
"#,
        up.url()
    ));
    let c = client();
    let url = gw.url("/feed");
    let (xc, _, mine) = get(&c, &url, &[("authorization", "Basic dXNlcjpwdw==")]).await;
    assert_eq!(xc, "MISS");
    let (xc, _, theirs) = get(&c, &url, &[]).await;
    assert_eq!(
        xc, "MISS",
        "an anonymous caller got a credentialed response"
    );
    assert_ne!(mine, theirs);
}
