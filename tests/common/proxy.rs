//! A TCP proxy in front of the test S3 server, to take the server away and bring it back
//! (same data, same port) and to inject transient faults, without touching moto.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

pub struct Proxy {
    pub addr: SocketAddr,
    upstream: SocketAddr,
    /// Every `fail_every`-th new connection gets a 503 and is closed (0: never).
    fail_every: u64,
    pub faults: Arc<AtomicU64>,
    running: Option<Running>,
}

struct Running {
    /// Seen by the acceptor and by every pipe thread, which then close their sockets.
    stop: Arc<AtomicBool>,
    pipes: Arc<Mutex<Vec<JoinHandle<()>>>>,
    acceptor: JoinHandle<()>,
}

impl Proxy {
    pub fn start(upstream: SocketAddr, fail_every: u64) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut proxy = Proxy {
            addr: listener.local_addr().unwrap(),
            upstream,
            fail_every,
            faults: Arc::default(),
            running: None,
        };
        proxy.serve(listener);
        proxy
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The server goes away: no new connections, and every open one is cut.
    pub fn stop(&mut self) {
        if let Some(running) = self.running.take() {
            running.stop.store(true, Ordering::SeqCst);
            running.acceptor.join().expect("proxy acceptor panicked");
            for pipe in running.pipes.lock().unwrap().drain(..) {
                let _ = pipe.join();
            }
        }
    }

    /// The server is back, on the same port, with the same data behind it.
    pub fn restart(&mut self) {
        assert!(self.running.is_none());
        let listener = TcpListener::bind(self.addr).unwrap();
        self.serve(listener);
    }

    fn serve(&mut self, listener: TcpListener) {
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let pipes: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let (upstream, fail_every, faults) = (self.upstream, self.fail_every, self.faults.clone());
        let acceptor = {
            let (stop, pipes) = (stop.clone(), pipes.clone());
            std::thread::spawn(move || {
                let mut accepted = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    let Ok((client, _)) = listener.accept() else {
                        std::thread::sleep(Duration::from_millis(2));
                        continue;
                    };
                    accepted += 1;
                    if fail_every > 0 && accepted % fail_every == 1 {
                        faults.fetch_add(1, Ordering::SeqCst);
                        std::thread::spawn(move || reply_503(client));
                        continue;
                    }
                    let Ok(server) = TcpStream::connect(upstream) else {
                        continue;
                    };
                    let (Ok(client2), Ok(server2)) = (client.try_clone(), server.try_clone())
                    else {
                        continue;
                    };
                    let mut pipes = pipes.lock().unwrap();
                    pipes.retain(|p| !p.is_finished());
                    pipes.push(pipe(client, server, stop.clone()));
                    pipes.push(pipe(server2, client2, stop.clone()));
                }
            })
        };
        self.running = Some(Running {
            stop,
            pipes,
            acceptor,
        });
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Copy `from` to `to` until either side closes or the proxy stops; the thread owns both
/// handles, so the sockets close when it ends (no descriptor outlives its connection).
fn pipe(mut from: TcpStream, mut to: TcpStream, stop: Arc<AtomicBool>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let _ = from.set_nonblocking(false);
        let _ = from.set_read_timeout(Some(Duration::from_millis(50)));
        let mut buf = [0u8; 64 * 1024];
        while !stop.load(Ordering::SeqCst) {
            match from.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => break,
            }
        }
        if stop.load(Ordering::SeqCst) {
            let _ = from.shutdown(Shutdown::Both);
            let _ = to.shutdown(Shutdown::Both);
        } else {
            let _ = to.shutdown(Shutdown::Write);
        }
    })
}

/// A transient server error: read the start of the request, answer 503, close.
fn reply_503(mut client: TcpStream) {
    client
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut buf = [0u8; 4096];
    let _ = client.read(&mut buf);
    let _ = client.write_all(
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    );
    let _ = client.shutdown(Shutdown::Both);
}
