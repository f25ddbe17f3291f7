//! `dimple router --assets-from-workers`: the router asks a worker for the tokenizer, chat
//! template and preprocessing files of the model it serves (`GetPromptAssets`), writes them
//! into a private directory and reads that directory as it would read `--model`. Routers then
//! need no access to the weights' volume. Start-up waits, retrying, until a worker answers:
//! workers only serve once their weights are loaded. Workers are dialled with the router's
//! internal TLS settings (`--internal-tls-*`) and etcd with its TLS and credentials, as for
//! serving.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use dimple_proto::assets::{TOKENIZER_FILE, is_prompt_asset};
use dimple_proto::discovery::WorkerRecord;
use dimple_proto::tls::InternalTls;
use dimple_proto::worker as pb;
use dimple_proto::worker::worker_client::WorkerClient;
use dimple_router::Discovery;
use etcd_client::{Client, ConnectOptions, GetOptions};
use tonic::transport::Endpoint;

/// Longest wait between two rounds of asking every known worker.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Fetches the prompt assets from the first worker of `discovery` that answers (retrying
/// forever), writes them under `dir` and returns the served model's name.
pub async fn fetch_into(
    discovery: &Discovery,
    max_message_bytes: usize,
    tls: Option<&InternalTls>,
    dir: &Path,
) -> anyhow::Result<String> {
    let mut backoff = Duration::from_millis(200);
    loop {
        let addrs = match worker_addrs(discovery).await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "cannot list workers for the prompt assets");
                Vec::new()
            }
        };
        if addrs.is_empty() {
            tracing::info!("no worker registered yet; waiting for one to fetch the prompt assets");
        }
        for addr in &addrs {
            match ask(addr, max_message_bytes, tls).await {
                Ok(assets) => {
                    write_assets(&assets, dir)
                        .with_context(|| format!("prompt assets from worker {addr}"))?;
                    tracing::info!(worker = %addr, model = %assets.model, "fetched the prompt assets");
                    return Ok(assets.model);
                }
                Err(e) => {
                    tracing::warn!(worker = %addr, error = %format!("{e:#}"), "no prompt assets from this worker yet");
                }
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// The addresses to ask: the static list, or the workers registered in etcd right now.
async fn worker_addrs(discovery: &Discovery) -> anyhow::Result<Vec<String>> {
    match discovery {
        Discovery::Static(addrs) => Ok(addrs.clone()),
        Discovery::Etcd {
            endpoints,
            prefix,
            security,
        } => {
            let mut opts = ConnectOptions::new().with_connect_timeout(Duration::from_secs(2));
            if let Some(tls) = security.tls() {
                opts = opts.with_tls(tls);
            }
            if let Some((user, password)) = &security.user {
                opts = opts.with_user(user, password);
            }
            let mut client = Client::connect(endpoints, Some(opts))
                .await
                .context("connecting to etcd")?;
            let listed = tokio::time::timeout(
                Duration::from_secs(5),
                client.get(prefix.as_str(), Some(GetOptions::new().with_prefix())),
            )
            .await
            .context("listing the workers in etcd timed out")?
            .context("listing the workers in etcd")?;
            Ok(listed
                .kvs()
                .iter()
                .filter_map(|kv| WorkerRecord::from_json(kv.value()).ok())
                .map(|r| r.addr)
                .collect())
        }
    }
}

async fn ask(
    addr: &str,
    max_message_bytes: usize,
    tls: Option<&InternalTls>,
) -> anyhow::Result<pb::PromptAssets> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))
        .with_context(|| format!("worker address {addr:?}"))?;
    if let Some(tls) = tls {
        endpoint = endpoint
            .tls_config(tls.client())
            .with_context(|| format!("TLS to worker {addr}"))?;
    }
    let channel = endpoint
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(30))
        .connect()
        .await
        .context("connecting")?;
    let mut client = WorkerClient::new(channel).max_decoding_message_size(max_message_bytes);
    let reply = client
        .get_prompt_assets(pb::PromptAssetsRequest {})
        .await
        .map_err(|s| anyhow::anyhow!("GetPromptAssets: {}: {}", s.code(), s.message()))?;
    Ok(reply.into_inner())
}

/// Writes the received files into `dir` (created if needed). Names outside the asset list
/// are refused, so a file name can never be a path.
pub fn write_assets(assets: &pb::PromptAssets, dir: &Path) -> anyhow::Result<()> {
    if !assets.files.contains_key(TOKENIZER_FILE) {
        bail!(
            "the worker's model directory has no {TOKENIZER_FILE} (model {:?})",
            assets.model
        );
    }
    if let Some(name) = assets.files.keys().find(|n| !is_prompt_asset(n)) {
        bail!("unexpected prompt asset file name {name:?}");
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for (name, bytes) in &assets.files {
        let path = dir.join(name);
        std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// A directory of this process for the fetched files (under the temporary directory, which
/// is writable even with a read-only root filesystem in the chart).
pub fn private_dir() -> PathBuf {
    std::env::temp_dir().join(format!("dimple-prompt-assets-{}", std::process::id()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assets(files: &[(&str, &[u8])]) -> pb::PromptAssets {
        pb::PromptAssets {
            model: "m".into(),
            files: files
                .iter()
                .map(|(n, b)| ((*n).to_owned(), b.to_vec()))
                .collect(),
        }
    }

    #[test]
    fn refuses_paths_and_a_missing_tokenizer() {
        let dir = std::env::temp_dir().join(format!("dimple-assets-cli-{}", std::process::id()));
        let e = write_assets(&assets(&[("chat_template.jinja", b"T")]), &dir).unwrap_err();
        assert!(e.to_string().contains("no tokenizer.json"), "{e}");
        let e = write_assets(
            &assets(&[("tokenizer.json", b"{}"), ("../evil", b"x")]),
            &dir,
        )
        .unwrap_err();
        assert!(e.to_string().contains("unexpected prompt asset"), "{e}");
        write_assets(&assets(&[("tokenizer.json", b"{}")]), &dir).unwrap();
        assert_eq!(std::fs::read(dir.join("tokenizer.json")).unwrap(), b"{}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
