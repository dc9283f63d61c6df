#include "server/openai_errors.h"

#include <nlohmann/json.hpp>

namespace zimage::server {

std::string ApiError::to_json() const {
  nlohmann::json e = {{"message", message},
                      {"type", type},
                      {"param", param.empty() ? nlohmann::json() : nlohmann::json(param)},
                      {"code", code}};
  // Messages may quote what the client sent (a URL path is not checked for UTF-8): replace bad bytes
  // rather than fail the answer.
  return nlohmann::json{{"error", e}}.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

ApiError invalid_request(const std::string& message, const std::string& param) {
  return {400, message, "invalid_request_error", param, "invalid_value"};
}

ApiError unauthorized() {
  return {401, "Incorrect or missing API key: send it as 'Authorization: Bearer <key>'", "authentication_error", "",
          "invalid_api_key"};
}

ApiError not_found(const std::string& message) { return {404, message, "invalid_request_error", "", "not_found"}; }

ApiError payload_too_large(size_t max_bytes) {
  return {413,
          "the request body (decoded) is larger than the server's limit of " + std::to_string(max_bytes) + " bytes",
          "invalid_request_error", "", "payload_too_large"};
}

ApiError queue_full(size_t max_queue) {
  return {429, "the server's queue is full (" + std::to_string(max_queue) + " requests waiting); retry later",
          "rate_limit_error", "", "queue_full"};
}

ApiError unavailable(const std::string& message, const std::string& code) {
  return {503, message, "server_error", "", code};
}

ApiError request_timeout(double seconds) {
  return {504, "the request did not complete within the server's timeout of " + std::to_string(seconds) + " s",
          "server_error", "", "timeout"};
}

ApiError from_engine_error(ErrorKind kind, const std::string& message) {
  switch (kind) {
    case ErrorKind::InvalidArgument: return invalid_request(message, "");
    case ErrorKind::OutOfMemory:
      return unavailable("out of memory: " + message + "; retry with fewer or smaller images", "out_of_memory");
    default: return {500, message, "server_error", "", error_kind_name(kind)};
  }
}

ApiError from_status(int status) {
  switch (status) {
    case 400: return invalid_request("the HTTP request could not be parsed", "");
    case 404: return not_found("no such route");
    case 405: return {405, "method not allowed on this route", "invalid_request_error", "", "method_not_allowed"};
    default:
      return {status, "HTTP error " + std::to_string(status), status < 500 ? "invalid_request_error" : "server_error",
              "", "http_" + std::to_string(status)};
  }
}

ApiError refused(int status, const std::string& message, size_t max_body_bytes) {
  switch (status) {
    case 400: return invalid_request(message, "");
    case 408: return {408, message, "invalid_request_error", "", "request_read_timeout"};
    case 413: return payload_too_large(max_body_bytes);
    case 503: return unavailable(message, "too_many_connections");
    default:
      return {status, message, status < 500 ? "invalid_request_error" : "server_error", "",
              "http_" + std::to_string(status)};
  }
}

}  // namespace zimage::server
