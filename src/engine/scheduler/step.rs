//! One batch step: which generations take part and with how many tokens (`plan`, pure), and
//! running them through the model together (`run`).
//!
//! As in vLLM's scheduler and llama.cpp's server slots: every decoding generation runs its one
//! token in every step, and prompts are prefilled in chunks that share a step's budget, so a long
//! prompt arriving never stalls the streams already running for more than one chunk, and a new
//! request's first token waits for its own prompt, not for the others' answers.

use super::super::models::{BatchEntry, Sequence};
use super::ModelRuntime;
use super::generation::{Generation, Work};

/// Prompt tokens run in one step, across all the prompts being prefilled. Bounds how long a step
/// takes while others are decoding; large enough that a prefill chunk reads each weight once for
/// many rows.
pub const PREFILL_BUDGET: usize = 256;

/// Tokens each generation runs in the next step (0: not this step), given what each asks for
/// (`None`: nothing now). Every decode runs; prefills share `prefill_budget` first come, first
/// served.
pub fn plan(work: &[Option<Work>], prefill_budget: usize) -> Vec<usize> {
    let mut budget = prefill_budget;
    work.iter()
        .map(|work| match work {
            None => 0,
            Some(Work::Decode) => 1,
            Some(Work::Prefill { remaining }) => {
                let chunk = (*remaining).min(budget);
                budget -= chunk;
                chunk
            }
        })
        .collect()
}

/// A generation's part of a step: its sequence, lent for the step, and what it runs.
struct Input {
    sequence: Box<dyn Sequence>,
    tokens: Vec<u32>,
    position: usize,
}

/// Run one step: `active[i]` runs `plan[i]` tokens. Each generation that needs this step's logits
/// gets them; a generation whose forward pass fails gets the error.
pub fn run(runtime: &ModelRuntime, active: &mut [Generation], plan: &[usize]) {
    let mut taking_part = Vec::new();
    let mut inputs = Vec::new();
    for (index, (generation, &count)) in active.iter_mut().zip(plan).enumerate() {
        if count == 0 {
            continue;
        }
        let (tokens, position) = generation.input(count);
        if let Some(sequence) = generation.lend_sequence() {
            taking_part.push(index);
            inputs.push(Input { sequence, tokens, position });
        }
    }
    if inputs.is_empty() {
        return;
    }
    let outcomes = forward_while_masking(runtime, &mut inputs, active);
    for ((index, input), outcome) in taking_part.into_iter().zip(inputs).zip(outcomes) {
        let generation = &mut active[index];
        match outcome {
            Ok(mut logits) => {
                if generation.ran(input.sequence, &input.tokens) {
                    generation.accept_logits(runtime, &mut logits);
                }
            }
            Err(error) => generation.fail(Some(input.sequence), &error),
        }
    }
}

/// `forward_each`, while another thread computes the grammar masks of the generations that have
/// one, so that a mask costs the time between tokens only what it takes beyond the forward pass.
/// (Each generation's grammar is already advanced by its last token; the sequences are lent out
/// to `inputs`, so the two threads share nothing.)
fn forward_while_masking(
    runtime: &ModelRuntime,
    inputs: &mut [Input],
    active: &mut [Generation],
) -> Vec<candle_core::Result<Vec<f32>>> {
    if !active.iter().any(Generation::needs_mask) {
        return forward_each(runtime, inputs);
    }
    let started = std::time::Instant::now();
    let (outcomes, forward_time) = std::thread::scope(|scope| {
        let masking = std::thread::Builder::new()
            .name("grammar-masks".into())
            .spawn_scoped(scope, || active.iter_mut().for_each(Generation::prepare_mask));
        if let Err(error) = &masking {
            // Each mask is then computed when its logits arrive.
            tracing::warn!(%error, "cannot start a thread for grammar masks");
        }
        let forward_started = std::time::Instant::now();
        let outcomes = forward_each(runtime, inputs);
        let forward_time = forward_started.elapsed();
        if let Ok(masking) = masking
            && masking.join().is_err()
        {
            tracing::error!("computing grammar masks panicked");
        }
        (outcomes, forward_time)
    });
    let wait = started.elapsed().saturating_sub(forward_time);
    active.iter_mut().for_each(|generation| generation.waited_for_mask(wait));
    outcomes
}

/// The logits of each input, from one batch forward; when that fails for a batch of several,
/// each input is run alone, so that one bad sequence fails only its own generation.
fn forward_each(runtime: &ModelRuntime, inputs: &mut [Input]) -> Vec<candle_core::Result<Vec<f32>>> {
    match forward_batch(runtime, inputs) {
        Ok(logits) => logits.into_iter().map(Ok).collect(),
        Err(error) if inputs.len() == 1 => vec![Err(error)],
        Err(error) => {
            tracing::warn!(%error, entries = inputs.len(), "batch step failed; running its entries one by one");
            inputs
                .iter_mut()
                .map(|input| {
                    forward_batch(runtime, std::slice::from_mut(input))
                        .map(|mut logits| logits.pop().unwrap_or_default())
                })
                .collect()
        }
    }
}

fn forward_batch(runtime: &ModelRuntime, inputs: &mut [Input]) -> candle_core::Result<Vec<Vec<f32>>> {
    let mut batch: Vec<BatchEntry<'_>> = inputs
        .iter_mut()
        .map(|input| BatchEntry {
            sequence: input.sequence.as_mut(),
            tokens: &input.tokens,
            position: input.position,
        })
        .collect();
    let logits = runtime.model.forward_batch(&mut batch)?;
    let logits = logits.to_dtype(candle_core::DType::F32)?.to_vec2::<f32>()?;
    if logits.len() != inputs.len() {
        candle_core::bail!("{} rows of logits for {} sequences", logits.len(), inputs.len());
    }
    Ok(logits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_decode_runs_and_prefills_share_the_budget_in_order() {
        let work = [
            Some(Work::Prefill { remaining: 300 }),
            Some(Work::Decode),
            None,
            Some(Work::Prefill { remaining: 40 }),
            Some(Work::Decode),
        ];
        assert_eq!(plan(&work, 256), vec![256, 1, 0, 0, 1]);
        assert_eq!(plan(&work, 400), vec![300, 1, 0, 40, 1]);
    }

    #[test]
    fn a_long_prompt_leaves_decodes_running_in_every_step() {
        let mut remaining = 1000;
        let mut steps = 0;
        while remaining > 0 {
            let step =
                plan(&[Some(Work::Decode), Some(Work::Prefill { remaining }), Some(Work::Decode)], 256);
            assert_eq!((step[0], step[2]), (1, 1));
            remaining -= step[1];
            steps += 1;
        }
        assert_eq!(steps, 4);
    }
}
