//! Where model files come from: a local path, or `hf:owner/repo/file` downloaded from the
//! Hugging Face hub into its usual cache (with a progress bar) when built with the `hf` feature.

use std::path::PathBuf;

use super::EngineError;

/// Turn a `--model` path into a local file or folder, downloading it first if it names the hub.
/// Blocking: call it before serving or from a blocking thread.
pub fn resolve_model_path(source: &str) -> Result<PathBuf, EngineError> {
    if let Some(hub_path) = source.strip_prefix("hf:") {
        return download_from_hub(hub_path);
    }
    let path = PathBuf::from(source);
    if path.exists() {
        Ok(path)
    } else {
        Err(EngineError::InvalidRequest(format!(
            "model path {source} does not exist (fetch the demo models with scripts/fetch-models.sh)"
        )))
    }
}

/// Split `owner/repo/path/in/repo.gguf` into the repository and the file inside it.
fn split_hub_path(hub_path: &str) -> Result<(&str, &str), EngineError> {
    let mut slashes = hub_path.match_indices('/').map(|(index, _)| index);
    match (slashes.next(), slashes.next()) {
        (Some(_), Some(split)) if split + 1 < hub_path.len() => {
            Ok((&hub_path[..split], &hub_path[split + 1..]))
        }
        _ => {
            Err(EngineError::InvalidRequest(format!("hf:{hub_path} must look like hf:owner/repo/file.gguf")))
        }
    }
}

#[cfg(feature = "hf")]
fn download_from_hub(hub_path: &str) -> Result<PathBuf, EngineError> {
    let (repo, file) = split_hub_path(hub_path)?;
    tracing::info!(repo, file, "fetching model from the Hugging Face hub");
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .with_progress(true)
        .build()
        .map_err(|error| EngineError::Inference(format!("hub client: {error}")))?;
    api.model(repo.to_string())
        .get(file)
        .map_err(|error| EngineError::Inference(format!("cannot download hf:{hub_path}: {error}")))
}

#[cfg(not(feature = "hf"))]
fn download_from_hub(hub_path: &str) -> Result<PathBuf, EngineError> {
    split_hub_path(hub_path)?;
    Err(EngineError::InvalidRequest(format!("hf:{hub_path}: this llmesh was built without the `hf` feature")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_paths_split_after_the_repository() {
        assert_eq!(split_hub_path("owner/repo/file.gguf").ok(), Some(("owner/repo", "file.gguf")));
        assert_eq!(split_hub_path("o/r/sub/dir/f.gguf").ok(), Some(("o/r", "sub/dir/f.gguf")));
        assert!(split_hub_path("owner/repo").is_err());
        assert!(split_hub_path("owner/repo/").is_err());
    }

    #[test]
    fn missing_local_path_says_how_to_fetch() {
        let error = resolve_model_path("/nonexistent/model.gguf").unwrap_err();
        assert!(error.to_string().contains("fetch-models.sh"), "{error}");
    }
}
