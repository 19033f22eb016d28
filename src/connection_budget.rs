//! The process-wide bound on outbound webhook connections (`delivery.max_outbound_connections`).
//!
//! Every broker's HTTP client pools up to `max_in_flight_per_broker` sockets, so with thousands
//! of active brokers the sockets alone can exceed the open-files limit. When the process runs
//! out of file descriptors, every `connect` fails with EMFILE, and if that counted as the
//! broker's failure, one shortage here would open the breakers of healthy brokers by the
//! thousand (it did: 29,889 breaker transitions in `manybrokers` on a 20,000-fd machine).
//!
//! So a socket takes a permit from this budget when it is opened and gives it back when it is
//! closed, idle in a pool or not. A broker's first socket may take any permit; its further ones
//! only while an eighth of the budget is still free, so one busy broker cannot keep the others
//! from their first. A connect refused here, or failing for want of descriptors, ports or
//! buffers (EMFILE, ENFILE, EADDRNOTAVAIL, ENOBUFS, ENOMEM), is a local shortage
//! (`SendError::LocalShortage`): the request is not made, the breaker hears nothing, the
//! attempt is not counted, and the broker pauses a second (`NotMade::LocalShortage`). Idle
//! sockets come back within `delivery.connection_keep_alive_ms`: each DeliveryActor drops its
//! client once nothing has been in flight that long, or a second while the budget is scarce.

use std::cell::Cell;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use actix_rt::net::{ActixStream, Ready, TcpStream};
use actix_service::Service;
use actix_tls::connect::{ConnectError, ConnectInfo, Connection};
use futures::future::LocalBoxFuture;
use prometheus::{IntCounter, IntGauge};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The share of the open-files limit outbound sockets may take when
/// `delivery.max_outbound_connections` is 0; the rest is for Postgres, Kafka, the admin listener,
/// DNS and the log.
const OPEN_FILES_SHARE: (u64, u64) = (3, 4);
/// The budget when the open-files limit cannot be read.
const FALLBACK_CONNECTIONS: usize = 1024;
/// How long a broker keeps its idle sockets while the budget is scarce, instead of
/// `delivery.connection_keep_alive_ms`: a lane's next delivery follows its save within
/// milliseconds, so a broker with work keeps its sockets; one whose work is done gives them
/// to the brokers waiting for one within a second.
pub const SCARCE_KEEP_ALIVE: Duration = Duration::from_secs(1);
/// At most one warning line per this long, however many requests hit the shortage.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// A connect this process refused itself: the budget had no permit left for this broker.
#[derive(Debug, thiserror::Error)]
#[error(
    "outbound connection budget exhausted ({open} of {max} open; delivery.max_outbound_connections)"
)]
pub struct BudgetExhausted {
    pub open: usize,
    pub max: usize,
}

/// The OS errors of a connect that say this process (or host) is short of something, not that
/// the broker is down.
pub fn is_local_shortage(error: &std::io::Error) -> bool {
    if error
        .get_ref()
        .is_some_and(|inner| inner.is::<BudgetExhausted>())
    {
        return true;
    }
    matches!(
        error.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::EADDRNOTAVAIL | libc::ENOBUFS | libc::ENOMEM)
    )
}

pub struct ConnectionBudget {
    open: AtomicUsize,
    max: usize,
    /// Permits only a broker's first socket may take.
    first_socket_reserve: usize,
    gauge: IntGauge,
    shortages: IntCounter,
    /// Shortages since the last warning, and when that was (ms since `origin`).
    unlogged: AtomicU64,
    last_warned_ms: AtomicU64,
    origin: Instant,
}

/// Where the budget's size came from, for the start-up log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BudgetSource {
    /// `delivery.max_outbound_connections`, with the open-files limit it has to stay under.
    Configured {
        open_files_limit: Option<u64>,
    },
    OpenFilesLimit(u64),
    Fallback,
}

impl std::fmt::Display for BudgetSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BudgetSource::Configured { .. } => f.write_str("delivery.max_outbound_connections"),
            BudgetSource::OpenFilesLimit(limit) => {
                write!(f, "three quarters of the open-files limit of {limit}")
            }
            BudgetSource::Fallback => f.write_str("a fixed 1024: the open-files limit is unknown"),
        }
    }
}

impl ConnectionBudget {
    /// `configured` is `delivery.max_outbound_connections`; 0 takes three quarters of the
    /// process's (already raised) open-files limit.
    pub fn for_process(
        configured: usize,
        gauge: IntGauge,
        max_gauge: &IntGauge,
        shortages: IntCounter,
    ) -> (Arc<ConnectionBudget>, BudgetSource) {
        let (max, source) = match (configured, crate::open_files::soft_limit()) {
            (0, Some(limit)) => {
                let share = limit / OPEN_FILES_SHARE.1 * OPEN_FILES_SHARE.0;
                (
                    usize::try_from(share).unwrap_or(usize::MAX).max(1),
                    BudgetSource::OpenFilesLimit(limit),
                )
            }
            (0, None) => (FALLBACK_CONNECTIONS, BudgetSource::Fallback),
            (configured, open_files_limit) => {
                (configured, BudgetSource::Configured { open_files_limit })
            }
        };
        (
            ConnectionBudget::new(max, gauge, max_gauge, shortages),
            source,
        )
    }

    pub fn new(
        max: usize,
        gauge: IntGauge,
        max_gauge: &IntGauge,
        shortages: IntCounter,
    ) -> Arc<ConnectionBudget> {
        max_gauge.set(i64::try_from(max).unwrap_or(i64::MAX));
        gauge.set(0);
        Arc::new(ConnectionBudget {
            open: AtomicUsize::new(0),
            max,
            first_socket_reserve: max / 8,
            gauge,
            shortages,
            unlogged: AtomicU64::new(0),
            last_warned_ms: AtomicU64::new(0),
            origin: Instant::now(),
        })
    }

    pub fn max(&self) -> usize {
        self.max
    }

    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Only the first-socket reserve (or less) is free: idle sockets should be given back soon.
    pub fn is_scarce(&self) -> bool {
        self.open() >= self.max - self.first_socket_reserve
    }

    /// A permit for one more socket of the client whose open sockets `client_sockets` counts
    /// (connecting ones included: the permit counts itself there until it is dropped).
    fn take(
        self: &Arc<Self>,
        client_sockets: &Rc<Cell<usize>>,
    ) -> Result<ConnectionPermit, BudgetExhausted> {
        let limit = if client_sockets.get() == 0 {
            self.max
        } else {
            self.max - self.first_socket_reserve
        };
        match self
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |open| {
                (open < limit).then_some(open + 1)
            }) {
            Ok(before) => {
                self.gauge.set(gauge_value(before + 1));
                client_sockets.set(client_sockets.get() + 1);
                Ok(ConnectionPermit {
                    budget: self.clone(),
                    client_sockets: client_sockets.clone(),
                })
            }
            Err(open) => Err(BudgetExhausted {
                open,
                max: self.max,
            }),
        }
    }

    /// Counts a request not made for a local shortage, and warns at most every `WARN_EVERY`
    /// with the count since the last warning (10,000 brokers short at once must not become
    /// 10,000 lines a second).
    pub fn note_shortage(&self, broker_id: &str, error: &dyn std::error::Error) {
        self.shortages.inc();
        let unlogged = self.unlogged.fetch_add(1, Ordering::Relaxed) + 1;
        let now_ms = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX);
        let last = self.last_warned_ms.load(Ordering::Relaxed);
        let due = last == 0 || now_ms.saturating_sub(last) >= WARN_EVERY.as_millis() as u64;
        if due
            && self
                .last_warned_ms
                .compare_exchange(last, now_ms.max(1), Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            self.unlogged.fetch_sub(unlogged, Ordering::Relaxed);
            tracing::warn!(
                broker_id,
                error.message = %error,
                requests_not_made = unlogged,
                open = self.open(),
                max = self.max,
                "requests not made: this process is short of connections or file descriptors; \
                 the brokers pause a second and nothing counts against them (RUNBOOK: \
                 \"Requests not made: local shortage\")"
            );
        }
    }
}

fn gauge_value(count: usize) -> i64 {
    i64::try_from(count).unwrap_or(i64::MAX)
}

/// One socket's share of the budget (and of its client's count), given back when the socket
/// is closed or its connect fails.
pub struct ConnectionPermit {
    budget: Arc<ConnectionBudget>,
    client_sockets: Rc<Cell<usize>>,
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        let before = self.budget.open.fetch_sub(1, Ordering::AcqRel);
        self.budget.gauge.set(gauge_value(before - 1));
        self.client_sockets
            .set(self.client_sockets.get().saturating_sub(1));
    }
}

impl std::fmt::Debug for ConnectionPermit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ConnectionPermit")
    }
}

/// The TCP connector of one broker's HTTP client, taking a permit for every socket it opens.
#[derive(Clone)]
pub struct BudgetedConnector<S> {
    inner: S,
    budget: Arc<ConnectionBudget>,
    /// Sockets of this client open or connecting now (its pool's, idle or in use).
    sockets: Rc<Cell<usize>>,
}

impl<S> BudgetedConnector<S> {
    pub fn new(inner: S, budget: Arc<ConnectionBudget>) -> Self {
        BudgetedConnector {
            inner,
            budget,
            sockets: Rc::default(),
        }
    }
}

impl<S> Service<ConnectInfo<awc::http::Uri>> for BudgetedConnector<S>
where
    S: Service<
        ConnectInfo<awc::http::Uri>,
        Response = Connection<awc::http::Uri, TcpStream>,
        Error = ConnectError,
    >,
    S::Future: 'static,
{
    type Response = Connection<awc::http::Uri, BudgetedStream>;
    type Error = ConnectError;
    type Future = LocalBoxFuture<'static, Result<Self::Response, ConnectError>>;

    actix_service::forward_ready!(inner);

    fn call(&self, request: ConnectInfo<awc::http::Uri>) -> Self::Future {
        let permit = match self.budget.take(&self.sockets) {
            Ok(permit) => permit,
            Err(exhausted) => {
                let error = ConnectError::Io(std::io::Error::other(exhausted));
                return Box::pin(async move { Err(error) });
            }
        };
        let connecting = self.inner.call(request);
        Box::pin(async move {
            let connection = connecting.await?;
            let (stream, connection) = connection.replace_io(());
            let (_, connection) = connection.replace_io(BudgetedStream {
                stream,
                _permit: permit,
            });
            Ok(connection)
        })
    }
}

/// A socket holding its permit: closing it (dropping it) gives the permit back.
#[derive(Debug)]
pub struct BudgetedStream {
    stream: TcpStream,
    _permit: ConnectionPermit,
}

impl AsyncRead for BudgetedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for BudgetedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

impl ActixStream for BudgetedStream {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<std::io::Result<Ready>> {
        ActixStream::poll_read_ready(&self.stream, cx)
    }

    fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<std::io::Result<Ready>> {
        ActixStream::poll_write_ready(&self.stream, cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(max: usize) -> (Arc<ConnectionBudget>, IntGauge) {
        let gauge = IntGauge::new("open", "open").unwrap();
        let max_gauge = IntGauge::new("max", "max").unwrap();
        let shortages = IntCounter::new("shortages", "shortages").unwrap();
        (
            ConnectionBudget::new(max, gauge.clone(), &max_gauge, shortages),
            gauge,
        )
    }

    /// One busy broker may take the budget only down to the last eighth; those permits are for
    /// other brokers' first sockets.
    #[test]
    fn the_last_eighth_is_kept_for_first_sockets() {
        let (budget, gauge) = budget(16);
        let busy_broker = Rc::new(Cell::new(0));
        let mut busy = Vec::new();
        for _ in 0..14 {
            busy.push(budget.take(&busy_broker).expect("room for the busy broker"));
        }
        let refused = budget
            .take(&busy_broker)
            .expect_err("the last eighth is not for it");
        assert_eq!((refused.open, refused.max), (14, 16));
        let other = Rc::new(Cell::new(0));
        let first = budget.take(&other).expect("another broker's first socket");
        assert!(
            budget.take(&other).is_err(),
            "its second is not a first socket"
        );
        let _third = budget
            .take(&Rc::new(Cell::new(0)))
            .expect("a third broker's first");
        assert!(
            budget.take(&Rc::new(Cell::new(0))).is_err(),
            "the budget is spent"
        );
        assert_eq!(gauge.get(), 16);
        drop(first);
        assert_eq!(other.get(), 0, "the client's count follows its sockets");
        busy.truncate(10);
        assert_eq!(busy_broker.get(), 10);
        assert_eq!(budget.open(), 11, "permits come back when sockets close");
        assert_eq!(gauge.get(), 11);
    }
}
