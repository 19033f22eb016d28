//! Bunyan JSON logs on stdout (or any sink, for tests).

use tracing::subscriber::set_global_default;
use tracing::Subscriber;
use tracing_bunyan_formatter::{BunyanFormattingLayer, JsonStorageLayer};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::{layer::SubscriberExt, EnvFilter, Registry};

/// Builds the subscriber. `level` is a tracing filter such as `info` or
/// `info,webhook_delivery::actors=debug`; `RUST_LOG` wins when set.
pub fn get_subscriber<Sink>(name: &str, level: &str, sink: Sink) -> impl Subscriber + Send + Sync
where
    Sink: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    Registry::default()
        .with(filter)
        .with(JsonStorageLayer)
        .with(BunyanFormattingLayer::new(name.into(), sink))
}

/// Installs the subscriber process-wide and routes `log` records (from dependencies) into it.
/// Calling it twice is harmless: the second call is ignored.
pub fn init_subscriber(subscriber: impl Subscriber + Send + Sync) {
    let _ = tracing_log::LogTracer::init();
    let _ = set_global_default(subscriber);
}

/// Panics also become one bunyan line (with where it happened), besides the usual text on
/// stderr. Delivery code contains its panics and restarts the actor; this makes them greppable.
pub fn install_panic_hook() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "non-string panic".to_owned());
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        tracing::error!(error.message = %message, panic.location = %location, "panic");
        previous(info);
    }));
}
