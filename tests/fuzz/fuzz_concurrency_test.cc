// usvm fuzz with several threads: each on its own slots, sharing the GPUs,
// the address space and the SVM; no mismatch, and the end-of-run
// invariants (no range, GPU mapping, VRAM block or frame left) hold.
#include <gtest/gtest.h>

#include "usvm/fuzz/fuzz.h"

namespace usvm::fuzz {
namespace {

TEST(FuzzConcurrency, TwoThreadsTwoGpus) {
  FuzzConfig c;
  c.seed = 21;
  c.threads = 2;
  c.ops = 1200;
  c.shrink = false;
  auto r = RunFuzz(c);
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(r->mismatches, 0u) << r->failure;
  EXPECT_GT(r->ops_done, 0u);
}

// The racer migrates, evicts, faults pages in and forks over every slot beside the
// workers, and holds every 4th fault between get-pages and commit: the
// commits that raced must retry (docs/fuzz.md: without the retry this
// fails within a few hundred ops).
TEST(FuzzConcurrency, RacerBesideOneWorker) {
  FuzzConfig c;
  c.seed = 31;
  c.ops = 1000;
  c.racer = true;
  c.shrink = false;
  auto r = RunFuzz(c);
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(r->mismatches, 0u) << r->failure;
  EXPECT_EQ(r->ops_done, 1000u);
  EXPECT_GT(r->racer_ops, 0u);
}

TEST(FuzzConcurrency, RacerBesideTwoWorkers) {
  FuzzConfig c;
  c.seed = 32;
  c.threads = 2;
  c.ops = 1000;
  c.racer = true;
  c.shrink = false;
  auto r = RunFuzz(c);
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(r->mismatches, 0u) << r->failure;
  EXPECT_GT(r->racer_ops, 0u);
}

TEST(FuzzConcurrency, RacerWithInjectedFailuresIsRefused) {
  FuzzConfig c;
  c.racer = true;
  c.inject = 0.01;
  auto r = RunFuzz(c);
  ASSERT_FALSE(r.has_value());
  EXPECT_EQ(r.error().code(), Errc::kInval);
}

}  // namespace
}  // namespace usvm::fuzz
