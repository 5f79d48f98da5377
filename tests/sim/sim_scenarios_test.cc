// Every shipped scenario (scenarios/*.yaml) validates, has a `short`
// setting for CI, and runs it to a verified end with no unexpected fault.
#include <gtest/gtest.h>

#include <filesystem>

#include "usvm/sim/runner.h"
#include "usvm/sim/scenario.h"

namespace usvm::sim {
namespace {

std::vector<std::string> ShippedScenarios() {
  std::vector<std::string> out;
  for (const auto& e : std::filesystem::directory_iterator(std::string(USVM_SOURCE_DIR) + "/scenarios"))
    if (e.path().extension() == ".yaml") out.push_back(e.path().string());
  std::sort(out.begin(), out.end());
  return out;
}

class ShippedScenario : public ::testing::TestWithParam<std::string> {};

TEST_P(ShippedScenario, ValidatesAndRunsShortVariant) {
  auto s = ParseScenarioFile(GetParam());
  ASSERT_TRUE(s.has_value()) << s.error().ToString();
  auto it = s->settings.find("short");
  ASSERT_NE(it, s->settings.end()) << GetParam() << " has no `short` setting for CI";
  Scenario v = *s;
  for (const auto& [k, val] : it->second) ASSERT_TRUE(ApplyOverride(v, k, val).has_value()) << k;
  auto r = RunScenario(v);
  ASSERT_TRUE(r.has_value()) << r.error();
  EXPECT_FALSE(r->mismatch.has_value()) << r->mismatch->ToString();
  EXPECT_TRUE(r->metrics.verified);
  for (const RuntimeFault& f : r->metrics.runtime_faults)
    EXPECT_TRUE(f.expected) << GetParam() << ": " << f.step << ": " << f.error;
  EXPECT_GT(r->metrics.kernels, 0u);
}

INSTANTIATE_TEST_SUITE_P(Library, ShippedScenario, ::testing::ValuesIn(ShippedScenarios()),
                         [](const ::testing::TestParamInfo<std::string>& i) {
                           std::string n = std::filesystem::path(i.param).stem().string();
                           for (char& c : n)
                             if (!isalnum(static_cast<unsigned char>(c))) c = '_';
                           return n;
                         });

TEST(ShippedScenarios, LibraryIsThere) { EXPECT_GE(ShippedScenarios().size(), 9u); }

}  // namespace
}  // namespace usvm::sim
