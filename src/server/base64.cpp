#include "server/base64.h"

#include <openssl/evp.h>

#include <climits>

#include "core/error.h"

namespace zimage::server {

std::string base64_encode(std::string_view bytes) {
  // EVP_EncodeBlock takes an int length; images are far below 1.5 GiB, but say so rather than wrap.
  ZI_CHECK(bytes.size() <= size_t(INT_MAX) / 4 * 3, ErrorKind::InvalidArgument, "too large to base64-encode");
  std::string out(4 * ((bytes.size() + 2) / 3) + 1, '\0');  // + the NUL that EVP_EncodeBlock writes
  int n = EVP_EncodeBlock(reinterpret_cast<unsigned char*>(out.data()),
                          reinterpret_cast<const unsigned char*>(bytes.data()), int(bytes.size()));
  out.resize(size_t(n));
  return out;
}

}  // namespace zimage::server
