//! A chat model's request path, on the blocking thread that prepares a request: the prompt
//! rendered with the chat template (and the tools), tokenized and checked against the context
//! window, its grammar compiled, then queued for the model's worker.

use std::sync::Arc;

use tokenizers::Tokenizer;
use tokio::sync::mpsc;

use super::super::chat_template::ChatTemplate;
use super::super::grammar::{GenerationGrammar, GrammarCompiler, SCHEMA_PARAM};
use super::super::scheduler::{GenerationWorker, Job, QueuePlace};
use super::super::tools::{GrammarPlan, grammar_plan};
use super::super::{
    EngineError, GenerateRequest, GenerationStream, InvalidParam, OriginalPrompt, Prompt, SamplingParams,
    ToolParams,
};
use super::EVENTS_PER_GENERATION;

/// Turns a request into prompt tokens and hands it to the model's worker.
pub(super) struct ChatRunner {
    pub(super) model_id: String,
    pub(super) template: ChatTemplate,
    pub(super) tokenizer: Arc<Tokenizer>,
    /// Prepended when the file asks for it and the rendered prompt lacks it.
    pub(super) bos_token_id: Option<u32>,
    pub(super) context_length: usize,
    /// `None`, or failing to build, when llguidance cannot take the vocabulary: constrained
    /// requests are refused.
    pub(super) grammar: Option<Arc<GrammarCompiler>>,
    pub(super) worker: GenerationWorker,
}

impl ChatRunner {
    fn render(&self, prompt: &Prompt, tools: &ToolParams) -> Result<String, EngineError> {
        Ok(match prompt {
            Prompt::Chat(messages) => self.template.render(messages, tools)?,
            Prompt::Text(text) => text.clone(),
            Prompt::Continue { prompt: OriginalPrompt::Chat(messages), generated } => {
                self.template.render(messages, tools)? + generated
            }
            Prompt::Continue { prompt: OriginalPrompt::Text(text), generated } => {
                format!("{text}{generated}")
            }
        })
    }

    /// The grammar of `params.response_format` and `params.tools`, compiled, and advanced
    /// through the text a continuation already has.
    fn grammar(
        &self,
        prompt: &Prompt,
        params: &SamplingParams,
    ) -> Result<Option<GenerationGrammar>, EngineError> {
        let format = self.template.tool_format();
        let plan = grammar_plan(&params.tools, &params.response_format, format)
            .map_err(InvalidParam::naming_the_field)?;
        let (grammar, marker) = match plan {
            GrammarPlan::Free => return Ok(None),
            GrammarPlan::Now(grammar) => (grammar, None),
            GrammarPlan::AfterMarker { marker, at_start, grammar } => (grammar, Some((marker, at_start))),
        };
        let (field, param) =
            if params.tools.active() { ("tools", "tools") } else { ("response_format", SCHEMA_PARAM) };
        // The first constrained request builds the compiler's factory (see `GrammarCompiler`).
        let Some(compiler) = self.grammar.as_ref().filter(|compiler| compiler.ready().is_ok()) else {
            return Err(EngineError::InvalidParam {
                param: field.into(),
                message: format!("Model '{}' does not support '{field}'.", self.model_id),
            });
        };
        let started = std::time::Instant::now();
        let constraint = compiler.compile_grammar(grammar, param)?;
        tracing::debug!(milliseconds = started.elapsed().as_secs_f64() * 1e3, "grammar compiled");
        let mut grammar = match marker {
            None => GenerationGrammar::now(constraint),
            Some((marker, at_start)) => GenerationGrammar::after_marker(constraint, marker, at_start),
        };
        if let Prompt::Continue { generated, .. } = prompt {
            let advanced = match grammar.active() {
                Some(constraint) => constraint.accept_text(generated),
                None => grammar.observe_text(generated),
            };
            advanced.map_err(|error| {
                EngineError::Inference(format!("the answer so far does not fit its grammar: {error}"))
            })?;
        }
        Ok(Some(grammar))
    }

    /// Render, tokenize, check the context window and queue in `place`. Runs on a blocking thread.
    pub(super) fn submit(
        &self,
        request: GenerateRequest,
        place: QueuePlace,
        span: tracing::Span,
    ) -> Result<GenerationStream, EngineError> {
        let text = self.render(&request.prompt, &request.params.tools)?;
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
        let vocabulary_size = self.tokenizer.get_vocab_size(true);
        if let Some((token, _)) =
            params.logit_bias.iter().find(|(token, _)| *token as usize >= vocabulary_size)
        {
            return Err(EngineError::InvalidParam {
                param: "logit_bias".into(),
                message: format!(
                    "Token {token} is not in the vocabulary of model '{}' ({vocabulary_size} tokens).",
                    self.model_id
                ),
            });
        }
        if params.max_tokens > self.context_length {
            return Err(EngineError::InvalidRequest(format!(
                "max_tokens is too large: {}. Model '{}' has a context window of {} tokens",
                params.max_tokens, self.model_id, self.context_length
            )));
        }
        // Within the window but too long for this prompt: generate what fits (finish_reason length).
        params.max_tokens = params.max_tokens.min(self.context_length - prompt_tokens.len());
        let grammar = self.grammar(&request.prompt, &params)?;
        let (events, stream) = mpsc::channel(EVENTS_PER_GENERATION);
        tracing::debug!(parent: &span, prompt_tokens = prompt_tokens.len(), max_tokens = params.max_tokens, "queued");
        place.submit(Job { prompt_tokens, params, grammar, events, span })?;
        Ok(GenerationStream::new(stream))
    }
}
