//! A filter that answers every request itself: status 200, a fixed 1 KiB body, a content
//! type and a freshness lifetime, from `on_http_request_headers`, without reading the
//! request. It is what a cache hit cannot beat in the same host (one local reply per
//! request, no lookup), so `bench/load.sh` compares edge-filter's hit with it. Built with
//! `cargo build --release --target wasm32-wasip1 -p edge-filter-bench-local-reply`.

/// The reply body: 1,024 bytes, the size of the origin's object in `bench/load.sh`.
pub const BODY: &[u8; 1024] = &{
    let mut b = [b'x'; 1024];
    b[1023] = b'\n';
    b
};

#[cfg(target_arch = "wasm32")]
mod filter {
    use proxy_wasm::traits::{Context, HttpContext, RootContext};
    use proxy_wasm::types::{Action, ContextType};

    struct Root;
    struct Reply;

    impl Context for Root {}
    impl RootContext for Root {
        fn create_http_context(&self, _: u32) -> Option<Box<dyn HttpContext>> {
            Some(Box::new(Reply))
        }
        fn get_type(&self) -> Option<ContextType> {
            Some(ContextType::HttpContext)
        }
    }

    impl Context for Reply {}
    impl HttpContext for Reply {
        fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
            self.send_http_response(
                200,
                vec![
                    ("content-type", "text/plain"),
                    ("cache-control", "max-age=600"),
                ],
                Some(super::BODY),
            );
            Action::Pause
        }
    }

    proxy_wasm::main! {{
        proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root) });
    }}
}

#[cfg(test)]
mod tests {
    #[test]
    fn body_is_one_kib() {
        assert_eq!(super::BODY.len(), 1024);
    }
}
