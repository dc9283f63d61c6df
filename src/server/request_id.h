// Request ids: what ties one request's lines together across the balancer's log and the replicas'
// logs. A request keeps the X-Request-Id it arrives with (HAProxy sets one, and keeps it when it retries
// the request on another replica); one without gets a fresh id. The answer carries it back.
#pragma once

#include <string>

namespace zimage::server {

// 32 hex digits from OpenSSL's generator: unguessable, so also fit to name a stored image.
std::string random_id();

// `incoming` (the X-Request-Id header) when it is 1 to 128 characters of [A-Za-z0-9._:+=/-] (UUIDs,
// base64, HAProxy's unique-id formats), so that it goes into a log line as it is; otherwise random_id().
std::string request_id(const std::string& incoming);

}  // namespace zimage::server
