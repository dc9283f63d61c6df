// Pipeline-level test helpers (header-only: for the tests that link the pipeline).
//
// The request of a wave2 / wave3 golden case folder (case.json, and input.png, mask.png, control.png where
// the case has them): the arguments diffusers was called with, on torch's CPU generator. Header-only:
// for the tests that link the pipeline.
#pragma once

#include <filesystem>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>

#include "io/image.h"
#include "pipeline/text_to_image.h"

namespace zimage::testing {

// The built-in synthetic:tiny model on a CPU backend, loaded once per test binary (the servers' tests).
inline TextToImagePipeline& synthetic_tiny_pipeline() {
  static std::unique_ptr<Backend> be = make_cpu_backend();
  static ModelSource model = open_model("synthetic:tiny");
  static TextToImagePipeline pipe(*be, model);
  return pipe;
}

inline GenerateRequest golden_case_request(const std::string& dir) {
  std::ifstream in(dir + "/case.json");
  const nlohmann::json a = nlohmann::json::parse(in);
  GenerateRequest r;
  r.prompts = {a["prompt"].get<std::string>()};
  if (a.contains("negative_prompt") && !a["negative_prompt"].is_null())
    r.negative_prompts = {a["negative_prompt"].get<std::string>()};
  r.height = a["height"];
  r.width = a["width"];
  r.steps = a["steps"].get<int>();
  r.guidance = a["guidance_scale"].get<float>();
  r.max_sequence_length = a["max_sequence_length"];
  r.seed = a["seed"].get<uint64_t>();
  r.generator = GeneratorDevice::Cpu;
  if (a.contains("strength") && !a["strength"].is_null()) r.strength = a["strength"].get<double>();
  auto has = [&](const char* file) { return std::filesystem::exists(dir + "/" + file); };
  if (has("input.png")) r.images = {read_image(dir + "/input.png")};
  if (has("mask.png")) r.masks = {read_image(dir + "/mask.png")};
  if (has("control.png")) {
    r.control_image = read_image(dir + "/control.png");
    r.controlnet_scale = a["conditioning_scale"].get<float>();
  }
  return r;
}

}  // namespace zimage::testing
