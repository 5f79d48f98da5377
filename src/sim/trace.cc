// The Chrome / Perfetto trace-event JSON writer (trace.h).
#include "usvm/sim/trace.h"

#include <fmt/core.h>

#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>

#include "usvm/mm/mmu_notifier_range.h"

namespace usvm::sim {

namespace {
// Process ids: 1 the CPU, 10 + g GPU g.
constexpr int kCpuPid = 1;
int GpuPid(uint32_t g) { return 10 + int(g); }
}  // namespace

bool WriteTrace(const std::string& path, uint64_t t0_ns, uint32_t gpus, const std::vector<driver::Event>& events,
                const std::vector<SimSpan>& spans, std::string* err) {
  using nlohmann::json;
  json evs = json::array();
  auto ts = [&](uint64_t ns) { return ns >= t0_ns ? double(ns - t0_ns) / 1000.0 : 0.0; };
  std::set<std::pair<int, uint32_t>> threads;
  evs.push_back({{"ph", "M"}, {"name", "process_name"}, {"pid", kCpuPid}, {"args", {{"name", "CPU"}}}});
  for (uint32_t g = 0; g < gpus; ++g)
    evs.push_back({{"ph", "M"}, {"name", "process_name"}, {"pid", GpuPid(g)}, {"args", {{"name", fmt::format("GPU {}", g)}}}});
  for (const driver::Event& e : events) {
    const int pid = e.gpu == UINT32_MAX ? kCpuPid : GpuPid(e.gpu);
    threads.insert({pid, e.thread});
    json args = {{"va", fmt::format("{:#x}", e.va)}, {"len", e.len}};
    std::string name = driver::EventKindName(e.kind);
    std::string cat = name;
    switch (e.kind) {
      case driver::EventKind::kGpuFault:
        cat = "fault";
        args["access"] = e.detail;
        if (e.result) args["errno"] = e.result;
        break;
      case driver::EventKind::kMigrateToVram:
      case driver::EventKind::kMigrateToRam:
        cat = "migration";
        args["reason"] = driver::MigrateReasonName(e.reason);
        args["bytes"] = e.len;
        name += std::string(" (") + driver::MigrateReasonName(e.reason) + (e.policy ? std::string(": ") + e.policy : "") + ")";
        break;
      case driver::EventKind::kInvalidate:
        cat = "invalidation";
        args["event"] = mm::NotifyEventName(static_cast<mm::NotifyEvent>(e.detail));
        name += std::string(" ") + mm::NotifyEventName(static_cast<mm::NotifyEvent>(e.detail));
        break;
      case driver::EventKind::kTlbFlush:
      case driver::EventKind::kTlbWait: cat = "tlb"; break;
      case driver::EventKind::kEviction: cat = "eviction"; break;
      case driver::EventKind::kThrottle:
      case driver::EventKind::kPin: cat = "thrashing"; break;
      case driver::EventKind::kAccessCounter:
        cat = "access_counter";
        args["migrated"] = e.detail != 0;
        name += std::string(e.detail ? " (migrate" : " (stay") + (e.policy ? std::string(": ") + e.policy : "") + ")";
        break;
    }
    if (e.policy) {
      args["policy"] = e.policy;
      if (e.kind == driver::EventKind::kEviction || e.kind == driver::EventKind::kThrottle ||
          e.kind == driver::EventKind::kPin)
        name += std::string(" (") + e.policy + ")";
    }
    json j = {{"name", name}, {"cat", cat}, {"pid", pid}, {"tid", e.thread}, {"ts", ts(e.begin_ns)}, {"args", args}};
    if (e.kind == driver::EventKind::kTlbFlush || e.kind == driver::EventKind::kPin ||
        e.kind == driver::EventKind::kAccessCounter) {
      j["ph"] = "i";
      j["s"] = "t";
    } else {
      j["ph"] = "X";
      j["dur"] = double(e.end_ns - e.begin_ns) / 1000.0;
    }
    evs.push_back(std::move(j));
  }
  for (const SimSpan& s : spans) {
    const int pid = s.gpu == UINT32_MAX ? kCpuPid : GpuPid(s.gpu);
    // Kernels get a lane of their own in their GPU.
    const uint32_t tid = s.gpu == UINT32_MAX ? s.thread : 0;
    threads.insert({pid, tid});
    json j = {{"name", s.name}, {"cat", s.category}, {"ph", "X"}, {"pid", pid}, {"tid", tid},
              {"ts", ts(s.begin_ns)}, {"dur", double(s.end_ns - s.begin_ns) / 1000.0}};
    if (!s.args.empty()) {
      auto a = json::parse(s.args, nullptr, false);
      if (!a.is_discarded()) j["args"] = a;
    }
    evs.push_back(std::move(j));
  }
  for (const auto& [pid, tid] : threads) {
    std::string n = pid == kCpuPid ? fmt::format("thread {}", tid) : tid == 0 ? "kernels" : fmt::format("driver thread {}", tid);
    evs.push_back({{"ph", "M"}, {"name", "thread_name"}, {"pid", pid}, {"tid", tid}, {"args", {{"name", n}}}});
  }
  json doc = {{"traceEvents", evs}, {"displayTimeUnit", "ms"}};
  std::ofstream out(path);
  if (!out) {
    *err = "cannot write the trace to " + path;
    return false;
  }
  out << doc.dump() << "\n";
  out.close();
  if (!out) {
    *err = "cannot write the trace to " + path;
    return false;
  }
  return true;
}

}  // namespace usvm::sim
