#include "cli/version.h"

namespace zimage::cli {

const char* version() { return ZIMAGE_VERSION; }

std::string software_name() { return std::string("zimage ") + version(); }

}  // namespace zimage::cli
