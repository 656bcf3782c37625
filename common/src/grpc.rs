//! The one way to reach ipamd's gRPC socket (the plugin, the entrypoint's probe, the tests).

use std::path::Path;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

/// Why ipamd's socket could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("no connection within {0:?}")]
    Timeout(Duration),
    /// The transport's error with its causes ("connect: No such file or directory").
    #[error("{0}")]
    Transport(String),
}

/// A channel to the unix socket at `socket`, connected within `connect_timeout`; requests on
/// it time out after `request_timeout`.
pub async fn connect(
    socket: &Path,
    connect_timeout: Duration,
    request_timeout: Duration,
) -> Result<Channel, ConnectError> {
    let path = socket.to_path_buf();
    // tonic wants a URI; the connector ignores it and always dials the socket.
    let endpoint = Endpoint::from_static("http://ipamd.sock")
        .connect_timeout(connect_timeout)
        .timeout(request_timeout);
    let connector = tower::service_fn(move |_: Uri| {
        let path = path.clone();
        async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
    });
    match tokio::time::timeout(connect_timeout, endpoint.connect_with_connector(connector)).await {
        Err(_) => Err(ConnectError::Timeout(connect_timeout)),
        Ok(Err(e)) => Err(ConnectError::Transport(source_chain(&e))),
        Ok(Ok(c)) => Ok(c),
    }
}

/// An error with its causes, "a: b: c".
pub fn source_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
