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

}  // namespace
}  // namespace usvm::fuzz
