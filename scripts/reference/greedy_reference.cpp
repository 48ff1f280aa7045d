// The reference answers llmesh's decoder is held to: llama.cpp's own tokenizer and forward pass,
// driven through libllama, greedy (argmax, no sampler) for a fixed number of steps, with the top
// logits of every step. Built and run by scripts/make-reference-fixtures.sh; prints JSON.
//
//   greedy_reference --model FILE --version TEXT [--steps 64] [--top 5] [--kv-cache f32|f16]
//                    [--dequantized-from NAME] [--prompt-token-by-token] PROMPT...
//
// A PROMPT is tokenized as llama-server tokenizes a rendered prompt: special tokens in the text
// are parsed, and BOS is added when the model's metadata asks for it. A PROMPT written
// "chat:MESSAGE" is first rendered as one user turn with the model's own chat template
// (llama_chat_apply_template), ending with the assistant's turn opened.
//
// The run is made as exact as llama.cpp allows, so that the fixtures measure the weights' and
// activations' quantization rather than incidental choices: the KV cache is f32 unless
// --kv-cache f16 asks for llama.cpp's default (llmesh's on the CPU; the fixtures of the files as
// stored use it, those of f32 weights keep the exact f32 computation), and flash attention is off.
// Every prompt runs in one batch from an empty cache, then one token per step, as llmesh's prefill
// and decode do.
//
// --dequantized-from NAME records that FILE is the model NAME with every weight dequantized to
// f32 (llama-quantize F32): no activation is quantized then, so llama.cpp and llmesh compute the
// same function in f32. --prompt-token-by-token runs the prompt one token at a time instead, to
// measure how far llama.cpp moves from itself when only its summation order changes.

#include "llama.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

namespace {

[[noreturn]] void fail(const std::string & message) {
    std::fprintf(stderr, "greedy_reference: %s\n", message.c_str());
    std::exit(1);
}

void quiet_log(enum ggml_log_level level, const char * text, void *) {
    if (level >= GGML_LOG_LEVEL_WARN) {
        std::fputs(text, stderr);
    }
}

// A JSON string literal; bytes that are not valid UTF-8 (a piece can end inside a character)
// become U+FFFD, so the output always parses.
std::string json_string(const std::string & text) {
    std::string out = "\"";
    size_t i = 0;
    while (i < text.size()) {
        unsigned char c = static_cast<unsigned char>(text[i]);
        size_t len = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xE ? 3 : (c >> 3) == 0x1E ? 4 : 0;
        bool valid = len > 0 && i + len <= text.size();
        for (size_t k = 1; valid && k < len; k++) {
            valid = (static_cast<unsigned char>(text[i + k]) >> 6) == 0x2;
        }
        if (valid && len > 1) {  // no overlong forms, surrogates or code points past U+10FFFF
            unsigned char next = static_cast<unsigned char>(text[i + 1]);
            valid = c >= 0xC2 && c <= 0xF4 && !(c == 0xE0 && next < 0xA0) && !(c == 0xED && next >= 0xA0) &&
                    !(c == 0xF0 && next < 0x90) && !(c == 0xF4 && next >= 0x90);
        }
        if (!valid) {
            out += "\\ufffd";
            i++;
            continue;
        }
        if (len > 1) {
            out.append(text, i, len);
        } else if (c == '"' || c == '\\') {
            out += '\\';
            out += static_cast<char>(c);
        } else if (c == '\n') {
            out += "\\n";
        } else if (c == '\t') {
            out += "\\t";
        } else if (c == '\r') {
            out += "\\r";
        } else if (c < 0x20) {
            char buf[8];
            std::snprintf(buf, sizeof buf, "\\u%04x", c);
            out += buf;
        } else {
            out += static_cast<char>(c);
        }
        i += len;
    }
    return out + "\"";
}

std::string render_chat(const llama_model * model, const std::string & message) {
    const char * tmpl = llama_model_chat_template(model, nullptr);
    if (tmpl == nullptr) {
        fail("the model has no chat template for a chat: prompt");
    }
    llama_chat_message chat[] = { { "user", message.c_str() } };
    std::vector<char> buf(2 * message.size() + 512);
    int32_t n = llama_chat_apply_template(tmpl, chat, 1, true, buf.data(), buf.size());
    if (n > static_cast<int32_t>(buf.size())) {
        buf.resize(n);
        n = llama_chat_apply_template(tmpl, chat, 1, true, buf.data(), buf.size());
    }
    if (n < 0) {
        fail("llama.cpp does not know the model's chat template");
    }
    return std::string(buf.data(), n);
}

std::vector<llama_token> tokenize(const llama_vocab * vocab, const std::string & text) {
    std::vector<llama_token> tokens(text.size() + 8);
    int32_t n = llama_tokenize(vocab, text.data(), text.size(), tokens.data(), tokens.size(), true, true);
    if (n < 0) {
        tokens.resize(-n);
        n = llama_tokenize(vocab, text.data(), text.size(), tokens.data(), tokens.size(), true, true);
    }
    if (n <= 0) {
        fail("cannot tokenize prompt: " + text);
    }
    tokens.resize(n);
    return tokens;
}

std::string detokenize(const llama_vocab * vocab, const std::vector<llama_token> & tokens) {
    std::string text(tokens.size() * 16 + 16, '\0');
    int32_t n = llama_detokenize(vocab, tokens.data(), tokens.size(), text.data(), text.size(), false, true);
    if (n < 0) {
        text.resize(-n);
        n = llama_detokenize(vocab, tokens.data(), tokens.size(), text.data(), text.size(), false, true);
    }
    text.resize(n < 0 ? 0 : n);
    return text;
}

// The `count` largest logits, largest first; ties go to the lower id, as an argmax scan does.
std::vector<std::pair<llama_token, float>> top_logits(const float * logits, int32_t vocab_size, int count) {
    std::vector<std::pair<llama_token, float>> top;
    for (llama_token id = 0; id < vocab_size; id++) {
        size_t at = top.size();
        while (at > 0 && logits[id] > top[at - 1].second) {
            at--;
        }
        if (at < static_cast<size_t>(count)) {
            top.insert(top.begin() + at, { id, logits[id] });
            if (top.size() > static_cast<size_t>(count)) {
                top.pop_back();
            }
        }
    }
    return top;
}

void decode(llama_context * ctx, std::vector<llama_token> & tokens) {
    if (llama_decode(ctx, llama_batch_get_one(tokens.data(), tokens.size())) != 0) {
        fail("llama_decode failed");
    }
}

}  // namespace

int main(int argc, char ** argv) {
    std::string model_path;
    std::string version;
    int steps = 64;
    int top = 5;
    bool token_by_token = false;
    std::string kv_cache = "f32";
    std::string dequantized_from;
    std::vector<std::string> prompts;
    for (int i = 1; i < argc; i++) {
        std::string arg = argv[i];
        auto value = [&]() -> std::string {
            if (i + 1 >= argc) {
                fail(arg + " needs a value");
            }
            return argv[++i];
        };
        if (arg == "--model") {
            model_path = value();
        } else if (arg == "--version") {
            version = value();
        } else if (arg == "--steps") {
            steps = std::atoi(value().c_str());
        } else if (arg == "--dequantized-from") {
            dequantized_from = value();
        } else if (arg == "--kv-cache") {
            kv_cache = value();
        } else if (arg == "--prompt-token-by-token") {
            token_by_token = true;
        } else if (arg == "--top") {
            top = std::atoi(value().c_str());
        } else {
            prompts.push_back(arg);
        }
    }
    if (model_path.empty() || prompts.empty() || steps <= 0 || top <= 0 || (kv_cache != "f32" && kv_cache != "f16")) {
        fail("usage: greedy_reference --model FILE --version TEXT [--steps N] [--top K] [--kv-cache f32|f16] PROMPT...");
    }

    llama_log_set(quiet_log, nullptr);
    llama_backend_init();
    llama_model_params model_params = llama_model_default_params();
    model_params.progress_callback = [](float, void *) { return true; };  // no dots on stderr
    llama_model * model = llama_model_load_from_file(model_path.c_str(), model_params);
    if (model == nullptr) {
        fail("cannot load " + model_path);
    }
    const llama_vocab * vocab = llama_model_get_vocab(model);
    const int32_t vocab_size = llama_vocab_n_tokens(vocab);

    llama_context_params ctx_params = llama_context_default_params();
    ctx_params.n_ctx = 1024;
    ctx_params.n_batch = 1024;
    ctx_params.n_ubatch = 1024;
    ctx_params.n_threads = 2;
    ctx_params.n_threads_batch = 2;
    ctx_params.type_k = kv_cache == "f16" ? GGML_TYPE_F16 : GGML_TYPE_F32;
    ctx_params.type_v = ctx_params.type_k;
    ctx_params.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    llama_context * ctx = llama_init_from_model(model, ctx_params);
    if (ctx == nullptr) {
        fail("cannot create a context");
    }

    const char * base = std::strrchr(model_path.c_str(), '/');
    std::string name = !dequantized_from.empty() ? dequantized_from : base ? base + 1 : model_path;
    std::printf("{\n  \"model\": %s,\n", json_string(name).c_str());
    std::printf("  \"dequantized\": %s,\n", dequantized_from.empty() ? "false" : "true");
    std::printf("  \"reference\": %s,\n", json_string(version).c_str());
    std::printf("  \"kv_cache\": \"%s\",\n", kv_cache.c_str());
    std::printf("  \"settings\": \"greedy, %d steps, top %d logits, %s KV cache, no flash attention, "
                "prompt %s\",\n", steps, top, kv_cache.c_str(), token_by_token ? "token by token" : "in one batch");
    std::printf("  \"add_bos\": %s,\n  \"cases\": [\n", llama_vocab_get_add_bos(vocab) ? "true" : "false");
    for (size_t p = 0; p < prompts.size(); p++) {
        const std::string & given = prompts[p];
        bool chat = given.rfind("chat:", 0) == 0;
        std::string text = chat ? render_chat(model, given.substr(5)) : given;
        std::vector<llama_token> prompt_tokens = tokenize(vocab, text);
        if (prompt_tokens.size() + steps > ctx_params.n_ctx) {
            fail("prompt too long: " + text);
        }
        llama_memory_clear(llama_get_memory(ctx), true);

        std::vector<llama_token> input = prompt_tokens;
        std::vector<llama_token> generated;
        std::string steps_json;
        if (token_by_token) {
            for (size_t i = 0; i + 1 < input.size(); i++) {
                std::vector<llama_token> one = { input[i] };
                decode(ctx, one);
            }
            input = { input.back() };
        }
        for (int step = 0; step < steps; step++) {
            decode(ctx, input);
            const float * logits = llama_get_logits_ith(ctx, -1);
            if (logits == nullptr) {
                fail("no logits");
            }
            auto best = top_logits(logits, vocab_size, top);
            llama_token next = best[0].first;
            generated.push_back(next);
            steps_json += step == 0 ? "\n" : ",\n";
            steps_json += "        [";
            for (size_t k = 0; k < best.size(); k++) {
                char entry[64];
                std::snprintf(entry, sizeof entry, "%s[%d, %.9g]", k ? ", " : "", best[k].first, best[k].second);
                steps_json += entry;
            }
            steps_json += "]";
            // Past an end-of-generation token the model simply goes on; so does the fixture.
            input = { next };
        }

        auto ids = [](const std::vector<llama_token> & tokens) {
            std::string out = "[";
            for (size_t i = 0; i < tokens.size(); i++) {
                out += (i ? ", " : "") + std::to_string(tokens[i]);
            }
            return out + "]";
        };
        std::printf("    {\n      \"prompt\": %s,\n", json_string(text).c_str());
        std::printf("      \"prompt_tokens\": %s,\n", ids(prompt_tokens).c_str());
        std::printf("      \"generated_tokens\": %s,\n", ids(generated).c_str());
        std::printf("      \"generated_text\": %s,\n", json_string(detokenize(vocab, generated)).c_str());
        std::printf("      \"top_logits\": [%s\n      ]\n    }%s\n", steps_json.c_str(),
                    p + 1 < prompts.size() ? "," : "");
    }
    std::printf("  ]\n}\n");

    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
