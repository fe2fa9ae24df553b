//! W3C trace context (`traceparent`), carried from an HTTP request or a WebSocket frame through
//! the actors and, in cluster mode, in NATS headers to the node that delivers. Every span of
//! that work records the same `trace_id`, so one id finds every log line of it on every node.

/// A `traceparent`: which trace, and which span within it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceContext {
    /// 32 lowercase hex digits, never all zero.
    pub trace_id: String,
    /// 16 lowercase hex digits: the span that carries this context onward.
    pub span_id: String,
}

impl TraceContext {
    /// Reads a `traceparent` header value (`00-<trace id>-<span id>-<flags>`); `None` for
    /// anything malformed, which then starts a new trace rather than failing the request.
    pub fn parse(header: &str) -> Option<Self> {
        let mut parts = header.trim().split('-');
        let (version, trace, span, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
        let valid = hex(version, 2)
            && version != "ff"
            && hex(trace, 32)
            && hex(span, 16)
            && hex(flags, 2)
            && trace.bytes().any(|b| b != b'0')
            && span.bytes().any(|b| b != b'0');
        valid.then(|| Self {
            trace_id: trace.to_ascii_lowercase(),
            span_id: span.to_ascii_lowercase(),
        })
    }

    /// A new trace (nothing came in with one).
    pub fn root() -> Self {
        Self {
            trace_id: format!("{:032x}", nonzero_random::<u128>()),
            span_id: new_span_id(),
        }
    }

    /// The same trace, one step further (a new span id).
    pub fn child(&self) -> Self {
        Self {
            trace_id: self.trace_id.clone(),
            span_id: new_span_id(),
        }
    }

    /// The `traceparent` value (sampled).
    pub fn header(&self) -> String {
        format!("00-{}-{}-01", self.trace_id, self.span_id)
    }
}

fn new_span_id() -> String {
    format!("{:016x}", nonzero_random::<u64>())
}

/// A random id from the thread's generator (seeded from the OS once, then in user space): a
/// span id is made for every message, and `Uuid::new_v4` asked the kernel each time (one
/// `getrandom` call per message). Trace and span ids must be unique, not secret. W3C
/// forbids the all-zero id, hence the loop (it runs once but for one draw in 2^64).
fn nonzero_random<T>() -> T
where
    T: Default + PartialEq,
    rand::distributions::Standard: rand::distributions::Distribution<T>,
{
    loop {
        let id: T = rand::random();
        if id != T::default() {
            return id;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::TraceContext;

    #[test]
    fn parses_and_writes_traceparent() {
        let t =
            TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        assert_eq!(t.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(t.span_id, "00f067aa0ba902b7");
        let c = t.child();
        assert_eq!(c.trace_id, t.trace_id);
        assert_ne!(c.span_id, t.span_id);
        assert_eq!(TraceContext::parse(&c.header()), Some(c));
    }

    #[test]
    fn refuses_malformed_traceparent() {
        for bad in [
            "garbage",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceContext::parse(bad), None, "{bad}");
        }
        assert_eq!(TraceContext::root().trace_id.len(), 32);
    }

    #[test]
    fn new_traces_and_spans_are_valid_and_distinct() {
        let a = TraceContext::root();
        let b = TraceContext::root();
        assert_eq!(TraceContext::parse(&a.header()), Some(a.clone()));
        assert_ne!(a.trace_id, b.trace_id);
        assert_eq!(a.span_id.len(), 16);
        assert_ne!(a.child().span_id, a.child().span_id);
    }
}
