// usvm fuzz, single-threaded: no mismatch over short budgets (with and
// without injected failures), determinism, bad input, and reproducers that
// the scenario runner replays.
#include "usvm/fuzz/fuzz.h"

#include <gtest/gtest.h>

#include "usvm/sim/runner.h"
#include "usvm/sim/scenario.h"

namespace usvm::fuzz {
namespace {

FuzzConfig Short(uint64_t seed, uint64_t ops) {
  FuzzConfig c;
  c.seed = seed;
  c.ops = ops;
  c.shrink_time_s = 20;
  return c;
}

TEST(Fuzz, SeveralSeedsMatchTheModel) {
  for (uint64_t seed : {1, 2, 3}) {
    auto r = RunFuzz(Short(seed, 1500));
    ASSERT_TRUE(r.has_value());
    EXPECT_EQ(r->mismatches, 0u) << r->failure;
    EXPECT_EQ(r->ops_done, 1500u);
    EXPECT_GT(r->checks, 1000u);
  }
}

TEST(Fuzz, ThreeGpusAndOneGpu) {
  for (uint32_t g : {1u, 3u}) {
    FuzzConfig c = Short(40 + g, 1000);
    c.gpus = g;
    auto r = RunFuzz(c);
    ASSERT_TRUE(r.has_value());
    EXPECT_EQ(r->mismatches, 0u) << r->failure;
  }
}

TEST(Fuzz, SameSeedSameRun) {
  FuzzConfig c = Short(7, 600);
  auto a = RunFuzz(c);
  auto b = RunFuzz(c);
  ASSERT_TRUE(a.has_value() && b.has_value());
  EXPECT_EQ(a->mismatches, 0u) << a->failure;
  EXPECT_EQ(a->ops_skipped, b->ops_skipped);
  EXPECT_EQ(a->ops_done, b->ops_done);
}

TEST(Fuzz, InjectedFailuresAreReportedAndTheModelStillMatches) {
  FuzzConfig c = Short(22, 1500);
  c.inject = 0.01;
  auto r = RunFuzz(c);
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(r->mismatches, 0u) << r->failure;
  EXPECT_GT(r->injected_failures, 0u);
  uint64_t sites = 0;
  for (auto& [s, n] : r->injected_by_site) sites += n > 0;
  EXPECT_GE(sites, 4u);
}

TEST(Fuzz, BadConfigIsEinval) {
  FuzzConfig c;
  c.gpus = 0;
  EXPECT_FALSE(RunFuzz(c).has_value());
  c = {};
  c.threads = 17;
  EXPECT_FALSE(RunFuzz(c).has_value());
  c = {};
  c.inject = 1.5;
  EXPECT_FALSE(RunFuzz(c).has_value());
  c = {};
  c.ops = 0;
  EXPECT_FALSE(RunFuzz(c).has_value());
  c = {};
  c.vram_bytes = 3 << 20;
  EXPECT_FALSE(RunFuzz(c).has_value());
}

TEST(Fuzz, ReplayOfAGoodListReportsNothing) {
  std::vector<Op> ops;
  ops.push_back({.kind = OpKind::kCpuWrite, .slot = 0, .off = 0, .len = 16, .value = 5});
  ops.push_back({.kind = OpKind::kGpuKernel, .slot = 0, .gpu = 1, .arg = 2, .off = 0, .len = 16, .count = 2, .value = 3});
  ops.push_back({.kind = OpKind::kMprotect, .slot = 0, .arg = 1, .off = 4, .len = 4});
  ops.push_back({.kind = OpKind::kGpuKernel, .slot = 0, .gpu = 0, .arg = 1, .off = 0, .len = 16, .count = 1, .value = 9});
  ops.push_back({.kind = OpKind::kFork});
  ops.push_back({.kind = OpKind::kCpuWrite, .slot = 0, .arg = 1, .off = 0, .len = 2, .value = 6});
  ops.push_back({.kind = OpKind::kMunmap, .slot = 0, .off = 8, .len = 8});
  ops.push_back({.kind = OpKind::kCheck});
  FuzzConfig c;
  EXPECT_EQ(ReplayOps(c, ops), "");
}

// The scenario writer: a list with scenario equivalents becomes YAML that
// parses and that `usvm run` replays without a mismatch; ops without an
// equivalent are named.
TEST(Fuzz, ReproducerIsAScenarioTheRunnerReplays) {
  FuzzConfig c;
  c.slots = 2;
  std::vector<Op> ops;
  ops.push_back({.kind = OpKind::kCpuWrite, .slot = 0, .off = 0, .len = 32, .value = 11});
  ops.push_back({.kind = OpKind::kGpuKernel, .slot = 0, .gpu = 1, .arg = 2, .off = 0, .len = 32, .count = 2, .value = 3});
  ops.push_back({.kind = OpKind::kMprotect, .slot = 0, .arg = 1, .off = 0, .len = 4});
  ops.push_back({.kind = OpKind::kGpuKernel, .slot = 0, .gpu = 0, .arg = 1, .off = 0, .len = 8, .count = 1, .value = 9});
  ops.push_back({.kind = OpKind::kMunmap, .slot = 1, .off = 16, .len = 16});
  ops.push_back({.kind = OpKind::kPrefetch, .slot = 0, .gpu = 0, .arg = 2, .off = 8, .len = 8});
  ops.push_back({.kind = OpKind::kCpuRead, .slot = 0, .off = 0, .len = 32});
  std::string why;
  const std::string yaml = ToScenarioYaml(c, ops, &why);
  ASSERT_FALSE(yaml.empty()) << why;
  EXPECT_NE(yaml.find("expect: fault"), std::string::npos) << yaml;  // the kernel on read-only pages
  auto s = sim::ParseScenarioString(yaml, "repro.yaml");
  ASSERT_TRUE(s.has_value()) << s.error().ToString() << "\n" << yaml;
  auto run = sim::RunScenario(*s, {});
  ASSERT_TRUE(run.has_value()) << run.error();
  EXPECT_FALSE(run->mismatch.has_value()) << run->mismatch->ToString();

  ops.push_back({.kind = OpKind::kEvict, .gpu = 0});
  EXPECT_EQ(ToScenarioYaml(c, ops, &why), "");
  EXPECT_NE(why.find("evict"), std::string::npos) << why;
}


// Regression (driver): seed 11 hung at op 13631 -- a GPU read in the span
// of a bind removed at op 13622 faulted, was replayed as valid and faulted
// again forever (SVM ranges committed with the bind's pages cut out stayed
// valid after Unbind). A hang ends the process through the watchdog.
TEST(Fuzz, Seed11UnbindThenAccessDoesNotHang) {
  FuzzConfig c = Short(11, 13640);
  c.check_every = 1000;
  auto r = RunFuzz(c);
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(r->mismatches, 0u) << r->failure;
}

}  // namespace
}  // namespace usvm::fuzz
