#!/usr/bin/env python3
"""Write one tiny GGUF per decoder family into tests/fixtures/tiny/ (or the folder given): two
layers, width 64, random f32 weights from a fixed seed, with that family's real tensor names,
metadata keys and kind of tokenizer (a gpt2 byte-level BPE vocabulary with the family's
`tokenizer.ggml.pre`, or a SentencePiece one, learnt here from a small corpus). llama.cpp's answers on them are the
fixtures of src/engine/models/reference_tests.rs (scripts/make-reference-fixtures.sh).

Needs the `gguf` package llama.cpp ships and numpy:
  PYTHONPATH=$LLAMA_CPP/gguf-py python scripts/make-tiny-models.py [OUT_DIR]
The same seed writes the same files byte for byte.
"""

import re
import sys
from pathlib import Path

import numpy as np
import gguf

HIDDEN = 64
LAYERS = 2
HEADS = 4
KV_HEADS = 2
HEAD_DIM = HIDDEN // HEADS
FFN = 128
CONTEXT = 256
MERGES = 300

CORPUS = """The capital of France is Paris. Once upon a time, in a small village by the sea, there
lived an old fisherman and his daughter. def fibonacci(n): Return the n-th Fibonacci number.
if n < 2: return n else: return fibonacci(n - 1) + fibonacci(n - 2). Zürich, 1848: the café's 12
tables were full, and the waiters ran. What are three tips for staying healthy? Eat well, sleep
enough and move every day. The quick brown fox jumps over the lazy dog 0123456789 times."""

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)


def bytes_to_unicode():
    """GPT-2's printable stand-in for every byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {byte: chr(char) for byte, char in zip(printable, chars)}


def byte_level_bpe(specials):
    """A small byte-level BPE: the 256 byte tokens, `MERGES` merges learnt on the corpus, then the
    special tokens. Returns (tokens, types, merges)."""
    mapping = bytes_to_unicode()
    words = {}
    for word in re.findall(r" ?[A-Za-z\u00c0-\u024f]+| ?[0-9]| ?[^\sA-Za-z0-9]+|\s+", CORPUS):
        symbols = tuple(mapping[b] for b in word.encode("utf-8"))
        words[symbols] = words.get(symbols, 0) + 1
    tokens = [mapping[b] for b in range(256)]
    merges = []
    for _ in range(MERGES):
        pairs = {}
        for symbols, count in words.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] = pairs.get(pair, 0) + count
        if not pairs:
            break
        best = max(sorted(pairs), key=lambda pair: pairs[pair])
        merges.append(f"{best[0]} {best[1]}")
        if best[0] + best[1] not in tokens:  # two merge paths can make the same text
            tokens.append(best[0] + best[1])
        merged = {}
        for symbols, count in words.items():
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(best[0] + best[1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + count
        words = merged
    types = [gguf.TokenType.NORMAL] * len(tokens) + [gguf.TokenType.CONTROL] * len(specials)
    return tokens + specials, types, merges


def sentencepiece(specials):
    """A small SentencePiece vocabulary as llama.cpp stores one: <unk>, <s>, </s>, the 256 byte
    tokens, the corpus's characters, pieces learnt on it (scored by rank), then the special tokens.
    Returns (tokens, types, scores)."""
    text = "▁" + CORPUS.replace("\n", " ").replace(" ", "▁")
    words = {}
    for word in re.findall(r"▁?[^▁]+", text):
        words[tuple(word)] = words.get(tuple(word), 0) + 1
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    types += [gguf.TokenType.BYTE] * 256
    scores = [0.0] * len(tokens)
    for char in sorted(set(text)):
        tokens.append(char)
        types.append(gguf.TokenType.NORMAL)
        scores.append(-1000.0)
    for rank in range(MERGES):
        pairs = {}
        for symbols, count in words.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] = pairs.get(pair, 0) + count
        if not pairs:
            break
        best = max(sorted(pairs), key=lambda pair: pairs[pair])
        if best[0] + best[1] not in tokens:
            tokens.append(best[0] + best[1])
            types.append(gguf.TokenType.NORMAL)
            scores.append(-float(rank))
        merged = {}
        for symbols, count in words.items():
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(best[0] + best[1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + count
        words = merged
    return tokens + specials, types + [gguf.TokenType.CONTROL] * len(specials), scores + [0.0] * len(specials)


PHI3_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>' + '\n' + message['content'] + '<|end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' + '\n' }}{% endif %}"
)


LLAMA3_TEMPLATE = (
    "{{ '<|begin_of_text|>' }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] +"
    " '<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def llama3_rope_factors(base, factor=8.0, low=1.0, high=4.0, original=8192):
    """Llama 3.1's rope scaling as convert_hf_to_gguf.py stores it: one divisor per frequency."""
    factors = []
    for i in range(0, HEAD_DIM, 2):
        wavelength = 2 * np.pi * base ** (i / HEAD_DIM)
        if wavelength < original / high:
            factors.append(1.0)
        elif wavelength > original / low:
            factors.append(factor)
        else:
            smooth = (original / wavelength - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<start_of_turn>' + message['role'] + '\n' + message['content']"
    " + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

# Gemma 2: every other layer attends to a window this wide. Shorter than the fixtures' prompts,
# so the window is exercised; the soft caps low enough that the tanh bends random logits.
GEMMA2_WINDOW = 8
GEMMA2_ATTENTION_CAP = 8.0
GEMMA2_FINAL_CAP = 10.0


# Phi-3's 128k files: LongRoPE from an original window this long (shorter than the tiny model's, so
# llama.cpp and llmesh both take the long factors).
LONGROPE_ORIGINAL = 64


def write(path, architecture, pre, rng, bias=False, qk_norm=False, fused=False, rope_base=1_000_000.0,
          longrope=False):
    writer = gguf.GGUFWriter(str(path), architecture)
    gemma = architecture == "gemma2"
    if gemma:  # SentencePiece without a space prefix, its turn tokens special
        specials = ["<start_of_turn>", "<end_of_turn>"]
        tokens, types, scores = sentencepiece(specials)
        writer.add_tokenizer_model("llama")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_scores(scores)
        writer.add_unk_token_id(0)
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_eot_token_id(tokens.index("<end_of_turn>"))
        writer.add_add_bos_token(True)
        writer.add_add_space_prefix(False)
        writer.add_chat_template(GEMMA_TEMPLATE)
        writer.add_sliding_window(GEMMA2_WINDOW)
        writer.add_attn_logit_softcapping(GEMMA2_ATTENTION_CAP)
        writer.add_final_logit_softcapping(GEMMA2_FINAL_CAP)
    elif pre is None:  # SentencePiece, as phi3 and llama 2 files hold it
        specials = ["<|endoftext|>", "<|assistant|>", "<|end|>", "<|user|>"]
        tokens, types, scores = sentencepiece(specials)
        writer.add_tokenizer_model("llama")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_scores(scores)
        writer.add_unk_token_id(0)
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(tokens.index("<|endoftext|>"))
        writer.add_add_bos_token(True)
        writer.add_chat_template(PHI3_TEMPLATE)
    elif pre == "llama-bpe":  # Llama 3: its own end-of-turn token beside the end of text
        specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
        tokens, types, merges = byte_level_bpe(specials)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
        writer.add_bos_token_id(tokens.index("<|begin_of_text|>"))
        writer.add_eos_token_id(tokens.index("<|end_of_text|>"))
        writer.add_add_bos_token(True)
        writer.add_chat_template(LLAMA3_TEMPLATE)
    else:
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        tokens, types, merges = byte_level_bpe(specials)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
        writer.add_bos_token_id(tokens.index("<|endoftext|>"))
        writer.add_eos_token_id(tokens.index("<|im_end|>"))
        writer.add_add_bos_token(False)
        writer.add_chat_template(CHATML)
    vocab = len(tokens)
    writer.add_name(f"tiny-{architecture}")
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(rope_base)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)

    def tensor(name, *shape, scale):
        writer.add_tensor(name, (rng.standard_normal(shape) * scale).astype(np.float32))

    def norm(name, size):
        writer.add_tensor(name, (1.0 + 0.1 * rng.standard_normal(size)).astype(np.float32))

    # Unit embeddings and a wide output layer: logits spread over several units, so the greedy
    # choice is no tie; attention and feed-forward weights large enough to matter.
    tensor("token_embd.weight", vocab, HIDDEN, scale=1.0)
    norm("output_norm.weight", HIDDEN)
    if longrope:
        # As convert_hf_to_gguf.py writes a 128k Phi-3: the original window, the attention factor
        # sqrt(1 + ln(scale) / ln(original)), and one long and one short divisor per frequency.
        scale = CONTEXT / LONGROPE_ORIGINAL
        writer.add_rope_scaling_orig_ctx_len(LONGROPE_ORIGINAL)
        writer.add_rope_scaling_attn_factors(float(np.sqrt(1 + np.log(scale) / np.log(LONGROPE_ORIGINAL))))
        writer.add_tensor("rope_factors_long.weight", np.linspace(1.0, 12.0, HEAD_DIM // 2, dtype=np.float32))
        writer.add_tensor("rope_factors_short.weight", np.linspace(1.0, 1.5, HEAD_DIM // 2, dtype=np.float32))
    if architecture == "llama":
        writer.add_rope_dimension_count(HEAD_DIM)
        # Llama 3.1 scales from an original window of 8192; the tiny model's 256 puts the scaled
        # frequencies where the fixtures' few dozen positions turn them.
        writer.add_tensor("rope_freqs.weight", llama3_rope_factors(rope_base, original=CONTEXT))
    if not gemma:  # gemma's output layer is its token table
        tensor("output.weight", vocab, HIDDEN, scale=0.5)
    for layer in range(LAYERS):
        blk = f"blk.{layer}"
        norm(f"{blk}.attn_norm.weight", HIDDEN)
        if fused:  # q|k|v rows in one matrix
            tensor(f"{blk}.attn_qkv.weight", (HEADS + 2 * KV_HEADS) * HEAD_DIM, HIDDEN, scale=0.25)
        else:
            tensor(f"{blk}.attn_q.weight", HEADS * HEAD_DIM, HIDDEN, scale=0.25)
            tensor(f"{blk}.attn_k.weight", KV_HEADS * HEAD_DIM, HIDDEN, scale=0.25)
            tensor(f"{blk}.attn_v.weight", KV_HEADS * HEAD_DIM, HIDDEN, scale=0.25)
        if bias:
            tensor(f"{blk}.attn_q.bias", HEADS * HEAD_DIM, scale=0.5)
            tensor(f"{blk}.attn_k.bias", KV_HEADS * HEAD_DIM, scale=0.5)
            tensor(f"{blk}.attn_v.bias", KV_HEADS * HEAD_DIM, scale=0.5)
        if qk_norm:
            norm(f"{blk}.attn_q_norm.weight", HEAD_DIM)
            norm(f"{blk}.attn_k_norm.weight", HEAD_DIM)
        tensor(f"{blk}.attn_output.weight", HIDDEN, HEADS * HEAD_DIM, scale=0.15)
        if gemma:
            norm(f"{blk}.post_attention_norm.weight", HIDDEN)
            norm(f"{blk}.post_ffw_norm.weight", HIDDEN)
        norm(f"{blk}.ffn_norm.weight", HIDDEN)
        if fused:  # gate|up rows in one `ffn_up`, no `ffn_gate`
            tensor(f"{blk}.ffn_up.weight", 2 * FFN, HIDDEN, scale=0.15)
        else:
            tensor(f"{blk}.ffn_gate.weight", FFN, HIDDEN, scale=0.15)
            tensor(f"{blk}.ffn_up.weight", FFN, HIDDEN, scale=0.15)
        tensor(f"{blk}.ffn_down.weight", HIDDEN, FFN, scale=0.15)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def main():
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/tiny")
    out.mkdir(parents=True, exist_ok=True)
    # One generator per file, so adding a family never changes another's weights.
    write(out / "tiny-qwen2.gguf", "qwen2", "qwen2", np.random.default_rng(2), bias=True)
    write(out / "tiny-qwen3.gguf", "qwen3", "qwen2", np.random.default_rng(3), qk_norm=True)
    write(out / "tiny-llama3.gguf", "llama", "llama-bpe", np.random.default_rng(5), rope_base=500_000.0)
    write(out / "tiny-gemma2.gguf", "gemma2", None, np.random.default_rng(6), rope_base=10_000.0)
    write(out / "tiny-phi3.gguf", "phi3", None, np.random.default_rng(4), fused=True, rope_base=10_000.0)
    write(out / "tiny-phi3-longrope.gguf", "phi3", None, np.random.default_rng(7), fused=True, rope_base=10_000.0,
          longrope=True)
    print(f"wrote the tiny models in {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
