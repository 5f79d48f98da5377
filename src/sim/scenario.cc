// The scenario parser (yaml-cpp) and overrides. Every value is checked
// here, so the runner sees only well-formed scenarios; the first error is
// reported with its file, line and field.
#include "usvm/sim/scenario.h"

#include <yaml-cpp/yaml.h>
#include <fmt/core.h>

#include <algorithm>
#include <charconv>
#include <fstream>
#include <set>
#include <sstream>

#include "usvm/driver/policy.h"

namespace usvm::sim {

std::string ParseError::ToString() const {
  std::string out = file;
  if (line > 0) out += fmt::format(":{}", line);
  if (!field.empty()) out += fmt::format(": {}", field);
  out += ": " + message;
  return out;
}

bool ParseSize(const std::string& text, uint64_t* out) {
  std::string t;
  for (char c : text)
    if (c != ' ' && c != '_') t += c;
  if (t.empty()) return false;
  uint64_t v = 0;
  auto [p, ec] = std::from_chars(t.data(), t.data() + t.size(), v);
  if (ec != std::errc() || p == t.data()) return false;
  std::string unit(p, static_cast<const char*>(t.data() + t.size()));
  std::transform(unit.begin(), unit.end(), unit.begin(), [](unsigned char c) { return std::tolower(c); });
  uint64_t mul = 1;
  if (unit.empty() || unit == "b") mul = 1;
  else if (unit == "k" || unit == "kib" || unit == "kb") mul = uint64_t{1} << 10;
  else if (unit == "m" || unit == "mib" || unit == "mb") mul = uint64_t{1} << 20;
  else if (unit == "g" || unit == "gib" || unit == "gb") mul = uint64_t{1} << 30;
  else return false;
  if (v > UINT64_MAX / mul) return false;
  *out = v * mul;
  return true;
}

std::string FormatBytes(uint64_t b) {
  if (b >= (uint64_t{1} << 30) && b % (uint64_t{1} << 30) == 0) return fmt::format("{} GiB", b >> 30);
  if (b >= (uint64_t{1} << 20)) return fmt::format("{:.1f} MiB", double(b) / (1 << 20));
  if (b >= (uint64_t{1} << 10)) return fmt::format("{:.1f} KiB", double(b) / (1 << 10));
  return fmt::format("{} B", b);
}

const char* StepKindName(StepKind k) {
  switch (k) {
    case StepKind::kCpuWrite: return "cpu_write";
    case StepKind::kCpuRead: return "cpu_read";
    case StepKind::kCpuAtomic: return "cpu_atomic";
    case StepKind::kMmap: return "mmap";
    case StepKind::kMunmap: return "munmap";
    case StepKind::kMprotect: return "mprotect";
    case StepKind::kMadvise: return "madvise";
    case StepKind::kMremap: return "mremap";
    case StepKind::kFork: return "fork";
    case StepKind::kGpuKernel: return "gpu_kernel";
    case StepKind::kGpuAtomic: return "gpu_atomic";
    case StepKind::kPrefetch: return "prefetch";
    case StepKind::kAdvise: return "advise";
    case StepKind::kBind: return "bind";
    case StepKind::kUnbind: return "unbind";
    case StepKind::kGpuCompute: return "gpu_compute";
    case StepKind::kWait: return "wait";
    case StepKind::kLoop: return "loop";
  }
  return "?";
}

const char* PatternName(PatternKind p) {
  switch (p) {
    case PatternKind::kStreamRead: return "stream_read";
    case PatternKind::kStreamWrite: return "stream_write";
    case PatternKind::kStride: return "stride";
    case PatternKind::kRandomGather: return "random_gather";
    case PatternKind::kReadModifyWrite: return "read_modify_write";
  }
  return "?";
}

const char* ComputeName(ComputeKind c) {
  switch (c) {
    case ComputeKind::kGemm: return "gemm";
    case ComputeKind::kSpmv: return "spmv";
    case ComputeKind::kBfs: return "bfs";
    case ComputeKind::kStencil: return "stencil";
  }
  return "?";
}

void ComputeFootprint(const Step& st, uint64_t* a, uint64_t* b, uint64_t* c) {
  const uint64_t n = st.n, k = st.k;
  *a = *b = *c = 0;
  switch (st.compute) {
    case ComputeKind::kGemm: *a = *b = *c = 8 * n * n; break;
    case ComputeKind::kSpmv: *a = 8 * (n + 1 + 2 * n * k); *b = *c = 8 * n; break;
    case ComputeKind::kBfs: *a = 8 * (n + 1 + n * k); *c = 8 * n; break;
    case ComputeKind::kStencil: *a = *c = 8 * n * n; break;
  }
}

namespace {

constexpr uint64_t kPage = 4096;

struct Parser {
  std::string file;

  Unexpected<ParseError> Fail(const YAML::Node& n, const std::string& field, const std::string& msg) const {
    int line = n.IsDefined() ? n.Mark().line + 1 : 0;
    if (line < 0 || n.Mark().line < 0) line = 0;
    return MakeUnexpected(ParseError{file, line, field, msg});
  }

  ParseResult<void> Keys(const YAML::Node& map, const std::string& field, std::initializer_list<const char*> allowed) const {
    if (!map.IsMap()) return Fail(map, field, "expected a mapping");
    for (auto it = map.begin(); it != map.end(); ++it) {
      const std::string k = it->first.as<std::string>("");
      bool ok = false;
      for (const char* a : allowed) ok |= k == a;
      if (!ok) {
        std::string list;
        for (const char* a : allowed) list += std::string(list.empty() ? "" : ", ") + a;
        return Fail(it->first, field.empty() ? k : field + "." + k, "unknown field (expected one of: " + list + ")");
      }
    }
    return {};
  }

  ParseResult<std::string> Str(const YAML::Node& n, const std::string& field) const {
    if (!n.IsScalar()) return Fail(n, field, "expected a scalar");
    return n.Scalar();
  }
  ParseResult<uint64_t> U64(const YAML::Node& n, const std::string& field, uint64_t lo = 0,
                            uint64_t hi = UINT64_MAX) const {
    if (!n.IsScalar()) return Fail(n, field, "expected an integer");
    uint64_t v = 0;
    const std::string& s = n.Scalar();
    auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
    if (ec != std::errc() || p != s.data() + s.size()) return Fail(n, field, "'" + s + "' is not a non-negative integer");
    if (v < lo || v > hi) return Fail(n, field, fmt::format("{} is out of range [{}, {}]", v, lo, hi));
    return v;
  }
  ParseResult<uint64_t> Size(const YAML::Node& n, const std::string& field) const {
    if (!n.IsScalar()) return Fail(n, field, "expected a size (e.g. 4MiB)");
    uint64_t v = 0;
    if (!ParseSize(n.Scalar(), &v)) return Fail(n, field, "'" + n.Scalar() + "' is not a size (e.g. 4096, 64KiB, 2MiB, 1GiB)");
    return v;
  }
  ParseResult<bool> Bool(const YAML::Node& n, const std::string& field) const {
    if (n.IsScalar()) {
      const std::string& s = n.Scalar();
      if (s == "true" || s == "yes" || s == "on") return true;
      if (s == "false" || s == "no" || s == "off") return false;
    }
    return Fail(n, field, "expected true or false");
  }
  ParseResult<std::string> OneOf(const YAML::Node& n, const std::string& field,
                                 std::initializer_list<const char*> values) const {
    auto s = Str(n, field);
    if (!s) return MakeUnexpected(s.error());
    std::string list;
    for (const char* v : values) {
      if (*s == v) return *s;
      list += std::string(list.empty() ? "" : ", ") + v;
    }
    return Fail(n, field, "'" + *s + "' is not one of: " + list);
  }
  ParseResult<std::string> OneOf(const YAML::Node& n, const std::string& field,
                                 const std::vector<std::string>& values) const {
    auto s = Str(n, field);
    if (!s) return MakeUnexpected(s.error());
    std::string list;
    for (const std::string& v : values) {
      if (*s == v) return *s;
      list += (list.empty() ? "" : ", ") + v;
    }
    return Fail(n, field, "'" + *s + "' is not one of: " + list);
  }

#define USVM_PTRY(var, expr)                                   \
  auto var##_r = (expr);                                       \
  if (!var##_r) return MakeUnexpected(var##_r.error());       \
  auto var = std::move(*var##_r)

  ParseResult<void> Machine(const YAML::Node& n, MachineSpec& m) const {
    if (auto k = Keys(n, "machine", {"gpus", "vram", "system_memory", "exec_threads", "copy_engines",
                                     "fault_batch", "fault_buffer_entries", "latency", "shared_owner",
                                     "peer_access", "tlb_flush_ns", "fault_latency_ns", "link_bandwidth"});
        !k)
      return k;
    if (n["gpus"]) { USVM_PTRY(v, U64(n["gpus"], "machine.gpus", 1, 8)); m.gpus = uint32_t(v); }
    if (n["vram"]) {
      USVM_PTRY(v, Size(n["vram"], "machine.vram"));
      if (v == 0 || v % (uint64_t{2} << 20)) return Fail(n["vram"], "machine.vram", "must be a non-zero multiple of 2MiB");
      if (v > (uint64_t{64} << 30)) return Fail(n["vram"], "machine.vram", "at most 64GiB");
      m.vram_bytes = v;
    }
    if (n["system_memory"]) {
      USVM_PTRY(v, Size(n["system_memory"], "machine.system_memory"));
      if (v < (uint64_t{4} << 20) || v % (uint64_t{2} << 20) || v > (uint64_t{64} << 30))
        return Fail(n["system_memory"], "machine.system_memory", "must be a multiple of 2MiB in [4MiB, 64GiB]");
      m.system_memory_bytes = v;
    }
    if (n["exec_threads"]) { USVM_PTRY(v, U64(n["exec_threads"], "machine.exec_threads", 1, 16)); m.exec_threads = uint32_t(v); }
    if (n["copy_engines"]) { USVM_PTRY(v, U64(n["copy_engines"], "machine.copy_engines", 1, 8)); m.copy_engines = uint32_t(v); }
    if (n["fault_batch"]) { USVM_PTRY(v, U64(n["fault_batch"], "machine.fault_batch", 1, 4096)); m.fault_batch = uint32_t(v); }
    if (n["fault_buffer_entries"]) { USVM_PTRY(v, U64(n["fault_buffer_entries"], "machine.fault_buffer_entries", 0, 1 << 20)); m.fault_buffer_entries = uint32_t(v); }
    if (n["latency"]) { USVM_PTRY(v, OneOf(n["latency"], "machine.latency", {"zero", "default"})); m.latency = v; }
    if (n["tlb_flush_ns"]) { USVM_PTRY(v, U64(n["tlb_flush_ns"], "machine.tlb_flush_ns", 0, 1'000'000'000)); m.tlb_flush_ns = int64_t(v); }
    if (n["fault_latency_ns"]) { USVM_PTRY(v, U64(n["fault_latency_ns"], "machine.fault_latency_ns", 0, 1'000'000'000)); m.fault_latency_ns = int64_t(v); }
    if (n["link_bandwidth"]) {
      USVM_PTRY(v, Size(n["link_bandwidth"], "machine.link_bandwidth"));
      m.link_bandwidth = int64_t(std::min<uint64_t>(v, INT64_MAX));
    }
    if (n["shared_owner"]) { USVM_PTRY(v, Bool(n["shared_owner"], "machine.shared_owner")); m.shared_owner = v; }
    if (n["peer_access"]) { USVM_PTRY(v, Bool(n["peer_access"], "machine.peer_access")); m.peer_access = v; }
    return {};
  }

  ParseResult<void> Framework(const YAML::Node& n, FrameworkSpec& f) const {
    if (auto k = Keys(n, "framework", {"notifier_size", "chunk_sizes", "check_pages_threshold", "invalidation",
                                       "placement", "peer_policy", "atomic_timeslice_ms", "atomic_tries",
                                       "migration", "eviction", "thrashing", "density_threshold", "tree_threshold",
                                       "thrashing_threshold", "pin_threshold", "access_counters",
                                       "access_counter_threshold", "access_counter_granularity"});
        !k)
      return k;
    if (n["notifier_size"]) {
      USVM_PTRY(v, Size(n["notifier_size"], "framework.notifier_size"));
      if (v < (uint64_t{2} << 20) || (v & (v - 1))) return Fail(n["notifier_size"], "framework.notifier_size", "must be a power of two >= 2MiB");
      f.notifier_size = v;
    }
    if (n["chunk_sizes"]) {
      const YAML::Node& c = n["chunk_sizes"];
      if (!c.IsSequence() || c.size() == 0) return Fail(c, "framework.chunk_sizes", "expected a non-empty list of sizes");
      f.chunk_sizes.clear();
      for (size_t i = 0; i < c.size(); ++i) {
        const std::string field = fmt::format("framework.chunk_sizes[{}]", i);
        USVM_PTRY(v, Size(c[i], field));
        if (v < kPage || (v & (v - 1))) return Fail(c[i], field, "must be a power of two >= 4KiB");
        if (!f.chunk_sizes.empty() && v >= f.chunk_sizes.back()) return Fail(c[i], field, "chunk sizes must be in decreasing order");
        f.chunk_sizes.push_back(v);
      }
      if (f.chunk_sizes.back() != kPage) return Fail(c, "framework.chunk_sizes", "the last chunk size must be 4KiB");
    }
    if (n["check_pages_threshold"]) { USVM_PTRY(v, Size(n["check_pages_threshold"], "framework.check_pages_threshold")); f.check_pages_threshold = v; }
    if (n["invalidation"]) { USVM_PTRY(v, OneOf(n["invalidation"], "framework.invalidation", {"two_pass", "single_pass"})); f.invalidation = v; }
    if (n["placement"]) { USVM_PTRY(v, OneOf(n["placement"], "framework.placement", {"faulting_gpu", "system"})); f.placement = v; }
    if (n["peer_policy"]) { USVM_PTRY(v, OneOf(n["peer_policy"], "framework.peer_policy", {"map_remote", "migrate", "system"})); f.peer_policy = v; }
    if (n["atomic_timeslice_ms"]) { USVM_PTRY(v, U64(n["atomic_timeslice_ms"], "framework.atomic_timeslice_ms", 0, 10000)); f.atomic_timeslice_ms = v; }
    if (n["atomic_tries"]) { USVM_PTRY(v, U64(n["atomic_tries"], "framework.atomic_tries", 1, 16)); f.atomic_tries = uint32_t(v); }
    // Policies (driver/policy.h), by name.
    if (n["migration"]) { USVM_PTRY(v, OneOf(n["migration"], "framework.migration", driver::MigrationPolicyNames())); f.migration = v; }
    if (n["eviction"]) { USVM_PTRY(v, OneOf(n["eviction"], "framework.eviction", driver::EvictionPolicyNames())); f.eviction = v; }
    if (n["thrashing"]) { USVM_PTRY(v, OneOf(n["thrashing"], "framework.thrashing", driver::ThrashingPolicyNames())); f.thrashing = v; }
    if (n["density_threshold"]) { USVM_PTRY(v, U64(n["density_threshold"], "framework.density_threshold", 1, 100)); f.policy.density_threshold = uint32_t(v); }
    if (n["tree_threshold"]) { USVM_PTRY(v, U64(n["tree_threshold"], "framework.tree_threshold", 1, 100)); f.policy.tree_threshold = uint32_t(v); }
    if (n["thrashing_threshold"]) { USVM_PTRY(v, U64(n["thrashing_threshold"], "framework.thrashing_threshold", 1, 1000)); f.policy.thrashing_threshold = uint32_t(v); }
    if (n["access_counters"]) { USVM_PTRY(v, OneOf(n["access_counters"], "framework.access_counters", driver::AccessCounterPolicyNames())); f.access_counters = v; }
    if (n["access_counter_threshold"]) { USVM_PTRY(v, U64(n["access_counter_threshold"], "framework.access_counter_threshold", 1, 65535)); f.access_counter_threshold = uint32_t(v); }
    if (n["access_counter_granularity"]) {
      USVM_PTRY(v, Size(n["access_counter_granularity"], "framework.access_counter_granularity"));
      if (v != (uint64_t{64} << 10) && v != (uint64_t{2} << 20))
        return Fail(n["access_counter_granularity"], "framework.access_counter_granularity", "must be 64KiB or 2MiB");
      f.access_counter_granularity = v;
    }
    if (n["pin_threshold"]) { USVM_PTRY(v, U64(n["pin_threshold"], "framework.pin_threshold", 0, 1000)); f.policy.pin_threshold = uint32_t(v); }
    return {};
  }

  ParseResult<void> Buffers(const YAML::Node& n, std::vector<BufferSpec>& out) const {
    if (!n.IsSequence()) return Fail(n, "buffers", "expected a list of buffers");
    for (size_t i = 0; i < n.size(); ++i) {
      const YAML::Node& b = n[i];
      const std::string field = fmt::format("buffers[{}]", i);
      if (auto k = Keys(b, field, {"name", "size", "mapped", "hugepage"}); !k) return k;
      BufferSpec s;
      s.line = b.Mark().line + 1;
      if (!b["name"]) return Fail(b, field + ".name", "missing");
      USVM_PTRY(name, Str(b["name"], field + ".name"));
      if (name.empty() || name.find_first_of(" .=,") != std::string::npos)
        return Fail(b["name"], field + ".name", "must be non-empty without spaces, '.', '=' or ','");
      for (const BufferSpec& o : out)
        if (o.name == name) return Fail(b["name"], field + ".name", "duplicate buffer name '" + name + "'");
      s.name = name;
      if (!b["size"]) return Fail(b, field + ".size", "missing");
      USVM_PTRY(size, Size(b["size"], field + ".size"));
      if (size == 0 || size % kPage || size > (uint64_t{16} << 30))
        return Fail(b["size"], field + ".size", "must be a non-zero multiple of 4KiB, at most 16GiB");
      s.size = size;
      if (b["mapped"]) { USVM_PTRY(v, Bool(b["mapped"], field + ".mapped")); s.mapped = v; }
      if (b["hugepage"]) { USVM_PTRY(v, Bool(b["hugepage"], field + ".hugepage")); s.hugepage = v; }
      out.push_back(s);
    }
    return {};
  }

  // The span fields (buffer, offset, size) of a step.
  ParseResult<void> Span(const YAML::Node& p, const std::string& field, Step& s, bool need_buffer = true) const {
    if (p["buffer"]) { USVM_PTRY(v, Str(p["buffer"], field + ".buffer")); s.buffer = v; }
    else if (need_buffer) return Fail(p, field + ".buffer", "missing");
    if (p["offset"]) {
      USVM_PTRY(v, Size(p["offset"], field + ".offset"));
      if (v % kPage) return Fail(p["offset"], field + ".offset", "must be a multiple of 4KiB");
      s.offset = v;
    }
    if (p["size"]) {
      USVM_PTRY(v, Size(p["size"], field + ".size"));
      if (v == 0 || v % kPage) return Fail(p["size"], field + ".size", "must be a non-zero multiple of 4KiB");
      s.size = v;
    }
    return {};
  }

  ParseResult<void> Gpu(const YAML::Node& p, const std::string& field, Step& s) const {
    if (p["gpu"]) { USVM_PTRY(v, U64(p["gpu"], field + ".gpu", 0, 7)); s.gpu = uint32_t(v); }
    return {};
  }

  ParseResult<Step> ParseStep(const YAML::Node& n, const std::string& field, int depth) const {
    if (!n.IsMap() || n.size() != 1)
      return Fail(n, field, "a step is a mapping with one key, the action (e.g. `cpu_write: {buffer: a}`)");
    auto it = n.begin();
    const std::string kind = it->first.as<std::string>("");
    YAML::Node p = it->second;
    const std::string f = field + "." + kind;
    Step s;
    s.line = it->first.Mark().line + 1;
    if (p.IsNull()) p = YAML::Node(YAML::NodeType::Map);
    if (!p.IsMap()) return Fail(p, f, "expected a mapping of parameters");
    auto expect = [&](Step& st) -> ParseResult<void> {
      if (p["expect"]) {
        USVM_PTRY(v, OneOf(p["expect"], f + ".expect", {"ok", "fault"}));
        st.expect_fault = v == "fault";
      }
      return {};
    };
    if (kind == "cpu_write" || kind == "cpu_read" || kind == "cpu_atomic") {
      s.kind = kind == "cpu_write" ? StepKind::kCpuWrite : kind == "cpu_read" ? StepKind::kCpuRead : StepKind::kCpuAtomic;
      if (auto k = Keys(p, f, {"buffer", "offset", "size", "seed", "count", "value", "threads", "expect"}); !k)
        return MakeUnexpected(k.error());
      if (auto r = Span(p, f, s); !r) return MakeUnexpected(r.error());
      s.threads = 1;
      if (p["threads"]) {
        if (s.kind == StepKind::kCpuAtomic) return Fail(p["threads"], f + ".threads", "cpu_atomic runs on one thread");
        USVM_PTRY(v, U64(p["threads"], f + ".threads", 1, 16));
        s.threads = uint32_t(v);
      }
      if (p["seed"]) { USVM_PTRY(v, U64(p["seed"], f + ".seed")); s.seed = v; }
      if (p["value"]) { USVM_PTRY(v, U64(p["value"], f + ".value")); s.value = v; }
      s.count = 1024;
      if (p["count"]) { USVM_PTRY(v, U64(p["count"], f + ".count", 1, 1 << 24)); s.count = v; }
      if (auto r = expect(s); !r) return MakeUnexpected(r.error());
    } else if (kind == "mmap" || kind == "munmap") {
      s.kind = kind == "mmap" ? StepKind::kMmap : StepKind::kMunmap;
      if (auto k = Keys(p, f, kind == "mmap" ? std::initializer_list<const char*>{"buffer"}
                                                : std::initializer_list<const char*>{"buffer", "offset", "size"});
          !k)
        return MakeUnexpected(k.error());
      if (auto r = Span(p, f, s); !r) return MakeUnexpected(r.error());
    } else if (kind == "mprotect") {
      s.kind = StepKind::kMprotect;
      if (auto k = Keys(p, f, {"buffer", "offset", "size", "prot"}); !k) return MakeUnexpected(k.error());
      if (auto r = Span(p, f, s); !r) return MakeUnexpected(r.error());
      if (!p["prot"]) return Fail(p, f + ".prot", "missing");
      USVM_PTRY(v, OneOf(p["prot"], f + ".prot", {"none", "r", "rw"}));
      s.str = v;
    } else if (kind == "madvise") {
      s.kind = StepKind::kMadvise;
      if (auto k = Keys(p, f, {"buffer", "offset", "size", "advice"}); !k) return MakeUnexpected(k.error());
      if (auto r = Span(p, f, s); !r) return MakeUnexpected(r.error());
      if (!p["advice"]) return Fail(p, f + ".advice", "missing");
      USVM_PTRY(v, OneOf(p["advice"], f + ".advice", {"dontneed", "hugepage", "nohugepage", "normal"}));
      s.str = v;
    } else if (kind == "mremap") {
      s.kind = StepKind::kMremap;
      if (auto k = Keys(p, f, {"buffer", "new_size"}); !k) return MakeUnexpected(k.error());
      if (auto r = Span(p, f, s); !r) return MakeUnexpected(r.error());
      if (!p["new_size"]) return Fail(p, f + ".new_size", "missing");
      USVM_PTRY(v, Size(p["new_size"], f + ".new_size"));
      if (v == 0 || v % kPage) return Fail(p["new_size"], f + ".new_size", "must be a non-zero multiple of 4KiB");
      s.new_size = v;
    } else if (kind == "wait") {
      s.kind = StepKind::kWait;
      if (auto k = Keys(p, f, {}); !k) return MakeUnexpected(k.error());
    } else if (kind == "fork") {
      s.kind = StepKind::kFork;
      if (auto k = Keys(p, f, {}); !k) return MakeUnexpected(k.error());
    } else if (kind == "gpu_kernel") {
      s.kind = StepKind::kGpuKernel;
      if (auto k = Keys(p, f, {"gpu", "buffer", "offset", "size", "pattern", "value", "count", "stride", "seed",
                              "threads", "iterations", "async", "expect"});
          !k)
        return MakeUnexpected(k.error());
      if (auto r = Span(p, f, s); !r) return MakeUnexpected(r.error());
      if (auto r = Gpu(p, f, s); !r) return MakeUnexpected(r.error());
      if (!p["pattern"]) return Fail(p, f + ".pattern", "missing");
      USVM_PTRY(pat, OneOf(p["pattern"], f + ".pattern",
                           {"stream_read", "stream_write", "stride", "random_gather", "read_modify_write"}));
      s.pattern = pat == "stream_read" ? PatternKind::kStreamRead
                  : pat == "stream_write" ? PatternKind::kStreamWrite
                  : pat == "stride" ? PatternKind::kStride
                  : pat == "random_gather" ? PatternKind::kRandomGather
                                           : PatternKind::kReadModifyWrite;
      if (p["value"]) { USVM_PTRY(v, U64(p["value"], f + ".value")); s.value = v; }
      s.count = 1024;
      if (p["count"]) { USVM_PTRY(v, U64(p["count"], f + ".count", 1, 1 << 24)); s.count = v; }
      if (p["stride"]) {
        USVM_PTRY(v, Size(p["stride"], f + ".stride"));
        if (v == 0 || v % 8) return Fail(p["stride"], f + ".stride", "must be a non-zero multiple of 8");
        s.stride = v;
      }
      s.seed = 1;
      if (p["seed"]) { USVM_PTRY(v, U64(p["seed"], f + ".seed")); s.seed = v; }
      if (p["threads"]) { USVM_PTRY(v, U64(p["threads"], f + ".threads", 1, 256)); s.threads = uint32_t(v); }
      if (p["iterations"]) { USVM_PTRY(v, U64(p["iterations"], f + ".iterations", 1, 1000)); s.iterations = uint32_t(v); }
      if (p["async"]) { USVM_PTRY(v, Bool(p["async"], f + ".async")); s.async = v; }
      if (auto r = expect(s); !r) return MakeUnexpected(r.error());
    } else if (kind == "gpu_atomic") {
      s.kind = StepKind::kGpuAtomic;
      if (auto k = Keys(p, f, {"gpu", "buffer", "offset", "size", "value", "count", "threads", "async", "expect"}); !k)
        return MakeUnexpected(k.error());
      if (auto r = Span(p, f, s); !r) return MakeUnexpected(r.error());
      if (auto r = Gpu(p, f, s); !r) return MakeUnexpected(r.error());
      if (p["value"]) { USVM_PTRY(v, U64(p["value"], f + ".value")); s.value = v; }
      s.count = 1024;
      if (p["count"]) { USVM_PTRY(v, U64(p["count"], f + ".count", 1, 1 << 24)); s.count = v; }
      if (p["threads"]) { USVM_PTRY(v, U64(p["threads"], f + ".threads", 1, 256)); s.threads = uint32_t(v); }
      if (p["async"]) { USVM_PTRY(v, Bool(p["async"], f + ".async")); s.async = v; }
      if (auto r = expect(s); !r) return MakeUnexpected(r.error());
    } else if (kind == "prefetch") {
      s.kind = StepKind::kPrefetch;
      if (auto k = Keys(p, f, {"gpu", "buffer", "offset", "size", "to"}); !k) return MakeUnexpected(k.error());
      if (auto r = Span(p, f, s); !r) return MakeUnexpected(r.error());
      if (auto r = Gpu(p, f, s); !r) return MakeUnexpected(r.error());
      s.str = "gpu";
      if (p["to"]) { USVM_PTRY(v, Str(p["to"], f + ".to")); s.str = v; }
      if (s.str != "gpu" && s.str != "system" && !(s.str.size() == 4 && s.str.starts_with("gpu") && isdigit(s.str[3])))
        return Fail(p["to"], f + ".to", "'" + s.str + "' is not one of: gpu (the prefetching GPU), gpuN, system");
    } else if (kind == "advise") {
      s.kind = StepKind::kAdvise;
      if (auto k = Keys(p, f, {"buffer", "offset", "size", "preferred", "atomic", "access_in_place"}); !k)
        return MakeUnexpected(k.error());
      if (auto r = Span(p, f, s); !r) return MakeUnexpected(r.error());
      if (p["preferred"]) {
        USVM_PTRY(v, Str(p["preferred"], f + ".preferred"));
        if (v != "default" && v != "system" && !(v.size() == 4 && v.starts_with("gpu") && isdigit(v[3])))
          return Fail(p["preferred"], f + ".preferred", "'" + v + "' is not one of: default, system, gpuN");
        s.str = v;
      }
      if (p["atomic"]) { USVM_PTRY(v, OneOf(p["atomic"], f + ".atomic", {"undefined", "device", "global", "cpu"})); s.atomic_mode = v; }
      if (p["access_in_place"]) { USVM_PTRY(v, Bool(p["access_in_place"], f + ".access_in_place")); s.access_in_place = v; }
      if (s.str.empty() && s.atomic_mode.empty() && s.access_in_place < 0)
        return Fail(p, f, "sets nothing (give preferred, atomic or access_in_place)");
    } else if (kind == "bind" || kind == "unbind") {
      s.kind = kind == "bind" ? StepKind::kBind : StepKind::kUnbind;
      if (auto k = Keys(p, f, kind == "bind" ? std::initializer_list<const char*>{"gpu", "buffer", "offset", "size", "read_only", "userptr"}
                                                : std::initializer_list<const char*>{"gpu", "buffer", "offset", "size"});
          !k)
        return MakeUnexpected(k.error());
      if (auto r = Span(p, f, s); !r) return MakeUnexpected(r.error());
      if (auto r = Gpu(p, f, s); !r) return MakeUnexpected(r.error());
      if (p["read_only"]) { USVM_PTRY(v, Bool(p["read_only"], f + ".read_only")); s.read_only = v; }
      if (p["userptr"]) { USVM_PTRY(v, Bool(p["userptr"], f + ".userptr")); s.userptr = v; }
    } else if (kind == "gpu_compute") {
      s.kind = StepKind::kGpuCompute;
      if (auto k = Keys(p, f, {"gpu", "kernel", "a", "b", "c", "n", "k", "iterations", "threads", "seed", "expect"}); !k)
        return MakeUnexpected(k.error());
      if (auto r = Gpu(p, f, s); !r) return MakeUnexpected(r.error());
      if (!p["kernel"]) return Fail(p, f + ".kernel", "missing");
      USVM_PTRY(kn, OneOf(p["kernel"], f + ".kernel", {"gemm", "spmv", "bfs", "stencil"}));
      s.compute = kn == "gemm" ? ComputeKind::kGemm : kn == "spmv" ? ComputeKind::kSpmv
                  : kn == "bfs" ? ComputeKind::kBfs : ComputeKind::kStencil;
      const bool need_b = s.compute == ComputeKind::kGemm || s.compute == ComputeKind::kSpmv;
      for (const char* name : {"a", "b", "c"}) {
        if (!p[name]) {
          if (std::string(name) == "b" && !need_b) continue;
          return Fail(p, f + "." + name, "missing (a buffer name)");
        }
        USVM_PTRY(v, Str(p[name], f + "." + name));
        (name[0] == 'a' ? s.a : name[0] == 'b' ? s.b : s.c) = v;
      }
      if (!need_b && p["b"]) return Fail(p["b"], f + ".b", std::string("not used by ") + kn);
      if (!p["n"]) return Fail(p, f + ".n", "missing");
      USVM_PTRY(n, U64(p["n"], f + ".n", 2, 1 << 20));
      s.n = n;
      const bool need_k = s.compute == ComputeKind::kSpmv || s.compute == ComputeKind::kBfs;
      if (need_k) {
        if (!p["k"]) return Fail(p, f + ".k", "missing (entries per row)");
        USVM_PTRY(k, U64(p["k"], f + ".k", 1, 1024));
        s.k = k;
      } else if (p["k"]) {
        return Fail(p["k"], f + ".k", std::string("not used by ") + kn);
      }
      if (p["iterations"]) { USVM_PTRY(v, U64(p["iterations"], f + ".iterations", 1, 1000)); s.iterations = uint32_t(v); }
      if (p["threads"]) { USVM_PTRY(v, U64(p["threads"], f + ".threads", 1, 256)); s.threads = uint32_t(v); }
      s.seed = 1;
      if (p["seed"]) { USVM_PTRY(v, U64(p["seed"], f + ".seed")); s.seed = v; }
      if (s.a == s.c || (need_b && (s.a == s.b || s.b == s.c)))
        return Fail(p, f, "a, b and c must be different buffers");
      if (auto r = expect(s); !r) return MakeUnexpected(r.error());
    } else if (kind == "loop") {
      s.kind = StepKind::kLoop;
      if (depth >= 4) return Fail(p, f, "loops nest at most 4 deep");
      if (auto k = Keys(p, f, {"repeat", "steps"}); !k) return MakeUnexpected(k.error());
      if (!p["repeat"]) return Fail(p, f + ".repeat", "missing");
      USVM_PTRY(rep, U64(p["repeat"], f + ".repeat", 1, 100000));
      s.repeat = uint32_t(rep);
      USVM_PTRY(steps, Steps(p["steps"], f + ".steps", depth + 1));
      s.steps = std::move(steps);
    } else {
      return Fail(it->first, field + "." + kind,
                  "unknown action (expected cpu_write, cpu_read, cpu_atomic, mmap, munmap, mprotect, madvise, "
                  "mremap, fork, gpu_kernel, gpu_atomic, gpu_compute, wait, prefetch, advise, bind, unbind, loop)");
    }
    return s;
  }

  ParseResult<std::vector<Step>> Steps(const YAML::Node& n, const std::string& field, int depth) const {
    if (!n || !n.IsSequence() || n.size() == 0) return Fail(n, field, "expected a non-empty list of steps");
    std::vector<Step> out;
    for (size_t i = 0; i < n.size(); ++i) {
      USVM_PTRY(s, ParseStep(n[i], fmt::format("{}[{}]", field, i), depth));
      out.push_back(std::move(s));
    }
    return out;
  }

  ParseResult<void> Phases(const YAML::Node& n, std::vector<Phase>& out) const {
    if (!n.IsSequence() || n.size() == 0) return Fail(n, "phases", "expected a non-empty list of phases");
    for (size_t i = 0; i < n.size(); ++i) {
      const std::string field = fmt::format("phases[{}]", i);
      const YAML::Node& p = n[i];
      if (auto k = Keys(p, field, {"name", "repeat", "steps"}); !k) return k;
      Phase ph;
      ph.line = p.Mark().line + 1;
      ph.name = fmt::format("phase{}", i);
      if (p["name"]) { USVM_PTRY(v, Str(p["name"], field + ".name")); ph.name = v; }
      if (p["repeat"]) { USVM_PTRY(v, U64(p["repeat"], field + ".repeat", 1, 100000)); ph.repeat = uint32_t(v); }
      if (!p["steps"]) return Fail(p, field + ".steps", "missing");
      USVM_PTRY(steps, Steps(p["steps"], field + ".steps", 0));
      ph.steps = std::move(steps);
      out.push_back(std::move(ph));
    }
    return {};
  }

  ParseResult<void> Settings(const YAML::Node& n, Scenario& s) const {
    if (!n.IsMap()) return Fail(n, "settings", "expected a mapping of setting name -> {key: value}");
    for (auto it = n.begin(); it != n.end(); ++it) {
      const std::string name = it->first.as<std::string>("");
      const std::string field = "settings." + name;
      if (!it->second.IsMap()) return Fail(it->second, field, "expected a mapping of key: value overrides");
      std::vector<std::pair<std::string, std::string>> kv;
      for (auto jt = it->second.begin(); jt != it->second.end(); ++jt) {
        const std::string key = jt->first.as<std::string>("");
        USVM_PTRY(v, Str(jt->second, field + "." + key));
        kv.emplace_back(key, v);
      }
      s.settings[name] = std::move(kv);
    }
    return {};
  }

  ParseResult<Scenario> Top(const YAML::Node& root) const {
    Scenario s;
    s.file = file;
    if (!root.IsMap()) return Fail(root, "", "the scenario must be a YAML mapping");
    if (auto k = Keys(root, "", {"name", "description", "seed", "verify", "machine", "framework", "buffers",
                                 "settings", "phases"});
        !k)
      return MakeUnexpected(k.error());
    if (root["name"]) { USVM_PTRY(v, Str(root["name"], "name")); s.name = v; }
    if (root["description"]) { USVM_PTRY(v, Str(root["description"], "description")); s.description = v; }
    if (root["seed"]) { USVM_PTRY(v, U64(root["seed"], "seed")); s.seed = v; }
    if (root["verify"]) { USVM_PTRY(v, Bool(root["verify"], "verify")); s.verify = v; }
    if (root["machine"]) if (auto r = Machine(root["machine"], s.machine); !r) return MakeUnexpected(r.error());
    if (root["framework"]) if (auto r = Framework(root["framework"], s.framework); !r) return MakeUnexpected(r.error());
    if (!root["buffers"]) return Fail(root, "buffers", "missing");
    if (auto r = Buffers(root["buffers"], s.buffers); !r) return MakeUnexpected(r.error());
    if (root["settings"]) if (auto r = Settings(root["settings"], s); !r) return MakeUnexpected(r.error());
    if (!root["phases"]) return Fail(root, "phases", "missing");
    if (auto r = Phases(root["phases"], s.phases); !r) return MakeUnexpected(r.error());
    if (auto r = CheckScenario(s); !r) return MakeUnexpected(r.error());
    // Settings must apply cleanly (checked now, not at --compare time).
    for (const auto& [name, kv] : s.settings) {
      Scenario copy = s;
      for (const auto& [k, v] : kv)
        if (auto r = ApplyOverride(copy, k, v); !r) {
          ParseError e = r.error();
          e.file = file;
          e.line = root["settings"][name].Mark().line + 1;
          e.field = "settings." + name + "." + k;
          return MakeUnexpected(e);
        }
    }
    return s;
  }
};

// Walks steps (and loops) for cross-field checks.
ParseResult<void> CheckSteps(const Scenario& s, const std::vector<Step>& steps, const std::string& where) {
  for (const Step& st : steps) {
    auto fail = [&](const std::string& field, const std::string& msg) {
      return MakeUnexpected(ParseError{s.file, st.line, where + "." + StepKindName(st.kind) + field, msg});
    };
    if (st.kind == StepKind::kLoop) {
      if (auto r = CheckSteps(s, st.steps, where); !r) return r;
      continue;
    }
    if (st.kind == StepKind::kFork || st.kind == StepKind::kWait) continue;
    if (st.kind == StepKind::kGpuCompute) {
      uint64_t need[3];
      ComputeFootprint(st, &need[0], &need[1], &need[2]);
      const std::string* names[3] = {&st.a, &st.b, &st.c};
      for (int i = 0; i < 3; ++i) {
        if (need[i] == 0) continue;
        const BufferSpec* b = nullptr;
        for (const BufferSpec& x : s.buffers)
          if (x.name == *names[i]) b = &x;
        const std::string field = std::string(".") + char('a' + i);
        if (!b) return fail(field, "no buffer named '" + *names[i] + "'");
        if (b->size < need[i])
          return fail(field, fmt::format("{} n={} needs {} bytes in '{}', which has {}", ComputeName(st.compute), st.n,
                                         need[i], b->name, b->size));
      }
      if (st.gpu >= s.machine.gpus) return fail(".gpu", fmt::format("GPU {} does not exist (machine.gpus = {})", st.gpu, s.machine.gpus));
      continue;
    }
    const BufferSpec* b = nullptr;
    for (const BufferSpec& x : s.buffers)
      if (x.name == st.buffer) b = &x;
    if (!b) return fail(".buffer", "no buffer named '" + st.buffer + "'");
    if (st.offset >= b->size) return fail(".offset", fmt::format("{} is beyond buffer '{}' ({} bytes)", st.offset, b->name, b->size));
    if (st.size && st.offset + st.size > b->size)
      return fail(".size", fmt::format("offset + size = {} is beyond buffer '{}' ({} bytes)", st.offset + st.size, b->name, b->size));
    if (st.gpu >= s.machine.gpus) return fail(".gpu", fmt::format("GPU {} does not exist (machine.gpus = {})", st.gpu, s.machine.gpus));
    auto gpu_name_ok = [&](const std::string& v) { return !v.starts_with("gpu") || v == "gpu" || uint32_t(v[3] - '0') < s.machine.gpus; };
    if (st.kind == StepKind::kPrefetch && !gpu_name_ok(st.str)) return fail(".to", "'" + st.str + "': no such GPU");
    if (st.kind == StepKind::kAdvise && !gpu_name_ok(st.str)) return fail(".preferred", "'" + st.str + "': no such GPU");
  }
  return {};
}

}  // namespace

ParseResult<void> CheckScenario(const Scenario& s) {
  if (s.buffers.empty()) return MakeUnexpected(ParseError{s.file, 0, "buffers", "at least one buffer is needed"});
  uint64_t total = 0;
  for (const BufferSpec& b : s.buffers) total += b.size;
  if (total > s.machine.system_memory_bytes)
    return MakeUnexpected(ParseError{s.file, 0, "machine.system_memory",
                                      fmt::format("buffers total {} but system memory is {}", FormatBytes(total),
                                                  FormatBytes(s.machine.system_memory_bytes))});
  for (const Phase& p : s.phases)
    if (auto r = CheckSteps(s, p.steps, "phases." + p.name); !r) return r;
  return {};
}

ParseResult<Scenario> ParseScenarioString(const std::string& text, const std::string& file) {
  YAML::Node root;
  try {
    root = YAML::Load(text);
  } catch (const YAML::Exception& e) {
    return MakeUnexpected(ParseError{file, e.mark.line >= 0 ? e.mark.line + 1 : 0, "", "YAML syntax: " + e.msg});
  }
  Parser p{file};
  try {
    return p.Top(root);
  } catch (const YAML::Exception& e) {
    return MakeUnexpected(ParseError{file, e.mark.line >= 0 ? e.mark.line + 1 : 0, "", e.msg});
  }
}

ParseResult<Scenario> ParseScenarioFile(const std::string& path) {
  std::ifstream in(path);
  if (!in) return MakeUnexpected(ParseError{path, 0, "", "cannot open the file"});
  std::stringstream ss;
  ss << in.rdbuf();
  if (in.bad()) return MakeUnexpected(ParseError{path, 0, "", "cannot read the file"});
  return ParseScenarioString(ss.str(), path);
}

// ---- overrides ----------------------------------------------------------------

namespace {
const char* const kKeys[] = {"seed", "verify", "machine.gpus", "machine.vram", "machine.system_memory",
                             "machine.exec_threads", "machine.copy_engines", "machine.fault_batch",
                             "machine.fault_buffer_entries", "machine.latency", "machine.shared_owner",
                             "machine.peer_access", "machine.tlb_flush_ns", "machine.fault_latency_ns",
                             "machine.link_bandwidth", "framework.notifier_size", "framework.chunk_sizes",
                             "framework.check_pages_threshold", "framework.invalidation", "framework.placement",
                             "framework.peer_policy", "framework.atomic_timeslice_ms", "framework.atomic_tries",
                             "framework.migration", "framework.eviction", "framework.thrashing",
                             "framework.density_threshold", "framework.tree_threshold",
                             "framework.thrashing_threshold", "framework.pin_threshold",
                             "framework.access_counters", "framework.access_counter_threshold",
                             "framework.access_counter_granularity"};
}

std::vector<std::string> OverrideKeys() {
  std::vector<std::string> k(std::begin(kKeys), std::end(kKeys));
  k.push_back("buffers.<name>.size");
  return k;
}

namespace {
ParseResult<void> ApplyOverrideTo(Scenario& s, const std::string& key, const std::string& value);
}

// On a copy: a failed override leaves the scenario as it was.
ParseResult<void> ApplyOverride(Scenario& s, const std::string& key, const std::string& value) {
  Scenario copy = s;
  auto r = ApplyOverrideTo(copy, key, value);
  if (r) s = std::move(copy);
  return r;
}

namespace {
ParseResult<void> ApplyOverrideTo(Scenario& s, const std::string& key, const std::string& value) {
  // Reuse the YAML field checks: build the one-field document and parse it.
  auto err = [&](const std::string& msg) {
    return MakeUnexpected(ParseError{"--set", 0, key, msg});
  };
  Parser p{"--set"};
  YAML::Node v;
  try {
    v = key == "framework.chunk_sizes" ? YAML::Load("[" + value + "]") : YAML::Node(value);
  } catch (const YAML::Exception& e) {
    return err("bad value: " + e.msg);
  }
  auto wrap = [&](ParseResult<void> r) -> ParseResult<void> {
    if (!r) {
      ParseError e = r.error();
      e.file = "--set";
      e.line = 0;
      return MakeUnexpected(e);
    }
    auto c = CheckScenario(s);
    if (!c) {
      ParseError e = c.error();
      e.file = "--set";
      e.line = 0;
      e.field = key + " (" + e.field + ")";
      return MakeUnexpected(e);
    }
    return {};
  };
  const auto dot = key.find('.');
  const std::string head = key.substr(0, dot);
  const std::string tail = dot == std::string::npos ? "" : key.substr(dot + 1);
  if (key == "seed") {
    auto r = p.U64(v, "seed");
    if (!r) return wrap(MakeUnexpected(r.error()));
    s.seed = *r;
    return {};
  }
  if (key == "verify") {
    auto r = p.Bool(v, "verify");
    if (!r) return wrap(MakeUnexpected(r.error()));
    s.verify = *r;
    return {};
  }
  if ((head == "machine" || head == "framework") && !tail.empty() &&
      std::find(std::begin(kKeys), std::end(kKeys), key) != std::end(kKeys)) {
    YAML::Node m(YAML::NodeType::Map);
    m[tail] = v;
    if (head == "machine") return wrap(p.Machine(m, s.machine));
    return wrap(p.Framework(m, s.framework));
  }
  if (head == "buffers" && tail.ends_with(".size")) {
    const std::string name = tail.substr(0, tail.size() - 5);
    for (BufferSpec& b : s.buffers)
      if (b.name == name) {
        auto r = p.Size(v, key);
        if (!r) return wrap(MakeUnexpected(r.error()));
        if (*r == 0 || *r % kPage) return err("must be a non-zero multiple of 4KiB");
        const uint64_t old = b.size;
        b.size = *r;
        auto c = wrap({});
        if (!c) b.size = old;
        return c;
      }
    return err("no buffer named '" + name + "'");
  }
  return err("unknown key (keys: seed, verify, machine.*, framework.*, buffers.<name>.size; see `usvm run --help`)");
}
}  // namespace

ParseResult<void> ApplyOverride(Scenario& s, const std::string& assignment) {
  const auto eq = assignment.find('=');
  if (eq == std::string::npos || eq == 0)
    return MakeUnexpected(ParseError{"--set", 0, assignment, "expected key=value"});
  return ApplyOverride(s, assignment.substr(0, eq), assignment.substr(eq + 1));
}

}  // namespace usvm::sim
