// Errors as the OpenAI API reports them: an HTTP status and {"error": {"message", "type", "param", "code"}}.
// Every error the server answers goes through here, so clients written for OpenAI's API see the shape
// they expect and /metrics counts errors by `code`.
#pragma once

#include <string>

#include "core/error.h"

namespace zimage::server {

struct ApiError {
  int status = 500;
  std::string message;
  std::string type;   // OpenAI's classes: invalid_request_error, authentication_error, rate_limit_error, server_error
  std::string param;  // the request field at fault; empty: null
  std::string code;   // machine-readable reason, also the `kind` label of zimage_errors_total

  std::string to_json() const;
};

ApiError invalid_request(const std::string& message, const std::string& param);  // 400
ApiError unauthorized();                                                         // 401
ApiError not_found(const std::string& message);                                  // 404
ApiError payload_too_large(size_t max_bytes);                                    // 413
ApiError queue_full(size_t max_queue);                                           // 429
ApiError unavailable(const std::string& message, const std::string& code);       // 503
ApiError request_timeout(double seconds);                                        // 504
// An engine error raised while generating: InvalidArgument -> 400, OutOfMemory -> 503, else 500.
ApiError from_engine_error(ErrorKind kind, const std::string& message);
// What the HTTP layer produced without a handler (unknown route, unreadable request): a generic body.
ApiError from_status(int status);
// A request the connection layer refused before routing (connection_server.h), with its reason.
ApiError refused(int status, const std::string& message, size_t max_body_bytes);

}  // namespace zimage::server
