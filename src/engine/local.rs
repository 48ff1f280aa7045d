//! `LocalEngine`: the models this node hosts, loaded from disk, each with its worker thread;
//! models loaded and unloaded while the node serves.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use candle_core::Device;
use futures::FutureExt;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

mod chat_runner;

use super::chat_template::ChatTemplate;
use super::embedding::EmbeddingWorker;
use super::gguf_tokenizer::tokenizer_from_metadata;
use super::grammar::GrammarCompiler;
use super::loading::LoadProgress;
use super::models::open_language_model;
use super::scheduler::{GenerationWorker, ModelRuntime, QueueLimits, WorkerLoad};
use super::source::resolve_model_path;
use super::{
    EmbedRequest, Embeddings, Engine, EngineError, EngineLoad, GenerateRequest, GenerationStream, ModelInfo,
    ModelKind,
};
use chat_runner::ChatRunner;

/// Events buffered between the worker and the reader of one generation.
const EVENTS_PER_GENERATION: usize = 32;

/// One model to load: the name clients use and where its files are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelSpec {
    pub id: String,
    /// A .gguf file (chat) or a folder with model.safetensors, config.json and tokenizer.json
    /// (embeddings).
    pub path: PathBuf,
}

/// The models a node hosts. Models can be added and removed while it serves
/// (`start_loading`, `start_unloading`); a request holds its model (`Arc`) until it is queued.
pub struct LocalEngine {
    shared: Arc<Shared>,
}

struct Shared {
    models: RwLock<BTreeMap<String, Arc<LocalModel>>>,
    /// Models being read, and loads that failed (kept to show why, until the id is loaded again).
    loads: Mutex<BTreeMap<String, Arc<Load>>>,
    limits: QueueLimits,
    device: Device,
}

struct LocalModel {
    info: ModelInfo,
    runner: Runner,
    /// Refusing new requests, waiting for those it holds to end.
    unloading: AtomicBool,
}

struct Load {
    source: String,
    progress: LoadProgress,
    /// Set when the load failed.
    error: Mutex<Option<String>>,
}

enum Runner {
    Chat(Arc<ChatRunner>),
    Embeddings(EmbeddingWorker),
}

/// Where a model is in its life on this node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelState {
    /// Its files are being read.
    Loading,
    /// Serving.
    #[default]
    Ready,
    /// Refusing new requests until those it holds end, then gone.
    Unloading,
    /// The load failed (`error` says why).
    Failed,
}

/// A model of this node as `GET /api/models` shows it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelStatus {
    pub id: String,
    pub state: ModelState,
    /// What it was loaded from, for a model loaded at run time.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// Once loaded: what it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub info: Option<ModelInfo>,
    /// While loading: bytes of the file read, of `total_bytes`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_read: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub percent: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Generations running and waiting (chat models).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub active: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queued: Option<usize>,
}

/// The device models run on: the first GPU when built with `cuda` or `metal` and one is present.
pub fn default_device() -> Device {
    #[cfg(feature = "cuda")]
    if let Ok(device) = Device::new_cuda(0) {
        return device;
    }
    #[cfg(feature = "metal")]
    if let Ok(device) = Device::new_metal(0) {
        return device;
    }
    Device::Cpu
}

/// The longest model id accepted at run time.
const MAX_MODEL_ID: usize = 128;

impl LocalEngine {
    /// Load every model. Blocking and slow (reads the weights): run it before serving or on a
    /// blocking thread.
    pub fn load(specs: &[ModelSpec], limits: QueueLimits, device: &Device) -> Result<Self, EngineError> {
        let mut models = BTreeMap::new();
        for spec in specs {
            if models.contains_key(&spec.id) {
                return Err(EngineError::InvalidRequest(format!("model id '{}' is given twice", spec.id)));
            }
            let model = load_model(spec, limits, device, &LoadProgress::default())?;
            models.insert(spec.id.clone(), Arc::new(model));
        }
        let shared = Shared {
            models: RwLock::new(models),
            loads: Mutex::new(BTreeMap::new()),
            limits,
            device: device.clone(),
        };
        Ok(Self { shared: Arc::new(shared) })
    }

    /// The live counts of a chat model's worker.
    pub fn load_of(&self, id: &str) -> Option<WorkerLoad> {
        match &self.shared.model(id).ok()?.runner {
            Runner::Chat(runner) => Some(runner.worker.load()),
            Runner::Embeddings(_) => None,
        }
    }

    /// The model `id`, unless it is unknown or on its way out.
    fn serving(&self, id: &str) -> Result<Arc<LocalModel>, EngineError> {
        let model = self.shared.model(id)?;
        if model.unloading.load(Ordering::Relaxed) {
            return Err(EngineError::ShuttingDown(id.to_string()));
        }
        Ok(model)
    }
}

impl Shared {
    fn model(&self, id: &str) -> Result<Arc<LocalModel>, EngineError> {
        let models = self.models.read().unwrap_or_else(|p| p.into_inner());
        models.get(id).cloned().ok_or_else(|| EngineError::UnknownModel(id.to_string()))
    }

    fn loads(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Arc<Load>>> {
        self.loads.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The background half of `start_loading`: resolve the source, read the model, serve it.
    fn finish_loading(&self, id: &str, load: &Load) {
        let started = std::time::Instant::now();
        let loaded = resolve_model_path(&load.source).and_then(|path| {
            let spec = ModelSpec { id: id.to_string(), path };
            load_model(&spec, self.limits, &self.device, &load.progress)
        });
        match loaded {
            Ok(model) => {
                tracing::info!(model = id, seconds = started.elapsed().as_secs_f32(), "loaded at run time");
                let mut models = self.models.write().unwrap_or_else(|p| p.into_inner());
                models.insert(id.to_string(), Arc::new(model));
                self.loads().remove(id);
            }
            Err(error) => {
                tracing::warn!(model = id, source = %load.source, %error, "model failed to load");
                *load.error.lock().unwrap_or_else(|p| p.into_inner()) = Some(error.to_string());
            }
        }
    }

    /// The background half of `start_unloading`: wait until the model holds no request, drop it.
    fn finish_unloading(&self, id: &str, model: &LocalModel) {
        let started = std::time::Instant::now();
        loop {
            let busy = match &model.runner {
                Runner::Chat(runner) => {
                    let load = runner.worker.load();
                    load.active + load.queued
                }
                Runner::Embeddings(worker) => worker.pending(),
            };
            if busy == 0 {
                break;
            }
            std::thread::sleep(UNLOAD_POLL);
        }
        let mut models = self.models.write().unwrap_or_else(|p| p.into_inner());
        if models.get(id).is_some_and(|held| std::ptr::eq(Arc::as_ptr(held), model)) {
            models.remove(id);
        }
        tracing::info!(model = id, seconds = started.elapsed().as_secs_f32(), "unloaded");
    }
}

/// How often an unloading model is checked for requests still running.
const UNLOAD_POLL: std::time::Duration = std::time::Duration::from_millis(20);

/// A model id a client can use in a request: printable, no spaces, not too long.
fn check_model_id(id: &str) -> Result<(), EngineError> {
    let valid = !id.is_empty()
        && id.len() <= MAX_MODEL_ID
        && id.chars().all(|c| !c.is_control() && !c.is_whitespace());
    if valid {
        return Ok(());
    }
    Err(EngineError::InvalidRequest(format!(
        "model id must be 1 to {MAX_MODEL_ID} characters without spaces or control characters"
    )))
}

fn load_model(
    spec: &ModelSpec,
    limits: QueueLimits,
    device: &Device,
    progress: &LoadProgress,
) -> Result<LocalModel, EngineError> {
    let started = std::time::Instant::now();
    let created = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let runner = |info: ModelInfo, runner| {
        tracing::info!(
            model = %spec.id,
            path = %spec.path.display(),
            architecture = %info.architecture,
            quantization = %info.quantization,
            seconds = started.elapsed().as_secs_f32(),
            "model loaded"
        );
        LocalModel { info, runner, unloading: AtomicBool::new(false) }
    };
    if spec.path.is_dir() {
        let (worker, loaded) = EmbeddingWorker::load(&spec.id, &spec.path, device, limits.max_queued)?;
        progress.finish();
        let info = ModelInfo {
            id: spec.id.clone(),
            kind: ModelKind::Embeddings,
            architecture: "bert".to_string(),
            quantization: "F32".to_string(),
            context_length: loaded.context_length,
            parameters: loaded.parameters,
            file_bytes: loaded.file_bytes,
            created,
            hosts: Vec::new(),
        };
        return Ok(runner(info, Runner::Embeddings(worker)));
    }
    // The tokenizer and template first, from the metadata alone; the vocabulary's arrays are
    // dropped before the weights are read, so the two are never in memory together.
    let mut opened = open_language_model(&spec.path, progress)?;
    let mut tokens = tokenizer_from_metadata(opened.metadata())?;
    if let Some(path) = tokenizer_json_beside(&spec.path) {
        tracing::info!(path = %path.display(), "using the tokenizer.json beside the model");
        tokens.tokenizer = Tokenizer::from_file(&path)
            .map_err(|e| EngineError::Inference(format!("cannot read {}: {e}", path.display())))?;
    }
    let template_source = match opened.metadata().get("tokenizer.chat_template") {
        Some(candle_core::quantized::gguf_file::Value::String(source)) => Some(source.as_str()),
        _ => None,
    };
    let template = ChatTemplate::new(template_source, tokens.bos_token.clone(), tokens.eos_token.clone())?;
    opened.forget_vocabulary();
    let loaded = opened.load(device)?;
    let tokenizer = Arc::new(tokens.tokenizer);
    let info = ModelInfo {
        id: spec.id.clone(),
        kind: ModelKind::Chat,
        architecture: loaded.architecture,
        quantization: loaded.quantization,
        context_length: loaded.context_length,
        parameters: loaded.parameters,
        file_bytes: loaded.file_bytes,
        created,
        hosts: Vec::new(),
    };
    // Cheap: the grammar machinery itself is built by the first request that needs it.
    let grammar = match GrammarCompiler::new(tokenizer.clone(), &tokens.eos_token_ids) {
        Ok(compiler) => Some(Arc::new(compiler)),
        Err(error) => {
            tracing::warn!(model = %spec.id, %error, "no constrained decoding (response_format) for this model");
            None
        }
    };
    let runtime = ModelRuntime {
        model_id: spec.id.clone(),
        model: loaded.model,
        tokenizer: tokenizer.clone(),
        eos_token_ids: tokens.eos_token_ids,
        vocabulary: grammar.clone(),
    };
    let worker = GenerationWorker::spawn(runtime, limits)
        .map_err(|e| EngineError::Inference(format!("cannot start the worker thread: {e}")))?;
    let chat = ChatRunner {
        model_id: spec.id.clone(),
        template,
        tokenizer,
        bos_token_id: tokens.bos_token_id.filter(|_| tokens.add_bos_token),
        context_length: info.context_length,
        grammar,
        worker,
    };
    Ok(runner(info, Runner::Chat(Arc::new(chat))))
}

/// `NAME.tokenizer.json` or `tokenizer.json` in the model's folder.
fn tokenizer_json_beside(model: &Path) -> Option<PathBuf> {
    let own = model.with_extension("tokenizer.json");
    let shared = model.parent()?.join("tokenizer.json");
    [own, shared].into_iter().find(|path| path.is_file())
}

impl Engine for LocalEngine {
    fn models(&self) -> Vec<ModelInfo> {
        let models = self.shared.models.read().unwrap_or_else(|p| p.into_inner());
        models
            .values()
            .filter(|model| !model.unloading.load(Ordering::Relaxed))
            .map(|model| model.info.clone())
            .collect()
    }

    fn generate(
        &self,
        request: GenerateRequest,
    ) -> BoxFuture<'static, Result<GenerationStream, EngineError>> {
        let model = match self.serving(&request.model) {
            Ok(model) => model,
            Err(error) => return futures::future::ready(Err(error)).boxed(),
        };
        let runner = match &model.runner {
            Runner::Chat(runner) => runner.clone(),
            Runner::Embeddings(_) => {
                let error =
                    EngineError::WrongKind { model: request.model, operation: "chat or completions".into() };
                return futures::future::ready(Err(error)).boxed();
            }
        };
        // Before any work on the prompt: a full model refuses at once, on this thread.
        let place = match runner.worker.reserve() {
            Ok(place) => place,
            Err(error) => return futures::future::ready(Err(error)).boxed(),
        };
        let span = tracing::Span::current();
        async move {
            tokio::task::spawn_blocking(move || runner.submit(request, place, span))
                .await
                .map_err(|e| EngineError::Inference(format!("prompt preparation panicked: {e}")))?
        }
        .boxed()
    }

    fn load(&self) -> EngineLoad {
        let mut load = EngineLoad::default();
        let models = self.shared.models.read().unwrap_or_else(|p| p.into_inner());
        for model in models.values() {
            if let Runner::Chat(runner) = &model.runner {
                let worker = runner.worker.load();
                load.in_flight += worker.active;
                load.queued += worker.queued;
                load.prompt_cache_hits += worker.prompt_cache_hits;
                load.prompt_tokens_reused += worker.prompt_tokens_reused;
                load.prompt_cache_bytes += worker.prompt_cache_bytes as u64;
            }
        }
        load
    }

    fn embed(&self, request: EmbedRequest) -> BoxFuture<'static, Result<Embeddings, EngineError>> {
        let answer = match self.serving(&request.model) {
            Ok(model) => match &model.runner {
                Runner::Embeddings(worker) => worker.submit(request.inputs),
                Runner::Chat(_) => Err(EngineError::WrongKind {
                    model: request.model.clone(),
                    operation: "embeddings".into(),
                }),
            },
            Err(error) => Err(error),
        };
        let model = request.model;
        async move { answer?.await.map_err(|_| EngineError::ShuttingDown(model))? }.boxed()
    }

    fn start_loading(&self, id: &str, source: &str) -> Result<(), EngineError> {
        check_model_id(id)?;
        if source.trim().is_empty() {
            return Err(EngineError::InvalidRequest("path is empty".to_string()));
        }
        let load = Arc::new(Load {
            source: source.to_string(),
            progress: LoadProgress::default(),
            error: Mutex::new(None),
        });
        {
            // Both locks, in this order (as `finish_loading`), so no load slips in between.
            let models = self.shared.models.read().unwrap_or_else(|p| p.into_inner());
            let mut loads = self.shared.loads();
            if models.contains_key(id) {
                return Err(EngineError::InvalidRequest(format!(
                    "model '{id}' is already loaded on this node; unload it first"
                )));
            }
            let loading = loads
                .get(id)
                .is_some_and(|load| load.error.lock().unwrap_or_else(|p| p.into_inner()).is_none());
            if loading {
                return Err(EngineError::InvalidRequest(format!("model '{id}' is already being loaded")));
            }
            loads.insert(id.to_string(), load.clone());
        }
        let shared = self.shared.clone();
        let thread_id = id.to_string();
        let spawned = std::thread::Builder::new().name(format!("load-{id}")).spawn(move || {
            crate::engine::kernels::candle_pools::in_own_rayon_pool(|| {
                shared.finish_loading(&thread_id, &load)
            })
        });
        if let Err(error) = spawned {
            self.shared.loads().remove(id);
            return Err(EngineError::Inference(format!("cannot start a thread to load '{id}': {error}")));
        }
        tracing::info!(model = id, source, "loading at run time");
        Ok(())
    }

    fn start_unloading(&self, id: &str, force: bool) -> Result<(), EngineError> {
        if self
            .shared
            .loads()
            .remove(id)
            .is_some_and(|load| load.error.lock().unwrap_or_else(|p| p.into_inner()).is_some())
        {
            // A failed load: forgetting it is all there is to unloading.
            return Ok(());
        }
        let model = self.shared.model(id)?;
        let already = model.unloading.swap(true, Ordering::Relaxed);
        if force {
            match &model.runner {
                Runner::Chat(runner) => runner.worker.abort_all(),
                Runner::Embeddings(_) => {}
            }
        }
        if already {
            return Ok(());
        }
        tracing::info!(model = id, force, "unloading");
        let shared = self.shared.clone();
        let thread_id = id.to_string();
        std::thread::Builder::new()
            .name(format!("unload-{id}"))
            .spawn(move || shared.finish_unloading(&thread_id, &model))
            .map_err(|error| {
                EngineError::Inference(format!("cannot start a thread to unload '{id}': {error}"))
            })?;
        Ok(())
    }

    fn model_states(&self) -> Vec<ModelStatus> {
        let mut states: Vec<ModelStatus> = {
            let models = self.shared.models.read().unwrap_or_else(|p| p.into_inner());
            models
                .iter()
                .map(|(id, model)| {
                    let load = match &model.runner {
                        Runner::Chat(runner) => Some(runner.worker.load()),
                        Runner::Embeddings(_) => None,
                    };
                    let unloading = model.unloading.load(Ordering::Relaxed);
                    ModelStatus {
                        id: id.clone(),
                        state: if unloading { ModelState::Unloading } else { ModelState::Ready },
                        info: Some(model.info.clone()),
                        active: load.map(|load| load.active),
                        queued: load.map(|load| load.queued),
                        ..ModelStatus::default()
                    }
                })
                .collect()
        };
        for (id, load) in self.shared.loads().iter() {
            let (read, total) = load.progress.bytes();
            let error = load.error.lock().unwrap_or_else(|p| p.into_inner()).clone();
            states.push(ModelStatus {
                id: id.clone(),
                state: if error.is_some() { ModelState::Failed } else { ModelState::Loading },
                source: Some(load.source.clone()),
                bytes_read: Some(read),
                total_bytes: Some(total),
                percent: (total > 0).then(|| (read as f64 * 100.0 / total as f64) as f32),
                error,
                ..ModelStatus::default()
            });
        }
        states.sort_by(|a, b| a.id.cmp(&b.id));
        states
    }
}
