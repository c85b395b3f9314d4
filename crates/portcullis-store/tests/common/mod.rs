//! Test harness: a real `redis-server` on a free loopback port (never the machine's own
//! Redis on 6379), killed on drop.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Path of `redis-server`: the first on `PATH`, then the usual locations.
/// `scripts/test.sh` installs it when missing; the tests never install anything.
pub fn redis_server_binary() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        find_redis_server().unwrap_or_else(|| {
            panic!(
                "redis-server not found on PATH or in /usr/bin, /usr/sbin, /usr/local/bin: \
                 run the suite with scripts/test.sh (which installs it), or install it \
                 yourself (Debian/Ubuntu: apt-get install -y redis-server)"
            )
        })
    })
    .clone()
}

/// `redis-cli` next to the harness's `redis-server` (Debian: package `redis-tools`,
/// installed with `redis-server`).
pub fn redis_cli() -> PathBuf {
    let server = redis_server_binary();
    let sibling = server.with_file_name("redis-cli");
    if sibling.is_file() {
        return sibling;
    }
    PathBuf::from("redis-cli")
}

fn find_redis_server() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/bin", "/usr/sbin", "/usr/local/bin"].map(PathBuf::from))
        .map(|d| d.join("redis-server"))
        .find(|p| p.is_file())
}

/// A free TCP port on 127.0.0.1 (never 6379).
pub fn free_port() -> u16 {
    loop {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = l.local_addr().expect("local addr").port();
        if port != 6379 {
            return port;
        }
    }
}

/// A `redis-server` child process; killed when dropped.
pub struct RedisServer {
    child: Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl RedisServer {
    /// Start on a free port.
    pub fn start() -> Self {
        Self::start_on(free_port())
    }

    /// Start on `port` and wait until it answers PING.
    pub fn start_on(port: u16) -> Self {
        assert_ne!(port, 6379, "never use the machine's own Redis port");
        let dir = tempfile::tempdir().expect("tempdir");
        let child = Command::new(redis_server_binary())
            .args(["--port", &port.to_string()])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .args(["--bind", "127.0.0.1"])
            .args(["--daemonize", "no"])
            .args(["--dir", &dir.path().to_string_lossy()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        let mut server = Self {
            child,
            port,
            _dir: dir,
        };
        server.wait_ready(Duration::from_secs(10));
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Start `redis-server` with `args` (which must include the listening port
    /// options) and wait until `port` accepts TCP connections. For variants such as
    /// `--requirepass`, TLS and `--sentinel` that a plain PING cannot probe.
    pub fn start_with(port: u16, args: &[String]) -> Self {
        assert_ne!(port, 6379, "never use the machine's own Redis port");
        let dir = tempfile::tempdir().expect("tempdir");
        let child = Command::new(redis_server_binary())
            .args(args)
            .args(["--dir", &dir.path().to_string_lossy()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        let mut server = Self {
            child,
            port,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!("redis-server exited early on port {port}: {status}");
            }
            if TcpStream::connect_timeout(
                &([127, 0, 0, 1], port).into(),
                Duration::from_millis(200),
            )
            .is_ok()
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "redis-server on port {port} did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // Give a sentinel or TLS listener a moment past accept().
        std::thread::sleep(Duration::from_millis(200));
        server
    }

    fn wait_ready(&mut self, within: Duration) {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("redis-server exited early on port {}: {status}", self.port);
            }
            if raw_ping(self.port) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server on port {} did not become ready", self.port);
    }

    /// Send a signal (e.g. `libc::SIGSTOP`, `libc::SIGCONT`) to the server process,
    /// with kill(2) (no `kill` binary needed).
    pub fn signal(&self, sig: libc::c_int) {
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: kill(2) has no memory-safety preconditions.
        let rc = unsafe { libc::kill(pid, sig) };
        assert_eq!(
            rc,
            0,
            "kill({pid}, {sig}): {}",
            std::io::Error::last_os_error()
        );
    }

    /// Kill the server and wait until the port is closed.
    pub fn kill(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn raw_ping(port: u16) -> bool {
    let Ok(mut s) =
        TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200))
    else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 7];
    s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

/// Fresh temporary data directory.
pub fn data_dir() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}
