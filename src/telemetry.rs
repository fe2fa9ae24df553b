//! Logging set-up. Every line written while handling a request carries the request id and the
//! tenant, because handlers run inside the `http` span that the request-id middleware opens.
//!
//! Built with the `otlp` cargo feature and given `KEFU_OTLP__ENDPOINT`, the same spans are also
//! exported over OTLP/HTTP (docs/operations.md, "Tracing export (OTLP)").

use tracing_subscriber::fmt::format::FmtSpan;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

use crate::settings::{LogFormat, Settings};

/// A layer added under the log output: the OTLP exporter when there is one.
type Export = Box<dyn Layer<Registry> + Send + Sync>;

/// Installs the global subscriber for log lines only (tests use this). `RUST_LOG` filters
/// (default `info`, with the database drivers' per-statement chatter kept at `warn`).
pub fn init(format: LogFormat) {
    install(format, None);
}

/// Installs the global subscriber for the `kefu` binary: log lines, and span export when the
/// binary has the `otlp` feature and `otlp.endpoint` is set. Keep the returned guard until
/// the process ends: dropping it sends the spans still buffered.
pub fn init_with_export(settings: &Settings) -> anyhow::Result<Telemetry> {
    #[cfg(feature = "otlp")]
    {
        otlp::init(settings)
    }
    #[cfg(not(feature = "otlp"))]
    {
        install(settings.log_format, None);
        if let Some(endpoint) = &settings.otlp.endpoint {
            // Not an error: the same configuration is deployed to binaries with and without
            // the feature, and a missing trace export must not keep customers from service.
            tracing::warn!(
                %endpoint,
                "KEFU_OTLP__ENDPOINT is set but this binary was built without the `otlp` \
                 feature: no spans are exported (build with `cargo build --release --features otlp`)"
            );
        }
        Ok(Telemetry {})
    }
}

/// Keeps the span exporter of [`init_with_export`] alive; dropping it flushes and stops it.
#[must_use = "dropping the guard stops the span export"]
pub struct Telemetry {
    #[cfg(feature = "otlp")]
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

fn install(format: LogFormat, export: Option<Export>) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,sea_orm=warn"));
    let output = match format {
        LogFormat::Pretty => tracing_subscriber::fmt::layer()
            .with_span_events(FmtSpan::NONE)
            .compact()
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .with_span_events(FmtSpan::NONE)
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .boxed(),
    };
    // The filter is global: the exporter sees the spans the log lines are written in, and no
    // others (the database drivers' spans stay out at the default level too).
    // A second initialisation (tests spawn many apps in one process) is harmless: keep the first.
    let _ = tracing_subscriber::registry()
        .with(export)
        .with(filter)
        .with(output)
        .try_init();
}

/// Makes an exported span a child of `parent` (a caller's `traceparent`, or the trace this
/// request started), so the exported trace id is the one in the log lines.
#[cfg(feature = "otlp")]
pub fn join_trace(span: &tracing::Span, parent: &crate::trace_context::TraceContext) {
    use opentelemetry::propagation::TextMapPropagator as _;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    let carrier: std::collections::HashMap<String, String> =
        [("traceparent".to_owned(), parent.header())].into();
    let cx = opentelemetry_sdk::propagation::TraceContextPropagator::new().extract(&carrier);
    // Fails only when no OTLP layer is installed (no endpoint set): nothing to join then.
    let _ = span.set_parent(cx);
}

#[cfg(feature = "otlp")]
mod otlp {
    use anyhow::Context as _;
    use opentelemetry::KeyValue;
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_otlp::{Protocol, WithExportConfig as _};
    use opentelemetry_sdk::Resource;
    use opentelemetry_sdk::trace::SdkTracerProvider;
    use tracing_subscriber::Layer as _;

    use super::{Telemetry, install};
    use crate::settings::Settings;

    pub(super) fn init(settings: &Settings) -> anyhow::Result<Telemetry> {
        let Some(endpoint) = &settings.otlp.endpoint else {
            install(settings.log_format, None);
            return Ok(Telemetry { provider: None });
        };
        // Like OTEL_EXPORTER_OTLP_ENDPOINT: the setting names the receiver, the signal's path
        // is ours to add.
        let traces_url = format!("{}/v1/traces", endpoint.trim_end_matches('/'));
        // OTLP/HTTP with protobuf through the crate's blocking reqwest client: the batch
        // processor exports from a thread of its own, so no request worker ever waits on the
        // collector. OTEL_EXPORTER_OTLP_HEADERS / _TIMEOUT still apply (authentication).
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(&traces_url)
            .build()
            .with_context(|| format!("OTLP exporter for {traces_url}"))?;
        let resource = Resource::builder()
            .with_service_name(settings.otlp.service_name.clone())
            .with_attributes([
                KeyValue::new("service.instance.id", settings.node_id.clone()),
                KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
            ])
            .build();
        let provider = SdkTracerProvider::builder()
            .with_resource(resource)
            .with_batch_exporter(exporter)
            .build();
        let layer = tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("kefu"))
            .boxed();
        install(settings.log_format, Some(layer));
        tracing::info!(endpoint = %traces_url, "exporting spans over OTLP/HTTP");
        Ok(Telemetry {
            provider: Some(provider),
        })
    }

    impl Drop for super::Telemetry {
        fn drop(&mut self) {
            if let Some(provider) = self.provider.take() {
                // Blocks until the buffered spans are sent (or the SDK's timeout passes): the
                // server has stopped by now, and the last requests are the ones worth seeing.
                if let Err(e) = provider.shutdown() {
                    tracing::warn!(error = %e, "OTLP export did not finish at shutdown");
                }
            }
        }
    }
}
