// Metrics: percentiles, JSON (nlohmann-json), the summary tables.
#include "usvm/sim/metrics.h"

#include <fmt/core.h>

#include <algorithm>
#include <nlohmann/json.hpp>

#include "usvm/sim/runner.h"

namespace usvm::sim {

std::string Mismatch::ToString() const {
  std::string s = fmt::format("data mismatch in buffer '{}' at va {:#x} (offset {:#x})", buffer, va, offset);
  if (bytes_differ) s += fmt::format(": got {:#04x} want {:#04x}, {} bytes differ", got, want, bytes_differ);
  s += fmt::format("; seen by {} {}; last step that touched it: {}", view, when, last_step);
  return s;
}

uint64_t Percentile(std::vector<uint64_t>& v, double q) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  size_t i = static_cast<size_t>(q * double(v.size() - 1) + 0.5);
  return v[std::min(i, v.size() - 1)];
}

namespace {

nlohmann::json ToJson(const Metrics& m, const Mismatch* mm) {
  nlohmann::json j;
  j["scenario"] = m.scenario;
  if (!m.setting.empty()) j["setting"] = m.setting;
  j["seed"] = m.seed;
  j["gpus"] = m.gpus;
  j["wall_s"] = m.wall_s;
  j["policies"] = {{"migration", m.migration_policy},
                   {"eviction", m.eviction_policy},
                   {"thrashing", m.thrashing_policy},
                   {"policy_prefetches", m.policy_prefetches},
                   {"policy_prefetch_bytes", m.policy_prefetch_bytes},
                   {"throttles", m.throttles},
                   {"pins", m.pins},
                   {"pinned_faults", m.pinned_faults},
                   {"access_counters", m.access_counter_policy}};
  j["access_counters"] = {{"notifications", m.ac_notifications},
                          {"migrations", m.ac_migrations},
                          {"bytes_migrated", m.ac_migrated_bytes},
                          {"thrashing_skips", m.ac_thrashing_skips},
                          {"dropped", m.ac_dropped}};
  j["gpu_faults"] = {{"count", m.gpu_faults},
                     {"cancelled", m.gpu_faults_cancelled},
                     {"latency_p50_ns", m.fault_latency_p50_ns},
                     {"latency_p99_ns", m.fault_latency_p99_ns},
                     {"latency_max_ns", m.fault_latency_max_ns}};
  nlohmann::json reasons = nlohmann::json::object();
  for (const auto& [k, v] : m.migrations_by_reason) reasons[k] = v;
  j["migrations"] = {{"to_vram", m.migrations_to_vram}, {"to_ram", m.migrations_to_ram},
                     {"bytes_to_vram", m.bytes_to_vram}, {"bytes_to_ram", m.bytes_to_ram},
                     {"by_reason", reasons}};
  j["invalidations"] = {{"callbacks", m.invalidations},    {"ranges_zapped", m.ranges_zapped},
                        {"tlb_flushes", m.tlb_flushes},    {"two_pass_finishes", m.two_pass_finishes},
                        {"time_ns", m.invalidation_ns},    {"p50_ns", m.invalidation_p50_ns},
                        {"p99_ns", m.invalidation_p99_ns},
                        {"tlb_flush_serial_ns", m.tlb_flush_serial_ns},
                        {"tlb_wait_ns", m.tlb_wait_ns},
                        {"two_pass_saved_ns", m.two_pass_saved_ns()}};
  j["evictions"] = {{"count", m.evictions}, {"bytes", m.bytes_evicted}};
  j["garbage_collector"] = {{"runs", m.gc_runs}, {"ranges_collected", m.ranges_collected}};
  j["kernels"] = {{"count", m.kernels}, {"time_ns", m.kernel_ns}, {"p50_ns", m.kernel_p50_ns},
                  {"max_ns", m.kernel_max_ns}};
  j["cpu"] = {{"steps", m.cpu_steps}, {"bytes", m.cpu_bytes}};
  nlohmann::json faults = nlohmann::json::array();
  for (const RuntimeFault& f : m.runtime_faults)
    faults.push_back({{"step", f.step}, {"error", f.error}, {"expected", f.expected}});
  j["runtime_faults"] = faults;
  j["unexpected_faults"] = m.unexpected_faults;
  nlohmann::json v = {{"enabled", m.verify},
                      {"checks", m.checks},
                      {"bytes_verified", m.bytes_verified},
                      {"checksums_verified", m.checksums_verified},
                      {"result", !m.verify ? "off" : mm ? "mismatch" : "ok"}};
  if (mm)
    v["mismatch"] = {{"buffer", mm->buffer}, {"va", mm->va},     {"offset", mm->offset},
                     {"got", mm->got},       {"want", mm->want}, {"bytes_differ", mm->bytes_differ},
                     {"view", mm->view},     {"when", mm->when}, {"last_step", mm->last_step},
                     {"message", mm->ToString()}};
  j["verification"] = v;
  nlohmann::json gpus = nlohmann::json::array();
  for (size_t g = 0; g < m.per_gpu.size(); ++g) {
    const PerGpuMetrics& p = m.per_gpu[g];
    gpus.push_back({{"gpu", g},
                    {"faults", p.faults},
                    {"faults_cancelled", p.faults_cancelled},
                    {"range_migrations_to_vram", p.migrations_to_vram},
                    {"bytes_to_vram", p.bytes_to_vram},
                    {"bytes_to_ram", p.bytes_to_ram},
                    {"evictions", p.evictions},
                    {"bytes_evicted", p.bytes_evicted},
                    {"tlb_invalidations", p.tlb_invalidations},
                    {"prefetches", p.prefetches},
                    {"peer_maps", p.peer_maps},
                    {"vram_bytes", p.vram_bytes},
                    {"kernels", p.kernels},
                    {"kernel_ns", p.kernel_ns}});
  }
  j["per_gpu"] = gpus;
  return j;
}

std::string Us(uint64_t ns) {
  if (ns >= 10'000'000) return fmt::format("{:.1f} ms", ns / 1e6);
  return fmt::format("{:.1f} us", ns / 1e3);
}

// The rows of the summary: label, value.
std::vector<std::pair<std::string, std::string>> Rows(const RunResult& r) {
  const Metrics& m = r.metrics;
  std::vector<std::pair<std::string, std::string>> rows;
  rows.push_back({"policies", fmt::format("migration {}, eviction {}, thrashing {}, access counters {}",
                                          m.migration_policy, m.eviction_policy, m.thrashing_policy,
                                          m.access_counter_policy)});
  rows.push_back({"GPU faults (cancelled)", fmt::format("{} ({})", m.gpu_faults, m.gpu_faults_cancelled)});
  rows.push_back({"fault service p50 / p99", fmt::format("{} / {}", Us(m.fault_latency_p50_ns), Us(m.fault_latency_p99_ns))});
  rows.push_back({"migrations to VRAM", fmt::format("{} ({})", m.migrations_to_vram, FormatBytes(m.bytes_to_vram))});
  rows.push_back({"migrations to RAM", fmt::format("{} ({})", m.migrations_to_ram, FormatBytes(m.bytes_to_ram))});
  // Why they moved: "to_vram:prefetch" -> the to-VRAM row's "prefetch N".
  for (const char* dir : {"to_vram", "to_ram"}) {
    std::string why;
    for (const auto& [k, v] : m.migrations_by_reason)
      if (k.starts_with(std::string(dir) + ":"))
        why += fmt::format("{}{} {}", why.empty() ? "" : ", ", k.substr(k.find(':') + 1), v);
    rows.push_back({fmt::format("  why {}", dir == std::string("to_vram") ? "to VRAM" : "to RAM"), why.empty() ? "-" : why});
  }
  rows.push_back({"policy prefetches", fmt::format("{} ({})", m.policy_prefetches, FormatBytes(m.policy_prefetch_bytes))});
  rows.push_back({"throttles / pins (pinned faults)", fmt::format("{} / {} ({})", m.throttles, m.pins, m.pinned_faults)});
  rows.push_back({"access counter notifications",
                  fmt::format("{} (migrated {}: {}; thrashing skips {}; dropped {})", m.ac_notifications,
                              m.ac_migrations, FormatBytes(m.ac_migrated_bytes), m.ac_thrashing_skips, m.ac_dropped)});
  rows.push_back({"invalidations (TLB flushes)", fmt::format("{} ({})", m.invalidations, m.tlb_flushes)});
  rows.push_back({"invalidation time (p50, p99)", fmt::format("{} ({}, {})", Us(m.invalidation_ns),
                                                            Us(m.invalidation_p50_ns), Us(m.invalidation_p99_ns))});
  rows.push_back({"TLB flush wait (serial)", fmt::format("{} ({})", Us(m.tlb_wait_ns), Us(m.tlb_flush_serial_ns))});
  rows.push_back({"time saved by two-pass", Us(m.two_pass_saved_ns())});
  rows.push_back({"evictions", fmt::format("{} ({})", m.evictions, FormatBytes(m.bytes_evicted))});
  rows.push_back({"ranges collected", fmt::format("{}", m.ranges_collected)});
  rows.push_back({"kernels (time, p50)", fmt::format("{} ({}, {})", m.kernels, Us(m.kernel_ns), Us(m.kernel_p50_ns))});
  for (size_t g = 0; g < m.per_gpu.size(); ++g) {
    const PerGpuMetrics& p = m.per_gpu[g];
    rows.push_back({fmt::format("  gpu{}: faults / kernels", g), fmt::format("{} / {} ({})", p.faults, p.kernels, Us(p.kernel_ns))});
    rows.push_back({fmt::format("  gpu{}: in / out / evicted", g),
                    fmt::format("{} / {} / {}", FormatBytes(p.bytes_to_vram), FormatBytes(p.bytes_to_ram),
                                FormatBytes(p.bytes_evicted))});
  }
  size_t expected = m.runtime_faults.size() - m.unexpected_faults;
  rows.push_back({"runtime faults (expected)", fmt::format("{} ({})", m.runtime_faults.size(), expected)});
  std::string v = !m.verify ? "off"
                  : r.mismatch ? "MISMATCH"
                               : fmt::format("ok ({} checks, {}, {} GPU checksums)", m.checks,
                                             FormatBytes(m.bytes_verified), m.checksums_verified);
  rows.push_back({"verification", v});
  rows.push_back({"wall time", fmt::format("{:.2f} s", m.wall_s)});
  return rows;
}

}  // namespace

std::string MetricsJson(const Metrics& m, const Mismatch* mismatch) { return ToJson(m, mismatch).dump(2) + "\n"; }

std::string MetricsJsonArray(const std::vector<const Metrics*>& runs, const std::vector<const Mismatch*>& mm) {
  nlohmann::json a = nlohmann::json::array();
  for (size_t i = 0; i < runs.size(); ++i) a.push_back(ToJson(*runs[i], i < mm.size() ? mm[i] : nullptr));
  return a.dump(2) + "\n";
}

std::string SummaryTable(const RunResult& r) {
  const Metrics& m = r.metrics;
  std::string out = fmt::format("scenario {} (seed {}, {} GPU{})\n", m.scenario, m.seed, m.gpus, m.gpus == 1 ? "" : "s");
  auto rows = Rows(r);
  size_t w = 0;
  for (auto& [k, v] : rows) w = std::max(w, k.size());
  for (auto& [k, v] : rows) out += fmt::format("  {:<{}}  {}\n", k, w, v);
  for (const RuntimeFault& f : m.runtime_faults)
    if (!f.expected) out += fmt::format("  unexpected fault: {}: {}\n", f.step, f.error);
  if (r.mismatch) out += "  " + r.mismatch->ToString() + "\n";
  return out;
}

std::string CompareTable(const std::vector<const RunResult*>& runs) {
  if (runs.empty()) return "";
  std::vector<std::vector<std::pair<std::string, std::string>>> cols;
  for (const RunResult* r : runs) cols.push_back(Rows(*r));
  size_t w = 0;
  for (auto& [k, v] : cols[0]) w = std::max(w, k.size());
  std::vector<size_t> cw(runs.size(), 0);
  for (size_t c = 0; c < runs.size(); ++c) {
    cw[c] = runs[c]->metrics.setting.size();
    for (auto& [k, v] : cols[c]) cw[c] = std::max(cw[c], v.size());
  }
  std::string out = fmt::format("scenario {} (seed {}), settings side by side; '*' marks rows that differ\n",
                                runs[0]->metrics.scenario, runs[0]->metrics.seed);
  out += fmt::format("  {:<{}}  ", "", w);
  for (size_t c = 0; c < runs.size(); ++c) out += fmt::format(" | {:<{}}", runs[c]->metrics.setting, cw[c]);
  out += "\n";
  for (size_t i = 0; i < cols[0].size(); ++i) {
    bool differ = false;
    for (size_t c = 1; c < runs.size(); ++c) differ |= i < cols[c].size() && cols[c][i].second != cols[0][i].second;
    out += fmt::format("{} {:<{}}  ", differ ? '*' : ' ', cols[0][i].first, w);
    for (size_t c = 0; c < runs.size(); ++c)
      out += fmt::format(" | {:<{}}", i < cols[c].size() ? cols[c][i].second : "", cw[c]);
    out += "\n";
  }
  return out;
}

}  // namespace usvm::sim
