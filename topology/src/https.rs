//! The HTTP clients of the house (the management API here, the payment
//! provider in the payment worker) speak HTTP and HTTPS: TLS by rustls on
//! ring, the crypto provider the broker and database clients use too,
//! trusting the platform's roots and any CA a binary is configured with.

use std::path::Path;

/// A client builder for `http://` and `https://` URLs. Installs ring as the
/// process's rustls provider first (once; one installed before stays).
#[allow(clippy::disallowed_methods, reason = "the one place that may")]
pub fn client_builder() -> reqwest::ClientBuilder {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
}

/// A client with reqwest's defaults, built as [`client_builder`] builds.
pub fn client() -> reqwest::Client {
    client_builder().build().unwrap_or_default()
}

/// The certificates of a PEM file, to trust beside the platform's roots
/// (a private CA, or a test's).
pub fn extra_roots(pem_file: &Path) -> Result<Vec<reqwest::Certificate>, String> {
    let pem =
        std::fs::read(pem_file).map_err(|e| format!("cannot read {}: {e}", pem_file.display()))?;
    let certificates = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
        format!(
            "{} is not a PEM certificate bundle: {e}",
            pem_file.display()
        )
    })?;
    if certificates.is_empty() {
        return Err(format!("{} holds no certificate", pem_file.display()));
    }
    Ok(certificates)
}

/// Whether a client built here can speak to `url`: `http://` or `https://`.
pub fn check_url(url: &str) -> Result<(), String> {
    if url.starts_with("http://") || url.starts_with("https://") {
        Ok(())
    } else {
        Err("must be an http:// or https:// URL".to_owned())
    }
}
