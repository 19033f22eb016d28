//! The receivers: one actix-web server on 127.0.0.1 standing in for every broker's endpoint
//! (`POST /b/{broker}`), each broker answering per its `Behaviour`. Every request is recorded
//! in memory (broker, webhook-id, webhook-sequence, arrival time, answer) for the results.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};

use crate::error::BenchError;
use crate::event::{now_micros, probe};
use crate::scenario::Behaviour;

/// What the receiver answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    Accepted,
    ServerError,
    Throttled,
    /// 503 at once (a broker that is down).
    Unavailable,
    /// Held past every client's timeout.
    TimedOut,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ReceivedRequest {
    pub broker: u16,
    /// The bench event in the body, if it is one.
    pub event: Option<u32>,
    pub webhook_id: Option<Box<str>>,
    pub sequence: Option<i64>,
    pub produced_at_micros: Option<u64>,
    pub arrived_at_micros: u64,
    pub answer: Answer,
}

struct Endpoint {
    behaviour: Behaviour,
    /// Its deliveries are expected (not hanging, not the warm-up broker).
    counted: bool,
}

struct SinkState {
    endpoints: Vec<Endpoint>,
    warmup_broker: u16,
    /// How long a hanging broker holds a request.
    hold: Duration,
    log: Mutex<SinkLog>,
    /// Distinct (broker, event) pairs accepted by counted brokers: the completion signal.
    delivered: AtomicU64,
    warmed_up: AtomicBool,
}

#[derive(Default)]
struct SinkLog {
    requests: Vec<ReceivedRequest>,
    accepted: HashSet<(u16, u32)>,
}

pub struct Sink {
    port: u16,
    state: Arc<SinkState>,
    handle: actix_web::dev::ServerHandle,
    thread: std::thread::JoinHandle<()>,
}

impl Sink {
    /// Starts the receivers for `behaviours` (by broker index) plus a warm-up broker at index
    /// `behaviours.len()`. `hold` must exceed every client's request timeout.
    pub fn start(behaviours: &[Behaviour], hold: Duration) -> Result<Sink, BenchError> {
        let mut endpoints: Vec<Endpoint> = behaviours
            .iter()
            .map(|behaviour| Endpoint {
                counted: behaviour.class().expects_deliveries(),
                behaviour: behaviour.clone(),
            })
            .collect();
        endpoints.push(Endpoint {
            behaviour: Behaviour::healthy(),
            counted: false,
        });
        let state = Arc::new(SinkState {
            warmup_broker: behaviours.len() as u16,
            endpoints,
            hold,
            log: Mutex::new(SinkLog::default()),
            delivered: AtomicU64::new(0),
            warmed_up: AtomicBool::new(false),
        });
        let listener = std::net::TcpListener::bind("127.0.0.1:0")
            .map_err(|source| BenchError::io("binding the receivers on 127.0.0.1", source))?;
        let port = listener
            .local_addr()
            .map_err(|source| BenchError::io("reading the receivers' port", source))?
            .port();
        let data = web::Data::from(state.clone());
        let (handle_tx, handle_rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("bench-sink".into())
            .spawn(move || {
                actix_rt::System::new().block_on(async move {
                    let server = HttpServer::new(move || {
                        App::new()
                            .app_data(data.clone())
                            .route("/b/{broker}", web::post().to(receive))
                    })
                    // Two workers: the sink shares two cores with everything else.
                    .workers(2)
                    .backlog(4096)
                    .disable_signals()
                    .shutdown_timeout(1)
                    .listen(listener);
                    match server {
                        Ok(server) => {
                            let server = server.run();
                            let _ = handle_tx.send(Ok(server.handle()));
                            let _ = server.await;
                        }
                        Err(error) => {
                            let _ = handle_tx.send(Err(error));
                        }
                    }
                });
            })
            .map_err(|source| BenchError::io("starting the receivers' thread", source))?;
        let handle = handle_rx
            .recv_timeout(Duration::from_secs(10))
            .map_err(|_| BenchError::Timeout("the receivers did not start".into()))?
            .map_err(|source| BenchError::io("starting the receivers", source))?;
        Ok(Sink {
            port,
            state,
            handle,
            thread,
        })
    }

    pub fn url(&self, broker: u16) -> String {
        format!("http://127.0.0.1:{}/b/{broker}", self.port)
    }

    pub fn warmed_up(&self) -> bool {
        self.state.warmed_up.load(Ordering::Relaxed)
    }

    /// Distinct (event, broker) pairs accepted by brokers whose deliveries are expected.
    pub fn delivered(&self) -> u64 {
        self.state.delivered.load(Ordering::Relaxed)
    }

    /// `delivered`, readable from another task (the soak's sampler).
    pub fn delivered_counter(&self) -> impl Fn() -> u64 + Send + 'static {
        let state = self.state.clone();
        move || state.delivered.load(Ordering::Relaxed)
    }

    /// Stops the server (open requests are dropped) and returns everything it recorded.
    pub async fn stop(self) -> Vec<ReceivedRequest> {
        let Sink {
            state,
            handle,
            thread,
            ..
        } = self;
        handle.stop(false).await;
        // The server thread ends within its 1 s shutdown timeout.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !thread.is_finished() && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut log = state.log.lock().unwrap_or_else(|e| e.into_inner());
        std::mem::take(&mut log.requests)
    }
}

impl SinkState {
    fn record(&self, request: ReceivedRequest) {
        let broker = request.broker;
        if broker == self.warmup_broker {
            self.warmed_up.store(true, Ordering::Relaxed);
        }
        let counted = self
            .endpoints
            .get(broker as usize)
            .is_some_and(|e| e.counted);
        let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        if let (Answer::Accepted, Some(event), true) = (request.answer, request.event, counted) {
            if log.accepted.insert((broker, event)) {
                self.delivered.fetch_add(1, Ordering::Relaxed);
            }
        }
        log.requests.push(request);
    }
}

fn decide(behaviour: &Behaviour) -> Answer {
    if behaviour.hangs {
        return Answer::TimedOut;
    }
    if behaviour.unavailable {
        return Answer::Unavailable;
    }
    let draw: f64 = rand::random();
    if draw < behaviour.error_rate {
        Answer::ServerError
    } else if draw < behaviour.error_rate + behaviour.throttle_rate {
        Answer::Throttled
    } else {
        Answer::Accepted
    }
}

fn header(request: &HttpRequest, name: &str) -> Option<String> {
    request
        .headers()
        .get(name)
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned)
}

async fn receive(
    state: web::Data<SinkState>,
    broker: web::Path<u16>,
    request: HttpRequest,
    body: web::Bytes,
) -> HttpResponse {
    let arrived_at_micros = now_micros();
    let broker = broker.into_inner();
    let Some(endpoint) = state.endpoints.get(broker as usize) else {
        return HttpResponse::NotFound().finish();
    };
    let answer = decide(&endpoint.behaviour);
    let probe = probe(&body);
    state.record(ReceivedRequest {
        broker,
        event: probe.event,
        webhook_id: header(&request, "webhook-id").map(String::into_boxed_str),
        sequence: header(&request, "webhook-sequence").and_then(|s| s.parse().ok()),
        produced_at_micros: probe.produced_at_micros,
        arrived_at_micros,
        answer,
    });
    let latency = endpoint.behaviour.latency;
    if answer == Answer::TimedOut {
        actix_rt::time::sleep(state.hold).await;
        return HttpResponse::ServiceUnavailable().finish();
    }
    if !latency.is_zero() {
        actix_rt::time::sleep(latency).await;
    }
    match answer {
        Answer::Accepted => HttpResponse::Ok().finish(),
        Answer::ServerError => HttpResponse::InternalServerError().finish(),
        Answer::Unavailable => HttpResponse::ServiceUnavailable().finish(),
        _ => HttpResponse::TooManyRequests()
            .insert_header((
                "retry-after",
                endpoint.behaviour.retry_after_secs.to_string(),
            ))
            .finish(),
    }
}
