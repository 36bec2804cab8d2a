//! The gRPC twin of `http-null` in `benches/envoy.sh`: an Envoy ext_authz
//! `Authorization/Check` server that decides nothing and admits every request, built
//! like `entitled serve`'s gRPC port (tonic, one worker). Envoy calling it measures the
//! price of the gRPC ext_authz hop itself.
//!
//! `cargo run --release --example null_authz -- 127.0.0.1:4798`

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "benchmark baseline"
)]

use envoy_types::pb::envoy::service::auth::v3::authorization_server::{
    Authorization, AuthorizationServer,
};
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{CheckRequest, CheckResponse, OkHttpResponse};
use envoy_types::pb::google::rpc;

#[derive(Debug)]
struct Admit;

#[tonic::async_trait]
impl Authorization for Admit {
    async fn check(
        &self,
        _request: tonic::Request<CheckRequest>,
    ) -> Result<tonic::Response<CheckResponse>, tonic::Status> {
        Ok(tonic::Response::new(CheckResponse {
            status: Some(rpc::Status::default()),
            http_response: Some(HttpResponse::OkResponse(OkHttpResponse::default())),
            ..Default::default()
        }))
    }
}

fn main() {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:4798".into());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(&addr).await.expect("bind");
        let incoming =
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        tonic::transport::Server::builder()
            .add_service(AuthorizationServer::new(Admit))
            .serve_with_incoming(incoming)
            .await
            .expect("serve");
    });
}
