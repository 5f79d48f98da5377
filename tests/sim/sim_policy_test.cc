// Policies end to end (driver/policy.h through `usvm run`'s runner): the
// scenario keys and their errors, and the two claims of docs/policies.md
// on the shipped scenarios' short variants -- density prefetch cuts GPU
// faults >= 4x against fault-only (scenarios/prefetch.yaml), and UVM's
// thrashing control cuts the bytes migrated >= 2x on an oversubscribed
// ping-pong (scenarios/thrashing.yaml); and access counters migrate the
// hot remotely mapped table of scenarios/hot_remote.yaml, not its cold
// log. Counts, not times.
#include <gtest/gtest.h>

#include <fmt/format.h>

#include <string>

#include "usvm/sim/runner.h"
#include "usvm/sim/scenario.h"

namespace usvm::sim {
namespace {

constexpr const char* kBase = R"(name: t
buffers:
  - {name: a, size: 64KiB}
phases:
  - name: p
    steps:
      - cpu_write: {buffer: a}
)";

TEST(PolicyKeys, ParseAndOverride) {
  auto s = ParseScenarioString(std::string(kBase) + R"(framework:
  migration: tree
  eviction: pseudo-lru
  thrashing: uvm
  density_threshold: 60
  pin_threshold: 4
)", "p.yaml");
  ASSERT_TRUE(s.has_value()) << s.error().ToString();
  EXPECT_EQ(s->framework.migration, "tree");
  EXPECT_EQ(s->framework.eviction, "pseudo-lru");
  EXPECT_EQ(s->framework.thrashing, "uvm");
  EXPECT_EQ(s->framework.policy.density_threshold, 60u);
  EXPECT_EQ(s->framework.policy.pin_threshold, 4u);
  ASSERT_TRUE(ApplyOverride(*s, "framework.migration=density").has_value());
  EXPECT_EQ(s->framework.migration, "density");
}

TEST(PolicyKeys, UnknownNamesNameFileLineAndField) {
  auto s = ParseScenarioString(std::string(kBase) + "framework:\n  eviction: mru\n", "bad.yaml");
  ASSERT_FALSE(s.has_value());
  EXPECT_EQ(s.error().line, 9);
  EXPECT_EQ(s.error().field, "framework.eviction");
  EXPECT_NE(s.error().ToString().find("bad.yaml:9: framework.eviction: 'mru' is not one of: lru, lfu, pseudo-lru"),
            std::string::npos)
      << s.error().ToString();
  s = ParseScenarioString(std::string(kBase) + "framework:\n  migration: dense\n", "bad.yaml");
  ASSERT_FALSE(s.has_value());
  EXPECT_EQ(s.error().field, "framework.migration");
  s = ParseScenarioString(std::string(kBase) + "framework:\n  thrashing: [uvm]\n", "bad.yaml");
  ASSERT_FALSE(s.has_value());
  EXPECT_EQ(s.error().field, "framework.thrashing");
  s = ParseScenarioString(std::string(kBase) + "framework:\n  density_threshold: 101\n", "bad.yaml");
  ASSERT_FALSE(s.has_value());
  auto ok = ParseScenarioString(kBase, "ok.yaml");
  ASSERT_TRUE(ok.has_value());
  auto r = ApplyOverride(*ok, "framework.thrashing=sometimes");
  ASSERT_FALSE(r.has_value());
  EXPECT_EQ(r.error().file, "--set");
  EXPECT_EQ(ok->framework.thrashing, "none");  // unchanged
}

TEST(PolicyKeys, AccessCounterKeys) {
  auto s = ParseScenarioString(std::string(kBase) + R"(framework:
  access_counters: "on"
  access_counter_threshold: 100
  access_counter_granularity: 2MiB
)", "p.yaml");
  ASSERT_TRUE(s.has_value()) << s.error().ToString();
  EXPECT_EQ(s->framework.access_counters, "on");
  EXPECT_EQ(s->framework.access_counter_threshold, 100u);
  EXPECT_EQ(s->framework.access_counter_granularity, uint64_t{2} << 20);
  ASSERT_TRUE(ApplyOverride(*s, "framework.access_counters=off").has_value());
  EXPECT_EQ(s->framework.access_counters, "off");
  ASSERT_TRUE(ApplyOverride(*s, "framework.access_counter_granularity=64KiB").has_value());
  EXPECT_EQ(s->framework.access_counter_granularity, uint64_t{64} << 10);
  for (const char* bad : {"framework.access_counters=sometimes", "framework.access_counter_threshold=0",
                          "framework.access_counter_threshold=65536", "framework.access_counter_granularity=4KiB"}) {
    auto r = ApplyOverride(*s, bad);
    ASSERT_FALSE(r.has_value()) << bad;
    EXPECT_EQ(r.error().file, "--set");
  }
  EXPECT_EQ(s->framework.access_counter_granularity, uint64_t{64} << 10);  // unchanged
  auto b = ParseScenarioString(std::string(kBase) + "framework:\n  access_counter_granularity: 1MiB\n", "bad.yaml");
  ASSERT_FALSE(b.has_value());
  EXPECT_EQ(b.error().field, "framework.access_counter_granularity");
}

// The scenario's short variant under setting `name`.
Metrics RunSetting(const std::string& file, const std::string& name, bool long_epoch = false) {
  auto s = ParseScenarioFile(std::string(USVM_SOURCE_DIR) + "/scenarios/" + file);
  EXPECT_TRUE(s.has_value()) << s.error().ToString();
  if (!s) return {};
  Scenario v = *s;
  // A copy of each setting's overrides: ApplyOverride replaces v (and
  // with it v.settings) on success.
  for (const char* setting : {"short", name.c_str()}) {
    const auto overrides = v.settings.at(setting);
    for (const auto& [k, val] : overrides) EXPECT_TRUE(ApplyOverride(v, k, val).has_value()) << k;
  }
  // The thrashing epoch is time: keep a slow machine (sanitizers) within one.
  if (long_epoch) v.framework.policy.epoch_lapses = 1'000'000;
  auto r = RunScenario(v);
  EXPECT_TRUE(r.has_value()) << r.error();
  if (!r) return {};
  EXPECT_TRUE(r->metrics.verified) << (r->mismatch ? r->mismatch->ToString() : "");
  EXPECT_EQ(r->metrics.unexpected_faults, 0u);
  EXPECT_EQ(r->metrics.migration_policy, v.framework.migration);
  return r->metrics;
}

uint64_t ByReason(const Metrics& m, const std::string& key) {
  for (const auto& [k, v] : m.migrations_by_reason)
    if (k == key) return v;
  return 0;
}

TEST(PolicyEndToEnd, DensityCutsFaultsAtLeast4x) {
  const Metrics fo = RunSetting("prefetch.yaml", "fault_only");
  const Metrics de = RunSetting("prefetch.yaml", "density");
  const Metrics tr = RunSetting("prefetch.yaml", "tree");
  ASSERT_GT(de.gpu_faults, 0u);
  EXPECT_GE(fo.gpu_faults, 4 * de.gpu_faults) << fo.gpu_faults << " vs " << de.gpu_faults;
  EXPECT_GE(fo.gpu_faults, 4 * tr.gpu_faults) << fo.gpu_faults << " vs " << tr.gpu_faults;
  // The same bytes moved; the prefetched ones are named after the policy.
  EXPECT_EQ(fo.bytes_to_vram, de.bytes_to_vram);
  EXPECT_EQ(ByReason(fo, "to_vram:policy_prefetch(density)"), 0u);
  EXPECT_GT(ByReason(de, "to_vram:policy_prefetch(density)"), 0u);
  EXPECT_EQ(ByReason(de, "to_vram:policy_prefetch(density)"), de.policy_prefetches);
  EXPECT_GT(ByReason(tr, "to_vram:policy_prefetch(tree)"), 0u);
}

TEST(PolicyEndToEnd, ThrashingControlCutsBytesAtLeast2x) {
  const Metrics none = RunSetting("thrashing.yaml", "fault_only", true);
  const Metrics uvm = RunSetting("thrashing.yaml", "thrash_uvm", true);
  EXPECT_EQ(none.throttles + none.pins, 0u);
  EXPECT_GT(uvm.throttles, 0u);
  EXPECT_GT(uvm.pins, 0u);
  ASSERT_GT(uvm.bytes_to_vram, 0u);
  EXPECT_GE(none.bytes_to_vram, 2 * uvm.bytes_to_vram) << none.bytes_to_vram << " vs " << uvm.bytes_to_vram;
  EXPECT_GT(ByReason(none, "to_ram:eviction(lru)"), 0u);
}

TEST(PolicyEndToEnd, AccessCountersMigrateTheHotRemoteTableOnly) {
  const Metrics off = RunSetting("hot_remote.yaml", "ac_off");
  const Metrics on = RunSetting("hot_remote.yaml", "ac_on");
  // Placement "system": without access counters nothing moves.
  EXPECT_EQ(off.bytes_to_vram, 0u);
  EXPECT_EQ(off.ac_notifications, 0u);
  EXPECT_EQ(off.access_counter_policy, "off");
  // With them the table's 64 KiB regions pass the threshold in the first
  // pass and its (2 MiB) range moves once; the log's regions see one
  // access per pass and never notify.
  EXPECT_GT(on.ac_notifications, 0u);
  const std::string why = fmt::format("notifications {}, migrations {}, to RAM {}, gpu faults {}", on.ac_notifications,
                                      on.ac_migrations, on.bytes_to_ram, on.gpu_faults);
  EXPECT_EQ(on.ac_migrations, 1u) << why;
  EXPECT_EQ(on.ac_migrated_bytes, uint64_t{2} << 20);
  EXPECT_EQ(on.bytes_to_vram, uint64_t{2} << 20);
  EXPECT_EQ(ByReason(on, "to_vram:access_counter(access_counters)"), 1u);
  EXPECT_EQ(on.ac_dropped, 0u);
}

}  // namespace
}  // namespace usvm::sim
