//! Plain-HTTP/1.1 connections to the backend beside the agent, driven by
//! the task that reads their responses.
//!
//! hyper-util's pooled client runs every connection in a task of its own
//! and hands each body frame to the reading task through a one-slot
//! channel: two task wake-ups per SSE event, usually across worker threads
//! (futex wake, context switch). On a 256-token stream that was most of the
//! relay's cost (`scripts/bench/profile`: `finish_task_switch` and spin
//! unlocks at the top). Here the connection future is polled inline by
//! whoever polls the request or the body, so a frame moves from the socket
//! to the client in one task, and everything the socket already holds is
//! drained in one poll.
//!
//! An idle connection is not polled; it is checked when taken from the
//! pool (a closed one resolves at once and is dropped), and a request lost
//! to a close that raced it is retried by the caller on a new connection.

use std::collections::VecDeque;
use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::Stream;
use http::{Request, Response, Uri};
use http_body_util::Full;
use hyper::body::{Body as _, Incoming};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use llmesh_mesh::StreamError;
use tokio::net::TcpStream;

type Connection = http1::Connection<TokioIo<TcpStream>, Full<Bytes>>;

/// Why a request to the backend failed.
#[derive(Debug, thiserror::Error)]
pub enum InlineError {
    /// The TCP connection could not be made (refused, unresolvable, timed out).
    #[error("cannot connect: {0}")]
    Connect(String),
    /// The connection failed while the request was on it.
    #[error(transparent)]
    Http(#[from] hyper::Error),
    /// The connection ended before the response head.
    #[error("connection closed before the response head")]
    Closed,
}

impl InlineError {
    /// Whether the request was lost to a connection that was already
    /// closing: the backend never read it, and a new connection will do.
    pub fn is_stale(&self) -> bool {
        match self {
            InlineError::Connect(_) => false,
            InlineError::Closed => true,
            InlineError::Http(err) => {
                if err.is_incomplete_message() || err.is_canceled() || err.is_closed() {
                    return true;
                }
                let mut source = std::error::Error::source(err);
                while let Some(cause) = source {
                    if let Some(io) = cause.downcast_ref::<std::io::Error>() {
                        use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset};
                        return matches!(io.kind(), ConnectionReset | BrokenPipe | ConnectionAborted);
                    }
                    source = cause.source();
                }
                false
            }
        }
    }
}

/// One HTTP/1.1 connection: the request handle and the connection future
/// that must be polled for anything to move.
struct Leased {
    sender: http1::SendRequest<Full<Bytes>>,
    connection: Connection,
    /// The connection future resolved: the socket is finished with.
    done: bool,
    /// The pool shard of the thread that opened it, whose reactor its
    /// socket is registered with: it goes back there when idle.
    home: usize,
}

impl Leased {
    /// Polls the connection future once; true once it has resolved.
    fn drive(&mut self, cx: &mut Context<'_>) -> Result<bool, hyper::Error> {
        if self.done {
            return Ok(true);
        }
        match Pin::new(&mut self.connection).poll(cx) {
            Poll::Ready(result) => {
                self.done = true;
                result.map(|()| true)
            }
            Poll::Pending => Ok(false),
        }
    }

    /// Ready for a request: the connection is idle and still open.
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), InlineError>> {
        if let Poll::Ready(ready) = self.sender.poll_ready(cx) {
            return Poll::Ready(ready.map_err(InlineError::from));
        }
        if self.drive(cx)? {
            return Poll::Ready(Err(InlineError::Closed));
        }
        self.sender.poll_ready(cx).map_err(InlineError::from)
    }
}

struct Idle {
    leased: Box<Leased>,
    since: Instant,
}

/// Idle connections to one backend, most recently used last, in one
/// shard per thread: a connection's socket belongs to the reactor of the
/// thread that opened it, and used from another thread every read would
/// wake a task across threads (see `http_server::threads`).
pub struct InlinePool {
    authority: http::uri::Authority,
    /// The `Host` header every request carries, built once.
    host: http::HeaderValue,
    /// The base URL's path (no trailing `/`), before every request's path.
    prefix: String,
    connect_timeout: Duration,
    idle_timeout: Duration,
    max_idle: usize,
    idle: Vec<Mutex<VecDeque<Idle>>>,
}

/// Pool shards: more than the connection threads of a typical box, so
/// each thread usually has its own.
const SHARDS: usize = 16;

/// This thread's shard. The workers of a multi-threaded runtime share one
/// reactor, and so shard 0: a connection one of them opened is as cheap
/// to use from the others. Each other thread (a connection thread, with
/// a runtime of its own) has a shard of its own.
fn shard_of_this_thread() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SHARD: usize = match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
            Ok(tokio::runtime::RuntimeFlavor::MultiThread) | Err(_) => 0,
            Ok(_) => 1 + NEXT.fetch_add(1, Ordering::Relaxed) % (SHARDS - 1),
        };
    }
    SHARD.with(|shard| *shard)
}

impl InlinePool {
    /// A pool for `base` (an `http://` URL).
    pub fn new(base: &str, connect_timeout: Duration) -> Result<Arc<InlinePool>, String> {
        let uri: Uri = base.parse().map_err(|e| format!("bad backend URL '{base}': {e}"))?;
        let authority = uri.authority().cloned().ok_or_else(|| format!("backend URL '{base}' has no host"))?;
        let host = http::HeaderValue::from_str(authority.as_str())
            .map_err(|e| format!("backend URL '{base}': bad host for a Host header: {e}"))?;
        Ok(Arc::new(InlinePool {
            authority,
            host,
            prefix: uri.path().trim_end_matches('/').to_string(),
            connect_timeout,
            idle_timeout: Duration::from_secs(90),
            max_idle: 256,
            idle: (0..SHARDS).map(|_| Mutex::new(VecDeque::new())).collect(),
        }))
    }

    /// The `host:port` requests carry in their `Host` header.
    pub fn host(&self) -> &http::HeaderValue {
        &self.host
    }

    /// The HTTP/1.1 origin-form target of `path` on this backend: the
    /// base URL's path, then `path` (no scheme or host: those go in the
    /// connection and the `Host` header).
    pub fn origin_form(&self, path: &str) -> Result<Uri, http::uri::InvalidUri> {
        if self.prefix.is_empty() { Uri::try_from(path) } else { Uri::try_from(format!("{}{path}", self.prefix)) }
    }

    async fn connect(&self) -> Result<Box<Leased>, InlineError> {
        let address = match self.authority.port_u16() {
            Some(_) => self.authority.to_string(),
            None => format!("{}:80", self.authority.host()),
        };
        let stream = tokio::time::timeout(self.connect_timeout, TcpStream::connect(&address))
            .await
            .map_err(|_| InlineError::Connect(format!("{address}: timed out after {:?}", self.connect_timeout)))?
            .map_err(|e| InlineError::Connect(format!("{address}: {e}")))?;
        // Small SSE/NDJSON chunks must not wait for Nagle.
        stream.set_nodelay(true).map_err(|e| InlineError::Connect(format!("{address}: {e}")))?;
        let (sender, connection) = http1::handshake(TokioIo::new(stream)).await?;
        // Boxed: a connection's state is large, and it moves in and out of
        // the pool and into each response body; a box moves as a pointer.
        Ok(Box::new(Leased { sender, connection, done: false, home: self.home_shard() }))
    }

    fn home_shard(&self) -> usize {
        shard_of_this_thread() % self.idle.len()
    }

    /// An idle connection: this thread's own, else (when no other thread
    /// has one to spare) one another thread left, used from here.
    ///
    /// A connection used from another thread than the one that opened it
    /// keeps its socket with the opener's reactor: every read wakes that
    /// thread and then this one (an eventfd write and a second thread's
    /// turn per request, for as long as clients stay unevenly spread over
    /// the threads). So when another thread holds two or more idle, one of
    /// them is closed instead and this thread opens its own (`None`): the
    /// connection moves to the thread that needs it and the agent's count
    /// stays the same. A thread's last idle connection is borrowed, not
    /// moved, so threads whose needs take turns do not reconnect each time.
    fn checkout(&self) -> Option<Box<Leased>> {
        let home = self.home_shard();
        if let Some(own) = self.checkout_from(home) {
            return Some(own);
        }
        let shards = self.idle.len();
        let others = (1..shards).map(|step| (home + step) % shards);
        if let Some(spare) = others.clone().find_map(|shard| self.take_spare(shard)) {
            drop(spare);
            return None;
        }
        others.into_iter().find_map(|shard| self.checkout_from(shard))
    }

    /// The least recently used idle connection of `shard`, when it holds
    /// two or more.
    fn take_spare(&self, shard: usize) -> Option<Box<Leased>> {
        let mut idle = self.idle[shard].lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < 2 {
            return None;
        }
        idle.pop_front().map(|entry| entry.leased)
    }

    fn checkout_from(&self, shard: usize) -> Option<Box<Leased>> {
        let mut idle = self.idle[shard].lock().unwrap_or_else(PoisonError::into_inner);
        while idle.front().is_some_and(|entry| entry.since.elapsed() > self.idle_timeout) {
            idle.pop_front();
        }
        idle.pop_back().map(|entry| entry.leased)
    }

    fn checkin(&self, leased: Box<Leased>) {
        if leased.done || leased.sender.is_closed() {
            return;
        }
        let mut idle = self.idle[leased.home].lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() >= self.max_idle {
            idle.pop_front();
        }
        idle.push_back(Idle { leased, since: Instant::now() });
    }

    /// Sends `request` (origin-form URI, `Host` set) and resolves with the
    /// response head; the body then reads the connection as it is polled
    /// and returns it to the pool at its end. `fresh`: on a new connection
    /// that is not pooled afterwards (a retry, a liveness probe).
    pub async fn request(
        self: &Arc<Self>,
        request: Request<Full<Bytes>>,
        fresh: bool,
    ) -> Result<(u16, http::HeaderMap, InlineBody), InlineError> {
        let mut leased = self.ready_connection(fresh).await?;
        let mut response = std::pin::pin!(leased.sender.send_request(request));
        let head = poll_fn(|cx| {
            if let Poll::Ready(result) = response.as_mut().poll(cx) {
                return Poll::Ready(result.map_err(InlineError::from));
            }
            match leased.drive(cx) {
                Err(err) => return Poll::Ready(Err(err.into())),
                Ok(false) => {}
                // The head cannot come any more; the response future
                // normally says why already.
                Ok(true) => {
                    return match response.as_mut().poll(cx) {
                        Poll::Ready(result) => Poll::Ready(result.map_err(InlineError::from)),
                        Poll::Pending => Poll::Ready(Err(InlineError::Closed)),
                    };
                }
            }
            response.as_mut().poll(cx).map_err(InlineError::from)
        })
        .await;
        let head: Response<Incoming> = head?;
        let (parts, body) = head.into_parts();
        let pool = if fresh { None } else { Some(Arc::clone(self)) };
        Ok((parts.status.as_u16(), parts.headers, InlineBody { body, leased: Some(leased), pool }))
    }

    /// A pooled connection that is still open and idle, else a new one.
    async fn ready_connection(&self, fresh: bool) -> Result<Box<Leased>, InlineError> {
        if !fresh {
            while let Some(mut leased) = self.checkout() {
                if poll_fn(|cx| leased.poll_ready(cx)).await.is_ok() {
                    return Ok(leased);
                }
            }
        }
        let mut leased = self.connect().await?;
        poll_fn(|cx| leased.poll_ready(cx)).await?;
        Ok(leased)
    }
}

/// A response body that drives its own connection: polling it reads the
/// socket. At its end the connection goes back to the pool; dropped early
/// (the client went away), the connection closes, which tells the backend
/// to stop generating.
pub struct InlineBody {
    body: Incoming,
    leased: Option<Box<Leased>>,
    pool: Option<Arc<InlinePool>>,
}

impl InlineBody {
    fn poll_body(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, StreamError>>> {
        loop {
            return match Pin::new(&mut self.body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => Poll::Ready(Some(Ok(data))),
                    // Trailers: nothing a client of ours reads.
                    Err(_) => continue,
                },
                Poll::Ready(Some(Err(err))) => {
                    self.leased = None;
                    Poll::Ready(Some(Err(StreamError::Backend(err.to_string()))))
                }
                Poll::Ready(None) => {
                    self.release(cx);
                    Poll::Ready(None)
                }
                Poll::Pending => Poll::Pending,
            };
        }
    }

    /// The body ended: one more poll lets the connection settle into idle
    /// (or finish, if the backend closes after a response) before pooling.
    fn release(&mut self, cx: &mut Context<'_>) {
        if let Some(mut leased) = self.leased.take()
            && let Some(pool) = self.pool.take()
            && matches!(leased.drive(cx), Ok(false))
        {
            pool.checkin(leased);
        }
    }
}

impl Stream for InlineBody {
    type Item = Result<Bytes, StreamError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if let Poll::Ready(item) = this.poll_body(cx) {
            return Poll::Ready(item);
        }
        let Some(leased) = this.leased.as_mut() else {
            return Poll::Ready(None);
        };
        let finished = match leased.drive(cx) {
            Ok(finished) => finished,
            Err(err) => {
                this.leased = None;
                return Poll::Ready(Some(Err(StreamError::Backend(err.to_string()))));
            }
        };
        match this.poll_body(cx) {
            Poll::Pending if finished => {
                this.leased = None;
                Poll::Ready(Some(Err(StreamError::Backend("the backend closed the connection mid-body".into()))))
            }
            polled => polled,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use futures::StreamExt;
    use http_body_util::StreamBody;
    use hyper::body::Frame;
    use tokio::net::TcpListener;
    use tokio::sync::mpsc;

    use super::*;

    /// A backend that streams `chunks` chunks per request (each after the
    /// client asks for it, through `gate` when given) and counts the
    /// connections it accepted and the ones that ended.
    struct Server {
        base: String,
        accepted: Arc<AtomicUsize>,
        ended: mpsc::UnboundedReceiver<()>,
    }

    async fn server(chunks: usize, close_after: bool) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("address"));
        let accepted = Arc::new(AtomicUsize::new(0));
        let (ended_tx, ended) = mpsc::unbounded_channel();
        let count = Arc::clone(&accepted);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let ended_tx = ended_tx.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |_request| async move {
                        let frames = futures::stream::iter(0..chunks).then(|i| async move {
                            tokio::time::sleep(Duration::from_millis(2)).await;
                            Ok::<_, Infallible>(Frame::data(Bytes::from(format!("data: {i}\n\n"))))
                        });
                        let mut response = Response::new(StreamBody::new(frames));
                        if close_after {
                            response.headers_mut().insert(http::header::CONNECTION, "close".parse().expect("value"));
                        }
                        Ok::<_, Infallible>(response)
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                    let _ = ended_tx.send(());
                });
            }
        });
        Server { base, accepted, ended }
    }

    fn get(pool: &InlinePool) -> Request<Full<Bytes>> {
        Request::builder()
            .uri(pool.origin_form("/stream").expect("path"))
            .header(http::header::HOST, pool.host().clone())
            .body(Full::new(Bytes::new()))
            .expect("request")
    }

    async fn read_all(mut body: InlineBody) -> String {
        let mut text = String::new();
        while let Some(chunk) = body.next().await {
            text.push_str(std::str::from_utf8(&chunk.expect("chunk")).expect("utf-8"));
        }
        text
    }

    #[tokio::test]
    async fn sequential_requests_reuse_one_connection() {
        let server = server(3, false).await;
        let pool = InlinePool::new(&server.base, Duration::from_secs(2)).expect("pool");
        for _ in 0..5 {
            let (status, _, body) = pool.request(get(&pool), false).await.expect("response");
            assert_eq!(status, 200);
            assert_eq!(read_all(body).await, "data: 0\n\ndata: 1\n\ndata: 2\n\n");
        }
        assert_eq!(server.accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn another_thread_s_spare_idle_connection_moves_here_and_its_last_is_borrowed() {
        let mut server = server(2, false).await;
        let pool = InlinePool::new(&server.base, Duration::from_secs(2)).expect("pool");
        let (done_tx, done) = tokio::sync::oneshot::channel();
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        let other = Arc::clone(&pool);
        // A thread with a runtime of its own, as a connection thread has,
        // that stays up (its reactor holds the sockets) until released. Two
        // requests at once leave it two idle connections.
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            runtime.block_on(async move {
                let (_, _, first) = other.request(get(&other), false).await.expect("response");
                let (_, _, second) = other.request(get(&other), false).await.expect("response");
                let _ = done_tx.send((read_all(first).await, read_all(second).await));
                let _ = released.await;
            });
        });
        let expected = "data: 0\n\ndata: 1\n\n".to_string();
        assert_eq!(done.await.expect("the other thread answered"), (expected.clone(), expected.clone()));
        assert_eq!(server.accepted.load(Ordering::SeqCst), 2);
        // This thread has none: one of the other's two is closed and one
        // opened here, then reused.
        for _ in 0..3 {
            let (_, _, body) = pool.request(get(&pool), false).await.expect("response");
            assert_eq!(read_all(body).await, expected);
        }
        assert_eq!(server.accepted.load(Ordering::SeqCst), 3, "one connection opened here, then reused");
        tokio::time::timeout(Duration::from_secs(5), server.ended.recv())
            .await
            .expect("the other thread's spare idle connection was closed")
            .expect("the server runs");
        // Two at once here: the second borrows the other thread's last one.
        let (_, _, first) = pool.request(get(&pool), false).await.expect("response");
        let (_, _, second) = pool.request(get(&pool), false).await.expect("response");
        assert_eq!((read_all(first).await, read_all(second).await), (expected.clone(), expected));
        assert_eq!(server.accepted.load(Ordering::SeqCst), 3, "the other thread's last idle connection was borrowed");
        drop(release);
        thread.join().expect("the other thread ends");
    }

    #[tokio::test]
    async fn a_backend_that_closes_after_each_response_gets_a_new_connection_each_time() {
        let server = server(2, true).await;
        let pool = InlinePool::new(&server.base, Duration::from_secs(2)).expect("pool");
        for _ in 0..3 {
            let (_, _, body) = pool.request(get(&pool), false).await.expect("response");
            assert_eq!(read_all(body).await, "data: 0\n\ndata: 1\n\n");
        }
        assert_eq!(server.accepted.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn dropping_a_body_mid_stream_closes_its_connection() {
        let mut server = server(1000, false).await;
        let pool = InlinePool::new(&server.base, Duration::from_secs(2)).expect("pool");
        let (_, _, mut body) = pool.request(get(&pool), false).await.expect("response");
        assert!(body.next().await.is_some_and(|chunk| chunk.is_ok()));
        drop(body);
        tokio::time::timeout(Duration::from_secs(5), server.ended.recv())
            .await
            .expect("the backend saw the connection close");
        let (_, _, body) = pool.request(get(&pool), false).await.expect("a new connection");
        drop(body);
        assert_eq!(server.accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_connect_error_not_a_stale_one() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("address"));
        drop(listener);
        let pool = InlinePool::new(&base, Duration::from_secs(2)).expect("pool");
        let request = get(&pool);
        let err = pool.request(request, false).await.err().expect("refused");
        assert!(matches!(err, InlineError::Connect(_)), "{err}");
        assert!(!err.is_stale());
    }
}
