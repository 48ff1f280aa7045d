//! `LocalEngine`: the models this node hosts, loaded from disk, each with its worker thread.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use candle_core::Device;
use futures::FutureExt;
use futures::future::BoxFuture;
use tokenizers::Tokenizer;
use tokio::sync::mpsc;

use super::chat_template::ChatTemplate;
use super::embedding::EmbeddingWorker;
use super::gguf_tokenizer::tokenizer_from_metadata;
use super::grammar::GrammarCompiler;
use super::grammar::TokenConstraint;
use super::models::load_language_model;
use super::scheduler::{GenerationWorker, Job, ModelRuntime, QueueLimits, QueuePlace, WorkerLoad};
use super::{
    EmbedRequest, Embeddings, Engine, EngineError, EngineLoad, GenerateRequest, GenerationStream, ModelInfo,
    ModelKind, OriginalPrompt, Prompt, SamplingParams,
};

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

pub struct LocalEngine {
    models: BTreeMap<String, LocalModel>,
}

struct LocalModel {
    info: ModelInfo,
    runner: Runner,
}

enum Runner {
    Chat(Arc<ChatRunner>),
    Embeddings(EmbeddingWorker),
}

/// Turns a request into prompt tokens and hands it to the model's worker.
struct ChatRunner {
    model_id: String,
    template: ChatTemplate,
    tokenizer: Arc<Tokenizer>,
    /// Prepended when the file asks for it and the rendered prompt lacks it.
    bos_token_id: Option<u32>,
    context_length: usize,
    /// `None` when llguidance could not take the vocabulary: constrained requests are refused.
    grammar: Option<Arc<GrammarCompiler>>,
    worker: GenerationWorker,
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

impl LocalEngine {
    /// Load every model. Blocking and slow (reads the weights): run it before serving or on a
    /// blocking thread.
    pub fn load(specs: &[ModelSpec], limits: QueueLimits, device: &Device) -> Result<Self, EngineError> {
        let mut models = BTreeMap::new();
        for spec in specs {
            if models.contains_key(&spec.id) {
                return Err(EngineError::InvalidRequest(format!("model id '{}' is given twice", spec.id)));
            }
            let started = std::time::Instant::now();
            let model = load_model(spec, limits, device)?;
            tracing::info!(
                model = %spec.id,
                path = %spec.path.display(),
                architecture = %model.info.architecture,
                quantization = %model.info.quantization,
                seconds = started.elapsed().as_secs_f32(),
                "model loaded"
            );
            models.insert(spec.id.clone(), model);
        }
        Ok(Self { models })
    }

    /// The live counts of a chat model's worker.
    pub fn load_of(&self, id: &str) -> Option<WorkerLoad> {
        match &self.models.get(id)?.runner {
            Runner::Chat(runner) => Some(runner.worker.load()),
            Runner::Embeddings(_) => None,
        }
    }

    fn model(&self, id: &str) -> Result<&LocalModel, EngineError> {
        self.models.get(id).ok_or_else(|| EngineError::UnknownModel(id.to_string()))
    }
}

fn load_model(spec: &ModelSpec, limits: QueueLimits, device: &Device) -> Result<LocalModel, EngineError> {
    let created = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    if spec.path.is_dir() {
        let (worker, loaded) = EmbeddingWorker::load(&spec.id, &spec.path, device, limits.max_queued)?;
        let info = ModelInfo {
            id: spec.id.clone(),
            kind: ModelKind::Embeddings,
            architecture: "bert".to_string(),
            quantization: "F32".to_string(),
            context_length: loaded.context_length,
            created,
            hosts: Vec::new(),
        };
        return Ok(LocalModel { info, runner: Runner::Embeddings(worker) });
    }
    let loaded = load_language_model(&spec.path, device)?;
    let mut tokens = tokenizer_from_metadata(&loaded.metadata)?;
    if let Some(path) = tokenizer_json_beside(&spec.path) {
        tracing::info!(path = %path.display(), "using the tokenizer.json beside the model");
        tokens.tokenizer = Tokenizer::from_file(&path)
            .map_err(|e| EngineError::Inference(format!("cannot read {}: {e}", path.display())))?;
    }
    let template_source = match loaded.metadata.get("tokenizer.chat_template") {
        Some(candle_core::quantized::gguf_file::Value::String(source)) => Some(source.as_str()),
        _ => None,
    };
    let template = ChatTemplate::new(template_source, tokens.bos_token.clone(), tokens.eos_token.clone())?;
    let tokenizer = Arc::new(tokens.tokenizer);
    let info = ModelInfo {
        id: spec.id.clone(),
        kind: ModelKind::Chat,
        architecture: loaded.architecture,
        quantization: loaded.quantization,
        context_length: loaded.context_length,
        created,
        hosts: Vec::new(),
    };
    let started = std::time::Instant::now();
    let grammar = match GrammarCompiler::new(tokenizer.clone(), &tokens.eos_token_ids) {
        Ok(compiler) => {
            tracing::debug!(model = %spec.id, seconds = started.elapsed().as_secs_f32(), "grammar vocabulary built");
            Some(Arc::new(compiler))
        }
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
    };
    let worker = GenerationWorker::spawn(runtime, limits)
        .map_err(|e| EngineError::Inference(format!("cannot start the worker thread: {e}")))?;
    let runner = ChatRunner {
        model_id: spec.id.clone(),
        template,
        tokenizer,
        bos_token_id: tokens.bos_token_id.filter(|_| tokens.add_bos_token),
        context_length: info.context_length,
        grammar,
        worker,
    };
    Ok(LocalModel { info, runner: Runner::Chat(Arc::new(runner)) })
}

/// `NAME.tokenizer.json` or `tokenizer.json` in the model's folder.
fn tokenizer_json_beside(model: &Path) -> Option<PathBuf> {
    let own = model.with_extension("tokenizer.json");
    let shared = model.parent()?.join("tokenizer.json");
    [own, shared].into_iter().find(|path| path.is_file())
}

impl ChatRunner {
    fn render(&self, prompt: &Prompt) -> Result<String, EngineError> {
        Ok(match prompt {
            Prompt::Chat(messages) => self.template.render(messages)?,
            Prompt::Text(text) => text.clone(),
            Prompt::Continue { prompt: OriginalPrompt::Chat(messages), generated } => {
                self.template.render(messages)? + generated
            }
            Prompt::Continue { prompt: OriginalPrompt::Text(text), generated } => {
                format!("{text}{generated}")
            }
        })
    }

    /// The grammar of `params.response_format`, compiled, and advanced through the text a
    /// continuation already has.
    fn constraint(
        &self,
        prompt: &Prompt,
        params: &SamplingParams,
    ) -> Result<Option<TokenConstraint>, EngineError> {
        if !params.response_format.is_constrained() {
            return Ok(None);
        }
        let Some(grammar) = &self.grammar else {
            return Err(EngineError::InvalidParam {
                param: "response_format".into(),
                message: format!("Model '{}' does not support 'response_format'.", self.model_id),
            });
        };
        let started = std::time::Instant::now();
        let mut constraint = grammar.compile(&params.response_format)?;
        tracing::debug!(milliseconds = started.elapsed().as_secs_f64() * 1e3, "grammar compiled");
        if let (Some(constraint), Prompt::Continue { generated, .. }) = (&mut constraint, prompt) {
            constraint.accept_text(generated).map_err(|error| {
                EngineError::Inference(format!("the answer so far does not fit its response_format: {error}"))
            })?;
        }
        Ok(constraint)
    }

    /// Render, tokenize, check the context window and queue in `place`. Runs on a blocking thread.
    fn submit(
        &self,
        request: GenerateRequest,
        place: QueuePlace,
        span: tracing::Span,
    ) -> Result<GenerationStream, EngineError> {
        let text = self.render(&request.prompt)?;
        let encoding = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| EngineError::InvalidRequest(format!("cannot tokenize the prompt: {e}")))?;
        let mut prompt_tokens = encoding.get_ids().to_vec();
        if let Some(bos) = self.bos_token_id
            && prompt_tokens.first() != Some(&bos)
        {
            prompt_tokens.insert(0, bos);
        }
        if prompt_tokens.is_empty() {
            return Err(EngineError::InvalidRequest("the prompt is empty".to_string()));
        }
        if prompt_tokens.len() >= self.context_length {
            return Err(EngineError::ContextLength {
                model: self.model_id.clone(),
                prompt_tokens: prompt_tokens.len(),
                context_length: self.context_length,
            });
        }
        let mut params = request.params;
        if params.max_tokens > self.context_length {
            return Err(EngineError::InvalidRequest(format!(
                "max_tokens is too large: {}. Model '{}' has a context window of {} tokens",
                params.max_tokens, self.model_id, self.context_length
            )));
        }
        // Within the window but too long for this prompt: generate what fits (finish_reason length).
        params.max_tokens = params.max_tokens.min(self.context_length - prompt_tokens.len());
        let constraint = self.constraint(&request.prompt, &params)?;
        let (events, stream) = mpsc::channel(EVENTS_PER_GENERATION);
        tracing::debug!(parent: &span, prompt_tokens = prompt_tokens.len(), max_tokens = params.max_tokens, "queued");
        place.submit(Job { prompt_tokens, params, constraint, events, span })?;
        Ok(GenerationStream::new(stream))
    }
}

impl Engine for LocalEngine {
    fn models(&self) -> Vec<ModelInfo> {
        self.models.values().map(|model| model.info.clone()).collect()
    }

    fn generate(
        &self,
        request: GenerateRequest,
    ) -> BoxFuture<'static, Result<GenerationStream, EngineError>> {
        let runner = match self.model(&request.model).map(|model| &model.runner) {
            Ok(Runner::Chat(runner)) => runner.clone(),
            Ok(Runner::Embeddings(_)) => {
                let error =
                    EngineError::WrongKind { model: request.model, operation: "chat or completions".into() };
                return futures::future::ready(Err(error)).boxed();
            }
            Err(error) => return futures::future::ready(Err(error)).boxed(),
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
        for model in self.models.values() {
            if let Runner::Chat(runner) = &model.runner {
                let worker = runner.worker.load();
                load.in_flight += worker.active;
                load.queued += worker.queued;
                load.prompt_cache_hits += worker.prompt_cache_hits;
                load.prompt_tokens_reused += worker.prompt_tokens_reused;
            }
        }
        load
    }

    fn embed(&self, request: EmbedRequest) -> BoxFuture<'static, Result<Embeddings, EngineError>> {
        let answer = match self.model(&request.model).map(|model| &model.runner) {
            Ok(Runner::Embeddings(worker)) => worker.submit(request.inputs),
            Ok(Runner::Chat(_)) => {
                Err(EngineError::WrongKind { model: request.model.clone(), operation: "embeddings".into() })
            }
            Err(error) => Err(error),
        };
        let model = request.model;
        async move { answer?.await.map_err(|_| EngineError::ShuttingDown(model))? }.boxed()
    }
}
