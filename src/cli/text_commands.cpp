// `zimage tokenize` and `zimage encode-prompt`: the text half of the pipeline on its own, for
// debugging prompts and checking parity with other implementations.
#include <cstdio>

#include "cli/commands.h"
#include "cli/engine.h"
#include "core/log.h"
#include "io/safetensors.h"
#include "model/model_source.h"
#include "model/qwen3.h"
#include "text/tokenizer.h"

namespace zimage::cli {

Command add_tokenize(CLI::App& app) {
  auto* cmd = app.add_subcommand("tokenize", "Print the token ids of a text as a JSON array");
  struct Opts {
    std::string model, text;
    bool chat = false;
    int max_len = 0;
  };
  auto o = std::make_shared<Opts>();
  cmd->add_option("--model,--model-path", o->model, "Model folder or synthetic:tiny|turbo")->required();
  cmd->add_option("--text", o->text, "Text to tokenize")->required();
  cmd->add_flag("--chat", o->chat, "Apply the Z-Image chat template first");
  cmd->add_option("--max-sequence-length", o->max_len, "Truncate to this many tokens (0: no limit)")->check(CLI::NonNegativeNumber);
  return {cmd, [o] {
            check_prompt(o->text, "--text");
            Tokenizer tok = Tokenizer::load(open_model(o->model).tokenizer_dir);
            std::vector<int32_t> ids = tok.encode(o->chat ? zimage_chat_template(o->text) : o->text);
            if (o->max_len > 0 && int(ids.size()) > o->max_len) ids.resize(size_t(o->max_len));
            std::printf("[");
            for (size_t i = 0; i < ids.size(); ++i) std::printf("%s%d", i ? ", " : "", ids[i]);
            std::printf("]\n");
            return 0;
          }};
}

Command add_encode_prompt(CLI::App& app) {
  auto* cmd = app.add_subcommand("encode-prompt", "Write the text encoder's prompt embeddings to a safetensors file");
  struct Opts {
    std::string model, out, backend = "auto";
    std::vector<std::string> prompts;
    int max_len = 512;
  };
  auto o = std::make_shared<Opts>();
  cmd->add_option("--model,--model-path", o->model, "Model folder or synthetic:tiny|turbo")->required();
  cmd->add_option("--prompt", o->prompts, "Prompt (repeat for several)")->required();
  cmd->add_option("--max-sequence-length", o->max_len, "Tokens per prompt after the chat template")->check(CLI::PositiveNumber);
  cmd->add_option("--out", o->out, "Output .safetensors file (prompt_embeds.<i>, float32)")->required();
  cmd->add_option("--backend", o->backend, "cpu, cuda or auto")->check(CLI::IsMember({"cpu", "cuda", "auto"}));
  return {cmd, [o] {
            ModelSource m = open_model(o->model);
            m.text_encoder_weights->prefetch();  // read while the device initializes
            auto be = make_backend(o->backend);
            Tokenizer tok = Tokenizer::load(m.tokenizer_dir);
            TokenizedBatch batch = tokenize_prompts(tok, o->prompts, o->max_len);
            for (size_t i = 0; i < batch.truncated.size(); ++i)
              if (batch.truncated[i]) log_warn("prompt " + std::to_string(i) + " was truncated to " + std::to_string(o->max_len) + " tokens");
            Qwen3TextEncoder enc(*be, m.text_encoder, *m.text_encoder_weights);
            std::vector<Tensor> embeds = enc.encode(batch.input_ids, batch.lengths);
            std::vector<std::pair<std::string, Tensor>> out;
            for (size_t i = 0; i < embeds.size(); ++i)
              out.emplace_back("prompt_embeds." + std::to_string(i), be->to_host_f32(embeds[i]));
            write_safetensors(o->out, out, {{"model", o->model}});
            std::fprintf(stderr, "wrote %zu prompt embeddings to %s\n", embeds.size(), o->out.c_str());
            return 0;
          }};
}

}  // namespace zimage::cli
