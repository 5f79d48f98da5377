// usvm: the command-line tool. Every failure prints one line and exits
// non-zero.
#include <fmt/core.h>

#include <charconv>
#include <cstring>
#include <string_view>

#include "demo.h"

namespace {

constexpr const char* kUsage =
    "usage: usvm <command> [options]\n"
    "commands:\n"
    "  demo [--buffer-mib N] [--gpu-threads N] [--verbose]\n"
    "      one process and one simulated GPU share a buffer: the GPU faults\n"
    "      pages in through an interval notifier mirror, then munmap,\n"
    "      mprotect, madvise, fork and mremap tear its mappings down first\n"
    "      (the main job until the scenario runner exists)\n"
    "  help\n";

bool ParseU64(std::string_view s, uint64_t* out) {
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), *out);
  return ec == std::errc() && p == s.data() + s.size();
}

int Fail(const std::string& msg) {
  fmt::print(stderr, "usvm: {}\n", msg);
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) return Fail("no command given (try `usvm help`)");
  std::string_view cmd = argv[1];
  if (cmd == "help" || cmd == "--help" || cmd == "-h") {
    fmt::print("{}", kUsage);
    return 0;
  }
  if (cmd != "demo") return Fail(fmt::format("unknown command '{}' (try `usvm help`)", cmd));
  usvm::tools::DemoOptions opts;
  for (int i = 2; i < argc; ++i) {
    std::string_view a = argv[i];
    auto value = [&](uint64_t lo, uint64_t hi, uint64_t* out) -> bool {
      if (i + 1 >= argc) return false;
      return ParseU64(argv[++i], out) && *out >= lo && *out <= hi;
    };
    uint64_t v = 0;
    if (a == "--buffer-mib") {
      if (!value(2, 1024, &v)) return Fail("--buffer-mib needs an integer in [2, 1024]");
      opts.buffer_mib = v;
    } else if (a == "--gpu-threads") {
      if (!value(1, 16, &v)) return Fail("--gpu-threads needs an integer in [1, 16]");
      opts.gpu_threads = static_cast<uint32_t>(v);
    } else if (a == "--verbose") {
      opts.verbose = true;
    } else {
      return Fail(fmt::format("unknown option '{}' for demo", a));
    }
  }
  return usvm::tools::RunDemo(opts);
}
